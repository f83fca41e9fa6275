"""The entry point: the demo curriculum end to end (shortened), and clear errors for bad command lines."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT

SHORT_DEMO = [f"--config.phase_overrides.{phase}.train_tokens={tokens}" for phase, tokens in (
    ("pretrain", 16_384), ("midtrain", 8192), ("decay_eng", 4096), ("decay_cont", 4096), ("decay_all", 4096))] + [
    "--config.downstream.epochs=1"]


def _main(*args, workdir=None, timeout=900):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  cmd = [sys.executable, "-m", "mmbert_jax.main", *args] + ([f"--workdir={workdir}"] if workdir else [])
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_demo_runs_every_phase_and_merges(tmp_path):
  workdir = str(tmp_path / "demo")
  proc = _main("--config=configs/demo.py", *SHORT_DEMO, workdir=workdir)
  assert proc.returncode == 0, proc.stderr[-4000:]
  mlm, _, downstream = proc.stdout.partition("downstream (fine-tuned")
  table = mlm.split("held-out MLM loss per language")[-1]
  header = table.strip().splitlines()[0].split()
  assert header == ["language", "pretrain", "midtrain", "decay_eng", "decay_cont", "decay_all", "merged_ties"]
  rows = {line.split()[0]: line.split()[1:] for line in table.strip().splitlines()[1:]}
  assert {"en", "fo", "ti", "all"} <= set(rows)
  assert all(len(cells) == 6 and all(float(x) > 0 for x in cells) for cells in rows.values())
  for phase in ("pretrain", "midtrain", "decay_eng", "decay_cont", "decay_all", "merged"):
    assert os.listdir(os.path.join(workdir, phase, "checkpoints")), phase
  assert os.path.isdir(os.path.join(workdir, "pretrain", "tb"))
  # Last, every checkpoint is fine-tuned and scored on both embedded tasks.
  lines = downstream.strip().splitlines()[2:]
  assert [line.split()[0] for line in lines] == ["pretrain", "midtrain", "decay_eng", "decay_cont", "decay_all",
                                                 "merged"]
  assert all(len(line.split()) == 5 and all(0 <= float(x) <= 1 for x in line.split()[1:]) for line in lines)
  assert os.path.exists(os.path.join(workdir, "downstream.json"))


@pytest.mark.parametrize("flag,message", [
    ("--config.train_tokenz=5", "train_tokenz"),
    ("--config.batch_size=many", "batch_size"),
])
def test_bad_overrides_fail_clearly(tmp_path, flag, message):
  proc = _main("--config=configs/demo.py", flag, workdir=str(tmp_path))
  assert proc.returncode != 0 and message in proc.stderr


def test_missing_workdir_is_a_usage_error():
  proc = _main("--config=configs/demo.py")
  assert proc.returncode != 0 and "--workdir is required" in proc.stderr
