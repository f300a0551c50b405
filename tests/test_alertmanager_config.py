"""exporter/alertmanager_config.py: the rendered alertmanager.yml keeps only what can deliver.

The shipped file has Slack, e-mail and a placeholder webhook on its receivers; run as it is with
the secrets left empty (docs/deploy.md allows that), a real Alertmanager fails every page on
Slack (`unsupported protocol scheme ""`) and every webhook (`connection refused`). The
integration tests run a real Alertmanager on the rendered file and read its failure counter.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from exporter import alertmanager_config
from exporter.alertmanager_config import PLACEHOLDER_WEBHOOK, RenderError, render
from tests import servers
from tests.helpers import eventually

ROOT = Path(__file__).resolve().parents[1]
ALERTMANAGER_DIR = ROOT / "alertmanager"
SHIPPED: dict[str, Any] = yaml.safe_load(
    (ALERTMANAGER_DIR / "alertmanager.yml").read_text(encoding="utf-8")
)


def _secrets(tmp_path: Path, slack: str | None, smtp: str | None) -> Path:
    """A secrets directory; None leaves the file out."""
    directory = tmp_path / "secrets"
    directory.mkdir(exist_ok=True)
    for name, value in (("slack_webhook_url", slack), ("smtp_password", smtp)):
        if value is not None:
            (directory / name).write_text(value)
    return directory


def _integrations(cfg: dict[str, Any]) -> dict[str, set[str]]:
    return {
        r["name"]: {k for k in r if k.endswith("_configs")} for r in cfg["receivers"]
    }


@pytest.mark.parametrize(
    ("slack", "smtp", "webhook", "expected"),
    [
        # docs/deploy.md's .env with the optional values left empty: nothing can deliver.
        ("", "", None, set()),
        (None, None, "", set()),
        (" \n", "\n", "   ", set()),
        ("", "", "http://bridge:5001/alerts", {"webhook_configs"}),
        ("https://hooks.slack.example/x", "", None, {"slack_configs"}),
        ("", "pw", None, {"email_configs"}),
        ("https://hooks.slack.example/x", "pw", "https://bridge.example/alerts",
         {"webhook_configs", "slack_configs", "email_configs"}),
    ],
)
def test_only_configured_integrations_are_kept(
    tmp_path: Path, slack: str | None, smtp: str | None, webhook: str | None, expected: set[str]
) -> None:
    secrets = _secrets(tmp_path, slack, smtp)
    cfg, notes = render(SHIPPED, webhook_url=webhook, secrets_dir=secrets)
    used = set().union(*_integrations(cfg).values())
    assert used == expected
    glob = cfg["global"]
    assert any(k.startswith("slack_") for k in glob) == ("slack_configs" in expected)
    assert any(k.startswith("smtp_") for k in glob) == ("email_configs" in expected)
    if "slack_configs" in expected:
        assert glob["slack_api_url_file"] == str(secrets / "slack_webhook_url")
    hooks = {h["url"] for r in cfg["receivers"] for h in r.get("webhook_configs", [])}
    assert hooks == ({webhook} if "webhook_configs" in expected else set())
    # Routes, inhibitions and receiver names are the shipped ones.
    assert cfg["route"] == SHIPPED["route"]
    assert cfg["inhibit_rules"] == SHIPPED["inhibit_rules"]
    assert [r["name"] for r in cfg["receivers"]] == [r["name"] for r in SHIPPED["receivers"]]
    if not expected:
        assert any("notify no one" in note for note in notes), notes
    if "webhook_configs" not in expected:
        assert any("AICRM_WEBHOOK_URL" in note for note in notes), notes


def test_secret_values_never_reach_the_output(tmp_path: Path) -> None:
    secrets = _secrets(tmp_path, "https://hooks.slack.example/T0/B0/s3cr3t", "hunter2-smtp")
    cfg, _ = render(SHIPPED, webhook_url=None, secrets_dir=secrets)
    out = tmp_path / "out" / "alertmanager.yml"
    alertmanager_config.write(cfg, out)
    text = out.read_text()
    assert "s3cr3t" not in text and "hunter2" not in text
    assert str(secrets / "slack_webhook_url") in text
    assert out.stat().st_mode & 0o777 == 0o644
    assert text.startswith("# Generated")


def test_only_the_placeholder_webhook_is_rewritten() -> None:
    source: dict[str, Any] = {
        "route": {"receiver": "a"},
        "receivers": [
            {"name": "a", "webhook_configs": [{"url": PLACEHOLDER_WEBHOOK}]},
            {"name": "switch", "webhook_configs": [{"url": "https://hc-ping.example/uuid"}]},
        ],
    }
    cfg, _ = render(source, webhook_url=None)
    assert cfg["receivers"] == [
        {"name": "a"},
        {"name": "switch", "webhook_configs": [{"url": "https://hc-ping.example/uuid"}]},
    ]
    cfg, _ = render(source, webhook_url="http://bridge/alerts")
    assert cfg["receivers"][0]["webhook_configs"] == [{"url": "http://bridge/alerts"}]
    assert source["receivers"][0]["webhook_configs"] == [{"url": PLACEHOLDER_WEBHOOK}]


def test_templates_resolve_where_alertmanager_runs() -> None:
    cfg, _ = render(SHIPPED, webhook_url=None, templates_dir="/etc/alertmanager")
    assert cfg["templates"] == ["/etc/alertmanager/templates/*.tmpl"]
    cfg, _ = render(SHIPPED, webhook_url=None)
    assert cfg["templates"] == SHIPPED["templates"]


@pytest.mark.parametrize("url", ["127.0.0.1:5001/alerts", "ftp://x/alerts", "hooks"])
def test_a_webhook_url_without_scheme_is_an_error(url: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(RenderError, match="AICRM_WEBHOOK_URL"):
        render(SHIPPED, webhook_url=url)
    source = tmp_path / "alertmanager.yml"
    shutil.copy(ALERTMANAGER_DIR / "alertmanager.yml", source)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AICRM_WEBHOOK_URL", url)
        code = alertmanager_config.main(
            ["--source", str(source), "--output", str(tmp_path / "out.yml")])
    assert code == 1
    assert "is not an http:// or https:// URL" in capsys.readouterr().err
    assert not (tmp_path / "out.yml").exists()


# --- a real Alertmanager --------------------------------------------------------------------


@pytest.fixture
def receiver() -> Iterator[servers.WebhookReceiver]:
    hook = servers.WebhookReceiver()
    try:
        yield hook
    finally:
        hook.close()


def _failed(am: servers.AlertmanagerServer) -> dict[str, float]:
    """Failed delivery attempts per integration. Every attempt counts at once in
    alertmanager_notification_requests_failed_total; alertmanager_notifications_failed_total
    (what AicrmAlertmanagerNotificationsFailing reads) only once retries are given up, a group
    interval later."""
    text = requests.get(am.url + "/metrics", timeout=10).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("alertmanager_notification_requests_failed_total{"):
            integration = line.split('integration="', 1)[1].split('"', 1)[0]
            out[integration] = out.get(integration, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


_PAGE = [{
    "labels": {"alertname": "AicrmExporterJobDown", "severity": "page", "job": "aicrm-exporter"},
    "annotations": {"summary": "s", "description": "d",
                    "dashboard_url": "http://localhost:3000/d/aicrm-stack",
                    "runbook_url": "docs/runbooks.md#aicrmexporterjobdown"},
}]


@pytest.mark.integration
def test_empty_secrets_deliver_to_the_webhook_without_failures(
    tmp_path: Path, receiver: servers.WebhookReceiver,
    alertmanager_factory: Callable[..., servers.AlertmanagerServer],
) -> None:
    """docs/deploy.md's .env (Slack and SMTP empty) plus AICRM_WEBHOOK_URL: the page reaches
    the webhook, and no integration fails (the shipped file would fail Slack on every page)."""
    secrets = _secrets(tmp_path, "", "")
    cfg, _ = render(SHIPPED, webhook_url=receiver.url, secrets_dir=secrets,
                    templates_dir=str(ALERTMANAGER_DIR))
    config = tmp_path / "rendered" / "alertmanager.yml"
    alertmanager_config.write(cfg, config)
    am = alertmanager_factory(config)
    requests.post(am.url + "/api/v2/alerts", json=_PAGE, timeout=10).raise_for_status()
    assert eventually(lambda: bool(receiver.notifications), 40, 0.2), "no notification arrived"
    assert receiver.notifications[0]["receiver"] == "page"
    # Alertmanager sends to every integration of a receiver at once; give a failing one time
    # to be counted.
    assert not eventually(lambda: sum(_failed(am).values()) > 0, 3, 0.2), _failed(am)


@pytest.mark.integration
def test_with_nothing_configured_nothing_fails(
    tmp_path: Path, alertmanager_factory: Callable[..., servers.AlertmanagerServer],
) -> None:
    """All three settings empty: alerts are held in Alertmanager, no notification fails."""
    cfg, _ = render(SHIPPED, webhook_url=None, secrets_dir=_secrets(tmp_path, "", ""),
                    templates_dir=str(ALERTMANAGER_DIR))
    config = tmp_path / "rendered" / "alertmanager.yml"
    alertmanager_config.write(cfg, config)
    am = alertmanager_factory(config)
    requests.post(am.url + "/api/v2/alerts", json=_PAGE, timeout=10).raise_for_status()
    assert eventually(lambda: len(am.alerts()) == 1, 10, 0.2)
    assert not eventually(lambda: sum(_failed(am).values()) > 0, 15, 0.5), _failed(am)
