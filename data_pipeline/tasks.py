"""Downstream task data: classification and retrieval splits from local files, TFDS, or the embedded CLDR tasks.

A `Task` has a `train` and a `test` `Split` of raw texts (tokenized later by the model's own tokenizer):

  classification  texts (+ optional second texts, e.g. NLI hypotheses), integer labels into `label_names`
  retrieval       train: (query, positive) pairs; test: queries with the index of their answer in `candidates`

Files: JSONL (`.jsonl`, `.jsonl.gz`), parquet, TSV (header row), or `tfds:NAME[:SPLIT]` for a TFDS dataset already
prepared under `tfds_data_dir` (read with `tfds.data_source`: nothing is downloaded). Columns are named by a
`Columns`; a `lang` column (or one fixed language) lets results be reported per language.

Two embedded tasks need no download; they are built deterministically from the Unicode CLDR data in `babel`,
like the demo corpus (`data_pipeline.demo_corpus`), and measure what masked-language-model pretraining teaches:

  cldr_order      word order: is a list of localized names in its own order, or were its words shuffled? Both
                  classes have the same tokens, so token identity carries no signal (59 languages; chance 0.5)
  cldr_order_en   the same, cross-lingual zero-shot: fine-tuned on English lists only, scored in the 58 others

Tasks that token identity alone solves (language identification of such lists, a name's category, a name's
English translation among names) are left out: an encoder with random weights, whose embeddings keep every token
apart, scored as well on them as a pretrained one, so they could not tell checkpoints apart.

Both are fixed (no seed): held-out texts are chosen by a hash of the text itself, so no test text is seen in
training, and every run and every checkpoint scores the same test set.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import itertools
import json
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from babel import Locale, lists

from data_pipeline import demo_corpus
from data_pipeline import filesystem as fs

KINDS = ("classification", "retrieval")
EMBEDDED = ("cldr_order", "cldr_order_en")


@dataclasses.dataclass
class Split:
  texts: list[str]
  langs: list[str]
  labels: np.ndarray | None = None  # class ids (classification) or candidate indices (retrieval test)
  pairs: list[str] | None = None  # second texts: sentence pairs (classification), positives (retrieval train)
  relevance: list[dict[int, float]] | None = None  # retrieval test with qrels: {candidate index: grade} per query

  def __len__(self) -> int:
    return len(self.texts)

  def select(self, keep: np.ndarray) -> Split:
    idx = np.flatnonzero(keep)
    pick = lambda xs: None if xs is None else [xs[i] for i in idx]
    labels = None if self.labels is None else self.labels[idx]
    return Split(pick(self.texts), pick(self.langs), labels, pick(self.pairs), pick(self.relevance))


@dataclasses.dataclass
class Task:
  name: str
  kind: str  # classification | retrieval
  train: Split
  test: Split
  label_names: tuple[str, ...] = ()  # classification
  candidates: tuple[str, ...] = ()  # retrieval: every test query's answer is one of these
  dev: Split | None = None  # held out like test, for choosing settings (protocol's learning-rate sweep)

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"task {self.name}: kind {self.kind!r} is not one of {KINDS}")

  @property
  def languages(self) -> tuple[str, ...]:
    return tuple(sorted(set(self.test.langs)))

  def train_on(self, languages: Sequence[str]) -> Task:
    """Cross-lingual transfer: keep only these languages' training examples (the test set is unchanged)."""
    if not languages:
      return self
    keep = np.isin(np.array(self.train.langs, dtype=object), list(languages))
    if not keep.any():
      raise ValueError(
        f"task {self.name}: no training examples in languages {', '.join(languages)} (have: "
        f"{', '.join(sorted(set(self.train.langs)))})"
      )
    return dataclasses.replace(self, train=self.train.select(keep))


# --------------------------------------------------------------------------------------------------------------
# Local files and TFDS
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Columns:
  text: str = "text"
  pair: str = ""  # second text: NLI hypothesis, or the positive of a retrieval pair
  label: str = "label"
  lang: str = ""  # per-language reporting; "" = every row in `default_lang`
  default_lang: str = "und"
  # Classification: the classes in order; an integer label i names label_names[i] (XNLI / PAWS-X / GLUE files
  # store 0, 1, 2 where others spell entailment, neutral, contradiction). Empty: the labels as they are.
  label_names: tuple[str, ...] = ()


def _open_text(p: fs.Path, raw, newline: str | None = None):
  """A text stream over the bytes of `raw` (an open file of `p`), gunzipped for a .gz name."""
  return io.TextIOWrapper(
    gzip.GzipFile(fileobj=raw) if p.name.endswith(".gz") else raw, encoding="utf-8", newline=newline
  )


def read_records(path: str, tfds_data_dir: str | None = None) -> list[dict[str, Any]]:
  """Rows of a JSONL / parquet / TSV file (local or gs://) or of `tfds:NAME[:SPLIT]`, as dicts."""
  if path.startswith("tfds:"):
    return _tfds_records(path, tfds_data_dir)
  p = fs.path(path, "task file")
  if not p.exists():
    raise FileNotFoundError(f"task file {path} does not exist")
  if path.endswith((".jsonl", ".jsonl.gz", ".json")):
    with p.open("rb") as raw, _open_text(p, raw) as f:
      rows = []
      for i, line in enumerate(f):
        if line.strip():
          try:
            rows.append(json.loads(line))
          except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i + 1}: not a JSON object ({e})") from None
      return rows
  if path.endswith(".parquet"):
    import pyarrow.parquet as pq

    with p.open("rb") as raw:
      return pq.read_table(raw).to_pylist()
  if path.endswith((".tsv", ".tsv.gz")):
    with p.open("rb") as raw, _open_text(p, raw, newline="") as f:
      return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
  raise ValueError(f"task file {path}: unknown format (expected .jsonl[.gz], .parquet, .tsv[.gz] or tfds:NAME[:SPLIT])")


def _tfds_records(spec: str, data_dir: str | None) -> list[dict[str, Any]]:
  import tensorflow_datasets as tfds  # slow import: only for this source

  name, _, split = spec[len("tfds:") :].partition(":")
  try:
    source = tfds.data_source(name, data_dir=data_dir, split=split or "train", download=False)
  except Exception as e:  # tfds raises several types for a dataset that is not there
    raise ValueError(
      f"cannot open TFDS dataset {name!r} (data_dir={data_dir}, split={split or 'train'}): {e}".splitlines()[0]
    ) from None
  return [source[i] for i in range(len(source))]


def _as_str(value: Any) -> str:
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray) and value.ndim == 0:
    return _as_str(value.item())
  return str(value)


def _column(rows: list[dict], key: str, where: str) -> list[str]:
  """The field `key` of every row; a row without it is one error naming the file, the row (1-based, in file order)
  and the field."""
  for i, row in enumerate(rows):
    if row.get(key) is None:
      raise ValueError(f"{where}: row {i + 1}: no column {key!r} (it has: {', '.join(map(str, row))})")
  return [_as_str(r[key]) for r in rows]


def _named_labels(values: list[str], names: tuple[str, ...], where: str) -> list[str]:
  """Labels as class names: an integer i → names[i], a name kept; anything else is an error naming the row."""
  out = []
  for i, value in enumerate(values):
    if value not in names and value.lstrip("-").isdigit() and 0 <= int(value) < len(names):
      value = names[int(value)]
    if value not in names:
      raise ValueError(f"{where}: row {i + 1}: label {value!r} is not one of {', '.join(names)} or 0..{len(names) - 1}")
    out.append(value)
  return out


def _label_order(values: Iterable[str]) -> tuple[str, ...]:
  """Sorted label names; numerically when every label is an integer (so 10 follows 9)."""
  values = set(values)
  try:
    return tuple(sorted(values, key=int))
  except ValueError:
    return tuple(sorted(values))


def from_files(
  kind: str,
  train: str,
  test: str,
  columns: Columns = Columns(),
  *,
  name: str = "",
  tfds_data_dir: str | None = None,
  dev: str | None = None,
) -> Task:
  """A task from two files (or TFDS splits), and a classification dev file: classification rows (text[, pair],
  label[, lang]) or retrieval pairs (text = query, pair = its positive[, lang]); test candidates are the distinct
  test positives."""
  if kind not in KINDS:
    raise ValueError(f"task kind {kind!r} is not one of {KINDS}")
  if kind == "retrieval" and not columns.pair:
    raise ValueError("a retrieval task needs the column of the positive text (pair column, e.g. --pair_key)")
  if kind == "retrieval" and dev:
    raise ValueError("a retrieval dev split needs a shared corpus: use the MTEB format (--mteb) for a sweep")
  splits = {}
  for split, path in (("train", train), ("test", test)) + ((("dev", dev),) if dev else ()):
    rows = read_records(path, tfds_data_dir)
    if not rows:
      raise ValueError(f"{path}: no rows")
    texts = _column(rows, columns.text, path)
    langs = _column(rows, columns.lang, path) if columns.lang else [columns.default_lang] * len(rows)
    pairs = _column(rows, columns.pair, path) if columns.pair else None
    labels = _column(rows, columns.label, path) if kind == "classification" else None
    if labels is not None and columns.label_names:
      labels = _named_labels(labels, tuple(columns.label_names), path)
    splits[split] = (texts, langs, pairs, labels)
  name = name or train.rstrip("/").rsplit("/", 1)[-1]
  if kind == "classification":
    label_names = tuple(columns.label_names) or _label_order(splits["train"][3])
    index = {n: i for i, n in enumerate(label_names)}
    for split, path in (("test", test), ("dev", dev)):
      unseen = sorted(set(splits[split][3]) - set(index)) if split in splits else []
      if unseen:
        raise ValueError(f"{path}: labels {unseen[:5]} do not occur in the training data {train}")
    mk = lambda t, l, p, y: Split(t, l, np.array([index[v] for v in y], np.int32), p)
    held = {"dev": mk(*splits["dev"])} if dev else {}
    return Task(name, kind, mk(*splits["train"]), mk(*splits["test"]), label_names=label_names, **held)
  texts, langs, positives, _ = splits["test"]
  candidates = tuple(dict.fromkeys(positives))
  where = {c: i for i, c in enumerate(candidates)}
  return Task(
    name,
    kind,
    Split(*splits["train"][:2], pairs=splits["train"][2]),
    Split(texts, langs, np.array([where[p] for p in positives], np.int32)),
    candidates=candidates,
  )


def _fields(rows: list[dict], keys: Sequence[str], where: str) -> list[tuple[str, ...]]:
  """(row[key] for key in keys) of every row; a missing field is one error naming the file, the row and the field."""
  return list(zip(*(_column(rows, key, where) for key in keys))) if rows else []


def from_mteb(
  directory: str, *, train_split: str = "train", test_split: str = "test", dev_split: str = "dev", name: str = ""
) -> Task:
  """An MTEB / BEIR retrieval directory: `corpus.jsonl` (_id, title, text), `queries.jsonl` (_id, text) and
  `qrels/<split>.tsv` (query-id, corpus-id, score; header row). Training pairs are every (query, document) of the
  train qrels with a positive score; test queries are those of the test qrels, ranked against the whole corpus
  (a document's text is its title and text), their graded relevance kept for nDCG; the dev qrels, where the
  directory has them, make the dev split."""
  root = fs.path(directory, "--mteb")
  corpus_file, queries_file = str(root / "corpus.jsonl"), str(root / "queries.jsonl")
  corpus_rows = read_records(corpus_file)
  ids = _column(corpus_rows, "_id", corpus_file)
  texts = [
    " ".join(x for x in (_as_str(r.get("title") or ""), t) if x).strip()
    for r, t in zip(corpus_rows, _column(corpus_rows, "text", corpus_file))
  ]
  doc_index = {d: i for i, d in enumerate(ids)}
  queries = dict(_fields(read_records(queries_file), ("_id", "text"), queries_file))

  def qrels(split: str) -> dict[str, dict[int, float]]:
    path = str(root / "qrels" / f"{split}.tsv")
    out: dict[str, dict[int, float]] = {}
    for i, (q, d, score) in enumerate(_fields(read_records(path), ("query-id", "corpus-id", "score"), path)):
      if q not in queries or d not in doc_index:
        what = (
          f"query-id {q!r} is not in {queries_file}" if q not in queries else f"corpus-id {d!r} is not in {corpus_file}"
        )
        raise ValueError(f"{path}: row {i + 1}: {what}")
      try:
        grade = float(score)
      except ValueError:
        raise ValueError(f"{path}: row {i + 1}: score {score!r} is not a number") from None
      if grade > 0:
        out.setdefault(q, {})[doc_index[d]] = grade
    if not out:
      raise ValueError(f"{path}: no row with a positive score")
    return out

  train = Split([], [], pairs=[])
  for q, rel in qrels(train_split).items():
    for d in rel:
      train.texts.append(queries[q])
      train.pairs.append(texts[d])
      train.langs.append("und")

  def held_out(split: str) -> Split:
    rels = qrels(split)
    answers = np.array([max(rel, key=rel.get) for rel in rels.values()], np.int32)
    return Split([queries[q] for q in rels], ["und"] * len(rels), answers, relevance=list(rels.values()))

  dev = held_out(dev_split) if (root / "qrels" / f"{dev_split}.tsv").exists() else None
  return Task(name or root.name, "retrieval", train, held_out(test_split), candidates=tuple(texts), dev=dev)


# --------------------------------------------------------------------------------------------------------------
# Embedded CLDR tasks
# --------------------------------------------------------------------------------------------------------------

# Low-resource languages of the demo's decay phase (mmBERT's Faroese and Tigrinya among them), scored beside the
# high- and mid-resource ones.
LOW_RESOURCE = (
  "af",
  "am",
  "cy",
  "eu",
  "fo",
  "ga",
  "gl",
  "ha",
  "hy",
  "ig",
  "is",
  "ka",
  "km",
  "lb",
  "lo",
  "mn",
  "mt",
  "my",
  "ne",
  "si",
  "ti",
  "ur",
  "uz",
  "zu",
)


def cldr_languages() -> tuple[str, ...]:
  return demo_corpus.PRETRAIN + demo_corpus.MID_ADDED + LOW_RESOURCE


def _held_out(key: str, fraction: float) -> bool:
  """A fixed split by a hash of the entry."""
  return zlib.crc32(key.encode()) % 1000 < fraction * 1000


def _rng(lang: str, what: str) -> np.random.Generator:
  return np.random.default_rng([zlib.crc32(lang.encode()), zlib.crc32(what.encode())])


def _shuffled(words: list[str], valid: set[str], rng: np.random.Generator) -> str:
  """The words in a random order that is not one of the `valid` texts (the same names listed in any order)."""
  while True:
    text = " ".join(words[i] for i in rng.permutation(len(words)))
    if text not in valid:
      return text


def _order_rows(lang: str, loc, vocab, quota: int, held: bool, min_words: int) -> list[tuple[str, int]]:
  """`quota` (text, label) rows of one side of the fixed split, from their own random stream (so the test rows do not
  depend on the training quota): every other one shuffled (label 1)."""
  rng, rows, seen = _rng(lang, f"order-{'test' if held else 'train'}"), [], set()
  for _ in range(50 * quota):
    if len(rows) == quota:
      break
    names = vocab[list(vocab)[rng.integers(len(vocab))]]
    items = [names[i] for i in rng.choice(len(names), size=int(rng.integers(2, min(5, len(names) + 1))), replace=False)]
    text = lists.format_list(items, locale=loc)
    words = text.split()
    if len(words) < min_words or text in seen or _held_out(f"{lang}:{text}", 0.25) != held:
      continue
    seen.add(text)
    label = len(rows) % 2
    if label:  # shuffled words that do not again read as a list of these names
      valid = {lists.format_list(p, locale=loc) for p in itertools.permutations(items)}
      text = _shuffled(words, valid, _rng(lang, f"order-shuffle:{text}"))
    rows.append((text, label))
  return rows


def cldr_order(
  train_per_language: int = 24,
  test_per_language: int = 32,
  train_languages: Sequence[str] = (),
  min_words: int = 4,
  languages: Sequence[str] = (),
) -> Task:
  """Word order: is a list of localized names ("Kuwait, Japan und Timor-Leste") in its own order, or were its
  whitespace-separated words shuffled? Half of each language's texts are shuffled.

  Both classes have the same words, and the tokenizer splits at whitespace, so they have the same multiset of
  tokens: token identity carries no signal, and an encoder that pools token features order-blind scores chance.
  What decides is whether the encoder's states depend on where each word is (where the list's separators and each
  multi-word name's words belong), which masked-language-model pretraining teaches. Texts with fewer than
  `min_words` words are left out, so Chinese (names listed without spaces) is absent. With
  `train_languages`, the cross-lingual zero-shot variant: only those languages are trained on, and only the others
  are scored (the same test texts as without it). `languages`: only these (default: `cldr_languages()`)."""
  train, test = Split([], []), Split([], [])
  train_labels, test_labels = [], []
  for lang in languages or cldr_languages():
    loc, vocab = Locale.parse(lang), demo_corpus._vocabulary(lang)
    n_train = train_per_language if not train_languages or lang in train_languages else 0
    test_rows = _order_rows(lang, loc, vocab, test_per_language, True, min_words)
    if len(test_rows) < test_per_language:
      continue  # too few texts of `min_words` words: names listed without spaces
    if lang in train_languages:
      test_rows = []
    train_rows = _order_rows(lang, loc, vocab, n_train, False, min_words)
    for split, split_labels, rows in ((train, train_labels, train_rows), (test, test_labels, test_rows)):
      split.texts += [text for text, _ in rows]
      split.langs += [lang] * len(rows)
      split_labels += [label for _, label in rows]
  train.labels, test.labels = np.array(train_labels, np.int32), np.array(test_labels, np.int32)
  name = "cldr_order" if not train_languages else f"cldr_order_{'_'.join(train_languages)}"
  return Task(name, "classification", train, test, label_names=("original", "shuffled"))


def embedded(name: str) -> Task:
  if name == "cldr_order":
    return cldr_order()
  if name == "cldr_order_en":  # 960 English training texts: two thirds of cldr_order's in 59 languages
    return cldr_order(train_per_language=960, train_languages=("en",))
  raise ValueError(f"unknown embedded task {name!r}; expected one of {EMBEDDED}")
