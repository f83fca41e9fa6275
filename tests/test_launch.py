"""Tests for the launch scripts: TPU pod dry runs, SLURM task layout with stub commands, Colab notebook structure."""
import json
import os
import pathlib
import re
import shlex
import stat
import subprocess
import threading

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
POD = ROOT / "launch" / "tpu_pod.sh"
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
  return subprocess.run(["bash", str(POD), *args], env={**env, **extra_env}, capture_output=True, text=True,
                        timeout=60)


def test_scripts_pass_bash_syntax_check():
  for script in (POD, SLURM):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_pod_dry_run_prints_create_install_and_run_on_all_workers(guarded_env):
  env, calls = guarded_env
  r = _pod(env, "--dry-run", "--", "--config.train.steps=100", WORKDIR="gs://bucket/run1",
           CONFIG="configs/pretrain.py:base", TPU_NAME="pod-a", ZONE="us-east5-b", PROJECT="proj",
           ACCELERATOR_TYPE="v6e-64", RUNTIME_VERSION="v2-alpha-tpuv6e", CAPACITY="spot")
  assert r.returncode == 0, r.stderr
  out = r.stdout
  assert not calls.exists(), "a dry run called gcloud"
  lines = out.splitlines()

  create = [l for l in lines if "queued-resources create" in l]
  assert len(create) == 1
  for flag in ("gcloud compute tpus queued-resources create pod-a-qr", "--node-id=pod-a", "--zone=us-east5-b",
               "--project=proj", "--accelerator-type=v6e-64", "--runtime-version=v2-alpha-tpuv6e", "--spot"):
    assert flag in create[0]
  assert any(l.startswith("gcloud compute tpus queued-resources describe pod-a-qr") for l in lines)

  scp = [l for l in lines if "tpu-vm scp" in l]
  assert len(scp) == 1 and "--worker=all" in scp[0] and "pod-a:" in scp[0]
  ssh = [l for l in lines if "tpu-vm ssh pod-a" in l]
  assert len(ssh) == 2 and all("--worker=all" in l for l in ssh)
  install, run = ssh
  assert "jax\\[tpu\\]==0.10.2" in install and "pip install" in install
  assert "python -m mmbert_jax.main --config=configs/pretrain.py:base --workdir=gs://bucket/run1" in run
  assert "--config.train.steps=100" in run
  assert "MMBERT_DISTRIBUTED=1" in run and "JAX_COORDINATOR_PORT=8476" in run
  # Order: the slice exists before anything is copied, and the code before it runs.
  assert out.index("queued-resources create") < out.index("tpu-vm scp") < out.index("mmbert_jax.main")


def test_pod_dry_run_restarts_after_preemption(guarded_env):
  env, calls = guarded_env
  r = _pod(env, "--dry-run", WORKDIR="gs://bucket/run2",
           DRY_RUN_STATES="MISSING ACTIVE SUSPENDED SUSPENDED MISSING ACTIVE", DRY_RUN_EXIT_CODES="255 0")
  assert r.returncode == 0, r.stderr
  assert not calls.exists()
  out = r.stdout
  steps = [m.group(0) for m in re.finditer(r"queued-resources (create|delete)|-m mmbert_jax\.main", out)]
  assert steps == ["queued-resources create", "-m mmbert_jax.main", "queued-resources delete",
                   "queued-resources create", "-m mmbert_jax.main"]
  assert "--force" in next(l for l in out.splitlines() if "queued-resources delete" in l)
  assert "preempted" in r.stderr and "resuming from gs://bucket/run2" in r.stderr
  # Both runs are the same command: the second resumes from the workdir.
  runs = [l for l in out.splitlines() if "-m mmbert_jax.main" in l]
  assert runs[0] == runs[1]


def test_pod_restarts_only_a_preempted_run(guarded_env):
  """Exit 75 (preempted: SIGTERM, checkpoint saved) restarts even on a healthy slice; a failure (1) or bad input
  (2) on a healthy slice is not retried and becomes the script's status."""
  env, _ = guarded_env
  r = _pod(env, "--dry-run", WORKDIR="gs://bucket/run3",
           DRY_RUN_STATES="MISSING ACTIVE ACTIVE ACTIVE ACTIVE ACTIVE", DRY_RUN_EXIT_CODES="75 1")
  assert r.returncode == 1, r.stderr
  assert r.stdout.count("-m mmbert_jax.main") == 2 and r.stdout.count("queued-resources create") == 1
  assert "preempted (exit status 75" in r.stderr and "not restarting" in r.stderr
  bad = _pod(env, "--dry-run", WORKDIR="gs://bucket/run3", DRY_RUN_STATES="MISSING ACTIVE ACTIVE",
             DRY_RUN_EXIT_CODES="2")
  assert bad.returncode == 2 and bad.stdout.count("-m mmbert_jax.main") == 1 and "not restarting" in bad.stderr
  once = _pod(env, "--dry-run", "--once", WORKDIR="gs://bucket/run3", DRY_RUN_EXIT_CODES="7")
  assert once.returncode == 7 and once.stdout.count("-m mmbert_jax.main") == 1


def test_pod_git_install_and_on_demand(guarded_env):
  env, _ = guarded_env
  r = _pod(env, "--dry-run", WORKDIR="gs://bucket/run4", INSTALL="git", GIT_URL="https://example.com/mmbert_jax.git",
           GIT_REF="v1.0", CAPACITY="on-demand")
  assert r.returncode == 0, r.stderr
  assert "tpu-vm scp" not in r.stdout
  assert "git clone -q https://example.com/mmbert_jax.git" in r.stdout and "checkout -q v1.0" in r.stdout
  create = next(l for l in r.stdout.splitlines() if "queued-resources create" in l)
  assert "--spot" not in create and "--reserved" not in create


@pytest.mark.parametrize("args,extra,message", [
    ((), {}, "set WORKDIR"),
    ((), {"WORKDIR": "/local/dir"}, "WORKDIR must be a gs:// path"),
    (("--bogus",), {"WORKDIR": "gs://b/r"}, "unknown argument '--bogus'"),
    ((), {"WORKDIR": "gs://b/r", "CAPACITY": "cheap"}, "CAPACITY must be spot, reserved or on-demand"),
    ((), {"WORKDIR": "gs://b/r", "INSTALL": "git"}, "INSTALL=git needs GIT_URL"),
    ((), {"WORKDIR": "gs://b/r", "POLL_SECONDS": "soon"}, "POLL_SECONDS must be a non-negative integer"),
])
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
  for var in ("TPU_NAME", "ZONE", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "PROJECT", "CONFIG", "WORKDIR",
              "--dry-run"):
    assert var in r.stdout


def _slurm(tmp_path, tasks_per_node, gpus, nodes=2, **extra_env):
  """Runs the sbatch script as SLURM would, with `srun` and the interpreter replaced by recorders."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  _stub(bin_dir, "srun", 'echo "SRUN $*"; echo "ENV MMBERT_DISTRIBUTED=$MMBERT_DISTRIBUTED '
        'JAX_LOCAL_DEVICE_IDS=${JAX_LOCAL_DEVICE_IDS:-unset} JAX_COORDINATOR_PORT=${JAX_COORDINATOR_PORT:-unset}"\n'
        'exit ${SRUN_EXIT:-0}\n')
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_", "WORKDIR", "GPUS_PER_NODE"))}
  env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_JOB_ID="1234", SLURM_JOB_NUM_NODES=str(nodes),
             SLURM_NTASKS=str(nodes * tasks_per_node), SLURM_NTASKS_PER_NODE=str(tasks_per_node),
             SLURM_GPUS_ON_NODE=str(gpus), SLURM_SUBMIT_DIR=str(ROOT), WORKDIR="/shared/run",
             CONFIG="launch/gpu_slurm.sbatch", PYTHON="/venv/bin/python")
  env.update(extra_env)
  return subprocess.run(["bash", str(SLURM), "--config.train.steps=5"], env=env, capture_output=True, text=True,
                        timeout=60)


def test_slurm_one_process_per_gpu(tmp_path):
  # CONFIG points at an existing file so the script's existence check passes without configs/ in this checkout.
  r = _slurm(tmp_path, tasks_per_node=8, gpus=8)
  assert r.returncode == 0, r.stderr
  srun = next(l for l in r.stdout.splitlines() if l.startswith("SRUN"))
  assert "--kill-on-bad-exit=1" in srun
  assert srun.endswith("/venv/bin/python -m mmbert_jax.main --config=launch/gpu_slurm.sbatch --workdir=/shared/run "
                       "--config.train.steps=5")
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
  assert 'jax[tpu]=={JAX_VERSION}' in code and 'JAX_VERSION = "0.10.2"' in code
  assert "jax.devices()" in code
  assert "python -m mmbert_jax.main --config={CONFIG} --workdir={WORKDIR}" in code
  assert 'CONFIG = "configs/demo.py"' in code and 'WORKDIR = "/content/mmbert_demo"' in code


def _remote_command(dry_run_stdout: str, marker: str) -> str:
  line = next(l for l in dry_run_stdout.splitlines() if "tpu-vm ssh" in l and marker in l)
  return next(a for a in shlex.split(line) if a.startswith("--command="))[len("--command="):]


def test_pod_remote_commands_parse_and_run_command_replaces_a_stale_run(guarded_env, tmp_path):
  env, _ = guarded_env
  r = _pod(env, "--dry-run", "--", "--config.note=two words", WORKDIR="gs://bucket/run5", CONFIG="configs/demo.py",
           LIBTPU_INIT_ARGS="--xla_a=1 --xla_b=2")
  assert r.returncode == 0, r.stderr
  install = _remote_command(r.stdout, "pip install")
  run = _remote_command(r.stdout, "-m mmbert_jax.main")
  for command in (install, run):
    check = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr

  # Execute the worker-side run command locally: HOME holds the code dir and a venv whose python only reports.
  home = tmp_path / "home"
  (home / "mmbert_jax").mkdir(parents=True)
  (home / "mmbert_venv" / "bin").mkdir(parents=True)
  _stub(home / "mmbert_venv" / "bin", "python",
        'echo "PID $$"; echo "CWD $PWD"; printf "ARG %s\\n" "$@"; '
        'echo "ENV $MMBERT_DISTRIBUTED $JAX_COORDINATOR_PORT $LIBTPU_INIT_ARGS"\n')
  stale = subprocess.Popen(["bash", "-c", 'exec -a "python -m mmbert_jax.main" sleep 120'])
  reaper = threading.Thread(target=stale.wait)                 # as init would: reap it once it is killed
  reaper.start()
  try:
    (home / ".mmbert_run.pid").write_text(f"{stale.pid}\n")
    out = subprocess.run(["bash", "-c", run], env={**env, "HOME": str(home)}, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    reaper.join(timeout=10)
    assert stale.returncode is not None                        # the earlier run was stopped
  finally:
    if stale.returncode is None:
      stale.kill()
      reaper.join()
  lines = out.stdout.splitlines()
  assert f"CWD {home / 'mmbert_jax'}" in lines
  assert [l[4:] for l in lines if l.startswith("ARG ")] == [
      "-m", "mmbert_jax.main", "--config=configs/demo.py", "--workdir=gs://bucket/run5", "--config.note=two words"]
  assert "ENV 1 8476 --xla_a=1 --xla_b=2" in lines
  # The pid file names the training process itself (exec keeps the shell's pid).
  assert (home / ".mmbert_run.pid").read_text().strip() == lines[0].split()[1]
