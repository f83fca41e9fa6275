"""Downstream task data: classification and retrieval splits from local files, TFDS, or the embedded CLDR tasks.

A `Task` has a `train` and a `test` `Split` of raw texts (tokenized later by the model's own tokenizer):

  classification  texts (+ optional second texts, e.g. NLI hypotheses), integer labels into `label_names`
  retrieval       train: (query, positive) pairs; test: queries with the index of their answer in `candidates`

Files: JSONL (`.jsonl`, `.jsonl.gz`), parquet, TSV (header row), or `tfds:NAME[:SPLIT]` for a TFDS dataset already
prepared under `tfds_data_dir` (read with `tfds.data_source`: nothing is downloaded). Columns are named by a
`Columns`; a `lang` column (or one fixed language) lets results be reported per language.

Two embedded tasks need no download; they are built deterministically from the Unicode CLDR data in `babel`, like
the demo corpus (`data_pipeline.demo_corpus`):

  cldr_langid     language identification of short texts (lists of localized names) in 60 languages, 24 of them
                  low-resource with a third of the training examples
  cldr_retrieval  cross-lingual retrieval: a territory, language, month or weekday name in one of 59 languages is
                  the query, its English name is to be found among the English names of every held-out entry

Both are fixed (no seed): held-out entries are chosen by a hash of the entry itself, so no held-out retrieval target
or language-ID text is seen in training, and every run and every checkpoint scores the same test set.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from babel import Locale, lists

from data_pipeline import demo_corpus
from data_pipeline import filesystem as fs

KINDS = ("classification", "retrieval")
EMBEDDED = ("cldr_langid", "cldr_retrieval")


@dataclasses.dataclass
class Split:
  texts: list[str]
  langs: list[str]
  labels: np.ndarray | None = None  # class ids (classification) or candidate indices (retrieval test)
  pairs: list[str] | None = None  # second texts: sentence pairs (classification), positives (retrieval train)

  def __len__(self) -> int:
    return len(self.texts)

  def select(self, keep: np.ndarray) -> Split:
    idx = np.flatnonzero(keep)
    pick = lambda xs: None if xs is None else [xs[i] for i in idx]
    return Split(
      pick(self.texts), pick(self.langs), None if self.labels is None else self.labels[idx], pick(self.pairs)
    )


@dataclasses.dataclass
class Task:
  name: str
  kind: str  # classification | retrieval
  train: Split
  test: Split
  label_names: tuple[str, ...] = ()  # classification
  candidates: tuple[str, ...] = ()  # retrieval: every test query's answer is one of these

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
  if rows and key not in rows[0]:
    raise ValueError(f"{where}: no column {key!r} (have: {', '.join(map(str, rows[0]))})")
  return [_as_str(r[key]) for r in rows]


def _label_order(values: Iterable[str]) -> tuple[str, ...]:
  """Sorted label names; numerically when every label is an integer (so 10 follows 9)."""
  values = set(values)
  try:
    return tuple(sorted(values, key=int))
  except ValueError:
    return tuple(sorted(values))


def from_files(
  kind: str, train: str, test: str, columns: Columns = Columns(), *, name: str = "", tfds_data_dir: str | None = None
) -> Task:
  """A task from two files (or TFDS splits): classification rows (text[, pair], label[, lang]) or retrieval
  pairs (text = query, pair = its positive[, lang]); test candidates are the distinct test positives."""
  if kind not in KINDS:
    raise ValueError(f"task kind {kind!r} is not one of {KINDS}")
  if kind == "retrieval" and not columns.pair:
    raise ValueError("a retrieval task needs the column of the positive text (pair column, e.g. --pair_key)")
  splits = {}
  for split, path in (("train", train), ("test", test)):
    rows = read_records(path, tfds_data_dir)
    if not rows:
      raise ValueError(f"{path}: no rows")
    texts = _column(rows, columns.text, path)
    langs = _column(rows, columns.lang, path) if columns.lang else [columns.default_lang] * len(rows)
    pairs = _column(rows, columns.pair, path) if columns.pair else None
    labels = _column(rows, columns.label, path) if kind == "classification" else None
    splits[split] = (texts, langs, pairs, labels)
  name = name or train.rstrip("/").rsplit("/", 1)[-1]
  if kind == "classification":
    label_names = _label_order(splits["train"][3])
    index = {n: i for i, n in enumerate(label_names)}
    unseen = sorted(set(splits["test"][3]) - set(index))
    if unseen:
      raise ValueError(f"{test}: labels {unseen[:5]} do not occur in the training data {train}")
    mk = lambda t, l, p, y: Split(t, l, np.array([index[v] for v in y], np.int32), p)
    return Task(name, kind, mk(*splits["train"]), mk(*splits["test"]), label_names=label_names)
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


# --------------------------------------------------------------------------------------------------------------
# Embedded CLDR tasks
# --------------------------------------------------------------------------------------------------------------

# Low-resource languages of the demo's decay phase (mmBERT's Faroese and Tigrinya among them).
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


def _name_list(loc, vocab: dict[str, tuple[str, ...]], rng: np.random.Generator) -> str:
  """Two to four localized names of one kind (languages, territories, currencies, months, …) in the locale's own
  list pattern ("A, B und C"). Only names: babel's date and number formats can change with the locales loaded
  before them in the process, which would make the task depend on what ran first."""
  names = vocab[list(vocab)[rng.integers(len(vocab))]]
  items = [names[i] for i in rng.choice(len(names), size=int(rng.integers(2, min(5, len(names) + 1))), replace=False)]
  return lists.format_list(items, locale=loc)


def cldr_langid(train_per_language: int = 24, test_per_language: int = 8, low_resource_fraction: float = 1 / 3) -> Task:
  """Language identification of short texts; labels are CLDR language codes."""
  languages = cldr_languages()
  train, test = Split([], []), Split([], [])
  train_labels, test_labels = [], []
  for label, lang in enumerate(languages):
    loc, vocab = Locale.parse(lang), demo_corpus._vocabulary(lang)
    n_train = train_per_language
    if lang in LOW_RESOURCE:
      n_train = max(2, round(train_per_language * low_resource_fraction))
    rng = _rng(lang, "langid")
    seen: set[str] = set()
    train_texts: list[str] = []
    test_texts: list[str] = []
    for _ in range(50 * (n_train + test_per_language)):
      if len(train_texts) == n_train and len(test_texts) == test_per_language:
        break
      text = _name_list(loc, vocab, rng)
      if text in seen:
        continue
      seen.add(text)
      # The hash decides the split, so a held-out text is never a training text, whatever the quotas.
      chosen, quota = (test_texts, test_per_language) if _held_out(f"{lang}:{text}", 0.25) else (train_texts, n_train)
      if len(chosen) < quota:
        chosen.append(text)
    for split, split_labels, chosen in ((train, train_labels, train_texts), (test, test_labels, test_texts)):
      split.texts += chosen
      split.langs += [lang] * len(chosen)
      split_labels += [label] * len(chosen)
  train.labels, test.labels = np.array(train_labels, np.int32), np.array(test_labels, np.int32)
  return Task("cldr_langid", "classification", train, test, label_names=languages)


def _cldr_names(lang: str) -> dict[str, str]:
  """{entry key: localized name} for territories, languages, months and weekdays."""
  loc = Locale.parse(lang)
  names = {f"territory:{k}": v for k, v in loc.territories.items()}
  names |= {f"language:{k}": v for k, v in loc.languages.items()}
  names |= {f"month:{k}": v for k, v in loc.months["format"]["wide"].items()}
  names |= {f"day:{k}": v for k, v in loc.days["format"]["wide"].items()}
  return names


def cldr_retrieval(train_per_language: int = 16, test_per_language: int = 8, test_fraction: float = 0.2) -> Task:
  """Query: an entry's name in one language; answer: the entry's English name among all held-out English names.
  Names spelled exactly as in English are left out (they would be found by string identity)."""
  english = _cldr_names("en")
  counts: dict[str, int] = {}
  for name in english.values():
    counts[name] = counts.get(name, 0) + 1
  english = {k: v for k, v in english.items() if counts[v] == 1}  # one answer per query
  test_keys = sorted(k for k in english if _held_out(k, test_fraction))
  candidates = tuple(english[k] for k in test_keys)
  answer = {k: i for i, k in enumerate(test_keys)}
  train = Split([], [], pairs=[])
  test = Split([], [])
  test_answers = []
  for lang in cldr_languages():
    if lang == "en":
      continue
    names = _cldr_names(lang)
    usable = sorted(k for k in english if k in names and names[k] != english[k])
    held = [k for k in usable if k in answer]
    seen = [k for k in usable if k not in answer]
    for k in _rng(lang, "retrieval-train").permutation(np.array(seen, dtype=object))[:train_per_language]:
      train.texts.append(names[k])
      train.pairs.append(english[k])
      train.langs.append(lang)
    for k in _rng(lang, "retrieval-test").permutation(np.array(held, dtype=object))[:test_per_language]:
      test.texts.append(names[k])
      test.langs.append(lang)
      test_answers.append(answer[k])
  test.labels = np.array(test_answers, np.int32)
  return Task("cldr_retrieval", "retrieval", train, test, candidates=candidates)


def embedded(name: str) -> Task:
  if name == "cldr_langid":
    return cldr_langid()
  if name == "cldr_retrieval":
    return cldr_retrieval()
  raise ValueError(f"unknown embedded task {name!r}; expected one of {EMBEDDED}")
