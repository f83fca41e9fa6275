"""Tests for the launch scripts: the TPU pod supervisor's decisions as functions and its loop against a stand-in
for the gcloud layer on a virtual clock, dry runs and runs through a fake `gcloud`, the worker control script run
locally; SLURM task layout and requeues with stub commands; Colab notebook structure."""

import importlib.util
import json
import os
import pathlib
import re
import shlex
import stat
import subprocess
import sys
import threading
import time

import pytest

pytestmark = pytest.mark.launch

ROOT = pathlib.Path(__file__).resolve().parents[1]
POD = ROOT / "launch" / "tpu_pod.sh"
WORKER = ROOT / "launch" / "worker.sh"
SLURM = ROOT / "launch" / "gpu_slurm.sbatch"
NOTEBOOK = ROOT / "launch" / "colab_tpu.ipynb"


def _stub(directory: pathlib.Path, name: str, body: str) -> None:
  path = directory / name
  path.write_text("#!/bin/bash\n" + body)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def guarded_env(tmp_path):
  """An environment whose `gcloud` only records that it was called: a dry run must never call it."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _stub(bin_dir, "gcloud", f'echo "$@" >> {tmp_path}/gcloud_calls; exit 1\n')
  env = {k: v for k, v in os.environ.items() if not k.startswith(("DRY_RUN", "TPU_", "ZONE", "PROJECT", "WORKDIR"))}
  env["PATH"] = f"{bin_dir}:{env['PATH']}"
  return env, tmp_path / "gcloud_calls"


def _pod(env, *args, **extra_env):
  return subprocess.run(["bash", str(POD), *args], env={**env, **extra_env}, capture_output=True, text=True, timeout=60)


def test_scripts_pass_bash_syntax_check():
  for script in (POD, WORKER, SLURM):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _run_env(dry_run_stdout: str) -> str:
  """The run settings (~/mmbert_run/run.env) a dry run prints (as comment lines) before the gcloud commands."""
  lines = dry_run_stdout.splitlines()
  start = next(i for i, l in enumerate(lines) if l.startswith("# /tmp/mmbert_run.env")) + 1
  body = []
  for l in lines[start:]:
    if not l.startswith("#   "):
      break
    body.append(l[4:])
  return "\n".join(body) + "\n"


def _env_array(env: str, name: str) -> list[str]:
  """The words of the bash array NAME=(...) in a run settings file."""
  return shlex.split(re.search(rf"^{name}=\((.*)\)$", env, re.M).group(1))


def test_pod_dry_run_prints_create_install_and_detached_start_on_all_workers(guarded_env):
  env, calls = guarded_env
  r = _pod(
    env,
    "--dry-run",
    "--",
    "--config.train_tokens=100",
    WORKDIR="gs://bucket/run1",
    CONFIG="configs/pretrain.py:base",
    TPU_NAME="pod-a",
    ZONE="us-east5-b",
    PROJECT="proj",
    ACCELERATOR_TYPE="v6e-64",
    RUNTIME_VERSION="v2-alpha-tpuv6e",
    CAPACITY="spot",
  )
  assert r.returncode == 0, r.stderr
  out = r.stdout
  assert not calls.exists(), "a dry run called gcloud"
  lines = out.splitlines()

  create = [l for l in lines if "queued-resources create" in l]
  assert len(create) == 1
  for flag in (
    "gcloud compute tpus queued-resources create pod-a-qr",
    "--node-id=pod-a",
    "--zone=us-east5-b",
    "--project=proj",
    "--accelerator-type=v6e-64",
    "--runtime-version=v2-alpha-tpuv6e",
    "--spot",
  ):
    assert flag in create[0]
  assert any(l.startswith("gcloud compute tpus queued-resources describe pod-a-qr") for l in lines)

  scp = [l for l in lines if "tpu-vm scp" in l]
  assert len(scp) == 1 and "--worker=all" in scp[0] and "pod-a:" in scp[0]
  assert f"{WORKER} /tmp/mmbert_run.env /tmp/mmbert_jax_bundle.tgz pod-a:" in scp[0]
  ssh = [l for l in lines if l.startswith("gcloud compute tpus tpu-vm ssh pod-a")]
  assert len(ssh) == 3 and all("--worker=all" in l for l in ssh)
  install, start, watch = ssh
  install_cmd = _remote_command(out, "pip install")
  assert "'jax[tpu]==0.10.2'" in install_cmd and "pip install" in install
  assert "cp ~/worker.sh ~/mmbert_run/worker.sh && cp ~/mmbert_run.env ~/mmbert_run/run.env" in install
  assert "'--command=bash ~/mmbert_run/worker.sh start'" in start
  assert "worker.sh state" in watch
  # The run settings hold the command; the worker script starts it detached (new session, no hangup, no terminal).
  env = _run_env(out)
  assert (
    "ARGS=(-m mmbert_jax.main --config=configs/pretrain.py:base --workdir=gs://bucket/run1 "
    "--config.train_tokens=100)" in env
  )
  assert "ENVS=(MMBERT_DISTRIBUTED=1 JAX_COORDINATOR_PORT=8476)" in env
  assert 'setsid nohup bash "$0" _supervise >> "$LOG" 2>&1 < /dev/null &' in WORKER.read_text()
  assert "GCSFUSE_FLAGS=()" in env and "DATA_BUCKET=''" in env  # no DATA_BUCKET: no mount
  # Order: the slice exists before anything is copied, the code before it starts, and it starts before the watch.
  assert (
    out.index("queued-resources create")
    < out.index("tpu-vm scp")
    < out.index("worker.sh start'")
    < out.index("worker.sh state")
  )


def test_pod_dry_run_mounts_data_bucket_with_gcsfuse(guarded_env):
  guarded, _ = guarded_env
  r = _pod(
    guarded, "--dry-run", WORKDIR="gs://bucket/run1", DATA_BUCKET="gs://data-bkt/prepared/v1", GCSFUSE_CACHE_MB="1000"
  )
  assert r.returncode == 0, r.stderr
  env, script = _run_env(r.stdout), WORKER.read_text()
  assert "DATA_BUCKET=data-bkt" in env and "DATA_MOUNT=/mnt/mmbert-data" in env
  assert "--config.data.data_dir=/mnt/mmbert-data/prepared/v1" in env
  flags = _env_array(env, "GCSFUSE_FLAGS")
  assert flags[:2] == ["-o", "ro"] and "--implicit-dirs" in flags
  assert "--metadata-cache-ttl-secs=-1" in flags and "--stat-cache-max-size-mb=-1" in flags
  assert "--cache-dir=/tmp/gcsfuse-cache" in flags and "--file-cache-max-size-mb=1000" in flags
  assert 'gcsfuse "${GCSFUSE_FLAGS[@]}" "$DATA_BUCKET" "$DATA_MOUNT"' in script
  assert script.index("mount_data >>") < script.index("setsid nohup")  # mounted before the run starts
  no_cache = _run_env(
    _pod(guarded, "--dry-run", WORKDIR="gs://b/r", DATA_BUCKET="data-bkt", GCSFUSE_CACHE_MB="0").stdout
  )
  assert "--cache-dir" not in no_cache and _env_array(no_cache, "ARGS")[-1] == "--config.data.data_dir=/mnt/mmbert-data"
  both = _pod(guarded, "--dry-run", "--", "--config.data.data_dir=gs://x/y", WORKDIR="gs://b/r", DATA_BUCKET="gs://d")
  assert both.returncode == 2 and "do not pass --config.data.data_dir=gs://x/y" in both.stderr


def test_pod_dry_run_status_logs_stop(guarded_env):
  env, calls = guarded_env
  status = _pod(env, "status", "--dry-run", TPU_NAME="pod-a", ZONE="us-east5-b", STATUS_LINES="7")
  assert status.returncode == 0, status.stderr
  assert "queued-resources describe pod-a-qr" in status.stdout
  line = next(l for l in status.stdout.splitlines() if "tpu-vm ssh pod-a" in l)
  assert "--worker=all" in line and "bash ~/mmbert_run/worker.sh status 7" in line
  logs = _pod(env, "logs", "-f", "3", "--dry-run", TPU_NAME="pod-a")
  assert logs.returncode == 0, logs.stderr
  assert "--worker=3 '--command=bash ~/mmbert_run/worker.sh logs -f 100'" in logs.stdout
  assert (
    "--worker=0 '--command=bash ~/mmbert_run/worker.sh logs 20'"
    in _pod(env, "logs", "--dry-run", LOG_LINES="20").stdout
  )
  stop = _pod(env, "stop", "--dry-run", TPU_NAME="pod-a", STOP_WAIT_SECONDS="60")
  assert stop.returncode == 0, stop.stderr
  line = next(l for l in stop.stdout.splitlines() if "tpu-vm ssh pod-a" in l)
  assert "--worker=all" in line and "bash ~/mmbert_run/worker.sh stop 60" in line
  assert not calls.exists()
  assert "-f only goes with logs" in _pod(env, "status", "-f").stderr


def test_pod_dry_run_restarts_after_preemption(guarded_env):
  env, calls = guarded_env
  r = _pod(
    env,
    "--dry-run",
    WORKDIR="gs://bucket/run2",
    DRY_RUN_STATES="MISSING ACTIVE SUSPENDED SUSPENDED MISSING ACTIVE",
    DRY_RUN_EXIT_CODES="255 0",
  )
  assert r.returncode == 0, r.stderr
  assert not calls.exists()
  out = r.stdout
  steps = [m.group(0) for m in re.finditer(r"queued-resources (create|delete)|worker\.sh start'", out)]
  assert steps == [
    "queued-resources create",
    "worker.sh start'",
    "queued-resources delete",
    "queued-resources create",
    "worker.sh start'",
  ]
  assert "--force" in next(l for l in out.splitlines() if "queued-resources delete" in l)
  assert "preempted" in r.stderr and "resuming from gs://bucket/run2" in r.stderr
  # The run settings (the command) are written once: the relaunch resumes the same run from the workdir.
  assert out.count("# /tmp/mmbert_run.env") == 1 and out.count("tpu-vm scp") == 2


def test_pod_restarts_only_a_preempted_run(guarded_env):
  """Exit 75 (preempted: SIGTERM, checkpoint saved) restarts even on a healthy slice; a failure (1) or bad input
  (2) on a healthy slice is not retried and becomes the script's status."""
  env, _ = guarded_env
  r = _pod(
    env,
    "--dry-run",
    WORKDIR="gs://bucket/run3",
    DRY_RUN_STATES="MISSING ACTIVE ACTIVE ACTIVE ACTIVE ACTIVE",
    DRY_RUN_EXIT_CODES="75 1",
  )
  assert r.returncode == 1, r.stderr
  assert r.stdout.count("worker.sh start'") == 2 and r.stdout.count("queued-resources create") == 1
  assert "preempted (exit status 75" in r.stderr and "not restarting" in r.stderr
  bad = _pod(
    env, "--dry-run", WORKDIR="gs://bucket/run3", DRY_RUN_STATES="MISSING ACTIVE ACTIVE", DRY_RUN_EXIT_CODES="2"
  )
  assert bad.returncode == 2 and bad.stdout.count("worker.sh start'") == 1 and "not restarting" in bad.stderr
  once = _pod(env, "--dry-run", "--once", WORKDIR="gs://bucket/run3", DRY_RUN_EXIT_CODES="7")
  assert once.returncode == 7 and once.stdout.count("worker.sh start'") == 1


def test_pod_git_install_and_on_demand(guarded_env):
  env, _ = guarded_env
  r = _pod(
    env,
    "--dry-run",
    WORKDIR="gs://bucket/run4",
    INSTALL="git",
    GIT_URL="https://example.com/mmbert_jax.git",
    GIT_REF="v1.0",
    CAPACITY="on-demand",
  )
  assert r.returncode == 0, r.stderr
  scp = next(l for l in r.stdout.splitlines() if "tpu-vm scp" in l)
  assert "bundle" not in scp and f"{WORKER} /tmp/mmbert_run.env mmbert-pod:" in scp  # only the script and settings
  assert "git clone -q https://example.com/mmbert_jax.git" in r.stdout and "checkout -q v1.0" in r.stdout
  create = next(l for l in r.stdout.splitlines() if "queued-resources create" in l)
  assert "--spot" not in create and "--reserved" not in create


@pytest.mark.parametrize(
  "args,extra,message",
  [
    ((), {}, "set WORKDIR"),
    ((), {"WORKDIR": "/local/dir"}, "WORKDIR must be a gs:// path"),
    (("--bogus",), {"WORKDIR": "gs://b/r"}, "unknown argument '--bogus'"),
    ((), {"WORKDIR": "gs://b/r", "CAPACITY": "cheap"}, "CAPACITY must be spot, reserved or on-demand"),
    ((), {"WORKDIR": "gs://b/r", "INSTALL": "git"}, "INSTALL=git needs GIT_URL"),
    ((), {"WORKDIR": "gs://b/r", "POLL_SECONDS": "soon"}, "POLL_SECONDS must be a non-negative integer"),
    ((), {"WORKDIR": "gs://b/r", "BACKOFF_SECONDS": "-5"}, "BACKOFF_SECONDS must be a non-negative integer"),
    ((), {"WORKDIR": "gs://b/r", "MAX_RESTARTS_PER_HOUR": "x"}, "MAX_RESTARTS_PER_HOUR must be a non-negative"),
    ((), {"WORKDIR": "gs://b/r", "DATA_BUCKET": "gs://Bad_Bucket"}, "DATA_BUCKET must be gs://BUCKET"),
    ((), {"WORKDIR": "gs://b/r", "DATA_BUCKET": "d", "DATA_MOUNT": "data"}, "DATA_MOUNT must be an absolute path"),
    (("logs", "--once"), {}, "--once only goes with start"),
  ],
)
def test_pod_bad_settings_fail_with_clear_error(guarded_env, args, extra, message):
  env, calls = guarded_env
  r = _pod(env, *args, **extra)
  assert r.returncode == 2
  assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
  assert not calls.exists()


def test_pod_help_documents_variables(guarded_env):
  env, _ = guarded_env
  r = _pod(env, "--help")
  assert r.returncode == 0
  for var in (
    "TPU_NAME",
    "ZONE",
    "ACCELERATOR_TYPE",
    "RUNTIME_VERSION",
    "PROJECT",
    "CONFIG",
    "WORKDIR",
    "DATA_BUCKET",
    "--dry-run",
    "status",
    "logs [-f] [WORKER]",
    "stop",
    "BACKOFF_SECONDS",
    "BACKOFF_MAX_SECONDS",
    "MAX_RESTARTS_PER_HOUR",
    "MAX_RESTARTS ",
  ):
    assert var in r.stdout


# --- The pod supervisor's decisions, and its loop against a stand-in gcloud layer on a virtual clock ---------------


def _load_tpu_pod():
  spec = importlib.util.spec_from_file_location("tpu_pod", ROOT / "launch" / "tpu_pod.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules["tpu_pod"] = module  # dataclasses look their module up
  spec.loader.exec_module(module)
  return module


tp = _load_tpu_pod()


def _states(*workers):
  """MMBERT_STATE lines as worker.sh prints them: None running, an int exited with that status, a str that state."""
  lines = []
  for i, w in enumerate(workers):
    if w is None:
      lines.append(f"MMBERT_STATE worker={i} state=running code=- pid={100 + i}")
    elif isinstance(w, int):
      lines.append(f"MMBERT_STATE worker={i} state=exited code={w} pid=-")
    else:
      lines.append(f"MMBERT_STATE worker={i} state={w} code=- pid=-")
  return "\n".join(lines) + "\n"


def test_summarize_reads_the_worker_states():
  w = tp.summarize("ssh: warning\n" + _states(None, 75, 1, "lost", 3, "none"))
  assert (w.total, w.running, w.exited, w.stopped) == (6, 1, 5, 0)
  assert w.code == 1 and w.failed_worker == "2"  # the first failure, not 75 and not the later 3
  w = tp.summarize(_states(0, 75, 0))
  assert (w.code, w.failed_worker, w.running, w.exited) == (75, None, 0, 3)
  assert tp.summarize(_states("lost", 0)).code == 75  # a VM that lost its run was preempted
  assert tp.summarize(_states(0, 0)).code == 0
  w = tp.summarize("MMBERT_STATE worker=0 state=exited,stopped code=75 pid=7\n" + _states(None)[:-1] + "\n")
  assert (w.total, w.stopped, w.running, w.code) == (2, 1, 1, 75)
  assert tp.summarize("") == tp.Workers()


def test_slice_action_creates_recreates_or_waits():
  expected = {
    "ACTIVE": "ready",
    "MISSING": "create",
    "SUSPENDING": "delete",
    "SUSPENDED": "delete",
    "FAILED": "delete",
    "WAITING_FOR_RESOURCES": "wait",
    "PROVISIONING": "wait",
    "ACCEPTED": "wait",
    "CREATING": "wait",
    "DELETING": "wait",
  }
  assert {state: tp.slice_action(state) for state in expected} == expected


def test_decide_restarts_only_a_preempted_run_or_a_lost_slice():
  for state in ("ACTIVE", "SUSPENDED", "MISSING", None):
    active = state in ("ACTIVE", None)
    assert tp.decide(0, state, once=False) == "done"
    assert tp.decide(75, state, once=False) == "restart"
    assert tp.decide(2, state, once=False) == "bad_input"  # a wrong command fails the same way on any slice
    for code in (1, 3, 137, 255):
      assert tp.decide(code, state, once=False) == ("failed" if active else "restart")
    for code in (1, 2, 75, tp.SLICE_LOST):
      assert tp.decide(code, state, once=True) == "once"


def test_backoff_doubles_from_base_up_to_the_cap():
  assert [tp.backoff_seconds(n, 30, 1800) for n in range(9)] == [30, 60, 120, 240, 480, 960, 1800, 1800, 1800]
  assert [tp.backoff_seconds(n, 5, 17) for n in range(4)] == [5, 10, 17, 17]
  assert tp.backoff_seconds(3, 0, 1800) == 0


def test_restart_budget_counts_restarts_within_the_last_hour():
  assert tp.restart_refusal([], 0.0, per_hour=2, max_total=100) is None
  assert tp.restart_refusal([0.0], 10.0, per_hour=2, max_total=100) is None
  refusal = tp.restart_refusal([0.0, 100.0], 3599.0, per_hour=2, max_total=100)
  assert "2 restarts within the last hour (MAX_RESTARTS_PER_HOUR=2); giving up" in refusal
  assert tp.restart_refusal([0.0, 100.0], 3600.0, per_hour=2, max_total=100) is None  # the first one is an hour old
  assert tp.restarts_in_last_hour([0.0, 100.0, 3000.0], 3650.0) == 2  # 0.0 is 3650 s old
  assert "MAX_RESTARTS=3" in tp.restart_refusal([0.0, 1e5, 2e5], 3e5, per_hour=6, max_total=3)
  assert tp.restart_refusal([0.0], 1.0, per_hour=0, max_total=100) is not None  # 0: never restart


def test_judge_workers_stops_the_others_at_once_after_a_failure_else_after_hang_seconds():
  judge = tp.judge_workers
  assert judge(tp.summarize(_states(None, None)), 2, None, 0.0, 900) == ("wait", None)
  assert judge(tp.summarize(_states(None)), 2, None, 0.0, 900) == ("wait", None)  # a worker did not answer
  assert judge(tp.summarize(_states(None, 1)), 2, None, 5.0, 900) == ("stop_others", None)
  assert judge(tp.summarize(_states(75, 0)), 2, None, 5.0, 900) == ("ended", None)
  stopped = tp.summarize("MMBERT_STATE worker=0 state=exited,stopped code=75 pid=-\n")
  assert judge(stopped, 1, None, 5.0, 900) == ("stopped", None)
  one_done = tp.summarize(_states(None, 75))
  assert judge(one_done, 2, None, 100.0, 900) == ("wait", 100.0)  # the first exit starts the hang clock
  assert judge(one_done, 2, 100.0, 1000.0, 900) == ("wait", 100.0)
  assert judge(one_done, 2, 100.0, 1000.5, 900) == ("stop_others", 100.0)


def test_should_attach_to_a_run_still_going():
  assert tp.should_attach(tp.summarize(_states(75, None)))
  assert not tp.should_attach(tp.summarize(_states(0, 1)))
  assert not tp.should_attach(tp.summarize(_states("none", "none")))


def test_run_env_survives_the_worker_shell_verbatim(tmp_path):
  """Values with quotes, $(...), globs and spaces reach the training command unchanged when worker.sh sources
  the settings file (the old launcher generated bash and had to escape every value by hand)."""
  flags = ('--config.wandb.name=it\'s "x" $(touch pwned) `id` * ; \\', "--config.seed=1")
  args = tp.parse_args(["--", *flags])
  s = tp.load_settings(
    {
      "WORKDIR": "gs://b/r x",
      "INSTALL": "git",
      "GIT_URL": "u",
      "LIBTPU_INIT_ARGS": "--a=1 --b='2 3'",
      "DATA_BUCKET": "gs://data/dir",
      "DATA_MOUNT": "/mnt/my data",
      "REMOTE_DIR": "code dir",
    },
    args,
  )
  (tmp_path / "run.env").write_text(tp.run_env(s, args.main_flags))
  show = 'printf "%s\\n" "$REMOTE_DIR" "$WORKDIR" "$DATA_MOUNT" "${ENVS[@]}" "${ARGS[@]}"'
  r = subprocess.run(["bash", "-c", f". ./run.env && {show}"], cwd=tmp_path, capture_output=True, text=True, timeout=10)
  assert r.returncode == 0, r.stderr
  assert r.stdout.splitlines() == [
    "code dir",
    "gs://b/r x",
    "/mnt/my data",
    "MMBERT_DISTRIBUTED=1",
    "JAX_COORDINATOR_PORT=8476",
    "LIBTPU_INIT_ARGS=--a=1 --b='2 3'",
    "-m",
    "mmbert_jax.main",
    "--config=configs/pretrain.py",
    "--workdir=gs://b/r x",
    "--config.data.data_dir=/mnt/my data/dir",
    *flags,
  ]
  assert not (tmp_path / "pwned").exists()


class FakeGcloud:
  """Stands in for tpu_pod.Gcloud: a slice whose queued resource goes through `states` (one per describe, the last
  one stays) and whose runs go through `runs`: per start, a list of snapshots (one per state query, the last one
  stays), each a status per worker (None: running). Before the first start the workers report `initial`."""

  def __init__(self, runs, states=("MISSING", "ACTIVE"), initial=("none",)):
    self.runs, self.states = [list(r) for r in runs], list(states)
    self.snapshots = [tuple(initial)]
    self.fresh = ("none",) * len(initial)  # the workers of a new slice
    self.calls = []

  def state(self):
    self.calls.append("describe")
    return self.states.pop(0) if len(self.states) > 1 else self.states[0]

  def create(self):
    self.calls.append("create")
    self.snapshots = [self.fresh]

  def delete(self):
    self.calls.append("delete")
    self.snapshots = [self.fresh]

  def scp(self, files):
    self.calls.append("scp")

  def ssh(self, command, worker="all", capture=False):
    if "worker.sh start" in command:
      self.calls.append("start")
      self.snapshots = self.runs.pop(0)
    elif "worker.sh state" in command:
      self.calls.append("query")
      snapshot = self.snapshots.pop(0) if len(self.snapshots) > 1 else self.snapshots[0]
      return 0, _states(*snapshot)
    elif "worker.sh kill" in command:
      self.calls.append("kill")
      self.snapshots = [tuple(137 if c is None else c for c in self.snapshots[-1])]  # SIGKILL
    elif "pip install" in command:
      self.calls.append("install")
    return 0, ""


def _supervise(gcloud, once=False, **env):
  """Runs the start loop on a virtual clock; returns (status, the clock, the log lines)."""
  args = tp.Args(once=once)
  s = tp.load_settings({"WORKDIR": "gs://b/run", "INSTALL": "git", "GIT_URL": "u", "POLL_SECONDS": "7", **env}, args)
  clock, lines = tp.VirtualClock(), []
  launcher = tp.Launcher(s, args, gcloud, clock=clock, sleep=clock.sleep, log=lines.append)
  return launcher.supervise(["worker.sh", "mmbert_run.env"]), clock, lines


@pytest.mark.parametrize("polls", [1, 80])
def test_always_preempted_run_backs_off_and_stops_at_the_budget(polls):
  """A worker that always exits 75 (at once, or after 80 polls of 7 s: ~10 minutes a cycle) is restarted after 30,
  60, 120, ... s and, at MAX_RESTARTS_PER_HOUR restarts within the hour, the launch ends with status 1 and one line;
  no real time passes."""
  gcloud = FakeGcloud(runs=[[(None,)] * polls + [(75,)]] * 10)
  rc, clock, lines = _supervise(gcloud)
  assert rc == 1
  backoffs = [t for t in clock.slept if t != 7]  # POLL_SECONDS is 7
  assert backoffs == [min(30 * 2**i, 1800) for i in range(4)]
  assert gcloud.calls.count("start") == 5 and gcloud.calls.count("create") == 1
  assert lines[-1] == "restart budget spent: 4 restarts within the last hour (MAX_RESTARTS_PER_HOUR=4); giving up"
  assert sum("giving up" in l for l in lines) == 1
  restarts = [l for l in lines if l.startswith("preempted (exit status 75, slice ACTIVE)")]
  assert [int(re.search(r" in (\d+) s", l).group(1)) for l in restarts] == backoffs
  assert clock.now < 3600  # all within the hour


def test_backoff_and_budget_come_from_the_environment():
  gcloud = FakeGcloud(runs=[[(75,)]] * 10)
  rc, clock, lines = _supervise(gcloud, BACKOFF_SECONDS="5", BACKOFF_MAX_SECONDS="17", MAX_RESTARTS_PER_HOUR="3")
  assert rc == 1 and [t for t in clock.slept if t != 7] == [5, 10, 17]
  assert "MAX_RESTARTS_PER_HOUR=3" in lines[-1] and gcloud.calls.count("start") == 4


def test_preemptions_hours_apart_restart_without_growing_delays():
  """The budget and the backoff count the last hour only: a run preempted every ~70 minutes goes on."""
  long_run = [(None,)] * 600 + [(75,)]  # 600 polls of 7 s each, then preempted
  gcloud = FakeGcloud(runs=[long_run] * 8 + [[(0,)]])
  rc, clock, lines = _supervise(gcloud, MAX_RESTARTS_PER_HOUR="2")
  assert rc == 0 and lines[-1] == "training finished; checkpoints in gs://b/run"
  assert [t for t in clock.slept if t != 7] == [30] * 8 and gcloud.calls.count("start") == 9


def test_lost_slice_is_recreated_and_restarted_but_a_failure_on_an_active_slice_is_not():
  # The slice is preempted while the run trains: the describe during the watch sees SUSPENDED.
  gcloud = FakeGcloud(
    runs=[[(None, None)], [(None, None), (0, 0)]],
    states=["MISSING", "ACTIVE", "ACTIVE", "SUSPENDED", "SUSPENDED", "SUSPENDED", "MISSING", "ACTIVE"],
  )
  rc, clock, lines = _supervise(gcloud)
  assert rc == 0
  steps = [c for c in gcloud.calls if c in ("create", "delete", "start")]
  assert steps == ["create", "start", "delete", "create", "start"]
  assert any(l.startswith("preempted (slice lost, now SUSPENDED)") for l in lines)
  # A describe that fails once (a network blip reads as MISSING) during the run: the restart finds the run still
  # going and attaches to it.
  gcloud = FakeGcloud(runs=[[(None,), (None,), (0,)]], states=["ACTIVE", "ACTIVE", "MISSING", "ACTIVE"])
  rc, _, lines = _supervise(gcloud)
  assert rc == 0 and gcloud.calls.count("start") == 1 and "create" not in gcloud.calls
  assert any(l.startswith("the run is already going on 1 of 1 workers") for l in lines)
  # A run failing with 1 while its slice goes away (a host lost mid-collective) is a preemption too ...
  gcloud = FakeGcloud(runs=[[(1,)], [(0,)]], states=["ACTIVE", "ACTIVE", "SUSPENDED", "MISSING", "ACTIVE"])
  assert _supervise(gcloud)[0] == 0 and gcloud.calls.count("start") == 2
  # ... on an ACTIVE slice it is a failure: no restart, the launch ends with the run's status.
  gcloud = FakeGcloud(runs=[[(1,)], [(0,)]], states=["ACTIVE"])
  rc, _, lines = _supervise(gcloud)
  assert rc == 1 and gcloud.calls.count("start") == 1 and "not restarting" in lines[-1]


def test_a_failing_worker_stops_the_others_and_ends_the_launch_with_one_line():
  gcloud = FakeGcloud(runs=[[(None,) * 4, (None, None, 3, None)]] * 2, states=["ACTIVE"], initial=("none",) * 4)
  rc, clock, lines = _supervise(gcloud, HANG_SECONDS="900")
  assert rc == 3
  assert gcloud.calls.count("start") == 1 and gcloud.calls.count("kill") == 1
  assert clock.now < 900  # the others were stopped at once, not after HANG_SECONDS
  after_start = lines[[i for i, l in enumerate(lines) if l.startswith("this launcher only watches")][-1] + 1 :]
  assert after_start == [
    "worker 2 failed with status 3 on an ACTIVE slice; not restarting (see 'launch/tpu_pod.sh logs 2')"
  ]


def test_a_worker_left_running_after_the_others_exited_is_stopped_after_hang_seconds():
  gcloud = FakeGcloud(runs=[[(None, None), (75, None)], [(0, 0)]], states=["ACTIVE"], initial=("none",) * 2)
  rc, clock, lines = _supervise(gcloud, HANG_SECONDS="100")
  assert rc == 0 and gcloud.calls.count("kill") == 1 and gcloud.calls.count("start") == 2
  assert any("1 of 2 workers exited (status 75) 100 s ago; stopping the others" in l for l in lines)
  # The hang clock started at the first exit: the kill came on the first poll more than 100 s later (queries: the
  # attach check, the poll that saw both running, the one that saw the exit, then 15 polls of 7 s to pass 100 s).
  assert gcloud.calls[: gcloud.calls.index("kill")].count("query") == 1 + 2 + 15


def test_a_running_run_is_watched_not_started_again():
  gcloud = FakeGcloud(runs=[], states=["ACTIVE"], initial=(None, None))
  gcloud.snapshots = [(None, None), (None, None), (0, 0)]
  rc, _, lines = _supervise(gcloud)
  assert rc == 0 and "start" not in gcloud.calls and "scp" not in gcloud.calls and "install" not in gcloud.calls
  assert "the run is already going on 2 of 2 workers: watching it (not starting another)" in lines
  # A run that ended (failed or not) is started anew.
  gcloud = FakeGcloud(runs=[[(0,)]], states=["ACTIVE"], initial=(1,))
  assert _supervise(gcloud)[0] == 0 and gcloud.calls.count("start") == 1


def test_once_and_stop_are_not_restarted():
  gcloud = FakeGcloud(runs=[[(75,)]] * 2, states=["ACTIVE"])
  rc, _, lines = _supervise(gcloud, once=True)
  assert rc == 75 and gcloud.calls.count("start") == 1 and "--once" in lines[-1]
  gcloud = FakeGcloud(runs=[[(None,), ("exited,stopped",)]] * 2, states=["ACTIVE"])
  rc, _, lines = _supervise(gcloud)
  assert rc == 75 and gcloud.calls.count("start") == 1 and "stopped by 'tpu_pod.sh stop'" in lines[-1]


def _slurm(tmp_path, tasks_per_node, gpus, nodes=2, **extra_env):
  """Runs the sbatch script as SLURM would, with `srun` and the interpreter replaced by recorders."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  _stub(
    bin_dir,
    "srun",
    'echo "SRUN $*"; echo "ENV MMBERT_DISTRIBUTED=$MMBERT_DISTRIBUTED '
    'JAX_LOCAL_DEVICE_IDS=${JAX_LOCAL_DEVICE_IDS:-unset} JAX_COORDINATOR_PORT=${JAX_COORDINATOR_PORT:-unset}"\n'
    "exit ${SRUN_EXIT:-0}\n",
  )
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_", "WORKDIR", "GPUS_PER_NODE"))}
  env.update(
    PATH=f"{bin_dir}:{env['PATH']}",
    SLURM_JOB_ID="1234",
    SLURM_JOB_NUM_NODES=str(nodes),
    SLURM_NTASKS=str(nodes * tasks_per_node),
    SLURM_NTASKS_PER_NODE=str(tasks_per_node),
    SLURM_GPUS_ON_NODE=str(gpus),
    SLURM_SUBMIT_DIR=str(ROOT),
    WORKDIR="/shared/run",
    CONFIG="launch/gpu_slurm.sbatch",
    PYTHON="/venv/bin/python",
    REQUEUE_LOG=str(tmp_path / "requeues"),  # not beside the job output in SLURM_SUBMIT_DIR (the checkout)
  )
  env.update(extra_env)
  return subprocess.run(
    ["bash", str(SLURM), "--config.train_tokens=5"], env=env, capture_output=True, text=True, timeout=60
  )


def test_slurm_one_process_per_gpu(tmp_path):
  # CONFIG points at an existing file so the script's existence check passes without configs/ in this checkout.
  r = _slurm(tmp_path, tasks_per_node=8, gpus=8)
  assert r.returncode == 0, r.stderr
  srun = next(l for l in r.stdout.splitlines() if l.startswith("SRUN"))
  assert "--kill-on-bad-exit=1" in srun
  assert srun.endswith(
    "/venv/bin/python -m mmbert_jax.main --config=launch/gpu_slurm.sbatch --workdir=/shared/run --config.train_tokens=5"
  )
  assert "MMBERT_DISTRIBUTED=1 JAX_LOCAL_DEVICE_IDS=unset JAX_COORDINATOR_PORT=unset" in r.stdout


@pytest.mark.parametrize("status,requeued", [(75, True), (1, False), (2, False)])
def test_slurm_requeues_only_a_preempted_run(tmp_path, status, requeued):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _stub(bin_dir, "scontrol", f'echo "SCONTROL $*" >> {tmp_path}/scontrol.log\n')
  r = _slurm(tmp_path, tasks_per_node=8, gpus=8, SRUN_EXIT=str(status))
  assert r.returncode == status, r.stderr
  log = tmp_path / "scontrol.log"
  assert (log.exists() and log.read_text() == "SCONTROL requeue 1234\n") == requeued


def test_slurm_requeue_budget_per_hour_and_in_all(tmp_path):
  """A run that exits 75 again and again is requeued MAX_REQUEUES_PER_HOUR times within an hour, then the job ends
  with status 1 and one line; requeues older than an hour do not count, nor does the budget of another job."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _stub(bin_dir, "scontrol", f'echo "SCONTROL $*" >> {tmp_path}/scontrol.log\n')
  log, scontrol = tmp_path / "requeues", tmp_path / "scontrol.log"
  now = int(time.time())
  log.write_text(f"{now - 7200}\n{now - 3700}\n")  # two requeues more than an hour ago
  codes = [_slurm(tmp_path, 8, 8, SRUN_EXIT="75", MAX_REQUEUES_PER_HOUR="3") for _ in range(4)]
  assert [r.returncode for r in codes] == [75, 75, 75, 1]
  assert scontrol.read_text() == "SCONTROL requeue 1234\n" * 3
  assert [l for l in codes[-1].stderr.splitlines() if l] == [
    "gpu_slurm.sbatch: preempted, not requeued: requeue budget spent, 3 requeues of job 1234 within the last hour "
    f"(MAX_REQUEUES_PER_HOUR=3, see {log})"
  ]
  assert len(log.read_text().split()) == 2 + 3 and all(now - 5 <= int(t) for t in log.read_text().split()[2:])
  assert "(3 within the hour)" in codes[2].stdout
  # In all: SLURM counts the job's requeues.
  r = _slurm(tmp_path, 8, 8, SRUN_EXIT="75", SLURM_RESTART_COUNT="100", REQUEUE_LOG=str(tmp_path / "other"))
  assert r.returncode == 1 and "requeued 100 times (MAX_REQUEUES=100)" in r.stderr
  assert len(r.stderr.strip().splitlines()) == 1 and scontrol.read_text().count("requeue") == 3
  assert (
    _slurm(tmp_path, 8, 8, SRUN_EXIT="75", SLURM_RESTART_COUNT="99", REQUEUE_LOG=str(tmp_path / "o2")).returncode == 75
  )
  # By default the times go beside the job's output file, named after the job.
  submit = tmp_path / "submit"
  submit.mkdir()
  r = _slurm(
    tmp_path,
    8,
    8,
    SRUN_EXIT="75",
    REQUEUE_LOG="",
    SLURM_SUBMIT_DIR=str(submit),
    REPO_DIR=str(ROOT),
    SLURM_JOB_NAME="mm",
  )
  assert r.returncode == 75 and len((submit / "mm-1234.requeues").read_text().split()) == 1
  bad = _slurm(tmp_path, 8, 8, MAX_REQUEUES_PER_HOUR="many")
  assert bad.returncode == 2 and "MAX_REQUEUES_PER_HOUR must be a non-negative integer" in bad.stderr


def test_slurm_one_process_per_node_sees_all_gpus(tmp_path):
  r = _slurm(tmp_path, tasks_per_node=1, gpus=4, COORDINATOR_PORT="9999")
  assert r.returncode == 0, r.stderr
  assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3 JAX_COORDINATOR_PORT=9999" in r.stdout


def test_slurm_rejects_bad_layouts(tmp_path):
  r = _slurm(tmp_path, tasks_per_node=3, gpus=8)
  assert r.returncode == 2 and "--ntasks-per-node=3 must be 1" in r.stderr and "SRUN" not in r.stdout
  r = _slurm(tmp_path, tasks_per_node=8, gpus=8, WORKDIR="")
  assert r.returncode == 2 and "set WORKDIR" in r.stderr
  r = _slurm(tmp_path, tasks_per_node=8, gpus=8, CONFIG="configs/nope.py")
  assert r.returncode == 2 and "config 'configs/nope.py' not found" in r.stderr


def test_slurm_directives_come_before_the_first_command():
  lines = SLURM.read_text().splitlines()
  first_command = next(i for i, l in enumerate(lines[1:], 1) if l.strip() and not l.startswith("#"))
  directives = [i for i, l in enumerate(lines) if l.startswith("#SBATCH")]
  assert directives and max(directives) < first_command
  text = "\n".join(lines[i] for i in directives)
  assert "--ntasks-per-node=8" in text and "--gres=gpu:8" in text


def _source(cell):
  return cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])


def test_colab_notebook_is_valid_nbformat4():
  nb = json.loads(NOTEBOOK.read_text())
  assert nb["nbformat"] == 4 and isinstance(nb["nbformat_minor"], int)
  assert isinstance(nb["metadata"], dict) and nb["metadata"].get("accelerator") == "TPU"
  cells = nb["cells"]
  assert cells and {c["cell_type"] for c in cells} == {"markdown", "code"}
  for cell in cells:
    assert isinstance(cell["metadata"], dict)
    assert isinstance(cell["source"], (str, list))
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and "execution_count" in cell
      python = "\n".join(l for l in _source(cell).splitlines() if not l.lstrip().startswith(("!", "%")))
      compile(python, f"<cell {cell.get('id')}>", "exec")
  code = "\n".join(_source(c) for c in cells if c["cell_type"] == "code")
  assert "jax[tpu]=={JAX_VERSION}" in code and 'JAX_VERSION = "0.10.2"' in code
  assert "jax.devices()" in code
  assert "python -m mmbert_jax.main --config={CONFIG} --workdir={WORKDIR}" in code
  assert 'CONFIG = "configs/demo.py"' in code and 'WORKDIR = "/content/mmbert_demo"' in code


def _remote_command(dry_run_stdout: str, marker: str) -> str:
  line = next(l for l in dry_run_stdout.splitlines() if "tpu-vm ssh" in l and marker in l)
  return next(a for a in shlex.split(line) if a.startswith("--command="))[len("--command=") :]


def _worker_state(out: str) -> str:
  return next(l for l in out.splitlines() if l.startswith("MMBERT_STATE "))


def test_pod_worker_script_detaches_reports_stops_and_never_duplicates(guarded_env, tmp_path):
  """Runs the worker control script the launcher installs, with the run settings of a dry run, locally: the fake
  python trains until SIGTERM, then exits 75 like mmbert_jax.main; curl (the TPU metadata), gcloud (log upload),
  sudo, mountpoint and gcsfuse are stand-ins that record their calls."""
  env, _ = guarded_env
  mount, cache, uploads = tmp_path / "mnt", tmp_path / "cache", tmp_path / "uploads"
  r = _pod(
    env,
    "--dry-run",
    "--",
    "--config.wandb.name=two words",
    WORKDIR="gs://bucket/run5",
    CONFIG="configs/demo.py",
    LIBTPU_INIT_ARGS="--xla_a=1 --xla_b=2",
    DATA_BUCKET="gs://data-bkt/prepared",
    DATA_MOUNT=str(mount),
    GCSFUSE_CACHE_DIR=str(cache),
    LOG_UPLOAD_SECONDS="1",
  )
  assert r.returncode == 0, r.stderr
  install = _remote_command(r.stdout, "pip install")
  for command in (install, _remote_command(r.stdout, "worker.sh start"), _remote_command(r.stdout, "worker.sh state")):
    check = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr

  home = tmp_path / "home"
  (home / "mmbert_jax").mkdir(parents=True)
  (home / "mmbert_venv" / "bin").mkdir(parents=True)
  (home / "mmbert_run").mkdir()
  script = home / "mmbert_run" / "worker.sh"
  script.write_text(WORKER.read_text())
  _stub(
    home / "mmbert_venv" / "bin",
    "python",
    'echo "CWD $PWD"; printf "ARG %s\\n" "$@"; echo "ENV $MMBERT_DISTRIBUTED $JAX_COORDINATOR_PORT $LIBTPU_INIT_ARGS"\n'
    '[ -n "${FAKE_EXIT:-}" ] && exit "$FAKE_EXIT"\n'
    "trap 'echo \"SIGTERM: checkpoint saved\"; exit 75' TERM\n"
    "while :; do sleep 0.1; done\n",
  )
  bin_dir = tmp_path / "worker_bin"
  bin_dir.mkdir()
  _stub(bin_dir, "curl", "echo 3\n")  # agent-worker-number
  # A slow copy that reads the log when it starts and lands a second later: a copy still under way when the run is
  # reported exited, or an earlier one landing after the final one, leaves the uploaded log short of the exit line.
  _stub(
    bin_dir,
    "gcloud",
    f'echo "$@" >> {tmp_path}/worker_gcloud; t=$(mktemp); cp "$3" "$t"; sleep 1; mkdir -p {uploads}; '
    f'mv "$t" {uploads}/$(basename "$3")\n',
  )
  _stub(bin_dir, "sudo", 'exec "$@"\n')
  _stub(bin_dir, "mountpoint", f"[ -e {tmp_path}/mounted ]\n")
  _stub(bin_dir, "gcsfuse", f'echo "$@" >> {tmp_path}/gcsfuse_calls; touch {tmp_path}/mounted\n')
  wenv = {**env, "HOME": str(home), "PATH": f"{bin_dir}:{env['PATH']}"}

  def worker(*args, **extra):
    return subprocess.run(
      ["bash", str(script), *args], env={**wenv, **extra}, capture_output=True, text=True, timeout=60
    )

  pid_file, log = home / "mmbert_run" / "pid", home / "mmbert_run" / "logs" / "worker-3.log"
  assert "state=none" in _worker_state(worker("state").stdout)
  unset = worker("start")  # no run settings copied yet: nothing to start
  assert unset.returncode == 2 and "no run settings at" in unset.stdout and not pid_file.exists()
  (home / "mmbert_run" / "run.env").write_text(_run_env(r.stdout))
  try:
    started = worker("start")  # returns at once although training goes on: it is detached
    assert started.returncode == 0, started.stderr
    pid = int(pid_file.read_text())
    assert f"worker 3: started pid {pid}" in started.stdout
    assert os.getsid(pid) != os.getsid(0)  # its own session: no hangup
    assert _worker_state(worker("state").stdout) == f"MMBERT_STATE worker=3 state=running code=- pid={pid}"
    again = worker("start")
    assert f"already running (pid {pid}); not starting another" in again.stdout and int(pid_file.read_text()) == pid
    # The bucket was mounted once, read-only, before the run; the run reads the mount.
    fuse = (tmp_path / "gcsfuse_calls").read_text().splitlines()
    assert len(fuse) == 1 and fuse[0].startswith("-o ro --implicit-dirs") and fuse[0].endswith(f"data-bkt {mount}")
    assert f"--cache-dir={cache}" in fuse[0] and cache.is_dir()
    status = worker("status", "20").stdout
    assert "state=running" in status and "  [worker 3] ARG --config.wandb.name=two words" in status
    stopped = worker("stop", "30")
    assert _worker_state(stopped.stdout) == f"MMBERT_STATE worker=3 state=exited,stopped code=75 pid={pid}"
  finally:
    if pid_file.exists():
      try:
        os.killpg(os.getsid(int(pid_file.read_text())), 9)  # the detached session, if still up
      except ProcessLookupError:
        pass
  text = log.read_text()
  assert f"CWD {home / 'mmbert_jax'}" in text and "ENV 1 8476 --xla_a=1 --xla_b=2" in text
  assert [l[4:] for l in text.splitlines() if l.startswith("ARG ")] == [
    "-m",
    "mmbert_jax.main",
    "--config=configs/demo.py",
    "--workdir=gs://bucket/run5",
    f"--config.data.data_dir={mount}/prepared",
    "--config.wandb.name=two words",
  ]
  assert "SIGTERM: checkpoint saved" in text and "worker 3: exit status 75" in text
  assert text.count("worker 3: " + str(home)) == 1  # one training process only
  # The log went up to the workdir when the run ended (and while it ran).
  assert f"storage cp {log} gs://bucket/run5/logs/worker-3.log" in (tmp_path / "worker_gcloud").read_text()
  assert (uploads / "worker-3.log").read_text() == text
  assert worker("logs", "1").stdout == text.splitlines()[-1] + "\n"

  # A rerun after a failure starts anew (no stop marker left) and records the failure's status.
  failed = worker("start", FAKE_EXIT="1")
  assert failed.returncode == 0, failed.stderr
  for _ in range(50):
    state = _worker_state(worker("state").stdout)
    if "state=running" not in state:
      break
  assert "state=exited code=1 " in state
  assert len((tmp_path / "gcsfuse_calls").read_text().splitlines()) == 1  # still mounted: not mounted again


def test_slurm_sigterm_reaches_the_training_tasks_300s_before_the_limit():
  """`--signal=TERM@300` signals the job steps (the srun tasks that train); `B:TERM@300` would signal only the batch
  shell, which neither trains nor forwards it. --requeue lets `scontrol requeue` put the job back in the queue."""
  directives = [l.split(None, 1)[1] for l in SLURM.read_text().splitlines() if l.startswith("#SBATCH")]
  assert "--signal=TERM@300" in directives
  assert "--requeue" in directives
  assert not any(d.startswith("--signal=B:") for d in directives)


# A `--config.KEY=` example in the docs or launchers that names no key of a config would be refused by main.
CONFIG_FLAG = re.compile(r"--config\.([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)=")


def _config_keys():
  """Every dotted key path of the phase configs (base, pretrain, midtrain, decay, demo) with their defaults."""
  import importlib
  import sys

  sys.path.insert(0, str(ROOT))
  try:
    keys = set()
    for name in ("base", "pretrain", "midtrain", "decay", "demo"):

      def walk(node, prefix):
        for k in node.keys():
          keys.add(prefix + k)
          if hasattr(node[k], "keys"):
            walk(node[k], prefix + k + ".")

      walk(importlib.import_module(f"configs.{name}").get_config(), "")
    return keys
  finally:
    sys.path.remove(str(ROOT))


def test_config_flag_examples_name_real_config_keys():
  keys = _config_keys()
  assert "train_tokens" in keys and "data.data_dir" in keys and "model.hidden_size" in keys
  assert "train.steps" not in keys and "some.flag" not in keys  # what earlier examples wrongly used
  files = [ROOT / "README.md", *sorted((ROOT / "launch").iterdir())]
  found = {}
  for path in files:
    for m in CONFIG_FLAG.finditer(path.read_text()):
      found.setdefault(m.group(1), set()).add(path.name)
  assert {"train_tokens", "data.data_dir", "init_from"} <= found.keys()  # the regex finds the examples
  unknown = {k: sorted(v) for k, v in found.items() if k not in keys}
  assert not unknown, f"--config.KEY examples naming no config key: {unknown}"


@pytest.fixture
def one_worker_pod(tmp_path):
  """A fake `gcloud` for a one-worker slice that is always ACTIVE: `tpu-vm ssh` runs the command locally with HOME
  at a fake worker home, `tpu-vm scp` copies there. The worker's python trains for a moment and then exits with the
  next status in ~/codes (one per start), or runs until SIGTERM (exit 75) once ~/codes is empty."""
  home, bin_dir = tmp_path / "worker_home", tmp_path / "bin"
  (home / "mmbert_venv" / "bin").mkdir(parents=True)
  bin_dir.mkdir()
  _stub(
    bin_dir,
    "gcloud",
    f"""echo "$*" >> {tmp_path}/gcloud_calls
case "$*" in
  *"queued-resources describe"*) echo ACTIVE ;;
  *"tpu-vm scp"*) for a in "$@"; do if [ -f "$a" ]; then cp "$a" {home}/; fi; done ;;
  *"tpu-vm ssh"*) for a in "$@"; do case "$a" in --command=*) cmd=${{a#--command=}} ;; esac; done
                  cd {home} && HOME={home} bash -c "$cmd" ;;
esac
""",
  )
  _stub(bin_dir, "curl", "echo 0\n")
  _stub(home / "mmbert_venv" / "bin", "pip", "true\n")
  _stub(
    home / "mmbert_venv" / "bin",
    "python",
    """[ "$1" = -c ] && { echo "worker jax 0.10.2"; exit 0; }
echo "training $*"
code=$(head -n 1 ~/codes 2>/dev/null); sed -i 1d ~/codes 2>/dev/null
trap 'echo "SIGTERM: checkpoint saved"; exit 75' TERM
if [ -n "$code" ]; then sleep 1; exit "$code"; fi
while :; do sleep 0.1; done
""",
  )
  env = {k: v for k, v in os.environ.items() if not k.startswith(("DRY_RUN", "TPU_", "ZONE", "PROJECT", "WORKDIR"))}
  env.update(
    PATH=f"{bin_dir}:{env['PATH']}",
    WORKDIR="gs://bucket/live",
    PYTHON="python3",
    POLL_SECONDS="1",
    LOG_UPLOAD_SECONDS="1",
    BACKOFF_SECONDS="0",  # restarts at once, not after 30 s
  )
  yield env, home, tmp_path / "gcloud_calls"
  pid_file = home / "mmbert_run" / "pid"
  if pid_file.exists():
    try:
      os.killpg(os.getsid(int(pid_file.read_text())), 9)  # the detached training session, if still up
    except ProcessLookupError:
      pass


@pytest.mark.slow
def test_pod_watches_the_detached_run_and_relaunches_only_after_75(one_worker_pod):
  env, home, calls = one_worker_pod
  (home / "codes").write_text("75\n0\n")
  r = subprocess.run(["bash", str(POD)], env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  assert "preempted (exit status 75, slice ACTIVE)" in r.stderr and "training finished" in r.stderr
  gcloud = calls.read_text()
  assert gcloud.count("worker.sh start") == 2 and "queued-resources create" not in gcloud
  log = (home / "mmbert_run" / "logs" / "worker-0.log").read_text()
  assert log.count("training -m mmbert_jax.main --config=configs/pretrain.py --workdir=gs://bucket/live") == 2
  assert "exit status 75" in log and "exit status 0" in log

  (home / "codes").write_text("1\n")  # a failure is not relaunched
  r = subprocess.run(["bash", str(POD)], env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 1 and "not restarting" in r.stderr
  assert calls.read_text().count("worker.sh start") == 3


def test_pod_run_outlives_the_launcher_which_reattaches_and_stop_ends_it(one_worker_pod):
  env, home, calls = one_worker_pod
  launcher = subprocess.Popen(
    ["bash", str(POD)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
  )
  pid_file = home / "mmbert_run" / "pid"
  try:
    for _ in range(300):
      if pid_file.exists() and pid_file.read_text().strip():
        break
      threading.Event().wait(0.1)
    pid = int(pid_file.read_text())
  finally:
    os.killpg(launcher.pid, 9)  # the laptop goes away mid-run
    launcher.wait()
  threading.Event().wait(1.5)
  os.kill(pid, 0)  # training goes on
  status = subprocess.run(["bash", str(POD), "status"], env=env, capture_output=True, text=True, timeout=60)
  assert f"MMBERT_STATE worker=0 state=running code=- pid={pid}" in status.stdout
  assert "[worker 0] training -m mmbert_jax.main" in status.stdout

  # A second launch attaches instead of starting another process; `stop` ends the run with 75 and no relaunch.
  err_file = home.parent / "again.err"
  with open(err_file, "w") as err_out:
    again = subprocess.Popen(["bash", str(POD)], env=env, stdout=subprocess.DEVNULL, stderr=err_out)
  for _ in range(300):
    if "watching it" in err_file.read_text():
      break
    threading.Event().wait(0.1)
  stop = subprocess.run(["bash", str(POD), "stop"], env=env, capture_output=True, text=True, timeout=60)
  assert f"state=exited,stopped code=75 pid={pid}" in stop.stdout
  again.wait(timeout=60)
  err = err_file.read_text()
  assert again.returncode == 75, err
  assert "already going on 1 of 1 workers: watching it" in err and "stopped by 'tpu_pod.sh stop'" in err
  assert calls.read_text().count("worker.sh start") == 1 and int(pid_file.read_text()) == pid
  logs = subprocess.run(["bash", str(POD), "logs"], env=env, capture_output=True, text=True, timeout=60)
  assert "SIGTERM: checkpoint saved" in logs.stdout and "exit status 75" in logs.stdout


def test_pod_failed_data_mount_stops_the_launch(one_worker_pod, tmp_path):
  env, home, calls = one_worker_pod
  _stub(tmp_path / "bin", "sudo", 'exec "$@"\n')
  _stub(tmp_path / "bin", "gcsfuse", 'echo "gcsfuse: bucket not found" >&2; exit 1\n')
  r = subprocess.run(
    ["bash", str(POD)],
    env={**env, "DATA_BUCKET": "gs://no-such-bucket", "DATA_MOUNT": str(tmp_path / "mnt")},
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert r.returncode == 1 and "did not start on every worker" in r.stderr
  assert "worker 0: mounting gs://no-such-bucket failed" in r.stdout
  log = (home / "mmbert_run" / "logs" / "worker-0.log").read_text()
  assert "gcsfuse: bucket not found" in log and "training" not in log
