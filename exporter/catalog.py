"""The public metric catalog (DESIGN.md): every metric's name, type, help, labels and buckets.

Nothing else in the code base spells a metric name: the exporter, the in-process
instrumentation and the tests all read it from here. Names are an interface; renaming one
needs a migration note in docs/metrics.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

OTHER_VALUE = "other"
"""The label value that stands for every value not declared in config.json."""


class Kind(StrEnum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


@dataclass(frozen=True, slots=True)
class MetricSpec:
    name: str
    """Full name as Prometheus shows it; counters end in ``_total``."""
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    unit: str = ""
    """OpenTelemetry unit of the instrument that produces the same series."""

    @property
    def base_name(self) -> str:
        """The name without the ``_total`` suffix, as OpenMetrics families are named."""
        return self.name.removesuffix("_total") if self.kind is Kind.COUNTER else self.name


# Buckets are chosen around the thresholds config.json typically sets, so
# histogram_quantile() interpolates across them with little error.
TASK_SECONDS_BUCKETS = (
    0.5, 1, 2.5, 5, 10, 15, 30, 60, 90, 120, 180, 300, 600, 1200, 1800, 3600, 7200,
)
WAIT_SECONDS_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)
CALL_SECONDS_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30,
)
# OpenTelemetry GenAI semantic conventions' advised boundaries.
GENAI_DURATION_BUCKETS = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)
GENAI_TOKEN_BUCKETS = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)
RATING_BUCKETS = (1, 2, 3, 4, 5)

C, G, H = Kind.COUNTER, Kind.GAUGE, Kind.HISTOGRAM

# --- Tasks (task database) ---------------------------------------------------------------
TASKS = MetricSpec(
    "aicrm_tasks_total", C, "Tasks that reached a terminal status, from the task database.",
    ("task_type", "agent", "status"),
)
TASKS_OPEN = MetricSpec(
    "aicrm_tasks_open", G, "Tasks queued or running now.", ("task_type", "status"),
)
TASK_DURATION = MetricSpec(
    "aicrm_task_duration_seconds", H, "Time from a task's start to its finish.",
    ("task_type", "agent"), TASK_SECONDS_BUCKETS, "s",
)
TASK_WAIT = MetricSpec(
    "aicrm_task_wait_seconds", H, "Time a task waited between creation and start.",
    ("task_type",), WAIT_SECONDS_BUCKETS, "s",
)
TASK_OLDEST_OPEN_AGE = MetricSpec(
    "aicrm_task_oldest_open_age_seconds", G, "Age of the oldest queued or running task.",
    ("task_type",),
)

# --- Agents -----------------------------------------------------------------------------
AGENT_TASK_RESULTS = MetricSpec(
    "aicrm_agent_task_results_total", C, "Task results reported by agents, by outcome.",
    ("agent", "task_type", "outcome"),
)
AGENT_TASK_DURATION = MetricSpec(
    "aicrm_agent_task_duration_seconds", H, "Duration of tasks as reported by agents.",
    ("agent", "task_type"), TASK_SECONDS_BUCKETS, "s",
)
AGENT_RETRIES = MetricSpec(
    "aicrm_agent_retries_total", C, "Retries agents needed for their tasks.",
    ("agent", "task_type"),
)
AGENT_HANDOFFS = MetricSpec(
    "aicrm_agent_handoffs_total", C, "Work handed from one agent to another.",
    ("from_agent", "to_agent"),
)
AGENT_COST = MetricSpec(
    "aicrm_agent_cost_usd_total", C, "Model spend by agent and model, in US dollars.",
    ("agent", "model"), unit="usd",
)
AGENT_TOOL_CALLS = MetricSpec(
    "aicrm_agent_tool_calls_total", C, "Tool calls made by agents, by outcome.",
    ("agent", "tool", "outcome"),
)
AGENT_TOOL_CALL_DURATION = MetricSpec(
    "aicrm_agent_tool_call_duration_seconds", H, "Duration of agents' tool calls.",
    ("agent", "tool"), CALL_SECONDS_BUCKETS, "s",
)
AGENT_INFO = MetricSpec(
    "aicrm_agent_info", G, "Declared agents and the team that owns each (always 1).",
    ("agent", "team"),
)

# --- LLM calls (OpenTelemetry GenAI semantic conventions, as Prometheus names them) ------
GENAI_OPERATION_DURATION = MetricSpec(
    "gen_ai_client_operation_duration_seconds", H, "GenAI operation duration.",
    (
        "gen_ai_operation_name", "gen_ai_request_model", "gen_ai_provider_name",
        "gen_ai_agent_name", "error_type",
    ),
    GENAI_DURATION_BUCKETS, "s",
)
GENAI_TOKEN_USAGE = MetricSpec(
    "gen_ai_client_token_usage", H, "Number of input and output tokens used.",
    (
        "gen_ai_operation_name", "gen_ai_request_model", "gen_ai_provider_name",
        "gen_ai_token_type", "gen_ai_agent_name",
    ),
    GENAI_TOKEN_BUCKETS, "{token}",
)

# --- Integrations -----------------------------------------------------------------------
INTEGRATION_REQUESTS = MetricSpec(
    "aicrm_integration_requests_total", C, "Requests to external platforms, by status class.",
    ("platform", "operation", "status_class"),
)
INTEGRATION_REQUEST_DURATION = MetricSpec(
    "aicrm_integration_request_duration_seconds", H, "Duration of requests to external platforms.",
    ("platform", "operation"), CALL_SECONDS_BUCKETS, "s",
)

# --- Users ------------------------------------------------------------------------------
USER_INTERACTIONS = MetricSpec(
    "aicrm_user_interactions_total", C, "User interactions with agents, by channel and type.",
    ("channel", "type"),
)
USER_FEEDBACK_RATING = MetricSpec(
    "aicrm_user_feedback_rating", H, "Ratings (1-5) users gave agents.",
    ("agent",), RATING_BUCKETS,
)
ACTIVE_USERS = MetricSpec(
    "aicrm_active_users", G, "Distinct users seen in the trailing window.", ("window",),
)

# --- Exporter self and configuration ------------------------------------------------------
SOURCE_UP = MetricSpec(
    "aicrm_source_up", G, "1 if the source was read successfully on its last attempt.",
    ("source",),
)
SOURCE_EVENTS = MetricSpec(
    "aicrm_source_events_total", C, "Events accepted from each source.", ("source",),
)
SOURCE_REJECTED = MetricSpec(
    "aicrm_source_rejected_events_total", C, "Events rejected from each source, by reason.",
    ("source", "reason"),
)
SOURCE_LAG = MetricSpec(
    "aicrm_source_lag_seconds", G,
    "Delay between the newest ingested event's timestamp and its ingestion.", ("source",),
)
SOURCE_LAST_EVENT = MetricSpec(
    "aicrm_source_last_event_timestamp_seconds", G,
    "Unix time at which the source last delivered an accepted event.", ("source",),
)
LABEL_OVERFLOW = MetricSpec(
    "aicrm_label_overflow_total", C,
    "Label values not declared in config.json, recorded as 'other'.", ("label",),
)
PUSH_REQUESTS = MetricSpec(
    "aicrm_push_requests_total", C, "Requests to POST /v1/events, by HTTP status code.", ("code",),
)
STATE_WRITE_FAILURES = MetricSpec(
    "aicrm_exporter_state_write_failures_total", C,
    "Failed writes of the state file since the process started; while they fail, /metrics "
    "serves the values last written.",
    (),
)
THRESHOLD = MetricSpec(
    "aicrm_threshold", G,
    "Thresholds from config.json; per-agent, per-platform and per-task-type where they apply.",
    ("name",),
)
OBJECTIVE = MetricSpec(
    "aicrm_objective", G, "Service-level objectives from config.json.", ("name",),
)
SCORE_WEIGHT = MetricSpec(
    "aicrm_score_weight", G, "Weights of the components of the 0-100 scores, from config.json.",
    ("score", "component"),
)
TASK_HUMAN_SECONDS_SAVED = MetricSpec(
    "aicrm_task_human_seconds_saved", G,
    "Human time one successful task of this type saves, from config.json.", ("task_type",),
)
LINK_INFO = MetricSpec(
    "aicrm_link_info", G,
    "Base URLs of the Grafana and runbook links in alert annotations, from config.json "
    "(always 1).",
    ("grafana_url", "runbook_url"),
)
BUILD_INFO = MetricSpec(
    "aicrm_build_info", G, "The exporter's version (always 1).", ("version",),
)

ALL: tuple[MetricSpec, ...] = tuple(v for v in globals().values() if isinstance(v, MetricSpec))
BY_NAME: dict[str, MetricSpec] = {m.name: m for m in ALL}

# Bounded label value sets that do not come from config.json.
OUTCOMES = ("success", "failure", "escalated")
TOOL_OUTCOMES = ("success", "failure")
STATUS_CLASSES = ("2xx", "4xx", "429", "5xx", "timeout")
INTERACTION_TYPES = ("message", "approval", "rejection", "feedback", "escalation")
TOKEN_TYPES = ("input", "output")
TERMINAL_STATUSES = ("completed", "failed", "cancelled")
OPEN_STATUSES = ("queued", "running")
ACTIVE_USER_WINDOWS = {"1h": 3600, "24h": 86400}
REJECT_REASONS = (
    "invalid_utf8",
    "invalid_json",
    "not_object",
    "unknown_event",
    "missing_field",
    "wrong_type",
    "out_of_range",
    "line_too_long",
    # task database rows (exporter/sources/taskdb.py)
    "unknown_status",
    "bad_timestamps",
)

# --- REST API (api/) self-metrics ---------------------------------------------------------
# Served by the API's own /metrics (gunicorn multiprocess mode), not by the exporter: defined
# after ALL so the exporter's families never include them.
API_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
API_REQUESTS = MetricSpec(
    "aicrm_api_requests_total", C,
    "Requests the REST API answered, by route template, method and HTTP status code.",
    ("endpoint", "method", "code"),
)
API_REQUEST_DURATION = MetricSpec(
    "aicrm_api_request_duration_seconds", H,
    "Time the REST API took to answer, by route template.",
    ("endpoint",), API_SECONDS_BUCKETS, "s",
)
API_CACHE_LOOKUPS = MetricSpec(
    "aicrm_api_cache_lookups_total", C,
    "Response cache lookups of the REST API, by result (hit or miss).",
    ("result",),
)
API: tuple[MetricSpec, ...] = (API_REQUESTS, API_REQUEST_DURATION, API_CACHE_LOOKUPS)


def _table(specs: tuple[MetricSpec, ...]) -> list[str]:
    rows = ["| name | type | labels | help |", "|---|---|---|---|"]
    for m in specs:
        labels = ", ".join(f"`{label}`" for label in m.labels) or "-"
        rows.append(f"| `{m.name}` | {m.kind.value} | {labels} | {m.help} |")
    return rows


def markdown() -> str:
    """docs/metrics.md's tables, generated so the docs cannot drift from the code."""
    rows = _table(ALL)
    rows += ["", "### REST API (its own `/metrics`)", "", *_table(API)]
    return "\n".join(rows) + "\n"
