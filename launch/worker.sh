#!/bin/bash
# mmbert_jax run control on one TPU worker: start | state | status [LINES] | logs [-f] [LINES] | stop|kill [WAIT]
#
# launch/tpu_pod.py copies this file to ~/mmbert_run/worker.sh on every worker and the run's settings beside it, to
# ~/mmbert_run/run.env: shell assignments with every value quoted (REMOTE_DIR, REMOTE_VENV, WORKDIR, ENVS, ARGS,
# DATA_BUCKET, DATA_MOUNT, GCSFUSE_CACHE_DIR, GCSFUSE_FLAGS, LOG_UPLOAD_SECONDS). This script is the same for every
# run; the settings file is all that differs.
#   start          mounts DATA_BUCKET (gcsfuse) and starts `env ENVS... PY ARGS...` detached (own session, no
#                  hangup) unless the run is already going; the training log is ~/mmbert_run/logs/worker-<i>.log,
#                  copied to WORKDIR/logs/ every LOG_UPLOAD_SECONDS and at the end; the exit status goes to
#                  ~/mmbert_run/exit_code
#   state          one line: MMBERT_STATE worker=<i> state=running|exited|lost|none[,stopped] code=<status>|- pid=<pid>
#   status [N]     the state line and the last N log lines
#   logs [-f] [N]  the last N log lines; -f follows the log
#   stop [WAIT]    SIGTERM (the run saves a checkpoint and exits 75), marks the run stopped, waits up to WAIT s
#   kill [WAIT]    SIGTERM, then SIGKILL after WAIT s (a process blocked in a collective)
set -uo pipefail
RUN_DIR=$HOME/mmbert_run
RUN_ENV=${MMBERT_RUN_ENV:-$RUN_DIR/run.env}
# state, status, logs, stop and kill work without the settings (a worker that never started a run).
if [ -f "$RUN_ENV" ]; then
  # shellcheck source=/dev/null
  . "$RUN_ENV"
fi
WORKER=$(curl -sf -m 5 -H 'Metadata-Flavor: Google' \
  http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number 2>/dev/null || hostname)
LOG=$RUN_DIR/logs/worker-$WORKER.log
mkdir -p "$RUN_DIR/logs"

# Whether pid $1 is alive and runs a command containing $2 (a pid file could name a recycled pid).
alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null && grep -qs "$2" "/proc/$1/cmdline"; }

# The training process of this run, if it is alive; sets PID.
running() {
  PID=$(cat "$RUN_DIR/pid" 2>/dev/null || true)
  alive "$PID" mmbert_jax.main
}

# The supervisor of this run, if it is alive: it is still copying the log up and writing the exit status.
supervising() { alive "$(cat "$RUN_DIR/supervisor" 2>/dev/null || true)" _supervise; }

# Bounded: a hung copy must not keep the supervisor from recording the exit status.
UPLOAD_TIMEOUT=300
upload_log() {
  timeout "$UPLOAD_TIMEOUT" gcloud storage cp "$LOG" "$WORKDIR/logs/worker-$WORKER.log" >/dev/null 2>&1 || true
}

mount_data() {
  [ -z "$DATA_BUCKET" ] && return 0
  mountpoint -q "$DATA_MOUNT" && return 0
  if ! command -v gcsfuse >/dev/null; then
    echo "installing gcsfuse"
    local key=/usr/share/keyrings/cloud.google.asc
    curl -fsS https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee "$key" >/dev/null
    echo "deb [signed-by=$key] https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -cs) main" \
      | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
    sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse || return 1
  fi
  sudo mkdir -p "$DATA_MOUNT" "$GCSFUSE_CACHE_DIR" || return 1
  sudo chown "$(id -u):$(id -g)" "$DATA_MOUNT" "$GCSFUSE_CACHE_DIR" || return 1
  gcsfuse "${GCSFUSE_FLAGS[@]}" "$DATA_BUCKET" "$DATA_MOUNT" || return 1
  echo "mounted gs://$DATA_BUCKET read-only at $DATA_MOUNT"
}

# The detached supervisor: runs training, copies the log up while it runs, records the exit status.
supervise() {
  echo $$ > "$RUN_DIR/supervisor"
  cd "$HOME/$REMOTE_DIR" || { echo 1 > "$RUN_DIR/exit_code"; return 1; }
  local py=$HOME/$REMOTE_VENV/bin/python
  echo "=== $(date -u +%FT%TZ) worker $WORKER: $py ${ARGS[*]}"
  env "${ENVS[@]}" "$py" "${ARGS[@]}" &
  local pid=$! rc=0
  echo "$pid" > "$RUN_DIR/pid"
  # Told to stop, the uploader ends between copies, never during one (bash runs the trap after a foreground
  # command, and at once during `wait`): a copy still running could otherwise land after the final one.
  ( trap 'kill "${nap:-}" 2>/dev/null; exit 0' TERM
    while kill -0 "$pid" 2>/dev/null; do sleep "$LOG_UPLOAD_SECONDS" & nap=$!; wait "$nap"; upload_log; done ) &
  local uploader=$!
  wait "$pid" || rc=$?
  kill "$uploader" 2>/dev/null
  wait "$uploader"
  echo "=== $(date -u +%FT%TZ) worker $WORKER: exit status $rc"
  upload_log
  # Last: `state` says exited only once the log with the exit status is in the workdir.
  echo "$rc" > "$RUN_DIR/exit_code.tmp" && mv "$RUN_DIR/exit_code.tmp" "$RUN_DIR/exit_code"
}

state() {
  local code=- s=none
  if running; then s=running
  elif [ -f "$RUN_DIR/exit_code" ]; then s=exited; code=$(cat "$RUN_DIR/exit_code")
  elif [ -f "$RUN_DIR/pid" ]; then
    # Started, but neither running nor finished: the supervisor is copying the log up and writing the status now
    # (wait for it; the copy is bounded), or the VM restarted.
    for _ in $(seq $((UPLOAD_TIMEOUT + 10))); do { [ -f "$RUN_DIR/exit_code" ] || ! supervising; } && break; sleep 1; done
    if [ -f "$RUN_DIR/exit_code" ]; then s=exited; code=$(cat "$RUN_DIR/exit_code"); else s=lost; fi
  fi
  [ -f "$RUN_DIR/stopped" ] && s=$s,stopped
  echo "MMBERT_STATE worker=$WORKER state=$s code=$code pid=${PID:--}"
}

case "${1:-}" in
  start)
    if [ ! -f "$RUN_ENV" ]; then
      echo "worker $WORKER: error: no run settings at $RUN_ENV (launch/tpu_pod.py copies them)"; exit 2
    fi
    if running; then echo "worker $WORKER: already running (pid $PID); not starting another"; exit 0; fi
    rm -f "$RUN_DIR/exit_code" "$RUN_DIR/stopped" "$RUN_DIR/pid" "$RUN_DIR/supervisor"
    if ! mount_data >> "$LOG" 2>&1; then
      echo "worker $WORKER: mounting gs://$DATA_BUCKET failed (see $LOG)"; echo 1 > "$RUN_DIR/exit_code"; exit 1
    fi
    setsid nohup bash "$0" _supervise >> "$LOG" 2>&1 < /dev/null &
    for _ in $(seq 50); do [ -s "$RUN_DIR/pid" ] && break; sleep 0.2; done
    echo "worker $WORKER: started pid $(cat "$RUN_DIR/pid" 2>/dev/null), log $LOG" ;;
  _supervise) supervise ;;
  state) state ;;
  status)
    state
    tail -n "${2:-5}" "$LOG" 2>/dev/null | sed "s/^/  [worker $WORKER] /" ;;
  logs)
    if [ "${2:-}" = -f ]; then exec tail -n "${3:-100}" -F "$LOG"; else tail -n "${2:-100}" "$LOG"; fi ;;
  stop|kill)
    # stop: SIGTERM (checkpoint, exit 75) and wait up to $2 s; kill: then SIGKILL a process that does not exit.
    if ! running; then state; exit 0; fi
    [ "$1" = stop ] && touch "$RUN_DIR/stopped"
    kill -TERM "$PID"
    for _ in $(seq "${2:-900}"); do running || break; sleep 1; done
    if [ "$1" = kill ] && running; then kill -KILL "$PID"; fi
    state ;;
  *) echo "usage: worker.sh start|status [LINES]|state|logs [-f] [LINES]|stop [WAIT]|kill [WAIT]" >&2; exit 2 ;;
esac
