"""Render alertmanager/alertmanager.yml for the place it runs, keeping only what can deliver.

The shipped file names every integration: Slack and e-mail read their secrets from files
(``slack_api_url_file``, ``smtp_auth_password_file``) and every receiver has a webhook at a
placeholder URL. Run as shipped, an Alertmanager whose secret file is missing or empty, or whose
webhook points at nothing, fails every notification (``unsupported protocol scheme ""``,
``connection refused``) while the alerts themselves look fine. The rendered copy keeps routes,
inhibitions and receiver names exactly as shipped and leaves out what is not configured:

- Slack only while its secret file exists and is not empty; e-mail likewise;
- the placeholder webhook becomes ``$AICRM_WEBHOOK_URL``, or is left out while that is unset.

Secret files are only checked for content; what they hold never reaches the output. One
implementation for both deployments: scripts/run.sh (through scripts/runlocal.py) and the
``alertmanager-config`` service of docker-compose.yml, which writes into the volume
Alertmanager reads::

    python -m exporter.alertmanager_config --source alertmanager/alertmanager.yml \\
        --output /run/alertmanager/alertmanager.yml [--templates-dir DIR] [--secrets-dir DIR]
"""

from __future__ import annotations

import argparse
import copy
import os
import posixpath
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# The webhook URL alertmanager/alertmanager.yml ships with; only hooks with this URL are
# rewritten, so a receiver with its own webhook (a dead man's switch, say) keeps it.
PLACEHOLDER_WEBHOOK = "http://127.0.0.1:5001/alerts"
WEBHOOK_ENV = "AICRM_WEBHOOK_URL"
HEADER = (
    "# Generated from alertmanager/alertmanager.yml by exporter.alertmanager_config "
    "(docs/deploy.md); edits are overwritten.\n"
)


@dataclass(frozen=True)
class Integration:
    name: str
    secret_key: str  # global key naming the secret file
    global_prefix: str  # global keys only this integration uses
    receiver_key: str
    env: str  # where the deployments take the secret from (for the notes)


INTEGRATIONS = (
    Integration("Slack", "slack_api_url_file", "slack_", "slack_configs",
                "AICRM_SLACK_WEBHOOK_URL"),
    Integration("e-mail", "smtp_auth_password_file", "smtp_", "email_configs",
                "AICRM_SMTP_PASSWORD"),
)


class RenderError(ValueError):
    """A setting the rendered configuration cannot be made from."""


def _usable(path: Path) -> str | None:
    """Why the secret file cannot be used, or None when it holds something."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    return None if text.strip() else "empty"


def render(
    source: Mapping[str, Any],
    *,
    webhook_url: str | None,
    templates_dir: str | None = None,
    secrets_dir: Path | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """The configuration to run and notes for the operator.

    ``templates_dir``: where relative template globs resolve where Alertmanager runs (they are
    made absolute, since the rendered file lives elsewhere). ``secrets_dir``: look the secret
    files up (and name them in the output) in this directory instead of where the source says.
    """
    cfg = copy.deepcopy(dict(source))
    glob = cfg.setdefault("global", {})
    receivers = cfg.get("receivers", [])
    notes = []

    if templates_dir is not None:
        cfg["templates"] = [
            t if posixpath.isabs(t) else posixpath.join(templates_dir, t)
            for t in cfg.get("templates", [])
        ]

    for integration in INTEGRATIONS:
        if integration.secret_key not in glob:
            continue
        secret = Path(glob[integration.secret_key])
        if secrets_dir is not None:
            secret = secrets_dir / secret.name
            glob[integration.secret_key] = str(secret)
        problem = _usable(secret)
        if problem is None:
            continue
        for key in list(glob):
            if key.startswith(integration.global_prefix):
                del glob[key]
        for receiver in receivers:
            receiver.pop(integration.receiver_key, None)
        notes.append(
            f"{integration.name} left out: {secret} is {problem} (set {integration.env})"
        )

    webhook = (webhook_url or "").strip()
    if webhook and not webhook.startswith(("http://", "https://")):
        raise RenderError(f"{WEBHOOK_ENV}={webhook!r} is not an http:// or https:// URL")
    for receiver in receivers:
        hooks = receiver.get("webhook_configs", [])
        kept = []
        for hook in hooks:
            if hook.get("url") == PLACEHOLDER_WEBHOOK:
                if not webhook:
                    continue
                hook["url"] = webhook
            kept.append(hook)
        if kept:
            receiver["webhook_configs"] = kept
        else:
            receiver.pop("webhook_configs", None)
    if not webhook:
        notes.append(f"webhooks left out: {WEBHOOK_ENV} is not set")

    silent = [r["name"] for r in receivers if not any(k.endswith("_configs") for k in r)]
    if silent:
        notes.append(
            f"receivers that notify no one (alerts routed there show only in Alertmanager's UI): "
            f"{', '.join(silent)}"
        )
    return cfg, notes


def write(cfg: Mapping[str, Any], output: Path) -> None:
    """Replace ``output`` atomically (Alertmanager may reload it at any time), mode 0644."""
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".alertmanager-", suffix=".yml", dir=output.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(HEADER + yaml.safe_dump(dict(cfg), sort_keys=False))
        os.chmod(tmp, 0o644)
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m exporter.alertmanager_config", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--source", type=Path, required=True, help="the shipped alertmanager.yml")
    parser.add_argument("--output", type=Path, required=True, help="where to write the result")
    parser.add_argument("--templates-dir", help="template directory where Alertmanager runs")
    parser.add_argument("--secrets-dir", type=Path, help="directory of the secret files")
    args = parser.parse_args(argv)
    try:
        source = yaml.safe_load(args.source.read_text(encoding="utf-8"))
        if not isinstance(source, dict):
            raise RenderError(f"{args.source}: not an Alertmanager configuration")
        cfg, notes = render(
            source,
            webhook_url=os.environ.get(WEBHOOK_ENV),
            templates_dir=args.templates_dir,
            secrets_dir=args.secrets_dir,
        )
        write(cfg, args.output)
    except (OSError, yaml.YAMLError, RenderError) as exc:
        print(f"alertmanager-config: {exc}", file=sys.stderr)
        return 1
    for note in notes:
        print(f"alertmanager-config: {note}", file=sys.stderr)
    print(f"alertmanager-config: wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
