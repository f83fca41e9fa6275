"""The entry point: the demo curriculum end to end (shortened), and clear errors for bad command lines."""

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import ROOT

SHORT_DEMO = [
  f"--config.phase_overrides.{phase}.train_tokens={tokens}"
  for phase, tokens in (
    ("pretrain", 16_384),
    ("midtrain", 8192),
    ("decay_eng", 4096),
    ("decay_cont", 4096),
    ("decay_all", 4096),
  )
] + ["--config.downstream.epochs=1", "--config.log_every_steps=2"]


def _main(*args, workdir=None, timeout=900, platforms="cpu"):
  """`python -m mmbert_jax.main ...`; platforms=None leaves JAX_PLATFORMS unset, as on a user's machine."""
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS=platforms or "")
  if platforms is None:
    del env["JAX_PLATFORMS"]
  env.pop("XLA_FLAGS", None)
  cmd = [sys.executable, "-m", "mmbert_jax.main", *args] + ([f"--workdir={workdir}"] if workdir else [])
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.heavy
def test_demo_runs_every_phase_and_merges(tmp_path):
  workdir = str(tmp_path / "demo")
  proc = _main("--config=configs/demo.py", *SHORT_DEMO, workdir=workdir, platforms=None)
  assert proc.returncode == 0, proc.stderr[-4000:]
  _assert_no_libtpu_trace(proc.stderr)
  # No library warning a user cannot act on (Orbax announced every read-only manager and every item it skipped).
  warnings = [line for line in proc.stderr.splitlines() if re.match(r"(WARNING:absl:|W\d{4} )", line)]
  assert len(warnings) == 0, warnings[:5]
  mlm, _, downstream = proc.stdout.partition("downstream (fine-tuned")
  table = mlm.split("held-out MLM loss per language")[-1]
  downstream = downstream.split("\nplot: ")[0]
  header = table.strip().splitlines()[0].split()
  assert header == ["language", "pretrain", "midtrain", "decay_eng", "decay_cont", "decay_all", "merged_ties"]
  rows = {line.split()[0]: line.split()[1:] for line in table.strip().splitlines()[1:]}
  assert {"en", "fo", "ti", "all"} <= set(rows)
  assert all(len(cells) == 6 and all(float(x) > 0 for x in cells) for cells in rows.values())
  for phase in ("pretrain", "midtrain", "decay_eng", "decay_cont", "decay_all", "merged"):
    assert os.listdir(os.path.join(workdir, phase, "checkpoints")), phase
  assert os.path.isdir(os.path.join(workdir, "pretrain", "tb"))
  # It ends with the plots of the whole curriculum.
  plots = [line.split("plot: ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("plot: ")]
  assert plots == [os.path.join(workdir, "plots", f"{name}.png") for name in ("loss", "eval", "mixture")]
  assert all(os.path.getsize(p) > 10_000 for p in plots)
  # The progress line carries the curriculum's ETA while later phases remain.
  assert "midtrain step" in proc.stderr and ", curriculum " in proc.stderr
  # Last, every checkpoint is fine-tuned and scored on the embedded word-order tasks.
  lines = downstream.strip().splitlines()[2:]
  assert [" ".join(line.split()[:2]) if line.startswith("random") else line.split()[0] for line in lines] == [
    "chance",
    "random init",
    "pretrain",
    "midtrain",
    "decay_eng",
    "decay_cont",
    "decay_all",
    "merged",
  ]
  # 4 columns: accuracy and macro-F1 of word order, in-language and learnt in English only.
  assert downstream.strip().splitlines()[1].split()[1:] == ["cldr_order", "accuracy", "cldr_order", "macro_f1"] + [
    "cldr_order_en",
    "accuracy",
    "cldr_order_en",
    "macro_f1",
  ]
  cells = [line.split()[-4:] for line in lines]
  assert all(len(line.split()) in (5, 6) and all(0 <= float(x) <= 1 for x in c) for line, c in zip(lines, cells))
  assert os.path.exists(os.path.join(workdir, "downstream.json"))


@pytest.mark.slow
@pytest.mark.parametrize(
  "flag,message",
  [
    ("--config.train_tokenz=5", "train_tokenz"),
    ("--config.batch_size=many", "batch_size"),
  ],
)
def test_bad_overrides_fail_clearly(tmp_path, flag, message):
  proc = _main("--config=configs/demo.py", flag, workdir=str(tmp_path))
  assert proc.returncode != 0 and message in proc.stderr


def test_missing_workdir_is_a_usage_error():
  proc = _main("--config=configs/demo.py")
  assert proc.returncode != 0 and "--workdir is required" in proc.stderr


def _assert_no_libtpu_trace(stderr: str):
  for marker in ("libtpu", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "InitGoogle"):
    assert marker not in stderr, stderr[-3000:]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_no_libtpu_trace_on_a_machine_without_tpu():
  from jax._src import hardware_utils

  if hardware_utils.num_available_tpu_chips_and_device_id()[0]:
    pytest.skip("this machine has TPU chips")
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  env["PYTHONPATH"] = str(ROOT)
  # Whether jax tried to start its TPU backend (the source of the trace; it may also fail quietly, e.g. while
  # another process holds libtpu's lock file).
  probe = (
    "import jax; jax.devices(); from jax._src import xla_bridge as xb; "
    "print('tpu' in xb.backends() or 'tpu' in xb._backend_errors)"
  )
  proc = subprocess.run(
    [sys.executable, "-c", "import mmbert_jax; " + probe],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.split() == ["False"]
  _assert_no_libtpu_trace(proc.stderr)
  bare = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert bare.stdout.split() == ["True"]  # without the package jax does try


def _tree(path):
  """Every file and directory under path with its modification time (None: path does not exist)."""
  if not os.path.exists(path):
    return None
  return sorted(
    (os.path.join(root, name), os.stat(os.path.join(root, name)).st_mtime_ns)
    for root, dirs, files in os.walk(path)
    for name in dirs + files
  )


def _pretrain_checkpoint(workdir, **model):
  from mmbert_jax import checkpoint as ckpt_lib
  from mmbert_jax.model import get_config

  ckpt_lib.save_params(
    workdir,
    8,
    {"w": np.zeros(2, np.float32)},
    {
      "phase": "pretrain",
      "step": 8,
      "tokens": 4096,
      "model_config": dataclasses.asdict(get_config("mmbert-base", **model)),
    },
  )


@pytest.mark.slow
def test_bad_starts_fail_fast_with_one_line(demo_data, tmp_path):
  """Each: exit status 2, one `error:` line naming the key and what to set, within 15 s, before any device work,
  and nothing written to the workdir."""
  empty = tmp_path / "empty_data"
  empty.mkdir()
  previous = str(tmp_path / "pretrain_run")
  _pretrain_checkpoint(previous)
  decay = ["--config=configs/decay.py"]
  cases = [
    (decay, "new", "config.data.data_dir is empty"),
    (decay + [f"--config.data.data_dir={tmp_path / 'nowhere'}"], "new", "does not exist"),
    (decay + [f"--config.data.data_dir={empty}"], "new", "has no stats.json"),
    (decay + [f"--config.data.data_dir={demo_data}"], "new", "config.init_from is empty"),
    (
      ["--config=configs/midtrain.py", f"--config.data.data_dir={demo_data}"],
      "new",
      "continues from the pretrain checkpoint",
    ),
    (
      decay + [f"--config.data.data_dir={demo_data}", f"--config.init_from={previous}"],
      "pretrain_run",
      "holds checkpoints of phase pretrain",
    ),
    (
      ["--config=configs/pretrain.py:small", f"--config.data.data_dir={demo_data}"],
      "pretrain_run",
      "another model size",
    ),
    (
      ["--config=configs/demo.py", "--config.phase_overrides.pretrain.train_tokenz=5"],
      "new",
      "--config.phase_overrides.pretrain.train_tokenz: the config has no key 'train_tokenz'",
    ),
    (
      ["--config=configs/demo.py", "--config.phase_overrides.pretrain.train_tokens=-5"],
      "new",
      "config.phase_overrides.pretrain.train_tokens must be ≥ 0; got -5",
    ),
    (
      ["--config=configs/demo.py", "--config.data.seq_len=0"],
      "new",
      "every phase of this curriculum sets data.seq_len",
    ),
  ]
  for args, workdir, message in cases:
    workdir = str(tmp_path / workdir)
    before = _tree(workdir)
    start = time.monotonic()
    proc = _main(*args, workdir=workdir, timeout=60)
    seconds = time.monotonic() - start
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (args, proc.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, proc.stderr)
    assert "JAX:" not in proc.stdout  # stopped before the devices were even listed
    assert seconds < 15, (args, seconds)
    assert _tree(workdir) == before, args
