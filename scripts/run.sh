#!/usr/bin/env bash
# shellcheck disable=SC2317  # stop_one, stop_all and on_exit run from traps
# Runs the whole stack on this machine, without Docker, on the embedded defaults: the workload
# simulator writing SQLite and JSONL files under ./data, the exporter, Prometheus with the
# project's rules, Alertmanager and the API under gunicorn. Prints the URLs and a one-line
# status, keeps running, and stops everything on Ctrl-C or SIGTERM.
#
# With AICRM_RUN_PROFILE=scale it runs docker-compose.yml's `scale` profile instead: Prometheus
# (prometheus/prometheus.scale.yml) scrapes and remote-writes everything to VictoriaMetrics and
# evaluates only recording_rules/scale/ (vmalert or VictoriaMetrics failing); vmalert evaluates the
# other rule files against VictoriaMetrics, writes the results back there and notifies
# Alertmanager; the API queries VictoriaMetrics, which passes /api/v1/alerts and /api/v1/rules
# on to vmalert (docs/scaling.md).
#
# `make run` runs scripts/setup.sh first (Debian packages, .venv). Environment:
#   AICRM_RUN_PROFILE        unset or empty: the stack above; scale: with VictoriaMetrics and
#                            vmalert (needs victoria-metrics and vmalert, Debian's victoria-metrics)
#   AICRM_DATA_DIR           data, logs, generated configs and secrets (default ./data)
#   AICRM_EXPORTER_PORT      9464     AICRM_API_PORT           5000
#   AICRM_PROMETHEUS_PORT    9090     AICRM_ALERTMANAGER_PORT  9093
#   AICRM_VICTORIAMETRICS_PORT 8428   AICRM_VMALERT_PORT       8880   (scale only)
#   AICRM_VM_ARGS, AICRM_VMALERT_ARGS   more victoria-metrics and vmalert options (scale only),
#                            e.g. -search.latencyOffset=0s and -remoteWrite.flushInterval=1s:
#                            samples queryable at once (not after 30s), results written every 1s
#   AICRM_SCRAPE_INTERVAL    Prometheus scrape interval (default: the prometheus/*.yml file's)
#   AICRM_RULE_INTERVAL      evaluate every rule group at this interval (default: the files';
#                            vmalert's -evaluationInterval: this, else 30s as in compose)
#   AICRM_SIM_RATE           simulated tasks per second (2); AICRM_SIM_ARGS: more options
#   AICRM_STATUS_SECONDS     print the status line this often (60; 0: only at start)
#   AICRM_INGEST_TOKEN, AICRM_API_KEYS   generated into $AICRM_DATA_DIR/run/secrets.env if unset
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

say() { printf 'run: %s\n' "$*"; }
die() { printf 'run: %s\n' "$*" >&2; exit 1; }

# --- profile: checked before anything is installed, written or started ---------------------
PROFILE=${AICRM_RUN_PROFILE:-}
case $PROFILE in
  '' | scale) ;;
  *) die "AICRM_RUN_PROFILE='$PROFILE' is not a run profile: set it to scale (VictoriaMetrics \
and vmalert, as docker-compose.yml's scale profile), or leave it unset or empty for the default \
stack" ;;
esac
export AICRM_RUN_PROFILE=$PROFILE

# --- platform -----------------------------------------------------------------------------
is_debian() {
  command -v apt-get >/dev/null 2>&1 && [ -r /etc/os-release ] &&
    grep -qiE '^(ID|ID_LIKE)=.*(debian|ubuntu)' /etc/os-release
}
AM_BIN=$(command -v prometheus-alertmanager || command -v alertmanager || true)
missing=()
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
[ -n "$AM_BIN" ] || missing+=(alertmanager)
if [ "$PROFILE" = scale ]; then
  command -v victoria-metrics >/dev/null 2>&1 || missing+=(victoria-metrics)
  command -v vmalert >/dev/null 2>&1 || missing+=(vmalert)
fi
[ -x .venv/bin/aicrm-exporter ] || missing+=(".venv (Python venv with the project)")
if ((${#missing[@]})); then
  if is_debian; then
    say "missing: ${missing[*]}; installing with scripts/setup.sh"
    scripts/setup.sh
    AM_BIN=$(command -v prometheus-alertmanager || command -v alertmanager || true)
  else
    vm_line='' compose='docker compose --profile demo up'
    if [ "$PROFILE" = scale ]; then
      vm_line="  - VictoriaMetrics >= 1.79 ('victoria-metrics' and 'vmalert' on PATH)
      https://github.com/VictoriaMetrics/VictoriaMetrics/releases
"
      compose='PROMETHEUS_CONFIG=prometheus.scale.yml AICRM_QUERY_URL=http://victoriametrics:8428 docker compose --profile demo --profile scale up'
    fi
    cat >&2 <<EOF
run: missing: ${missing[*]}
run: this script runs the stack from Debian/Ubuntu packages. On this system install:
  - Prometheus >= 2.42 ('prometheus' on PATH)      https://prometheus.io/download/
  - Alertmanager >= 0.25 ('alertmanager' on PATH)  https://prometheus.io/download/
${vm_line}  - Python >= 3.11, then: python3 -m venv .venv && .venv/bin/pip install -e .
run: or run it in containers instead: $compose (docs/deploy.md)
EOF
    exit 1
  fi
fi
PY=.venv/bin/python
HELPER=(env PYTHONPATH="$ROOT" "$PY" scripts/runlocal.py)

# --- layout and settings ------------------------------------------------------------------
DATA_DIR=$(realpath -m "${AICRM_DATA_DIR:-$ROOT/data}")
RUN_DIR=$DATA_DIR/run
LOG_DIR=$DATA_DIR/logs
export AICRM_DATA_DIR=$DATA_DIR
export AICRM_EXPORTER_PORT=${AICRM_EXPORTER_PORT:-9464}
export AICRM_API_PORT=${AICRM_API_PORT:-5000}
export AICRM_PROMETHEUS_PORT=${AICRM_PROMETHEUS_PORT:-9090}
export AICRM_ALERTMANAGER_PORT=${AICRM_ALERTMANAGER_PORT:-9093}
if [ "$PROFILE" = scale ]; then
  export AICRM_VICTORIAMETRICS_PORT=${AICRM_VICTORIAMETRICS_PORT:-8428}
  export AICRM_VMALERT_PORT=${AICRM_VMALERT_PORT:-8880}
fi
SIM_RATE=${AICRM_SIM_RATE:-2}
STATUS_SECONDS=${AICRM_STATUS_SECONDS:-60}
mkdir -p "$RUN_DIR/pids" "$LOG_DIR" "$DATA_DIR/events" "$DATA_DIR/state" "$DATA_DIR/simulator" \
         "$DATA_DIR/prometheus" "$DATA_DIR/alertmanager"
if [ "$PROFILE" = scale ]; then mkdir -p "$DATA_DIR/victoriametrics"; fi
rm -f "$RUN_DIR"/pids/*.pid

# The API is optional until its package is installed: api:create_app() must import.
export AICRM_RUN_API=0
if "$PY" -c 'import sys, api; sys.exit(not callable(getattr(api, "create_app", None)))' \
    >/dev/null 2>&1 && [ -x .venv/bin/gunicorn ]; then
  AICRM_RUN_API=1
fi

# --- secrets: random, 0600, never printed -------------------------------------------------
SECRETS=$RUN_DIR/secrets.env
if [ -z "${AICRM_INGEST_TOKEN:-}" ] || [ -z "${AICRM_API_KEYS:-}" ]; then
  if [ ! -s "$SECRETS" ]; then
    (umask 077
     printf 'AICRM_INGEST_TOKEN=%s\nAICRM_API_KEYS=%s\n' \
       "$("${HELPER[@]}" token)" "$("${HELPER[@]}" token)" >"$SECRETS")
    say "generated the ingest token and an API key into $SECRETS (mode 0600)"
  fi
  chmod 600 "$SECRETS"
  [ -n "${AICRM_INGEST_TOKEN:-}" ] ||
    AICRM_INGEST_TOKEN=$(sed -n 's/^AICRM_INGEST_TOKEN=//p' "$SECRETS")
  [ -n "${AICRM_API_KEYS:-}" ] || AICRM_API_KEYS=$(sed -n 's/^AICRM_API_KEYS=//p' "$SECRETS")
fi
export AICRM_INGEST_TOKEN AICRM_API_KEYS

# --- configuration ------------------------------------------------------------------------
ports=(exporter prometheus alertmanager)
[ "$AICRM_RUN_API" = 1 ] && ports+=(api)
[ "$PROFILE" = scale ] && ports+=(victoriametrics vmalert)
"${HELPER[@]}" ports "${ports[@]}" || exit 1
"${HELPER[@]}" generate || exit 1
CONFIG=$RUN_DIR/config.json
export AICRM_CONFIG=$CONFIG
.venv/bin/aicrm-exporter --config "$CONFIG" --check-config >/dev/null || exit 1
promtool check config "$RUN_DIR/prometheus.yml" >"$LOG_DIR/promtool.log" 2>&1 ||
  die "generated $RUN_DIR/prometheus.yml is invalid; see $LOG_DIR/promtool.log"
VMALERT_RULES=()
if [ "$PROFILE" = scale ]; then
  # The rule files Prometheus would evaluate (copies with AICRM_RULE_INTERVAL), for vmalert.
  rule_files=$("${HELPER[@]}" rules) || exit 1
  while IFS= read -r rule; do VMALERT_RULES+=("-rule=$rule"); done <<<"$rule_files"
  vmalert -dryRun "${VMALERT_RULES[@]}" >"$LOG_DIR/vmalert-check.log" 2>&1 ||
    die "vmalert does not accept the rule files; see $LOG_DIR/vmalert-check.log"
fi

# --- processes ----------------------------------------------------------------------------
# Each component runs in its own session (process group), so Ctrl-C reaches only this script,
# which stops them in order, and a stop signal to the group also reaches gunicorn's workers.
declare -A PIDS=()
ORDER=()
STOPPING=0
RC=0

running() {  # pid: alive and not a zombie waiting to be reaped
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [ "${stat%% *}" != Z ]
}

start() {
  local name=$1; shift
  setsid "$@" >>"$LOG_DIR/$name.log" 2>&1 </dev/null &
  PIDS[$name]=$!
  ORDER+=("$name")
  echo "${PIDS[$name]}" >"$RUN_DIR/pids/$name.pid"
}

stop_one() {
  local name=$1 pid=${PIDS[$1]} i
  if running "$pid"; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do
      running "$pid" || break
      sleep 0.1
    done
    if running "$pid"; then say "$name did not stop within 15s: killing it"; fi
  fi
  # Whatever is left in its group (workers, helpers) goes too.
  kill -KILL -- "-$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  rm -f "$RUN_DIR/pids/$name.pid"
}

stop_all() {  # the simulator first (it cancels its open tasks), then the reverse start order
  local i
  [ -n "${PIDS[simulator]:-}" ] && stop_one simulator
  for ((i = ${#ORDER[@]} - 1; i >= 0; i--)); do
    [ "${ORDER[i]}" = simulator ] || stop_one "${ORDER[i]}"
  done
  ORDER=()
}

on_exit() {
  local rc=$?
  trap - EXIT INT TERM
  if ((${#ORDER[@]})); then
    say "stopping ${ORDER[*]}"
    stop_all
    say "stopped; logs in $LOG_DIR"
  fi
  exit "$rc"
}
trap on_exit EXIT
trap 'STOPPING=1' INT TERM

ready() {  # name url [timeout]
  "${HELPER[@]}" wait "$1" "$2" "${PIDS[$1]}" "$LOG_DIR/$1.log" "${3:-60}" || exit 1
  if [ "$STOPPING" = 1 ]; then exit 0; fi
}

E=http://127.0.0.1:$AICRM_EXPORTER_PORT
P=http://127.0.0.1:$AICRM_PROMETHEUS_PORT
A=http://127.0.0.1:$AICRM_ALERTMANAGER_PORT
API=http://127.0.0.1:$AICRM_API_PORT
VM=http://127.0.0.1:${AICRM_VICTORIAMETRICS_PORT:-8428}
VMA=http://127.0.0.1:${AICRM_VMALERT_PORT:-8880}

say "data in $DATA_DIR, logs in $LOG_DIR"
# The simulator first: it creates the tasks table the exporter reads.
# The *_ARGS variables are options separated by blanks, split without glob expansion.
read -r -a SIM_ARGS <<<"${AICRM_SIM_ARGS:-}"
read -r -a VM_ARGS <<<"${AICRM_VM_ARGS:-}"
read -r -a VMALERT_ARGS <<<"${AICRM_VMALERT_ARGS:-}"
start simulator .venv/bin/aicrm-simulate --config "$CONFIG" --rate "$SIM_RATE" \
  --control "$DATA_DIR/simulator/incidents" "${SIM_ARGS[@]}"
start exporter .venv/bin/aicrm-exporter --config "$CONFIG" --listen "127.0.0.1:$AICRM_EXPORTER_PORT"
ready exporter "$E/healthz"
start alertmanager "$AM_BIN" --config.file="$RUN_DIR/alertmanager.yml" \
  --storage.path="$DATA_DIR/alertmanager" --web.listen-address="127.0.0.1:$AICRM_ALERTMANAGER_PORT" \
  --cluster.listen-address=
ready alertmanager "$A/-/ready"
if [ "$PROFILE" = scale ]; then
  # VictoriaMetrics before Prometheus writes to it and vmalert reads it; vmalert after
  # Alertmanager, which it notifies. Retention: docker-compose.yml's default (VM_RETENTION).
  start victoriametrics victoria-metrics -storageDataPath="$DATA_DIR/victoriametrics" \
    -retentionPeriod=90d -httpListenAddr="127.0.0.1:$AICRM_VICTORIAMETRICS_PORT" \
    -vmalert.proxyURL="$VMA" "${VM_ARGS[@]}"
  ready victoriametrics "$VM/health"
  start vmalert vmalert "${VMALERT_RULES[@]}" -datasource.url="$VM" -remoteWrite.url="$VM" \
    -remoteRead.url="$VM" -notifier.url="$A" -evaluationInterval="${AICRM_RULE_INTERVAL:-30s}" \
    -httpListenAddr="127.0.0.1:$AICRM_VMALERT_PORT" "${VMALERT_ARGS[@]}"
  ready vmalert "$VMA/-/healthy"
fi
start prometheus prometheus --config.file="$RUN_DIR/prometheus.yml" \
  --storage.tsdb.path="$DATA_DIR/prometheus" --web.listen-address="127.0.0.1:$AICRM_PROMETHEUS_PORT" \
  --web.enable-lifecycle
ready prometheus "$P/-/ready"
if [ "$AICRM_RUN_API" = 1 ]; then
  gconf=()
  [ -f api/gunicorn.conf.py ] && gconf=(-c api/gunicorn.conf.py)
  # gunicorn workers share request metrics through this directory; stale files would add up.
  export PROMETHEUS_MULTIPROC_DIR=$RUN_DIR/api-metrics
  rm -rf "$PROMETHEUS_MULTIPROC_DIR" && mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
  start api .venv/bin/gunicorn "${gconf[@]}" --bind "127.0.0.1:$AICRM_API_PORT" \
    --chdir "$ROOT" 'api:create_app()'
  ready api "$API/healthz"
fi
# The simulator has no port: it is healthy while it runs.
running "${PIDS[simulator]}" ||
  die "simulator exited; last lines of $LOG_DIR/simulator.log:
$(tail -n 25 "$LOG_DIR/simulator.log")"

# Let Prometheus scrape every target once, so the first status line means something.
"${HELPER[@]}" targets 30 || true

cat <<EOF

  exporter      $E/metrics    (push: POST $E/v1/events, token in $SECRETS)
  prometheus    $P
  alertmanager  $A
EOF
if [ "$PROFILE" = scale ]; then
  cat <<EOF
  victoriametrics $VM   (Prometheus writes here, the API queries it)
  vmalert       $VMA   (evaluates the rules, writes to victoriametrics)
EOF
fi
if [ "$AICRM_RUN_API" = 1 ]; then
  echo "  api           $API/executive-dashboard   (key in $SECRETS)"
else
  echo "  api           not started: the api package (api:create_app) is not installed yet"
fi
cat <<EOF
  incidents     echo agent-degraded >> $DATA_DIR/simulator/incidents   (docs/simulator.md)

EOF
"${HELPER[@]}" status
say "running; Ctrl-C stops everything"

# --- supervise ----------------------------------------------------------------------------
ticks=0
while [ "$STOPPING" = 0 ]; do
  sleep 1 &
  wait $! 2>/dev/null || true
  for name in "${ORDER[@]}"; do
    pid=${PIDS[$name]}
    if ! running "$pid"; then
      [ "$STOPPING" = 1 ] && break
      printf 'run: %s exited; last lines of %s:\n' "$name" "$LOG_DIR/$name.log" >&2
      tail -n 25 "$LOG_DIR/$name.log" | sed 's/^/    /' >&2
      RC=1
      STOPPING=1
      break
    fi
  done
  ticks=$((ticks + 1))
  if [ "$STOPPING" = 0 ] && [ "$STATUS_SECONDS" -gt 0 ] && ((ticks % STATUS_SECONDS == 0)); then
    "${HELPER[@]}" status || true
  fi
done
exit "$RC"
