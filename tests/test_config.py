import json
import socket
import urllib.request
from pathlib import Path

import pytest

from exporter.cli import main as exporter_main
from exporter.config import ConfigError, TaskDbSource, load_config, parse_config
from tests.helpers import config_dict

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_config_is_valid() -> None:
    cfg = load_config(ROOT / "config.json")
    assert [a.name for a in cfg.agents][:1] == ["lead-qualifier"]
    # Relative paths resolve against the config file's directory, not the working directory.
    assert cfg.sources.event_logs[0].path == str(ROOT / "data/events/*.jsonl")
    assert cfg.exporter.state_dir == str(ROOT / "data/state")
    assert cfg.sources.task_db is not None
    assert cfg.sources.task_db.url == f"sqlite:///{ROOT}/data/tasks.db"
    assert cfg.links.grafana_url == "http://localhost:3000"


def test_defaults_fill_optional_sections() -> None:
    cfg = parse_config({"agents": [{"name": "a"}], "task_types": [{"name": "t"}]})
    assert cfg.sources.event_logs == () and cfg.sources.task_db is None
    assert not cfg.sources.push.enabled
    assert cfg.thresholds.agent_success_ratio_min == 0.9
    assert (cfg.thresholds.llm_error_ratio_max, cfg.thresholds.tool_failure_ratio_max,
            cfg.thresholds.escalation_ratio_max) == (0.05, 0.1, 0.2)
    assert cfg.thresholds.daily_spend_max_usd == 0  # no budget: the spend alert never fires
    assert cfg.exporter.listen == "127.0.0.1:9464"
    # The links alerts fall back to when no exporter publishes aicrm_link_info.
    assert cfg.links.grafana_url == "http://localhost:3000"
    assert cfg.links.runbook_url == "docs/runbooks.md"


def test_link_bases() -> None:
    """Alerts append "/d/<uid>" and "#<alert>": a trailing slash on Grafana's URL is dropped,
    a sub-path kept, and the runbook base taken as written (a URL or a path)."""
    cfg = parse_config(config_dict(links={"grafana_url": "https://example.com/grafana//",
                                          "runbook_url": "https://wiki.example.com/aicrm.md"}))
    assert cfg.links.grafana_url == "https://example.com/grafana"
    assert cfg.links.runbook_url == "https://wiki.example.com/aicrm.md"
    cfg = parse_config(config_dict(links={"grafana_url": "http://[::1]:3000/"}))
    assert cfg.links.grafana_url == "http://[::1]:3000"
    assert cfg.links.runbook_url == "docs/runbooks.md"


def _set(d: dict, path: str, value: object) -> dict:
    keys = path.split(".")
    cur = d
    for k in keys[:-1]:
        cur = cur[int(k)] if isinstance(cur, list) else cur.setdefault(k, {})
    if isinstance(cur, list):
        cur[int(keys[-1])] = value
    else:
        cur[keys[-1]] = value
    return d


@pytest.mark.parametrize(
    ("path", "value", "location", "message"),
    [
        ("agents.0.success_objective", 1.5, "agents[0].success_objective",
         "less than or equal to 1"),
        ("agents.0.name", "has space", "agents[0].name", "should match pattern"),
        ("agents.1.name", "lead-qualifier", "agents[1]", "duplicate name 'lead-qualifier'"),
        ("agents.1.name", "other", "agents[1]", "'other' is reserved"),
        ("task_types.0.target_seconds", -5, "task_types[0].target_seconds", "greater than 0"),
        ("integrations.0.error_ratio_max", "high", "integrations[0].error_ratio_max",
         "valid number"),
        ("thresholds.agent_success_ratio_min", 2, "thresholds.agent_success_ratio_min",
         "less than or equal to 1"),
        ("thresholds.typo_ratio", 0.5, "thresholds.typo_ratio", "Extra inputs are not permitted"),
        ("thresholds.llm_error_ratio_max", 1.5, "thresholds.llm_error_ratio_max",
         "less than or equal to 1"),
        ("thresholds.tool_failure_ratio_max", -0.1, "thresholds.tool_failure_ratio_max",
         "greater than or equal to 0"),
        ("thresholds.escalation_ratio_max", 2, "thresholds.escalation_ratio_max",
         "less than or equal to 1"),
        ("thresholds.daily_spend_max_usd", -5, "thresholds.daily_spend_max_usd",
         "greater than or equal to 0"),
        ("exporter.listen", "nowhere", "exporter.listen", "expected 'host:port'"),
        ("exporter.listen", "[::1:9464", "exporter.listen", "expected 'host:port'"),
        ("exporter.listen", "a:b:9464", "exporter.listen", "'[IPv6 address]:port'"),
        ("exporter.listen", "::1:9464", "exporter.listen", "'[IPv6 address]:port'"),
        ("exporter.listen", "[localhost]:9464", "exporter.listen", "is not an IPv6 address"),
        ("exporter.listen", "127.0.0.1:65536", "exporter.listen", "port up to 65535"),
        ("scores.health", {"sources": 0.5}, "scores.health", "weights must sum to 1"),
        ("scores.efficiency", {"completion": 0.5, "sucess": 0.5}, "scores.efficiency.sucess",
         "Input should be 'completion', 'success', 'speed' or 'retries'"),
        ("scores.health", {"backlog": 0.5, "uptime": 0.5}, "scores.health.uptime",
         "Input should be 'sources', 'integrations', 'agents' or 'backlog'"),
        ("scores.health", {}, "scores.health", "at least one component weight is required"),
        ("sources.task_db", {"url": "postgres ql://exporter:s3cret@db/crm"},
         "sources.task_db.url", "not a valid SQLAlchemy URL"),
        ("sources.task_db", {"url": "oracle://exporter:s3cret@db/crm"}, "sources.task_db.url",
         "the 'oracle' dialect is not supported"),
        ("sources.event_logs", [{"name": "push", "path": "x"}], "sources.event_logs[0].name",
         "reserved for a built-in source"),
        ("sources.task_db", {"table": "tasks"}, "sources.task_db.url", "Field required"),
        ("tools", ["crm.search", "crm.search"], "tools[1]", "duplicate name"),
        ("agents.0.task_types", ["qualify_lead", "nap"], "agents[0].task_types[1]",
         "'nap' is not a declared task type"),
        ("unknown_key", 1, "unknown_key", "Extra inputs are not permitted"),
        ("links.grafana_url", "grafana.example.com", "links.grafana_url",
         "expected an http:// or https:// base URL"),
        ("links.grafana_url", "ftp://grafana.example.com", "links.grafana_url",
         "expected an http:// or https:// base URL"),
        ("links.grafana_url", "https://grafana.example.com/?orgId=1", "links.grafana_url",
         "without query or fragment"),
        ("links.grafana_url", "https:// grafana", "links.grafana_url",
         "expected an http:// or https:// base URL"),
        ("links.runbook_url", "https://wiki.example.com/aicrm#alerts", "links.runbook_url",
         "without spaces or '#'"),
        ("links.runbook_url", "", "links.runbook_url", "without spaces or '#'"),
        ("links.dashboards_url", "x", "links.dashboards_url", "Extra inputs are not permitted"),
    ],
)
def test_errors_name_the_key(path: str, value: object, location: str, message: str) -> None:
    d = _set(config_dict(), path, value)
    with pytest.raises(ConfigError) as exc:
        parse_config(d, "config.json")
    locs = dict(exc.value.errors)
    assert location in locs, exc.value.errors
    assert message in locs[location]
    assert f"config.json: {location}: " in str(exc.value)
    assert "s3cret" not in str(exc.value)


def test_every_error_is_reported_at_once() -> None:
    d = config_dict()
    d["agents"][0]["success_objective"] = 3
    d["exporter"] = {"listen": "bad"}
    with pytest.raises(ConfigError) as exc:
        parse_config(d)
    assert {loc for loc, _ in exc.value.errors} == {"agents[0].success_objective",
                                                     "exporter.listen"}


def test_not_json_names_line(tmp_path: Path) -> None:
    p = tmp_path / "config.json"
    p.write_text('{\n  "agents": [,]\n}')
    with pytest.raises(ConfigError, match=r"not valid JSON: .*line 2"):
        load_config(p)


def test_check_config_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps(config_dict()))
    assert exporter_main(["--config", str(good), "--check-config"]) == 0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_set(config_dict(), "agents.0.success_objective", 7)))
    assert exporter_main(["--config", str(bad), "--check-config"]) == 2
    err = capsys.readouterr().err
    assert "agents[0].success_objective" in err


def test_push_enabled_without_token_stops_startup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("AICRM_INGEST_TOKEN", raising=False)
    cfg = config_dict(sources={"push": {"enabled": True}},
                      exporter={"listen": "127.0.0.1:0", "state_dir": str(tmp_path / "s")})
    p = tmp_path / "c.json"
    p.write_text(json.dumps(cfg))
    assert exporter_main(["--config", str(p)]) == 2
    assert "sources.push.token_env" in capsys.readouterr().err


def test_config_env_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "elsewhere.json"
    p.write_text(json.dumps(config_dict()))
    monkeypatch.setenv("AICRM_CONFIG", str(p))
    assert load_config().agents[0].name == "lead-qualifier"


def test_environment_overrides_deployment_settings(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "c.json"
    p.write_text(json.dumps(config_dict()))
    monkeypatch.setenv("AICRM_PROMETHEUS_URL", "http://victoriametrics:8428")
    monkeypatch.setenv("AICRM_EXPORTER_LISTEN", "0.0.0.0:9464")
    cfg = load_config(p)
    assert cfg.api.prometheus_url == "http://victoriametrics:8428"
    assert cfg.exporter.listen == "0.0.0.0:9464"
    monkeypatch.setenv("AICRM_EXPORTER_LISTEN", "nowhere")
    with pytest.raises(ConfigError, match=r"exporter.listen: .*\(set by \$AICRM_EXPORTER_LISTEN\)"):
        load_config(p)


def test_listen_on_ipv6_loopback(tmp_path: Path) -> None:
    """'[::1]:port' binds an IPv6 socket (the HTTP server's default family is IPv4). Needs
    the IPv6 loopback address, which Debian configures; a machine without it fails here, saying
    so, rather than passing untested."""
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:
        pytest.fail(f"this machine has no IPv6 loopback ({exc}): enable IPv6 (net.ipv6.conf.lo."
                    "disable_ipv6=0) to test IPv6 listen addresses")
    from exporter.runtime import Exporter

    cfg = parse_config(config_dict(exporter={"listen": "[::1]:0",
                                             "state_dir": str(tmp_path / "s")}))
    exporter = Exporter(cfg)
    exporter.start()
    try:
        with urllib.request.urlopen(f"http://[::1]:{exporter.port}/healthz", timeout=10) as r:
            assert r.status == 200
    finally:
        exporter.stop()


def test_listen_failure_names_the_key(tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = tmp_path / "c.json"
        p.write_text(json.dumps(config_dict(exporter={"listen": f"127.0.0.1:{port}",
                                                      "state_dir": str(tmp_path / "s")})))
        assert exporter_main(["--config", str(p)]) == 1
    err = capsys.readouterr().err
    assert f"exporter.listen: cannot listen on 127.0.0.1:{port}" in err


@pytest.mark.parametrize(
    ("env", "location", "message"),
    [
        (None, "sources.task_db.url_env", "$AICRM_TEST_TASK_DB_URL is not set"),
        ("postgres ql://exporter:s3cret@db/crm", "sources.task_db.url_env",
         "not a valid SQLAlchemy URL"),
        ("oracle://exporter:s3cret@db/crm", "sources.task_db.url_env",
         "the 'oracle' dialect is not supported"),
        ("postgresql+nodriver://exporter:s3cret@db/crm", "sources.task_db.url_env",
         "postgresql+nodriver://exporter:***@db/crm"),
    ],
)
def test_task_db_url_from_environment_names_the_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        env: str | None, location: str, message: str) -> None:
    """The URL in $url_env is checked at start (--check-config does not read it): a clean
    error naming the key, never a traceback, never the password. A set variable takes
    priority over url, so a bad one is an error even with a url to fall back to."""
    if env is None:
        monkeypatch.delenv("AICRM_TEST_TASK_DB_URL", raising=False)
    else:
        monkeypatch.setenv("AICRM_TEST_TASK_DB_URL", env)
    p = tmp_path / "c.json"
    p.write_text(json.dumps(config_dict(
        sources={"task_db": {"url_env": "AICRM_TEST_TASK_DB_URL"} if env is None else
                 {"url": "sqlite:///unused.db", "url_env": "AICRM_TEST_TASK_DB_URL"}},
        exporter={"listen": "127.0.0.1:0", "state_dir": str(tmp_path / "s")})))
    assert exporter_main(["--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert f"{location}: " in err and message in err, err
    assert "s3cret" not in err and "Traceback" not in err


def test_bad_task_db_url_fails_check_config(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "c.json"
    p.write_text(json.dumps(config_dict(
        sources={"task_db": {"url": "postgres ql://exporter:s3cret@db/crm"}})))
    assert exporter_main(["--config", str(p), "--check-config"]) == 2
    err = capsys.readouterr().err
    assert "sources.task_db.url: not a valid SQLAlchemy URL" in err and "s3cret" not in err


# --- sources.task_db.url_env instead of url -----------------------------------------------


def _task_db(**settings: object) -> TaskDbSource:
    return TaskDbSource.model_validate(settings)


def test_task_db_url_env_replaces_url(monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/task-db.md: url_env holds the URL *instead*: url is then optional, and a set,
    non-empty variable takes priority over a url that is also given."""
    from exporter.sources.taskdb import _resolve_url

    cfg = parse_config(config_dict(sources={"task_db": {"url_env": "AICRM_TEST_TASK_DB_URL"}}))
    assert cfg.sources.task_db is not None and cfg.sources.task_db.url is None
    monkeypatch.setenv("AICRM_TEST_TASK_DB_URL", "postgresql://exporter:s3cret@db/crm\n")
    assert _resolve_url(cfg.sources.task_db) == (
        "postgresql://exporter:s3cret@db/crm", "sources.task_db.url_env")
    both = _task_db(url="sqlite:///fallback.db", url_env="AICRM_TEST_TASK_DB_URL")
    assert _resolve_url(both)[0] == "postgresql://exporter:s3cret@db/crm"
    for unset in ("", " "):
        monkeypatch.setenv("AICRM_TEST_TASK_DB_URL", unset)
        assert _resolve_url(both) == (
            "sqlite:///fallback.db", "sources.task_db.url")
    monkeypatch.delenv("AICRM_TEST_TASK_DB_URL")
    assert _resolve_url(both) == ("sqlite:///fallback.db", "sources.task_db.url")


def test_task_db_docs_example_is_valid() -> None:
    """The example of docs/task-db.md (url and url_env both set) is a valid task_db."""
    text = (ROOT / "docs" / "task-db.md").read_text()
    example = text.split('```json\n"task_db": ', 1)[1].split("```", 1)[0]
    cfg = parse_config(config_dict(sources={"task_db": json.loads(example)}))
    assert cfg.sources.task_db is not None and cfg.sources.task_db.url_env == "AICRM_TASK_DB_URL"


@pytest.mark.parametrize(("settings", "location", "message"), [
    ({"table": "tasks"}, "sources.task_db.url", "sources.task_db.url_env"),
    # An empty url_env is not given (as before it was validated): url is then required.
    ({"url_env": ""}, "sources.task_db.url", "sources.task_db.url_env"),
    ({"url_env": "HAS SPACE", "url": "sqlite:///x.db"}, "sources.task_db.url_env",
     "environment variable name"),
])
def test_task_db_needs_url_or_url_env(settings: dict, location: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(config_dict(sources={"task_db": settings}), "config.json")
    locs = dict(exc.value.errors)
    assert location in locs and message in locs[location], exc.value.errors


@pytest.mark.parametrize("url_env", ["", "  "])
def test_task_db_empty_url_env_is_unset(url_env: str) -> None:
    """An empty url_env (e.g. from a templated config) with a url is valid and means unset,
    as it did before url_env was validated as a variable name: the url is used."""
    from exporter.sources.taskdb import _resolve_url

    cfg = parse_config(config_dict(sources={"task_db": {
        "url": "sqlite:///tasks.db", "url_env": url_env}}), "config.json")
    assert cfg.sources.task_db is not None and cfg.sources.task_db.url_env is None
    assert _resolve_url(cfg.sources.task_db) == ("sqlite:///tasks.db", "sources.task_db.url")


@pytest.mark.parametrize("value", [None, "", "  \n"])
def test_task_db_url_env_unset_without_url_stops_start_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        value: str | None) -> None:
    """--check-config does not read the variable (it may run where secrets are not); start
    does, and stops naming the key and the variable."""
    if value is None:
        monkeypatch.delenv("AICRM_TEST_TASK_DB_URL", raising=False)
    else:
        monkeypatch.setenv("AICRM_TEST_TASK_DB_URL", value)
    p = tmp_path / "c.json"
    p.write_text(json.dumps(config_dict(
        sources={"task_db": {"url_env": "AICRM_TEST_TASK_DB_URL"}},
        exporter={"listen": "127.0.0.1:0", "state_dir": str(tmp_path / "s")})))
    assert exporter_main(["--config", str(p), "--check-config"]) == 0
    capsys.readouterr()
    assert exporter_main(["--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert "sources.task_db.url_env: $AICRM_TEST_TASK_DB_URL is not set" in err, err
    assert "Traceback" not in err


def test_task_db_url_env_unset_falls_back_to_url(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from exporter.runtime import Exporter

    monkeypatch.delenv("AICRM_TEST_TASK_DB_URL", raising=False)
    cfg = parse_config(config_dict(
        sources={"task_db": {"url": f"sqlite:///{tmp_path / 'tasks.db'}",
                             "url_env": "AICRM_TEST_TASK_DB_URL"}},
        exporter={"listen": "127.0.0.1:0", "state_dir": str(tmp_path / "s")}))
    exporter = Exporter(cfg)
    try:
        assert exporter.taskdb is not None
    finally:
        exporter.server.httpd.server_close()
        exporter.state_lock.release()


# --- exporter.state_dir must be usable ------------------------------------------------------


def test_state_dir_under_a_file_fails_check_config(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "afile").write_text("")
    p = tmp_path / "c.json"
    p.write_text(json.dumps(config_dict(exporter={"state_dir": "afile/state"})))
    assert exporter_main(["--config", str(p), "--check-config"]) == 2
    err = capsys.readouterr().err
    assert "exporter.state_dir: " in err and "is not a directory" in err, err
    assert str(tmp_path / "afile") in err and "Errno" not in err
    p.write_text(json.dumps(config_dict(exporter={"state_dir": "afile"})))
    assert exporter_main(["--config", str(p), "--check-config"]) == 2
    assert "exporter.state_dir: " in capsys.readouterr().err


def test_state_dir_check_creates_nothing(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "c.json"
    p.write_text(json.dumps(config_dict(exporter={"state_dir": "data/state"})))
    assert exporter_main(["--config", str(p), "--check-config"]) == 0
    assert not (tmp_path / "data").exists()


def test_state_dir_check_unit(tmp_path: Path) -> None:
    from exporter.config import check_state_dir

    assert check_state_dir(str(tmp_path / "new" / "deeper")) is None
    assert check_state_dir(str(tmp_path)) is None
    (tmp_path / "f").write_text("")
    assert "is not a directory" in (check_state_dir(str(tmp_path / "f" / "x")) or "")
    assert "is not a directory" in (check_state_dir(str(tmp_path / "f")) or "")


# --- event_logs must not reach into the state directory ------------------------------------


@pytest.mark.parametrize(("pattern", "state_dir", "refused"), [
    ("state/push/*.jsonl", "state", True),
    ("state/push/journal-1.jsonl", "state", True),
    ("state/*", "state", True),
    ("data/*/*.jsonl", "data/state", True),
    ("data/*/*/*.jsonl", "data/state", True),
    ("*/push/*.jsonl", "state", True),
    ("data/st?te/push/*.jsonl", "data/state", True),
    ("data/**/*.jsonl", "data/state", True),
    ("data/[s]tate/x", "data/state", True),
    ("./state/../state/push/*.jsonl", "state", True),
    ("data/events/*.jsonl", "data/state", False),
    ("data/*.jsonl", "data/state", False),
    ("data/*", "data/state", False),
    ("data/e*/*.jsonl", "data/state", False),
    ("logs/*/*.jsonl", "data/state", False),
    ("*/*.jsonl", "data/state/x", False),
    ("*/*.jsonl", ".state", False),  # glob's * does not match a hidden name
])
def test_event_log_glob_into_state_dir_is_refused(
        tmp_path: Path, pattern: str, state_dir: str, refused: bool) -> None:
    """Journal segments or state files read as a log source would be counted twice, rejected
    and never released: a glob that can match a path inside exporter.state_dir is an error."""
    p = tmp_path / "c.json"
    p.write_text(json.dumps(config_dict(
        sources={"event_logs": [{"name": "ok", "path": "elsewhere/*.jsonl"},
                                {"name": "logs", "path": pattern}]},
        exporter={"state_dir": state_dir})))
    if not refused:
        load_config(p)
        return
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    locs = dict(exc.value.errors)
    assert list(locs) == ["sources.event_logs[1].path"], exc.value.errors
    assert "exporter.state_dir" in locs["sources.event_logs[1].path"]


def test_event_log_glob_into_state_dir_through_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "data" / "state").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "data")
    p = tmp_path / "c.json"
    p.write_text(json.dumps(config_dict(
        sources={"event_logs": [{"name": "logs", "path": "link/state/push/*.jsonl"}]},
        exporter={"state_dir": "data/state"})))
    with pytest.raises(ConfigError, match=r"sources\.event_logs\[0\]\.path"):
        load_config(p)


def test_event_log_glob_into_state_dir_fails_check_config(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "c.json"
    p.write_text(json.dumps(config_dict(
        sources={"event_logs": [{"name": "logs", "path": "st3/push/*.jsonl"}],
                 "push": {"enabled": True, "token_env": "TOK"}},
        exporter={"state_dir": "st3"})))
    assert exporter_main(["--config", str(p), "--check-config"]) == 2
    assert "sources.event_logs[0].path: " in capsys.readouterr().err
