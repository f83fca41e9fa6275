"""Checkpoints: exact resume after SIGTERM or kill -9, resume on fewer devices, phase handoff, shape errors."""

import json
import os
import random
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import ROOT, tiny_config, train_losses

from mmbert_jax import checkpoint as ckpt_lib
from mmbert_jax import train

STEPS = 12  # 512 tokens per step; checkpoints every 4 steps


@pytest.fixture(scope="module")
def reference(demo_data, tmp_path_factory):
  """An uninterrupted run: its per-step losses are what every resumed run must reproduce."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  train.train_and_evaluate(tiny_config(demo_data), workdir)
  losses = train_losses(workdir)
  assert sorted(losses) == list(range(1, STEPS + 1))
  return workdir, losses


def _step_records(workdir):
  """steps.jsonl: the record of every training step."""
  with open(os.path.join(workdir, "steps.jsonl")) as f:
    return [json.loads(line) for line in f]


def _assert_every_step_once(workdir, ref):
  """steps.jsonl holds each step once, none lost or written twice across the restart, with the logged losses."""
  records = _step_records(workdir)
  assert [r["step"] for r in records] == list(range(1, STEPS + 1))
  assert {r["step"]: r["loss"] for r in records} == train_losses(workdir)
  assert [r["tokens"] for r in records] == [512 * s for s in range(1, STEPS + 1)]
  np.testing.assert_allclose([r["loss"] for r in records], [ref[s] for s in range(1, STEPS + 1)], atol=1e-5)


def _sigterm_at(monkeypatch, step):
  """Sends SIGTERM to this process while the loop reads the metrics of `step` (a fixed point of the loop)."""
  record = train.PhaseRun.record

  def record_then_signal(self, done):
    record(self, done)
    if done.step == step:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(train.PhaseRun, "record", record_then_signal)


@pytest.mark.slow
def test_sigterm_then_rerun_reproduces_the_uninterrupted_losses(demo_data, reference, tmp_path, monkeypatch):
  ref_dir, ref = reference
  workdir = str(tmp_path / "run")
  stop_at = random.Random(STEPS).randint(2, STEPS - 3)  # seeded: the same step on every run
  assert stop_at % 4  # not a checkpoint step: the stop must save one itself
  _sigterm_at(monkeypatch, stop_at)
  first = train.train_and_evaluate(tiny_config(demo_data), workdir)
  monkeypatch.undo()
  # The metrics of step n are read after step n + 1 is dispatched: the loop stops at the end of step n + 1.
  assert first["status"] == "preempted" and first["step"] == stop_at + 1, first
  assert ckpt_lib.steps(ckpt_lib.checkpoint_dir(workdir))[-1] == first["step"]
  second = train.train_and_evaluate(tiny_config(demo_data), workdir)
  assert second["status"] == "complete" and second["step"] == STEPS
  losses = train_losses(workdir)  # both runs append to the same metrics file
  assert losses == ref, f"stopped at step {first['step']}"
  _assert_every_step_once(workdir, ref)
  assert second["eval"] == train.train_and_evaluate(tiny_config(demo_data), ref_dir)["eval"]


_KILL_DURING_SAVE = """
import os, signal, sys
sys.path[:0] = [{root!r}, {tests!r}]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
from helpers import tiny_config
from mmbert_jax import checkpoint, train
save = checkpoint.Checkpointer.save
def save_then_die(self, step, **kw):
  save(self, step, **kw)           # asynchronous: returns while the files are still being written
  if step == 8:
    names = os.listdir(self.directory)
    if "8" in names or not any(n.startswith("8.") and "tmp" in n for n in names):
      sys.exit(3)                  # not in the middle of the save: the test would prove nothing
    os.kill(os.getpid(), signal.SIGKILL)
checkpoint.Checkpointer.save = save_then_die
train.train_and_evaluate(tiny_config({data!r}), {workdir!r})
"""


@pytest.mark.slow
def test_kill_9_during_async_save_resumes_from_last_complete_checkpoint(demo_data, reference, tmp_path):
  _, ref = reference
  workdir = str(tmp_path / "killed")
  script = _KILL_DURING_SAVE.format(root=str(ROOT), tests=str(ROOT / "tests"), data=demo_data, workdir=workdir)
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]  # killed while step 8's temporary dir existed
  assert ckpt_lib.steps(ckpt_lib.checkpoint_dir(workdir)) == [4]  # the half-written 8 is not taken for one
  result = train.train_and_evaluate(tiny_config(demo_data), workdir)
  assert result["step"] == STEPS
  losses = train_losses(workdir)
  assert {s: losses[s] for s in range(5, STEPS + 1)} == {s: ref[s] for s in range(5, STEPS + 1)}
  _assert_every_step_once(workdir, ref)  # the killed run's records of steps 5-8 were dropped, then written again


def _assert_losses_match(result, workdir, ref, first_step):
  """The run ended at the reference's last step with its per-step losses from `first_step` on (within 1e-5)."""
  assert result["step"] == STEPS
  losses = train_losses(workdir)
  steps = range(first_step, STEPS + 1)
  np.testing.assert_allclose([losses[s] for s in steps], [ref[s] for s in steps], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_resume_on_fewer_devices_continues_the_same_global_batches(demo_data, reference, tmp_path):
  _, ref = reference
  workdir = str(tmp_path / "elastic")
  train.train_and_evaluate(tiny_config(demo_data, train_tokens=512 * 4), workdir)  # 4 devices
  result = train.train_and_evaluate(tiny_config(demo_data, num_devices=2), workdir)  # 2 devices
  _assert_losses_match(result, workdir, ref, first_step=5)


@pytest.mark.slow
def test_scanned_layers_save_the_same_checkpoints(demo_data, reference, tmp_path):
  # A run with scanned layers writes checkpoints an unrolled run resumes from, with the same losses throughout.
  _, ref = reference
  workdir = str(tmp_path / "scanned")
  train.train_and_evaluate(tiny_config(demo_data, train_tokens=512 * 4, **{"model.scan_layers": True}), workdir)
  result = train.train_and_evaluate(tiny_config(demo_data), workdir)
  _assert_losses_match(result, workdir, ref, first_step=1)


@pytest.mark.slow
def test_handoff_changes_seq_len_and_theta_and_keeps_params(demo_data, reference, tmp_path):
  ref_dir, _ = reference
  midtrain = tiny_config(
    demo_data,
    init_from=ref_dir,
    train_tokens=1024 * 2,
    **{
      "data.seq_len": 128,
      "data.mask_rate": 0.15,
      "data.tau": 0.5,
      "data.languages": "en,de,fr,ru,zh,sw,nl,pl",
      "model.global_rope_theta": 160_000.0,
      "model.local_rope_theta": 160_000.0,
      "schedule.warmup_tokens": 0,
    },
  )
  midtrain.phase = "midtrain"
  # A vanishing learning rate and no decay: the parameters must stay those of the pre-training checkpoint.
  midtrain.optim.peak_lr = 1e-30
  midtrain.optim.weight_decay = 0.0
  workdir = str(tmp_path / "midtrain")
  result = train.train_and_evaluate(midtrain, workdir)
  before, _, _ = ckpt_lib.load_params(ref_dir)
  after, meta, _ = ckpt_lib.load_params(workdir)
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_allclose(a, b, atol=1e-20)
  assert meta["model_config"]["global_rope_theta"] == 160_000.0
  assert meta["total_tokens_before"] == 512 * STEPS and meta["tokens"] == 1024 * 2
  assert meta["history"][-1]["phase"] == "pretrain"
  assert sum(meta["tokens_per_language"].values()) > 512 * STEPS * 0.5
  assert result["step"] == 2


@pytest.mark.slow
def test_decay_variants_start_from_the_same_checkpoint(demo_data, reference, tmp_path):
  ref_dir, _ = reference
  sources = []
  for variant, languages in (("decay_eng", "en,de,fr"), ("decay_all", "en,de,fr,fo,ti")):
    c = tiny_config(
      demo_data,
      init_from=ref_dir,
      train_tokens=512,
      **{
        "data.languages": languages,
        "schedule.warmup_tokens": 0,
        "schedule.decay_start_tokens": 0,
        "schedule.decay_tokens": 512,
      },
    )
    c.phase = variant
    train.train_and_evaluate(c, str(tmp_path / variant))
    _, meta, _ = ckpt_lib.load_params(str(tmp_path / variant))
    sources.append(meta["history"][-1]["source"])
  assert sources[0] == sources[1] == f"{ckpt_lib.checkpoint_dir(ref_dir)}/{STEPS}"


def test_checkpoint_that_does_not_fit_names_the_parameter(demo_data, reference, tmp_path):
  ref_dir, _ = reference
  c = tiny_config(demo_data, init_from=ref_dir, **{"model.intermediate_size": 32})
  with pytest.raises(ckpt_lib.CheckpointError, match=r"parameter 'layers/0/mlp/wi' has shape \(64, 2, 96\)"):
    train.train_and_evaluate(c, str(tmp_path / "wrong"))
  with pytest.raises(ckpt_lib.CheckpointError, match="does not exist"):
    ckpt_lib.resolve(str(tmp_path / "nowhere"))


def _objects(directory):
  """{relative path: bytes} of every object under a bucket folder."""
  root = str(directory)
  out = {}
  for folder, _, files in directory.walk():
    relative = str(folder).removeprefix("gs://")[len(root.removeprefix("gs://")) :].strip("/")
    for name in files:
      out[f"{relative}/{name}".lstrip("/")] = (directory / relative / name).read_bytes()
  return out


def test_a_damaged_step_in_a_bucket_is_copied_aside_then_deleted(gcs_bucket, monkeypatch):
  """A bucket has no folder rename: the step's objects are copied to corrupt-<step> first, and only a complete copy
  lets the originals go."""
  import uuid

  import orbax.checkpoint as ocp

  from data_pipeline import filesystem as fs

  workdir = fs.path(f"{gcs_bucket}/{uuid.uuid4().hex[:8]}/run")
  with ckpt_lib._manager(ckpt_lib.checkpoint_dir(workdir), create=True, enable_async_checkpointing=False) as m:
    for step in (4, 8):
      m.save(
        step,
        args=ocp.args.Composite(
          params=ocp.args.StandardSave({"w": np.full(3, step, np.float32)}), meta=ocp.args.JsonSave({"step": step})
        ),
      )
  checkpointer = ckpt_lib.Checkpointer(str(workdir), async_save=False)
  assert checkpointer.all_steps() == [4, 8]
  step_dir = ckpt_lib.checkpoint_dir(workdir) / "8"
  before = _objects(step_dir)
  assert "params/_METADATA" in before

  def copy_then_fail(src, dest):  # the connection drops half-way through the copy
    (dest / "partial").write_text("x")
    raise OSError("connection reset")

  monkeypatch.setattr(ckpt_lib.fs, "copy_tree", copy_then_fail)
  with pytest.raises(OSError, match="connection reset"):
    checkpointer._move_aside(8)
  assert _objects(step_dir) == before  # nothing deleted before the copy is complete
  monkeypatch.undo()
  where = checkpointer._move_aside(8)
  assert where == f"{ckpt_lib.checkpoint_dir(workdir)}/corrupt-8.2"  # corrupt-8 holds the failed attempt
  assert not step_dir.exists() and _objects(fs.path(where)) == before
  assert checkpointer.all_steps() == [4] and ckpt_lib.read_meta(ckpt_lib.checkpoint_dir(workdir), 4)["step"] == 4
  checkpointer.close()


@pytest.mark.parametrize("timeout_s", [6.0, 100.0, 1800.0])
def test_tensorstore_retries_a_bucket_a_minute_past_the_storage_timeout(timeout_s):
  """Orbax's array writes retry for as long as every other request (data_pipeline.filesystem) and a minute more,
  so a command ends at the storage timeout with its own line, not at tensorstore's default of ~15 minutes."""
  from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

  saved = [dict(c) for c in (ts_utils._BASE_TS_CONTEXT, ts_utils._DEFAULT_OCDBT_TS_CONTEXT)]
  try:
    ckpt_lib.bound_storage_retries(timeout_s)
    for use_ocdbt in (True, False):  # what Orbax builds each save's and restore's context from
      retries = ts_utils.get_ts_context(use_ocdbt=use_ocdbt).spec.to_json()["gcs_request_retries"]
      tries = retries["max_retries"]
      backoff = sum(min(2.0**n, 32.0) for n in range(tries))  # tensorstore: 1 s, doubling, at most 32 s apart
      assert timeout_s + 60 <= backoff < timeout_s + 60 + 32, (tries, backoff)
  finally:
    for context, old in zip((ts_utils._BASE_TS_CONTEXT, ts_utils._DEFAULT_OCDBT_TS_CONTEXT), saved):
      context.clear()
      context.update(old)
