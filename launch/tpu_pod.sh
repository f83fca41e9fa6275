#!/usr/bin/env bash
# Pretrain mmbert_jax on a Cloud TPU VM slice, detached from this machine, and keep it running through preemptions.
#
# Usage: WORKDIR=gs://BUCKET/RUN [VAR=value ...] launch/tpu_pod.sh [start] [--dry-run] [--once] [-- MAIN_FLAGS...]
#        TPU_NAME=... ZONE=... launch/tpu_pod.sh status | logs [-f] [WORKER] | stop [--dry-run]
#
# start (the default):
# 1. Requests the slice as a queued resource (gcloud compute tpus queued-resources create) and waits until ACTIVE.
# 2. Installs the project on every worker (--worker=all): the local checkout is copied (INSTALL=copy) or GIT_URL is
#    cloned (INSTALL=git), then pip installs it with jax[tpu]==JAX_VERSION into a venv, so all hosts run identical
#    jax/libtpu versions. A small control script, ~/mmbert_run/worker.sh, is copied along; it holds the run command.
# 3. Starts the same command on every worker (a multi-host job hangs when only some hosts start it) as a detached
#    process (setsid nohup: no terminal, immune to the ssh session ending), so the run survives this machine
#    sleeping or disconnecting:
#      MMBERT_DISTRIBUTED=1 python -m mmbert_jax.main --config=$CONFIG --workdir=$WORKDIR [MAIN_FLAGS]
#    jax.distributed.initialize() then finds the coordinator, process count and ids in the TPU metadata; the
#    coordinator port is pinned with JAX_COORDINATOR_PORT. A worker already running the command is left alone: a
#    rerun of this script attaches to the run instead of starting a second one.
#    Logs: each worker writes ~/mmbert_run/logs/worker-<i>.log on its own disk and copies it to
#    $WORKDIR/logs/worker-<i>.log every LOG_UPLOAD_SECONDS and when the run ends (GCS has no append).
# 4. Watches: polls the queued resource and every worker's state. The run's exit status says how it ended (see
#    README: 0 complete, 1 failed, 2 bad input, 75 preempted). Preempted (75 on every worker, or the slice no longer
#    ACTIVE: SUSPENDING/SUSPENDED/FAILED/gone) relaunches: the queued resource is recreated when needed, the code
#    reinstalled and the same command started again, which resumes from the last checkpoint in WORKDIR. Any other
#    status (a failure or bad input), and a run ended by `stop`, is not restarted: the script exits with it.
#    Stopping this script (Ctrl-C, closing the laptop) leaves the run going; run `start` again to watch it again.
#
# With DATA_BUCKET set, every worker mounts that bucket read-only with gcsfuse at DATA_MOUNT (installing gcsfuse
# from Google's apt repository when missing) and the run reads --config.data.data_dir=$DATA_MOUNT[/dir].
#
# Commands:
#   start       launch or attach (above)
#   status      the queued resource's state, then per worker: running (pid), exited (exit status), stopped or
#               not started, and the last STATUS_LINES log lines
#   logs [-f] [WORKER]  the last LOG_LINES lines of worker WORKER's log [0]; -f follows it (Ctrl-C to leave)
#   stop        SIGTERM to the training process on every worker: each saves a checkpoint and exits 75; waits up to
#               STOP_WAIT_SECONDS for them. A stopped run is not restarted; `start` resumes it.
# Options:
#   --dry-run   print the gcloud commands instead of running them (nothing is created). The queued-resource states
#               and run exit codes it pretends to see come from DRY_RUN_STATES (default "MISSING ACTIVE") and
#               DRY_RUN_EXIT_CODES (default "0"), e.g. DRY_RUN_STATES="MISSING ACTIVE SUSPENDED MISSING ACTIVE"
#               DRY_RUN_EXIT_CODES="255 0" shows a preemption and the relaunch.
#   --once      no restarts: exit with the run's status.
#   --help      this text.
#   -- FLAGS    passed on to mmbert_jax.main, e.g. -- --config.train_tokens=1000000000 --config.log_every_steps=50
#
# Variables (environment; default in brackets):
#   WORKDIR           gs:// directory shared by all hosts for checkpoints and logs (required by start)
#   CONFIG            config file, optionally with :variant [configs/pretrain.py]
#   DATA_BUCKET       gs://BUCKET[/DIR] holding the prepared data: mounted with gcsfuse on every worker [unset]
#   DATA_MOUNT        mount point of DATA_BUCKET on every worker [/mnt/mmbert-data]
#   GCSFUSE_CACHE_DIR local directory for gcsfuse's file cache [/tmp/gcsfuse-cache]
#   GCSFUSE_CACHE_MB  file cache size in MiB on each worker's boot disk; 0: no file cache [20480]
#   PROJECT           GCP project [gcloud's default project]
#   ZONE              zone with capacity for ACCELERATOR_TYPE [us-central2-b]
#   TPU_NAME          TPU VM (node) name [mmbert-pod]
#   QR_NAME           queued-resource id [$TPU_NAME-qr]
#   ACCELERATOR_TYPE  slice type, e.g. v4-32, v5litepod-64, v5p-64, v6e-64 [v4-32]
#   RUNTIME_VERSION   TPU software version: tpu-ubuntu2204-base (v4), v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv5
#                     (v5p), v2-alpha-tpuv6e (v6e) [tpu-ubuntu2204-base]
#   CAPACITY          spot | reserved | on-demand [spot]
#   INSTALL           copy (this checkout: tracked and untracked, non-ignored files) | git [copy]
#   GIT_URL, GIT_REF  repository to clone and commit/branch/tag to check out for INSTALL=git [-, main]
#   JAX_VERSION       jax[tpu] version, must match setup.py [0.10.2]
#   PYTHON            interpreter on the workers, >= 3.11; apt-installed when missing [python3.11]
#   REMOTE_DIR        code directory under $HOME on every worker [mmbert_jax]
#   REMOTE_VENV       virtualenv under $HOME on every worker [mmbert_venv]
#   COORDINATOR_PORT  jax.distributed coordinator port (JAX_COORDINATOR_PORT) [8476]
#   LIBTPU_INIT_ARGS  XLA/libtpu flags for the run, e.g. --xla_tpu_scoped_vmem_limit_kib=98304 [unset]
#   LOG_UPLOAD_SECONDS  how often each worker copies its log to $WORKDIR/logs [300]
#   POLL_SECONDS      seconds between state checks [60]
#   HANG_SECONDS      a worker still running this long after another one exited is stopped (SIGTERM, then
#                     SIGKILL): it is blocked in a collective [900]
#   MAX_RESTARTS      preemption restarts before giving up [100]
#   STOP_WAIT_SECONDS how long `stop` waits for the checkpoint and exit [900]
#   STATUS_LINES, LOG_LINES  log lines shown by status and logs [5, 100]
#   DELETE_WHEN_DONE  1: delete the queued resource after a successful run [0]
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=${REPO_DIR:-$(dirname "$SCRIPT_DIR")}

WORKDIR=${WORKDIR:-}
CONFIG=${CONFIG:-configs/pretrain.py}
DATA_BUCKET=${DATA_BUCKET:-}
DATA_MOUNT=${DATA_MOUNT:-/mnt/mmbert-data}
GCSFUSE_CACHE_DIR=${GCSFUSE_CACHE_DIR:-/tmp/gcsfuse-cache}
GCSFUSE_CACHE_MB=${GCSFUSE_CACHE_MB:-20480}
PROJECT=${PROJECT:-}
ZONE=${ZONE:-us-central2-b}
TPU_NAME=${TPU_NAME:-mmbert-pod}
QR_NAME=${QR_NAME:-${TPU_NAME}-qr}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-32}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
CAPACITY=${CAPACITY:-spot}
INSTALL=${INSTALL:-copy}
GIT_URL=${GIT_URL:-}
GIT_REF=${GIT_REF:-main}
JAX_VERSION=${JAX_VERSION:-0.10.2}
PYTHON=${PYTHON:-python3.11}
REMOTE_DIR=${REMOTE_DIR:-mmbert_jax}
REMOTE_VENV=${REMOTE_VENV:-mmbert_venv}
COORDINATOR_PORT=${COORDINATOR_PORT:-8476}
LIBTPU_INIT_ARGS=${LIBTPU_INIT_ARGS:-}
LOG_UPLOAD_SECONDS=${LOG_UPLOAD_SECONDS:-300}
POLL_SECONDS=${POLL_SECONDS:-60}
HANG_SECONDS=${HANG_SECONDS:-900}
MAX_RESTARTS=${MAX_RESTARTS:-100}
STOP_WAIT_SECONDS=${STOP_WAIT_SECONDS:-900}
STATUS_LINES=${STATUS_LINES:-5}
LOG_LINES=${LOG_LINES:-100}
DELETE_WHEN_DONE=${DELETE_WHEN_DONE:-0}

# The worker-side control script lives here on every worker (relative to the ssh user's home).
WORKER_SCRIPT='~/mmbert_run/worker.sh'

COMMAND=start
DRY_RUN=0
ONCE=0
FOLLOW=0
LOG_WORKER=0
MAIN_FLAGS=()

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }
die() { echo "tpu_pod.sh: $*" >&2; exit 2; }
log() { echo "[tpu_pod $(date +%H:%M:%S)] $*" >&2; }

case "${1:-}" in
  start|status|logs|stop) COMMAND=$1; shift ;;
esac
while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --once) [[ $COMMAND == start ]] || die "--once only goes with start"; ONCE=1 ;;
    -f) [[ $COMMAND == logs ]] || die "-f only goes with logs"; FOLLOW=1 ;;
    -h|--help) usage; exit 0 ;;
    --) [[ $COMMAND == start ]] || die "flags for mmbert_jax.main (after --) only go with start"
        shift; MAIN_FLAGS=("$@"); break ;;
    [0-9]*) [[ $COMMAND == logs && $1 =~ ^[0-9]+$ ]] || die "unknown argument '$1' (see --help)"; LOG_WORKER=$1 ;;
    *) die "unknown argument '$1' (flags for mmbert_jax.main go after --; see --help)" ;;
  esac
  shift
done

# --- Checks ------------------------------------------------------------------------------------------------------
for n in POLL_SECONDS MAX_RESTARTS COORDINATOR_PORT LOG_UPLOAD_SECONDS HANG_SECONDS STOP_WAIT_SECONDS STATUS_LINES \
         LOG_LINES GCSFUSE_CACHE_MB; do
  [[ ${!n} =~ ^[0-9]+$ ]] || die "$n must be a non-negative integer, got '${!n}'"
done
if [[ $COMMAND == start ]]; then
  [[ -n $WORKDIR ]] || die "set WORKDIR to a gs:// directory for checkpoints and logs (e.g. WORKDIR=gs://my-bucket/mmbert-base)"
  [[ $WORKDIR == gs://* ]] || die "WORKDIR must be a gs:// path that every host can read and write, got '$WORKDIR'"
  case "$CAPACITY" in
    spot) CAPACITY_FLAGS=(--spot) ;;
    reserved) CAPACITY_FLAGS=(--reserved) ;;
    on-demand) CAPACITY_FLAGS=() ;;
    *) die "CAPACITY must be spot, reserved or on-demand, got '$CAPACITY'" ;;
  esac
  case "$INSTALL" in
    copy)
      [[ -f $REPO_DIR/setup.py ]] || die "INSTALL=copy needs the project checkout at REPO_DIR=$REPO_DIR (no setup.py there)"
      git -C "$REPO_DIR" rev-parse --git-dir >/dev/null 2>&1 \
        || die "INSTALL=copy bundles the files git knows of, but REPO_DIR=$REPO_DIR is not a git checkout; use INSTALL=git" ;;
    git) [[ -n $GIT_URL ]] || die "INSTALL=git needs GIT_URL (e.g. GIT_URL=https://github.com/ORG/mmbert_jax.git)" ;;
    *) die "INSTALL must be copy or git, got '$INSTALL'" ;;
  esac
  DATA_DIR=""
  if [[ -n $DATA_BUCKET ]]; then
    [[ $DATA_BUCKET =~ ^(gs://)?([a-z0-9][a-z0-9._-]*)(/(.*[^/])?)?/*$ ]] \
      || die "DATA_BUCKET must be gs://BUCKET or gs://BUCKET/DIR (a lower-case bucket name), got '$DATA_BUCKET'"
    DATA_BUCKET_NAME=${BASH_REMATCH[2]}
    DATA_DIR=$DATA_MOUNT${BASH_REMATCH[3]:+/${BASH_REMATCH[4]}}
    [[ $DATA_MOUNT == /* ]] || die "DATA_MOUNT must be an absolute path, got '$DATA_MOUNT'"
    for a in "${MAIN_FLAGS[@]}"; do
      [[ $a != --config.data.data_dir=* ]] \
        || die "DATA_BUCKET sets --config.data.data_dir=$DATA_DIR (the gcsfuse mount); do not pass $a as well"
    done
  fi
fi
if ((!DRY_RUN)); then
  command -v gcloud >/dev/null || die "gcloud not found; install the Google Cloud CLI (https://cloud.google.com/sdk)"
fi

GFLAGS=(--zone="$ZONE")
[[ -n $PROJECT ]] && GFLAGS+=(--project="$PROJECT")

# --- Helpers -----------------------------------------------------------------------------------------------------
# Prints a command in copy-pasteable form.
show() {
  local a out=()
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=@,+%^-]+$ ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}

run() { if ((DRY_RUN)); then show "$@"; else "$@"; fi; }

pause() { ((DRY_RUN)) || sleep "$POLL_SECONDS"; }

q() { printf '%q' "$1"; }

read -r -a FAKE_STATES <<< "${DRY_RUN_STATES:-MISSING ACTIVE}"
read -r -a FAKE_CODES <<< "${DRY_RUN_EXIT_CODES:-0}"

# Sets STATE to the queued resource's state (ACTIVE, WAITING_FOR_RESOURCES, SUSPENDED, ...) or MISSING.
refresh_state() {
  local describe=(gcloud compute tpus queued-resources describe "$QR_NAME" "${GFLAGS[@]}" --format='value(state.state)')
  if ((DRY_RUN)); then
    show "${describe[@]}"
    STATE=${FAKE_STATES[0]:-ACTIVE}
    FAKE_STATES=("${FAKE_STATES[@]:1}")
    echo "# -> $STATE"
    return
  fi
  STATE=$("${describe[@]}" 2>/dev/null || true)
  STATE=${STATE:-MISSING}
}

# Waits until the queued resource is ACTIVE, creating it, or deleting and recreating it after a preemption.
ensure_slice() {
  local last=""
  while :; do
    refresh_state
    [[ $STATE != "$last" ]] && log "queued resource $QR_NAME: $STATE"
    last=$STATE
    case "$STATE" in
      ACTIVE) return 0 ;;
      MISSING)
        run gcloud compute tpus queued-resources create "$QR_NAME" --node-id="$TPU_NAME" "${GFLAGS[@]}" \
          --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" "${CAPACITY_FLAGS[@]}" ;;
      SUSPENDING|SUSPENDED|FAILED)
        # A preempted or failed request is never provisioned again: delete it (--force also deletes the TPU VM).
        run gcloud compute tpus queued-resources delete "$QR_NAME" "${GFLAGS[@]}" --force --quiet ;;
      *) ;;  # CREATING, ACCEPTED, WAITING_FOR_RESOURCES, PROVISIONING, DELETING: wait
    esac
    pause
  done
}

ssh_all() { run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GFLAGS[@]}" --worker=all --command="$1"; }

# Runs a worker.sh command on every worker and prints its output (empty on an ssh failure: a network blip or a
# slice going away is judged by the queued resource's state, not by this).
query_workers() {
  local cmd="if [ -f $WORKER_SCRIPT ]; then bash $WORKER_SCRIPT $1; else echo \"MMBERT_STATE worker=\$(hostname) state=none code=-\"; fi"
  if ((DRY_RUN)); then ssh_all "$cmd"; return; fi
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GFLAGS[@]}" --worker=all --command="$cmd" 2>/dev/null || true
}

# --- The worker-side control script --------------------------------------------------------------------------------
# Written once per launch with this run's command baked in; `start`, `status`, `logs` and `stop` call it over ssh.
worker_script() {
  local a envs=(MMBERT_DISTRIBUTED=1 "JAX_COORDINATOR_PORT=$COORDINATOR_PORT") args
  [[ -n $LIBTPU_INIT_ARGS ]] && envs+=("LIBTPU_INIT_ARGS=$LIBTPU_INIT_ARGS")
  args=(-m mmbert_jax.main "--config=$CONFIG" "--workdir=$WORKDIR")
  [[ -n $DATA_BUCKET ]] && args+=("--config.data.data_dir=$DATA_DIR")
  args+=("${MAIN_FLAGS[@]}")
  local fuse=()
  if [[ -n $DATA_BUCKET ]]; then
    # Read-only shards that never change during a run: cache metadata for good (TTL -1, unbounded stat/type
    # caches) and keep read files on local disk, whole files even for range reads, for later passes.
    fuse=(-o ro --implicit-dirs --metadata-cache-ttl-secs=-1 --stat-cache-max-size-mb=-1 --type-cache-max-size-mb=-1
          --kernel-list-cache-ttl-secs=-1)
    if ((GCSFUSE_CACHE_MB > 0)); then
      fuse+=("--cache-dir=$GCSFUSE_CACHE_DIR" "--file-cache-max-size-mb=$GCSFUSE_CACHE_MB"
             --file-cache-cache-file-for-range-read=true)
    fi
  fi
  cat <<EOF
#!/bin/bash
# mmbert_jax run control on one TPU worker, written by launch/tpu_pod.sh: start | status | state | logs [-f] | stop
set -uo pipefail
RUN_DIR=\$HOME/mmbert_run
CODE_DIR=\$HOME/$(q "$REMOTE_DIR")
PY=\$HOME/$(q "$REMOTE_VENV")/bin/python
WORKDIR=$(q "$WORKDIR")
ENVS=($(for a in "${envs[@]}"; do printf '%q ' "$a"; done))
ARGS=($(for a in "${args[@]}"; do printf '%q ' "$a"; done))
DATA_BUCKET=$(q "${DATA_BUCKET_NAME:-}")
DATA_MOUNT=$(q "$DATA_MOUNT")
CACHE_DIR=$(q "$GCSFUSE_CACHE_DIR")
GCSFUSE_FLAGS=($(for a in "${fuse[@]}"; do printf '%q ' "$a"; done))
LOG_UPLOAD_SECONDS=$LOG_UPLOAD_SECONDS
WORKER=\$(curl -sf -m 5 -H 'Metadata-Flavor: Google' \\
  http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number 2>/dev/null || hostname)
LOG=\$RUN_DIR/logs/worker-\$WORKER.log
mkdir -p "\$RUN_DIR/logs"

# The training process of this run, if it is alive (the pid file could name a recycled pid: check the command).
running() {
  PID=\$(cat "\$RUN_DIR/pid" 2>/dev/null || true)
  [ -n "\$PID" ] && kill -0 "\$PID" 2>/dev/null && grep -qs mmbert_jax.main "/proc/\$PID/cmdline"
}

upload_log() { gcloud storage cp "\$LOG" "\$WORKDIR/logs/worker-\$WORKER.log" >/dev/null 2>&1 || true; }

mount_data() {
  [ -z "\$DATA_BUCKET" ] && return 0
  mountpoint -q "\$DATA_MOUNT" && return 0
  if ! command -v gcsfuse >/dev/null; then
    echo "installing gcsfuse"
    curl -fsS https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
    echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main" \\
      | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
    sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse || return 1
  fi
  sudo mkdir -p "\$DATA_MOUNT" "\$CACHE_DIR" && sudo chown "\$(id -u):\$(id -g)" "\$DATA_MOUNT" "\$CACHE_DIR" || return 1
  gcsfuse "\${GCSFUSE_FLAGS[@]}" "\$DATA_BUCKET" "\$DATA_MOUNT" || return 1
  echo "mounted gs://\$DATA_BUCKET read-only at \$DATA_MOUNT"
}

# The detached supervisor: runs training, copies the log up while it runs, records the exit status.
supervise() {
  cd "\$CODE_DIR" || { echo 1 > "\$RUN_DIR/exit_code"; return 1; }
  echo "=== \$(date -u +%FT%TZ) worker \$WORKER: \$PY \${ARGS[*]}"
  env "\${ENVS[@]}" "\$PY" "\${ARGS[@]}" &
  local pid=\$! rc=0
  echo "\$pid" > "\$RUN_DIR/pid"
  ( while kill -0 "\$pid" 2>/dev/null; do sleep "\$LOG_UPLOAD_SECONDS"; upload_log; done ) &
  local uploader=\$!
  wait "\$pid" || rc=\$?
  kill "\$uploader" 2>/dev/null
  echo "=== \$(date -u +%FT%TZ) worker \$WORKER: exit status \$rc"
  echo "\$rc" > "\$RUN_DIR/exit_code.tmp" && mv "\$RUN_DIR/exit_code.tmp" "\$RUN_DIR/exit_code"
  upload_log
}

state() {
  local code=- s=none
  if running; then s=running
  elif [ -f "\$RUN_DIR/exit_code" ]; then s=exited; code=\$(cat "\$RUN_DIR/exit_code")
  elif [ -f "\$RUN_DIR/pid" ]; then
    # Started, but neither running nor finished: the supervisor is writing the status now, or the VM restarted.
    sleep 2
    if [ -f "\$RUN_DIR/exit_code" ]; then s=exited; code=\$(cat "\$RUN_DIR/exit_code"); else s=lost; fi
  fi
  [ -f "\$RUN_DIR/stopped" ] && s=\$s,stopped
  echo "MMBERT_STATE worker=\$WORKER state=\$s code=\$code pid=\${PID:--}"
}

case "\${1:-}" in
  start)
    if running; then echo "worker \$WORKER: already running (pid \$PID); not starting another"; exit 0; fi
    rm -f "\$RUN_DIR/exit_code" "\$RUN_DIR/stopped" "\$RUN_DIR/pid"
    mount_data >> "\$LOG" 2>&1 || { echo "worker \$WORKER: mounting gs://\$DATA_BUCKET failed (see \$LOG)"; echo 1 > "\$RUN_DIR/exit_code"; exit 1; }
    setsid nohup bash "\$0" _supervise >> "\$LOG" 2>&1 < /dev/null &
    for _ in \$(seq 50); do [ -s "\$RUN_DIR/pid" ] && break; sleep 0.2; done
    echo "worker \$WORKER: started pid \$(cat "\$RUN_DIR/pid" 2>/dev/null), log \$LOG" ;;
  _supervise) supervise ;;
  state) state ;;
  status)
    state
    tail -n "\${2:-5}" "\$LOG" 2>/dev/null | sed "s/^/  [worker \$WORKER] /" ;;
  logs)
    if [ "\${2:-}" = -f ]; then exec tail -n "\${3:-100}" -F "\$LOG"; else tail -n "\${2:-100}" "\$LOG"; fi ;;
  stop|kill)
    # stop: SIGTERM (checkpoint, exit 75) and wait up to \$2 s; kill: then SIGKILL a process that does not exit.
    if ! running; then state; exit 0; fi
    [ "\$1" = stop ] && touch "\$RUN_DIR/stopped"
    kill -TERM "\$PID"
    for _ in \$(seq "\${2:-900}"); do running || break; sleep 1; done
    if [ "\$1" = kill ] && running; then kill -KILL "\$PID"; fi
    state ;;
  *) echo "usage: worker.sh start|status [LINES]|state|logs [-f] [LINES]|stop [WAIT]|kill [WAIT]" >&2; exit 2 ;;
esac
EOF
}

# --- Install and start ---------------------------------------------------------------------------------------------
# Code bundle of the local checkout and the worker script, made once so that every relaunch runs the same code.
BUNDLE=""
WORKER_FILE=""
make_files() {
  if ((DRY_RUN)); then
    WORKER_FILE=/tmp/mmbert_worker.sh
    echo "# $WORKER_FILE, copied to $WORKER_SCRIPT on every worker:"
    worker_script | sed 's/^/#   /'
    if [[ $INSTALL == copy ]]; then
      BUNDLE=/tmp/mmbert_jax_bundle.tgz
      echo "(cd $(show "$REPO_DIR") && git ls-files -z --cached --others --exclude-standard | tar czf $BUNDLE --null -T -)"
    fi
    return
  fi
  WORKER_FILE=$(mktemp /tmp/mmbert_worker.XXXXXX)
  trap 'rm -f "$WORKER_FILE" ${BUNDLE:+"$BUNDLE"}' EXIT
  worker_script > "$WORKER_FILE"
  if [[ $INSTALL == copy ]]; then
    BUNDLE=$(mktemp /tmp/mmbert_jax_bundle.XXXXXX)
    (cd "$REPO_DIR" && git ls-files -z --cached --others --exclude-standard | tar czf "$BUNDLE" --null -T -)
    log "bundled $REPO_DIR ($(du -h "$BUNDLE" | cut -f1))"
  fi
}

install_code() {
  local setup fetch files=("$WORKER_FILE")
  [[ $INSTALL == copy ]] && files+=("$BUNDLE")
  run gcloud compute tpus tpu-vm scp "${files[@]}" "$TPU_NAME:" "${GFLAGS[@]}" --worker=all
  setup="set -euo pipefail; mkdir -p ~/mmbert_run/logs && cp ~/$(basename "$WORKER_FILE") $WORKER_SCRIPT"
  setup+="; command -v $(q "$PYTHON") >/dev/null || { sudo apt-get update -qq && sudo apt-get install -y -qq $(q "$PYTHON") $(q "$PYTHON-venv"); }"
  setup+="; [ -x ~/$(q "$REMOTE_VENV")/bin/python ] || $(q "$PYTHON") -m venv ~/$(q "$REMOTE_VENV")"
  if [[ $INSTALL == copy ]]; then
    fetch="mkdir -p ~/$(q "$REMOTE_DIR") && tar xzf ~/$(basename "$BUNDLE") -C ~/$(q "$REMOTE_DIR")"
  else
    fetch="{ [ -d ~/$(q "$REMOTE_DIR")/.git ] || git clone -q $(q "$GIT_URL") ~/$(q "$REMOTE_DIR"); }"
    fetch+=" && git -C ~/$(q "$REMOTE_DIR") fetch -q origin && git -C ~/$(q "$REMOTE_DIR") checkout -q $(q "$GIT_REF")"
  fi
  local pip="~/$(q "$REMOTE_VENV")/bin/pip"
  ssh_all "$setup; $fetch; $pip install -q --upgrade pip; $pip install -q $(q "jax[tpu]==$JAX_VERSION") ~/$(q "$REMOTE_DIR"); \
~/$(q "$REMOTE_VENV")/bin/python -c 'import importlib.metadata as m, socket; print(socket.gethostname(), \"jax\", m.version(\"jax\"), \"libtpu\", m.version(\"libtpu\"))'"
}

# Parses MMBERT_STATE lines into RUNNING/EXITED/STOPPED/TOTAL counts (EXITED: every worker not running) and RC
# (the run's status: the first exit status other than 0 and 75, else 75 if a worker was preempted or lost its
# run, else 0).
summarize() {
  local line s code
  RUNNING=0 EXITED=0 STOPPED=0 TOTAL=0 RC=0
  local other="" preempted=0
  while read -r line; do
    [[ $line =~ MMBERT_STATE\ worker=[^\ ]+\ state=([a-z,]+)\ code=([^\ ]+) ]] || continue
    s=${BASH_REMATCH[1]} code=${BASH_REMATCH[2]}
    TOTAL=$((TOTAL + 1))
    [[ $s == *stopped* ]] && STOPPED=$((STOPPED + 1))
    case "${s%%,*}" in
      running) RUNNING=$((RUNNING + 1)) ;;
      exited)
        EXITED=$((EXITED + 1))
        if ((code == 75)); then preempted=1; elif ((code != 0)) && [[ -z $other ]]; then other=$code; fi ;;
      *) EXITED=$((EXITED + 1)); preempted=1 ;;        # lost or none: the VM restarted or was replaced
    esac
  done
  if [[ -n $other ]]; then RC=$other; elif ((preempted)); then RC=75; fi
}

# Waits for the run on all workers to end; returns its status. A slice that leaves ACTIVE is a preemption (255).
watch_run() {
  if ((DRY_RUN)); then
    query_workers state
    local rc=${FAKE_CODES[0]:-0}
    FAKE_CODES=("${FAKE_CODES[@]:1}")
    echo "# -> exit $rc"
    return "$rc"
  fi
  local out first_exit=0 workers=0
  while :; do
    sleep "$POLL_SECONDS"
    refresh_state
    if [[ $STATE != ACTIVE ]]; then log "queued resource is $STATE during the run"; return 255; fi
    out=$(query_workers state)
    summarize <<< "$out"
    ((TOTAL > workers)) && workers=$TOTAL
    ((TOTAL && TOTAL == workers)) || continue               # some workers did not answer this time: ask again
    if ((RUNNING == 0)); then
      ((STOPPED)) && { log "run stopped by 'tpu_pod.sh stop' (status $RC); 'start' resumes it"; exit "$RC"; }
      return "$RC"
    fi
    if ((EXITED)); then
      ((first_exit)) || first_exit=$SECONDS
      if ((SECONDS - first_exit > HANG_SECONDS)); then
        log "$EXITED of $TOTAL workers exited (status $RC) $HANG_SECONDS s ago; stopping the others"
        query_workers "kill 120" >/dev/null
        return "$RC"
      fi
    fi
  done
}

# --- status, logs, stop --------------------------------------------------------------------------------------------
case "$COMMAND" in
  status)
    refresh_state
    echo "queued resource $QR_NAME: $STATE"
    [[ $STATE == ACTIVE ]] || ((DRY_RUN)) || exit 0
    query_workers "status $STATUS_LINES"
    exit 0 ;;
  logs)
    tail_args=$LOG_LINES
    ((FOLLOW)) && tail_args="-f $LOG_LINES"
    run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GFLAGS[@]}" --worker="$LOG_WORKER" \
      --command="bash $WORKER_SCRIPT logs $tail_args"
    exit 0 ;;
  stop)
    log "SIGTERM to the training process on every worker (checkpoint, then exit 75); waiting up to ${STOP_WAIT_SECONDS}s"
    query_workers "stop $STOP_WAIT_SECONDS"
    exit 0 ;;
esac

# --- start: launch, watch, relaunch after preemptions ---------------------------------------------------------------
if ((DRY_RUN)); then echo "# dry run: commands are printed, not run"; fi
make_files

EXIT_BAD_INPUT=2
EXIT_PREEMPTED=75
restarts=0
while :; do
  ensure_slice
  attach=0
  if ((!DRY_RUN)); then
    summarize <<< "$(query_workers state)"
    if ((RUNNING)); then
      attach=1
      log "the run is already going on $RUNNING of $TOTAL workers: watching it (not starting another)"
    fi
  fi
  if ((!attach)); then
    install_code
    if ! ssh_all "bash $WORKER_SCRIPT start"; then
      # A worker that did not start (e.g. its data mount failed) leaves the others waiting for it: end them.
      log "the run did not start on every worker (see above); stopping it where it did"
      query_workers "kill 60" >/dev/null
      exit 1
    fi
    log "started on every worker, detached; logs: ~/mmbert_run/logs/worker-<i>.log on each worker, copied to $WORKDIR/logs/"
    log "this script only watches from here on: 'launch/tpu_pod.sh status|logs|stop' with the same TPU_NAME and ZONE"
  fi
  rc=0
  watch_run || rc=$?
  if ((rc == 0)); then
    log "training finished; checkpoints in $WORKDIR"
    if ((DELETE_WHEN_DONE)); then run gcloud compute tpus queued-resources delete "$QR_NAME" "${GFLAGS[@]}" --force --quiet; fi
    exit 0
  fi
  ((ONCE)) && { log "run exited with status $rc (--once: not restarting)"; exit "$rc"; }
  if ((rc == EXIT_BAD_INPUT)); then
    log "run rejected its command or config (status $rc, see the worker logs); not restarting"
    exit "$rc"
  fi
  pause
  refresh_state
  if [[ $STATE == ACTIVE ]] && ((rc != EXIT_PREEMPTED)); then
    log "run failed with status $rc on an ACTIVE slice; not restarting (see 'launch/tpu_pod.sh logs')"
    exit "$rc"
  fi
  restarts=$((restarts + 1))
  if ((restarts > MAX_RESTARTS)); then
    log "preempted $restarts times (MAX_RESTARTS=$MAX_RESTARTS); giving up"
    exit 1
  fi
  log "preempted (exit status $rc, slice $STATE); resuming from $WORKDIR ($restarts/$MAX_RESTARTS)"
done
