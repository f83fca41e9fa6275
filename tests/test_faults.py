"""Faults a long run meets: damaged checkpoints, full disks, non-finite steps, changed configs, meshes that span
processes, bad values, preemption. Each must end in one clear line and an exit code, and lose nothing complete."""

import errno
import glob
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest
from helpers import ROOT, load_config, read_metrics, run_two_processes, tiny_config, train_losses
from tensorboardX.event_file_writer import EventsWriter
from tiny_run import MODEL, STEPS, step_dir, trained_run

from mmbert_jax import checkpoint as ckpt_lib
from mmbert_jax import cli, main, metrics, phases, sharding, storage, train
from mmbert_jax.model import ModelConfig, get_config


def _config(data_dir, **overrides):
  """The config of the shared tiny run (checkpoints 4, 8, 12), so a copy of it resumes without a config change."""
  return tiny_config(data_dir, **{"keep_checkpoints": len(STEPS), "num_devices": 2, **MODEL, **overrides})


@pytest.fixture
def run_copy(demo_data, tmp_path_factory, tmp_path):
  """A private copy of the shared trained run, free to damage."""
  workdir = str(tmp_path / "run")
  shutil.copytree(trained_run(demo_data, tmp_path_factory), workdir)
  return workdir


def _listing(workdir):
  return sorted(os.listdir(ckpt_lib.checkpoint_dir(workdir)))


def _finite(tree):
  return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree))


def _same(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ---------------------------------------------------------------------------------------------------------------
# Damaged checkpoints: the newest one that restores is used, the damaged ones are moved aside, never deleted.
# ---------------------------------------------------------------------------------------------------------------


def _files(step, pattern):
  return [f for f in glob.glob(os.path.join(step, pattern), recursive=True) if os.path.isfile(f)]


def _truncate_params_data(step):
  for f in _files(step, "params/**/d/*"):
    with open(f, "r+b") as fh:
      fh.truncate(os.path.getsize(f) // 2)


def _scramble_params_data(step):
  for f in _files(step, "params/**/d/*"):
    n = os.path.getsize(f)
    with open(f, "r+b") as fh:
      fh.seek(n // 3)
      fh.write(np.random.default_rng(0).integers(0, 256, min(4096, n // 3), np.uint8).tobytes())


def _write(path, text):
  with open(path, "w") as f:
    f.write(text)


CORRUPTIONS = {
  "truncated params data": _truncate_params_data,
  "scrambled params data": _scramble_params_data,
  "garbage params metadata": lambda s: _write(os.path.join(s, "params", "_METADATA"), "{not json"),
  "params deleted": lambda s: shutil.rmtree(os.path.join(s, "params")),
  "opt_state manifests deleted": lambda s: [os.remove(f) for f in _files(s, "opt_state/**/manifest.ocdbt")],
  "garbage meta": lambda s: _write(os.path.join(s, "meta", "metadata"), "\x00garbage"),
  "data iterator state deleted": lambda s: [os.remove(f) for f in _files(s, "data_iter/*.json")],
  "every file emptied": lambda s: [_write(f, "") for f in _files(s, "**/*")],
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_a_damaged_latest_checkpoint_is_moved_aside_and_the_previous_one_resumes(kind, run_copy, demo_data, capsys):
  want, _, _ = ckpt_lib.load_params(step_dir(run_copy, 8))
  CORRUPTIONS[kind](step_dir(run_copy, 12))
  run = train.PhaseRun(_config(demo_data), run_copy)
  try:
    assert run.step == 8 and _same(run.params, want)
  finally:
    run.close()
  assert _listing(run_copy) == ["4", "8", "corrupt-12"]
  captured = capsys.readouterr()
  warning = [line for line in (captured.out + captured.err).splitlines() if line.startswith("warning:")]
  assert len(warning) == 1 and "corrupt-12" in warning[0] and "resuming from step 8" in warning[0]


def test_orbax_bookkeeping_damage_still_resumes_the_latest(run_copy, demo_data):
  # _CHECKPOINT_METADATA holds only commit bookkeeping: Orbax restores without it, so nothing is moved.
  _write(os.path.join(step_dir(run_copy, 12), "_CHECKPOINT_METADATA"), "][")
  run = train.PhaseRun(_config(demo_data), run_copy)
  run.close()
  assert run.step == 12 and _listing(run_copy) == ["12", "4", "8"]


def test_when_no_checkpoint_restores_one_line_says_so_and_nothing_moves(run_copy, demo_data):
  for step in STEPS:
    CORRUPTIONS["garbage meta"](step_dir(run_copy, step))
  with pytest.raises(ckpt_lib.CheckpointError, match="no checkpoint in .* restores .*nothing was moved"):
    train.PhaseRun(_config(demo_data), run_copy)
  assert _listing(run_copy) == ["12", "4", "8"]


def _tree_bytes(path):
  files = [os.path.join(root, f) for root, _, names in os.walk(path) for f in names]
  return {os.path.relpath(f, path): (open(f, "rb").read(), os.stat(f).st_mtime_ns) for f in files}


@pytest.mark.slow
def test_a_damaged_checkpoint_of_another_run_is_one_line_and_is_left_as_it_is(run_copy, demo_data, tmp_path, capsys):
  """init_from (and export, evaluate, merge, finetune, which read through load_params) a run whose latest
  checkpoint has one params object cut to 100 bytes: one line naming the checkpoint and its step, exit 2, and the
  source is neither moved nor changed."""
  largest = max(_files(step_dir(run_copy, 12), "params/**/d/*"), key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(100)
  before = _tree_bytes(run_copy)
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    ckpt_lib.load_params(run_copy)
  assert str(e.value).startswith(f"checkpoint {step_dir(run_copy, 12)} (step 12) does not restore (")
  config = _config(demo_data, init_from=run_copy, phase="midtrain")
  assert main.run(config, str(tmp_path / "next")) == cli.EXIT_BAD_INPUT
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"error: checkpoint {step_dir(run_copy, 12)} (step 12) does not"), (
    lines
  )
  assert _tree_bytes(run_copy) == before
  assert ckpt_lib.load_params(step_dir(run_copy, 8))[1]["step"] == 8  # the step it names instead still reads


def test_a_model_that_fits_no_checkpoint_is_a_config_error_not_damage(run_copy, demo_data):
  # Refused as a config change first; allowed, the checkpoint's parameters do not fit: neither is damage.
  with pytest.raises(train.ConfigChangeError, match=r"model.num_layers \(3 → 2\)"):
    train.PhaseRun(_config(demo_data, **{"model.num_layers": 2}), run_copy)
  with pytest.raises(
    ckpt_lib.ParamsMismatchError,
    match="parameter 'layers/2/.*' is not in the checkpoint|checkpoint parameter 'layers/2",
  ):
    train.PhaseRun(_config(demo_data, **{"model.num_layers": 2, "allow_config_change": True}), run_copy)
  assert _listing(run_copy) == ["12", "4", "8"]


# ---------------------------------------------------------------------------------------------------------------
# Config drift on resume, and init_from an unfinished run.
# ---------------------------------------------------------------------------------------------------------------


def test_resume_with_a_changed_optimizer_or_seed_is_refused_listing_the_keys(run_copy, demo_data):
  changed = _config(demo_data, **{"optim.peak_lr": 1e-3, "seed": 5, "log_every_steps": 3})
  with pytest.raises(train.ConfigChangeError) as e:
    train.PhaseRun(changed, run_copy)
  message = str(e.value)
  assert "optim.peak_lr (0.003 → 0.001)" in message and "seed (21 → 5)" in message
  assert "log_every_steps" not in message and "allow_config_change=True" in message
  # Bookkeeping keys change freely; allow_config_change lets the math change through, saying so.
  for overrides in (
    {"log_every_steps": 3, "eval_max_batches": 2, "keep_checkpoints": 5},
    {"optim.peak_lr": 1e-3, "allow_config_change": True},
  ):
    run = train.PhaseRun(_config(demo_data, **overrides), run_copy)
    run.close()
    assert run.step == 12


def test_changed_keys_are_the_math_keys_only():
  base = load_config("base")
  saved = base.to_json()
  base.log_every_steps, base.mesh.tensor, base.data.data_dir = 7, 4, "/elsewhere"
  base.data.tau, base.model.num_layers, base.batch_size = 0.3, 6, 32
  base.storage_warn_s, base.storage_timeout_s = 5.0, 60.0
  older = json.loads(saved)  # written before the storage keys existed
  del older["storage_warn_s"], older["storage_timeout_s"]
  assert (
    train.changed_keys(json.dumps(older), base)
    == train.changed_keys(saved, base)
    == {
      "data.tau": (0.7, 0.3),
      "model.num_layers": (None, 6),
      "batch_size": (4608, 32),
    }
  )


def test_init_from_an_unfinished_run_needs_an_explicit_step(run_copy, demo_data, tmp_path):
  shutil.rmtree(step_dir(run_copy, 12))  # the final checkpoint is gone: the latest, 8, is not final
  with pytest.raises(ckpt_lib.CheckpointError, match=r"not finished .*--config\.init_from=.*/checkpoints/8"):
    train.PhaseRun(_config(demo_data, init_from=run_copy), str(tmp_path / "next"))
  run = train.PhaseRun(_config(demo_data, init_from=step_dir(run_copy, 8)), str(tmp_path / "explicit"))
  run.close()
  assert run.step == 0 and run.meta["history"][-1]["source"].endswith("/checkpoints/8")


# ---------------------------------------------------------------------------------------------------------------
# Non-finite steps, and values that cannot train.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_nonfinite_update_is_not_kept_and_the_stop_message_is_true(demo_data, tmp_path, capsys):
  # peak_lr 1e30: step 1's loss and gradients are finite, its updated parameters are not.
  workdir = str(tmp_path / "nan")
  config = tiny_config(demo_data, **{"optim.peak_lr": 1e30, "schedule.warmup_tokens": 0})
  assert main.run(config, workdir) == cli.EXIT_FAILED
  error = capsys.readouterr().err.strip().splitlines()[-1]
  assert error.startswith("error: step 1: loss, gradients or updated parameters are not finite")
  assert "No checkpoint has been written" in error
  assert _listing(workdir) == []


@pytest.mark.slow
def test_a_nonfinite_step_after_checkpoints_names_the_intact_one(run_copy, demo_data):
  want, _, _ = ckpt_lib.load_params(run_copy)
  config = _config(
    demo_data, train_tokens=512 * 16, allow_config_change=True, **{"optim.peak_lr": 1e30, "schedule.warmup_tokens": 0}
  )
  with pytest.raises(
    train.NonFiniteLossError,
    match=r"^step 13: .*The last checkpoint, .*/checkpoints/12, is "
    "intact",
  ):
    train.train_and_evaluate(config, run_copy)
  got, _, _ = ckpt_lib.load_params(run_copy)
  assert _listing(run_copy) == ["12", "4", "8"] and _same(got, want)


@pytest.mark.slow
def test_skip_mode_stops_after_max_consecutive_skips_and_saves_only_finite_values(demo_data, tmp_path, capsys):
  workdir = str(tmp_path / "skip")
  config = tiny_config(
    demo_data,
    skip_nonfinite=True,
    max_consecutive_skips=3,
    checkpoint_every_tokens=512,
    **{"optim.peak_lr": 1e30, "schedule.warmup_tokens": 0},
  )
  with pytest.raises(train.NonFiniteLossError, match="step 3: .*3 non-finite steps in a row"):
    train.train_and_evaluate(config, workdir)
  captured = capsys.readouterr()
  assert (captured.out + captured.err).count("step skipped") == 2
  saved = [ckpt_lib.load_params(step_dir(workdir, s))[0] for s in (1, 2)]
  initial = train.init_model(
    train.model_config(config), sharding.make_mesh({"fsdp": -1}, jax.devices()[:1]), config.seed
  )[1]
  assert all(_finite(p) and _same(p, initial) for p in saved)  # skipped steps changed nothing


@pytest.mark.parametrize(
  "key,value,message",
  [
    ("optim.peak_lr", 1e39, "peak_lr must be a positive number finite in float32"),
    ("optim.peak_lr", float("nan"), "peak_lr"),
    ("optim.peak_lr", 0.0, "peak_lr"),
    ("optim.peak_lr", -1e-3, "peak_lr"),
    ("schedule.final_fraction", float("nan"), "schedule.final_fraction must be finite"),
    ("schedule.final_fraction", 1.5, "final_fraction must be in"),
    ("checkpoint_every_tokens", 0, "checkpoint_every_tokens must be positive; got 0"),
    ("log_every_steps", 0, "log_every_steps must be positive; got 0"),
    ("log_every_steps", -2, "log_every_steps must be positive; got -2"),
    ("eval_every_steps", -1, "eval_every_steps must be ≥ 0"),
    ("max_consecutive_skips", 0, "max_consecutive_skips must be positive"),
  ],
)
def test_values_that_cannot_train_are_refused_before_anything_is_written(
  demo_data, tmp_path, capsys, key, value, message
):
  workdir = str(tmp_path / "bad")
  assert main.run(tiny_config(demo_data, **{key: value}), workdir) == cli.EXIT_BAD_INPUT
  error = capsys.readouterr().err.strip().splitlines()
  assert len(error) == 1 and error[0].startswith("error: config.") and message in error[0]
  assert not os.path.exists(workdir)


def test_every_model_config_field_can_be_set_from_the_config():
  c = load_config("base")
  assert {f.name for f in ModelConfig.__dataclass_fields__.values()} <= set(c.model)
  c.model_preset = "tiny"
  set_fields = {k: v for k, v in c.model.items() if v is not None}
  assert train.model_config(c) == get_config("tiny", **{**set_fields, "dtype": "float32"})
  c.model.hidden_size, c.model.attention_block_q = 96, 256  # not in the config file before: now set
  cfg = train.model_config(c)
  assert (cfg.hidden_size, cfg.attention_block_q, cfg.num_layers) == (96, 256, get_config("tiny").num_layers)


# ---------------------------------------------------------------------------------------------------------------
# Writers: a failed write stops the run at once with the path, and complete checkpoints stay intact.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_full_disk_under_tensorboard_stops_the_run_naming_the_path(demo_data, tmp_path, monkeypatch, capsys):
  workdir = str(tmp_path / "full")
  write_event = EventsWriter.write_event

  def fail_after_checkpoint(self, event):
    if event.step >= 6:  # the writer thread used to die here and leave the loop blocked forever
      raise OSError(errno.ENOSPC, "No space left on device")
    return write_event(self, event)

  monkeypatch.setattr(EventsWriter, "write_event", fail_after_checkpoint)
  start = time.time()
  assert main.run(tiny_config(demo_data), workdir) == cli.EXIT_FAILED
  error = capsys.readouterr().err.strip().splitlines()[-1]
  assert error == f"error: writing TensorBoard events failed: disk full at {workdir}/tb"
  assert time.time() - start < 600
  assert _listing(workdir) == ["4"]
  params, meta, _ = ckpt_lib.load_params(workdir)
  assert meta["step"] == 4 and _finite(params)


@pytest.mark.slow
def test_a_failed_checkpoint_save_stops_the_run_within_a_step(demo_data, tmp_path, monkeypatch, capsys):
  workdir = str(tmp_path / "save")
  from data_pipeline import checkpoint as data_ckpt

  save = data_ckpt.PipelineCheckpointHandler.save

  def fail_at_step_8(self, directory, item=None, args=None):
    if "/8" in os.fspath(directory).split("checkpoints")[-1]:
      raise OSError(errno.ENOSPC, "No space left on device")
    return save(self, directory, item, args)

  monkeypatch.setattr(data_ckpt.PipelineCheckpointHandler, "save", fail_at_step_8)
  assert main.run(tiny_config(demo_data), workdir) == cli.EXIT_FAILED
  error = capsys.readouterr().err.strip().splitlines()[-1]
  assert error == f"error: saving checkpoint 8 failed: disk full at {workdir}/checkpoints"
  steps_logged = [m["step"] for m in read_metrics(workdir) if "train/loss" in m]
  assert max(steps_logged) <= 9  # stopped within a step of the failed save
  assert ckpt_lib.steps(ckpt_lib.checkpoint_dir(workdir)) == [4]
  assert ckpt_lib.load_params(workdir)[1]["step"] == 4


def _mount_tmpfs(path, size):
  os.makedirs(path, exist_ok=True)
  proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], capture_output=True)
  return proc.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_real_full_disk_stops_the_run_and_keeps_the_complete_checkpoint(demo_data, tmp_path, capsys):
  disk = str(tmp_path / "disk")
  if not _mount_tmpfs(disk, "3m"):
    pytest.skip("cannot mount a tmpfs here")
  try:
    workdir = os.path.join(disk, "run")  # a checkpoint of the tiny model takes about 2.1 MB: the second does not fit
    assert main.run(_config(demo_data), workdir) == cli.EXIT_FAILED
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: ") and f"failed: disk full at {workdir}" in error
    assert ckpt_lib.steps(ckpt_lib.checkpoint_dir(workdir)) == [4]
    params, meta, _ = ckpt_lib.load_params(workdir)
    assert meta["step"] == 4 and _finite(params)
  finally:
    subprocess.run(["umount", "-l", disk])


@pytest.mark.slow
def test_a_full_disk_under_the_shard_cache_is_one_line_and_leaves_no_partial_copy(
  demo_data, tmp_path, monkeypatch, capsys
):
  """The shards of a gs:// data_dir are copied to the local cache before the first batch; a full disk there is one
  line naming the cache file, exit 1, and the partial copy is removed (it would keep the disk full). The data
  directory stands in for a bucket: its shards take the bucket's path through the cache."""
  from data_pipeline import filesystem as fs

  cache = tmp_path / "cache"
  monkeypatch.setenv("MMBERT_JAX_CACHE", str(cache))
  is_remote = fs.is_remote
  as_bucket = lambda p: os.fspath(p) == demo_data or os.fspath(p).endswith(".array_record")
  monkeypatch.setattr(fs, "is_remote", lambda p: as_bucket(p) or is_remote(p))
  shard_type = type(fs.path(demo_data))
  copy = shard_type.copy

  def full_disk(self, dst, overwrite=False):
    if not os.fspath(self).endswith(".array_record"):
      return copy(self, dst, overwrite=overwrite)
    with open(dst, "wb") as f:
      f.write(b"\0" * 1000)  # part of the shard, then the disk is full
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(shard_type, "copy", full_disk)
  workdir = str(tmp_path / "run")
  assert main.run(tiny_config(demo_data), workdir) == cli.EXIT_FAILED
  lines = capsys.readouterr().err.strip().splitlines()
  assert lines[-1].startswith(f"error: writing failed: disk full at {cache}/gs/"), lines[-3:]
  assert ".array_record." in lines[-1] and "Traceback" not in "\n".join(lines)
  assert [f for _, _, files in os.walk(cache) for f in files] == []
  assert not os.path.exists(ckpt_lib.checkpoint_dir(workdir)) or _listing(workdir) == []


def test_reading_another_runs_checkpoint_warns_nothing(demo_data, tmp_path_factory, caplog):
  """What the hand-off, merge, export, evaluate and fine-tuning read: no Orbax warning lines (a read-only
  manager, the data iterator's item that a params-only read skips)."""
  run = trained_run(demo_data, tmp_path_factory)
  caplog.set_level(logging.WARNING)
  ckpt_lib.load_params(run)
  ckpt_lib.read_meta(*ckpt_lib.resolve(run))
  assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_write_errors_name_the_reason():
  assert storage.reason(OSError(errno.ENOSPC, "x")) == "disk full"
  assert storage.reason(OSError(errno.EROFS, "x")) == "read-only file system"
  wrapped = ValueError("tensorstore: Error writing local file: [OS error: No space left on device]")
  assert storage.reason(wrapped) == "disk full"
  try:
    try:
      raise OSError(errno.EDQUOT, "quota")
    except OSError as e:
      raise RuntimeError("save failed") from e
  except RuntimeError as e:
    assert str(storage.write_error("saving", "/r", e)) == "saving failed: disk quota exceeded at /r"


# ---------------------------------------------------------------------------------------------------------------
# Bookkeeping: meta is copied before the asynchronous save; metrics.jsonl holds each step once after a resume.
# ---------------------------------------------------------------------------------------------------------------


def test_meta_is_copied_before_the_asynchronous_save(run_copy, demo_data, monkeypatch):
  handed = []
  json_save = ckpt_lib.ocp.args.JsonSave
  monkeypatch.setattr(ckpt_lib.ocp.args, "JsonSave", lambda item: handed.append(item) or json_save(item))
  run = train.PhaseRun(_config(demo_data, keep_checkpoints=4), run_copy)
  try:
    run.step += 1  # a new step number, same state
    run.save()
    saved_view = json.loads(json.dumps(run.meta))
    run.meta["tokens_per_language"]["en"] += 10**6  # the loop goes on counting while the save runs
  finally:
    run.close()
  assert handed and handed[0] is not run.meta
  assert (
    ckpt_lib.read_meta(ckpt_lib.checkpoint_dir(run_copy), 13)["tokens_per_language"]
    == saved_view["tokens_per_language"]
  )


@pytest.mark.slow
def test_a_resumed_run_logs_each_step_once(run_copy, demo_data):
  shutil.rmtree(step_dir(run_copy, 12))  # resume at 8: steps 9..12 run again
  before = {m["step"]: m["train/loss"] for m in read_metrics(run_copy) if "train/loss" in m}
  result = train.train_and_evaluate(_config(demo_data), run_copy)
  assert result["step"] == 12
  logged = [m["step"] for m in read_metrics(run_copy) if "train/loss" in m]
  assert logged == list(range(1, 13))
  after = {m["step"]: m["train/loss"] for m in read_metrics(run_copy) if "train/loss" in m}
  np.testing.assert_allclose([after[s] for s in range(9, 13)], [before[s] for s in range(9, 13)], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Gradient accumulation: micro-batches with unequal masked counts give the full batch's step.
# ---------------------------------------------------------------------------------------------------------------


def _batch(rng, rows, seq, masked_per_row, vocab=1000):
  k = max(masked_per_row)
  weights = np.zeros((rows, k), np.float32)
  for r, n in enumerate(masked_per_row):
    weights[r, :n] = 1
  ids = rng.integers(5, vocab, (rows, seq)).astype(np.int32)
  positions = np.stack([rng.choice(seq, k, replace=False) for _ in range(rows)]).astype(np.int32)
  return dict(
    input_ids=ids,
    segment_ids=np.ones((rows, seq), np.int32),
    positions=np.tile(np.arange(seq, dtype=np.int32), (rows, 1)),
    masked_positions=positions,
    masked_labels=rng.integers(5, vocab, (rows, k)).astype(np.int32),
    masked_weights=weights,
    lang_ids=np.zeros((rows, seq), np.int32),
  )


@pytest.mark.slow
def test_accumulated_micro_batches_equal_the_full_batch_with_unequal_masked_counts():
  cfg = get_config("tiny", vocab_size=1000)
  config = tiny_config("unused")
  mesh = sharding.make_mesh({"fsdp": 4}, jax.devices()[:4])
  full = _batch(np.random.default_rng(0), 8, 32, [12, 12, 12, 12, 2, 1, 3, 2])  # 48 vs 8 masked tokens
  halves = [{k: v[:4] for k, v in full.items()}, {k: v[4:] for k, v in full.items()}]
  results = []
  for micro in ([full], halves):
    program = train.build_program(config, mesh, num_languages=1, cfg=cfg)
    params, opt = program.init()
    step = program.step
    with jax.set_mesh(mesh):
      new, _, m = step(
        params, opt, train.make_put(mesh, leading=1)(train.stack_microbatches(micro)), np.float32(1e-3), np.int32(0)
      )
    results.append((jax.device_get(new), jax.device_get(m)))
  (p1, m1), (p2, m2) = results
  assert m1["masked_tokens"] == m2["masked_tokens"] == 56
  np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-6)
  np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-5)
  # The first Adam step moves every parameter by about ±lr (1e-3) whatever the gradient's scale: the updates agree
  # to 1% of that, where weighting the micro-batches by their own masked counts would move many by ~lr. A gradient
  # entry near zero (cancelling sums, added in another order) can flip its normalised update by a few % of lr.
  deviation = np.concatenate([np.abs(a - b).ravel() for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(p1))])
  assert deviation.max() <= 1e-4, deviation.max()
  assert (deviation > 1e-5).mean() <= 1e-3, (deviation > 1e-5).mean()


# ---------------------------------------------------------------------------------------------------------------
# Processes: exit codes of the command, and a mesh whose model axis spans processes.
# ---------------------------------------------------------------------------------------------------------------


def _main_process(*args, env_extra=None):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", **(env_extra or {}))
  return subprocess.Popen(
    [sys.executable, "-m", "mmbert_jax.main", *args],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def _config_file(tmp_path, data_dir, **overrides):
  path = tmp_path / "tiny_config.py"
  path.write_text(
    f"import sys\nsys.path.insert(0, {str(ROOT / 'tests')!r})\nfrom helpers import tiny_config\n\n"
    f"def get_config():\n  return tiny_config({data_dir!r}, **{overrides!r})\n"
  )
  return str(path)


@pytest.mark.slow
@pytest.mark.parametrize(
  "args,message",
  [
    (
      ["--config=configs/demo.py", "--config.train_tokenz=5"],
      "--config.train_tokenz: the config has no key 'train_tokenz' (did you mean",
    ),
    (["--config=configs/demo.py", "--config.batch_size=many"], "--config.batch_size=many"),
    (["--config=configs/nothere.py"], "--config=configs/nothere.py: [Errno 2] No such file"),
    (["--config=configs/decay.py:hot"], "variant 'hot' is not one of"),
  ],
)
def test_command_line_errors_are_one_line_and_exit_2(tmp_path, args, message):
  proc = _main_process(*args, f"--workdir={tmp_path}")
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == cli.EXIT_BAD_INPUT, err[-3000:]
  lines = err.strip().splitlines()
  assert lines[-1].startswith("error: ") and message in lines[-1] and "Traceback" not in err


def _catches_sigterm(pid: int) -> bool:
  """Whether process `pid` has a handler for SIGTERM (its SigCgt mask in /proc)."""
  try:
    with open(f"/proc/{pid}/status") as f:
      mask = next(line.split()[1] for line in f if line.startswith("SigCgt:"))
  except (OSError, StopIteration):
    return False
  return bool(int(mask, 16) & (1 << (signal.SIGTERM - 1)))


def _loaded(pid: int, name: str) -> bool:
  """Whether process `pid` has mapped a file whose path holds `name` (a package's shared libraries)."""
  with open(f"/proc/{pid}/maps") as f:
    return any(name in line for line in f)


@pytest.mark.slow
def test_sigterm_exits_preempted_and_the_rerun_completes(demo_data, tmp_path):
  workdir = str(tmp_path / "run")
  config = _config_file(tmp_path, demo_data)
  # During the imports (jax, flax: seconds), as soon as the package has taken SIGTERM over (the process's caught
  # signals say so) and before anything is printed: a checkpoint of the first step, exit 75 (was 143, killed).
  proc = _main_process(f"--config={config}", f"--workdir={workdir}")
  while proc.poll() is None and not _catches_sigterm(proc.pid):
    time.sleep(0.002)
  proc.send_signal(signal.SIGTERM)
  assert not _loaded(proc.pid, "jaxlib")  # the signal came before jax was imported
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == cli.EXIT_PREEMPTED, err[-3000:]
  assert "SIGTERM: saved step 1" in out + err
  # At start-up (the devices are listed; state building, restore and compilation follow): the resumed run saves
  # its first step and exits 75 (no handler was installed yet at this point: the process was killed, 143).
  proc = _main_process(f"--config={config}", f"--workdir={workdir}")
  for line in proc.stdout:
    if line.startswith("JAX:"):
      break
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == cli.EXIT_PREEMPTED, err[-3000:]
  assert "SIGTERM: saved step 2" in out + err
  # In the loop.
  proc = _main_process(f"--config={config}", f"--workdir={workdir}")
  jsonl = os.path.join(workdir, "metrics.jsonl")
  size = os.path.getsize(jsonl)
  while proc.poll() is None and os.path.getsize(jsonl) == size:  # the resumed run logged a step
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == cli.EXIT_PREEMPTED, err[-3000:]
  assert "SIGTERM: saved step" in out + err
  again = _main_process(f"--config={config}", f"--workdir={workdir}")
  out, err = again.communicate(timeout=600)
  assert again.returncode == cli.EXIT_COMPLETE, err[-3000:]
  assert [m["step"] for m in read_metrics(workdir) if "train/loss" in m] == list(range(1, 13))


@pytest.fixture
def process_sigterm():
  """The entry point's SIGTERM handler (`cli.handle_sigterm`) in this process, removed afterwards."""
  previous = signal.getsignal(signal.SIGTERM)
  cli.handle_sigterm()
  yield
  signal.signal(signal.SIGTERM, previous)
  cli._sigterm["received"] = False


def test_a_sigterm_is_a_flag_and_the_loop_passes_it_on(process_sigterm):
  """The loop's handler (installed per phase) passes the signal to the process's: one that arrives while a phase
  saves its final checkpoint is not lost when the phase ends; a second changes nothing; one before the loop starts
  stops it at its first step."""
  preemption = train.Preemption()
  assert not preemption.requested and not cli.preempted()
  os.kill(os.getpid(), signal.SIGTERM)
  os.kill(os.getpid(), signal.SIGTERM)
  assert preemption.requested and cli.preempted()
  preemption.close()
  assert signal.getsignal(signal.SIGTERM) == cli._on_sigterm
  assert train.Preemption().requested  # the next phase's loop (or one not started yet) sees it at once


def _two_phases(data_dir):
  config = _config(data_dir, train_tokens=512 * 4)
  with config.unlocked():
    config.phases = ("a", "b")
    config.phase_overrides = ml_collections.ConfigDict({"a": {}, "b": {"init_from_phase": "a"}})
  return config


@pytest.mark.slow
def test_sigterm_during_a_phase_final_save_stops_before_the_next_phase(
  demo_data, tmp_path, monkeypatch, process_sigterm, capsys
):
  """Two SIGTERMs while phase a's final checkpoint is written: the save completes, phase b does not start, the
  status is "preempted" (exit 75); the same run again trains b with the losses of an uninterrupted curriculum."""
  reference = str(tmp_path / "reference")
  assert phases.run(_two_phases(demo_data), reference)["status"] == "complete"
  save = train.PhaseRun.save

  def save_then_signal(self, final=False):
    save(self, final=final)  # asynchronous: the files are still being written
    if final and self.config.phase == "a":
      os.kill(os.getpid(), signal.SIGTERM)
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(train.PhaseRun, "save", save_then_signal)
  workdir = str(tmp_path / "run")
  assert phases.run(_two_phases(demo_data), workdir)["status"] == "preempted"
  assert "SIGTERM: stopped before phase b" in capsys.readouterr().out
  assert ckpt_lib.steps(ckpt_lib.checkpoint_dir(f"{workdir}/a")) == [4] and not os.path.exists(f"{workdir}/b")
  assert ckpt_lib.load_params(f"{workdir}/a")[1]["complete"]
  monkeypatch.undo()
  cli._sigterm["received"] = False
  assert phases.run(_two_phases(demo_data), workdir)["status"] == "complete"
  assert train_losses(f"{workdir}/b") == train_losses(f"{reference}/b")
  assert train_losses(f"{workdir}/a") == train_losses(f"{reference}/a")


_CURRICULUM = """
import sys
sys.path.insert(0, {tests!r})
import ml_collections
from helpers import tiny_config
from tiny_run import MODEL


def get_config():
  c = tiny_config({data!r}, train_tokens=512 * 4, num_devices=2, **MODEL)
  c.phases = ("a", "b")
  c.phase_overrides = ml_collections.ConfigDict(dict(a=dict(), b=dict(init_from_phase="a")))
  c.merge = ml_collections.ConfigDict(dict(method="average", base="", models=("a", "b"), density=1.0, lam=1.0))
  c.downstream = ml_collections.ConfigDict(
    dict(tasks=("cldr_order",), epochs=1, batch_size=16, peak_lr=1e-3, max_len=16, random_init=False)
  )
  return c
"""


def _wait_for(condition, proc, what):
  while not condition():
    assert proc.poll() is None, f"the run ended before {what}: {proc.communicate()[1][-3000:]}"
    time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.heavy
def test_sigterm_during_evaluation_merge_fine_tuning_and_plots_resumes_to_the_same_results(demo_data, tmp_path):
  """A two-phase curriculum with a merge and fine-tuning, stopped by SIGTERM while a phase is evaluated, while the
  merge is written, while the fine-tuning runs and while the plots are drawn (each synchronised on what it writes):
  each time exit 75 once the work in progress is complete, and the re-run ends with the uninterrupted run's losses,
  merge and scores."""
  config = tmp_path / "curriculum.py"
  config.write_text(_CURRICULUM.format(tests=str(ROOT / "tests"), data=demo_data))
  reference, workdir = tmp_path / "reference", tmp_path / "run"
  done = _main_process(f"--config={config}", f"--workdir={reference}")
  assert done.wait(timeout=900) == cli.EXIT_COMPLETE, done.communicate()[1][-3000:]

  def stopped_at(wait, what, said):
    proc = _main_process(f"--config={config}", f"--workdir={workdir}")
    wait(proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == cli.EXIT_PREEMPTED, (what, err[-3000:])
    assert said in out, (what, out[-2000:])

  # While phase a is evaluated (its final checkpoint is complete): phase b does not start.
  final = workdir / "a" / "checkpoints" / "4"
  stopped_at(lambda proc: _wait_for(final.exists, proc, "the evaluation"), "eval", "SIGTERM: stopped before phase b")
  assert not (workdir / "b").exists()
  # While the merge is written (its folder appears): it completes, fine-tuning does not start.
  merged = workdir / "merged"
  stopped_at(lambda proc: _wait_for(merged.exists, proc, "the merge"), "merge", "SIGTERM: stopped before fine-tuning")
  assert ckpt_lib.steps(ckpt_lib.checkpoint_dir(merged)) and not (workdir / "downstream.json").exists()

  # While fine-tuning (the first checkpoint's score is logged; two more follow): the table is written whole, the
  # plots wait for the re-run.
  def first_score(proc):
    for line in proc.stderr:
      if line.startswith("cldr_order a:"):
        return
    raise AssertionError("the run ended before fine-tuning")

  stopped_at(first_score, "fine-tuning", "SIGTERM: stopped before the plots")
  assert (workdir / "downstream.json").exists() and not (workdir / "plots").exists()
  # While the plots are drawn (their staged folder appears): they are moved into place complete.
  staged = lambda: bool(list(workdir.glob(".plots.tmp-*")))
  stopped_at(lambda proc: _wait_for(staged, proc, "the plots"), "plots", "plot: ")
  assert sorted(os.listdir(workdir / "plots")) == ["eval.png", "loss.png", "mixture.png"]
  again = _main_process(f"--config={config}", f"--workdir={workdir}")
  assert again.wait(timeout=900) == cli.EXIT_COMPLETE, again.communicate()[1][-3000:]
  for phase in ("a", "b"):
    assert train_losses(str(workdir / phase)) == train_losses(str(reference / phase))
  assert _same(ckpt_lib.load_params(str(workdir / "merged"))[0], ckpt_lib.load_params(str(reference / "merged"))[0])
  assert _scores(workdir) == _scores(reference)
  assert (
    sorted(os.listdir(workdir / "plots"))
    == sorted(os.listdir(reference / "plots"))
    == [
      "eval.png",
      "loss.png",
      "mixture.png",
    ]
  )


def _scores(root) -> dict:
  """The fine-tuning table without its timings."""
  untimed = lambda d: {k: untimed(v) for k, v in d.items() if k != "seconds"} if isinstance(d, dict) else d
  return untimed(json.loads((root / "downstream.json").read_text())["tasks"])


_SPANNING = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
sys.path[:0] = [{root!r}, {tests!r}]
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize("localhost:{port}", num_processes=2, process_id={pid})
from helpers import tiny_config
from mmbert_jax import main
sys.exit(main.run(tiny_config({data!r}, num_devices=0, **{{"mesh.fsdp": 1, "mesh.tensor": 2}}), {workdir!r}))
"""


_BOUNDARY = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
sys.path[:0] = [{root!r}, {tests!r}]
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize("localhost:{port}", num_processes=2, process_id={pid})
from mmbert_jax import cli, phases
cli._sigterm["received"] = {pid} == {signalled}  # a SIGTERM reached this process only
print("stop" if phases._preempted("phase b") else "go", flush=True)
print("stop" if phases._preempted("the merge") else "go", flush=True)
"""


@pytest.mark.multiprocess
@pytest.mark.parametrize("signalled", [0, 1, -1])
def test_processes_agree_at_a_phase_boundary(signalled):
  """A SIGTERM to any one process of a multi-host curriculum stops every process at the same boundary (a process
  that stopped alone would leave the others waiting in the next phase's first collective)."""
  results = run_two_processes(_BOUNDARY, timeout=300, signalled=signalled)
  for returncode, out, err in results:
    assert returncode == 0, err[-3000:]
    lines = [line for line in out.strip().splitlines() if not line.startswith("[Gloo]")]
    if signalled < 0:
      assert lines == ["go", "go"]
    else:
      assert lines == [
        "SIGTERM: stopped before phase b; run the same command again to resume",
        "stop",
        "SIGTERM: stopped before the merge; run the same command again to resume",
        "stop",
      ]


@pytest.mark.multiprocess
def test_a_tensor_axis_across_processes_is_refused_at_start(demo_data, tmp_path):
  """Two processes of one device each with mesh.tensor=2 (SLURM's one process per GPU): both processes would feed
  different rows to the same tensor group, so the run must stop before it builds anything."""
  workdir = str(tmp_path / "span")
  for returncode, _, err in run_two_processes(_SPANNING, timeout=300, data=demo_data, workdir=workdir):
    assert returncode == cli.EXIT_BAD_INPUT, err[-3000:]
    assert err.strip().splitlines()[-1] == (
      "error: mesh: the 'tensor' axis (2 devices) spans processes, which feed different rows; each process has 1 "
      "device(s). Use --config.mesh.tensor of at most 1 (a divisor of it), or one process per host"
    )
  assert not os.path.exists(ckpt_lib.checkpoint_dir(workdir))


def test_process_feeds_allow_model_axes_inside_a_process():
  sharding.check_process_feeds(sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))  # one process: fine


def test_metric_writer_writes_events_and_jsonl_in_the_callers_thread(tmp_path):
  """No background thread: what `write` returns from is on disk, readable as TensorBoard records."""
  import struct

  from tensorboardX.proto import event_pb2

  writer = metrics.MetricWriter(str(tmp_path), enabled=True)
  writer.write(3, {"train/loss": 2.5, "train/lr": np.float32(1e-3)})
  [events] = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
  data, values = open(events, "rb").read(), {}
  while data:
    (n,) = struct.unpack("<Q", data[:8])
    event = event_pb2.Event.FromString(data[12 : 12 + n])
    data = data[16 + n :]
    for v in event.summary.value:
      values[v.tag] = (event.step, v.simple_value)
  assert values == {"train/loss": (3, 2.5), "train/lr": (3, pytest.approx(1e-3))}
  assert read_metrics(str(tmp_path)) == [{"step": 3, "train/loss": 2.5, "train/lr": pytest.approx(1e-3)}]
  writer.close()
