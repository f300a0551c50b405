"""``aicrm-api`` runs gunicorn from its console script beside the interpreter, so a USR2 binary
upgrade re-executes a master that can import the standard library's ``http`` package."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import requests

from api import cli
from tests import servers
from tests.api.conftest import ROOT
from tests.api.test_gunicorn import _ss
from tests.helpers import config_dict, eventually


class Exec(Exception):
    pass


@pytest.fixture
def execs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[tuple[str, list[str]]]:
    """What cli.main would exec (through any of the os.exec* calls), with ``sys.executable``
    in ``tmp_path/bin``."""
    seen: list[tuple[str, list[str]]] = []

    def capture(path: str, args: list[str], env: dict[str, str]) -> None:
        seen.append((str(path), [str(a) for a in args]))
        raise Exec

    for name in ("execve", "execvpe"):
        monkeypatch.setattr(os, name, capture)
    (tmp_path / "bin").mkdir()
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    (tmp_path / "config.json").write_text(json.dumps(config_dict()))
    return seen


def test_gunicorn_runs_from_its_console_script(execs: list[tuple[str, list[str]]],
                                               tmp_path: Path) -> None:
    script = tmp_path / "bin" / "gunicorn"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    with pytest.raises(Exec):
        cli.main(["--config", str(tmp_path / "config.json")])
    assert execs == [(str(script), [str(script), "-c", str(cli.CONF), "api:create_app()"])]


def test_a_missing_console_script_is_a_clear_error(execs: list[tuple[str, list[str]]],
                                                   tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--config", str(tmp_path / "config.json")]) == 2
    assert execs == []
    err = capsys.readouterr().err
    assert f"no gunicorn console script at {tmp_path / 'bin' / 'gunicorn'}" in err


@pytest.mark.integration
def test_usr2_upgrade_under_aicrm_api(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(config_dict()))
    port = servers.free_port()
    env: dict[str, Any] = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                           "AICRM_API_ACCESS_LOG": "off",
                           "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics")}
    api = servers.ProcessHandle("aicrm-api", tmp_path)
    url = f"http://127.0.0.1:{port}"
    api.start([Path(sys.executable).parent / "aicrm-api", "--config", tmp_path / "config.json",
               "--bind", f"127.0.0.1:{port}", "--workers", "1"], cwd=ROOT, env=env,
              ready_check=servers.http_ok(url + "/healthz"), timeout=60)
    try:
        assert eventually(lambda: len(_ss(port, "listening")) == 1, 20)
        os.kill(api.pid, signal.SIGUSR2)
        assert eventually(lambda: len(_ss(port, "listening")) == 2, 20), api.log_tail()
        os.kill(api.pid, signal.SIGQUIT)
        assert eventually(lambda: api.process is not None and api.process.poll() is not None,
                          20), api.log_tail()
        assert requests.get(url + "/healthz", timeout=5).status_code == 200
        log = api.log_tail(200)
        assert "No module named" not in log and "Traceback" not in log, log
    finally:
        api.stop()
