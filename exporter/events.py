"""The typed event model every source produces, and the decoder for event lines.

An event line (DESIGN.md, "Event lines") is decoded and validated in one pass by msgspec;
a line that breaks the contract becomes a ``Rejected`` with a bounded ``reason`` (a label
of ``aicrm_source_rejected_events_total``) and a human-readable ``detail`` naming the field.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

Name = Annotated[str, Meta(min_length=1, max_length=256)]
# Upper bounds far above any real value, so that sums of them stay finite: a counter that
# reached +Inf would stay there (and its saved state, JSON null, is no number). A value past a
# bound is rejected as out_of_range.
MAX_DURATION_MS = 365 * 86_400_000.0
"""One year."""
MAX_COST_USD = 1_000_000.0
"""For one LLM call."""
MAX_COUNT = 1_000_000_000
"""Tokens of one call, retries of one task."""
MAX_TS_AHEAD_SECONDS = 86_400.0
"""How far ahead of the exporter's clock an event's ``ts`` may be (writers' clocks drift): one
further ahead is no real time (epoch milliseconds sent where seconds belong, for one) and is
rejected as out_of_range, rather than reading as lag 0 for ever after."""
DurationMs = Annotated[float, Meta(ge=0, le=MAX_DURATION_MS)]
CostUsd = Annotated[float, Meta(ge=0, le=MAX_COST_USD)]
Count = Annotated[int, Meta(ge=0, le=MAX_COUNT)]
# RFC 3339 with an offset or Z, or Unix epoch seconds.
Timestamp = Annotated[datetime, Meta(tz=True)] | float | None
AnyId = Annotated[str, Meta(max_length=256)] | int | None


class _Event(Struct, tag_field="event", kw_only=True, gc=False):
    ts: Timestamp = None

    def epoch(self) -> float | None:
        ts = self.ts
        if ts is None or isinstance(ts, float | int):
            return ts
        return ts.timestamp()


class TaskResult(_Event, tag="task_result"):
    agent: Name
    task_type: Name
    outcome: Literal["success", "failure", "escalated"]
    task_id: AnyId = None
    duration_ms: DurationMs | None = None
    retries: Count | None = None
    workflow: Name | None = None


class LlmCall(_Event, tag="llm_call"):
    agent: Name
    model: Name
    operation: Name = "chat"
    provider: Name | None = None
    duration_ms: DurationMs | None = None
    input_tokens: Count | None = None
    output_tokens: Count | None = None
    cost_usd: CostUsd | None = None
    error_type: Name | None = None


class ToolCall(_Event, tag="tool_call"):
    agent: Name
    tool: Name
    duration_ms: DurationMs | None = None
    outcome: Literal["success", "failure"] = "success"
    error_type: Name | None = None


class Handoff(_Event, tag="handoff"):
    from_agent: Name
    to_agent: Name
    workflow: Name | None = None
    task_id: AnyId = None


class IntegrationCall(_Event, tag="integration_call"):
    platform: Name
    operation: Name
    status: Annotated[int, Meta(ge=100, le=599)] | Literal["timeout"] | None = None
    duration_ms: DurationMs | None = None
    agent: Name | None = None


class Interaction(_Event, tag="interaction"):
    channel: Name
    type: Literal["message", "approval", "rejection", "feedback", "escalation"]
    user: Annotated[str, Meta(max_length=256)] | int | None = None
    agent: Name | None = None
    rating: Annotated[int, Meta(ge=1, le=5)] | None = None


Event = TaskResult | LlmCall | ToolCall | Handoff | IntegrationCall | Interaction
EVENT_KINDS = ("task_result", "llm_call", "tool_call", "handoff", "integration_call", "interaction")


@dataclass(frozen=True, slots=True)
class Rejected:
    """A line that broke the contract: ``reason`` is a bounded label, ``detail`` is for humans."""

    reason: str
    detail: str


_decoder = msgspec.json.Decoder(Event)
_encoder = msgspec.json.Encoder()

decode_event = _decoder.decode
"""The hot path's decoder: raises on a bad line (then ``decode_line`` says why). It does not
check ``ts_ahead``: its caller does."""


def _classify(message: str) -> str:
    if message.startswith("Invalid value") and message.endswith("`$.event`"):
        return "unknown_event"
    if message.startswith("Object missing required field"):
        return "missing_field"
    if message.startswith("Expected `object`"):
        return "not_object"
    if message.startswith(("Invalid enum value", "Number out of range")) or (
        message.startswith("Expected") and (" >= " in message or " <= " in message
                                            or "of length" in message)
    ):
        return "out_of_range"
    return "wrong_type"


def utf8_error(line: bytes) -> Rejected | None:
    """The decoder skips unknown fields without checking their text, so a line with invalid
    UTF-8 there would pass; the contract rejects every line that is not UTF-8."""
    if line.isascii():
        return None
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Rejected("invalid_utf8", f"invalid UTF-8 at byte {exc.start}")
    return None


def ts_ahead(event: Event, now: float) -> Rejected | None:
    """The rejection of an event whose ``ts`` is more than MAX_TS_AHEAD_SECONDS after ``now``."""
    ts = event.epoch()
    if ts is None or not ts > now + MAX_TS_AHEAD_SECONDS:
        return None
    hint = " (epoch milliseconds? ts is in seconds)" if ts > now * 100 else ""
    return Rejected("out_of_range",
                    f"`$.ts` {ts:.0f} is more than {MAX_TS_AHEAD_SECONDS / 3600:.0f} h ahead of "
                    f"the exporter's clock{hint}")


def decode_line(line: bytes, now: float | None = None) -> Event | Rejected:
    """Decode one event line (without its newline). Never raises on bad input. ``now``: the
    clock a ``ts`` may not be far ahead of (default: the wall clock)."""
    bad = utf8_error(line)
    if bad is not None:
        return bad
    try:
        ev: Event = _decoder.decode(line)
        return ts_ahead(ev, time.time() if now is None else now) or ev
    except msgspec.ValidationError as exc:
        msg = str(exc)
        return Rejected(_classify(msg), msg)
    except msgspec.DecodeError as exc:
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as uexc:
            return Rejected("invalid_utf8", f"invalid UTF-8 at byte {uexc.start}")
        return Rejected("invalid_json", str(exc))
    except UnicodeDecodeError as exc:
        return Rejected("invalid_utf8", f"invalid UTF-8 at byte {exc.start}")


def encode_event(event: Event) -> bytes:
    """One event as a JSON line body (no newline); ``decode_line`` reads it back unchanged."""
    return _encoder.encode(event)


# --- Task database ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HistogramData:
    """A histogram's state: per-bucket (not cumulative) counts for the catalog's bounds plus
    one for +Inf, the sum of observations and their count."""

    buckets: tuple[int, ...]
    sum: float
    count: int


@dataclass(frozen=True, slots=True)
class TaskDbSnapshot:
    """Aggregates of the tasks table as of one poll. Label values are already mapped to the
    declared sets (undeclared -> ``other``); counts are totals from the database, so an
    exporter restart rebuilds the same numbers."""

    totals: Mapping[tuple[str, str, str], int] = field(default_factory=dict)
    """(task_type, agent, status) -> tasks that reached that terminal status."""
    duration: Mapping[tuple[str, str], HistogramData] = field(default_factory=dict)
    """(task_type, agent) -> started->finished seconds of terminal tasks."""
    wait: Mapping[str, HistogramData] = field(default_factory=dict)
    """task_type -> created->started seconds of started tasks."""
    open: Mapping[tuple[str, str], int] = field(default_factory=dict)
    """(task_type, status) -> tasks queued or running now."""
    oldest_open_age: Mapping[str, float] = field(default_factory=dict)
    """task_type -> age in seconds of the oldest open task (0 when none)."""
