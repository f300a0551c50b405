"""config.json: one schema, validated once at start-up, then a frozen object.

A bad file stops start-up with a ``ConfigError`` that names every bad key
(``agents[1].success_objective: ...``), so an operator fixes all of them in one go.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from .catalog import OTHER_VALUE as OTHER

# A label value users declare: short, printable, no spaces, so it is safe in PromQL
# selectors, URLs and file names alike.
LABEL_VALUE_RE = r"^[A-Za-z0-9][A-Za-z0-9_.:/@+-]{0,63}$"
LabelValue = Annotated[str, StringConstraints(pattern=LABEL_VALUE_RE)]
Ratio = Annotated[float, Field(ge=0, le=1)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
# A link base (URL or path): one clickable token in a chat message or an e-mail.
_NO_SPACE = re.compile(r"[^\s\x00-\x1f\x7f]+")

# OpenTelemetry GenAI semantic conventions: well-known gen_ai.provider.name values.
DEFAULT_PROVIDERS = (
    "openai",
    "anthropic",
    "azure.ai.openai",
    "aws.bedrock",
    "gcp.vertex_ai",
    "gcp.gemini",
    "mistral_ai",
    "cohere",
    "groq",
    "deepseek",
    "x_ai",
    "perplexity",
    "ibm.watsonx.ai",
)
# gen_ai.operation.name values defined by the same conventions.
GENAI_OPERATIONS = (
    "chat",
    "text_completion",
    "generate_content",
    "embeddings",
    "execute_tool",
    "create_agent",
    "invoke_agent",
)
DEFAULT_ERROR_TYPES = (
    "timeout",
    "rate_limited",
    "server_error",
    "invalid_request",
    "auth_error",
    "content_filter",
    "context_length_exceeded",
    "tool_error",
)


class ConfigError(Exception):
    """config.json is unusable; ``errors`` holds (location, message) pairs."""

    def __init__(self, source: str, errors: list[tuple[str, str]]):
        self.source = source
        self.errors = errors
        lines = [f"{source}: {loc}: {msg}" if loc else f"{source}: {msg}" for loc, msg in errors]
        super().__init__("invalid configuration\n  " + "\n  ".join(lines))


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Agent(_Model):
    name: LabelValue
    team: LabelValue = "default"
    success_objective: Ratio | None = None
    """SLO target for this agent's success ratio; defaults to thresholds.agent_success_ratio_min."""
    task_types: tuple[LabelValue, ...] = ()
    """The task types this agent handles; empty: all. Only these combinations are pre-created
    at zero, which keeps a large fleet's series count proportional to what agents really do."""


class TaskType(_Model):
    name: LabelValue
    target_seconds: PositiveFloat | None = None
    minutes_saved: NonNegativeFloat = 0.0
    """Human minutes one successful task of this type saves (the executive 'hours saved')."""


class Integration(_Model):
    platform: LabelValue
    operations: tuple[LabelValue, ...] = ()
    """Declared operations; others become `other`. Empty: every operation is `other`."""
    error_ratio_max: Ratio | None = None
    latency_p95_max_seconds: PositiveFloat | None = None


class Model(_Model):
    name: LabelValue
    provider: LabelValue | None = None


class Thresholds(_Model):
    agent_success_ratio_min: Ratio = 0.9
    task_completion_ratio_min: Ratio = 0.95
    integration_error_ratio_max: Ratio = 0.05
    integration_latency_p95_max_seconds: PositiveFloat = 2.0
    task_backlog_max: NonNegativeFloat = 500
    task_wait_p95_max_seconds: PositiveFloat = 300
    source_lag_max_seconds: PositiveFloat = 300
    rejected_events_ratio_max: Ratio = 0.01
    cost_per_successful_task_max_usd: NonNegativeFloat = 1.0
    anomaly_zscore_max: PositiveFloat = 3.0
    llm_error_ratio_max: Ratio = 0.05
    tool_failure_ratio_max: Ratio = 0.1
    escalation_ratio_max: Ratio = 0.2
    daily_spend_max_usd: NonNegativeFloat = 0
    """Model spend budget per day; 0 (the default) sets none and AicrmSpendForecastOverBudget
    never fires."""


# The components recording_rules/scores.rules.yml computes; a weight for any other name would
# weigh nothing, and a score with no weight at all has no value.
EfficiencyComponent = Literal["completion", "success", "speed", "retries"]
HealthComponent = Literal["sources", "integrations", "agents", "backlog"]


def _default_efficiency() -> dict[EfficiencyComponent, float]:
    return {"completion": 0.4, "success": 0.3, "speed": 0.2, "retries": 0.1}


def _default_health() -> dict[HealthComponent, float]:
    return {"sources": 0.3, "integrations": 0.3, "agents": 0.3, "backlog": 0.1}


class Scores(_Model):
    """Weights of the 0-100 scores' components; each set must sum to 1."""

    efficiency: dict[EfficiencyComponent, NonNegativeFloat] = Field(
        default_factory=_default_efficiency)
    health: dict[HealthComponent, NonNegativeFloat] = Field(default_factory=_default_health)

    @field_validator("efficiency", "health")
    @classmethod
    def _sums_to_one(cls, v: dict[str, float]) -> dict[str, float]:
        if not v:
            raise ValueError("at least one component weight is required")
        if abs(sum(v.values()) - 1.0) > 1e-6:
            raise ValueError(f"weights must sum to 1, got {sum(v.values()):g}")
        return v


class EventLogSource(_Model):
    name: LabelValue
    path: Annotated[str, StringConstraints(min_length=1)]
    """A glob; relative paths are relative to the config file's directory."""


class TaskDbColumns(_Model):
    id: str = "id"
    task_type: str = "task_type"
    agent: str = "agent"
    status: str = "status"
    created_at: str = "created_at"
    started_at: str = "started_at"
    finished_at: str = "finished_at"
    workflow: str | None = "workflow"
    updated_at: str | None = None
    """Optional change-tracking column; see docs/task-db.md."""


TASK_DB_BACKENDS = ("postgresql", "sqlite", "mysql", "mariadb", "mssql")


def check_db_url(url: str) -> str:
    """A SQLAlchemy URL of a supported database; ValueError says why not, never quoting the
    URL (it may hold a password)."""
    try:
        backend = make_url(url).get_backend_name()
    except ArgumentError:
        raise ValueError(
            "not a valid SQLAlchemy URL (expected dialect[+driver]://user:password@host/database"
            " or sqlite:///path)") from None
    if backend not in TASK_DB_BACKENDS:
        raise ValueError(f"the {backend!r} dialect is not supported (use "
                         + ", ".join(TASK_DB_BACKENDS) + ")")
    return url


ENV_NAME_RE = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"


class TaskDbSource(_Model):
    # url_env comes first: url's validator reads it (``info.data``) to know if url may be left out.
    url_env: Annotated[str, StringConstraints(pattern=ENV_NAME_RE)] | None = None
    """An environment variable holding the URL (keeps passwords out of files). When it is set
    and not empty at start it takes priority over ``url``, which is then only a fallback;
    either one is required."""
    url: Annotated[str, StringConstraints(min_length=1)] | None = Field(
        default=None, validate_default=True)
    table: Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_.]{0,126}$")] = "tasks"
    columns: TaskDbColumns = TaskDbColumns()
    poll_seconds: PositiveFloat = 5.0
    timeout_seconds: PositiveFloat = 10.0
    lookback_seconds: PositiveFloat = 120.0
    """How late (in finished_at time) a commit may arrive and still be counted once."""

    @field_validator("url_env", mode="wrap")
    @classmethod
    def _env_name(cls, v: Any, handler: Any) -> Any:
        if isinstance(v, str) and not v.strip():
            # An empty value (a templated config with the variable left out) means unset,
            # as it always did: url is then required.
            return None
        try:
            return handler(v)
        except ValidationError:
            raise ValueError(f"expected an environment variable name (letters, digits, _), "
                             f"got {v!r}") from None

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            if "url_env" in info.data and not info.data["url_env"]:
                raise ValueError("Field required (or set sources.task_db.url_env to an "
                                 "environment variable holding the URL)")
            return None
        return check_db_url(v)


class PushSource(_Model):
    enabled: bool = False
    token_env: str = "AICRM_INGEST_TOKEN"
    max_body_bytes: Annotated[int, Field(gt=0)] = 10 * 1024 * 1024


class Sources(_Model):
    event_logs: tuple[EventLogSource, ...] = ()
    task_db: TaskDbSource | None = None
    push: PushSource = PushSource()


class ExporterSettings(_Model):
    listen: str = "127.0.0.1:9464"
    state_dir: str = "data/state"
    checkpoint_seconds: PositiveFloat = 1.0
    poll_seconds: PositiveFloat = 0.25
    max_line_bytes: Annotated[int, Field(ge=1024)] = 1024 * 1024
    journal_segment_bytes: Annotated[int, Field(ge=4096)] = 64 * 1024 * 1024

    @field_validator("listen")
    @classmethod
    def _host_port(cls, v: str) -> str:
        parse_listen(v)
        return v


class ApiSettings(_Model):
    prometheus_url: str = "http://127.0.0.1:9090"
    cache_ttl_seconds: NonNegativeFloat = 15
    api_keys_env: str = "AICRM_API_KEYS"
    require_key_for_all: bool = False
    redis_url: str | None = None
    cors_origins: tuple[str, ...] = ()
    rate_limit: str = "120/minute"
    query_timeout_seconds: PositiveFloat = 10
    export_max_points: Annotated[int, Field(gt=0)] = 200_000
    listen: str = "127.0.0.1:5000"
    trusted_proxy_hops: Annotated[int, Field(ge=0, le=10)] = 0
    """Reverse proxies in front of the API that each append the address they saw to
    ``X-Forwarded-For``: the client address (per-address rate limits, access log) is that
    header's entry this many from its end. 0: the TCP peer, and the header is ignored (a client
    could write anything in it)."""


class Links(_Model):
    """Where alert notifications link to, published as ``aicrm_link_info`` so every alert's
    ``dashboard_url`` and ``runbook_url`` follow this file without a rule rewrite."""

    grafana_url: str = "http://localhost:3000"
    """Grafana's base URL (a sub-path is fine); alerts append ``/d/<uid>?var-...``."""
    runbook_url: str = "docs/runbooks.md"
    """The runbook document, a URL or a path; alerts append ``#<alert name in lower case>``."""

    @field_validator("grafana_url")
    @classmethod
    def _grafana_base(cls, v: str) -> str:
        base = v.rstrip("/")  # alerts add the slash of "/d/<uid>"
        try:
            parts = urlsplit(base) if _NO_SPACE.fullmatch(base) else None
        except ValueError:  # e.g. an unclosed IPv6 bracket
            parts = None
        if (parts is None or parts.scheme not in ("http", "https") or not parts.hostname
                or "?" in base or "#" in base):
            raise ValueError(
                "expected an http:// or https:// base URL without query or fragment, "
                f"such as 'https://grafana.example.com', got {v!r}")
        return base

    @field_validator("runbook_url")
    @classmethod
    def _runbook_base(cls, v: str) -> str:
        if not _NO_SPACE.fullmatch(v) or "#" in v:
            raise ValueError(
                "expected a URL or path without spaces or '#' (alerts append "
                f"'#<alert name>'), such as 'https://wiki.example.com/aicrm-runbooks', got {v!r}")
        return v


class Config(_Model):
    agents: tuple[Agent, ...]
    task_types: tuple[TaskType, ...]
    integrations: tuple[Integration, ...] = ()
    models: tuple[LabelValue | Model, ...] = ()
    providers: tuple[LabelValue, ...] = DEFAULT_PROVIDERS
    tools: tuple[LabelValue, ...] = ()
    channels: tuple[LabelValue, ...] = ()
    error_types: tuple[LabelValue, ...] = DEFAULT_ERROR_TYPES
    thresholds: Thresholds = Thresholds()
    scores: Scores = Scores()
    sources: Sources = Sources()
    exporter: ExporterSettings = ExporterSettings()
    api: ApiSettings = ApiSettings()
    links: Links = Links()

    @model_validator(mode="after")
    def _cross_check(self) -> Config:
        errors: list[tuple[str, str]] = []
        _unique(errors, "agents", (a.name for a in self.agents))
        _unique(errors, "task_types", (t.name for t in self.task_types))
        _unique(errors, "integrations", (i.platform for i in self.integrations))
        _unique(errors, "models", self.model_names)
        _unique(errors, "tools", self.tools)
        _unique(errors, "channels", self.channels)
        _unique(errors, "providers", self.providers)
        _unique(errors, "error_types", self.error_types)
        _unique(errors, "sources.event_logs", (s.name for s in self.sources.event_logs))
        for i, integ in enumerate(self.integrations):
            _unique(errors, f"integrations[{i}].operations", integ.operations)
        declared = {t.name for t in self.task_types}
        for i, agent in enumerate(self.agents):
            for j, tt in enumerate(agent.task_types):
                if tt not in declared:
                    errors.append((f"agents[{i}].task_types[{j}]",
                                   f"{tt!r} is not a declared task type"))
        reserved = {"push", "task_db"}
        for i, src in enumerate(self.sources.event_logs):
            if src.name in reserved:
                loc = f"sources.event_logs[{i}].name"
                errors.append((loc, f"{src.name!r} is reserved for a built-in source"))
        if errors:
            # Raised as ValueError so pydantic reports it beside the field errors.
            raise ValueError("; ".join(f"{loc}: {msg}" for loc, msg in errors))
        return self

    @property
    def model_names(self) -> tuple[str, ...]:
        return tuple(m if isinstance(m, str) else m.name for m in self.models)

    def model_provider(self, model: str) -> str | None:
        for m in self.models:
            if not isinstance(m, str) and m.name == model:
                return m.provider
        return None


def _unique(errors: list[tuple[str, str]], loc: str, names: Iterable[str]) -> None:
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name == OTHER:
            errors.append((f"{loc}[{i}]", f"{OTHER!r} is reserved for undeclared values"))
        elif name in seen:
            errors.append((f"{loc}[{i}]", f"duplicate name {name!r}"))
        seen.add(name)


def parse_listen(value: str) -> tuple[str, int]:
    """'host:port', '[IPv6 address]:port' or ':port' (every IPv4 interface) to (host, port);
    ValueError says why not."""
    m = re.fullmatch(r"(?:\[([^\[\]]+)\]|([^\[\]:/\s]*)):(\d{1,5})", value)
    if not m or int(m.group(3)) > 65535:
        raise ValueError(
            f"expected 'host:port' or '[IPv6 address]:port' with a port up to 65535, got {value!r}")
    v6, host, port = m.groups()
    if v6 is None:
        return host or "0.0.0.0", int(port)
    try:
        ipaddress.IPv6Address(v6)
    except ValueError:
        raise ValueError(f"{v6!r} in brackets is not an IPv6 address, got {value!r}") from None
    return v6, int(port)


def _loc(parts: tuple[int | str, ...]) -> str:
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif p != "[key]" and not p.startswith(("function-", "str", "Model")):
            # pydantic adds union member names (e.g. 'str', 'Model') to the location, and
            # '[key]' after a dict key that failed (the key itself names the place).
            out += f".{p}" if out else p
    return out


def _errors_from(exc: ValidationError) -> list[tuple[str, str]]:
    out = []
    for err in exc.errors(include_url=False):
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "value_error" and not err["loc"] and ": " in msg:
            for part in msg.split("; "):
                loc, _, m = part.partition(": ")
                out.append((loc, m))
            continue
        out.append((_loc(tuple(err["loc"])), msg))
    return out


def parse_config(data: Any, source: str = "config") -> Config:
    if not isinstance(data, dict):
        raise ConfigError(source, [("", "the top level must be a JSON object")])
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, _errors_from(exc)) from None


ENV_OVERRIDES: dict[str, tuple[str, str]] = {
    "AICRM_PROMETHEUS_URL": ("api", "prometheus_url"),
    "AICRM_REDIS_URL": ("api", "redis_url"),
    "AICRM_EXPORTER_LISTEN": ("exporter", "listen"),
    "AICRM_STATE_DIR": ("exporter", "state_dir"),
}
"""Settings that differ per deployment (containers, shards) without a second config file."""


def apply_env_overrides(data: dict[str, Any], env: dict[str, str] | None = None
                        ) -> dict[str, str]:
    """Put set override variables into the raw config; returns {location: variable}."""
    env = dict(os.environ) if env is None else env
    applied = {}
    for var, (section, key) in ENV_OVERRIDES.items():
        value = env.get(var)
        if value:
            sect = data.setdefault(section, {})
            if isinstance(sect, dict):
                sect[key] = value
                applied[f"{section}.{key}"] = var
    return applied


def default_config_path() -> str:
    return os.environ.get("AICRM_CONFIG") or "config.json"


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate config.json; relative paths inside it resolve against its directory."""
    p = Path(path or default_config_path())
    try:
        raw = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(p), [("", f"cannot read: {exc.strerror}")]) from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            str(p), [("", f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})")]
        ) from None
    from_env = apply_env_overrides(data) if isinstance(data, dict) else {}
    try:
        cfg = parse_config(data, str(p))
    except ConfigError as exc:
        exc.errors[:] = [
            (loc, f"{msg} (set by ${from_env[loc]})" if loc in from_env else msg)
            for loc, msg in exc.errors
        ]
        raise ConfigError(str(p), exc.errors) from None
    cfg = resolve_paths(cfg, p.resolve().parent)
    errors = event_logs_in_state_dir(cfg)
    if errors:
        var = from_env.get("exporter.state_dir")
        raise ConfigError(str(p), [(loc, f"{msg} (set by ${var})" if var else msg)
                                   for loc, msg in errors])
    return cfg


_GLOB_MAGIC = re.compile(r"[*?[]")


def _glob_reaches_into(pattern: str, directory: str) -> bool:
    """Whether the glob ``pattern`` could match a path strictly inside ``directory`` (both
    absolute and normalized), now or once files are created there.

    ``glob.glob`` (not recursive) matches one path component per pattern component: each of
    the directory's components must match the pattern's in turn (a wildcard one as fnmatch
    does, a name starting with '.' only by one starting with '.', a plain one by equality), and
    the pattern must have components left over, which could match anything the exporter writes
    there. A ``**`` component is taken to match any number of components (as it would with
    ``recursive=True``): safe whichever way the glob is read."""
    pat = [c for c in pattern.split(os.sep) if c]
    target = [c for c in directory.split(os.sep) if c]

    def one(comp: str, name: str) -> bool:
        if not _GLOB_MAGIC.search(comp):
            return comp == name
        if name.startswith(".") and not comp.startswith("."):
            return False
        return fnmatch.fnmatchcase(name, comp)

    def walk(i: int, j: int) -> bool:
        if j == len(target):
            return i < len(pat)
        if i == len(pat):
            return False
        if pat[i] == "**":
            return walk(i + 1, j) or walk(i, j + 1)
        return one(pat[i], target[j]) and walk(i + 1, j + 1)

    return walk(0, 0)


def _real_glob(pattern: str) -> str:
    """``pattern`` with the symbolic links of its fixed part (before the first wildcard)
    resolved."""
    parts = pattern.split(os.sep)
    fixed = next((i for i, c in enumerate(parts) if _GLOB_MAGIC.search(c)), len(parts))
    head = os.path.realpath(os.sep.join(parts[:fixed]) or os.sep)
    return os.path.join(head, *parts[fixed:]) if fixed < len(parts) else head


def event_logs_in_state_dir(cfg: Config) -> list[tuple[str, str]]:
    """Errors for event_logs globs (absolute, as ``resolve_paths`` leaves them) that could
    match a file inside exporter.state_dir: the push journal (``<state_dir>/push``) or a state
    file read as a log source would be counted twice, rejected, and never released. Compared
    as written and with symbolic links resolved; reads the file system, writes nothing."""
    state = os.path.normpath(cfg.exporter.state_dir)
    real_state = os.path.realpath(state)
    errors = []
    for i, src in enumerate(cfg.sources.event_logs):
        pattern = os.path.normpath(src.path)
        if (_glob_reaches_into(pattern, state)
                or _glob_reaches_into(_real_glob(pattern), real_state)):
            errors.append((f"sources.event_logs[{i}].path", (
                f"{src.path!r} can match files inside exporter.state_dir ({state}), where the "
                "exporter keeps its state and the push journal; keep the logs out of it")))
    return errors


def check_state_dir(path: str) -> str | None:
    """Why ``path`` cannot be exporter.state_dir, or None: it must be a writable directory, or
    not exist yet with its nearest existing ancestor a writable directory (the exporter creates
    it at start). Creates nothing (``--check-config`` runs this too)."""
    p = Path(path)
    try:
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                return f"{p} is not a directory"
            if not os.access(p, os.W_OK | os.X_OK):
                return f"the directory {p} is not writable by this user"
            return None
        ancestor = p.parent
        while not (ancestor.exists() or ancestor.is_symlink()) and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            return f"cannot create {p}: {ancestor} is not a directory"
        if not os.access(ancestor, os.W_OK | os.X_OK):
            return f"cannot create {p}: the directory {ancestor} is not writable by this user"
    except OSError as exc:
        return f"cannot use {p}: {exc.strerror or exc}"
    return None


def resolve_paths(cfg: Config, base: Path) -> Config:
    """Make file paths absolute against ``base`` (the config file's directory)."""

    def fix(path: str) -> str:
        return path if os.path.isabs(path) else str(base / path)

    logs = tuple(s.model_copy(update={"path": fix(s.path)}) for s in cfg.sources.event_logs)
    sources = cfg.sources.model_copy(update={"event_logs": logs})
    task_db = sources.task_db
    if task_db is not None and task_db.url is not None and task_db.url.startswith(
        "sqlite:///"
    ) and not task_db.url.startswith("sqlite:////"):
        rel = task_db.url.removeprefix("sqlite:///")
        if rel and not rel.startswith(":memory:"):
            sources = sources.model_copy(
                update={"task_db": task_db.model_copy(update={"url": "sqlite:///" + fix(rel)})}
            )
    exporter = cfg.exporter.model_copy(update={"state_dir": fix(cfg.exporter.state_dir)})
    return cfg.model_copy(update={"sources": sources, "exporter": exporter})
