"""The workload simulator: lines honour the contract, incidents show, writers persist."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from exporter.config import Config, parse_config
from exporter.events import (
    Event,
    Handoff,
    IntegrationCall,
    Interaction,
    LlmCall,
    Rejected,
    TaskResult,
    ToolCall,
    decode_line,
)
from exporter.simulate import (
    FileWriter,
    Incident,
    Output,
    PushWriter,
    RawLine,
    TaskChange,
    TaskDbWriter,
    Workload,
    encode_line,
    event_paths,
    main,
    parse_incident,
    push_url,
    read_control_file,
)

START = 1_750_000_000.0
CONFIG: dict[str, Any] = {
    "agents": [
        {"name": "lead-qualifier", "team": "sales-ops", "success_objective": 0.95},
        {"name": "email-writer", "team": "marketing", "success_objective": 0.9},
        {"name": "meeting-booker", "team": "sales-ops", "success_objective": 0.95},
        {"name": "record-enricher", "team": "revops", "success_objective": 0.97},
        {"name": "support-triager", "team": "support", "success_objective": 0.9},
    ],
    "task_types": [
        {"name": "qualify_lead", "target_seconds": 120, "minutes_saved": 15},
        {"name": "write_email", "target_seconds": 60, "minutes_saved": 10},
        {"name": "book_meeting", "target_seconds": 300, "minutes_saved": 20},
        {"name": "enrich_record", "target_seconds": 30, "minutes_saved": 5},
        {"name": "triage_ticket", "target_seconds": 90, "minutes_saved": 8},
    ],
    "integrations": [
        {"platform": "salesforce", "operations": ["query", "update", "create"]},
        {"platform": "hubspot", "operations": ["search", "update", "create"]},
        {"platform": "slack", "operations": ["post_message", "lookup_user"]},
        {"platform": "gmail", "operations": ["send", "read"]},
    ],
    "models": [
        {"name": "gpt-4o", "provider": "openai"},
        {"name": "gpt-4o-mini", "provider": "openai"},
        {"name": "claude-sonnet-4", "provider": "anthropic"},
    ],
    "tools": ["crm.search", "crm.update", "email.send", "calendar.book", "web.lookup"],
    "channels": ["web", "email", "slack"],
}
OBJECTIVES = {a["name"]: a["success_objective"] for a in CONFIG["agents"]}


@pytest.fixture(scope="module")
def cfg() -> Config:
    return parse_config(CONFIG)


def simulate(cfg: Config, incidents: tuple[str, ...] = (), hours: float = 1.0, rate: float = 2.0,
             seed: int = 7, **kw: Any) -> tuple[list[Output], list[int]]:
    """Run the model minute by minute; returns its output and the queue length each minute."""
    model = Workload(cfg, start=START, rate=rate, seed=seed, id_prefix="t",
                     incidents=[parse_incident(i, cfg) for i in incidents], **kw)
    out: list[Output] = []
    queued = []
    for minute in range(1, int(hours * 60) + 1):
        out += model.advance(START + minute * 60)
        queued.append(model.stats.queued)
    return out, queued


def success_ratios(out: list[Output]) -> dict[str, float]:
    results: dict[str, Counter[str]] = defaultdict(Counter)
    for e in out:
        if isinstance(e, TaskResult):
            results[e.agent][e.outcome] += 1
    return {a: c["success"] / sum(c.values()) for a, c in results.items()}


def error_ratios(out: list[Output]) -> dict[str, float]:
    calls: dict[str, Counter[bool]] = defaultdict(Counter)
    for e in out:
        if isinstance(e, IntegrationCall):
            calls[e.platform][e.status == "timeout" or int(e.status or 0) >= 500] += 1
    return {p: c[True] / sum(c.values()) for p, c in calls.items()}


@pytest.fixture(scope="module")
def baseline(cfg: Config) -> tuple[list[Output], list[int]]:
    return simulate(cfg)


# --- The model ----------------------------------------------------------------------------------


def test_every_event_round_trips_through_the_decoder(baseline: tuple[list[Output], list[int]]
                                                     ) -> None:
    events = [e for e in baseline[0] if not isinstance(e, TaskChange)]
    kinds = Counter(type(e).__name__ for e in events)
    assert set(kinds) == {"TaskResult", "LlmCall", "ToolCall", "Handoff", "IntegrationCall",
                          "Interaction"}
    for e in events:
        assert not isinstance(e, RawLine)
        line = encode_line(e)
        assert b"null" not in line
        decoded = decode_line(line)
        assert decoded == e, line
        assert json.loads(line)["ts"].endswith("Z")


def test_label_values_are_all_declared_by_default(cfg: Config,
                                                  baseline: tuple[list[Output], list[int]]
                                                  ) -> None:
    agents = {a.name for a in cfg.agents}
    operations = {i.platform: set(i.operations) for i in cfg.integrations}
    for e in baseline[0]:
        if isinstance(e, TaskResult):
            assert e.agent in agents and e.task_type in {t.name for t in cfg.task_types}
        elif isinstance(e, LlmCall):
            assert e.model in cfg.model_names and e.provider == cfg.model_provider(e.model)
            assert e.error_type is None or e.error_type in cfg.error_types
            assert (e.cost_usd or 0) > 0 and e.input_tokens
        elif isinstance(e, ToolCall):
            assert e.agent in agents and e.tool in cfg.tools
        elif isinstance(e, Handoff):
            assert {e.from_agent, e.to_agent} <= agents and e.from_agent != e.to_agent
        elif isinstance(e, IntegrationCall):
            assert e.operation in operations[e.platform] and e.agent in agents
        elif isinstance(e, Interaction):
            assert e.channel in cfg.channels and (e.agent is None or e.agent in agents)


def test_users_ratings_and_workflows_look_like_a_crm(baseline: tuple[list[Output], list[int]]
                                                     ) -> None:
    out = baseline[0]
    interactions = [e for e in out if isinstance(e, Interaction)]
    assert 150 <= len({e.user for e in interactions}) <= 300
    assert {e.type for e in interactions} >= {"message", "approval", "rejection", "feedback"}
    ratings = [e.rating for e in interactions if e.rating is not None]
    assert ratings and all(1 <= r <= 5 for r in ratings) and sum(ratings) / len(ratings) > 3.8
    handoffs = Counter((e.from_agent, e.to_agent) for e in out if isinstance(e, Handoff))
    assert handoffs[("lead-qualifier", "email-writer")] > 0
    assert handoffs[("email-writer", "meeting-booker")] > 0
    statuses = Counter(e.status for e in out if isinstance(e, IntegrationCall))
    assert statuses[429] > 0 and statuses["timeout"] > 0


def test_healthy_agents_meet_their_objectives(baseline: tuple[list[Output], list[int]]) -> None:
    ratios = success_ratios(baseline[0])
    assert set(ratios) == set(OBJECTIVES)
    for agent, ratio in ratios.items():
        assert OBJECTIVES[agent] - 0.01 <= ratio < 1.0, agent


def test_durations_centre_on_target_seconds(cfg: Config,
                                            baseline: tuple[list[Output], list[int]]) -> None:
    by_type: dict[str, list[float]] = defaultdict(list)
    for e in baseline[0]:
        if isinstance(e, TaskResult):
            by_type[e.task_type].append((e.duration_ms or 0) / 1000)
    for t in cfg.task_types:
        values = sorted(by_type[t.name])
        median = values[len(values) // 2]
        assert t.target_seconds is not None
        assert 0.8 * t.target_seconds < median < 1.25 * t.target_seconds, t.name


def test_declared_task_types_decide_who_does_what() -> None:
    """agents[].task_types is followed: each agent gets only the types it lists (an agent that
    lists none takes every type), so the simulator never makes series the exporter did not
    pre-create; without declarations the name-based pairing stays."""
    declared = {"lead-qualifier": ["qualify_lead", "enrich_record"],
                "email-writer": ["write_email"], "meeting-booker": ["book_meeting"],
                "record-enricher": ["enrich_record"], "support-triager": []}
    agents = [{**a, "task_types": declared[a["name"]]} for a in CONFIG["agents"]]
    out, _ = simulate(parse_config({**CONFIG, "agents": agents}), rate=4.0)
    pairs = Counter((e.agent, e.task_type) for e in out if isinstance(e, TaskResult))
    for agent, task_type in pairs:
        assert not declared[agent] or task_type in declared[agent], (agent, task_type)
    assert pairs[("lead-qualifier", "enrich_record")] > 0
    assert pairs[("record-enricher", "enrich_record")] > 0
    every_type = {t["name"] for t in CONFIG["task_types"]}
    assert {t for a, t in pairs if a == "support-triager"} == every_type
    undeclared, _ = simulate(parse_config(CONFIG), rate=4.0)
    inferred = {(e.agent, e.task_type) for e in undeclared if isinstance(e, TaskResult)}
    assert ("lead-qualifier", "qualify_lead") in inferred
    assert ("support-triager", "write_email") not in inferred


def test_agent_degraded_drops_only_that_agent(cfg: Config) -> None:
    out, _ = simulate(cfg, ("agent-degraded:email-writer",))
    ratios = success_ratios(out)
    assert 0.35 < ratios["email-writer"] < 0.65
    for agent, ratio in ratios.items():
        if agent != "email-writer":
            assert ratio >= OBJECTIVES[agent] - 0.01, agent


def test_integration_failing_raises_that_platforms_errors(
        cfg: Config, baseline: tuple[list[Output], list[int]]) -> None:
    before = error_ratios(baseline[0])
    after = error_ratios(simulate(cfg, ("integration-failing:hubspot",))[0])
    assert all(r < 0.02 for r in before.values())
    assert 0.3 < after["hubspot"] < 0.5
    assert after["salesforce"] < 0.02


def test_backlog_piles_up_queued_tasks(baseline: tuple[list[Output], list[int]],
                                       cfg: Config) -> None:
    assert max(baseline[1]) < 50
    out, queued = simulate(cfg, ("backlog",))
    assert queued[-1] > 500
    assert queued[-1] > queued[30] > queued[5]
    assert Counter(c.status for c in out if isinstance(c, TaskChange))["cancelled"] > 0


def test_cost_spike_raises_cost_per_successful_task(
        cfg: Config, baseline: tuple[list[Output], list[int]]) -> None:
    def cost_per_success(out: list[Output], agent: str) -> float:
        cost = sum(e.cost_usd or 0 for e in out if isinstance(e, LlmCall) and e.agent == agent)
        ok = sum(1 for e in out if isinstance(e, TaskResult) and e.agent == agent
                 and e.outcome == "success")
        return cost / ok

    spiked = simulate(cfg, ("cost-spike:email-writer",))[0]
    assert cost_per_success(spiked, "email-writer") > 1.0
    assert cost_per_success(baseline[0], "email-writer") < 0.05
    assert {e.model for e in spiked if isinstance(e, LlmCall) and e.agent == "email-writer"} \
        == {"claude-sonnet-4"}


def test_incidents_switch_at_runtime(cfg: Config) -> None:
    model = Workload(cfg, start=START, rate=2, seed=3, id_prefix="t")
    model.advance(START + 1800)
    model.set_incidents([Incident("agent-degraded", "lead-qualifier")])
    degraded = model.advance(START + 3600)
    model.set_incidents([])
    model.advance(START + 4000)
    recovered = model.advance(START + 7200)
    assert success_ratios(degraded)["lead-qualifier"] < 0.7
    assert success_ratios(recovered)["lead-qualifier"] > 0.93


def test_task_lifecycles_are_consistent(baseline: tuple[list[Output], list[int]]) -> None:
    rows: dict[str, list[TaskChange]] = defaultdict(list)
    for c in baseline[0]:
        if isinstance(c, TaskChange):
            rows[c.id].append(c)
    assert len(rows) > 5000
    for changes in rows.values():
        first, last = changes[0], changes[-1]
        assert first.status == "queued" and first.agent is None and first.started_at is None
        assert [c.status for c in changes[1:-1]] in ([], ["running"])
        assert last.status in ("queued", "running", "completed", "failed", "cancelled")
        if last.started_at is not None:
            assert last.created_at <= last.started_at and last.agent is not None
        if last.finished_at is not None:
            assert (last.started_at or last.created_at) <= last.finished_at


def test_same_seed_same_workload(cfg: Config) -> None:
    def lines(seed: int) -> list[bytes]:
        model = Workload(cfg, start=START, rate=3, seed=seed, noise=0.05, id_prefix="t",
                         incidents=[Incident("backlog")])
        return [repr(e).encode() if isinstance(e, TaskChange)
                else e.data if isinstance(e, RawLine) else encode_line(e)
                for e in model.advance(START + 300)]

    assert lines(11) == lines(11)
    assert lines(11) != lines(12)


def test_noise_adds_rejected_and_undeclared_lines(cfg: Config) -> None:
    model = Workload(cfg, start=START, rate=5, seed=1, noise=0.05, id_prefix="t")
    raw = [e for e in model.advance(START + 900) if isinstance(e, RawLine)]
    decoded = [decode_line(r.data) for r in raw]
    reasons = Counter(d.reason for d in decoded if isinstance(d, Rejected))
    assert set(reasons) >= {"invalid_json", "unknown_event", "missing_field", "out_of_range",
                            "not_object"}
    assert any(isinstance(d, TaskResult) and d.agent == "unregistered-agent" for d in decoded)
    assert model.stats.raw_lines == len(raw)


def test_close_open_cancels_every_open_task(cfg: Config) -> None:
    model = Workload(cfg, start=START, rate=5, seed=1, id_prefix="t")
    model.advance(START + 120)
    assert model.stats.running > 0
    closed = model.close_open()
    assert closed and all(isinstance(c, TaskChange) and c.status == "cancelled"
                          and c.finished_at == START + 120 for c in closed)
    assert model.stats.queued == model.stats.running == 0


def test_parse_incident(cfg: Config) -> None:
    assert parse_incident("backlog", cfg) == Incident("backlog")
    assert parse_incident("agent-degraded", cfg) == Incident("agent-degraded", "lead-qualifier")
    assert parse_incident("integration-failing:slack", cfg) == Incident("integration-failing",
                                                                         "slack")
    assert str(parse_incident("cost-spike:email-writer", cfg)) == "cost-spike:email-writer"
    for bad, message in [
        ("meltdown", "unknown incident"),
        ("backlog:x", "takes no target"),
        ("agent-degraded:nobody", "not a declared agent"),
        ("integration-failing:jira", "not a declared platform"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_incident(bad, cfg)


def test_control_file(tmp_path: Path, cfg: Config) -> None:
    path = tmp_path / "incidents"
    assert read_control_file(path, cfg) == (set(), [])
    path.write_text("# on call drill\nbacklog\n\nagent-degraded:email-writer  # flaky\nboom\n")
    found, errors = read_control_file(path, cfg)
    assert found == {Incident("backlog"), Incident("agent-degraded", "email-writer")}
    assert len(errors) == 1 and ":5: unknown incident 'boom'" in errors[0]


# --- Writers ------------------------------------------------------------------------------------


def test_event_paths_match_the_glob(tmp_path: Path) -> None:
    assert event_paths(f"{tmp_path}/events/*.jsonl") == {
        s: tmp_path / "events" / f"{s}.jsonl" for s in ("agents", "integrations", "users")}
    assert event_paths(f"{tmp_path}/crm-*.log")["users"] == tmp_path / "crm-users.log"
    assert set(event_paths(f"{tmp_path}/one.jsonl").values()) == {tmp_path / "one.jsonl"}
    assert event_paths(f"{tmp_path}/*/x.jsonl")["agents"] == tmp_path / "simulator" / "agents.jsonl"


def test_file_writer_writes_whole_decodable_lines(tmp_path: Path, cfg: Config) -> None:
    model = Workload(cfg, start=START, rate=3, seed=5, id_prefix="t")
    writer = FileWriter(event_paths(f"{tmp_path}/ev/*.jsonl"))
    try:
        for minute in range(1, 11):
            for item in model.advance(START + minute * 60):
                if not isinstance(item, TaskChange):
                    writer.add(item)
            writer.flush()
    finally:
        writer.close()
    files = {p.name: p.read_bytes() for p in (tmp_path / "ev").iterdir()}
    assert set(files) == {"agents.jsonl", "integrations.jsonl", "users.jsonl"}
    total = 0
    for name, data in files.items():
        assert data.endswith(b"\n")
        for line in data.splitlines():
            event = decode_line(line)
            assert not isinstance(event, Rejected), line
            assert (name == "integrations.jsonl") == isinstance(event, IntegrationCall)
            assert (name == "users.jsonl") == isinstance(event, Interaction)
            total += 1
    assert total == writer.written == model.stats.events


def _task_rows(url: str) -> list[dict[str, Any]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(sa.text("SELECT * FROM tasks"))]
    finally:
        engine.dispose()


def _check_rows(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        assert r["status"] in ("queued", "running", "completed", "failed", "cancelled")
        created, started, finished = r["created_at"], r["started_at"], r["finished_at"]
        if isinstance(created, str):  # SQLite through a raw text query
            created, started, finished = (
                None if v is None else datetime.fromisoformat(v) for v in (created, started,
                                                                           finished))
        assert created.tzinfo is None
        assert (started is None) == (r["agent"] is None) == (r["status"] == "queued"
                                                             or (r["status"] == "cancelled"
                                                                 and started is None))
        if started is not None:
            assert created <= started
        assert (finished is not None) == (r["status"] in ("completed", "failed", "cancelled"))
        if finished is not None:
            assert (started or created) <= finished


def _fill(url: str, cfg: Config) -> Workload:
    model = Workload(cfg, start=START, rate=5, seed=2, id_prefix="sim-t",
                     incidents=[Incident("backlog")])
    writer = TaskDbWriter(url)
    try:
        for step in range(1, 31):
            for item in model.advance(START + step * 20):
                if isinstance(item, TaskChange):
                    writer.add(item)
            writer.flush()
        assert writer.cancel_stale("sim", START + 700) == model.stats.queued + model.stats.running
    finally:
        writer.close()
    return model


def test_task_db_writer_sqlite(tmp_path: Path, cfg: Config) -> None:
    url = f"sqlite:///{tmp_path}/tasks.db"
    model = _fill(url, cfg)
    rows = _task_rows(url)
    assert len(rows) == model.stats.tasks_created
    _check_rows(rows)
    statuses = Counter(r["status"] for r in rows)
    assert statuses["completed"] and statuses["failed"] and statuses["cancelled"]
    assert not statuses["queued"] and not statuses["running"]


@pytest.mark.integration
def test_task_db_writer_postgres(pg_url: str, cfg: Config) -> None:
    model = _fill(pg_url, cfg)
    rows = _task_rows(pg_url)
    assert len(rows) == model.stats.tasks_created
    _check_rows(rows)


class _Collector(BaseHTTPRequestHandler):
    bodies: list[tuple[str | None, bytes]] = []

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.bodies.append((self.headers.get("Authorization"), body))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")


@pytest.fixture
def collector() -> Iterator[tuple[str, list[tuple[str | None, bytes]]]]:
    bodies: list[tuple[str | None, bytes]] = []
    handler = type("Handler", (_Collector,), {"bodies": bodies})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", bodies
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_push_writer_posts_ndjson_batches(cfg: Config,
                                          collector: tuple[str, list[tuple[str | None, bytes]]]
                                          ) -> None:
    url, bodies = collector
    model = Workload(cfg, start=START, rate=5, seed=4, id_prefix="t")
    writer = PushWriter(url, "s3cret", max_body_bytes=16384)
    try:
        for item in model.advance(START + 300):
            if not isinstance(item, TaskChange):
                writer.add(item)
        writer.flush()
    finally:
        writer.close()
    assert len(bodies) > 1 and all(auth == "Bearer s3cret" for auth, _ in bodies)
    lines = [line for _, body in bodies for line in body.splitlines()]
    assert all(len(body) <= 16384 for _, body in bodies)
    assert len(lines) == writer.written == model.stats.events
    assert all(isinstance(decode_line(line), Event) for line in lines)


def test_push_url() -> None:
    assert push_url("http://h:9464") == "http://h:9464/v1/events"
    assert push_url("http://h:9464/") == "http://h:9464/v1/events"
    assert push_url("https://h/ingest/v1/events") == "https://h/ingest/v1/events"
    with pytest.raises(ValueError):
        push_url("h:9464")


# --- The command --------------------------------------------------------------------------------


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    data = dict(CONFIG, sources={
        "event_logs": [{"name": "agent-logs", "path": "data/events/*.jsonl"}],
        "task_db": {"url": "sqlite:///data/tasks.db"},
    })
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return path


def _lines(tmp_path: Path) -> list[bytes]:
    return [line for p in sorted((tmp_path / "data" / "events").glob("*.jsonl"))
            for line in p.read_bytes().splitlines()]


def test_main_runs_for_a_duration(tmp_path: Path, config_file: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    control = tmp_path / "data" / "simulator" / "incidents"
    control.parent.mkdir(parents=True)
    control.write_text("backlog\nnot-an-incident\n")
    rc = main(["--config", str(config_file), "--duration", "2", "--rate", "20", "--speedup",
               "60", "--seed", "1", "--progress-seconds", "0.5",
               "--incident", "agent-degraded:email-writer"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "incidents: agent-degraded:email-writer, backlog" in err
    assert "unknown incident 'not-an-incident'" in err
    assert "open tasks cancelled" in err.splitlines()[-1]
    lines = _lines(tmp_path)
    assert len(lines) > 100
    assert all(not isinstance(decode_line(line), Rejected) for line in lines)
    rows = _task_rows(f"sqlite:///{tmp_path}/data/tasks.db")
    assert len(rows) > 20
    _check_rows(rows)
    assert {r["status"] for r in rows} >= {"completed", "cancelled"}
    assert not {r["status"] for r in rows} & {"queued", "running"}


def test_main_backfill_writes_the_past(tmp_path: Path, config_file: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    before = time.time()
    assert main(["--config", str(config_file), "--backfill", "0.5", "--rate", "2",
                 "--seed", "3"]) == 0
    assert "backfill" in capsys.readouterr().err
    stamps = []
    for line in _lines(tmp_path):
        event = decode_line(line)
        assert not isinstance(event, Rejected)
        epoch = event.epoch()
        assert epoch is not None
        stamps.append(epoch)
    assert min(stamps) < before - 1500 and max(stamps) <= time.time()
    rows = _task_rows(f"sqlite:///{tmp_path}/data/tasks.db")
    assert len(rows) > 1000
    _check_rows(rows)


def test_main_rejects_bad_arguments(tmp_path: Path, config_file: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(config_file), "--incident", "meltdown"]) == 2
    assert "unknown incident 'meltdown'" in capsys.readouterr().err
    assert main(["--config", str(config_file), "--noise", "2"]) == 2
    assert "--noise must be between 0 and 1" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.json")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_sigterm_exits_cleanly(tmp_path: Path, config_file: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "exporter.simulate", "--config", str(config_file), "--rate", "20",
         "--speedup", "10", "--progress-seconds", "0.2"],
        stderr=subprocess.PIPE, env=env, text=True,
    )
    try:
        deadline = time.monotonic() + 20
        db = tmp_path / "data" / "tasks.db"
        while time.monotonic() < deadline and not (db.exists() and _lines(tmp_path)):
            time.sleep(0.1)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "open tasks cancelled" in err
    rows = _task_rows(f"sqlite:///{db}")
    assert rows and not {r["status"] for r in rows} & {"queued", "running"}
    assert all(line.endswith(b"}") for line in _lines(tmp_path))


def test_push_writer_resends_an_unanswered_batch_with_its_key() -> None:
    """The first POST is read and then cut without an answer (as when the exporter crashed
    after journaling it): the retry carries the same lines and Idempotency-Key, the next batch
    a new key."""
    seen: list[tuple[str | None, bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append((self.headers.get("Idempotency-Key"), body))
            if len(seen) == 1:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            out = json.dumps({"accepted": body.count(b"\n"), "rejected": []}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    writer = PushWriter(f"http://127.0.0.1:{server.server_address[1]}", "t", max_body_bytes=64)
    try:
        lines = [json.dumps({"event": "x", "n": i}).encode() for i in range(4)]
        for line in lines[:2]:
            writer._pending.append(line + b"\n")
        writer.flush()
        assert writer.last_error is not None and writer.written == 0
        for line in lines[2:]:
            writer._pending.append(line + b"\n")
        writer.flush()
    finally:
        writer.close()
        server.shutdown()
        server.server_close()
    assert seen[0] == seen[1] and seen[0][0]
    assert all(key not in (None, seen[0][0]) for key, _ in seen[2:]) and len(seen) >= 3
    assert b"".join(body for _, body in seen[1:]) == b"".join(x + b"\n" for x in lines)
    assert writer.written == 4 and writer.last_error is None
