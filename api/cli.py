"""``aicrm-api``: the API under gunicorn with api/gunicorn.conf.py.

gunicorn runs from its console script beside this interpreter, as the Dockerfile runs it: a
master started as ``python -m gunicorn`` re-executes itself on USR2 with gunicorn's package
directory first on its import path, where gunicorn's ``http`` package hides the standard
library's and the new master fails (``No module named 'http.server'``)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from exporter.config import ConfigError, default_config_path, load_config

CONF = Path(__file__).with_name("gunicorn.conf.py")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aicrm-api", description=__doc__)
    parser.add_argument("--config", default=default_config_path(),
                        help="config.json (default: $AICRM_CONFIG, then ./config.json)")
    parser.add_argument("--bind", help="host:port (default: $AICRM_API_BIND, then the "
                                       "config's api.listen)")
    parser.add_argument("--workers", type=int, help="worker processes (default 4)")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the configuration and exit")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.check_config:
        return 0
    env = dict(os.environ)
    env["AICRM_CONFIG"] = str(Path(args.config).resolve())
    env["AICRM_API_BIND"] = args.bind or env.get("AICRM_API_BIND") or cfg.api.listen
    if args.workers:
        env["AICRM_API_WORKERS"] = str(args.workers)
    # Not resolved: a virtualenv's python is a symlink, and its scripts sit beside the link.
    gunicorn = Path(sys.executable).parent / "gunicorn"
    if not os.access(gunicorn, os.X_OK):
        print(f"aicrm-api: no gunicorn console script at {gunicorn}: install gunicorn into "
              f"the environment of {sys.executable}", file=sys.stderr)
        return 2
    cmd = [str(gunicorn), "-c", str(CONF), "api:create_app()"]
    os.execve(cmd[0], cmd, env)
    return 0  # pragma: no cover - execve does not return


if __name__ == "__main__":
    raise SystemExit(main())
