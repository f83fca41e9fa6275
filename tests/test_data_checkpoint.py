"""The iterator state through Orbax: JsonSave, grain's CheckpointSave, and elastic PipelineSave/Restore."""

import json
import os

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from data_pipeline import checkpoint, pipeline, prepare


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("corpus"))
  rng = np.random.default_rng(0)
  docs = {
    lang: [rng.integers(5, 500, int(rng.integers(3, 90))).tolist() for _ in range(n)]
    for lang, n in (("en", 120), ("fo", 30), ("ti", 20))
  }
  info = {"path": "synthetic", "vocab_size": 500, "special_ids": {"pad": 0, "eos": 1, "bos": 2, "unk": 3, "mask": 4}}
  prepare.write_pretokenized(d, docs, info, prepare.Settings("", max_len=64, eval_documents=0))
  return d


def _cfg(data_dir):
  return pipeline.PipelineConfig(data_dir=data_dir, seq_len=32, batch_size=8, num_streams=8, mask_rate=0.3, prefetch=0)


def _same(a, b):
  for x, y in zip(a, b, strict=True):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _manager(path):
  return ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False))


def test_json_item_round_trip(data_dir, tmp_path):
  it = pipeline.make_train_iterator(_cfg(data_dir), 0, 1)
  [next(it) for _ in range(4)]
  mngr = _manager(tmp_path / "ckpt")
  mngr.save(4, args=ocp.args.Composite(data_iter=ocp.args.JsonSave(it.get_state())))
  mngr.wait_until_finished()
  expected = [next(it) for _ in range(3)]
  restored = _manager(tmp_path / "ckpt").restore(4, args=ocp.args.Composite(data_iter=ocp.args.JsonRestore()))
  fresh = pipeline.make_train_iterator(_cfg(data_dir), 0, 1)
  fresh.set_state(restored["data_iter"])
  _same([next(fresh) for _ in range(3)], expected)


def test_grain_checkpoint_args(data_dir, tmp_path):
  it = pipeline.make_train_iterator(_cfg(data_dir), 0, 1)
  [next(it) for _ in range(2)]
  mngr = _manager(tmp_path / "ckpt")
  mngr.save(2, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  assert "process_0-of-1.json" in os.listdir(tmp_path / "ckpt" / "2" / "data_iter")
  expected = [next(it) for _ in range(3)]
  fresh = pipeline.make_train_iterator(_cfg(data_dir), 0, 1)
  _manager(tmp_path / "ckpt").restore(2, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh)))
  _same([next(fresh) for _ in range(3)], expected)


def test_pipeline_args_through_a_manager(data_dir, tmp_path):
  it = pipeline.make_train_iterator(_cfg(data_dir), 0, 1)
  [next(it) for _ in range(3)]
  mngr = _manager(tmp_path / "ckpt")
  mngr.save(3, args=ocp.args.Composite(data_iter=checkpoint.PipelineSave(it), meta=ocp.args.JsonSave({"step": 3})))
  mngr.wait_until_finished()
  expected = [next(it) for _ in range(2)]
  fresh = pipeline.make_train_iterator(_cfg(data_dir), 0, 1)
  out = _manager(tmp_path / "ckpt").restore(
    3, args=ocp.args.Composite(data_iter=checkpoint.PipelineRestore(fresh), meta=ocp.args.JsonRestore())
  )
  assert out["meta"] == {"step": 3} and out["data_iter"] is fresh
  _same([next(fresh) for _ in range(2)], expected)


def test_saved_by_two_processes_restored_by_one_or_four(data_dir, tmp_path):
  cfg = _cfg(data_dir)
  single = pipeline.make_train_iterator(cfg, 0, 1)
  procs = [pipeline.make_train_iterator(cfg, i, 2) for i in range(2)]
  for it in [single] + procs:
    [next(it) for _ in range(5)]
  handler = checkpoint.PipelineCheckpointHandler()
  for it in procs:  # what each host of a 2-host run writes into the item directory
    handler.save(tmp_path, args=checkpoint.PipelineSave(it))
  assert sorted(os.listdir(tmp_path)) == ["process_0-of-2.json", "process_1-of-2.json"]
  assert json.loads((tmp_path / "process_1-of-2.json").read_text())["streams"].keys() == {"4", "5", "6", "7"}
  expected = [next(single) for _ in range(3)]

  one = handler.restore(tmp_path, args=checkpoint.PipelineRestore(pipeline.make_train_iterator(cfg, 0, 1)))
  _same([next(one) for _ in range(3)], expected)
  four = [
    handler.restore(tmp_path, args=checkpoint.PipelineRestore(pipeline.make_train_iterator(cfg, i, 4)))
    for i in range(4)
  ]
  got = [[next(it) for _ in range(3)] for it in four]
  _same([{k: np.concatenate([g[s][k] for g in got]) for k in expected[0]} for s in range(3)], expected)


def test_incomplete_or_mixed_saves_are_refused(data_dir, tmp_path):
  cfg = _cfg(data_dir)
  a, b = (pipeline.make_train_iterator(cfg, i, 2) for i in range(2))
  next(a)
  handler = checkpoint.PipelineCheckpointHandler()
  handler.save(tmp_path, args=checkpoint.PipelineSave(a))
  with pytest.raises(ValueError, match="incomplete set of iterator states"):
    checkpoint.load_state(str(tmp_path))
  handler.save(tmp_path, args=checkpoint.PipelineSave(b))
  with pytest.raises(ValueError, match=r"at different steps \[0, 1\]"):
    checkpoint.load_state(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="no process_\\*-of-\\*.json"):
    checkpoint.load_state(str(tmp_path / "nothing"))


def test_states_in_a_bucket(data_dir, gcs_bucket):
  """Each host's state file in a bucket; restored by another process count from there. A missing or partial set
  of states is an error, never a fresh start of the data."""
  import uuid

  from data_pipeline import filesystem as fs

  root = fs.path(f"{gcs_bucket}/{uuid.uuid4().hex[:8]}")
  cfg = _cfg(data_dir)
  single = pipeline.make_train_iterator(cfg, 0, 1)
  procs = [pipeline.make_train_iterator(cfg, i, 2) for i in range(2)]
  for it in [single] + procs:
    [next(it) for _ in range(4)]
  expected = [next(single) for _ in range(3)]
  handler = checkpoint.PipelineCheckpointHandler()
  handler.save(root / "partial", args=checkpoint.PipelineSave(procs[1]))
  for it in procs:
    handler.save(root / "4", args=checkpoint.PipelineSave(it))
  assert sorted(p.name for p in (root / "4").iterdir()) == ["process_0-of-2.json", "process_1-of-2.json"]
  one = handler.restore(root / "4", args=checkpoint.PipelineRestore(pipeline.make_train_iterator(cfg, 0, 1)))
  _same([next(one) for _ in range(3)], expected)
  four = [pipeline.make_train_iterator(cfg, i, 4) for i in range(4)]
  for it in four:
    it.set_state(checkpoint.load_state(os.fspath(root / "4")))  # a gs:// string, as a config holds it
  got = [[next(it) for _ in range(3)] for it in four]
  _same([{k: np.concatenate([g[s][k] for g in got]) for k in expected[0]} for s in range(3)], expected)
  fresh = pipeline.make_train_iterator(cfg, 0, 1)
  with pytest.raises(FileNotFoundError, match="no process_\\*-of-\\*.json iterator states in gs://"):
    handler.restore(root / "missing", args=checkpoint.PipelineRestore(fresh))
  with pytest.raises(ValueError, match=r"incomplete set of iterator states: \['process_1-of-2.json'\]"):
    handler.restore(root / "partial", args=checkpoint.PipelineRestore(fresh))
  assert fresh.step == 0


def test_states_through_an_orbax_manager_in_a_bucket(data_dir, gcs_bucket):
  import uuid

  path = f"{gcs_bucket}/{uuid.uuid4().hex[:8]}/ckpt"
  it = pipeline.make_train_iterator(_cfg(data_dir), 0, 1)
  [next(it) for _ in range(3)]
  mngr = _manager(path)
  mngr.save(3, args=ocp.args.Composite(data_iter=checkpoint.PipelineSave(it)))
  mngr.wait_until_finished()
  expected = [next(it) for _ in range(2)]
  fresh = pipeline.make_train_iterator(_cfg(data_dir), 0, 1)
  _manager(path).restore(3, args=ocp.args.Composite(data_iter=checkpoint.PipelineRestore(fresh)))
  _same([next(fresh) for _ in range(2)], expected)
