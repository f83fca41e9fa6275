"""Downstream fine-tuning: heads and losses against numpy, metrics against hand-computed rankings, tiny fine-tunes
that must learn, checkpoint loading paths, task files and the embedded CLDR tasks."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import ROOT, tiny_config
from tiny_run import run_module

from data_pipeline import tasks
from data_pipeline import tokenizer as tokenizer_lib
from mmbert_jax import checkpoint as ckpt_lib
from mmbert_jax import finetune as ft
from mmbert_jax import hf
from mmbert_jax.model import MaskedLM, get_config

CFG = get_config(
  "tiny", vocab_size=512, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=48, local_window=8
)
SETTINGS = ft.Settings(epochs=3, batch_size=32, peak_lr=3e-3, num_devices=4)


def _params(seed=0):
  return nnx.to_pure_dict(nnx.state(MaskedLM(CFG, rngs=nnx.Rngs(seed)), nnx.Param))


def _rows(rng, n, lo, hi, lengths=(3, 12)):
  return [[CFG.bos_id] + list(rng.integers(lo, hi, rng.integers(*lengths))) + [CFG.eos_id] for _ in range(n)]


def _batch(seed=0, n=6, length=16):
  rng = np.random.default_rng(seed)
  return ft.pad_rows(_rows(rng, n, 5, 500, (2, length - 2)), length, CFG.pad_id)


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_pool(hidden, segments, how):
  if how == "cls":
    return hidden[:, 0]
  mask = (segments > 0)[..., None]
  return (hidden * mask).sum(1) / mask.sum(1)


# ---- heads and losses vs numpy ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_classification_loss_matches_numpy(pooling):
  model = ft.Classifier(CFG, 5, pooling=pooling, dropout=0.5, rngs=nnx.Rngs(1))
  model.bias[...] = jnp.arange(5, dtype=jnp.float32) * 0.1  # a non-zero bias must be added
  batch = _batch() | {"labels": np.array([0, 4, 2, 2, 1, 3], np.int32)}
  got = float(ft.classification_loss(model, batch))
  hidden = np.asarray(model.encoder.encode(batch["input_ids"], batch["segment_ids"]), np.float64)
  logits = _np_pool(hidden, batch["segment_ids"], pooling) @ np.asarray(model.kernel[...]) + np.asarray(model.bias[...])
  want = -_log_softmax(logits)[np.arange(6), batch["labels"]].mean()
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # Dropout is active only with rngs, and then changes the loss.
  dropped = float(ft.classification_loss(model, batch, nnx.Rngs(dropout=0)))
  assert np.isfinite(dropped) and abs(dropped - got) > 1e-4


@pytest.mark.slow
def test_mean_pooling_ignores_padding():
  model = ft.Embedder(CFG, pooling="mean", rngs=nnx.Rngs(0))
  batch = _batch(n=3, length=16)
  longer = {k: np.pad(v, ((0, 0), (0, 8))) for k, v in batch.items()}
  longer["input_ids"][:, 16:] = 7  # other tokens in padding positions: segment 0 keeps them out
  np.testing.assert_allclose(np.asarray(model(**longer)), np.asarray(model(**batch)), atol=1e-5)


@pytest.mark.slow
def test_contrastive_loss_is_numpy_info_nce():
  model = ft.Embedder(CFG, pooling="mean", rngs=nnx.Rngs(2))
  q, d = _batch(seed=1, n=5), _batch(seed=2, n=5, length=12)
  batch = q | {"pair_input_ids": d["input_ids"], "pair_segment_ids": d["segment_ids"]}
  temperature = 0.07
  got = float(ft.contrastive_loss(model, batch, temperature))

  def embed(b):
    h = _np_pool(
      np.asarray(model.encoder.encode(b["input_ids"], b["segment_ids"]), np.float64), b["segment_ids"], "mean"
    )
    return h / np.linalg.norm(h, axis=1, keepdims=True)

  eq, ed = embed(q), embed(d)
  terms = []
  for i in range(5):  # query i against every document, document i against every query
    sims_q = np.array([eq[i] @ ed[j] for j in range(5)]) / temperature
    sims_d = np.array([ed[i] @ eq[j] for j in range(5)]) / temperature
    terms.append((-np.log(np.exp(sims_q[i]) / np.exp(sims_q).sum()), -np.log(np.exp(sims_d[i]) / np.exp(sims_d).sum())))
  terms = np.array(terms)
  np.testing.assert_allclose(got, terms.mean(), rtol=1e-5)
  assert abs(terms[:, 0].mean() - terms[:, 1].mean()) > 1e-3  # both directions count, and they differ here


# ---- metrics -----------------------------------------------------------------------------------------------------


def test_retrieval_metrics_hand_computed():
  scores = np.array(
    [
      [0.9, 0.1, 0.3, 0.2],  # answer 0: rank 1
      [0.5, 0.4, 0.6, 0.1],  # answer 1: below 0 and 2 → rank 3
      [0.2, 0.7, 0.7, 0.0],  # answer 2, tied with 1: the tie counts against it → rank 2
      [0.8, 0.9, 0.95, 0.1],
    ]
  )  # answer 3: last → rank 4
  rank = ft.ranks(scores, np.array([0, 1, 2, 3]))
  np.testing.assert_array_equal(rank, [1, 3, 2, 4])
  m = ft.retrieval_metrics(rank)
  assert m["recall@1"] == 0.25
  np.testing.assert_allclose(m["mrr@10"], (1 + 1 / 3 + 1 / 2 + 1 / 4) / 4)
  # Beyond rank 10 the reciprocal rank counts 0.
  many = np.tile(np.linspace(1.0, 0.0, 12), (2, 1))
  rank = ft.ranks(many, np.array([9, 10]))
  np.testing.assert_array_equal(rank, [10, 11])
  np.testing.assert_allclose(ft.retrieval_metrics(rank)["mrr@10"], (1 / 10 + 0) / 2)


def test_classification_metrics_hand_computed():
  gold = np.array([0, 0, 0, 1, 1, 2])
  pred = np.array([0, 0, 1, 1, 2, 3])
  m = ft.classification_metrics(pred, gold)
  assert m["accuracy"] == 3 / 6
  # F1 per class: 0 → 2·2/(2+3) = 0.8, 1 → 2·1/(2+2) = 0.5, 2 → 0, 3 (predicted only) → 0
  np.testing.assert_allclose(m["macro_f1"], (0.8 + 0.5 + 0 + 0) / 4)


# ---- tiny fine-tunes ---------------------------------------------------------------------------------------------


def _synthetic_classification(rng, n_train=256, n_test=96):
  """Three classes, each written with its own token range: separable, but only after training the head."""

  def split(n):
    labels = rng.integers(0, 3, n)
    rows = [_rows(rng, 1, 10 + 40 * c, 50 + 40 * c)[0] for c in labels]
    langs = ["xx" if i % 2 else "yy" for i in range(n)]
    return rows, tasks.Split(["-"] * n, langs, labels.astype(np.int32))

  (train_rows, train), (test_rows, test) = split(n_train), split(n_test)
  task = tasks.Task("synthetic", "classification", train, test, label_names=("a", "b", "c"))
  return task, {"train": ft.pad_rows(train_rows, 16, 0), "test": ft.pad_rows(test_rows, 16, 0)}


@pytest.mark.slow
def test_tiny_finetune_separable_task_is_deterministic():
  task, arrays = _synthetic_classification(np.random.default_rng(0))
  encoder = ft.Encoder(CFG, _params(), None, "random init")
  result = ft.finetune(encoder, task, SETTINGS, arrays)
  assert result["metrics"]["accuracy"] > 0.95, result["metrics"]
  assert result["steps"] == 3 * (256 // 32) == len(result["train_loss"]) == ft.workload(task, SETTINGS, CFG).steps
  assert result["train_loss"][-1] < 0.75 * result["train_loss"][0]
  assert set(result["per_language"]) == {"xx", "yy"}
  assert sum(r["examples"] for r in result["per_language"].values()) == 96
  # Same seed: the same losses step by step (and the encoder given in is untouched by the donated steps).
  again = ft.finetune(encoder, task, SETTINGS, arrays)
  assert again["train_loss"] == result["train_loss"] and again["metrics"] == result["metrics"]
  other = ft.finetune(encoder, task, dataclasses.replace(SETTINGS, seed=1), arrays)
  assert other["train_loss"] != result["train_loss"]


@pytest.mark.slow
def test_protocol_picks_the_learning_rate_on_dev_and_averages_seeds_on_test():
  task, arrays = _synthetic_classification(np.random.default_rng(0))
  task.dev = task.test.select(np.arange(len(task.test)) % 2 == 0)  # every other test row
  arrays["dev"] = {k: v[::2] for k, v in arrays["test"].items()}
  encoder = ft.Encoder(CFG, _params(), None, "random init")
  settings = dataclasses.replace(SETTINGS, epochs=1)
  result = ft.protocol(encoder, task, settings, lrs=(1e-6, 3e-3), seeds=(0, 1), arrays=arrays)
  runs = {
    lr: [ft.finetune(encoder, task, dataclasses.replace(settings, peak_lr=lr, seed=s), arrays) for s in (0, 1)]
    for lr in (1e-6, 3e-3)
  }
  dev = {lr: np.mean([r["dev_metrics"]["accuracy"] for r in rs]) for lr, rs in runs.items()}
  assert dev[3e-3] > dev[1e-6] + 0.2 and result["lr"] == 3e-3
  assert result["dev"] == {str(lr): pytest.approx(v) for lr, v in dev.items()}
  for metric in ("accuracy", "macro_f1"):
    values = [r["metrics"][metric] for r in runs[3e-3]]
    assert result["metrics"][metric] == pytest.approx(np.mean(values))
    assert result["std"][metric] == pytest.approx(np.std(values))
  assert result["per_language"]["xx"]["accuracy"] == pytest.approx(
    np.mean([r["per_language"]["xx"]["accuracy"] for r in runs[3e-3]])
  )


@pytest.mark.slow
def test_tiny_contrastive_finetune_learns_pairs():
  """Query tokens t ↔ document tokens t + 200: unrelated before training, matched after."""
  rng = np.random.default_rng(3)

  def pairs(n):
    keys = rng.integers(10, 200, (n, 3))
    return ([[2, *k, 1] for k in keys], [[2, *(k + 200), 1] for k in keys])

  (q, d), (tq, td) = pairs(256), pairs(64)
  task = tasks.Task(
    "pairs",
    "retrieval",
    tasks.Split(["-"] * 256, ["xx"] * 256, pairs=["-"] * 256),
    tasks.Split(["-"] * 64, ["xx"] * 64, np.arange(64, dtype=np.int32)),
    candidates=("-",) * 64,
  )
  arrays = {
    "train": ft.pad_rows(q, 8, 0),
    "train_pairs": ft.pad_rows(d, 8, 0),
    "test": ft.pad_rows(tq, 8, 0),
    "candidates": ft.pad_rows(td, 8, 0),
  }
  result = ft.finetune(ft.Encoder(CFG, _params(), None, "random init"), task, SETTINGS, arrays)
  assert result["metrics"]["recall@1"] > 0.9, result["metrics"]
  assert result["metrics"]["mrr@10"] >= result["metrics"]["recall@1"]


def test_lr_schedule_warms_up_and_decays_linearly():
  schedule = ft.lr_schedule(ft.Settings(peak_lr=1.0, warmup_fraction=0.2), total_steps=10)
  lrs = np.array([float(schedule(s + 1)) for s in range(10)])
  # Two warmup steps up to the peak, then down by 1/9 per step; the last step still learns.
  np.testing.assert_allclose(lrs, [0.5, 1.0] + [(10 - s) / 9 for s in range(2, 10)], atol=1e-6)


# ---- loading checkpoints ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
  """A small SentencePiece model with the model's special ids, trained on CLDR text of three languages."""
  from data_pipeline import demo_corpus

  prefix = str(tmp_path_factory.mktemp("spm") / "tokenizer")
  sentences = [s for lang in ("en", "de", "fr") for s in demo_corpus.documents(lang, 40)]
  tokenizer_lib.train_sentencepiece(prefix, vocab_size=400, sentences=sentences, num_threads=1)
  return prefix + ".model"


@pytest.fixture(scope="module")
def saved(tmp_path_factory, spm):
  """The same random weights as a params-only checkpoint (step 3) of a run, and as a transformers directory."""
  root = tmp_path_factory.mktemp("saved")
  data_dir = root / "data"
  data_dir.mkdir()
  (data_dir / "tokenizer.model").write_bytes(open(spm, "rb").read())
  model = MaskedLM(CFG, rngs=nnx.Rngs(5))
  meta = {
    "model_config": dataclasses.asdict(CFG),
    "step": 3,
    "config": json.dumps({"data": {"data_dir": str(data_dir)}}),
  }
  ckpt_lib.save_params(str(root / "run"), 3, nnx.to_pure_dict(nnx.state(model, nnx.Param)), meta)
  hf.save(model, str(root / "hf"))
  (root / "hf" / "tokenizer.model").write_bytes(open(spm, "rb").read())
  return {
    "run": str(root / "run"),
    "step": str(root / "run" / "checkpoints" / "3"),
    "hf": str(root / "hf"),
    "data_tokenizer": str(data_dir / "tokenizer.model"),
  }


@pytest.mark.slow
def test_workdir_step_dir_and_hf_dir_give_identical_encodings(saved):
  batch = _batch(seed=4, n=4, length=24)
  encodings = {}
  for kind in ("run", "step", "hf"):
    encoder = ft.load_encoder(saved[kind])
    encodings[kind] = np.asarray(encoder.model().encode(batch["input_ids"], batch["segment_ids"]))
    want = saved["data_tokenizer"] if kind != "hf" else os.path.join(saved["hf"], "tokenizer.model")
    assert encoder.tokenizer == want
  np.testing.assert_array_equal(encodings["run"], encodings["step"])
  np.testing.assert_array_equal(encodings["run"], encodings["hf"])
  assert np.abs(encodings["run"]).max() > 0


def test_tokenize_frames_texts_and_pairs(spm):
  tok = tokenizer_lib.load_tokenizer(spm)
  a, b = "Montag, Dienstag und Mittwoch", "lundi et mardi"
  ids_a, ids_b = tok.encode([a, b])
  assert ft.tokenize(tok, [a], None, 64, CFG) == [[2, *ids_a, 1]]
  assert ft.tokenize(tok, [a], [b], 64, CFG) == [[2, *ids_a, 1, *ids_b, 1]]
  cut = ft.tokenize(tok, [a], [b], 8, CFG)[0]
  assert len(cut) == 8 and cut[0] == 2 and cut[-1] == 1 and cut.count(1) == 2


# ---- task files ----------------------------------------------------------------------------------------------------

ROWS = [
  {"text": "good day", "label": "pos", "lang": "en"},
  {"text": "bad day", "label": "neg", "lang": "en"},
  {"text": "guter Tag", "label": "pos", "lang": "de"},
  {"text": "schlechter\tTag", "label": "neg", "lang": "de"},
]


def _write(path, rows):
  if path.endswith(".jsonl"):
    path_text = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
    open(path, "w", encoding="utf-8").write(path_text + "\n")
  elif path.endswith(".parquet"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
  else:  # TSV cannot hold a tab inside a field
    lines = ["\t".join(rows[0])] + ["\t".join(str(v).replace("\t", " ") for v in r.values()) for r in rows]
    open(path, "w", encoding="utf-8").write("\n".join(lines) + "\n")


@pytest.mark.parametrize("ext", ["jsonl", "parquet", "tsv"])
def test_classification_task_from_files(tmp_path, ext):
  train, test = str(tmp_path / f"train.{ext}"), str(tmp_path / f"test.{ext}")
  _write(train, ROWS)
  _write(test, ROWS[::-1])
  task = tasks.from_files("classification", train, test, tasks.Columns(lang="lang"))
  assert task.label_names == ("neg", "pos")
  assert [t.replace("\t", " ") for t in task.train.texts] == [r["text"].replace("\t", " ") for r in ROWS]
  np.testing.assert_array_equal(task.train.labels, [1, 0, 1, 0])
  np.testing.assert_array_equal(task.test.labels, [0, 1, 0, 1])
  assert task.languages == ("de", "en")
  assert task.train_on(["de"]).train.texts == task.train.texts[2:]
  with pytest.raises(ValueError, match="no column 'label_x'"):
    tasks.from_files("classification", train, test, tasks.Columns(label="label_x"))
  with pytest.raises(ValueError, match="no training examples in languages fo"):
    task.train_on(["fo"])


def test_retrieval_task_from_files_and_tfds(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  rows = [{"query": f"q{i}", "positive": f"d{i % 3}", "lang": "en"} for i in range(6)]

  class TinyPairs(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({k: tfds.features.Text() for k in rows[0]})
      )

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(rows), "test": self._generate_examples(rows[:4])}

    def _generate_examples(self, items):
      yield from enumerate(items)

  TinyPairs(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
  _write(str(tmp_path / "train.jsonl"), rows)
  _write(str(tmp_path / "test.jsonl"), rows[:4])
  columns = tasks.Columns(text="query", pair="positive", lang="lang")
  from_json = tasks.from_files("retrieval", str(tmp_path / "train.jsonl"), str(tmp_path / "test.jsonl"), columns)
  from_tfds = tasks.from_files(
    "retrieval", "tfds:tiny_pairs:train", "tfds:tiny_pairs:test", columns, tfds_data_dir=str(tmp_path / "tfds")
  )
  for task in (from_json, from_tfds):
    assert sorted(task.candidates) == ["d0", "d1", "d2"]
    answers = [task.candidates[i] for i in task.test.labels]
    assert sorted(zip(task.test.texts, answers)) == [("q0", "d0"), ("q1", "d1"), ("q2", "d2"), ("q3", "d0")]
    assert sorted(zip(task.train.texts, task.train.pairs)) == sorted((r["query"], r["positive"]) for r in rows)
  with pytest.raises(ValueError, match="cannot open TFDS dataset 'missing'"):
    tasks.read_records("tfds:missing", str(tmp_path / "tfds"))


def _numpy_ndcg(scores, relevance, k=10):
  """nDCG@k of one query, written out: the top-k candidates by score (ties by index), gain = grade,
  discount 1 / log2(position + 1); divided by the same sum over the grades sorted best first."""
  ranked = sorted(range(len(scores)), key=lambda c: (-scores[c], c))[:k]
  dcg = sum(relevance.get(c, 0.0) / math.log2(i + 2) for i, c in enumerate(ranked))
  ideal = sum(g / math.log2(i + 2) for i, g in enumerate(sorted(relevance.values(), reverse=True)[:k]))
  return dcg / ideal


def test_graded_retrieval_metrics_match_the_formula():
  rng = np.random.default_rng(5)
  scores = rng.normal(size=(40, 30))
  relevance = [
    {int(c): float(rng.integers(1, 4)) for c in rng.choice(30, rng.integers(1, 5), replace=False)} for _ in range(40)
  ]
  m = ft.graded_retrieval_metrics(scores, relevance)
  np.testing.assert_allclose(m["ndcg@10"], np.mean([_numpy_ndcg(s, r) for s, r in zip(scores, relevance)]))
  top = scores.argmax(1)
  np.testing.assert_allclose(m["recall@1"], np.mean([(t in r) / len(r) for t, r in zip(top, relevance)]))
  first = [min(i + 1 for i, c in enumerate(np.argsort(-s)) if c in r) for s, r in zip(scores, relevance)]
  np.testing.assert_allclose(m["mrr@10"], np.mean([1 / f if f <= 10 else 0 for f in first]))
  # One answer per query (no ties): the same as the rank-based metrics of the embedded tasks.
  answers = rng.integers(0, 30, 40)
  single = ft.retrieval_metrics(ft.ranks(scores, answers))
  graded = ft.graded_retrieval_metrics(scores, [{int(a): 1.0} for a in answers])
  for key in ("ndcg@10", "recall@1", "mrr@10"):
    np.testing.assert_allclose(single[key], graded[key], err_msg=key)


def test_sentence_pair_formats_map_label_names(tmp_path):
  nli = ("entailment", "neutral", "contradiction")
  # XNLI as distributed in JSONL (integer labels) and GLUE MNLI TSV (label names); PAWS-X TSV with 0 / 1.
  xnli = [
    {"premise": f"p{i}", "hypothesis": f"h{i}", "label": i % 3, "language": ("en", "de")[i % 2]} for i in range(6)
  ]
  _write(str(tmp_path / "xnli.jsonl"), xnli)
  mnli = [{"index": i, "sentence1": f"s{i}", "sentence2": f"t{i}", "label": nli[(i + 1) % 3]} for i in range(6)]
  _write(str(tmp_path / "mnli.tsv"), mnli)
  task = tasks.from_files(
    "classification",
    str(tmp_path / "xnli.jsonl"),
    str(tmp_path / "xnli.jsonl"),
    tasks.Columns(text="premise", pair="hypothesis", label="label", lang="language", label_names=nli),
  )
  assert task.label_names == nli and task.train.pairs == [r["hypothesis"] for r in xnli]
  np.testing.assert_array_equal(task.train.labels, [r["label"] for r in xnli])
  with pytest.raises(ValueError, match="mnli.tsv: row 1: no column 'premise'"):
    tasks.from_files(
      "classification",
      str(tmp_path / "mnli.tsv"),
      str(tmp_path / "mnli.tsv"),
      tasks.Columns(text="premise", pair="hypothesis", label_names=nli),
    )
  glue = tasks.from_files(
    "classification",
    str(tmp_path / "mnli.tsv"),
    str(tmp_path / "mnli.tsv"),
    tasks.Columns(text="sentence1", pair="sentence2", label_names=nli),
    dev=str(tmp_path / "mnli.tsv"),
  )
  assert [nli[y] for y in glue.test.labels] == [r["label"] for r in mnli]
  assert glue.dev.texts == [r["sentence1"] for r in mnli] and glue.dev.pairs == [r["sentence2"] for r in mnli]
  paws = [{"id": i, "sentence1": f"a{i}", "sentence2": f"b{i}", "label": i % 2} for i in range(4)]
  _write(str(tmp_path / "paws.tsv"), paws)
  task = tasks.from_files(
    "classification",
    str(tmp_path / "paws.tsv"),
    str(tmp_path / "paws.tsv"),
    tasks.Columns(text="sentence1", pair="sentence2", label_names=("different", "paraphrase")),
  )
  assert [task.label_names[y] for y in task.test.labels] == ["different", "paraphrase"] * 2
  with pytest.raises(ValueError, match=r"paws.tsv: row 2: label '1' is not one of same or 0..0"):
    tasks.from_files(
      "classification",
      str(tmp_path / "paws.tsv"),
      str(tmp_path / "paws.tsv"),
      tasks.Columns(text="sentence1", pair="sentence2", label_names=("same",)),
    )


def _mteb_dir(path, missing=None):
  os.makedirs(path / "qrels")
  corpus = [{"_id": f"d{i}", "title": f"title {i}", "text": f"text {i}"} for i in range(8)]
  if missing:
    del corpus[2][missing]
  _write(str(path / "corpus.jsonl"), corpus)
  _write(str(path / "queries.jsonl"), [{"_id": f"q{i}", "text": f"query {i}"} for i in range(6)])
  qrels = {
    "train": [("q0", "d0", 1), ("q0", "d1", 1), ("q1", "d2", 1)],
    "dev": [("q2", "d3", 1)],
    "test": [("q3", "d4", 2), ("q3", "d5", 1), ("q4", "d6", 1), ("q5", "d7", 0), ("q5", "d6", 1)],
  }
  for split, rows in qrels.items():
    _write(str(path / "qrels" / f"{split}.tsv"), [{"query-id": q, "corpus-id": d, "score": s} for q, d, s in rows])
  return str(path)


def test_mteb_retrieval_directory(tmp_path):
  task = tasks.from_mteb(_mteb_dir(tmp_path / "mteb"))
  assert task.kind == "retrieval" and task.candidates == tuple(f"title {i} text {i}" for i in range(8))
  assert list(zip(task.train.texts, task.train.pairs)) == [
    ("query 0", "title 0 text 0"),
    ("query 0", "title 1 text 1"),
    ("query 1", "title 2 text 2"),
  ]
  assert task.test.texts == ["query 3", "query 4", "query 5"]
  assert task.test.relevance == [{4: 2.0, 5: 1.0}, {6: 1.0}, {6: 1.0}]  # a zero score is not relevant
  assert task.dev.texts == ["query 2"] and task.dev.relevance == [{3: 1.0}]
  with pytest.raises(ValueError, match=r"corpus.jsonl: row 3: no column 'text'"):
    tasks.from_mteb(_mteb_dir(tmp_path / "bad", missing="text"))


@pytest.mark.slow
def test_bad_task_file_is_one_line_naming_file_row_and_field(tmp_path):
  rows = [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}, {"label": "x"}]
  _write(str(tmp_path / "train.jsonl"), rows)
  args = ["--task=classification", f"--train={tmp_path / 'train.jsonl'}", f"--test={tmp_path / 'train.jsonl'}"]
  proc = run_module("mmbert_jax.finetune", *args, "--checkpoint=unused", f"--out={tmp_path / 'o.json'}")
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert lines == [f"error: {tmp_path / 'train.jsonl'}: row 3: no column 'text' (it has: label)"]
  _mteb_dir(tmp_path / "mteb")
  with open(tmp_path / "mteb" / "qrels" / "test.tsv", "a") as f:
    f.write("q9\td1\t1\n")
  proc = run_module(
    "mmbert_jax.finetune",
    "--task=retrieval",
    f"--mteb={tmp_path / 'mteb'}",
    "--checkpoint=unused",
    f"--out={tmp_path / 'o.json'}",
  )
  assert proc.returncode == 2
  assert f"test.tsv: row 6: query-id 'q9' is not in {tmp_path / 'mteb' / 'queries.jsonl'}" in proc.stderr


# ---- embedded CLDR tasks ------------------------------------------------------------------------------------------


def test_embedded_tasks_are_deterministic_and_cover_50_languages():
  for name in tasks.EMBEDDED:
    a, b = tasks.embedded(name), tasks.embedded(name)
    for split in ("train", "test"):
      sa, sb = getattr(a, split), getattr(b, split)
      assert sa.texts == sb.texts and sa.langs == sb.langs and sa.pairs == sb.pairs
      np.testing.assert_array_equal(sa.labels, sb.labels)
    assert a.candidates == b.candidates and a.label_names == b.label_names
    assert len(a.languages) >= 50, (name, len(a.languages))
    if name == "cldr_order_en":  # cross-lingual zero-shot: English training data only
      assert set(a.train.langs) == {"en"}
    else:
      assert set(a.train.langs) == set(a.test.langs)


def _bag_of_words_accuracy(task) -> float:
  """Test accuracy of multinomial naive Bayes on the training texts' word counts (add-one smoothing)."""
  words = sorted({w for t in task.train.texts + task.test.texts for w in t.split()})
  index = {w: i for i, w in enumerate(words)}
  counts = lambda texts: np.array([np.bincount([index[w] for w in t.split()], minlength=len(words)) for t in texts])
  x, y = counts(task.train.texts), np.asarray(task.train.labels)
  log_p = np.log(np.stack([x[y == c].sum(0) + 1.0 for c in (0, 1)]))
  log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
  prior = np.log(np.bincount(y, minlength=2) / len(y))
  return float(np.mean((counts(task.test.texts) @ log_p.T + prior).argmax(1) == task.test.labels))


def test_order_task_differs_in_word_order_alone():
  from babel import Locale, lists

  task = tasks.embedded("cldr_order")
  assert task.label_names == ("original", "shuffled")
  assert "zh" not in task.languages and len(task.languages) == len(tasks.cldr_languages()) - 1  # zh: no spaces
  assert not set(task.train.texts) & set(task.test.texts)
  for split in (task.train, task.test):  # half of each language's texts are shuffled
    for lang in set(split.langs):
      y = split.labels[np.array(split.langs) == lang]
      assert abs(y.mean() - 0.5) <= 0.5 / len(y) + 1e-9, lang
    assert all(len(t.split()) >= 4 for t in split.texts)
  # An original text is a list of German names in German list form; a shuffled one uses the same words, out of it.
  de = Locale.parse("de")
  names = {v for k in ("territories", "languages", "scripts", "currencies") for v in getattr(de, k).values()}
  names |= {*de.months["format"]["wide"].values(), *de.days["format"]["wide"].values()}
  de_rows = [(t, y) for t, lang, y in zip(task.test.texts, task.test.langs, task.test.labels) if lang == "de"]
  for text, label in de_rows:
    pieces = text.replace(" und ", ", ").split(", ")
    listed = all(p in names for p in pieces) and lists.format_list(pieces, locale=de) == text
    if label == 0:
      assert listed, text
  assert sum(1 - y for _, y in de_rows) and sum(y for _, y in de_rows)
  # Token identity carries no signal: a bag-of-words classifier is at chance (an order-blind encoder would be).
  assert abs(_bag_of_words_accuracy(task) - 0.5) < 0.05
  # The zero-shot variant trains on English alone and scores the same texts in every other language.
  zero_shot = tasks.embedded("cldr_order_en")
  assert set(zero_shot.train.langs) == {"en"} and "en" not in zero_shot.languages
  keep = np.array(task.test.langs) != "en"
  assert zero_shot.test.texts == [t for t, k in zip(task.test.texts, keep) if k]
  np.testing.assert_array_equal(zero_shot.test.labels, task.test.labels[keep])


@pytest.mark.slow
def test_pretraining_beats_random_init_on_word_order(demo_data, tmp_path):
  """A smaller run of the demo's pretrain phase (the tiny model, 30% masking, seq 128, 400k tokens, six of its
  languages): fine-tuned on word order in those languages, its encoder beats the same model at random weights
  (measured: 0.625 against 0.545 on 288 test lists, chance 0.5)."""
  from mmbert_jax import train

  languages = ("en", "de", "fr", "es", "it", "pt")
  overrides = {
    "data.languages": ",".join(languages),
    "data.seq_len": 128,
    "data.mask_rate": 0.3,
    "batch_size": 16,
    "micro_batch_size": 16,
    "train_tokens": 400_000,
    "schedule.warmup_tokens": 40_000,
    "checkpoint_every_tokens": 10**9,
    "num_devices": 1,
    "model.attn_out_dropout": 0.0,
    "log_every_steps": 50,
  }
  workdir = str(tmp_path / "run")
  assert train.train_and_evaluate(tiny_config(demo_data, **overrides), workdir)["status"] == "complete"
  task = tasks.cldr_order(train_per_language=64, test_per_language=48, languages=languages)
  trained = ft.load_encoder(workdir)
  settings = ft.Settings(max_len=32, num_devices=1)  # the tiny model's defaults: 3e-4, 10 epochs
  accuracy = {
    name: ft.finetune(encoder, task, settings)["metrics"]["accuracy"]
    for name, encoder in (("random", ft.random_encoder(trained)), ("trained", trained))
  }
  assert accuracy["trained"] > accuracy["random"] + 0.04, accuracy


def test_chance_is_the_score_of_uniform_guessing():
  rng = np.random.default_rng(0)
  labels = np.repeat([0, 1, 2, 3], [40, 25, 10, 5])
  task = tasks.Task(
    "t",
    "classification",
    tasks.Split([], []),
    tasks.Split(["x"] * 80, ["en"] * 80, labels),
    label_names=("a", "b", "c", "d"),
  )
  draws = [ft.classification_metrics(rng.integers(0, 4, 80), labels) for _ in range(4000)]
  want = ft.chance(task)
  assert abs(np.mean([d["accuracy"] for d in draws]) - want["accuracy"]) < 0.005
  assert abs(np.mean([d["macro_f1"] for d in draws]) - want["macro_f1"]) < 0.01
  candidates = tuple(str(i) for i in range(30))
  task = tasks.Task(
    "r",
    "retrieval",
    tasks.Split([], []),
    tasks.Split(["q"] * 50, ["en"] * 50, np.zeros(50, int)),
    candidates=candidates,
  )
  draws = [ft.retrieval_metrics(ft.ranks(rng.random((50, 30)), np.zeros(50, int))) for _ in range(2000)]
  want = ft.chance(task)
  assert abs(np.mean([d["recall@1"] for d in draws]) - want["recall@1"]) < 0.005
  assert abs(np.mean([d["mrr@10"] for d in draws]) - want["mrr@10"]) < 0.005


def _run_python(code: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_embedded_tasks_do_not_depend_on_what_ran_before():
  """babel's date and number formats change with the locales a process loaded before (the demo corpus loads them
  all); the embedded tasks must come out the same in a fresh process and after the whole demo corpus."""
  digest = (
    "import hashlib\nfrom data_pipeline import tasks\n"
    "t = [tasks.embedded(n) for n in tasks.EMBEDDED]\n"
    "print(hashlib.sha1(repr([(x.train.texts, x.train.pairs, x.test.texts, x.candidates) for x in t])"
    ".encode()).hexdigest())"
  )
  after_corpus = (
    "from data_pipeline import demo_corpus\n"
    "[list(demo_corpus.documents(lang, 2)) for lang in demo_corpus.available_languages()]\n"
  )
  fresh, warm = _run_python(digest), _run_python(after_corpus + digest)
  assert fresh.returncode == 0 and warm.returncode == 0, fresh.stderr[-2000:] + warm.stderr[-2000:]
  assert fresh.stdout == warm.stdout


# ---- command line -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_command_line_scores_checkpoints_into_one_table(saved, spm, tmp_path):
  from data_pipeline import demo_corpus

  rows = [
    {"text": s, "label": lang, "lang": lang}
    for lang in ("en", "de", "fr")
    for s in list(demo_corpus.documents(lang, 24, seed=7))
  ]
  _write(str(tmp_path / "train.jsonl"), rows[::2])
  _write(str(tmp_path / "test.jsonl"), rows[1::2])
  out = str(tmp_path / "scores.json")
  args = [
    "--task=classification",
    f"--train={tmp_path / 'train.jsonl'}",
    f"--test={tmp_path / 'test.jsonl'}",
    "--lang_key=lang",
    f"--checkpoint={saved['run']},{saved['hf']}",
    f"--out={out}",
    "--epochs=2",
    "--batch_size=8",
    "--max_len=32",
  ]
  proc = run_module("mmbert_jax.finetune", *args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out) as f:
    results = json.load(f)["tasks"]["train.jsonl"]
  # The same weights loaded from a run and from a transformers directory score identically.
  run, hf_dir = results[saved["run"]], results[saved["hf"]]
  # Read against an encoder of the same size with random weights, and against chance.
  assert list(results)[:2] == ["chance", "random init"]
  assert results["chance"]["metrics"]["accuracy"] == pytest.approx(1 / 3)
  assert results["random init"]["train_loss"] != run["train_loss"]
  assert "\nrandom init " in proc.stdout and "\nchance " in proc.stdout
  assert run["metrics"] == hf_dir["metrics"] and run["train_loss"] == hf_dir["train_loss"]
  assert set(run["per_language"]) == {"en", "de", "fr"}
  assert "train.jsonl accuracy" in proc.stdout and "accuracy per test language" in proc.stdout
  alone = run_module(
    "mmbert_jax.finetune", *args[:-4], f"--out={tmp_path / 'alone.json'}", *args[-3:], "--norandom_init"
  )
  assert alone.returncode == 0, alone.stderr[-3000:]
  with open(tmp_path / "alone.json") as f:
    assert "random init" not in json.load(f)["tasks"]["train.jsonl"]
  again = run_module("mmbert_jax.finetune", *args)
  assert again.returncode != 0 and f"{out} exists" in again.stderr


def test_settings_by_model_size():
  tiny, base = get_config("tiny"), get_config("mmbert-base")
  assert (ft.Settings().for_model(tiny).peak_lr, ft.Settings().for_model(tiny).epochs) == (3e-4, 10)
  assert (ft.Settings().for_model(base).peak_lr, ft.Settings().for_model(base).epochs) == (5e-5, 3)
  assert ft.Settings(peak_lr=2e-5, epochs=4).for_model(tiny) == ft.Settings(peak_lr=2e-5, epochs=4)


def test_settings_from_config_rejects_unknown_keys():
  assert ft.Settings.from_config({"epochs": 2, "mesh": {"fsdp": -1}, "tasks": ()}, ignore=("tasks",)) == ft.Settings(
    epochs=2, mesh=(("fsdp", -1),)
  )
  with pytest.raises(ValueError, match="unknown key.*epoch\\b"):
    ft.Settings.from_config({"epoch": 2})


def _flops_per_row_token(cfg, length):
  """Hand count of the encoder's training FLOPs per token of a full `length`-token row, without the MLM head: 3 × 2
  per weight of the linears (4H² + 3HI per layer) and 3 × 4H per (query, key) pair, the pairs counted on the grid
  (|i − j| ≤ the one-sided window on local layers)."""
  h, i = cfg.hidden_size, cfg.intermediate_size
  offsets = np.abs(np.subtract.outer(np.arange(length), np.arange(length)))
  pairs = sum(
    length * length if layer % cfg.global_every_n == 0 else np.sum(offsets <= cfg.local_window // 2)
    for layer in range(cfg.num_layers)
  )
  return 6 * cfg.num_layers * (4 * h * h + 3 * h * i) + 12 * h * pairs / length


def test_workload_counts_the_steps_rows_and_flops_finetune_runs(spm):
  """The fine-tuning time model's input: steps = epochs × full batches, a retrieval pair is two rows, each held-out
  split (and the candidates, once per split) in padded scoring batches; row length = the tokenized task's."""
  settings = ft.Settings(epochs=3, batch_size=32, eval_batch_size=64, max_len=24)
  texts = lambda n: [f"t{k}" for k in range(n)]
  labels = lambda n: np.zeros(n, np.int32)
  cls = tasks.Task(
    "c",
    "classification",
    tasks.Split(texts(100), ["xx"] * 100, labels(100)),
    tasks.Split(texts(70), ["xx"] * 70, labels(70)),
    label_names=("a",),
    dev=tasks.Split(texts(10), ["xx"] * 10, labels(10)),
  )
  w = ft.workload(cls, settings, CFG)
  assert (w.steps, w.rows, w.eval_rows, w.length) == (3 * 3, 32, 128 + 64, 24)
  ret = tasks.Task(
    "r",
    "retrieval",
    tasks.Split(texts(70), ["xx"] * 70, pairs=texts(70)),
    tasks.Split(texts(5), ["xx"] * 5, labels(5)),
    candidates=tuple(texts(130)),
  )
  w = ft.workload(ret, settings, CFG)
  assert (w.steps, w.rows, w.eval_rows) == (3 * 2, 64, 64 + 192)
  want = _flops_per_row_token(CFG, 24) * 24 * (6 * 64 + (64 + 192) / 3)
  assert w.flops(CFG) == pytest.approx(want, rel=1e-9)
  # Epochs left at 0 come by model size (10 for this tiny model), as in finetune.
  assert ft.workload(ret, dataclasses.replace(settings, epochs=0), CFG).steps == 10 * 2
  # With the tokenizer: the longest tokenized text with <bos> and <eos>, rounded up to 8, at most max_len.
  tok = tokenizer_lib.load_tokenizer(spm)
  short = dataclasses.replace(cls, train=tasks.Split(["Montag"] * 40, ["de"] * 40, labels(40)))
  longest = max(len(ids) for ids in tok.encode(short.train.texts + short.test.texts + short.dev.texts)) + 2
  assert ft.workload(short, settings, CFG, tok).length == min(24, 8 * math.ceil(longest / 8))
  with pytest.raises(ValueError, match="task c: 10 training examples, fewer than one batch of 32"):
    ft.workload(dataclasses.replace(cls, train=cls.dev), settings, CFG)
