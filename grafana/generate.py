"""Write the dashboards' JSON into grafana/dashboards/ (or, with --check, compare).

    python -m grafana.generate           # regenerate
    python -m grafana.generate --check   # exit 1 if the committed JSON is out of date

Keys are sorted and indented so a change to the code reads as a small diff.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as model

from grafana.dashboards_src import (
    agents,
    executive,
    integrations,
    overview,
    stack,
    tasks,
    workflow,
)

OUTPUT_DIR = Path(__file__).resolve().parent / "dashboards"

DASHBOARDS: dict[str, Callable[[], model.Dashboard]] = {
    "overview": overview.build,
    "tasks": tasks.build,
    "agents": agents.build,
    "workflow": workflow.build,
    "integrations": integrations.build,
    "executive": executive.build,
    "stack": stack.build,
}
"""File name (without .json) -> the function that builds it."""


def render(build: Callable[[], model.Dashboard]) -> str:
    return JSONEncoder(sort_keys=True, indent=2, ensure_ascii=False).encode(build()) + "\n"


def rendered() -> dict[str, str]:
    """Every dashboard's JSON text, keyed by file name."""
    return {f"{name}.json": render(build) for name, build in DASHBOARDS.items()}


def stale(output_dir: Path = OUTPUT_DIR) -> list[str]:
    """Files that differ from what the code generates, are missing, or are left over."""
    expected = rendered()
    differ = [
        name
        for name, text in expected.items()
        if not (output_dir / name).exists()
        or (output_dir / name).read_text(encoding="utf-8") != text
    ]
    extra = [p.name for p in output_dir.glob("*.json") if p.name not in expected]
    return sorted(differ + extra)


def write(output_dir: Path = OUTPUT_DIR) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    expected = rendered()
    for path in output_dir.glob("*.json"):
        if path.name not in expected:
            path.unlink()
    for name, text in expected.items():
        (output_dir / name).write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grafana.generate", description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the JSON is out of date")
    parser.add_argument("--output-dir", type=Path, default=OUTPUT_DIR)
    args = parser.parse_args(argv)
    if args.check:
        bad = stale(args.output_dir)
        if bad:
            print(
                "out of date: " + ", ".join(bad) + " (run: python -m grafana.generate)",
                file=sys.stderr,
            )
            return 1
        return 0
    write(args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
