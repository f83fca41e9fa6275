"""`python -m mmbert_jax.export` on a trained tiny run: transformers' ModernBertForMaskedLM gives our logits, the
config carries the run's RoPE thetas, AutoTokenizer gives the SentencePiece model's ids, and sentence-transformers
embeds sentences as the mean of our model's hidden states."""

import errno
import filecmp
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
from flax import nnx
from tiny_run import GLOBAL_THETA, LOCAL_THETA, run_module, trained_run

from data_pipeline import demo_corpus
from mmbert_jax import checkpoint as ckpt_lib
from mmbert_jax import export, storage

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Ordinary text in several scripts; the tokenizer saw only some of them (the rest goes through byte fallback).
SENTENCES = [
  "The quick brown fox jumps over the lazy dog.",
  "Der schnelle braune Fuchs springt über den faulen Hund, 1234 Mal.",
  "Съешь же ещё этих мягких французских булок, да выпей чаю.",
  "我们明天去北京看看长城吧。",
  "نحن نحب تعلم اللغات الجديدة كل يوم.",
  "मैं हर दिन नई भाषाएँ सीखता हूँ।",
  "Habari ya asubuhi, rafiki yangu! Karibu sana.",
  "Ἡ γλῶσσα μου ἔδωσαν ἑλληνική; ภาษาไทย 🙂",
]
CORPUS_LANGUAGES = ("en", "de", "fr", "ru", "zh", "ja", "ko", "ar", "hi", "sw", "fo", "ti", "el", "he", "th", "ka")


@pytest.fixture(scope="module")
def run(demo_data, tmp_path_factory):
  return trained_run(demo_data, tmp_path_factory)


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("export") / "hf")
  proc = run_module("mmbert_jax.export", f"--checkpoint={run}", f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert out in proc.stdout
  return out


@pytest.fixture(scope="module")
def ours(run):
  model, meta, _ = ckpt_lib.load_model(run)
  return model, meta


@pytest.fixture(scope="module")
def sp(demo_data):
  return spm.SentencePieceProcessor(model_file=os.path.join(demo_data, "tokenizer.model"))


def _framed(sp, cfg, text):
  """`<bos> pieces <eos>`, as the data pipeline frames every training document."""
  return [cfg.bos_id, *sp.encode(text), cfg.eos_id]


def _padded(rows):
  ids = np.zeros((len(rows), max(map(len, rows))), np.int32)
  mask = np.zeros_like(ids)
  for i, row in enumerate(rows):
    ids[i, : len(row)], mask[i, : len(row)] = row, 1
  return ids, mask


@pytest.mark.slow
def test_transformers_gives_our_logits(exported, ours, sp):
  model, _ = ours
  ids, mask = _padded([_framed(sp, model.config, s) for s in SENTENCES])
  assert (mask.sum(1) > model.config.local_window).any()  # long enough for the local layers to matter
  reference = transformers.AutoModelForMaskedLM.from_pretrained(exported).eval()
  with torch.no_grad():
    want = reference(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()
  with jax.default_matmul_precision("highest"):
    got = np.asarray(nnx.jit(lambda m, x, s: m(x, s))(model, jnp.asarray(ids), jnp.asarray(mask)))
  real = mask.astype(bool)
  assert np.isfinite(got[real]).all() and np.std(got[real]) > 0.1
  np.testing.assert_allclose(got[real], want[real], rtol=0, atol=1e-5)


def test_config_carries_the_runs_rope_thetas(exported, ours):
  _, meta = ours
  with open(os.path.join(exported, "config.json")) as f:
    written = json.load(f)
  assert written["rope_parameters"]["full_attention"]["rope_theta"] == GLOBAL_THETA
  assert written["rope_parameters"]["sliding_attention"]["rope_theta"] == LOCAL_THETA
  config = transformers.AutoConfig.from_pretrained(exported)
  assert config.model_type == "modernbert"
  assert config.rope_parameters["full_attention"]["rope_theta"] == meta["model_config"]["global_rope_theta"]
  assert config.rope_parameters["sliding_attention"]["rope_theta"] == meta["model_config"]["local_rope_theta"]
  assert config.local_attention == meta["model_config"]["local_window"]


def test_autotokenizer_gives_the_sentencepiece_ids(exported, ours, sp, demo_data):
  cfg = ours[0].config
  assert filecmp.cmp(
    os.path.join(exported, "tokenizer.model"), os.path.join(demo_data, "tokenizer.model"), shallow=False
  )
  tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
  assert (
    tokenizer.pad_token_id,
    tokenizer.eos_token_id,
    tokenizer.bos_token_id,
    tokenizer.unk_token_id,
    tokenizer.mask_token_id,
  ) == (cfg.pad_id, cfg.eos_id, cfg.bos_id, cfg.unk_id, cfg.mask_id)
  texts = SENTENCES + [doc for lang in CORPUS_LANGUAGES for doc in demo_corpus.documents(lang, 4, seed=11)]
  for text in texts:
    ids = tokenizer(text)["input_ids"]
    assert ids == _framed(sp, cfg, text), text
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
  assert tokenizer("a <mask> b")["input_ids"] == _framed(sp, cfg, "a <mask> b")  # one piece, as in SentencePiece
  assert cfg.mask_id in tokenizer("a <mask> b")["input_ids"]


def test_sentence_transformers_embeds_the_mean_of_our_hidden_states(exported, ours, sp):
  sentence_transformers = pytest.importorskip("sentence_transformers")
  from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

  encoder = Transformer(exported)
  st = sentence_transformers.SentenceTransformer(
    modules=[encoder, Pooling(encoder.get_embedding_dimension(), pooling_mode="mean")], device="cpu"
  )
  embeddings = st.encode(SENTENCES, batch_size=3, convert_to_numpy=True)
  model, _ = ours
  assert embeddings.shape == (len(SENTENCES), model.config.hidden_size) and np.isfinite(embeddings).all()
  ids, mask = _padded([_framed(sp, model.config, s) for s in SENTENCES])
  with jax.default_matmul_precision("highest"):
    hidden = np.asarray(nnx.jit(lambda m, x, s: m.encode(x, s))(model, jnp.asarray(ids), jnp.asarray(mask)), np.float64)
  want = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)  # mean over each sentence's tokens
  np.testing.assert_allclose(embeddings, want, rtol=0, atol=1e-5)
  # Different sentences, different embeddings.
  assert np.linalg.matrix_rank(embeddings) == len(SENTENCES)


def test_export_refuses_an_existing_directory_and_a_missing_tokenizer(run, exported, tmp_path):
  before = {name: os.path.getmtime(os.path.join(exported, name)) for name in os.listdir(exported)}
  with pytest.raises(FileExistsError, match="choose a new output directory"):
    export.export(run, exported)
  assert {name: os.path.getmtime(os.path.join(exported, name)) for name in os.listdir(exported)} == before
  with pytest.raises(FileNotFoundError, match="--tokenizer"):
    export.export(run, str(tmp_path / "new"), tokenizer=str(tmp_path / "missing.model"))
  assert not (tmp_path / "new").exists()


def test_a_full_disk_during_the_export_leaves_no_partial_directory(run, tmp_path, monkeypatch):
  """The weights are written, then the disk is full: one error naming the output, and neither the output nor a
  temporary folder beside it remains."""
  write_local = export.hf.write_local

  def full_after_weights(model, directory):
    write_local(model, directory)
    raise OSError(errno.ENOSPC, "No space left on device", os.path.join(directory, "config.json"))

  monkeypatch.setattr(export.hf, "write_local", full_after_weights)
  out = tmp_path / "hf"
  with pytest.raises(storage.WriteError) as e:
    export.export(run, str(out))
  assert str(e.value) == f"writing the export failed: disk full at {out}"
  assert os.listdir(tmp_path) == []
