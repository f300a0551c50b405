"""GET /export: range data of one recorded dataset as CSV or JSON, streamed, bounded in size.

The range ends at now at the latest: the backend has no data after now (a range query would
repeat each series' last sample for its lookback of five minutes, then answer nothing), and
the series counted at a later end would be none. The JSON head reports the effective end; a
range wholly after now has no points. The bound is checked before the range query (steps per
series, from start/end/step; then series times steps, the series counted by an instant
``count()`` at the range's effective end) and after it (all points of all series, for series
the count missed), so a response never exceeds ``api.export_max_points`` and a request far
over it is refused before any range data is loaded. The step is to the millisecond, as the
backend's (validation.step rounds it), so the step reported is the one the points are apart.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

from flask import Blueprint, Response, request, stream_with_context

from . import queries, validation
from .common import services
from .errors import InvalidParameter
from .promql import RangeSeries

bp = Blueprint("export", __name__)

DEFAULT_RANGE_SECONDS = 3600
DEFAULT_STEP_SECONDS = 60
MAX_RANGE_SECONDS = 31 * 86400
PARAMETERS = frozenset({"dataset", "format", "start", "end", "step"})


def _num(v: float | None) -> str:
    return "" if v is None else repr(v)


def _csv(ds: queries.Dataset, series: list[RangeSeries]) -> Iterator[str]:
    yield ",".join(("timestamp", *ds.labels, "value", "unit")) + "\r\n"
    for s in series:
        labels = [s.labels.get(k, "") for k in ds.labels]  # label values have no , or "
        for t, v in s.points:
            yield ",".join((validation.rfc3339(t), *labels, _num(v), ds.unit)) + "\r\n"


def _json(name: str, ds: queries.Dataset, series: list[RangeSeries], start: float, end: float,
          step: float) -> Iterator[str]:
    head = {"dataset": name, "series_name": ds.series, "unit": ds.unit,
            "start": validation.rfc3339(start), "end": validation.rfc3339(end), "step": step}
    yield json.dumps(head)[:-1] + ',"series":['
    for i, s in enumerate(series):
        labels = {k: s.labels.get(k, "") for k in ds.labels}
        points = ",".join(f'["{validation.rfc3339(t)}",{json.dumps(v)}]' for t, v in s.points)
        yield ("," if i else "") + f'{{"labels":{json.dumps(labels)},"points":[{points}]}}'
    yield "]}\n"


@bp.get("/export")
def export() -> Response:
    args = request.args
    validation.only(args, PARAMETERS)
    name = validation.choice(args, "dataset", tuple(queries.DATASETS))
    fmt = validation.choice(args, "format", validation.EXPORT_FORMATS, "csv")
    now = time.time()
    end = validation.timestamp(args, "end", now)
    start = validation.timestamp(args, "start", end - DEFAULT_RANGE_SECONDS)
    step = validation.step(args, DEFAULT_STEP_SECONDS)
    if end < start:
        raise InvalidParameter("end", "must not be before start")
    if end - start > MAX_RANGE_SECONDS:
        raise InvalidParameter("start", "the range must not exceed 31d")
    # No data after now: the range ends there at the latest (and is empty if it starts later).
    end = max(start, min(end, now))
    max_points = services().config.api.export_max_points
    steps = int((end - start) // step) + 1
    if steps > min(max_points, validation.MAX_POINTS_PER_SERIES):
        limit = min(max_points, validation.MAX_POINTS_PER_SERIES)
        raise InvalidParameter("step", f"{steps} points per series, more than {limit}: "
                                       "use a larger step or a shorter range")
    ds = queries.DATASETS[name]
    prometheus = services().prometheus
    expr = ds.expr()
    series: list[RangeSeries] = []
    if start <= now:
        # The number of series at the range's end, before any point is downloaded: a range
        # answer over the bound would otherwise be held and decoded whole (tens of MB) just to
        # refuse it.
        counted = prometheus.query(f"count({expr})", end)
        n_series = int(counted[0].value or 0) if counted else 0
        if n_series * steps > max_points:
            raise InvalidParameter("step", f"{n_series} series x {steps} steps = "
                                           f"{n_series * steps} points, more than "
                                           f"export_max_points ({max_points}): use a larger "
                                           "step or a shorter range")
        series = prometheus.query_range(expr, start, end, step)
    series.sort(key=lambda s: [s.labels.get(k, "") for k in ds.labels])
    # Series that ended inside the range are not in the count: the bound again, on the answer.
    total = sum(len(s.points) for s in series)
    if total > max_points:
        raise InvalidParameter("step", f"{total} points in {len(series)} series, more than "
                                       f"export_max_points ({max_points}): use a larger step "
                                       "or a shorter range")
    if fmt == "csv":
        body = _csv(ds, series)
        mimetype = "text/csv"
    else:
        body = _json(name, ds, series, start, end, step)
        mimetype = "application/json"
    resp = Response(stream_with_context(body), mimetype=mimetype)
    resp.headers["Content-Disposition"] = f'attachment; filename="{name}.{fmt}"'
    resp.headers["X-Export-Points"] = str(total)
    return resp
