"""Prometheus text format for the store's families, fast enough for large fleets.

Byte-for-byte the output of client_python's ``generate_latest`` for the same families (a test
holds it to that), but each series' ``name{labels} `` prefix is built once and cached: label
sets are fixed by config.json, so a scrape only formats numbers. That keeps /metrics for
10,000 series well under 100 ms.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

from .catalog import Kind, MetricSpec


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _escape_value(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def label_string(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(
        f'{k}="{_escape_value(v)}"' for k, v in sorted(labels.items())
    ) + "}"


def _fmt(v: float) -> str:
    # floatToGoString, minus its cost for the common case of small whole numbers.
    v = float(v)
    # Go switches to exponents at 1e6, as floatToGoString does.
    if v.is_integer() and -1e15 < v < 1e6:
        return f"{v:.1f}"
    return floatToGoString(v)


class PrefixCache:
    """``name{labels} `` strings per (metric, label values), built on first use."""

    def __init__(self) -> None:
        self._simple: dict[tuple[str, tuple[str, ...]], str] = {}
        self._hist: dict[tuple[str, tuple[str, ...]], tuple[list[str], str, str]] = {}

    def simple(self, spec: MetricSpec, key: tuple[str, ...]) -> str:
        k = (spec.name, key)
        p = self._simple.get(k)
        if p is None:
            name = spec.base_name + "_total" if spec.kind is Kind.COUNTER else spec.name
            p = name + label_string(dict(zip(spec.labels, key, strict=True))) + " "
            self._simple[k] = p
        return p

    def histogram(self, spec: MetricSpec, key: tuple[str, ...]) -> tuple[list[str], str, str]:
        k = (spec.name, key)
        p = self._hist.get(k)
        if p is None:
            labels = dict(zip(spec.labels, key, strict=True))
            les = [str(float(b)) for b in spec.buckets] + ["+Inf"]
            buckets = [
                spec.name + "_bucket" + label_string({**labels, "le": le}) + " " for le in les
            ]
            ls = label_string(labels)
            p = (buckets, spec.name + "_count" + ls + " ", spec.name + "_sum" + ls + " ")
            self._hist[k] = p
        return p


def header(spec: MetricSpec) -> str:
    name = spec.base_name + "_total" if spec.kind is Kind.COUNTER else spec.name
    return f"# HELP {name} {_escape_help(spec.help)}\n# TYPE {name} {spec.kind.value}\n"


def counter_lines(out: list[str], cache: PrefixCache, spec: MetricSpec,
                  series: Mapping[tuple[str, ...], float] | Mapping[tuple[str, str, str], int]
                  ) -> None:
    out.append(header(spec))
    for key, v in series.items():
        out.append(cache.simple(spec, key))
        out.append(_fmt(v))
        out.append("\n")


def histogram_lines(out: list[str], cache: PrefixCache, spec: MetricSpec,
                    series: Iterable[tuple[tuple[str, ...], list[float]]]) -> None:
    """``series`` values: per-bucket counts (+Inf last), then sum, then count."""
    out.append(header(spec))
    for key, h in series:
        buckets, count_p, sum_p = cache.histogram(spec, key)
        acc = 0.0
        for prefix, n in zip(buckets, h, strict=False):
            acc += n
            out.append(prefix)
            out.append(_fmt(acc))
            out.append("\n")
        out.append(count_p)
        out.append(_fmt(h[-1]))
        out.append("\n")
        out.append(sum_p)
        out.append(_fmt(h[-2]))
        out.append("\n")


def metric_lines(out: list[str], metric: Metric) -> None:
    """Any client_python family (small ones: gauges, config series)."""
    name = metric.name + "_total" if metric.type == "counter" else metric.name
    out.append(f"# HELP {name} {_escape_help(metric.documentation)}\n")
    out.append(f"# TYPE {name} {metric.type}\n")
    for s in metric.samples:
        out.append(f"{s.name}{label_string(s.labels)} {_fmt(float(s.value))}\n")
