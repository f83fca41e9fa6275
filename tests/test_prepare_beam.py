"""prepare_beam: the Beam pipeline (DirectRunner, two worker processes) writes what the in-process prepare writes,
and a killed run, run again, completes it without a duplicate or a missing document.

Apache Beam caps protobuf and pyarrow below the versions this project installs (setup.py's `beam` extra), so the
pipeline runs in a venv of its own: this interpreter's when it imports apache_beam, else one built once (about
a minute, from the package index) under $MMBERT_JAX_CACHE or ~/.cache/mmbert_jax and reused; the tests are
skipped, naming why, only when that venv cannot be built.
"""

import fcntl
import gzip
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
from array_record.python.array_record_module import ArrayRecordReader

from data_pipeline import filesystem as fs
from data_pipeline import prepare
from data_pipeline import tokenizer as tokenizer_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = {
  "deu_Latn": "Haus Baum Straße Wasser Licht über grün".split(),
  "fao_Latn": "hús træ gøta vatn ljós yvir grønt".split(),
  "tir_Ethi": "ቤት ኦም ጎደና ማይ ብርሃን ልዕሊ ቀጠልያ".split(),
}
UNIT_MB = 2000 / 2**20  # a few dozen documents per unit


def _beam_requirements() -> list[str]:
  """The beam extra's Beam (without the gcp extra: the DirectRunner needs none of it) and what
  data_pipeline.prepare imports, at setup.py's versions."""
  setup = open(os.path.join(REPO, "setup.py"), encoding="utf-8").read()
  pin = lambda name: re.search(rf'"({re.escape(name)}(\[[a-z]+\])?[=<>][^"]*)"', setup).group(1)
  beam = pin("apache-beam").replace("[gcp]", "")
  return [beam, pin("array-record"), pin("sentencepiece"), pin("numpy"), pin("tqdm"), "etils[epath]", "fsspec"]


@pytest.fixture(scope="module")
def beam_python():
  try:
    import apache_beam  # noqa: F401

    return sys.executable
  except ImportError:
    pass
  reqs = _beam_requirements()
  key = hashlib.sha1(" ".join([sys.version, *reqs]).encode()).hexdigest()[:12]
  venv = os.path.join(os.fspath(fs.cache_root()), f"beam-venv-{key}")
  complete = os.path.join(venv, "complete")  # written once every package is in
  os.makedirs(os.path.dirname(venv), exist_ok=True)
  with open(venv + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time (pytest -n workers, concurrent runs)
    if not os.path.exists(complete):
      shutil.rmtree(venv, ignore_errors=True)
      pip = [os.path.join(venv, "bin", "pip"), "install", "-q", "--disable-pip-version-check", *reqs]
      try:
        subprocess.run([sys.executable, "-m", "venv", venv], check=True, capture_output=True, text=True)
        subprocess.run(pip, check=True, capture_output=True, text=True, timeout=900)
      except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        shutil.rmtree(venv, ignore_errors=True)
        lines = (e.stderr or str(e)).strip().splitlines()
        pytest.skip(f"no venv with {reqs[0]} could be built ({lines[-1] if lines else e})")
      open(complete, "w").close()
  return os.path.join(venv, "bin", "python")


def _docs(lang, n, seed):
  rng = np.random.default_rng(seed)
  return [" ".join(rng.choice(WORDS[lang], int(rng.integers(1, 12)))) for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """Two sources, three languages: a parquet tree (files of many row groups) and JSONL of mixed languages
  (a plain file cut into byte ranges, a gzipped one read whole); each source's documents by language."""
  root = tmp_path_factory.mktemp("corpus")
  tok = tokenizer_lib.train_sentencepiece(
    str(root / "spm"), vocab_size=360, sentences=[t for lang in WORDS for t in _docs(lang, 200, 0)]
  )
  web = {("deu_Latn", "a"): _docs("deu_Latn", 400, 1), ("deu_Latn", "b"): _docs("deu_Latn", 250, 2)}
  web["fao_Latn", "a"] = _docs("fao_Latn", 300, 3)
  for (lang, name), texts in web.items():
    os.makedirs(root / "web" / lang / "train", exist_ok=True)
    pq.write_table(pa.table({"text": texts}), root / "web" / lang / "train" / f"{name}.parquet", row_group_size=20)
  mixed = [(lang, t) for i, lang in enumerate(WORDS) for t in _docs(lang, 150, 4 + i)]
  np.random.default_rng(0).shuffle(mixed)
  (root / "m.jsonl").write_text("".join(json.dumps({"text": t, "lang": l}) + "\n" for l, t in mixed[:350]))
  with gzip.open(root / "n.jsonl.gz", "wt") as f:
    f.writelines(json.dumps({"text": t, "lang": l}) + "\n" for l, t in mixed[350:])
  sources = {
    "web": (["--parquet_dir", str(root / "web")], prepare.Source("parquet", str(root / "web"), id="web")),
    "mixed": (
      ["--jsonl", str(root / "m.jsonl"), str(root / "n.jsonl.gz")],
      prepare.Source("jsonl", files=(str(root / "m.jsonl"), str(root / "n.jsonl.gz")), id="mixed"),
    ),
  }
  documents = {"web": {}, "mixed": {}}
  for (lang, _), texts in web.items():
    documents["web"].setdefault(lang, []).extend(texts)
  for lang, text in mixed:
    documents["mixed"].setdefault(lang, []).append(text)
  return {"tok": tok, "sources": sources, "documents": documents}


def _settings(tok):
  return prepare.Settings(tok, max_len=256, eval_documents=6, eval_every=3, unit_mb=UNIT_MB)


def _beam_command(python, corpus, name, out):
  return [
    python,
    "-m",
    "data_pipeline.prepare_beam",
    *corpus["sources"][name][0],
    "--source",
    name,
    "--tokenizer",
    corpus["tok"],
    "--output_dir",
    str(out),
    "--max_len=256",
    "--eval_documents=6",
    "--eval_every=3",
    f"--unit_mb={UNIT_MB!r}",
    "--runner=DirectRunner",
    "--direct_running_mode=multi_processing",
    "--direct_num_workers=2",
  ]


def _run_beam(python, corpus, name, out):
  env = dict(os.environ, PYTHONPATH=REPO)
  proc = subprocess.run(_beam_command(python, corpus, name, out), cwd=REPO, env=env, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]


def _tree(out) -> dict[str, bytes]:
  """Every file of an output directory, by relative path."""
  files = {}
  for folder, _, names in os.walk(out):
    for name in names:
      path = os.path.join(folder, name)
      files[os.path.relpath(path, out)] = open(path, "rb").read()
  return files


def _check_documents(out, corpus, names):
  """Each source's documents by language, read from the shards stats.json lists: the input's, each once
  (a document is one sequence here: none is longer than max_len)."""
  stats = json.load(open(os.path.join(out, "stats.json")))
  sp = spm.SentencePieceProcessor(model_file=corpus["tok"])
  for name in names:
    for lang, texts in corpus["documents"][name].items():
      got = []
      for split in ("train", "eval"):
        for shard in stats["languages"][lang][split]["shards"]:
          if shard["source"] == name:
            r = ArrayRecordReader(os.path.join(out, shard["path"]))
            got += [np.frombuffer(x, np.int32).tolist() for x in r.read_all()]
            r.close()
      assert sorted(got) == sorted([2] + sp.encode(t) + [1] for t in texts), (name, lang)
  return stats


def _in_process(corpus, out, names):
  for name in names:
    prepare.prepare(corpus["sources"][name][1], str(out), _settings(corpus["tok"]), progress=False)
  return _tree(out)


@pytest.mark.slow
def test_beam_writes_what_prepare_writes(tmp_path, corpus, beam_python):
  """Two sources into one output directory, by the DirectRunner with two worker processes: the same files with
  the same bytes (shards, unit records, stats.json) as the in-process path, every input document once."""
  want = _in_process(corpus, tmp_path / "in_process", ["mixed", "web"])
  for name in ("mixed", "web"):
    _run_beam(beam_python, corpus, name, tmp_path / "beam")
  stats = _check_documents(tmp_path / "beam", corpus, ["mixed", "web"])
  got = _tree(tmp_path / "beam")
  assert stats["totals"] == json.loads(want["stats.json"])["totals"]
  assert sorted(got) == sorted(want)
  assert [p for p in want if got[p] != want[p]] == []
  units = [p for p in got if p.startswith("_units/")]
  assert len(units) > 2 * 4 and any("@rg" in p for p in units) and any("@b" in p for p in units)
  # Bad input is one line and exit 2, as in prepare (Beam may log a warning of its own before it).
  command = _beam_command(beam_python, corpus, "web", tmp_path / "o") + ["--unit_mb=x"]
  proc = subprocess.run(command, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True)
  assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: "), proc.stderr
  assert "--unit_mb: invalid float value" in proc.stderr


def test_without_beam_the_command_says_so_in_one_line():
  try:
    import apache_beam  # noqa: F401

    pytest.skip("this interpreter has Apache Beam")
  except ImportError:
    pass
  proc = subprocess.run(
    [sys.executable, "-m", "data_pipeline.prepare_beam", "--help"], cwd=REPO, capture_output=True, text=True
  )
  assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
  assert proc.stderr.startswith("error: python -m data_pipeline.prepare_beam needs Apache Beam")


@pytest.mark.slow
def test_killed_beam_run_completes_when_run_again(tmp_path, corpus, beam_python):
  """SIGKILL to the whole run (launcher and workers) once some units are done; the same command again writes
  what an uninterrupted in-process run writes: no document missing, none twice, no partial shard listed."""
  want = _in_process(corpus, tmp_path / "in_process", ["web"])
  out = tmp_path / "beam"
  env = dict(os.environ, PYTHONPATH=REPO)
  command = _beam_command(beam_python, corpus, "web", out)
  log = open(tmp_path / "killed.log", "w+")
  # its own session: the kill reaches the launcher and the worker processes it started
  proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=log, start_new_session=True)
  units = len(prepare.list_units(corpus["sources"]["web"][1], _settings(corpus["tok"])))
  deadline = time.monotonic() + 120
  while time.monotonic() < deadline and proc.poll() is None:
    if os.path.isdir(out / "_units") and os.listdir(out / "_units"):
      break
    time.sleep(0.005)
  assert proc.poll() is None, open(log.name).read()[-3000:]
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  done = len(os.listdir(out / "_units"))
  assert 0 < done < units and not (out / "stats.json").exists()
  _run_beam(beam_python, corpus, "web", out)
  _check_documents(out, corpus, ["web"])
  got = _tree(out)
  assert sorted(got) == sorted(want)
  assert [p for p in want if got[p] != want[p]] == []
