"""Real-server fixtures shared by every integration test (see tests/servers.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import servers


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.PostgresServer]:
    """One PostgreSQL per session; tests isolate themselves with pg_url's fresh databases."""
    server = servers.start_postgres(tmp_path_factory.mktemp("postgres"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.RedisServer]:
    server = servers.start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def pg_url(postgres_server: servers.PostgresServer) -> str:
    """SQLAlchemy URL of a new empty database for this test."""
    return postgres_server.create_database()


def _factory(start: Callable[..., servers.ProcessHandle], tmp_path: Path) -> Iterator[Any]:
    """Start servers under tmp_path; stop every one at teardown, even if one stop fails."""
    with contextlib.ExitStack() as stack:

        def make(*args: Any, **kwargs: Any) -> Any:
            server = start(tmp_path, *args, **kwargs)
            stack.callback(server.stop)
            return server

        yield make


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[Callable[..., servers.PrometheusServer]]:
    """prometheus_factory(config, rule_files=(), extra_args=(), port=None)."""
    yield from _factory(servers.start_prometheus, tmp_path)


@pytest.fixture
def alertmanager_factory(tmp_path: Path) -> Iterator[Callable[..., servers.AlertmanagerServer]]:
    """alertmanager_factory(config: dict | Path)."""
    yield from _factory(servers.start_alertmanager, tmp_path)


@pytest.fixture
def vm_factory(tmp_path: Path) -> Iterator[Callable[..., servers.VictoriaMetricsServer]]:
    """vm_factory(extra_args=())."""
    yield from _factory(servers.start_victoria_metrics, tmp_path)


@pytest.fixture
def vmalert_factory(tmp_path: Path) -> Iterator[Callable[..., servers.VmalertServer]]:
    """vmalert_factory(rule_files, datasource_url, remote_write_url=None, notifier_url=None,
    extra_args=(), port=None)."""
    yield from _factory(servers.start_vmalert, tmp_path)
