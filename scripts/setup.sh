#!/usr/bin/env bash
# Installs what the stack and its tests need on a Debian/Ubuntu machine: Debian packages for the
# real servers the tests run (Prometheus, Alertmanager, PostgreSQL, Redis, VictoriaMetrics, mtail,
# prometheus-sql-exporter, wrk) and a Python venv with the project in it. Idempotent and quiet when
# everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

DEB_PACKAGES=(prometheus prometheus-alertmanager postgresql redis-server victoria-metrics
              mtail prometheus-sql-exporter wrk)
BINARIES=(prometheus promtool prometheus-alertmanager amtool redis-server victoria-metrics
          vmalert mtail prometheus-sql-exporter wrk)

missing=()
for b in "${BINARIES[@]}"; do command -v "$b" >/dev/null 2>&1 || missing+=("$b"); done
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(initdb)
if ((${#missing[@]})); then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup: missing ${missing[*]} and no apt-get here; install: ${DEB_PACKAGES[*]}" >&2
    exit 1
  fi
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing Debian packages (missing: ${missing[*]})"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    "${DEB_PACKAGES[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [ ! -f "$stamp" ]; then
  echo "setup: installing Python packages into .venv"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  rm -f .venv/.installed-*; touch "$stamp"
fi
