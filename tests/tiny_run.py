"""One trained tiny run shared by the merge, export and evaluate tests: trained once per pytest session, by
whichever of those modules asks first. Twelve steps with checkpoints kept at steps 4, 8 and 12."""

import os
import subprocess
import sys

from helpers import ROOT, tiny_config

from mmbert_jax import train

STEPS = (4, 8, 12)
# Not the preset's values, and different per layer kind: exports must carry the run's own RoPE thetas.
GLOBAL_THETA, LOCAL_THETA = 40_000.0, 10_000.0
# Three layers (one global, two local) compile faster than the preset's four and still have both kinds.
MODEL = {"model.num_layers": 3, "model.global_rope_theta": GLOBAL_THETA, "model.local_rope_theta": LOCAL_THETA}

_runs: dict[str, str] = {}


def trained_run(data_dir: str, tmp_path_factory) -> str:
  if data_dir not in _runs:
    workdir = str(tmp_path_factory.mktemp("tiny_run"))
    # Parameters sharded over two devices when saved, loaded onto one by the tools under test.
    config = tiny_config(data_dir, keep_checkpoints=len(STEPS), num_devices=2, **MODEL)
    result = train.train_and_evaluate(config, workdir)
    assert result["status"] == "complete" and result["step"] == STEPS[-1], result
    _runs[data_dir] = workdir
  return _runs[data_dir]


def step_dir(workdir: str, step: int) -> str:
  return os.path.join(workdir, "checkpoints", str(step))


def run_module(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
  """`python -m <module> args...` in a fresh interpreter, as a user would run it."""
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
  )
