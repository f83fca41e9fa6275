"""The training iterator: batch format, mixture, packing, masking, state, process-count independence, eval."""

import json
import os
import shutil
import threading

import numpy as np
import pytest

from data_pipeline import checkpoint, masking, pipeline, prepare

LANGS = ("aaa_Latn", "bbb_Latn", "ccc_Cyrl")
DOCS = {"aaa_Latn": (240, 30), "bbb_Latn": (90, 70), "ccc_Cyrl": (40, 12)}  # documents, tokens each
SPECIAL = {"pad": 0, "eos": 1, "bos": 2, "unk": 3, "mask": 4}
VOCAB = 4_000_000


def _token(lang, doc, pos):
  return 5 + LANGS.index(lang) * 1_000_000 + doc * 1000 + pos


def _decode(t):
  """(language index, document) of a text token."""
  return (t - 5) // 1_000_000, (t - 5) % 1_000_000 // 1000


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("corpus"))
  docs = {l: [[_token(l, i, p) for p in range(n)] for i in range(count)] for l, (count, n) in DOCS.items()}
  info = {"path": "synthetic", "vocab_size": VOCAB, "special_ids": SPECIAL}
  prepare.write_pretokenized(d, docs, info, prepare.Settings("", max_len=128, eval_documents=6, eval_every=3))
  return d


def _cfg(data_dir, **kw):
  return pipeline.PipelineConfig(
    **{
      "data_dir": data_dir,
      "seq_len": 64,
      "batch_size": 8,
      "mask_rate": 0.3,
      "tau": 0.5,
      "prefetch": 0,
      "mix_block": 256,
      **kw,
    }
  )


def _take(it, n):
  out = [next(it) for _ in range(n)]
  return out


def _same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _originals(batch):
  """input_ids with the masked positions given back their labels."""
  orig = batch["input_ids"].copy()
  w = batch["masked_weights"] > 0
  rows = np.broadcast_to(np.arange(len(orig))[:, None], w.shape)
  orig[rows[w], batch["masked_positions"][w]] = batch["masked_labels"][w]
  return orig


def test_batch_format_and_contents(data_dir):
  cfg = _cfg(data_dir)
  it = pipeline.make_train_iterator(cfg, 0, 1)
  assert it.languages == LANGS
  k = masking.default_max_masked(64, 0.3)
  schema = pipeline.batch_schema(64, k)
  for batch in _take(it, 20):
    assert tuple(batch) == pipeline.BATCH_KEYS
    assert {key: (v.shape[1], v.dtype) for key, v in batch.items()} == schema  # what AOT compiles for
    for key in ("input_ids", "segment_ids", "positions", "lang_ids"):
      assert batch[key].shape == (8, 64) and batch[key].dtype == np.int32, key
    for key, dtype in (("masked_positions", np.int32), ("masked_labels", np.int32), ("masked_weights", np.float32)):
      assert batch[key].shape == (8, k) and batch[key].dtype == dtype, key
    seg, pos, lang = batch["segment_ids"], batch["positions"], batch["lang_ids"]
    orig = _originals(batch)
    w = batch["masked_weights"] > 0
    assert np.all(np.take_along_axis(seg, batch["masked_positions"], 1)[w] > 0)  # never padding
    assert np.all((lang == -1) == (seg == 0)) and np.all(orig[seg == 0] == 0)
    for r in range(8):
      for j in range(1, seg[r].max() + 1):
        t, p, l = orig[r][seg[r] == j], pos[r][seg[r] == j], lang[r][seg[r] == j]
        assert np.array_equal(p, np.arange(len(t)))  # positions restart
        text = t[t > 4]
        assert len({_decode(x) for x in text}) == 1  # one document per segment
        assert np.all(l == _decode(text[0])[0])  # its language
  it.close()


def test_empirical_mixture_matches_the_weights(data_dir):
  cfg = _cfg(data_dir, tau=0.3)
  it = pipeline.make_train_iterator(cfg, 0, 1)
  counts = np.zeros(3)
  for batch in _take(it, 150):
    counts += np.bincount(batch["lang_ids"][batch["lang_ids"] >= 0], minlength=3)
  # Documents read = given out + still in the packers' open rows (up to packing_bins rows per stream).
  held = np.zeros(3)
  for stream in it._inner._streams.values():
    for row in stream._packer.held_rows():
      held += np.bincount(row["lang_ids"][row["lang_ids"] >= 0], minlength=3)
  it.close()
  n = np.array([c * (t + 2) for c, t in (DOCS[l] for l in LANGS)], float)  # train tokens incl. <bos>/<eos>
  n -= [6 * (t + 2) for _, t in (DOCS[l] for l in LANGS)]  # 6 eval documents each
  p = n**0.3 / np.sum(n**0.3)
  np.testing.assert_allclose(it.mixture.weights, p, rtol=1e-9)
  read = counts + held
  np.testing.assert_allclose(read / read.sum(), p, atol=0.015)
  np.testing.assert_allclose(counts / counts.sum(), p, atol=0.015 + held.sum() / read.sum())


@pytest.mark.parametrize("prefetch", [0, 2])
def test_save_restore_mid_stream(data_dir, prefetch):
  cfg = _cfg(data_dir, prefetch=prefetch, packing="best_fit")
  it = pipeline.make_train_iterator(cfg, 0, 1)
  _take(it, 5)
  state = json.loads(json.dumps(it.get_state()))
  assert state["step"] == 5
  expected = _take(it, 4)
  it.close()
  fresh = pipeline.make_train_iterator(cfg, 0, 1)
  fresh.set_state(state)
  _same(_take(fresh, 4), expected)
  fresh.set_state(state)  # again, on a running iterator
  _same(_take(fresh, 4), expected)
  fresh.close()


@pytest.mark.parametrize("num_streams", [None, 4])
def test_processes_together_make_the_one_process_batch(data_dir, num_streams):
  cfg = _cfg(data_dir, num_streams=num_streams)
  one = _take(pipeline.make_train_iterator(cfg, 0, 1), 6)
  for count in (2, 4):
    its = [pipeline.make_train_iterator(cfg, i, count) for i in range(count)]
    parts = [_take(it, 6) for it in its]
    joined = [{k: np.concatenate([p[s][k] for p in parts]) for k in one[0]} for s in range(6)]
    _same(joined, one)
    assert all(p[0]["input_ids"].shape == (8 // count, 64) for p in parts)


def test_elastic_restore_across_process_counts(data_dir):
  cfg = _cfg(data_dir)
  single = pipeline.make_train_iterator(cfg, 0, 1)
  _take(single, 3)
  state = single.get_state()
  expected = _take(single, 3)
  # 1 → 2 processes.
  halves = [pipeline.make_train_iterator(cfg, i, 2) for i in range(2)]
  for h in halves:
    h.set_state(state)
  got = [_take(h, 3) for h in halves]
  _same([{k: np.concatenate([got[0][s][k], got[1][s][k]]) for k in expected[0]} for s in range(3)], expected)
  # 2 → 1: the union of both processes' states is the global state.
  s0, s1 = halves[0].get_state(), halves[1].get_state()
  assert s0["step"] == s1["step"] == 6 and not set(s0["streams"]) & set(s1["streams"])
  after = _take(single, 2)
  merged = dict(s0, streams={**s0["streams"], **s1["streams"]})
  back = pipeline.make_train_iterator(cfg, 0, 1)
  back.set_state(merged)
  _same(_take(back, 2), after)
  with pytest.raises(ValueError, match=r"lacks streams \[4, 5, 6, 7\] of process 0/1"):
    back.set_state(s0)


def test_batch_size_change_keeps_the_global_row_order(data_dir):
  """num_streams fixed, batch 8 → 4 (a smaller micro-batch) and 1 → 2 processes: the rows that follow the saved
  state are the same rows, masked the same; batch t of 8 rows is batches 2t and 2t+1 of 4 rows, interleaved per
  stream (row j of stream s is row 2s + j of the big batch and row s of small batch j)."""
  big = pipeline.make_train_iterator(_cfg(data_dir, num_streams=4), 0, 1)
  _take(big, 3)
  state = json.loads(json.dumps(big.get_state()))
  expected = _take(big, 2)
  small = [pipeline.make_train_iterator(_cfg(data_dir, batch_size=4, num_streams=4), i, 2) for i in range(2)]
  for it in small:
    it.set_state(state)
    assert it.step == 6
  halves = [_take(it, 4) for it in small]
  got = [{k: np.concatenate([h[j][k] for h in halves]) for k in expected[0]} for j in range(4)]
  for t in range(2):
    for k in expected[0]:
      pair = np.stack([got[2 * t][k], got[2 * t + 1][k]], axis=1)  # [stream, j, ...]
      np.testing.assert_array_equal(pair.reshape(expected[t][k].shape), expected[t][k], err_msg=k)
  # Back to 8 rows from the 4-row iterators' merged state (rows 10 of each stream given).
  merged = checkpoint.merge_states([it.get_state() for it in small])
  again = pipeline.make_train_iterator(_cfg(data_dir, num_streams=4), 0, 1)
  again.set_state(merged)
  _same(_take(again, 1), _take(big, 1))
  with pytest.raises(ValueError, match="num_streams: saved 8, now 4"):
    again.set_state(dict(merged, pipeline=dict(merged["pipeline"], num_streams=8)))


@pytest.mark.slow
def test_worker_processes_do_not_change_the_batches(data_dir):
  plain = pipeline.make_train_iterator(_cfg(data_dir), 0, 1)
  expected = _take(plain, 6)
  it = pipeline.make_train_iterator(_cfg(data_dir, num_workers=2), 0, 1)
  try:
    got = _take(it, 3)
    state = it.get_state()
    got += _take(it, 3)
    _same(got, expected)
    it.set_state(state)  # restore under workers: restarts them from the state
    _same(_take(it, 3), expected[3:])
  finally:
    it.close()
  # The state does not record the worker count: a plain iterator continues it.
  plain.set_state(state)
  _same(_take(plain, 3), expected[3:])


def test_seed_determines_the_sequence(data_dir):
  a = _take(pipeline.make_train_iterator(_cfg(data_dir, seed=1), 0, 1), 3)
  b = _take(pipeline.make_train_iterator(_cfg(data_dir, seed=1), 0, 1), 3)
  c = _take(pipeline.make_train_iterator(_cfg(data_dir, seed=2), 0, 1), 3)
  _same(a, b)
  assert not np.array_equal(a[0]["input_ids"], c[0]["input_ids"])


def test_eval_batches(data_dir):
  cfg = _cfg(data_dir, languages=("ccc_Cyrl", "aaa_Latn"))
  first = list(pipeline.eval_batches(cfg, 0, 1))
  _same([b for _, b in first], [b for _, b in pipeline.eval_batches(cfg, 0, 1)])
  for index, lang in enumerate(("ccc_Cyrl", "aaa_Latn")):
    batches = [b for l, b in first if l == lang]
    docs = []
    for b in batches:
      orig, seg = _originals(b), b["segment_ids"]
      assert np.all(b["lang_ids"][seg > 0] == index) and np.all(b["lang_ids"][seg == 0] == -1)
      for r in range(len(seg)):
        for j in range(1, seg[r].max() + 1):
          text = orig[r][(seg[r] == j) & (orig[r] > 4)]
          docs.append(_decode(text[0]))
    # Every held-out document once: the 3rd, 6th, … of the language, six of them.
    assert sorted(docs) == [(LANGS.index(lang), d) for d in range(2, 18, 3)]
  halves = [list(pipeline.eval_batches(cfg, i, 2)) for i in range(2)]
  assert [l for l, _ in halves[0]] == [l for l, _ in first]
  _same([{k: np.concatenate([x[k], y[k]]) for k in x} for (_, x), (_, y) in zip(*halves)], [b for _, b in first])
  assert len(list(pipeline.eval_batches(cfg, 0, 1, languages=["aaa_Latn"], max_batches=1))) == 1


def test_languages_subset_and_named_index(data_dir):
  it = pipeline.make_train_iterator(_cfg(data_dir, languages="ccc,aaa_Latn"), 0, 1)
  assert it.languages == ("ccc_Cyrl", "aaa_Latn")
  for b in _take(it, 5):
    orig = _originals(b)
    text = (b["segment_ids"] > 0) & (orig > 4)
    assert np.all(np.array(it.languages)[b["lang_ids"][text]] == np.array(LANGS)[_decode(orig[text])[0]])
  it.close()


def test_bad_inputs(data_dir, tmp_path):
  with pytest.raises(ValueError, match="phase languages not in the data: xho"):
    pipeline.make_train_iterator(_cfg(data_dir, languages=("aaa_Latn", "xho")), 0, 1)
  with pytest.raises(FileNotFoundError, match="stats.json does not exist: run `python -m data_pipeline.prepare"):
    pipeline.make_train_iterator(_cfg(str(tmp_path)), 0, 1)
  with pytest.raises(ValueError, match="num_streams 8 is not divisible by process_count 3"):
    pipeline.make_train_iterator(_cfg(data_dir, batch_size=24, num_streams=8), 0, 3)
  with pytest.raises(ValueError, match="num_streams 3 must divide batch_size 8"):
    _cfg(data_dir, num_streams=3)
  with pytest.raises(ValueError, match="mask id 4 and pad id 0, the pipeline config says mask_id 103"):
    pipeline.make_train_iterator(_cfg(data_dir, mask_id=103), 0, 1)
  it = pipeline.make_train_iterator(_cfg(data_dir), 0, 1)
  other = pipeline.make_train_iterator(_cfg(data_dir, seq_len=128), 0, 1)
  with pytest.raises(ValueError, match="another pipeline .*seq_len: saved 64, now 128"):
    other.set_state(it.get_state())
  # A corrupt shard is named.
  bad = str(tmp_path / "bad")
  shutil.copytree(data_dir, bad)
  shard = os.path.join(bad, "bbb_Latn", "train", "pretokenized-bbb_Latn.array_record")
  # Shards are opened when first read (not at start-up): a shard of another length, then a truncated one.
  shutil.copy(os.path.join(bad, "ccc_Cyrl", "train", "pretokenized-ccc_Cyrl.array_record"), shard)
  with pytest.raises(
    ValueError,
    match=r"shard .*bbb_Latn.array_record is corrupt or truncated: stats.json lists "
    r"84 records, the file holds 34",
  ):
    _take(pipeline.make_train_iterator(_cfg(bad), 0, 1), 3)
  with open(shard, "r+b") as f:
    f.truncate(os.path.getsize(shard) // 2)
  with pytest.raises(
    ValueError,
    match=r"bbb_Latn.array_record (is corrupt or truncated: stats.json lists 84 records, "
    r"the file holds 0|: cannot open the shard)",
  ):
    _take(pipeline.make_train_iterator(_cfg(bad), 0, 1), 3)
  os.remove(shard)
  with pytest.raises(FileNotFoundError, match="listed in stats.json is missing"):
    pipeline.make_train_iterator(_cfg(bad), 0, 1)


def test_default_process_index_comes_from_jax(data_dir):
  it = pipeline.make_train_iterator(_cfg(data_dir))
  assert (it.process_index, it.process_count) == (0, 1)


@pytest.fixture(scope="module")
def web_dir(tmp_path_factory):
  """Documents of 20..80 tokens in 3 languages (several per row at seq 128)."""
  d = str(tmp_path_factory.mktemp("web"))
  rng = np.random.default_rng(0)
  docs = {l: [rng.integers(5, 1000, rng.integers(20, 80)).tolist() for _ in range(300)] for l in LANGS}
  info = {"path": "synthetic", "vocab_size": 1000, "special_ids": SPECIAL}
  prepare.write_pretokenized(d, docs, info, prepare.Settings("", max_len=128, eval_documents=0))
  return d


@pytest.mark.parametrize("streams", [2, 8])
@pytest.mark.parametrize("read_block", [1, 32])
def test_every_batch_reads_and_packs_about_the_same(web_dir, streams, read_block, monkeypatch):
  """Documents packed per batch, one row per stream: rows are packed one at a time, so no batch piles up the
  packing of many rows (a packer that fills all its 8 bins at once packs nothing on 7 batches of 8, and 8 rows'
  worth on the eighth): p99 ≤ 3 × median over 6 × 8 batches. Read one document per visit and serially, the
  documents read per batch are those packed, and spread the same way (in blocks, a buffer is read at once)."""
  packed = [0]
  call = pipeline._Reads.__call__

  def counted(self, k):
    doc = call(self, k)
    packed[0] += len(doc["tokens"]) > 0
    return doc

  monkeypatch.setattr(pipeline._Reads, "__call__", counted)
  cfg = _cfg(
    web_dir,
    seq_len=256,
    batch_size=streams,
    num_streams=streams,
    packing_bins=8,
    read_block=read_block,
    shuffle_blocks=1 if read_block == 1 else 8,
    read_threads=0 if read_block == 1 else 16,
  )
  it = pipeline.make_train_iterator(cfg, 0, 1)
  _take(it, 8)  # start-up: every open row filled
  read, pack = [], []
  for _ in range(6 * 8):
    reads, packs = pipeline.READERS.reads, packed[0]
    next(it)
    read.append(pipeline.READERS.reads - reads)
    pack.append(packed[0] - packs)
  it.close()
  assert np.percentile(pack, 99) <= 3 * np.median(pack) and np.median(pack) >= streams
  if read_block == 1:
    assert read == pack


def test_reading_ahead_is_planned_a_buffer_at_a_time(web_dir, monkeypatch):
  """Planning the buffers to read ahead is the packer's own work: each document asked for plans at most one buffer
  beyond the next, so no batch does many buffers' planning at once (planning all `read_ahead` documents' worth at a
  buffer's start made a decay batch at 1,834 languages take 3-4 times the median every few batches), while the
  documents requested after the current one stay at `read_ahead` or more (one less right after a call)."""
  new_visits, horizon = [], []
  request, call = pipeline._Reads._request, pipeline._Reads.__call__

  def counted_request(self, v):
    fresh = v not in self._visits
    request(self, v)
    new_visits[-1] += fresh

  def counted_call(self, k):
    new_visits.append(0)
    doc = call(self, k)
    beyond = [v for v in self._visits if v >= self._low + self._docs.visits_per_window]
    rest = max(0, self._docs.size(k // self._docs.slots) - k % self._docs.slots - 1)  # after k in its buffer
    horizon.append(rest + sum(r[3] for v in beyond for r in self._docs.visit(v)[1]))  # documents
    return doc

  monkeypatch.setattr(pipeline._Reads, "_request", counted_request)
  monkeypatch.setattr(pipeline._Reads, "__call__", counted_call)
  cfg = _cfg(  # read_ahead: about ten buffers of 4 documents
    web_dir, seq_len=256, batch_size=2, num_streams=2, read_block=2, shuffle_blocks=2, read_threads=4, read_ahead=40
  )
  it = pipeline.make_train_iterator(cfg, 0, 1)
  _take(it, 20)
  it.close()
  per_buffer = cfg.shuffle_blocks
  assert max(new_visits[2:]) <= 2 * per_buffer, max(new_visits)  # the current buffer (after a restore) + one
  assert min(horizon[len(horizon) // 2 :]) >= cfg.read_ahead - 1, horizon
  assert sum(new_visits) >= len(new_visits) // (cfg.read_block * per_buffer)  # every buffer was requested


_FILES_SCRIPT = """
import json, resource, sys
import numpy as np
from data_pipeline import benchmark, pipeline
cfg = pipeline.PipelineConfig(data_dir=sys.argv[1], tau=0.0, seq_len=64, batch_size=16, mask_rate=0.3, prefetch=0,
                              num_workers=int(sys.argv[2]))
it = pipeline.make_train_iterator(cfg, 0, 1)
seen, most = set(), 0
for _ in range(40):
  seen |= set(np.unique(next(it)["lang_ids"]).tolist()) - {-1}
  most = max(most, benchmark.open_files())
it.close()
print(json.dumps({"languages": len(seen), "files": most, "limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}))
"""


@pytest.mark.slow
def test_1834_languages_under_ulimit_1024(tmp_path):
  """FineWeb2's 1,834 languages, one tiny shard each, all mixed uniformly: far more shards are read than may be
  open at once, yet the process and its workers hold at most 256 descriptors, under `ulimit -n 1024`."""
  import subprocess
  import sys

  rng = np.random.default_rng(0)
  docs = {
    f"l{i:04d}_Latn": [rng.integers(5, 1000, rng.integers(4, 12)).tolist() for _ in range(3)] for i in range(1834)
  }
  info = {"path": "synthetic", "vocab_size": 1000, "special_ids": SPECIAL}
  prepare.write_pretokenized(str(tmp_path), docs, info, prepare.Settings("", max_len=64, eval_documents=0))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for workers in (0, 2):
    out = subprocess.run(
      [
        "bash",
        "-c",
        'ulimit -n 1024 && exec "$0" -c "$1" "$2" "$3"',
        sys.executable,
        _FILES_SCRIPT,
        str(tmp_path),
        str(workers),
      ],
      cwd=root,
      capture_output=True,
      text=True,
      timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.splitlines()[-1])
    assert got["limit"] == 1024 and got["languages"] > 600 and got["files"] <= 256, got


def test_reader_cache_keeps_the_most_recent_files_open(data_dir):
  stats = json.load(open(os.path.join(data_dir, "stats.json")))
  shards = [
    (os.path.join(data_dir, s["path"]), s["sequences"]) for l in LANGS for s in stats["languages"][l]["train"]["shards"]
  ]
  cache = pipeline._ReaderCache(capacity=2)
  fds = lambda: len(os.listdir("/proc/self/fd"))
  before = fds()
  for path, n in shards + shards[:1]:
    record = np.frombuffer(cache.read(path, n, n - 1), np.int32)
    assert record[0] == 2 and record[-1] == 1  # <bos> … <eos>
  assert cache.opened == 4 and fds() == before + 2  # the first was closed, then opened again
  cache.read(*shards[0], 0)
  assert cache.opened == 4
  cache.close_all()
  assert fds() == before


# ----------------------------------------------------------------------------------------------------------------
# Data in a bucket, and reads that overlap
# ----------------------------------------------------------------------------------------------------------------


def test_data_dir_in_a_bucket_gives_the_same_batches(data_dir, gcs_bucket, tmp_path, monkeypatch):
  """The same corpus in a bucket: the same training and eval batches, read from local copies of only the phase's
  languages, made before the first batch."""
  import uuid

  from data_pipeline import filesystem as fs

  remote = fs.path(f"{gcs_bucket}/{uuid.uuid4().hex[:8]}/data")
  fs.copy_tree(fs.path(data_dir), remote)
  monkeypatch.setenv("MMBERT_JAX_CACHE", str(tmp_path / "cache"))
  langs = ("ccc_Cyrl", "aaa_Latn")
  local_cfg = _cfg(data_dir, languages=langs)
  remote_cfg = _cfg(os.fspath(remote), languages=langs)
  it = pipeline.make_train_iterator(remote_cfg, 0, 1)
  copied = sorted(
    os.path.relpath(os.path.join(d, f), tmp_path / "cache")
    for d, _, files in os.walk(tmp_path / "cache")
    for f in files
  )
  stats = json.load(open(os.path.join(data_dir, "stats.json")))
  shards = sorted(s["path"] for l in langs for s in stats["languages"][l]["train"]["shards"])
  # <cache>/gs/<bucket>/<prefix>/<shard path>.<version key>: every train shard of the two languages, nothing else
  assert sorted(p.split("/", 4)[-1].rsplit(".", 1)[0] for p in copied) == shards
  expected = _take(pipeline.make_train_iterator(local_cfg, 0, 1), 4)
  _same(_take(it, 4), expected)
  state = it.get_state()
  it.close()
  _same([b for _, b in pipeline.eval_batches(remote_cfg, 0, 1)], [b for _, b in pipeline.eval_batches(local_cfg, 0, 1)])
  fresh = pipeline.make_train_iterator(remote_cfg, 0, 1)
  fresh.set_state(state)
  _same(_take(fresh, 2), _take(pipeline.make_train_iterator(local_cfg, 0, 1), 6)[4:])
  fresh.close()
  with pytest.raises(ValueError, match="data_dir=s3://b/x: the scheme s3:// is not supported"):
    pipeline.make_train_iterator(_cfg("s3://b/x"), 0, 1)
  (remote / shards[0]).unlink()
  with pytest.raises(FileNotFoundError, match=f"shard {remote}/{shards[0]} listed in stats.json is missing"):
    pipeline.make_train_iterator(remote_cfg, 0, 1)


class _SlowReader:
  """An ArrayRecordReader that sleeps in every read and counts the reads in progress at once (independently of
  the pipeline's own counters)."""

  # A real lock even outside the test that installs it: a read still in flight when that test closes its
  # iterators may open a reader of this class in the process-wide cache after it.
  lock, now, most, delay = threading.Lock(), 0, 0, 0.02

  def __init__(self, *args, **kwargs):
    from array_record.python.array_record_module import ArrayRecordReader

    self._reader = ArrayRecordReader(*args, **kwargs)

  def read(self, indices):
    cls = type(self)
    with cls.lock:
      cls.now += 1
      cls.most = max(cls.most, cls.now)
    try:
      import time

      time.sleep(cls.delay)
      return self._reader.read(indices)
    finally:
      with cls.lock:
        cls.now -= 1

  def num_records(self):
    return self._reader.num_records()

  def close(self):
    self._reader.close()


@pytest.mark.parametrize("threads", [0, 8])
def test_reads_overlap_and_change_no_batch(data_dir, monkeypatch, threads):
  """Slow reads (20 ms each): with read threads, several are in progress at once (serial reads never overlap,
  however loaded the machine), and the batches, also after a restore, are those of plain serial reads."""
  import threading

  expected = _take(pipeline.make_train_iterator(_cfg(data_dir, read_threads=0), 0, 1), 6)
  monkeypatch.setattr(_SlowReader, "lock", threading.Lock())
  monkeypatch.setattr(_SlowReader, "most", 0)
  monkeypatch.setattr(pipeline, "ArrayRecordReader", _SlowReader)
  pipeline.READERS.close_all()
  it = pipeline.make_train_iterator(_cfg(data_dir, read_threads=threads, read_ahead=16, prefetch=2), 0, 1)
  got = _take(it, 3)
  state = it.get_state()
  got += _take(it, 3)
  it.close()
  _same(got, expected)
  assert _SlowReader.most == 1 if threads == 0 else _SlowReader.most >= 4, _SlowReader.most
  fresh = pipeline.make_train_iterator(_cfg(data_dir, read_threads=threads, read_ahead=16), 0, 1)
  fresh.set_state(state)
  _same(_take(fresh, 3), expected[3:])
  fresh.close()
  pipeline.READERS.close_all()


def test_injected_latency_changes_no_batch(data_dir):
  """`read_latency_ms` (the benchmark's network disk) sleeps in the reading threads and leaves the batches as
  they are; the reads of a batch are in flight together."""
  expected = _take(pipeline.make_train_iterator(_cfg(data_dir), 0, 1), 4)
  pipeline.READERS.max_in_flight = 0
  it = pipeline.make_train_iterator(_cfg(data_dir, read_latency_ms=10, read_threads=8), 0, 1)
  _same(_take(it, 4), expected)
  it.close()
  assert pipeline.READERS.max_in_flight >= 4
  pipeline.READERS.latency_s = 0.0


def test_reader_evicted_while_another_thread_reads_it(data_dir):
  """A cache of one reader shared by threads reading different shards: a reader in use is closed only when its
  read ends, so every record comes back whole."""
  import concurrent.futures

  stats = json.load(open(os.path.join(data_dir, "stats.json")))
  shards = [
    (os.path.join(data_dir, s["path"]), s["sequences"]) for l in LANGS for s in stats["languages"][l]["train"]["shards"]
  ]
  cache = pipeline._ReaderCache(capacity=1)
  cache.latency_s = 0.005
  jobs = [(path, n, i) for path, n in shards for i in range(n)] * 2
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    records = list(pool.map(lambda job: np.frombuffer(cache.read(*job), np.int32), jobs))
  serial = pipeline._ReaderCache(capacity=8)
  for job, record in zip(jobs, records):
    np.testing.assert_array_equal(record, np.frombuffer(serial.read(*job), np.int32), err_msg=str(job))
  assert cache.max_in_flight > 1 and cache.opened > len(shards)  # readers were closed and opened again
  serial.close_all()
  cache.close_all()


# ----------------------------------------------------------------------------------------------------------------
# Reads in blocks: the mixture and the passes, computed on the visits (no files are read)
# ----------------------------------------------------------------------------------------------------------------


def _visit_streams(docs, lengths, weights, tau=0.3, streams=4, block=32, max_passes=None, total_tokens=None):
  """Row streams over synthetic languages ({name: documents}; `lengths`: tokens of each document), and each
  language's prefix sums of document lengths."""
  from data_pipeline import mixture

  names = tuple(docs)
  counts = {l: (float(np.sum(lengths[l])), docs[l]) for l in names}
  mix = mixture.compute_mixture(counts, mixture.PhaseSpec(None, tau, {}, max_passes, total_tokens))
  cfg = pipeline.PipelineConfig(data_dir="unused", batch_size=streams, seq_len=8192, read_block=block)
  shards = tuple(((f"{l}.array_record", docs[l]),) for l in mix.languages)
  visit_w = pipeline.visit_weights(mix.doc_weights, [docs[l] for l in mix.languages], block)
  plan = pipeline.Plan(cfg, mix.languages, shards, tuple(mix.doc_weights), visit_w, 5, 100, {})
  orders, sources, selection = pipeline.block_orders(plan)
  cum = [np.concatenate([[0], np.cumsum(lengths[l])]) for l in mix.languages]
  return mix, [pipeline.StreamDocuments(plan, s, orders, sources, selection) for s in range(streams)], cum


def test_language_shares_of_10k_batches_within_2_percent():
  """Token shares read in 10⁴ batches of one decay host's share (4 rows × 8192), 200 languages of 2–500
  documents (log-normal lengths, σ = 1.1), tau 0.3, blocks of 32: within 2% (relative) of p_l = n_l^τ / Σ n^τ for
  the 60 largest languages, and for every language."""
  rng = np.random.default_rng(0)
  docs = {f"l{i:03d}": int(n) for i, n in enumerate(np.exp(rng.uniform(np.log(2), np.log(500), 200)))}
  lengths = {l: rng.lognormal(np.log(300), 1.1, n).astype(int) + 3 for l, n in docs.items()}
  mix, streams, cum = _visit_streams(docs, lengths, None)
  tokens = np.array([lengths[l].sum() for l in mix.languages], float)
  p = tokens**0.3 / np.sum(tokens**0.3)
  got, v = np.zeros(len(p)), 0
  while got.sum() < 1e4 * 4 * 8192:
    for stream in streams:
      lang, ranges = stream.visit(v)
      for _, _, start, count in ranges:
        got[lang] += cum[lang][start + count] - cum[lang][start]
    v += 1
  rel = np.abs(got / got.sum() / p - 1)
  assert rel[np.argsort(-p)[:60]].max() < 0.02 and rel.max() < 0.02, rel.max()


def test_pass_cap_holds_per_document():
  """A 40-document language capped at 5 passes (max_passes, a cap per language): each of its documents is read 5
  times, or 6 for the documents of one visit more than the expected number (a visit count is exact to one), and in
  every language the reads per document differ by at most one (the streams' visits are one sequence, read in
  whole passes of each language). Streams advance by tokens, as packing does."""
  rng = np.random.default_rng(1)
  docs = {"tiny": 40, "b": 3000, "c": 20000, "d": 50000}
  lengths = {l: rng.lognormal(np.log(300), 1.1, n).astype(int) + 3 for l, n in docs.items()}
  total = 0.5 * sum(float(v.sum()) for v in lengths.values())
  mix, streams, cum = _visit_streams(docs, lengths, None, streams=32, max_passes=5.0, total_tokens=total)
  assert mix.passes[mix.languages.index("tiny")] == pytest.approx(5.0)
  reads = [np.zeros(docs[l], int) for l in mix.languages]
  used, visits, read = np.zeros(len(streams)), np.zeros(len(streams), int), 0
  while read < total:
    s = int(np.argmin(used))
    lang, ranges = streams[s].visit(visits[s])
    visits[s] += 1
    for _, _, start, count in ranges:
      used[s] += cum[lang][start + count] - cum[lang][start]
      read += cum[lang][start + count] - cum[lang][start]
      reads[lang][start : start + count] += 1
  tiny = reads[mix.languages.index("tiny")]
  assert tiny.min() == 5 and tiny.max() <= 6 and abs(tiny.sum() - 5 * 40) <= 32, tiny
  for r in reads:
    assert r.max() - r.min() <= 1


def test_a_buffer_hands_out_every_document_of_its_visits_once():
  """A buffer's indices: first each document of its visits once, then empty ones (short visits leave room)."""
  rng = np.random.default_rng(2)
  docs = {"a": 5, "b": 70, "c": 1000}
  lengths = {l: rng.integers(1, 9, n) for l, n in docs.items()}
  _, streams, _ = _visit_streams(docs, lengths, None, block=8)
  stream = streams[1]
  for w in range(3):
    got = [stream.slot(k) for k in range(w * stream.slots, (w + 1) * stream.slots)]
    sizes = {v: sum(r[3] for r in stream.visit(v)[1]) for v in range(w * 8, (w + 1) * 8)}
    real = sum(sizes.values())
    assert real < stream.slots and all(g is None for g in got[real:])  # "a" has 5 documents: short visits
    assert sorted(got[:real]) == sorted((v, t) for v, n in sizes.items() for t in range(n))


def test_block_reads_open_a_shard_per_visit(tmp_path):
  """120 languages of 64 documents, 8 open readers: documents read one at a time open a shard for almost every
  document; in blocks of 32, about one per visit (two where a block crosses the end of a language)."""
  rng = np.random.default_rng(0)
  docs = {
    f"l{i:03d}_Latn": [rng.integers(5, 1000, rng.integers(8, 40)).tolist() for _ in range(64)] for i in range(120)
  }
  info = {"path": "synthetic", "vocab_size": 1000, "special_ids": SPECIAL}
  prepare.write_pretokenized(str(tmp_path), docs, info, prepare.Settings("", max_len=64, eval_documents=0))
  opens = {}
  for block in (1, 32):
    cfg = _cfg(str(tmp_path), tau=0.0, batch_size=4, read_block=block, max_open_files=8, read_threads=0)
    it = pipeline.make_train_iterator(cfg, 0, 1)
    _take(it, 5)
    opened, requests = pipeline.READERS.opened, pipeline.READERS.requests
    _take(it, 40)
    opens[block] = (pipeline.READERS.opened - opened) / 40
    visits = (pipeline.READERS.requests - requests) / 40
    it.close()
    assert opens[block] <= visits
  assert opens[32] < opens[1] / 8, opens


def test_bucket_data_that_does_not_fit_the_cache_is_refused_before_copying(data_dir, gcs_bucket, tmp_path, monkeypatch):
  """A gs:// data_dir whose phase shards (those not cached yet) exceed the cache disk's free space: one line naming
  the size, the free space and the gcsfuse route, and nothing copied; once the shards are cached, no room is
  needed."""
  import uuid

  from data_pipeline import filesystem as fs

  remote = fs.path(f"{gcs_bucket}/{uuid.uuid4().hex[:8]}/data")
  fs.copy_tree(fs.path(data_dir), remote)
  cache = tmp_path / "cache"
  monkeypatch.setenv("MMBERT_JAX_CACHE", str(cache))
  stats = json.load(open(os.path.join(data_dir, "stats.json")))
  size = sum(
    os.path.getsize(os.path.join(data_dir, s["path"]))
    for l in ("aaa_Latn",)
    for s in stats["languages"][l]["train"]["shards"]
  )
  cfg = _cfg(os.fspath(remote), languages=("aaa_Latn",))
  monkeypatch.setattr(fs, "free_space", lambda folder: size - 1)
  with pytest.raises(ValueError) as e:
    pipeline.make_train_iterator(cfg, 0, 1)
  message = str(e.value)
  assert "\n" not in message and f"{size / 2**30:.1f} GiB" in message and "gcsfuse" in message, message
  assert f"free in {cache}" in message and "MMBERT_JAX_CACHE" in message
  assert not cache.exists() or not [f for _, _, files in os.walk(cache) for f in files]
  monkeypatch.setattr(fs, "free_space", lambda folder: size)
  pipeline.make_train_iterator(cfg, 0, 1).close()
  monkeypatch.setattr(fs, "free_space", lambda folder: 0)  # all cached now
  pipeline.make_train_iterator(cfg, 0, 1).close()


def test_an_iterator_finalised_inside_the_reader_cache_lock_does_not_deadlock(data_dir):
  """Garbage collection can run an unreferenced iterator's close() (which closes the process's readers) while
  this thread holds the reader cache's lock, in the middle of a read: that must not wait on the lock forever."""
  import gc

  def finalise_under_the_lock():
    it = pipeline.make_train_iterator(_cfg(data_dir), 0, 1)
    _take(it, 1)
    with pipeline.READERS._lock:
      del it
      gc.collect()

  thread = threading.Thread(target=finalise_under_the_lock, daemon=True)
  thread.start()
  thread.join(timeout=60)
  assert not thread.is_alive(), "close() of a finalised iterator deadlocked on the reader cache's lock"
