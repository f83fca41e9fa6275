#!/usr/bin/env bash
# Pretrain mmbert_jax on a Cloud TPU VM slice and keep it running through preemptions.
#
# Usage: WORKDIR=gs://BUCKET/RUN [VAR=value ...] launch/tpu_pod.sh [--dry-run] [--once] [--help] [-- MAIN_FLAGS...]
#
# 1. Requests the slice as a queued resource (gcloud compute tpus queued-resources create) and waits until ACTIVE.
# 2. Installs the project on every worker (--worker=all): the local checkout is copied (INSTALL=copy) or GIT_URL is
#    cloned (INSTALL=git), then pip installs it with jax[tpu]==JAX_VERSION into a venv, so all hosts run identical
#    jax/libtpu versions.
# 3. Runs the same command on every worker (a multi-host job hangs when only some hosts start it):
#      MMBERT_DISTRIBUTED=1 python -m mmbert_jax.main --config=$CONFIG --workdir=$WORKDIR [MAIN_FLAGS]
#    jax.distributed.initialize() then finds the coordinator, process count and ids in the TPU metadata; the
#    coordinator port is pinned with JAX_COORDINATOR_PORT.
# 4. While it runs, polls the queued resource. The run's exit status says how it ended (see README: 0 complete,
#    1 failed, 2 bad input, 75 preempted). Preempted (75, or any status once the slice is no longer ACTIVE:
#    SUSPENDING/SUSPENDED/FAILED/gone) restarts: the queued resource is recreated when needed, the code reinstalled
#    and the same command rerun, which resumes from the last checkpoint in WORKDIR. Any other status on a healthy
#    slice (a failure or bad input) is not retried: the script exits with it.
#
# Options:
#   --dry-run   print the gcloud commands instead of running them (nothing is created). The queued-resource states
#               and run exit codes it pretends to see come from DRY_RUN_STATES (default "MISSING ACTIVE") and
#               DRY_RUN_EXIT_CODES (default "0"), e.g. DRY_RUN_STATES="MISSING ACTIVE SUSPENDED MISSING ACTIVE"
#               DRY_RUN_EXIT_CODES="255 0" shows a preemption and the restart.
#   --once      no restarts: exit with the run's status.
#   --help      this text.
#   -- FLAGS    passed on to mmbert_jax.main, e.g. -- --config.train.steps=1000
#
# Variables (environment; default in brackets):
#   WORKDIR           gs:// directory shared by all hosts for checkpoints and logs (required)
#   CONFIG            config file, optionally with :variant [configs/pretrain.py]
#   PROJECT           GCP project [gcloud's default project]
#   ZONE              zone with capacity for ACCELERATOR_TYPE [us-central2-b]
#   TPU_NAME          TPU VM (node) name [mmbert-pod]
#   QR_NAME           queued-resource id [$TPU_NAME-qr]
#   ACCELERATOR_TYPE  slice type, e.g. v4-32, v5litepod-64, v6e-64 [v4-32]
#   RUNTIME_VERSION   TPU VM image, e.g. tpu-ubuntu2204-base, v2-alpha-tpuv5-lite, v2-alpha-tpuv6e
#                     [tpu-ubuntu2204-base]
#   CAPACITY          spot | reserved | on-demand [spot]
#   INSTALL           copy (this checkout: tracked and untracked, non-ignored files) | git [copy]
#   GIT_URL, GIT_REF  repository to clone and commit/branch/tag to check out for INSTALL=git [-, main]
#   JAX_VERSION       jax[tpu] version, must match setup.py [0.10.2]
#   PYTHON            interpreter on the workers, >= 3.11; apt-installed when missing [python3.11]
#   REMOTE_DIR        code directory under $HOME on every worker [mmbert_jax]
#   REMOTE_VENV       virtualenv under $HOME on every worker [mmbert_venv]
#   COORDINATOR_PORT  jax.distributed coordinator port (JAX_COORDINATOR_PORT) [8476]
#   LIBTPU_INIT_ARGS  XLA/libtpu flags for the run, e.g. --xla_tpu_scoped_vmem_limit_kib=98304 [unset]
#   POLL_SECONDS      seconds between queued-resource state checks [60]
#   MAX_RESTARTS      preemption restarts before giving up [100]
#   DELETE_WHEN_DONE  1: delete the queued resource after a successful run [0]
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=${REPO_DIR:-$(dirname "$SCRIPT_DIR")}

WORKDIR=${WORKDIR:-}
CONFIG=${CONFIG:-configs/pretrain.py}
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
POLL_SECONDS=${POLL_SECONDS:-60}
MAX_RESTARTS=${MAX_RESTARTS:-100}
DELETE_WHEN_DONE=${DELETE_WHEN_DONE:-0}

DRY_RUN=0
ONCE=0
MAIN_FLAGS=()

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }
die() { echo "tpu_pod.sh: $*" >&2; exit 2; }
log() { echo "[tpu_pod $(date +%H:%M:%S)] $*" >&2; }

while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --once) ONCE=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; MAIN_FLAGS=("$@"); break ;;
    *) die "unknown argument '$1' (flags for mmbert_jax.main go after --; see --help)" ;;
  esac
  shift
done

# --- Checks ------------------------------------------------------------------------------------------------------
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
for n in POLL_SECONDS MAX_RESTARTS COORDINATOR_PORT; do
  [[ ${!n} =~ ^[0-9]+$ ]] || die "$n must be a non-negative integer, got '${!n}'"
done
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

# Code bundle of the local checkout, made once so that every restart runs the same code.
BUNDLE=""
make_bundle() {
  if ((DRY_RUN)); then
    BUNDLE=/tmp/mmbert_jax_bundle.tgz
    echo "(cd $(show "$REPO_DIR") && git ls-files -z --cached --others --exclude-standard | tar czf $BUNDLE --null -T -)"
    return
  fi
  BUNDLE=$(mktemp /tmp/mmbert_jax_bundle.XXXXXX)
  (cd "$REPO_DIR" && git ls-files -z --cached --others --exclude-standard | tar czf "$BUNDLE" --null -T -)
  trap 'rm -f "$BUNDLE"' EXIT
  log "bundled $REPO_DIR ($(du -h "$BUNDLE" | cut -f1))"
}

q() { printf '%q' "$1"; }

install_code() {
  local setup fetch
  setup="set -euo pipefail; command -v $(q "$PYTHON") >/dev/null || { sudo apt-get update -qq && sudo apt-get install -y -qq $(q "$PYTHON") $(q "$PYTHON-venv"); }"
  setup+="; [ -x ~/$(q "$REMOTE_VENV")/bin/python ] || $(q "$PYTHON") -m venv ~/$(q "$REMOTE_VENV")"
  if [[ $INSTALL == copy ]]; then
    run gcloud compute tpus tpu-vm scp "$BUNDLE" "$TPU_NAME:mmbert_jax_bundle.tgz" "${GFLAGS[@]}" --worker=all
    fetch="mkdir -p ~/$(q "$REMOTE_DIR") && tar xzf ~/mmbert_jax_bundle.tgz -C ~/$(q "$REMOTE_DIR")"
  else
    fetch="{ [ -d ~/$(q "$REMOTE_DIR")/.git ] || git clone -q $(q "$GIT_URL") ~/$(q "$REMOTE_DIR"); }"
    fetch+=" && git -C ~/$(q "$REMOTE_DIR") fetch -q origin && git -C ~/$(q "$REMOTE_DIR") checkout -q $(q "$GIT_REF")"
  fi
  local pip="~/$(q "$REMOTE_VENV")/bin/pip"
  ssh_all "$setup; $fetch; $pip install -q --upgrade pip; $pip install -q $(q "jax[tpu]==$JAX_VERSION") ~/$(q "$REMOTE_DIR"); \
~/$(q "$REMOTE_VENV")/bin/python -c 'import importlib.metadata as m, socket; print(socket.gethostname(), \"jax\", m.version(\"jax\"), \"libtpu\", m.version(\"libtpu\"))'"
}

# The training command run on every worker. A process left over from an earlier attempt (recorded in a pid file,
# checked to be ours) is stopped first: it would hold the TPU.
remote_run_command() {
  local pidf='~/.mmbert_run.pid' envs args a
  envs="MMBERT_DISTRIBUTED=1 JAX_COORDINATOR_PORT=$COORDINATOR_PORT"
  [[ -n $LIBTPU_INIT_ARGS ]] && envs+=" LIBTPU_INIT_ARGS=$(q "$LIBTPU_INIT_ARGS")"
  args="--config=$(q "$CONFIG") --workdir=$(q "$WORKDIR")"
  for a in "${MAIN_FLAGS[@]}"; do args+=" $(q "$a")"; done
  echo "p=\$(cat $pidf 2>/dev/null || true); if [ -n \"\$p\" ] && grep -qs mmbert_jax.main /proc/\$p/cmdline; then \
kill \$p; for i in \$(seq 60); do kill -0 \$p 2>/dev/null || break; sleep 1; done; kill -9 \$p 2>/dev/null || true; fi; \
cd ~/$(q "$REMOTE_DIR") && echo \$\$ > $pidf && exec env $envs ~/$(q "$REMOTE_VENV")/bin/python -m mmbert_jax.main $args"
}

# Runs training on all workers; returns its exit status. Stops waiting when the slice leaves ACTIVE (a preempted
# host can leave the others blocked in a collective).
run_training() {
  local cmd
  cmd=$(remote_run_command)
  if ((DRY_RUN)); then
    ssh_all "$cmd"
    local rc=${FAKE_CODES[0]:-0}
    FAKE_CODES=("${FAKE_CODES[@]:1}")
    echo "# -> exit $rc"
    return "$rc"
  fi
  ssh_all "$cmd" &
  local pid=$! rc=0
  while kill -0 "$pid" 2>/dev/null; do
    sleep "$POLL_SECONDS"
    kill -0 "$pid" 2>/dev/null || break
    refresh_state
    if [[ $STATE != ACTIVE ]]; then
      log "queued resource is $STATE during the run: stopping the ssh session"
      kill "$pid" 2>/dev/null || true
      break
    fi
  done
  wait "$pid" || rc=$?
  return "$rc"
}

# --- Main loop ---------------------------------------------------------------------------------------------------
if ((DRY_RUN)); then echo "# dry run: commands are printed, not run"; fi
[[ $INSTALL == copy ]] && make_bundle

EXIT_BAD_INPUT=2
EXIT_PREEMPTED=75
restarts=0
while :; do
  ensure_slice
  install_code
  rc=0
  run_training || rc=$?
  if ((rc == 0)); then
    log "training finished; checkpoints in $WORKDIR"
    if ((DELETE_WHEN_DONE)); then run gcloud compute tpus queued-resources delete "$QR_NAME" "${GFLAGS[@]}" --force --quiet; fi
    exit 0
  fi
  ((ONCE)) && { log "run exited with status $rc (--once: not restarting)"; exit "$rc"; }
  if ((rc == EXIT_BAD_INPUT)); then
    log "run rejected its command or config (status $rc, see the error above); not restarting"
    exit "$rc"
  fi
  pause
  refresh_state
  if [[ $STATE == ACTIVE ]] && ((rc != EXIT_PREEMPTED)); then
    log "run failed with status $rc on an ACTIVE slice; not restarting (see the log above)"
    exit "$rc"
  fi
  restarts=$((restarts + 1))
  if ((restarts > MAX_RESTARTS)); then
    log "preempted $restarts times (MAX_RESTARTS=$MAX_RESTARTS); giving up"
    exit 1
  fi
  log "preempted (exit status $rc, slice $STATE); resuming from $WORKDIR ($restarts/$MAX_RESTARTS)"
done
