"""``python -m exporter.gendocs``: regenerate docs/metrics.md from the catalog."""

from __future__ import annotations

import sys
from pathlib import Path

from .catalog import markdown

ROOT = Path(__file__).resolve().parent.parent


def metrics_doc() -> str:
    return (ROOT / "docs" / "metrics.head.md").read_text() + markdown()


def main() -> int:
    (ROOT / "docs" / "metrics.md").write_text(metrics_doc())
    print("docs/metrics.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
