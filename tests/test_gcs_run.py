"""A run whose workdir is in a bucket (the GCS emulator of tests/conftest.py `gcs_bucket`): it trains, is stopped by
SIGTERM, resumes to the same per-step losses as the shared local run (tests/tiny_run.py), hands off to a second
phase, and merge, export and evaluate read and write the bucket. Nothing may land in a local folder named `gs:`;
paths with another scheme, or a malformed gs:// path, are one line naming the flag or key."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import jax
import numpy as np
import pytest
from etils import epath
from helpers import ROOT, StoppableEmulator, tiny_config, train_losses
from tiny_run import MODEL, STEPS, trained_run

from data_pipeline import filesystem as fs
from mmbert_jax import checkpoint as ckpt_lib
from mmbert_jax import cli, hf, train


def _config_file(tmp_path, data_dir, **overrides) -> str:
  """The shared tiny run's config (so the bucket run's losses can be compared with it) as a config file."""
  overrides = {"keep_checkpoints": len(STEPS), "num_devices": 2, **MODEL, **overrides}
  path = tmp_path / "tiny_config.py"
  path.write_text(
    f"import sys\nsys.path.insert(0, {str(ROOT / 'tests')!r})\nfrom helpers import tiny_config\n\n"
    f"def get_config():\n  return tiny_config({data_dir!r}, **{overrides!r})\n"
  )
  return str(path)


def _start(module: str, *args: str, cwd, env=None, stdout=subprocess.PIPE) -> subprocess.Popen:
  """`python -m module args` in `cwd` (not the repository: a stray relative `gs:` folder would land there), with
  `env` added to the environment."""
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", **(env or {}))
  return subprocess.Popen(
    [sys.executable, "-m", module, *args], cwd=cwd, env=env, stdout=stdout, stderr=subprocess.PIPE, text=True
  )


def _run(module: str, *args: str, cwd, timeout: int = 600) -> tuple[str, str]:
  proc = _start(module, *args, cwd=cwd)
  out, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, (module, err[-3000:])
  return out, err


def _records(path: epath.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _assert_same(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (key, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(key))


def _no_local_scheme_folders(*folders):
  for folder in folders:
    assert not any(epath.Path(folder).glob("gs:*")) and not any(epath.Path(folder).glob("s3:*")), folder


@pytest.mark.slow
@pytest.mark.heavy
def test_a_bucket_run_trains_resumes_hands_off_merges_exports_and_evaluates(
  demo_data, gcs_bucket, tmp_path, tmp_path_factory, monkeypatch
):
  reference = trained_run(demo_data, tmp_path_factory)  # uninterrupted, on local disk
  root = fs.path(f"{gcs_bucket}/{uuid.uuid4().hex[:8]}")
  run = root / "run"
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  # The prepared data (tokenizer, shards, stats.json) in the bucket too: each process copies the phase's shards
  # to its local cache once.
  data = root / "data"
  fs.copy_tree(fs.path(demo_data), data)
  cache = tmp_path / "cache"
  monkeypatch.setenv("MMBERT_JAX_CACHE", str(cache))
  config = _config_file(tmp_path, str(data), jax_cache_dir=str(root / "jax_cache"))

  # Stopped by SIGTERM once its first metrics reached the bucket, then run again to the end.
  proc = _start("mmbert_jax.main", f"--config={config}", f"--workdir={run}", cwd=cwd)
  while proc.poll() is None and not (run / "metrics.jsonl").exists():
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == cli.EXIT_PREEMPTED, err[-3000:]
  assert "SIGTERM: saved step" in out + err and str(run / "checkpoints") in out + err
  stopped = ckpt_lib.steps(run / "checkpoints")[-1]
  assert 0 < stopped < STEPS[-1]
  # What the bucket holds at the stop: the saved step's records (uploaded with its checkpoint) and the event file.
  assert max(r["step"] for r in _records(run / "metrics.jsonl")) == stopped
  assert [p.name.split(".")[0] for p in (run / "tb").iterdir()] == ["events"]
  out, err = _run("mmbert_jax.main", f"--config={config}", f"--workdir={run}", cwd=cwd)
  records = _records(run / "metrics.jsonl")
  losses = {r["step"]: r["train/loss"] for r in records if "train/loss" in r}
  assert losses == train_losses(reference)  # the same numbers as the local run, every step once
  assert len([r for r in records if "train/loss" in r]) == STEPS[-1]
  assert ckpt_lib.steps(run / "checkpoints") == list(STEPS)
  assert len(list((run / "tb").iterdir())) == 2  # one event file per process
  assert json.loads((run / "config.json").read_text())["phase"] == "pretrain"
  assert set(json.loads((run / "mixture.json").read_text())) >= {"languages", "weights"}
  assert [r["step"] for r in _records(run / "eval.jsonl")] == [STEPS[-1]]
  plots = [line.split("plot: ", 1)[1] for line in out.splitlines() if line.startswith("plot: ")]
  assert plots and all(p.startswith(str(run / "plots")) and epath.Path(p).stat().length > 10_000 for p in plots)
  assert any((root / "jax_cache").iterdir())  # jax writes its compilation cache to the bucket itself
  copied = [p for p in cache.rglob("*") if p.is_file()]
  assert copied and all("/data/" in str(p) for p in copied)  # shards came from the bucket

  # A second phase starts from the bucket run's final checkpoint.
  second = root / "second"
  result = train.train_and_evaluate(
    tiny_config(demo_data, keep_checkpoints=1, num_devices=2, **MODEL, train_tokens=512 * 2, init_from=str(run)),
    str(second),
  )
  assert result["status"] == "complete"
  meta = ckpt_lib.read_meta(second / "checkpoints", 2)
  assert meta["history"][-1]["source"] == f"{run}/checkpoints/{STEPS[-1]}"
  assert meta["total_tokens_before"] == 512 * STEPS[-1]

  # merge → export → evaluate, every input and output in the bucket.
  merged = root / "merged"
  out, _ = _run(
    "mmbert_jax.merge", "--method=average", f"--models={run}/checkpoints/{STEPS[1]},{run}", f"--out={merged}", cwd=cwd
  )
  assert f"merged checkpoint: {merged}/checkpoints/{STEPS[-1]}" in out
  want = jax.tree.map(
    lambda a, b: (np.asarray(a, np.float64) + np.asarray(b, np.float64)) / 2,
    ckpt_lib.load_params(f"{reference}/checkpoints/{STEPS[1]}")[0],
    ckpt_lib.load_params(reference)[0],
  )
  got = ckpt_lib.load_params(merged)[0]
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), b, rtol=0, atol=1e-6)
  exported = root / "hf"
  _run("mmbert_jax.export", f"--checkpoint={merged}", f"--out={exported}", cwd=cwd)
  assert {p.name for p in exported.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.model"}
  from flax import nnx

  _assert_same(nnx.to_pure_dict(nnx.state(hf.load(exported), nnx.Param)), got)
  out, _ = _run(
    "mmbert_jax.evaluate",
    f"--checkpoint={run},{reference}",
    f"--data={demo_data}",
    "--seq_len=64",
    "--batch_size=8",
    "--max_batches=1",
    cwd=cwd,
  )
  table = out.split("held-out MLM accuracy")[0].strip().splitlines()
  assert table[1].split() == ["language", "run", os.path.basename(reference)]
  rows = [line.split()[1:] for line in table[2:]]
  assert rows and all(bucket == local for bucket, local in rows)  # the bucket's checkpoint is the local one

  _no_local_scheme_folders(cwd, ROOT, os.getcwd())


@pytest.mark.slow
@pytest.mark.parametrize(
  "flag, words",
  [
    ("--workdir=s3://x/y", "error: --workdir=s3://x/y: the scheme s3:// is not supported"),
    ("--config.workdir=s3://x/y", "error: config.workdir=s3://x/y: the scheme s3:// is not supported"),
    ("--config.init_from=gs:/bad", "error: config.init_from=gs:/bad is not a valid gs:// path"),
    ("--config.data.data_dir=gs:/bad", "error: config.data.data_dir=gs:/bad is not a valid gs:// path"),
    ("--config.jax_cache_dir=s3://x/c", "error: config.jax_cache_dir=s3://x/c: the scheme s3:// is not supported"),
  ],
)
def test_a_path_of_another_scheme_is_one_line_naming_the_key(demo_data, tmp_path, flag, words):
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  config = _config_file(tmp_path, demo_data)
  args = [f"--config={config}", flag] + ([] if "workdir" in flag else [f"--workdir={tmp_path / 'run'}"])
  proc = _start("mmbert_jax.main", *args, cwd=cwd)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == cli.EXIT_BAD_INPUT, err[-3000:]
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(words), err
  assert "JAX:" not in out  # refused before any device work
  assert not any(cwd.iterdir()) and not (tmp_path / "run").exists()
  _no_local_scheme_folders(cwd, ROOT)


# ---- a storage outage: said, retried, bounded -------------------------------------------------------------------


class _Outage(StoppableEmulator):
  """An emulator that keeps its objects on disk, so it can be stopped and started again with the same objects."""

  def __init__(self, store):
    super().__init__("outage", store)

  def object(self, name):
    return self.store / ".cloudstorage" / self.bucket / name

  def python(self, code: str):
    """`code` run against this bucket in a fresh interpreter; what it prints, as JSON."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", **self.env)
    out = subprocess.run(
      [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=self.store
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def outage(tmp_path):
  emulator = _Outage(tmp_path / "store")
  yield emulator
  emulator.stop()


def _run_in(emulator, config, workdir, cwd):
  """The entry point against `emulator`; its stderr is read by one reader only (`_Lines`)."""
  args = (f"--config={config}", f"--workdir={workdir}")
  return _start("mmbert_jax.main", *args, cwd=cwd, env=emulator.env, stdout=subprocess.DEVNULL)


class _Lines:
  """A pipe's lines as they come (read by a thread), so a test can wait for one."""

  def __init__(self, pipe):
    self.lines: list[str] = []
    self.thread = threading.Thread(target=lambda: self.lines.extend(iter(pipe.readline, "")), daemon=True)
    self.thread.start()

  def wait_for(self, text, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while not any(text in line for line in self.lines):
      assert proc.poll() is None and time.monotonic() < deadline, (text, "".join(self.lines)[-3000:])
      time.sleep(0.1)

  def text(self):
    self.thread.join(timeout=30)
    return "".join(self.lines)


def _first_checkpoint_written(emulator, prefix, proc):
  marker = emulator.object(f"{prefix}/checkpoints/{STEPS[0]}/commit_success.txt")
  while not marker.exists():
    assert proc.poll() is None, "the run ended before its first checkpoint"
    time.sleep(0.1)


_LOSSES = (
  "import json; from etils import epath; from data_pipeline import filesystem as fs; "
  "rs = [json.loads(l) for l in fs.path('{run}/metrics.jsonl').read_text().splitlines() if l.strip()]; "
  "from mmbert_jax import checkpoint as c; "
  "print(json.dumps([{{r['step']: r['train/loss'] for r in rs if 'train/loss' in r}}, c.steps('{run}/checkpoints')]))"
)


def _losses_and_steps(emulator, run):
  losses, steps = emulator.python(_LOSSES.format(run=run))
  return {int(k): v for k, v in losses.items()}, steps


@pytest.mark.slow
@pytest.mark.gcs
def test_a_storage_outage_past_the_warning_is_said_and_the_run_completes(outage, demo_data, tmp_path, tmp_path_factory):
  reference = trained_run(demo_data, tmp_path_factory)
  config = _config_file(tmp_path, demo_data, storage_warn_s=2.0)
  run = f"gs://{outage.bucket}/run"
  proc = _run_in(outage, config, run, tmp_path)
  err = _Lines(proc.stderr)
  _first_checkpoint_written(outage, "run", proc)
  outage.stop()  # every later metrics upload and checkpoint write is refused
  err.wait_for(f"warning: storage gs://{outage.bucket} has not answered for", proc)
  time.sleep(3)
  outage.start()
  proc.wait(timeout=600)
  assert proc.returncode == cli.EXIT_COMPLETE, err.text()[-3000:]
  said = [line for line in err.text().splitlines() if "storage gs://" in line]
  assert len(said) == 2, said
  assert said[0].startswith(f"warning: storage gs://{outage.bucket} has not answered for ") and "timeout_s" in said[0]
  assert said[1].startswith(f"storage gs://{outage.bucket} answers again after "), said
  losses, steps = _losses_and_steps(outage, run)
  assert losses == train_losses(reference) and steps == list(STEPS)


@pytest.mark.slow
@pytest.mark.gcs
def test_a_storage_outage_past_the_timeout_exits_1_and_the_last_checkpoint_resumes(
  outage, demo_data, tmp_path, tmp_path_factory
):
  reference = trained_run(demo_data, tmp_path_factory)
  run = f"gs://{outage.bucket}/run"
  config = _config_file(tmp_path, demo_data, storage_warn_s=1.0, storage_timeout_s=6.0)
  proc = _run_in(outage, config, run, tmp_path)
  err = _Lines(proc.stderr)
  _first_checkpoint_written(outage, "run", proc)
  outage.stop()
  start = time.monotonic()
  proc.wait(timeout=600)
  lines = err.text().strip().splitlines()
  assert proc.returncode == cli.EXIT_FAILED, "\n".join(lines[-30:])
  assert time.monotonic() - start < 120
  assert lines[-1].startswith(f"error: storage gs://{outage.bucket} has not answered for "), lines[-30:]
  assert "config.storage_timeout_s=6" in lines[-1] and "Traceback" not in err.text()
  outage.start()
  losses, steps = _losses_and_steps(outage, run)
  assert STEPS[0] in steps and STEPS[-1] not in steps  # the last complete checkpoint is there, nothing after it
  # The same command, the bucket back: it resumes from that checkpoint to the uninterrupted run's losses.
  config = _config_file(tmp_path, demo_data, storage_warn_s=1.0)
  rerun = _run_in(outage, config, run, tmp_path)
  rerun_err = _Lines(rerun.stderr)
  rerun.wait(timeout=600)
  assert rerun.returncode == cli.EXIT_COMPLETE, rerun_err.text()[-3000:]
  losses, steps = _losses_and_steps(outage, run)
  assert losses == train_losses(reference) and steps == list(STEPS)
