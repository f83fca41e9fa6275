"""prepare: each input format into shards + stats.json, eval split, resumability, errors."""

import gzip
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
from array_record.python.array_record_module import ArrayRecordReader

from data_pipeline import prepare
from data_pipeline import tokenizer as tokenizer_lib

MAX_LEN = 24
WORDS = {
  "deu_Latn": "Haus Baum Straße Wasser Licht über grün".split(),
  "fao_Latn": "hús træ gøta vatn ljós yvir grønt".split(),
  "tir_Ethi": "ቤት ኦም ጎደና ማይ ብርሃን ልዕሊ ቀጠልያ".split(),
}


def _texts(lang, n, seed):
  rng = np.random.default_rng(seed)
  out = [" ".join(rng.choice(WORDS[lang], int(rng.integers(1, 12)))) for _ in range(n)]
  out[3] = " ".join(rng.choice(WORDS[lang], 60))  # longer than MAX_LEN tokens: split
  return out


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  d = tmp_path_factory.mktemp("tok")
  lines = [t for lang in WORDS for t in _texts(lang, 200, 0)]
  return tokenizer_lib.train_sentencepiece(str(d / "spm"), vocab_size=360, sentences=lines)


def _settings(tok, **kw):
  return prepare.Settings(tok, **{"max_len": MAX_LEN, "eval_documents": 4, "eval_every": 3, **kw})


def _expected(tok, units, settings):
  """The documented rule, from the tokenizer alone: units = [(docs [(lang, text)], eval quota)] in unit order."""
  sp = spm.SentencePieceProcessor(model_file=tok)
  body = settings.max_len - 2
  out = {}
  for docs, quota in units:
    seen, held = {}, {}
    for lang, text in docs:
      ids = sp.encode(text)
      if not text.strip() or not ids:
        continue
      seqs = [[2] + ids[i : i + body] + [1] for i in range(0, len(ids), body)]
      i = seen[lang] = seen.get(lang, -1) + 1
      split = "train"
      if i % settings.eval_every == settings.eval_every - 1 and held.get(lang, 0) < quota:
        split, held[lang] = "eval", held.get(lang, 0) + 1
      e = out.setdefault(lang, {}).setdefault(split, {"documents": 0, "seqs": []})
      e["documents"] += 1
      e["seqs"] += seqs
  return out


def _read_split(out_dir, split):
  seqs = []
  for shard in split["shards"]:
    r = ArrayRecordReader(os.path.join(out_dir, shard["path"]))
    seqs += [np.frombuffer(x, np.int32).tolist() for x in r.read_all()]
    r.close()
  return seqs


def _check(stats, out_dir, expected):
  assert sorted(stats["languages"]) == sorted(expected)
  for lang, splits in expected.items():
    for split in ("train", "eval"):
      got = stats["languages"][lang][split]
      want = splits.get(split, {"documents": 0, "seqs": []})
      assert got["documents"] == want["documents"], (lang, split)
      assert got["sequences"] == len(want["seqs"])
      assert got["tokens"] == sum(map(len, want["seqs"]))
      assert _read_split(out_dir, got) == want["seqs"], (lang, split)
  assert all(len(s) <= MAX_LEN for lang in expected for sp in expected[lang].values() for s in sp["seqs"])
  assert stats["tokenizer"]["special_ids"] == {"pad": 0, "eos": 1, "bos": 2, "unk": 3, "mask": 4}


def _write_parquet(root, lang, name, texts):
  os.makedirs(root / lang / "train", exist_ok=True)
  pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), root / lang / "train" / name)


def test_parquet_tree(tmp_path, tok):
  root = tmp_path / "fineweb2"
  files = {
    ("deu_Latn", "000_00000.parquet"): _texts("deu_Latn", 30, 1),
    ("deu_Latn", "000_00001.parquet"): _texts("deu_Latn", 20, 2),
    ("fao_Latn", "000_00000.parquet"): _texts("fao_Latn", 15, 3),
  }
  for (lang, name), texts in files.items():
    _write_parquet(root, lang, name, texts)
  settings = _settings(tok)
  stats = prepare.prepare(prepare.Source("parquet", str(root)), str(tmp_path / "out"), settings, progress=False)
  units = [
    ([("deu_Latn", t) for t in files["deu_Latn", "000_00000.parquet"]], 2),  # quota ceil(4 / 2 files)
    ([("deu_Latn", t) for t in files["deu_Latn", "000_00001.parquet"]], 2),
    ([("fao_Latn", t) for t in files["fao_Latn", "000_00000.parquet"]], 4),
  ]
  _check(stats, str(tmp_path / "out"), _expected(tok, units, settings))
  assert stats["languages"]["deu_Latn"]["eval"]["documents"] == 4


def test_jsonl_with_language_filter(tmp_path, tok):
  docs_a = [(l, t) for l in ("deu_Latn", "tir_Ethi", "fao_Latn") for t in _texts(l, 12, 4)]
  docs_b = [(l, t) for l in ("tir_Ethi", "deu_Latn") for t in _texts(l, 9, 5)]
  np.random.default_rng(0).shuffle(docs_a)
  a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz"
  a.write_text("".join(json.dumps({"text": t, "lang": l, "url": "x"}) + "\n" for l, t in docs_a) + "\n")
  with gzip.open(b, "wt") as f:
    f.writelines(json.dumps({"text": t, "lang": l}) + "\n" for l, t in docs_b)
  settings = _settings(tok)
  stats = prepare.prepare(
    prepare.Source("jsonl", files=(str(b), str(a))),
    str(tmp_path / "out"),
    settings,
    languages=["deu_Latn", "tir_Ethi"],
    progress=False,
  )
  keep = lambda docs: [(l, t) for l, t in docs if l != "fao_Latn"]
  _check(stats, str(tmp_path / "out"), _expected(tok, [(keep(docs_a), 2), (keep(docs_b), 2)], settings))


def test_text_files_by_line_and_paragraph(tmp_path, tok):
  root = tmp_path / "txt"
  (root / "tir_Ethi").mkdir(parents=True)
  fao, tir1, tir2 = _texts("fao_Latn", 14, 6), _texts("tir_Ethi", 8, 7), _texts("tir_Ethi", 5, 8)
  (root / "fao_Latn.txt").write_text("\n".join(fao) + "\n\n", encoding="utf-8")
  (root / "tir_Ethi" / "a.txt").write_text("\n".join(tir1), encoding="utf-8")
  (root / "tir_Ethi" / "b.txt").write_text("\n".join(tir2), encoding="utf-8")
  settings = _settings(tok)
  stats = prepare.prepare(prepare.Source("text", str(root)), str(tmp_path / "lines"), settings, progress=False)
  units = [
    ([("fao_Latn", t) for t in fao], 4),
    ([("tir_Ethi", t) for t in tir1], 2),
    ([("tir_Ethi", t) for t in tir2], 2),
  ]
  _check(stats, str(tmp_path / "lines"), _expected(tok, units, settings))

  # Paragraphs: blank-line separated blocks, lines inside joined by "\n".
  (root / "fao_Latn.txt").write_text("\n\n".join(f"{x}\n{y}" for x, y in zip(fao[::2], fao[1::2])), encoding="utf-8")
  stats = prepare.prepare(
    prepare.Source("text", str(root), text_split="paragraph"),
    str(tmp_path / "para"),
    settings,
    languages=["fao_Latn"],
    progress=False,
  )
  paras = [("fao_Latn", f"{x}\n{y}") for x, y in zip(fao[::2], fao[1::2])]
  _check(stats, str(tmp_path / "para"), _expected(tok, [(paras, 4)], settings))


def test_units_below_the_file(tmp_path, tok):
  """With a small --unit_mb, parquet files are cut into runs of row groups and JSONL / text files into byte
  ranges (each owning the lines that start in it, a line crossing the cut read whole); every document is read
  exactly once, and the eval rule applies per unit with the quota spread over the language's units."""
  settings = _settings(tok, unit_mb=400 / 2**20, max_len=256, eval_documents=6)
  pq_root = tmp_path / "pq"
  deu = _texts("deu_Latn", 60, 11)
  os.makedirs(pq_root / "deu_Latn" / "train")
  pq.write_table(pa.table({"text": deu}), pq_root / "deu_Latn" / "train" / "a.parquet", row_group_size=7)
  docs = [(l, t) for l in ("deu_Latn", "fao_Latn") for t in _texts(l, 40, 12)]
  np.random.default_rng(1).shuffle(docs)
  jsonl = tmp_path / "a.jsonl"
  jsonl.write_text("".join(json.dumps({"text": t, "lang": l}) + "\n" for l, t in docs), encoding="utf-8")
  txt = tmp_path / "txt"
  txt.mkdir()
  tir = _texts("tir_Ethi", 50, 13)
  (txt / "tir_Ethi.txt").write_text("\n".join(tir), encoding="utf-8")  # no newline at the end
  # 50-byte lines: every cut falls on a line start
  fixed = [" ".join(np.random.default_rng(i).choice(["Haus", "Baum", "Licht"], 9))[:49].ljust(49) for i in range(40)]
  (txt / "deu_Latn.txt").write_text("".join(t + "\n" for t in fixed), encoding="utf-8")

  sp = spm.SentencePieceProcessor(model_file=tok)
  out = str(tmp_path / "out")
  for source, inputs in [
    (prepare.Source("parquet", str(pq_root), id="web"), [("deu_Latn", t) for t in deu]),
    (prepare.Source("jsonl", files=(str(jsonl),), id="mixed"), docs),
    (prepare.Source("text", str(txt), id="books"), [("tir_Ethi", t) for t in tir] + [("deu_Latn", t) for t in fixed]),
  ]:
    units = prepare.list_units(source, settings)
    assert len(units) >= 4 and len(units) > len({u.path for u in units}), [u.name for u in units]
    stats = prepare.prepare(source, out, settings, progress=False)
    for lang in {l for l, _ in inputs}:
      want = sorted([2] + sp.encode(t) + [1] for l, t in inputs if l == lang)
      got = []
      for split in ("train", "eval"):
        shards = [s for s in stats["languages"][lang][split]["shards"] if s["source"] == source.name]
        got += _read_split(out, {"shards": shards})
      assert sorted(got) == want, (source.name, lang)
      # ceil(6 / units of the language) eval documents from each unit that has enough
      quota = -(-6 // sum(1 for u in units if u.lang in (lang, None)))
      for u in units:
        record = json.loads(open(os.path.join(out, "_units", u.name + ".json")).read())
        held = record["languages"].get(lang, {}).get("eval", {"documents": 0})["documents"]
        seen = sum(c["documents"] for c in record["languages"].get(lang, {}).values())
        assert held == min(quota, seen // settings.eval_every), (u.name, lang)
  # The unit size shapes the output: another one is refused in the same output directory.
  with pytest.raises(ValueError, match=r"prepared with other settings \(unit_mb 0.0003814697265625 → 256"):
    prepare.prepare(prepare.Source("text", str(txt), id="books"), out, _settings(tok, max_len=256, eval_documents=6))


def test_tfds_dataset(tmp_path, tok):
  tfds = pytest.importorskip("tensorflow_datasets")
  docs = [(l, t) for l in ("deu_Latn", "fao_Latn") for t in _texts(l, 10, 9)]

  class TinyCorpus(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "lang": tfds.features.Text()})
      )

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i, (l, t) in enumerate(docs):
        yield i, {"text": t, "lang": l}

  TinyCorpus(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
  source = prepare.Source("tfds", "tiny_corpus", tfds_data_dir=str(tmp_path / "tfds"), tfds_unit_size=7)
  settings = _settings(tok)
  stats = prepare.prepare(source, str(tmp_path / "out"), settings, progress=False)
  ds = tfds.data_source("tiny_corpus", data_dir=str(tmp_path / "tfds"), split="train")
  records = [(ds[i]["lang"].decode(), ds[i]["text"].decode()) for i in range(len(ds))]
  units = [(records[s : s + 7], 2) for s in range(0, len(records), 7)]  # 3 units, quota ceil(4/3)
  _check(stats, str(tmp_path / "out"), _expected(tok, units, settings))
  assert sorted(records) == sorted(docs)


def _text_corpus(root):
  root.mkdir()
  for i, lang in enumerate(WORDS):
    (root / f"{lang}.txt").write_text("\n".join(_texts(lang, 25, 10 + i)), encoding="utf-8")
  return prepare.Source("text", str(root))


def test_rerun_skips_finished_units(tmp_path, tok, monkeypatch):
  source, out = _text_corpus(tmp_path / "txt"), str(tmp_path / "out")
  first = prepare.prepare(source, out, _settings(tok), progress=False)
  mtimes = {
    s["path"]: os.path.getmtime(os.path.join(out, s["path"]))
    for l in first["languages"].values()
    for sp in l.values()
    for s in sp["shards"]
  }
  calls = []
  monkeypatch.setattr(prepare, "process_unit", lambda *a, **k: calls.append(a))
  reads, read_json = [], prepare._read_json
  monkeypatch.setattr(prepare, "_read_json", lambda path: reads.append(os.fspath(path)) or read_json(path))
  again = prepare.prepare(source, out, _settings(tok), progress=False)
  assert calls == [] and again == first
  assert all(os.path.getmtime(os.path.join(out, p)) == t for p, t in mtimes.items())
  # Each unit's record is read once (not again for stats.json).
  units = sorted(r for r in reads if "/_units/" in r)
  assert units == sorted(os.path.join(out, "_units", n) for n in os.listdir(os.path.join(out, "_units")))


def test_stats_come_from_the_records_in_hand(tmp_path, tok, monkeypatch):
  """A run that tokenized every unit builds stats.json from the records it holds: no unit record is read back."""
  reads, read_json = [], prepare._read_json
  monkeypatch.setattr(prepare, "_read_json", lambda path: reads.append(os.fspath(path)) or read_json(path))
  out = str(tmp_path / "out")
  stats = prepare.prepare(_text_corpus(tmp_path / "txt"), out, _settings(tok), progress=False)
  assert not [r for r in reads if "/_units/" in r]
  assert stats == prepare.aggregate(
    prepare.finished_units(out), stats["tokenizer"], prepare.Settings(**stats["settings"])
  )


def test_interrupted_run_leaves_no_complete_looking_shard(tmp_path, tok, monkeypatch):
  source = _text_corpus(tmp_path / "txt")
  clean = prepare.prepare(source, str(tmp_path / "clean"), _settings(tok), progress=False)
  out = str(tmp_path / "out")
  real_add, n = prepare._UnitWriter.add, [0]

  def crash_in_second_unit(self, lang, ids):
    if lang == "fao_Latn":
      n[0] += 1
      if n[0] == 10:
        raise KeyboardInterrupt
    return real_add(self, lang, ids)

  monkeypatch.setattr(prepare._UnitWriter, "add", crash_in_second_unit)
  with pytest.raises(KeyboardInterrupt):
    prepare.prepare(source, out, _settings(tok), progress=False)
  assert not os.path.exists(os.path.join(out, "stats.json"))
  assert os.listdir(os.path.join(out, "_units")) == ["text-deu_Latn.txt.json"]
  # The unit was written in a staging folder beside the output, removed with its partial files (a kill would leave
  # that folder, under a hidden temporary name, and still nothing in the output).
  assert [f for _, _, fs in os.walk(os.path.join(out, "fao_Latn")) for f in fs] == []
  assert sorted(os.listdir(tmp_path)) == ["clean", "out", "txt"]
  monkeypatch.setattr(prepare._UnitWriter, "add", real_add)
  resumed = prepare.prepare(source, out, _settings(tok), progress=False)
  assert resumed == clean | {"settings": resumed["settings"]}
  assert not [f for _, _, fs in os.walk(out) for f in fs if ".tmp-" in f]
  for lang in clean["languages"]:
    assert _read_split(out, resumed["languages"][lang]["train"]) == _read_split(
      str(tmp_path / "clean"), clean["languages"][lang]["train"]
    )


def test_parallel_workers_give_the_same_shards(tmp_path, tok):
  source = _text_corpus(tmp_path / "txt")
  serial = prepare.prepare(source, str(tmp_path / "serial"), _settings(tok), progress=False)
  parallel = prepare.prepare(source, str(tmp_path / "parallel"), _settings(tok), num_workers=2, progress=False)
  assert parallel == serial
  for lang, splits in serial["languages"].items():
    for split in splits:
      assert _read_split(str(tmp_path / "parallel"), splits[split]) == _read_split(
        str(tmp_path / "serial"), splits[split]
      )


def test_bad_inputs(tmp_path, tok):
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "fao_Latn.txt").write_text("\n\n   \n")
  with pytest.raises(ValueError, match="no documents found in the input"):
    prepare.prepare(prepare.Source("text", str(empty)), str(tmp_path / "o1"), _settings(tok), progress=False)
  with pytest.raises(FileNotFoundError, match="no <lang>.txt"):
    prepare.prepare(prepare.Source("text", str(tmp_path / "nothing")), str(tmp_path / "o2"), _settings(tok))
  source = _text_corpus(tmp_path / "txt")
  with pytest.raises(
    ValueError,
    match=r"languages not in .*txt: xho_Latn \(the data has 3 languages: deu_Latn, "
    r"fao_Latn, tir_Ethi\)",
  ):
    prepare.prepare(source, str(tmp_path / "o3"), _settings(tok), languages=["xho_Latn"])
  with pytest.raises(FileNotFoundError, match="tokenizer file .*missing.model does not exist"):
    prepare.prepare(source, str(tmp_path / "o4"), _settings(str(tmp_path / "missing.model")))
  prepare.prepare(source, str(tmp_path / "o5"), _settings(tok), progress=False)
  with pytest.raises(ValueError, match=r"prepared with other settings \(max_len 24 → 32\)"):
    prepare.prepare(source, str(tmp_path / "o5"), _settings(tok, max_len=32), progress=False)
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "Haus", "lang": "deu_Latn"}\n{"text": "Baum"}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2: expected an object with 'text' and 'lang' keys"):
    prepare.prepare(prepare.Source("jsonl", files=(str(bad),)), str(tmp_path / "o6"), _settings(tok))
  bad.write_text('{"text": "Haus", "lang": "../etc"}\n')
  with pytest.raises(ValueError, match="language '../etc' is not a usable name"):
    prepare.prepare(prepare.Source("jsonl", files=(str(bad),)), str(tmp_path / "o7"), _settings(tok))
  _write_parquet(tmp_path / "pq", "deu_Latn", "x.parquet", ["a"])
  pq.write_table(pa.table({"content": ["Haus"]}), tmp_path / "pq" / "deu_Latn" / "train" / "x.parquet")
  with pytest.raises(ValueError, match="no `text` column"):
    prepare.prepare(prepare.Source("parquet", str(tmp_path / "pq")), str(tmp_path / "o8"), _settings(tok))


def test_command_line(tmp_path, tok, capsys):
  _text_corpus(tmp_path / "txt")
  prepare.main(
    [
      "--text_dir",
      str(tmp_path / "txt"),
      "--tokenizer",
      tok,
      "--output_dir",
      str(tmp_path / "out"),
      "--max_len",
      str(MAX_LEN),
      "--num_workers",
      "0",
      "--eval_documents",
      "2",
    ]
  )
  stats = json.loads((tmp_path / "out" / "stats.json").read_text())
  assert f"{stats['totals']['train']['tokens']:,} tokens" in capsys.readouterr().out
  assert all(v["eval"]["documents"] == 2 for v in stats["languages"].values())
  with pytest.raises(SystemExit) as e:
    prepare.main(
      [
        "--text_dir",
        str(tmp_path / "txt"),
        "--tokenizer",
        tok,
        "--output_dir",
        str(tmp_path / "o2"),
        "--languages",
        "eng_Latn",
      ]
    )
  assert e.value.code == 2 and capsys.readouterr().err.startswith("error: languages not in")


def _shard_bytes(out_dir, stats):
  return {
    s["path"]: open(os.path.join(out_dir, s["path"]), "rb").read()
    for l in stats["languages"].values()
    for sp in l.values()
    for s in sp["shards"]
  }


def test_two_sources_into_one_data_dir_and_budgets_by_source(tmp_path, tok):
  from data_pipeline import mixture, pipeline

  root = tmp_path / "fineweb2"
  _write_parquet(root, "deu_Latn", "a.parquet", _texts("deu_Latn", 30, 1))
  _write_parquet(root, "fao_Latn", "a.parquet", _texts("fao_Latn", 15, 2))
  _write_parquet(root, "fao_Latn_removed", "a.parquet", _texts("fao_Latn", 40, 3))
  web = tmp_path / "web.jsonl"  # a second source of German, single-language: no lang field
  web.write_text("".join(json.dumps({"text": t}) + "\n" for t in _texts("deu_Latn", 25, 4)))
  out, settings = str(tmp_path / "out"), _settings(tok)
  first = prepare.prepare(prepare.Source("parquet", str(root), id="fw2"), out, settings, progress=False)
  assert sorted(first["languages"]) == ["deu_Latn", "fao_Latn"]  # *_removed skipped
  both = prepare.prepare(
    prepare.Source("jsonl", files=(str(web),), id="web", lang="deu_Latn"), out, settings, progress=False
  )
  # stats.json describes both runs: the parquet languages kept, German from two sources.
  assert sorted(both["languages"]) == ["deu_Latn", "fao_Latn"] and sorted(both["sources"]) == ["fw2", "web"]
  assert both["languages"]["fao_Latn"] == first["languages"]["fao_Latn"]
  deu = both["languages"]["deu_Latn"]["train"]
  assert {s["source"] for s in deu["shards"]} == {"fw2", "web"}
  assert deu["documents"] == first["languages"]["deu_Latn"]["train"]["documents"] + both["sources"]["web"]["documents"]
  assert both["sources"]["web"]["languages"] == ["deu_Latn"]
  web_shards = [s for s in deu["shards"] if s["source"] == "web"]
  # A budget that names a source takes its shards out of their language.
  spec = mixture.PhaseSpec(None, tau=0.5, budgets={"web": 0.25})
  cfg = pipeline.PipelineConfig(
    data_dir=out, tau=0.5, budgets={"web": 0.25}, seq_len=32, batch_size=2, mask_id=4, pad_id=0
  )
  plan, mix, _ = pipeline.make_plan(cfg)
  assert set(mix.languages) == {"deu_Latn", "fao_Latn", "web"}
  w = dict(zip(mix.languages, mix.weights))
  assert w["web"] == pytest.approx(0.25)
  fw2 = {l: both["languages"][l]["train"]["tokens"] for l in ("deu_Latn", "fao_Latn")}
  fw2["deu_Latn"] -= sum(s["tokens"] for s in web_shards)
  n = np.array([fw2["deu_Latn"], fw2["fao_Latn"]], float) ** 0.5
  np.testing.assert_allclose([w["deu_Latn"], w["fao_Latn"]], 0.75 * n / n.sum())
  shards = dict(zip(plan.languages, plan.shards))
  assert [p for p, _ in shards["web"]] == [os.path.join(out, s["path"]) for s in web_shards]
  assert not {p for p, _ in shards["deu_Latn"]} & {p for p, _ in shards["web"]}
  assert (
    mixture.compute_mixture(mixture.counts_from_stats(both, ["web"]), spec).weights.tolist() == mix.weights.tolist()
  )
  # A source id names one input: another input under it is refused and stats.json stays as it was.
  before = open(os.path.join(out, "stats.json")).read()
  with pytest.raises(ValueError, match="source id 'web' already names another input"):
    prepare.prepare(prepare.Source("jsonl", files=(str(web),), id="web", lang="fao_Latn"), out, settings)
  assert open(os.path.join(out, "stats.json")).read() == before


def test_removed_subsets_and_exact_script_names(tmp_path, tok):
  root = tmp_path / "fineweb2"
  _write_parquet(root, "fao_Latn", "a.parquet", _texts("fao_Latn", 12, 1))
  _write_parquet(root, "fao_Latn_removed", "a.parquet", _texts("fao_Latn", 9, 2))
  _write_parquet(root, "deu_Latn", "a.parquet", _texts("deu_Latn", 9, 3))
  settings = _settings(tok)
  units = prepare.list_units(prepare.Source("parquet", str(root)), settings, ["fao"])
  assert [u.lang for u in units] == ["fao_Latn"]
  src = prepare.Source("parquet", str(root), include_removed=True)
  assert [u.lang for u in prepare.list_units(src, settings)] == ["deu_Latn", "fao_Latn", "fao_Latn_removed"]
  assert [u.lang for u in prepare.list_units(src, settings, ["fao"])] == ["fao_Latn"]  # not ambiguous
  stats = prepare.prepare(src, str(tmp_path / "out"), settings, languages=["fao_Latn_removed"], progress=False)
  assert list(stats["languages"]) == ["fao_Latn_removed"]


def test_unit_names_do_not_collide_and_text_key(tmp_path, tok):
  root = tmp_path / "code"
  a, b = _texts("deu_Latn", 12, 1), _texts("fao_Latn", 10, 2)
  os.makedirs(root / "x")
  pq.write_table(pa.table({"content": a}), root / "part 1.parquet")
  pq.write_table(pa.table({"content": b}), root / "part_1.parquet")
  pq.write_table(pa.table({"content": b[:4]}), root / "x" / "y.parquet")
  pq.write_table(pa.table({"content": a[:3]}), root / "x+y.parquet")
  settings = _settings(tok, eval_documents=0)
  src = prepare.Source("parquet", str(root), id="starcoder", lang="code", text_key="content")
  names = [u.name for u in prepare.list_units(src, settings)]
  assert len(set(names)) == 4 and all(n.startswith("starcoder-") for n in names)
  stats = prepare.prepare(src, str(tmp_path / "out"), settings, progress=False)
  train = stats["languages"]["code"]["train"]
  assert train["documents"] == 12 + 10 + 4 + 3 and len(train["shards"]) == 4
  # The same documents under a `text` column give the same sequences.
  plain = tmp_path / "plain"
  os.makedirs(plain)
  for i, texts in enumerate((a, b, b[:4], a[:3])):
    pq.write_table(pa.table({"text": texts}), plain / f"{i}.parquet")
  ref = prepare.prepare(
    prepare.Source("parquet", str(plain), lang="code"), str(tmp_path / "ref"), settings, progress=False
  )
  got, want = (
    _read_split(str(tmp_path / "out"), train),
    _read_split(str(tmp_path / "ref"), ref["languages"]["code"]["train"]),
  )
  assert sorted(got) == sorted(want) and len(got) == ref["languages"]["code"]["train"]["sequences"]
  with pytest.raises(
    ValueError,
    match=r"part 1.parquet: no `text` column \(columns: content\); choose one with "
    "--text_key",
  ):
    prepare.prepare(prepare.Source("parquet", str(root), lang="code"), str(tmp_path / "o2"), settings)


def test_sharded_prepare_over_two_invocations_equals_one(tmp_path, tok):
  root = tmp_path / "fineweb2"
  for lang, n in (("deu_Latn", 3), ("fao_Latn", 2), ("tir_Ethi", 1)):
    for i in range(n):
      _write_parquet(root, lang, f"{i:03d}.parquet", _texts(lang, 10 + i, 20 + i))
  settings, src = _settings(tok), prepare.Source("parquet", str(root), id="fw2")
  one = prepare.prepare(src, str(tmp_path / "one"), settings, progress=False)
  half = prepare.prepare(src, str(tmp_path / "two"), settings, shard_index=1, num_shards=2, progress=False)
  assert 0 < half["totals"]["train"]["documents"] < one["totals"]["train"]["documents"]
  two = prepare.prepare(
    src, str(tmp_path / "two"), settings, shard_index=0, num_shards=2, num_workers=2, progress=False
  )
  assert two == one
  assert _shard_bytes(str(tmp_path / "two"), two) == _shard_bytes(str(tmp_path / "one"), one)
  with pytest.raises(ValueError, match=r"shard_index 2 is not in \[0, num_shards=2\)"):
    prepare.prepare(src, str(tmp_path / "two"), settings, shard_index=2, num_shards=2)


def test_errors_name_the_file_and_line(tmp_path, tok, capsys):
  settings = _settings(tok)
  root = tmp_path / "pq"
  _write_parquet(root, "deu_Latn", "good.parquet", _texts("deu_Latn", 5, 1))
  (root / "deu_Latn" / "train" / "bad.parquet").write_bytes(b"PAR1 not really parquet")
  with pytest.raises(ValueError, match=r"bad.parquet: not a readable parquet file"):
    prepare.prepare(prepare.Source("parquet", str(root)), str(tmp_path / "o1"), settings)
  txt = tmp_path / "txt"
  txt.mkdir()
  (txt / "deu_Latn.txt").write_bytes(b"Haus\nBaum\n" + b"Stra\xdfe\n" + b"Licht\n")
  with pytest.raises(ValueError, match=r"deu_Latn.txt:3: not valid UTF-8"):
    prepare.prepare(prepare.Source("text", str(txt)), str(tmp_path / "o2"), settings)
  bad = tmp_path / "bad.jsonl"
  bad.write_bytes(b'{"text": "Haus", "lang": "deu_Latn"}\n{"text": "\xff", "lang": "deu_Latn"}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid UTF-8"):
    prepare.prepare(prepare.Source("jsonl", files=(str(bad),)), str(tmp_path / "o3"), settings)
  # An OSError (here: the output directory is under a file) is one line on the command line.
  (tmp_path / "file").write_text("x")
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    prepare.main(["--text_dir", str(txt), "--tokenizer", tok, "--output_dir", str(tmp_path / "file" / "out")])
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.startswith("error: [Errno 20] Not a directory") and err.count("\n") == 1


def test_output_dir_inputs_and_tokenizer_in_a_bucket(tmp_path, tok, gcs_bucket, monkeypatch, capsys):
  """Text and parquet inputs, the tokenizer and --output_dir all in a bucket: the same shards and stats as on
  local disk; a unit's record is written only when its shards are in the bucket, and stats.json last, when every
  shard it lists is there; the command prints where it wrote."""
  import uuid

  from data_pipeline import filesystem as fs

  remote = fs.path(f"{gcs_bucket}/{uuid.uuid4().hex[:8]}")
  _text_corpus(tmp_path / "txt")
  for lang, seed in (("deu_Latn", 1), ("fao_Latn", 3)):
    _write_parquet(tmp_path / "pq", lang, "000_00000.parquet", _texts(lang, 20, seed))
  fs.copy_tree(fs.path(str(tmp_path / "txt")), remote / "txt")
  fs.copy_tree(fs.path(str(tmp_path / "pq")), remote / "pq")
  fs.upload(tok, remote / "spm.model")

  out = remote / "out"
  writes, real_write = [], fs.write_text

  def checked_write(p, text):
    if p.parent.name == "_units" or p.name == "stats.json":
      obj = json.loads(text)
      if p.name == "stats.json":
        paths = [s["path"] for l in obj["languages"].values() for sp in l.values() for s in sp["shards"]]
      else:
        paths = [c["path"] for l in obj["languages"].values() for c in l.values()]
      writes.append((p.name, [x for x in paths if not (out / x).exists()]))
    real_write(p, text)

  monkeypatch.setattr(fs, "write_text", checked_write)
  monkeypatch.chdir(tmp_path)
  args = [
    "--tokenizer",
    os.fspath(remote / "spm.model"),
    "--max_len",
    str(MAX_LEN),
    "--num_workers",
    "0",
    "--eval_documents",
    "4",
    "--eval_every",
    "3",
  ]
  prepare.main(["--text_dir", os.fspath(remote / "txt"), "--output_dir", os.fspath(out)] + args)
  assert f"→ {out}/stats.json" in capsys.readouterr().out
  assert [w[0] for w in writes] == [
    "text-deu_Latn.txt.json",
    "text-fao_Latn.txt.json",
    "text-tir_Ethi.txt.json",
    "stats.json",
  ]
  assert all(missing == [] for _, missing in writes), writes
  prepare.main(["--parquet_dir", os.fspath(remote / "pq"), "--source", "web", "--output_dir", os.fspath(out)] + args)
  assert not os.path.exists(tmp_path / "gs:")
  assert writes[-1] == ("stats.json", [])

  local = str(tmp_path / "local")
  prepare.main(["--text_dir", str(tmp_path / "txt"), "--output_dir", local] + args[:1] + [tok] + args[2:])
  prepare.main(
    ["--parquet_dir", str(tmp_path / "pq"), "--source", "web", "--output_dir", local] + args[:1] + [tok] + args[2:]
  )
  got, want = json.loads((out / "stats.json").read_text()), json.load(open(os.path.join(local, "stats.json")))
  assert got["tokenizer"].pop("path") == os.fspath(remote / "spm.model") and want["tokenizer"].pop("path") == tok
  for stats in (got, want):
    del stats["settings"]["tokenizer"]
  assert got == want and set(want["sources"]) == {"text", "web"}
  for lang in want["languages"].values():
    for split in lang.values():
      for shard in split["shards"]:
        assert (out / shard["path"]).read_bytes() == open(os.path.join(local, shard["path"]), "rb").read()
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    prepare.main(["--text_dir", str(tmp_path / "txt"), "--output_dir", "s3://b/x"] + args)
  assert e.value.code == 2
  assert capsys.readouterr().err.startswith("error: --output_dir=s3://b/x: the scheme s3:// is not supported")


def test_parquet_files_of_one_language_in_a_bucket(tmp_path, tok, gcs_bucket):
  """--lang with a bucket: every *.parquet at any depth (a bucket is walked; epath refuses `**` there)."""
  import uuid

  from data_pipeline import filesystem as fs

  remote = fs.path(f"{gcs_bucket}/{uuid.uuid4().hex[:8]}")
  _write_parquet(tmp_path / "pq", "a", "x.parquet", _texts("deu_Latn", 12, 1))
  _write_parquet(tmp_path / "pq" / "b", "c", "y.parquet", _texts("deu_Latn", 9, 2))
  pq.write_table(pa.table({"text": _texts("deu_Latn", 7, 3)}), tmp_path / "pq" / "top.parquet")
  fs.copy_tree(fs.path(str(tmp_path / "pq")), remote / "pq")
  settings = _settings(tok)
  got = prepare.prepare(
    prepare.Source("parquet", os.fspath(remote / "pq"), lang="deu_Latn"),
    os.fspath(remote / "o"),
    settings,
    progress=False,
  )
  want = prepare.prepare(
    prepare.Source("parquet", str(tmp_path / "pq"), lang="deu_Latn"), str(tmp_path / "o"), settings, progress=False
  )
  assert got == want and got["sources"]["parquet"]["units"] == 3
