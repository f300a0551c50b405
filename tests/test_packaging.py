"""Every third-party module the shipped packages import is a declared dependency.

A module that happens to be installed in the developer's venv (pulled in by something since
removed) imports fine here and fails on a clean machine; this test catches that before CI does.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCAL = {"exporter", "api", "grafana", "tests", "bench", "scripts"}


def _requirement_names(reqs: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}


def _imports(package: str) -> dict[str, str]:
    """Top-level module -> first file importing it, for absolute imports under `package`."""
    found: dict[str, str] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return found


def _undeclared(package: str, declared: set[str]) -> list[str]:
    dists = packages_distributions()
    problems = []
    for module, where in _imports(package).items():
        if module in LOCAL or module in sys.stdlib_module_names:
            continue
        owners = {d.lower().replace("_", "-") for d in dists.get(module, [])}
        if not owners:
            problems.append(f"{where}: imports {module!r}, not installed by any distribution")
        elif not owners & declared:
            problems.append(f"{where}: imports {module!r} from {sorted(owners)}, not declared")
    return problems


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_runtime_packages_import_only_runtime_dependencies() -> None:
    runtime = _requirement_names(_project()["dependencies"])
    problems = _undeclared("exporter", runtime) + _undeclared("api", runtime)
    assert not problems, "\n".join(problems)


def test_development_code_imports_only_declared_dependencies() -> None:
    project = _project()
    declared = _requirement_names(project["dependencies"] + project["optional-dependencies"]["dev"])
    problems = [p for pkg in ("grafana", "tests", "bench") for p in _undeclared(pkg, declared)]
    assert not problems, "\n".join(problems)


def test_the_check_sees_a_missing_declaration() -> None:
    # `limits` is used by api/ratelimit.py; without its declaration the check must complain.
    runtime = _requirement_names(_project()["dependencies"]) - {"limits"}
    assert any("'limits'" in p for p in _undeclared("api", runtime))
