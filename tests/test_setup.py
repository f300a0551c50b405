"""scripts/setup.sh: quiet and quick when everything is there; clear when it cannot proceed.

The install paths themselves need root and the network; these tests run the script's checks
with a restricted PATH and a copy of the script in a temporary directory.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from tests.servers import require_binary

ROOT = Path(__file__).resolve().parents[1]
SETUP_SH = ROOT / "scripts" / "setup.sh"


def _copy(tmp_path: Path) -> Path:
    """The script beside a pyproject.toml, as in the repository, without a .venv."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(SETUP_SH, tmp_path / "scripts" / "setup.sh")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path / "scripts" / "setup.sh"


def _bin(tmp_path: Path, tools: tuple[str, ...], scripts: dict[str, str]) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in tools:
        (bin_dir / tool).symlink_to(require_binary(tool))
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body + "\n")
        (bin_dir / name).chmod(0o755)
    return bin_dir


def test_setup_sh_does_nothing_when_everything_is_there() -> None:
    """`make test` (and CI) run it every time: the repository's .venv is already set up."""
    started = time.monotonic()
    result = subprocess.run([str(SETUP_SH)], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""
    assert time.monotonic() - started < 10


def test_setup_sh_rejects_an_old_python(tmp_path: Path) -> None:
    script = _copy(tmp_path)
    fake = tmp_path / "python3.10"
    fake.write_text("#!/bin/sh\n"
                    "case \"$*\" in *platform*) echo 3.10.12;; *) exit 1;; esac\n")
    fake.chmod(0o755)
    result = subprocess.run([str(script)], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHON": str(fake)}, timeout=60)
    assert result.returncode == 1
    assert "Python >= 3.11 is needed" in result.stderr and "3.10.12" in result.stderr
    assert "PYTHON=" in result.stderr
    assert not (tmp_path / ".venv").exists()


def test_setup_sh_without_root_or_sudo_says_what_to_run(tmp_path: Path) -> None:
    script = _copy(tmp_path)
    tools = ("bash", "dirname", "ls", "cat")
    bin_dir = _bin(tmp_path, tools, {"id": "echo 1000", "apt-get": "exit 99"})
    result = subprocess.run(
        ["bash", str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={"PATH": str(bin_dir), "PYTHON": "python3"},
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "installing needs root and there is no sudo" in result.stderr
    assert "apt-get install -y --no-install-recommends python3 python3-venv" in result.stderr
    assert "installing Debian packages" not in result.stdout


def test_make_bench_runs_the_documented_benchmarks() -> None:
    """Every command of `make bench` is one docs/benchmarks.md documents, and all of them."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\nbench: setup\n", 1)[1].split("\n\n", 1)[0]
    commands = [line.strip().replace("$(PY)", ".venv/bin/python")
                for line in recipe.splitlines() if line.startswith("\t")]
    documented = re.findall(r"^\| [^|]+ \| `(\.venv/bin/python bench/[^`]+)` \|",
                            (ROOT / "docs" / "benchmarks.md").read_text(), re.MULTILINE)
    assert documented
    assert {c.split(" [")[0] for c in documented} == set(commands)
    for command in commands:
        assert (ROOT / command.split()[1]).is_file(), command
