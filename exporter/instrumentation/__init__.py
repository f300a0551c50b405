"""In-process instrumentation: agents record the exporter's events themselves.

An agent that cannot (or prefers not to) write event lines records the same events through
OpenTelemetry and serves its own ``/metrics``, or hands them to a collector. The series carry
the catalog's names, label names and units, so the same rules and dashboards serve both paths.
See docs/instrumentation.md.
"""

from .naming import INSTRUMENTED, attribute_key, otel_name, prometheus_unit
from .recorder import SCOPE_NAME, Instrumentation, views

__all__ = [
    "INSTRUMENTED",
    "SCOPE_NAME",
    "Instrumentation",
    "attribute_key",
    "otel_name",
    "prometheus_unit",
    "views",
]
