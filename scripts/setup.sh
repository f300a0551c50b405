#!/usr/bin/env bash
# Installs what the stack and its tests need on a Debian/Ubuntu machine: Debian packages for the
# real servers the tests run (Prometheus, Alertmanager, PostgreSQL, Redis, VictoriaMetrics, mtail,
# prometheus-sql-exporter, wrk), python3-venv, and a Python venv with the project in it.
# Idempotent, quiet and fast when everything is already there (CI runs it every time): nothing
# is installed unless something is missing. PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: %s\n' "$*" >&2; exit 1; }

DEB_PACKAGES=(python3 python3-venv prometheus prometheus-alertmanager postgresql redis-server
              victoria-metrics mtail prometheus-sql-exporter wrk)
BINARIES=(prometheus promtool prometheus-alertmanager amtool redis-server victoria-metrics
          vmalert mtail prometheus-sql-exporter wrk)
MIN_PYTHON=(3 11)
PY=${PYTHON:-python3}

python_ok() {  # interpreter: runs and is new enough
  "$1" -c "import sys; sys.exit(sys.version_info < (${MIN_PYTHON[0]}, ${MIN_PYTHON[1]}))" \
    >/dev/null 2>&1
}
check_python() {
  command -v "$PY" >/dev/null 2>&1 || die "no $PY on PATH; install Python >= 3.11 (or set PYTHON)"
  python_ok "$PY" || die "Python >= ${MIN_PYTHON[0]}.${MIN_PYTHON[1]} is needed; $PY is \
$("$PY" -c 'import platform; print(platform.python_version())' 2>/dev/null || echo unusable). \
Install a newer python3, or point PYTHON at one (PYTHON=/usr/bin/python3.12 make setup)"
}
# A venv is usable when its interpreter runs, is new enough and has pip. A failed
# `python3 -m venv` (no python3-venv) leaves .venv/bin/python without pip behind.
venv_ok() { [ -x .venv/bin/pip ] && python_ok .venv/bin/python && .venv/bin/python -c 'import pip' \
  >/dev/null 2>&1; }

# Python first, when it is there: a too old one cannot be fixed by the packages below.
if command -v "$PY" >/dev/null 2>&1; then check_python; fi

need_venv=0
venv_ok || need_venv=1

missing=()
for b in "${BINARIES[@]}"; do command -v "$b" >/dev/null 2>&1 || missing+=("$b"); done
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(initdb)
command -v "$PY" >/dev/null 2>&1 || missing+=("$PY")
# Debian's python3 has no ensurepip without python3-venv, and `python3 -m venv` then fails.
if ((need_venv)) && ! "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  missing+=(python3-venv)
fi

if ((${#missing[@]})); then
  if ! command -v apt-get >/dev/null 2>&1; then
    die "missing ${missing[*]} and no apt-get here; install: ${DEB_PACKAGES[*]}"
  fi
  SUDO=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 ||
      die "missing ${missing[*]}; installing needs root and there is no sudo. As root, run:
  apt-get update && apt-get install -y --no-install-recommends ${DEB_PACKAGES[*]}"
    SUDO=(sudo)
  fi
  say "installing Debian packages (missing: ${missing[*]})"
  "${SUDO[@]}" apt-get update -qq
  # env, not a variable assignment before sudo: sudo resets the environment.
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    --no-install-recommends "${DEB_PACKAGES[@]}" >/dev/null
  check_python
  # Debian starts the packages' services; the ones on the stack's ports stop `make run`.
  if command -v systemctl >/dev/null 2>&1; then
    active=()
    for unit in prometheus prometheus-alertmanager; do
      systemctl is-active --quiet "$unit" 2>/dev/null && active+=("$unit")
    done
    if ((${#active[@]})); then
      say "the Debian packages started ${active[*]} (ports 9090, 9093), which \`make run\` needs."
      say "if this machine does not need them: sudo systemctl disable --now ${active[*]}"
      say "or keep them and run the stack on other ports (AICRM_PROMETHEUS_PORT, AICRM_ALERTMANAGER_PORT)"
    fi
  fi
fi

if ((need_venv)); then
  if [ -e .venv ]; then say "recreating .venv (unusable: no working python or pip)"; else
    say "creating .venv"; fi
  "$PY" -m venv --clear .venv ||
    die "\`$PY -m venv .venv\` failed; on Debian/Ubuntu install python3-venv"
  venv_ok || die ".venv has no working pip after creating it; on Debian/Ubuntu install python3-venv"
fi
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [ ! -f "$stamp" ]; then
  say "installing Python packages into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  rm -f .venv/.installed-*; touch "$stamp"
fi
