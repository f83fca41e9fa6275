"""The CLDR demo corpus: languages, scripts, determinism, and the end-to-end preparation."""

import os
import unicodedata

import numpy as np
import pytest

from data_pipeline import demo_corpus, mixture, pipeline
from data_pipeline import tokenizer as tokenizer_lib


def _script_share(text, name):
  letters = [c for c in text if c.isalpha()]
  return sum(name in unicodedata.name(c, "") for c in letters) / len(letters)


def test_languages_and_sets():
  avail = demo_corpus.available_languages()
  assert len(avail) >= 250 and {"fo", "ti", "en", "zh"} <= set(avail)
  pre, mid = demo_corpus.LANGUAGE_SETS["demo-pretrain"], demo_corpus.LANGUAGE_SETS["demo-mid"]
  assert len(pre) == 12 and len(mid) == 36 and set(pre) < set(mid) <= set(avail)
  assert mixture.language_set("demo-decay") is None
  assert demo_corpus.documents_for("en") > demo_corpus.documents_for("nl") > demo_corpus.documents_for("fo")
  with pytest.raises(ValueError, match="no CLDR data for demo languages xx"):
    demo_corpus.resolve(["fo", "xx"])


@pytest.mark.parametrize(
  "lang,script",
  [("ti", "ETHIOPIC"), ("ru", "CYRILLIC"), ("el", "GREEK"), ("hi", "DEVANAGARI"), ("ko", "HANGUL"), ("fo", "LATIN")],
)
def test_documents_are_in_the_languages_script(lang, script):
  docs = list(demo_corpus.documents(lang, 20, seed=0))
  assert len(docs) == 20 and all(5 < len(d) for d in docs)
  assert _script_share(" ".join(docs), script) > 0.8
  assert docs == list(demo_corpus.documents(lang, 20, seed=0))
  assert docs != list(demo_corpus.documents(lang, 20, seed=1))


def test_faroese_text_uses_faroese_names():
  text = " ".join(demo_corpus.documents("fo", 200))
  assert "føroyskt" in text or "Føroyar" in text or "mánadagur" in text


def test_prepare_demo_end_to_end(tmp_path):
  langs = ["en", "fo", "ti", "ja", "ru"]
  stats = demo_corpus.prepare_demo(
    str(tmp_path), languages=langs, scale=0.1, vocab_size=600, max_len=256, eval_documents=2, progress=False
  )
  assert sorted(stats["languages"]) == sorted(langs)
  assert stats["languages"]["en"]["train"]["tokens"] > stats["languages"]["fo"]["train"]["tokens"]
  tok = tokenizer_lib.load_tokenizer(str(tmp_path / "tokenizer.model"))
  assert tok.vocab_size == 600
  lines = {l: (tmp_path / "_raw" / f"{l}.txt").read_text(encoding="utf-8") for l in langs}
  # Batches decode back to corpus text of the language their lang_ids name.
  cfg = pipeline.PipelineConfig(
    data_dir=str(tmp_path), languages=("fo", "ti", "ja"), tau=0.3, seq_len=128, batch_size=4, mask_rate=0.15, prefetch=0
  )
  it = pipeline.make_train_iterator(cfg, 0, 1)
  checked = 0
  for _ in range(8):
    b = next(it)
    orig = b["input_ids"].copy()
    w = b["masked_weights"] > 0
    rows = np.broadcast_to(np.arange(4)[:, None], w.shape)
    orig[rows[w], b["masked_positions"][w]] = b["masked_labels"][w]
    for r in range(4):
      for j in range(1, b["segment_ids"][r].max() + 1):
        ids = orig[r][b["segment_ids"][r] == j]
        lang = it.languages[b["lang_ids"][r][b["segment_ids"][r] == j][0]]
        text = tok.decode([t for t in ids if t > 4])
        if "\ufffd" not in text:  # a document cut into pieces may be cut inside a character's bytes
          assert text in lines[lang], (lang, text[:40])
          checked += 1
  it.close()
  assert checked >= 20
  # Running again reuses the text, tokenizer and shards.
  mtime = os.path.getmtime(tmp_path / "tokenizer.model")
  assert (
    demo_corpus.prepare_demo(
      str(tmp_path), languages=langs, scale=0.1, vocab_size=600, max_len=256, eval_documents=2, progress=False
    )
    == stats
  )
  assert os.path.getmtime(tmp_path / "tokenizer.model") == mtime


def test_prepare_demo_into_a_bucket(tmp_path, gcs_bucket):
  """The demo's text, tokenizer, shards and stats.json in a bucket: the same corpus as on local disk."""
  import json
  import uuid

  from data_pipeline import filesystem as fs

  remote = fs.path(f"{gcs_bucket}/{uuid.uuid4().hex[:8]}/data")
  kw = dict(languages=["fo", "ti"], scale=0.1, vocab_size=600, max_len=128, eval_documents=2, progress=False)
  got = demo_corpus.prepare_demo(os.fspath(remote), **kw)
  want = demo_corpus.prepare_demo(str(tmp_path), **kw)
  assert json.loads((remote / "stats.json").read_text()) == got
  assert (remote / "tokenizer.model").read_bytes() == (tmp_path / "tokenizer.model").read_bytes()
  for stats in (got, want):
    del stats["tokenizer"]["path"], stats["settings"]["tokenizer"]
  assert got == want
  shard = want["languages"]["ti"]["train"]["shards"][0]["path"]
  assert (remote / shard).read_bytes() == (tmp_path / shard).read_bytes()
