#!/usr/bin/env python3
"""Pretrain mmbert_jax on a Cloud TPU VM slice, detached from this machine, and keep it running through preemptions.

Usage: WORKDIR=gs://BUCKET/RUN [VAR=value ...] launch/tpu_pod.sh [start] [--dry-run] [--once] [-- MAIN_FLAGS...]
       TPU_NAME=... ZONE=... launch/tpu_pod.sh status | logs [-f] [WORKER] | stop [--dry-run]
(launch/tpu_pod.sh runs this file, launch/tpu_pod.py, with python3; it needs the standard library and gcloud only.)

start (the default):
1. Requests the slice as a queued resource (gcloud compute tpus queued-resources create) and waits until ACTIVE.
2. Installs the project on every worker (--worker=all): the local checkout is copied (INSTALL=copy) or GIT_URL is
   cloned (INSTALL=git), then pip installs it with jax[tpu]==JAX_VERSION into a venv, so all hosts run identical
   jax/libtpu versions. The worker control script launch/worker.sh is copied to ~/mmbert_run/worker.sh and this
   run's settings (command, workdir, data mount; every value shell-quoted) to ~/mmbert_run/run.env beside it.
3. Starts the same command on every worker (a multi-host job hangs when only some hosts start it) as a detached
   process (setsid nohup: no terminal, immune to the ssh session ending), so the run survives this machine
   sleeping or disconnecting:
     MMBERT_DISTRIBUTED=1 python -m mmbert_jax.main --config=$CONFIG --workdir=$WORKDIR [MAIN_FLAGS]
   jax.distributed.initialize() then finds the coordinator, process count and ids in the TPU metadata; the
   coordinator port is pinned with JAX_COORDINATOR_PORT. A worker already running the command is left alone: a
   rerun of this launcher attaches to the run instead of starting a second one.
   Logs: each worker writes ~/mmbert_run/logs/worker-<i>.log on its own disk and copies it to
   $WORKDIR/logs/worker-<i>.log every LOG_UPLOAD_SECONDS and when the run ends (GCS has no append).
4. Watches: polls the queued resource and every worker's state. The run's exit status says how it ended (see
   README: 0 complete, 1 failed, 2 bad input, 75 preempted). Restarted are only a preempted run (75 on every
   worker) and a lost slice (no longer ACTIVE: SUSPENDING/SUSPENDED/FAILED/gone): the queued resource is recreated
   when needed, the code reinstalled and the same command started again, which resumes from the last checkpoint in
   WORKDIR. Restart i within the last hour waits BACKOFF_SECONDS * 2^(i-1), at most BACKOFF_MAX_SECONDS; once
   MAX_RESTARTS_PER_HOUR restarts fall within the last hour (or MAX_RESTARTS in all), the launcher gives up (status
   1). A worker that fails (any status but 0 and 75) ends the launch with that status at once: the other workers
   are stopped. Bad input (2), a run ended by `stop`, and any failure on an ACTIVE slice are not restarted.
   Stopping this launcher (Ctrl-C, closing the laptop) leaves the run going; run `start` again to watch it again.

With DATA_BUCKET set, every worker mounts that bucket read-only with gcsfuse at DATA_MOUNT (installing gcsfuse
from Google's apt repository when missing) and the run reads --config.data.data_dir=$DATA_MOUNT[/dir].

Commands:
  start       launch or attach (above)
  status      the queued resource's state, then per worker: running (pid), exited (exit status), stopped or
              not started, and the last STATUS_LINES log lines
  logs [-f] [WORKER]  the last LOG_LINES lines of worker WORKER's log [0]; -f follows it (Ctrl-C to leave)
  stop        SIGTERM to the training process on every worker: each saves a checkpoint and exits 75; waits up to
              STOP_WAIT_SECONDS for them. A stopped run is not restarted; `start` resumes it.
Options:
  --dry-run   print the gcloud commands and the run settings instead of running them (nothing is created; waits
              are logged, not slept). The queued-resource states and run exit codes it pretends to see come from
              DRY_RUN_STATES (default "MISSING ACTIVE") and DRY_RUN_EXIT_CODES (default "0"), e.g.
              DRY_RUN_STATES="MISSING ACTIVE SUSPENDED SUSPENDED MISSING ACTIVE" DRY_RUN_EXIT_CODES="255 0" shows a
              run failing as its slice is preempted and the relaunch, DRY_RUN_EXIT_CODES="75 75 75 75 75" the
              backoff and the budget.
  --once      no restarts: exit with the run's status.
  --help      this text.
  -- FLAGS    passed on to mmbert_jax.main, e.g. -- --config.train_tokens=1000000000 --config.log_every_steps=50

Variables (environment; default in brackets):
  WORKDIR           gs:// directory shared by all hosts for checkpoints and logs (required by start)
  CONFIG            config file, optionally with :variant [configs/pretrain.py]
  DATA_BUCKET       gs://BUCKET[/DIR] holding the prepared data: mounted with gcsfuse on every worker [unset]
  DATA_MOUNT        mount point of DATA_BUCKET on every worker [/mnt/mmbert-data]
  GCSFUSE_CACHE_DIR local directory for gcsfuse's file cache [/tmp/gcsfuse-cache]
  GCSFUSE_CACHE_MB  file cache size in MiB on each worker's boot disk; 0: no file cache [20480]
  PROJECT           GCP project [gcloud's default project]
  ZONE              zone with capacity for ACCELERATOR_TYPE [us-central2-b]
  TPU_NAME          TPU VM (node) name [mmbert-pod]
  QR_NAME           queued-resource id [$TPU_NAME-qr]
  ACCELERATOR_TYPE  slice type, e.g. v4-32, v5litepod-64, v5p-64, v6e-64 [v4-32]
  RUNTIME_VERSION   TPU software version: tpu-ubuntu2204-base (v4), v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv5
                    (v5p), v2-alpha-tpuv6e (v6e) [tpu-ubuntu2204-base]
  CAPACITY          spot | reserved | on-demand [spot]
  INSTALL           copy (this checkout: tracked and untracked, non-ignored files) | git [copy]
  GIT_URL, GIT_REF  repository to clone and commit/branch/tag to check out for INSTALL=git [-, main]
  JAX_VERSION       jax[tpu] version, must match setup.py [0.10.2]
  PYTHON            interpreter on the workers, >= 3.11; apt-installed when missing [python3.11]
  REMOTE_DIR        code directory under $HOME on every worker [mmbert_jax]
  REMOTE_VENV       virtualenv under $HOME on every worker [mmbert_venv]
  COORDINATOR_PORT  jax.distributed coordinator port (JAX_COORDINATOR_PORT) [8476]
  LIBTPU_INIT_ARGS  XLA/libtpu flags for the run, e.g. --xla_tpu_scoped_vmem_limit_kib=98304 [unset]
  LOG_UPLOAD_SECONDS  how often each worker copies its log to $WORKDIR/logs [300]
  POLL_SECONDS      seconds between state checks [60]
  HANG_SECONDS      a worker still running this long after another one exited 0 or 75 is stopped (SIGTERM, then
                    SIGKILL): it is blocked in a collective [900]
  BACKOFF_SECONDS   wait before the first restart within an hour; doubled for each further one [30]
  BACKOFF_MAX_SECONDS  longest wait before a restart [1800]
  MAX_RESTARTS_PER_HOUR  restarts within the last hour before giving up [4]
  MAX_RESTARTS      restarts in all before giving up [100]
  STOP_WAIT_SECONDS how long `stop` waits for the checkpoint and exit [900]
  STATUS_LINES, LOG_LINES  log lines shown by status and logs [5, 100]
  DELETE_WHEN_DONE  1: delete the queued resource after a successful run [0]
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence

LAUNCH_DIR = os.path.dirname(os.path.abspath(__file__))
ACTIVE, MISSING = "ACTIVE", "MISSING"
EXIT_FAILED, EXIT_BAD_INPUT, EXIT_PREEMPTED = 1, 2, 75
SLICE_LOST = 255  # the status of a run whose slice left ACTIVE while it ran (its workers could not tell)
HOUR = 3600.0
# On every worker, relative to the ssh user's home: the control script and the run's settings.
WORKER_SCRIPT = "~/mmbert_run/worker.sh"
RUN_ENV = "~/mmbert_run/run.env"
ENV_FILE, BUNDLE_FILE = "mmbert_run.env", "mmbert_jax_bundle.tgz"

# Non-negative integer variables and their defaults.
INT_VARS = {
  "GCSFUSE_CACHE_MB": 20480,
  "COORDINATOR_PORT": 8476,
  "LOG_UPLOAD_SECONDS": 300,
  "POLL_SECONDS": 60,
  "HANG_SECONDS": 900,
  "BACKOFF_SECONDS": 30,
  "BACKOFF_MAX_SECONDS": 1800,
  "MAX_RESTARTS_PER_HOUR": 4,
  "MAX_RESTARTS": 100,
  "STOP_WAIT_SECONDS": 900,
  "STATUS_LINES": 5,
  "LOG_LINES": 100,
  "DELETE_WHEN_DONE": 0,
}
STR_VARS = {
  "WORKDIR": "",
  "CONFIG": "configs/pretrain.py",
  "DATA_BUCKET": "",
  "DATA_MOUNT": "/mnt/mmbert-data",
  "GCSFUSE_CACHE_DIR": "/tmp/gcsfuse-cache",
  "PROJECT": "",
  "ZONE": "us-central2-b",
  "TPU_NAME": "mmbert-pod",
  "QR_NAME": "",
  "ACCELERATOR_TYPE": "v4-32",
  "RUNTIME_VERSION": "tpu-ubuntu2204-base",
  "CAPACITY": "spot",
  "INSTALL": "copy",
  "GIT_URL": "",
  "GIT_REF": "main",
  "JAX_VERSION": "0.10.2",
  "PYTHON": "python3.11",
  "REMOTE_DIR": "mmbert_jax",
  "REMOTE_VENV": "mmbert_venv",
  "LIBTPU_INIT_ARGS": "",
  "REPO_DIR": os.path.dirname(LAUNCH_DIR),
}
CAPACITY_FLAGS = {"spot": ["--spot"], "reserved": ["--reserved"], "on-demand": []}
DATA_BUCKET_RE = re.compile(r"^(gs://)?([a-z0-9][a-z0-9._-]*)(/(.*[^/])?)?/*$")


class BadInput(Exception):
  """A command line or variable that cannot work: one line, exit status 2."""


class GcloudError(Exception):
  """A gcloud command that must succeed failed: one line, exit status 1."""


# --- Command line and settings -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Args:
  command: str = "start"
  dry_run: bool = False
  once: bool = False
  follow: bool = False
  log_worker: int = 0
  help: bool = False
  main_flags: tuple[str, ...] = ()


def parse_args(argv: Sequence[str]) -> Args:
  argv = list(argv)
  command = "start"
  if argv and argv[0] in ("start", "status", "logs", "stop"):
    command = argv.pop(0)
  a = dict(command=command)
  while argv:
    arg = argv.pop(0)
    if arg == "--dry-run":
      a["dry_run"] = True
    elif arg == "--once":
      if command != "start":
        raise BadInput("--once only goes with start")
      a["once"] = True
    elif arg == "-f":
      if command != "logs":
        raise BadInput("-f only goes with logs")
      a["follow"] = True
    elif arg in ("-h", "--help"):
      return Args(help=True)
    elif arg == "--":
      if command != "start":
        raise BadInput("flags for mmbert_jax.main (after --) only go with start")
      a["main_flags"] = tuple(argv)
      break
    elif arg.isdigit() and command == "logs":
      a["log_worker"] = int(arg)
    else:
      raise BadInput(f"unknown argument '{arg}' (flags for mmbert_jax.main go after --; see --help)")
  return Args(**a)


@dataclasses.dataclass(frozen=True)
class Settings:
  """The variables of --help, checked; `data_bucket` is the bare bucket name, `data_dir` the run's data_dir."""

  values: dict
  data_bucket: str = ""
  data_dir: str = ""

  def __getattr__(self, name):
    try:
      return self.__dict__["values"][name]
    except KeyError:
      raise AttributeError(name) from None


def load_settings(environ: dict, args: Args) -> Settings:
  v = {k: environ.get(k) or d for k, d in STR_VARS.items()}
  v["QR_NAME"] = v["QR_NAME"] or f"{v['TPU_NAME']}-qr"
  for name, default in INT_VARS.items():
    raw = environ.get(name, "") or str(default)
    if not raw.isdigit():
      raise BadInput(f"{name} must be a non-negative integer, got '{raw}'")
    v[name] = int(raw)
  for name in ("DRY_RUN_STATES", "DRY_RUN_EXIT_CODES"):
    v[name] = environ.get(name, "")
  bucket = data_dir = ""
  if args.command == "start":
    workdir = v["WORKDIR"]
    if not workdir:
      raise BadInput(
        "set WORKDIR to a gs:// directory for checkpoints and logs (e.g. WORKDIR=gs://my-bucket/mmbert-base)"
      )
    if not workdir.startswith("gs://"):
      raise BadInput(f"WORKDIR must be a gs:// path that every host can read and write, got '{workdir}'")
    if v["CAPACITY"] not in CAPACITY_FLAGS:
      raise BadInput(f"CAPACITY must be spot, reserved or on-demand, got '{v['CAPACITY']}'")
    repo = v["REPO_DIR"]
    if v["INSTALL"] == "copy":
      if not os.path.isfile(os.path.join(repo, "setup.py")):
        raise BadInput(f"INSTALL=copy needs the project checkout at REPO_DIR={repo} (no setup.py there)")
      git = subprocess.run(["git", "-C", repo, "rev-parse", "--git-dir"], capture_output=True)
      if git.returncode:
        raise BadInput(f"INSTALL=copy bundles the files git knows of, but REPO_DIR={repo} is not a git checkout")
    elif v["INSTALL"] == "git":
      if not v["GIT_URL"]:
        raise BadInput("INSTALL=git needs GIT_URL (e.g. GIT_URL=https://github.com/ORG/mmbert_jax.git)")
    else:
      raise BadInput(f"INSTALL must be copy or git, got '{v['INSTALL']}'")
    if v["DATA_BUCKET"]:
      m = DATA_BUCKET_RE.match(v["DATA_BUCKET"])
      if not m:
        raise BadInput(
          f"DATA_BUCKET must be gs://BUCKET or gs://BUCKET/DIR (a lower-case bucket name), got '{v['DATA_BUCKET']}'"
        )
      if not v["DATA_MOUNT"].startswith("/"):
        raise BadInput(f"DATA_MOUNT must be an absolute path, got '{v['DATA_MOUNT']}'")
      bucket = m.group(2)
      data_dir = v["DATA_MOUNT"] + (f"/{m.group(4)}" if m.group(4) else "")
      for flag in args.main_flags:
        if flag.startswith("--config.data.data_dir="):
          raise BadInput(f"DATA_BUCKET sets --config.data.data_dir={data_dir} (the gcsfuse mount); do not pass {flag}")
  return Settings(values=v, data_bucket=bucket, data_dir=data_dir)


# --- The supervisor's decisions (pure) -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Workers:
  """What the workers' MMBERT_STATE lines say. `code` is the run's status: the first status other than 0 and 75
  (from `failed_worker`), else 75 if a worker was preempted or lost its run, else 0. Exited counts every worker not
  running."""

  total: int = 0
  running: int = 0
  exited: int = 0
  stopped: int = 0
  code: int = 0
  failed_worker: str | None = None


STATE_LINE = re.compile(r"MMBERT_STATE worker=(\S+) state=([a-z,]+) code=(\S+)")


def summarize(text: str) -> Workers:
  total = running = exited = stopped = 0
  failed, failed_code, preempted = None, 0, False
  for m in STATE_LINE.finditer(text):
    worker, state, code = m.groups()
    total += 1
    stopped += "stopped" in state
    state = state.split(",")[0]
    if state == "running":
      running += 1
      continue
    exited += 1
    if state != "exited" or not code.lstrip("-").isdigit():  # lost or none: the VM restarted or was replaced
      preempted = True
    elif int(code) == EXIT_PREEMPTED:
      preempted = True
    elif int(code) != 0 and failed is None:
      failed, failed_code = worker, int(code)
  code = failed_code if failed is not None else EXIT_PREEMPTED if preempted else 0
  return Workers(total, running, exited, stopped, code, failed)


def slice_action(state: str) -> str:
  """What to do about the queued resource in `state` before a start: ready | create | delete | wait."""
  if state == ACTIVE:
    return "ready"
  if state == MISSING:
    return "create"
  if state in ("SUSPENDING", "SUSPENDED", "FAILED"):
    return "delete"  # a preempted or failed request is never provisioned again
  return "wait"  # CREATING, ACCEPTED, WAITING_FOR_RESOURCES, PROVISIONING, DELETING


def should_attach(w: Workers) -> bool:
  """A run still going on any worker is watched, not started a second time."""
  return w.running > 0


def judge_workers(
  w: Workers, expected: int, first_exit: float | None, now: float, hang_seconds: float
) -> tuple[str, float | None]:
  """One look at a running run: (wait | ended | stopped | stop_others, time the first worker was seen exited).
  A failed worker stops the others at once (they would block in a collective); after an exit with 0 or 75 the
  others get hang_seconds to follow."""
  if not w.total or w.total < expected:
    return "wait", first_exit  # some workers did not answer this time: ask again
  if not w.running:
    return ("stopped" if w.stopped else "ended"), first_exit
  if w.failed_worker is not None:
    return "stop_others", first_exit
  if w.exited:
    first_exit = now if first_exit is None else first_exit
    if now - first_exit > hang_seconds:
      return "stop_others", first_exit
  return "wait", first_exit


def decide(code: int, slice_state: str | None, once: bool) -> str:
  """After a run ended with `code` on a slice in `slice_state`: done | once | bad_input | restart | failed.
  Only a preempted run (75) or a lost slice is restarted."""
  if code == 0:
    return "done"
  if once:
    return "once"
  if code == EXIT_BAD_INPUT:
    return "bad_input"
  if code == EXIT_PREEMPTED or (slice_state is not None and slice_state != ACTIVE):
    return "restart"
  return "failed"


def restarts_in_last_hour(restart_times: Sequence[float], now: float) -> int:
  return sum(now - t < HOUR for t in restart_times)


def backoff_seconds(recent_restarts: int, base: float, cap: float) -> float:
  """The wait before a restart when `recent_restarts` happened within the last hour: base, 2 base, 4 base, ..., cap."""
  return float(min(base * 2**recent_restarts, cap))


def restart_refusal(restart_times: Sequence[float], now: float, per_hour: int, max_total: int) -> str | None:
  """Why one more restart is refused (the restart budget is spent), or None."""
  if len(restart_times) >= max_total:
    return f"restarted {len(restart_times)} times (MAX_RESTARTS={max_total}); giving up"
  recent = restarts_in_last_hour(restart_times, now)
  if recent >= per_hour:
    return f"restart budget spent: {recent} restarts within the last hour (MAX_RESTARTS_PER_HOUR={per_hour}); giving up"
  return None


# --- What runs on the workers ------------------------------------------------------------------------------------


def quote(*args: str) -> str:
  return " ".join(shlex.quote(a) for a in args)


def run_env(s: Settings, main_flags: Sequence[str]) -> str:
  """~/mmbert_run/run.env: the run's settings for launch/worker.sh, sourced by bash; every value shell-quoted."""
  envs = ["MMBERT_DISTRIBUTED=1", f"JAX_COORDINATOR_PORT={s.COORDINATOR_PORT}"]
  if s.LIBTPU_INIT_ARGS:
    envs.append(f"LIBTPU_INIT_ARGS={s.LIBTPU_INIT_ARGS}")
  args = ["-m", "mmbert_jax.main", f"--config={s.CONFIG}", f"--workdir={s.WORKDIR}"]
  if s.data_bucket:
    args.append(f"--config.data.data_dir={s.data_dir}")
  args += main_flags
  fuse = []
  if s.data_bucket:
    # Read-only shards that never change during a run: cache metadata for good (TTL -1, unbounded stat/type
    # caches) and keep read files on local disk, whole files even for range reads, for later passes.
    fuse = ["-o", "ro", "--implicit-dirs", "--metadata-cache-ttl-secs=-1", "--stat-cache-max-size-mb=-1"]
    fuse += ["--type-cache-max-size-mb=-1", "--kernel-list-cache-ttl-secs=-1"]
    if s.GCSFUSE_CACHE_MB > 0:
      fuse += [f"--cache-dir={s.GCSFUSE_CACHE_DIR}", f"--file-cache-max-size-mb={s.GCSFUSE_CACHE_MB}"]
      fuse += ["--file-cache-cache-file-for-range-read=true"]
  lines = [
    "# mmbert_jax run settings for ~/mmbert_run/worker.sh (launch/worker.sh), written by launch/tpu_pod.py",
    f"REMOTE_DIR={shlex.quote(s.REMOTE_DIR)}",
    f"REMOTE_VENV={shlex.quote(s.REMOTE_VENV)}",
    f"WORKDIR={shlex.quote(s.WORKDIR)}",
    f"ENVS=({quote(*envs)})",
    f"ARGS=({quote(*args)})",
    f"DATA_BUCKET={shlex.quote(s.data_bucket)}",
    f"DATA_MOUNT={shlex.quote(s.DATA_MOUNT)}",
    f"GCSFUSE_CACHE_DIR={shlex.quote(s.GCSFUSE_CACHE_DIR)}",
    f"GCSFUSE_FLAGS=({quote(*fuse)})",
    f"LOG_UPLOAD_SECONDS={s.LOG_UPLOAD_SECONDS}",
  ]
  return "\n".join(lines) + "\n"


def install_command(s: Settings) -> str:
  """The ssh command that puts the control script, the settings and the code on a worker and pip installs it."""
  home = lambda name: "~/" + shlex.quote(name)  # ~ must stay unquoted: the worker's shell expands it
  code, venv, py = home(s.REMOTE_DIR), home(s.REMOTE_VENV), shlex.quote(s.PYTHON)
  steps = [
    "set -euo pipefail",
    f"mkdir -p ~/mmbert_run/logs && cp ~/worker.sh {WORKER_SCRIPT} && cp ~/{ENV_FILE} {RUN_ENV}",
    f"command -v {py} >/dev/null || {{ sudo apt-get update -qq && sudo apt-get install -y -qq {py} "
    f"{shlex.quote(s.PYTHON + '-venv')}; }}",
    f"[ -x {venv}/bin/python ] || {py} -m venv {venv}",
  ]
  if s.INSTALL == "copy":
    steps.append(f"mkdir -p {code} && tar xzf ~/{BUNDLE_FILE} -C {code}")
  else:
    steps.append(
      f"{{ [ -d {code}/.git ] || git clone -q {shlex.quote(s.GIT_URL)} {code}; }} && git -C {code} fetch -q origin"
      f" && git -C {code} checkout -q {shlex.quote(s.GIT_REF)}"
    )
  steps += [
    f"{venv}/bin/pip install -q --upgrade pip",
    f"{venv}/bin/pip install -q {shlex.quote(f'jax[tpu]=={s.JAX_VERSION}')} {code}",
    f"{venv}/bin/python -c 'import importlib.metadata as m, socket; "
    'print(socket.gethostname(), "jax", m.version("jax"), "libtpu", m.version("libtpu"))\'',
  ]
  return "; ".join(steps)


def worker_command(action: str) -> str:
  """Runs worker.sh `action` on a worker; one that never got the script reports state none."""
  return (
    f"if [ -f {WORKER_SCRIPT} ]; then bash {WORKER_SCRIPT} {action}; "
    'else echo "MMBERT_STATE worker=$(hostname) state=none code=-"; fi'
  )


# --- The gcloud layer ----------------------------------------------------------------------------------------------


class Gcloud:
  """One method per gcloud action the launcher takes; tests put a fake with the same methods in its place."""

  def __init__(self, s: Settings):
    self.s = s
    self.flags = [f"--zone={s.ZONE}"] + ([f"--project={s.PROJECT}"] if s.PROJECT else [])

  def _qr(self, verb: str, *extra: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "queued-resources", verb, self.s.QR_NAME, *self.flags, *extra]

  def _ssh(self, command: str, worker: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", self.s.TPU_NAME, *self.flags, f"--worker={worker}"] + [
      f"--command={command}"
    ]

  def _must(self, argv: list[str]) -> None:
    rc = subprocess.run(argv).returncode
    if rc:
      raise GcloudError(f"'{quote(*argv[:5])} ...' failed with status {rc}")

  def state(self) -> str:
    """The queued resource's state (ACTIVE, WAITING_FOR_RESOURCES, SUSPENDED, ...) or MISSING."""
    r = subprocess.run(
      self._qr("describe", "--format=value(state.state)"), capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    return (r.stdout.strip() if r.returncode == 0 else "") or MISSING

  def create(self) -> None:
    s = self.s
    extra = [f"--node-id={s.TPU_NAME}", f"--accelerator-type={s.ACCELERATOR_TYPE}"]
    self._must(self._qr("create", *extra, f"--runtime-version={s.RUNTIME_VERSION}", *CAPACITY_FLAGS[s.CAPACITY]))

  def delete(self) -> None:
    self._must(self._qr("delete", "--force", "--quiet"))  # --force also deletes the TPU VM

  def scp(self, files: Sequence[str]) -> None:
    self._must(
      ["gcloud", "compute", "tpus", "tpu-vm", "scp", *files, f"{self.s.TPU_NAME}:", *self.flags, "--worker=all"]
    )

  def ssh(self, command: str, worker: str = "all", capture: bool = False) -> tuple[int, str]:
    """Runs `command` on the workers; with capture, returns its output (empty on an ssh failure: a network blip
    or a slice going away is judged by the queued resource's state, not by this), else lets it through."""
    if capture:
      r = subprocess.run(self._ssh(command, worker), capture_output=True, text=True, stdin=subprocess.DEVNULL)
      return r.returncode, r.stdout
    return subprocess.run(self._ssh(command, worker)).returncode, ""


class DryRunGcloud(Gcloud):
  """Prints each gcloud command instead of running it; pretends to see DRY_RUN_STATES and DRY_RUN_EXIT_CODES."""

  def __init__(self, s: Settings):
    super().__init__(s)
    self.states = (s.DRY_RUN_STATES or "MISSING ACTIVE").split()
    self.codes = (s.DRY_RUN_EXIT_CODES or "0").split()

  def _must(self, argv: list[str]) -> None:
    print(quote(*argv))

  def state(self) -> str:
    print(quote(*self._qr("describe", "--format=value(state.state)")))
    state = self.states.pop(0) if self.states else ACTIVE
    print(f"# -> {state}")
    return state

  def ssh(self, command: str, worker: str = "all", capture: bool = False) -> tuple[int, str]:
    print(quote(*self._ssh(command, worker)))
    if capture and f"{WORKER_SCRIPT} state" in command:
      code = self.codes.pop(0) if self.codes else "0"
      print(f"# -> exit {code}")
      return 0, f"MMBERT_STATE worker=0 state=exited code={code} pid=-\n"
    return 0, ""


# --- The launcher ----------------------------------------------------------------------------------------------------


class VirtualClock:
  """A clock that moves only when slept on: the dry run's (and the tests') time."""

  def __init__(self):
    self.now = 0.0
    self.slept: list[float] = []

  def __call__(self) -> float:
    return self.now

  def sleep(self, seconds: float) -> None:
    self.slept.append(seconds)
    self.now += seconds


@dataclasses.dataclass(frozen=True)
class Ending:
  """How a watched run ended: its status, whether `stop` ended it, the worker that failed, if one did, and the state
  of the queued resource if it left ACTIVE while the run went on."""

  code: int
  stopped: bool = False
  failed_worker: str | None = None
  lost_state: str | None = None


def log(message: str) -> None:
  print(f"[tpu_pod {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Launcher:
  """start, status, logs and stop, through `gcloud` (a Gcloud or a stand-in) and the given clock."""

  def __init__(
    self,
    s: Settings,
    args: Args,
    gcloud: Gcloud,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    log: Callable[[str], None] = log,
  ):
    self.s, self.args, self.gc = s, args, gcloud
    self.clock, self.sleep, self.log = clock, sleep, log
    self.dry_run = args.dry_run
    self.restart_times: list[float] = []

  def query(self, action: str) -> str:
    return self.gc.ssh(worker_command(action), capture=True)[1]

  def pause(self) -> None:
    if not self.dry_run:
      self.sleep(self.s.POLL_SECONDS)

  # --- status, logs, stop
  def status(self) -> int:
    state = self.gc.state()
    print(f"queued resource {self.s.QR_NAME}: {state}", flush=True)
    if state == ACTIVE or self.dry_run:
      print(self.query(f"status {self.s.STATUS_LINES}"), end="", flush=True)
    return 0

  def logs(self) -> int:
    tail = f"-f {self.s.LOG_LINES}" if self.args.follow else str(self.s.LOG_LINES)
    self.gc.ssh(f"bash {WORKER_SCRIPT} logs {tail}", worker=str(self.args.log_worker))
    return 0

  def stop(self) -> int:
    wait = self.s.STOP_WAIT_SECONDS
    self.log(f"SIGTERM to the training process on every worker (checkpoint, then exit 75); waiting up to {wait}s")
    print(self.query(f"stop {wait}"), end="", flush=True)
    return 0

  # --- start
  def make_files(self, directory: str) -> list[str]:
    """The control script, the run's settings and (INSTALL=copy) the code bundle, made once so that every relaunch
    runs the same code and command."""
    s = self.s
    env, bundle = os.path.join(directory, ENV_FILE), os.path.join(directory, BUNDLE_FILE)
    files = [os.path.join(LAUNCH_DIR, "worker.sh"), env]
    if self.dry_run:
      print(f"# {env}, copied to {RUN_ENV} on every worker:")
      print("".join(f"#   {line}\n" for line in run_env(s, self.args.main_flags).splitlines()), end="")
    else:
      with open(env, "w") as f:
        f.write(run_env(s, self.args.main_flags))
    if s.INSTALL != "copy":
      return files
    if self.dry_run:
      print(f"# {bundle}: the files of {s.REPO_DIR} that git ls-files --cached --others --exclude-standard lists")
    else:
      listing = subprocess.run(
        ["git", "-C", s.REPO_DIR, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
      )
      with tarfile.open(bundle, "w:gz") as tar:
        for name in listing.stdout.decode().split("\0"):
          path = os.path.join(s.REPO_DIR, name)
          if name and os.path.lexists(path):  # a tracked file deleted in the checkout is left out
            tar.add(path, arcname=name, recursive=False)
      self.log(f"bundled {s.REPO_DIR} ({os.path.getsize(bundle) / 2**20:.1f} MiB)")
    return files + [bundle]

  def ensure_slice(self) -> None:
    """Waits until the queued resource is ACTIVE: creates it, or deletes and recreates it after a preemption."""
    last = None
    while True:
      state = self.gc.state()
      if state != last:
        self.log(f"queued resource {self.s.QR_NAME}: {state}")
      last = state
      action = slice_action(state)
      if action == "ready":
        return
      if action == "create":
        self.gc.create()
      elif action == "delete":
        self.gc.delete()
      self.pause()

  def launch_run(self, files: list[str]) -> bool:
    """Installs and starts the run on every worker; False (the run stopped where it did start) when a worker fails
    to start it."""
    self.gc.scp(files)
    if self.gc.ssh(install_command(self.s))[0]:
      raise GcloudError("installing the project on the workers failed (see above)")
    if self.gc.ssh(f"bash {WORKER_SCRIPT} start")[0]:
      # A worker that did not start (e.g. its data mount failed) leaves the others waiting for it: end them.
      self.log("the run did not start on every worker (see above); stopping it where it did")
      self.query("kill 60")
      return False
    self.log(
      f"started on every worker, detached; logs: ~/mmbert_run/logs/worker-<i>.log on each worker, copied to "
      f"{self.s.WORKDIR}/logs/"
    )
    self.log(
      "this launcher only watches from here on: 'launch/tpu_pod.sh status|logs|stop' with the same TPU_NAME and ZONE"
    )
    return True

  def watch(self) -> Ending:
    """Waits for the run on all workers to end (SLICE_LOST: the slice left ACTIVE while it ran)."""
    first_exit, expected = None, 0
    while True:
      self.pause()
      if not self.dry_run:
        state = self.gc.state()
        if state != ACTIVE:
          self.log(f"queued resource is {state} during the run")
          return Ending(SLICE_LOST, lost_state=state)
      w = summarize(self.query("state"))
      expected = max(expected, w.total)
      verdict, first_exit = judge_workers(w, expected, first_exit, self.clock(), self.s.HANG_SECONDS)
      if verdict in ("ended", "stopped"):
        return Ending(w.code, stopped=verdict == "stopped", failed_worker=w.failed_worker)
      if verdict == "stop_others":
        if w.failed_worker is None:
          self.log(
            f"{w.exited} of {w.total} workers exited (status {w.code}) {self.s.HANG_SECONDS} s ago; stopping the others"
          )
        self.query("kill 120")
        return Ending(w.code, failed_worker=w.failed_worker)

  def start(self) -> int:
    if self.dry_run:
      print("# dry run: commands are printed, not run")
      return self.supervise(self.make_files(tempfile.gettempdir()))
    directory = tempfile.mkdtemp(prefix="mmbert_launch.")
    try:
      return self.supervise(self.make_files(directory))
    finally:
      shutil.rmtree(directory, ignore_errors=True)

  def supervise(self, files: list[str]) -> int:
    """Launches or attaches, watches, and relaunches after a preemption until the run ends or the budget is spent."""
    s, once = self.s, self.args.once
    while True:
      self.ensure_slice()
      w = Workers() if self.dry_run else summarize(self.query("state"))
      if should_attach(w):
        self.log(f"the run is already going on {w.running} of {w.total} workers: watching it (not starting another)")
      elif not self.launch_run(files):
        return EXIT_FAILED
      end = self.watch()
      if end.stopped:
        self.log(f"run stopped by 'tpu_pod.sh stop' (status {end.code}); 'start' resumes it")
        return end.code
      code, state = end.code, None
      if code not in (0, EXIT_BAD_INPUT) and not once:
        self.pause()  # a slice going away can fail the run before its state shows it
        state = self.gc.state()
      decision = decide(code, end.lost_state or state, once)
      if decision == "done":
        self.log(f"training finished; checkpoints in {s.WORKDIR}")
        if s.DELETE_WHEN_DONE:
          self.gc.delete()
        return 0
      if decision == "once":
        self.log(f"run exited with status {code} (--once: not restarting)")
        return code
      if decision == "bad_input":
        self.log(f"run rejected its command or config (status {code}, see the worker logs); not restarting")
        return code
      if decision == "failed":
        who = f"worker {end.failed_worker}" if end.failed_worker is not None else "run"
        see = (
          f"launch/tpu_pod.sh logs {end.failed_worker}" if end.failed_worker is not None else "launch/tpu_pod.sh logs"
        )
        self.log(f"{who} failed with status {code} on an ACTIVE slice; not restarting (see '{see}')")
        return code
      refusal = restart_refusal(self.restart_times, self.clock(), s.MAX_RESTARTS_PER_HOUR, s.MAX_RESTARTS)
      if refusal:
        self.log(refusal)
        return EXIT_FAILED
      recent = restarts_in_last_hour(self.restart_times, self.clock())
      delay = backoff_seconds(recent, s.BACKOFF_SECONDS, s.BACKOFF_MAX_SECONDS)
      how = f"slice lost, now {state}" if end.lost_state else f"exit status {code}, slice {state}"
      self.log(
        f"preempted ({how}); resuming from {s.WORKDIR} in {delay:g} s (restart "
        f"{len(self.restart_times) + 1}/{s.MAX_RESTARTS}, {recent + 1} within the hour)"
      )
      self.sleep(delay)
      self.restart_times.append(self.clock())


def main(argv: Sequence[str] | None = None, environ: dict | None = None) -> int:
  environ = os.environ if environ is None else environ
  try:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.help:
      print(__doc__.strip())
      return 0
    s = load_settings(environ, args)
    if not args.dry_run and shutil.which("gcloud") is None:
      raise BadInput("gcloud not found; install the Google Cloud CLI (https://cloud.google.com/sdk)")
  except BadInput as e:
    print(f"tpu_pod: error: {e}", file=sys.stderr)
    return EXIT_BAD_INPUT
  clock = VirtualClock()
  if args.dry_run:
    launcher = Launcher(s, args, DryRunGcloud(s), clock=clock, sleep=clock.sleep)
  else:
    launcher = Launcher(s, args, Gcloud(s))
  try:
    return {"start": launcher.start, "status": launcher.status, "logs": launcher.logs, "stop": launcher.stop}[
      args.command
    ]()
  except GcloudError as e:
    log(f"error: {e}")
    return EXIT_FAILED
  except KeyboardInterrupt:
    if args.command == "start":
      log("stopped watching; the run goes on ('start' watches it again, 'stop' ends it)")
    return 130


if __name__ == "__main__":
  sys.stdout.reconfigure(line_buffering=True)
  sys.exit(main())
