"""A small client for the Prometheus HTTP API (also spoken by VictoriaMetrics, Thanos, Mimir).

It only moves queries and results; failures become the API's errors: backend unreachable
or failing is 503, too slow is 504, so a client can tell "retry later" from "ask less".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from .errors import ApiError


class BackendUnavailable(ApiError):
    status = 503
    code = "backend_unavailable"


class BackendTimeout(ApiError):
    status = 504
    code = "backend_timeout"


class BackendError(ApiError):
    """The backend rejected a query the API built: a bug or an incompatible backend."""

    status = 502
    code = "backend_error"


@dataclass(frozen=True, slots=True)
class Sample:
    labels: dict[str, str]
    value: float | None
    """None for NaN and infinities, which JSON cannot carry."""


@dataclass(frozen=True, slots=True)
class RangeSeries:
    labels: dict[str, str]
    points: list[tuple[float, float | None]]


def to_float(text: str) -> float | None:
    value = float(text)
    return value if math.isfinite(value) else None


class PrometheusClient:
    """Pooled connections (one requests.Session), a timeout on every call."""

    def __init__(self, base_url: str, timeout: float, pool_size: int = 8) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        # No proxy or .netrc look-ups per request: they cost more than a small query.
        self.session.trust_env = False
        # Loopback or a private network: compressing small JSON costs both sides more than it saves.
        self.session.headers["Accept-Encoding"] = "identity"
        adapter = HTTPAdapter(pool_connections=2, pool_maxsize=pool_size, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def close(self) -> None:
        self.session.close()

    def _call(self, method: str, path: str, data: dict[str, Any] | None = None) -> Any:
        url = self.base_url + path
        try:
            with self.session.request(
                method, url, data=data, timeout=(min(self.timeout, 3.05), self.timeout)
            ) as resp:
                status = resp.status_code
                try:
                    body = resp.json()
                except ValueError:
                    body = None
        except requests.Timeout:
            raise BackendTimeout(
                f"the metrics backend did not answer within {self.timeout:g}s"
            ) from None
        except requests.RequestException:
            raise BackendUnavailable("the metrics backend is unreachable") from None
        if isinstance(body, dict) and body.get("status") == "success":
            return body.get("data")
        error_type = body.get("errorType") if isinstance(body, dict) else None
        if error_type == "timeout" or status == 504:
            raise BackendTimeout("the metrics backend timed out evaluating the query")
        if status == 404:
            raise BackendError(f"the metrics backend has no {path}", status=404,
                               code="backend_not_found")
        if status in (400, 422) and isinstance(body, dict):
            raise BackendError(f"the metrics backend rejected a query: {body.get('error')}")
        raise BackendUnavailable(f"the metrics backend answered HTTP {status}")

    def query(self, expr: str, time: float | None = None) -> list[Sample]:
        """Instant query; a scalar result comes back as one unlabelled sample."""
        params: dict[str, Any] = {"query": expr, "timeout": f"{self.timeout:g}s"}
        if time is not None:
            params["time"] = f"{time:.3f}"
        data = self._call("POST", "/api/v1/query", params)
        kind, result = data.get("resultType"), data.get("result")
        if kind == "vector":
            return [Sample(r["metric"], to_float(r["value"][1])) for r in result]
        if kind == "scalar":
            return [Sample({}, to_float(result[1]))]
        raise BackendError(f"unexpected result type {kind!r}")

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[RangeSeries]:
        params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}",
                  "step": f"{step:g}", "timeout": f"{self.timeout:g}s"}
        data = self._call("POST", "/api/v1/query_range", params)
        return [
            RangeSeries(r["metric"], [(float(t), to_float(v)) for t, v in r["values"]])
            for r in data.get("result", [])
        ]

    def alerts(self) -> list[dict[str, Any]] | None:
        """Active alerts with annotations, or None when the backend has no alerts API."""
        try:
            data = self._call("GET", "/api/v1/alerts")
        except BackendError as exc:
            if exc.code == "backend_not_found":
                return None
            raise
        return list(data.get("alerts", []))

    def ping(self) -> None:
        """Raise unless the backend evaluates a trivial query."""
        self.query("vector(1)")
