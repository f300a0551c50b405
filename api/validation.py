"""Query parameters: parsed once, with a 400 naming the parameter when one is wrong.

The constants here are also what api/openapi.py publishes, so the spec and the checks agree.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

import flask
from werkzeug.datastructures import MultiDict
from werkzeug.utils import cached_property

from exporter.config import LABEL_VALUE_RE

from .errors import InvalidParameter, InvalidQueryString

# Prometheus duration syntax, units in decreasing order (as PromQL requires), no fractions.
DURATION_RE = r"^(?:[0-9]+w)?(?:[0-9]+d)?(?:[0-9]+h)?(?:[0-9]+m)?(?:[0-9]+s)?$"
_DURATION = re.compile(
    r"^(?:(?P<w>[0-9]+)w)?(?:(?P<d>[0-9]+)d)?(?:(?P<h>[0-9]+)h)?(?:(?P<m>[0-9]+)m)?"
    r"(?:(?P<s>[0-9]+)s)?$"
)
_UNIT_SECONDS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}

WINDOW_MIN_SECONDS = 60
WINDOW_MAX_SECONDS = 30 * 86400
STEP_MIN_SECONDS = 1
STEP_MAX_SECONDS = 86400
MAX_POINTS_PER_SERIES = 11_000
"""Prometheus refuses range queries with more steps than this."""
EXPORT_FORMATS = ("csv", "json")

_LABEL_VALUE = re.compile(LABEL_VALUE_RE)
# RFC 3339 date-time (what the OpenAPI "date-time" format means), with a mandatory offset.
_RFC3339 = re.compile(
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,9})?"
    r"(?:[Zz]|[+-][0-9]{2}:[0-9]{2})$"
)
_EPOCH = re.compile(r"^[0-9]{1,11}(?:\.[0-9]{1,9})?$")


@dataclass(frozen=True, slots=True)
class Window:
    """A look-back window; ``text`` is its canonical PromQL spelling."""

    seconds: int

    @property
    def text(self) -> str:
        return format_duration(self.seconds)


def format_duration(seconds: int) -> str:
    """Canonical Prometheus spelling: 90 -> '1m30s', 86400 -> '1d'."""
    out = []
    for unit in ("d", "h", "m", "s"):
        n, seconds = divmod(seconds, _UNIT_SECONDS[unit])
        if n:
            out.append(f"{n}{unit}")
    return "".join(out) or "0s"


def parse_duration(text: str) -> int | None:
    """Seconds in a Prometheus duration, or None if the text is not one."""
    m = _DURATION.fullmatch(text)
    if not m or not text:
        return None
    return sum(int(v) * _UNIT_SECONDS[k] for k, v in m.groupdict().items() if v is not None)


def only(args: MultiDict[str, str], names: frozenset[str]) -> None:
    """A 400 for a parameter the endpoint does not take or one given twice: either would be
    ignored (a view reads the first value), so two different queries would get one answer."""
    # A MultiDict is a dict of value lists: read them in place (a third of the cost of
    # ``lists()``, which copies each; test_validation's repeated parameters would catch a change).
    for name, values in dict.items(args):
        if name not in names:
            raise InvalidParameter(name[:64], "unknown parameter; expected "
                                              + ", ".join(sorted(names)))
        if len(values) > 1:
            raise InvalidParameter(name, "given more than once")


class Request(flask.Request):
    """The app's request class: a query string of raw bytes that are not UTF-8 (which gunicorn
    refuses itself, other WSGI servers pass on) makes ``args`` a 400, not a UnicodeDecodeError
    answered as a 500 (hits.request_args fails alike, and hands the request to Flask)."""

    @cached_property
    def args(self) -> MultiDict[str, str]:
        try:
            return super().args
        except UnicodeDecodeError:
            raise InvalidQueryString() from None


def _one(args: Mapping[str, str], name: str) -> str | None:
    value = args.get(name)
    if value is None:
        return None
    if "\x00" in value:
        raise InvalidParameter(name, "must not contain NUL characters")
    return value


def window(args: Mapping[str, str], default: str, name: str = "window") -> Window:
    text = _one(args, name)
    text = default if text is None else text.strip()
    seconds = parse_duration(text)
    if seconds is None:
        raise InvalidParameter(name, f"expected a Prometheus duration such as 5m, 1h or 7d, "
                                     f"got {text[:40]!r}")
    if not WINDOW_MIN_SECONDS <= seconds <= WINDOW_MAX_SECONDS:
        raise InvalidParameter(name, "must be between 1m and 30d")
    return Window(seconds)


def label_value(args: Mapping[str, str], name: str) -> str | None:
    """An optional agent / task type filter, in config.json's label value syntax."""
    value = _one(args, name)
    if value is None:
        return None
    if not _LABEL_VALUE.fullmatch(value):
        raise InvalidParameter(name, f"must match {LABEL_VALUE_RE}")
    return value


def choice(args: Mapping[str, str], name: str, choices: tuple[str, ...],
           default: str | None = None) -> str:
    value = _one(args, name)
    if value is None:
        if default is None:
            raise InvalidParameter(name, f"is required (one of {', '.join(choices)})")
        return default
    if value not in choices:
        raise InvalidParameter(name, f"must be one of {', '.join(choices)}")
    return value


def timestamp(args: Mapping[str, str], name: str, default: float) -> float:
    """RFC 3339 or Unix seconds."""
    value = _one(args, name)
    if value is None:
        return default
    value = value.strip()
    if _EPOCH.fullmatch(value):
        return float(value)
    if _RFC3339.fullmatch(value):
        try:
            dt = datetime.fromisoformat(value.replace("z", "Z").replace("t", "T"))
        except ValueError:
            raise InvalidParameter(name, "not a valid date-time") from None
        ts = dt.timestamp()
        if ts < 0:
            raise InvalidParameter(name, "must not be before 1970")
        return ts
    raise InvalidParameter(name, "expected RFC 3339 (2024-05-01T12:00:00Z) or Unix seconds")


def step(args: Mapping[str, str], default: int) -> float:
    """A Prometheus duration or a number of seconds, rounded to the millisecond: the backend's
    resolution, so the step reported is the one the points are apart."""
    value = _one(args, "step")
    if value is None:
        return float(default)
    value = value.strip()
    seconds: float | None
    if _EPOCH.fullmatch(value):
        seconds = float(value)
    else:
        parsed = parse_duration(value)
        seconds = None if parsed is None else float(parsed)
    if seconds is None or not math.isfinite(seconds):
        raise InvalidParameter("step", "expected seconds or a Prometheus duration such as 1m")
    if not STEP_MIN_SECONDS <= seconds <= STEP_MAX_SECONDS:
        raise InvalidParameter("step", "must be between 1s and 1d")
    return round(seconds * 1000) / 1000


def rfc3339(ts: float) -> str:
    """Unix seconds as RFC 3339 UTC with millisecond precision (truncated, as datetime's
    microseconds // 1000). Formatted from ``time.gmtime``, once per second: ``datetime.strftime``
    costs several times more, and this runs twice per response and once per exported point."""
    global _second
    whole = math.floor(ts)
    micros = round((ts - whole) * 1_000_000)  # the fraction is exact; as datetime rounds it
    if micros == 1_000_000:
        whole, micros = whole + 1, 0
    last = _second
    if last[0] != whole:
        t = time.gmtime(whole)
        last = _second = (whole, f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T"
                                 f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}.")
    return f"{last[1]}{micros // 1000:03d}Z"


_second: tuple[int, str] = (0, "1970-01-01T00:00:00.")
"""The last second ``rfc3339`` formatted (a response formats two times of the same second,
and an export many of a few): one tuple, replaced whole, so threads read it safely."""
