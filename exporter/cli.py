"""``aicrm-exporter``: validate the config, then run until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence

from . import __version__
from .config import ConfigError, check_state_dir, default_config_path, load_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="aicrm-exporter",
        description="Turns task databases, JSONL event logs and pushed events into "
                    "Prometheus metrics.",
    )
    p.add_argument("--config", default=None,
                   help="config file (default: $AICRM_CONFIG, then ./config.json)")
    p.add_argument("--check-config", action="store_true",
                   help="validate the configuration and exit (0 when valid)")
    p.add_argument("--listen", default=None, help="override exporter.listen (host:port)")
    p.add_argument("--log-level", default="INFO",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    path = args.config or default_config_path()
    try:
        cfg = load_config(path)
        if args.listen:
            cfg = cfg.model_copy(update={
                "exporter": cfg.exporter.model_validate(
                    {**cfg.exporter.model_dump(), "listen": args.listen})})
    except ConfigError as exc:
        print(f"aicrm-exporter: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"aicrm-exporter: --listen: {exc}", file=sys.stderr)
        return 2
    # Checked here, not in load_config: the API and the simulator load the same file and
    # never use the state directory. Creates nothing, so --check-config has no side effect.
    problem = check_state_dir(cfg.exporter.state_dir)
    if problem is not None:
        if os.environ.get("AICRM_STATE_DIR"):
            problem += " (set by $AICRM_STATE_DIR)"
        print(f"aicrm-exporter: {ConfigError(str(path), [('exporter.state_dir', problem)])}",
              file=sys.stderr)
        return 2
    if args.check_config:
        print(f"{path}: ok")
        return 0

    from .runtime import Exporter

    try:
        exporter = Exporter(cfg)
    except ConfigError as exc:
        print(f"aicrm-exporter: {exc}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as exc:
        print(f"aicrm-exporter: cannot start: {exc}", file=sys.stderr)
        return 1
    done = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        logging.getLogger(__name__).info("signal %d: stopping", signum)
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    exporter.start()
    done.wait()
    exporter.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
