"""Downstream fine-tuning: heads and losses against numpy, metrics against hand-computed rankings, tiny fine-tunes
that must learn, checkpoint loading paths, task files and the embedded CLDR tasks."""

import dataclasses
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import ROOT
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


def test_mean_pooling_ignores_padding():
  model = ft.Embedder(CFG, pooling="mean", rngs=nnx.Rngs(0))
  batch = _batch(n=3, length=16)
  longer = {k: np.pad(v, ((0, 0), (0, 8))) for k, v in batch.items()}
  longer["input_ids"][:, 16:] = 7  # other tokens in padding positions: segment 0 keeps them out
  np.testing.assert_allclose(np.asarray(model(**longer)), np.asarray(model(**batch)), atol=1e-5)


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


def test_tiny_finetune_separable_task_is_deterministic():
  task, arrays = _synthetic_classification(np.random.default_rng(0))
  encoder = ft.Encoder(CFG, _params(), None, "random init")
  result = ft.finetune(encoder, task, SETTINGS, arrays)
  assert result["metrics"]["accuracy"] > 0.95, result["metrics"]
  assert result["steps"] == 3 * (256 // 32) == len(result["train_loss"])
  assert result["train_loss"][-1] < 0.75 * result["train_loss"][0]
  assert set(result["per_language"]) == {"xx", "yy"}
  assert sum(r["examples"] for r in result["per_language"].values()) == 96
  # Same seed: the same losses step by step (and the encoder given in is untouched by the donated steps).
  again = ft.finetune(encoder, task, SETTINGS, arrays)
  assert again["train_loss"] == result["train_loss"] and again["metrics"] == result["metrics"]
  other = ft.finetune(encoder, task, dataclasses.replace(SETTINGS, seed=1), arrays)
  assert other["train_loss"] != result["train_loss"]


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
    assert set(a.train.langs) == set(a.test.langs)

  langid = tasks.embedded("cldr_langid")
  assert len(langid.label_names) >= 50
  assert not set(langid.train.texts) & set(langid.test.texts)
  counts = {lang: langid.train.langs.count(lang) for lang in langid.label_names}
  assert counts["fo"] < counts["de"] and counts["ti"] < counts["en"]  # low-resource languages get less
  # Labels name the language the text was generated in.
  assert all(langid.label_names[y] == lang for y, lang in zip(langid.test.labels, langid.test.langs))

  retrieval = tasks.embedded("cldr_retrieval")
  assert "en" not in retrieval.languages
  assert not set(retrieval.train.pairs) & set(retrieval.candidates)  # no held-out answer is seen in training
  assert len(set(retrieval.candidates)) == len(retrieval.candidates)
  from babel import Locale

  months = dict(Locale.parse("de").months["format"]["wide"])
  english = dict(Locale.parse("en").months["format"]["wide"])
  for text, lang, answer in zip(retrieval.test.texts, retrieval.test.langs, retrieval.test.labels):
    if lang == "de" and text in months.values():  # a German month name → its English name
      month = next(k for k, v in months.items() if v == text)
      assert retrieval.candidates[answer] == english[month]


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
  assert run["metrics"] == hf_dir["metrics"] and run["train_loss"] == hf_dir["train_loss"]
  assert set(run["per_language"]) == {"en", "de", "fr"}
  assert "train.jsonl accuracy" in proc.stdout and "accuracy per test language" in proc.stdout
  again = run_module("mmbert_jax.finetune", *args)
  assert again.returncode != 0 and f"{out} exists" in again.stderr


def test_settings_from_config_rejects_unknown_keys():
  assert ft.Settings.from_config({"epochs": 2, "mesh": {"fsdp": -1}, "tasks": ()}, ignore=("tasks",)) == ft.Settings(
    epochs=2, mesh=(("fsdp", -1),)
  )
  with pytest.raises(ValueError, match="unknown key.*epoch\\b"):
    ft.Settings.from_config({"epoch": 2})
