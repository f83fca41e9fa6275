"""Tokenize raw multilingual text into per-language ArrayRecord shards, a held-out eval split and stats.json.

Inputs (one per run; many runs, each named by its own --source id, can fill one --output_dir):

  --parquet_dir DIR  FineWeb2 layout: DIR/<lang>_<Script>/train/*.parquet with a --text_key column (`text`);
                     FineWeb2's `<lang>_<Script>_removed` subsets (filtered-out documents) only with
                     --include_removed; or, with --lang, DIR/**/*.parquet of one language
  --jsonl F [F ...]  JSON lines with `text` and `lang` (.jsonl or .jsonl.gz; --lang: one language for all)
  --text_dir DIR     DIR/<lang>.txt or DIR/<lang>/*.txt; a document per line (or per paragraph / per file)
  --tfds NAME        a TFDS dataset prepared locally (read with `tfds.data_source`, no TensorFlow needed)

A unit of work is a piece of an input file of about --unit_mb of input: consecutive parquet row groups, or a byte
range of a JSONL / text file holding the lines that start in it (gzip files, and text split by paragraph or file,
are whole; for TFDS: a range of records). It is tokenized by one worker process and named `<source>-<file path
below the input root>` (escaped so that different paths never give one name), with `@rg<first row group>` or
`@b<first byte>` when the file has several units. A document becomes `<bos> tokens <eos>`; longer than --max_len it
is split into several such sequences. Per language, every --eval_every-th document of a unit goes to the eval split
until the unit's share of --eval_documents is reached (so eval never takes more than 1/eval_every of a small
language, and the split is the same whoever runs the unit: `data_pipeline.prepare_beam` writes the same files).
Output, under --output_dir:

  <lang>/train/<unit>.array_record   one record per sequence: int32 token ids, little-endian, in chunks of
  <lang>/eval/<unit>.array_record    WRITER_OPTIONS' group_size records (a small index per open file)
  _units/<unit>.json                 counts of a finished unit
  _sources/<source>.json             the input a source id stands for; another input under that id is refused
  prepare.json                       the settings; a re-run with other settings is refused
  stats.json                         documents, sequences and tokens per language and split, shard list (each
                                     shard with its source), and per source its languages and tokens

Shards are written under a temporary name and renamed when complete, then the unit's record is written. A re-run
skips finished units and redoes the rest, so an interrupted run never leaves a shard that reads as complete.
--output_dir may be gs://bucket/...: a unit's shards are written to a local folder and uploaded when complete,
then its record; stats.json comes last. Inputs (and --tokenizer) may be in a bucket too, except TFDS datasets,
which `tfds.data_source` reads through its own --tfds_data_dir.
stats.json is rebuilt from every finished unit in --output_dir (all sources) at the end of each run; the training
pipeline reads only shards listed there. --shard_index i --num_shards n makes this run take every n-th unit from
the i-th on, so n machines (or jobs) can share one source and one --output_dir; rerun any one of them (it then has
nothing left to do) to rebuild stats.json after they have all finished.

  python -m data_pipeline.prepare --tokenizer spm.model --output_dir data/ --source fineweb2 \\
      --parquet_dir fineweb2/data --max_len 8192 --num_workers 16 --shard_index 0 --num_shards 8
  python -m data_pipeline.prepare --tokenizer spm.model --output_dir data/ --source starcoder \\
      --parquet_dir starcoder/ --text_key content --lang code --max_len 8192
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import fnmatch
import glob
import gzip
import json
import math
import multiprocessing
import os
import re
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
import tqdm
from array_record.python.array_record_module import ArrayRecordWriter

from data_pipeline import cli, mixture
from data_pipeline import filesystem as fs
from data_pipeline import tokenizer as tokenizer_lib

FORMAT_VERSION = 2
TOKEN_DTYPE = np.dtype("<i4")
# 32 records per chunk: an open reader holds one index entry per chunk (measured: 0.65 bytes per document of an
# open shard, against 11.6 with one record per chunk), and reading a record decodes its whole chunk, which,
# uncompressed, measured no slower than reading a one-record chunk.
WRITER_OPTIONS = "group_size:32,uncompressed"
_LANG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")
_SOURCE_RE = re.compile(r"^[A-Za-z0-9_]+$")
_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.\-]")


@dataclasses.dataclass(frozen=True)
class Source:
  """Where the raw text is and how to read it (see the module docstring for the four formats)."""

  format: str  # parquet | jsonl | text | tfds
  path: str = ""  # parquet root, text dir or TFDS dataset name
  id: str = ""  # names this input in unit names and stats.json ("": the format)
  files: tuple[str, ...] = ()  # jsonl files
  text_split: str = "line"  # text: a document per line | paragraph (blank-line separated) | file
  text_key: str = "text"  # parquet / jsonl / tfds text field
  lang_key: str = "lang"
  lang: str | None = None  # one fixed language for every document (parquet, jsonl, tfds)
  include_removed: bool = False  # parquet: also FineWeb2's <lang>_<Script>_removed subsets
  tfds_data_dir: str | None = None
  tfds_split: str = "train"
  tfds_unit_size: int = 100_000  # records per unit of work

  def __post_init__(self):
    if self.format not in ("parquet", "jsonl", "text", "tfds"):
      raise ValueError(f"unknown input format {self.format!r}; use parquet, jsonl, text or tfds")
    if self.text_split not in ("line", "paragraph", "file"):
      raise ValueError(f"text_split must be line, paragraph or file, got {self.text_split!r}")
    if not _SOURCE_RE.match(self.name):
      raise ValueError(f"source id {self.name!r} must be letters, digits and '_'")
    if self.lang is not None:
      check_language_name(self.lang, "--lang")

  @property
  def name(self) -> str:
    return self.id or self.format

  def describe(self) -> dict:
    """What the source id stands for (recorded in _sources/<id>.json)."""
    path = os.fspath(fs.path(self.path, f"--{self.format}")) if self.path and self.format != "tfds" else self.path
    return {
      "format": self.format,
      "path": path,
      "files": [os.fspath(fs.path(f, "--jsonl")) for f in self.files],
      "lang": self.lang,
      "text_key": self.text_key,
    }


@dataclasses.dataclass(frozen=True)
class Settings:
  """What shapes the output; recorded in prepare.json and compared on re-runs."""

  tokenizer: str
  max_len: int = 8192  # longest stored sequence, <bos> and <eos> included
  min_tokens: int = 1  # drop sequences with fewer text tokens
  eval_documents: int = 1000  # held-out documents per language …
  eval_every: int = 10  # … taken as every eval_every-th document, so at most 1/eval_every
  unit_mb: float = 256  # input per unit of work: parquet row groups grouped, JSONL / text cut at line starts

  def __post_init__(self):
    if not self.unit_mb > 0:
      raise ValueError(f"unit_mb must be positive, got {self.unit_mb}")
    if self.max_len < 3:
      raise ValueError(f"max_len must be at least 3 (<bos> token <eos>), got {self.max_len}")
    if self.eval_every < 2:
      raise ValueError(f"eval_every must be at least 2 (1 would hold out everything), got {self.eval_every}")


@dataclasses.dataclass(frozen=True)
class Unit:
  """A piece of one input file (or a TFDS record range), tokenized by one worker into its own shards."""

  name: str
  path: str
  lang: str | None  # None: each record names its language
  # [start, stop): TFDS records, parquet row groups, or bytes of a JSONL / text file; (0, 0): the whole file
  start: int = 0
  stop: int = 0
  eval_quota: int = 0  # eval documents per language this unit contributes


def check_language_name(lang: str, where: str) -> str:
  if not isinstance(lang, str) or not _LANG_RE.match(lang):
    raise ValueError(f"{where}: language {lang!r} is not a usable name (letters, digits, '_' and '-')")
  return lang


def _safe_name(relpath: str) -> str:
  """A file name for a relative path, different for different paths: directories joined by '+', any other
  character outside [A-Za-z0-9_.-] written as '=' and 6 hex digits."""
  return "+".join(_NAME_CHARS.sub(lambda m: f"={ord(m.group()):06x}", part) for part in relpath.split(os.sep))


# ----------------------------------------------------------------------------------------------------------------
# Listing and reading inputs
# ----------------------------------------------------------------------------------------------------------------


def _glob(root: str, *patterns: str) -> list[str]:
  """Sorted files under `root` (local or gs://) matching any of `patterns` (`**` only as a whole component)."""
  if fs.is_remote(root):
    base, found = fs.path(root, "input"), set()
    for pattern in patterns:
      if pattern.startswith("**/"):  # epath refuses `**` in a bucket: walk it
        plain = os.fspath(base)[len("gs://") :]
        for folder, _, names in base.walk():  # folders come as bucket/path, without the scheme
          below = os.fspath(folder).removeprefix("gs://")[len(plain) :].strip("/")
          found |= {
            os.fspath(base / below / name if below else base / name) for name in fnmatch.filter(names, pattern[3:])
          }
      else:
        found |= {os.fspath(p) for p in base.glob(pattern)}
    return sorted(found)
  # local-only: glob.glob lists local files (escape keeps brackets in folder names literal)
  return sorted({f for pattern in patterns for f in glob.glob(f"{glob.escape(root)}/{pattern}", recursive=True)})


def _relpath(f: str, root: str) -> str:
  if fs.is_remote(root):
    return f[len(root.rstrip("/")) + 1 :]
  return os.path.relpath(f, root)  # local-only: both are local paths here


def list_units(source: Source, settings: Settings, languages: Sequence[str] | None = None) -> list[Unit]:
  """The units of work of `source`, sorted, restricted to `languages` where files carry one language."""
  prefix = source.name + "-"
  if source.format in ("parquet", "text"):
    fs.path(source.path, f"--{source.format}_dir")  # an unusable scheme is an error naming the flag
  if source.format == "parquet":
    if source.lang:
      files = _glob(source.path, "**/*.parquet")
      per_file = [(source.lang, f) for f in files]
    else:
      files = _glob(source.path, "*/train/*.parquet")
      per_file = [(_relpath(f, source.path).split("/")[0], f) for f in files]
      if not source.include_removed:  # FineWeb2's filtered-out documents of each language
        per_file = [(lang, f) for lang, f in per_file if not lang.endswith("_removed")]
    if not per_file:
      raise FileNotFoundError(
        f"no {'*.parquet' if source.lang else '<lang>_<Script>/train/*.parquet'} files under {source.path}"
      )
  elif source.format == "text":
    files = _glob(source.path, "*.txt", "*.txt.gz", "*/*.txt", "*/*.txt.gz")
    if not files:
      raise FileNotFoundError(f"no <lang>.txt or <lang>/*.txt files under {source.path}")
    per_file = []
    for f in files:
      rel = _relpath(f, source.path)
      lang = rel.split(os.sep)[0] if os.sep in rel else re.sub(r"\.txt(\.gz)?$", "", rel)
      per_file.append((lang, f))
  elif source.format == "jsonl":
    if not source.files:
      raise ValueError("jsonl input needs at least one file")
    missing = [f for f in source.files if not fs.path(f, "--jsonl").is_file()]
    if missing:
      raise FileNotFoundError(f"jsonl input files do not exist: {', '.join(missing)}")
    files = sorted(source.files)
    pieces = _pieces(source, settings, files)
    quota = math.ceil(settings.eval_documents / sum(map(len, pieces)))
    return [
      Unit(f"{prefix}{i:05d}-{_safe_name(f.rsplit('/', 1)[-1])}{suffix}", f, source.lang, a, b, eval_quota=quota)
      for i, (f, file_pieces) in enumerate(zip(files, pieces))
      for a, b, suffix in file_pieces
    ]
  else:  # tfds
    n = len(_tfds_source(source))
    if n == 0:
      raise ValueError(f"TFDS dataset {source.path} split {source.tfds_split} has no records")
    starts = range(0, n, source.tfds_unit_size)
    quota = math.ceil(settings.eval_documents / len(starts))
    return [
      Unit(
        f"{prefix}{_safe_name(source.tfds_split)}-{s:012d}",
        source.path,
        source.lang,
        s,
        min(s + source.tfds_unit_size, n),
        eval_quota=quota,
      )
      for s in starts
    ]

  for lang, f in per_file:
    check_language_name(lang, f)
  if languages:
    found = sorted({lang for lang, _ in per_file})
    # exact names, or a bare code for its one <code>_<Script> variant
    want = set(mixture.resolve_languages(list(languages), found, "languages", source.path))
    per_file = [(lang, f) for lang, f in per_file if lang in want]
  pieces = _pieces(source, settings, [f for _, f in per_file])
  pieces_per_lang: dict[str, int] = {}
  for (lang, _), file_pieces in zip(per_file, pieces):
    pieces_per_lang[lang] = pieces_per_lang.get(lang, 0) + len(file_pieces)
  return [
    Unit(
      prefix + _safe_name(_relpath(f, source.path)) + suffix,
      f,
      lang,
      a,
      b,
      eval_quota=math.ceil(settings.eval_documents / pieces_per_lang[lang]),
    )
    for (lang, f), file_pieces in zip(per_file, pieces)
    for a, b, suffix in file_pieces
  ]


@contextlib.contextmanager
def _parquet_file(path: str):
  import pyarrow as pa
  import pyarrow.parquet as pq

  with fs.path(path, "input").open("rb") as raw:
    try:
      f = pq.ParquetFile(raw)
    except (pa.ArrowException, OSError) as e:
      raise ValueError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    yield f


def _file_pieces(source: Source, settings: Settings, path: str) -> list[tuple[int, int, str]]:
  """(start, stop, unit name suffix) of the units `path` is cut into: consecutive parquet row groups of about
  unit_mb (uncompressed), or byte ranges of unit_mb of a JSONL / text file, each owning the lines that start in
  it. Gzip files, text split by paragraph or file, and files of one unit are whole: (0, 0, "")."""
  limit = settings.unit_mb * 2**20
  if source.format == "parquet":
    with _parquet_file(path) as f:
      sizes = [f.metadata.row_group(i).total_byte_size for i in range(f.metadata.num_row_groups)]
    bounds, first, size = [], 0, 0
    for i, n in enumerate(sizes):
      size += n
      if size >= limit or i == len(sizes) - 1:
        bounds.append((first, i + 1))
        first, size = i + 1, 0
    return [(a, b, f"@rg{a:06d}") for a, b in bounds] if len(bounds) > 1 else [(0, 0, "")]
  if path.endswith(".gz") or (source.format == "text" and source.text_split != "line"):
    return [(0, 0, "")]
  size, step = fs.path(path, "input").stat().length, max(1, int(limit))
  if size <= step:
    return [(0, 0, "")]
  return [(a, min(a + step, size), f"@b{a:013d}") for a in range(0, size, step)]


def _pieces(source: Source, settings: Settings, files: Sequence[str]) -> list[list[tuple[int, int, str]]]:
  """_file_pieces of every file (parquet footers read on 32 threads: a bucket holds ~10⁴ files)."""
  with concurrent.futures.ThreadPoolExecutor(32) as pool:
    return list(pool.map(lambda f: _file_pieces(source, settings, f), files))


def _lines(path: str, start: int = 0, stop: int = 0) -> Iterator[tuple[str, str]]:
  """(where, line) of a UTF-8 text file, plain or gzipped, `where` being the line number (or, in a unit that
  starts inside the file, the line's byte offset); bad UTF-8 or gzip data is an error naming it. With stop > 0,
  the lines that start in the byte range [start, stop) (a line that crosses `stop` is read whole). Lines are
  decoded one by one (not in blocks) so that the position is exact."""
  lineno, pos = 0, start
  where = lambda: str(lineno) if start == 0 else f"byte {pos}"
  try:
    with (
      fs.path(path, "input").open("rb") as raw_file,
      gzip.GzipFile(fileobj=raw_file) if path.endswith(".gz") else raw_file as f,
    ):
      if start > 0:  # the line that crosses `start` belongs to the unit before
        f.seek(start - 1)
        pos = start - 1 + len(f.readline())
      while not stop or pos < stop:
        raw = f.readline()
        if not raw:
          break
        lineno += 1
        line = raw.decode("utf-8")
        yield where(), line[:-2] + "\n" if line.endswith("\r\n") else line
        pos += len(raw)
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}:{where()}: not valid UTF-8 ({e.reason} at byte {e.start} of the line)") from None
  except (gzip.BadGzipFile, EOFError, zlib.error) as e:
    lineno += 1
    raise ValueError(f"{path}:{where()}: not a valid gzip file ({e})") from None


def _tfds_source(source: Source):
  import tensorflow_datasets as tfds  # slow import: only for this format

  try:
    return tfds.data_source(source.path, data_dir=source.tfds_data_dir, split=source.tfds_split)
  except Exception as e:  # tfds raises several types for a dataset that is not there
    raise ValueError(
      f"cannot open TFDS dataset {source.path!r} (data_dir={source.tfds_data_dir}, "
      f"split={source.tfds_split}): {e}".splitlines()[0]
    ) from None


def _as_str(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _read_parquet(unit: Unit, source: Source, batch: int) -> Iterator[list[tuple[str, str]]]:
  import pyarrow as pa

  with _parquet_file(unit.path) as f:
    names = f.schema_arrow.names
    if source.text_key not in names:
      raise ValueError(
        f"{unit.path}: no `{source.text_key}` column (columns: {', '.join(names)}); choose one with --text_key"
      )
    kind = f.schema_arrow.field(source.text_key).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
      raise ValueError(f"{unit.path}: column `{source.text_key}` holds {kind}, not text")
    groups = range(unit.start, unit.stop) if unit.stop else range(f.metadata.num_row_groups)
    row = sum(f.metadata.row_group(i).num_rows for i in range(groups.start))
    batches = f.iter_batches(batch_size=batch, row_groups=list(groups), columns=[source.text_key])
    while True:
      try:
        record_batch = next(batches)
      except StopIteration:
        return
      except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{unit.path}: rows from {row} on cannot be read ({str(e).splitlines()[0]})") from None
      texts = record_batch.column(0).to_pylist()
      row += len(texts)
      yield [(unit.lang, t) for t in texts if t]


def read_unit(unit: Unit, source: Source, batch: int = 256) -> Iterator[list[tuple[str, str]]]:
  """Yields lists of (language, text) from one unit, in file order."""
  if source.format == "parquet":
    yield from _read_parquet(unit, source, batch)
    return
  out: list[tuple[str, str]] = []

  def emit(lang, text):
    out.append((lang, text))
    return len(out) >= batch

  if source.format == "jsonl":
    for lineno, line in _lines(unit.path, unit.start, unit.stop):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{unit.path}:{lineno}: not valid JSON ({e})") from None
      keys = (source.text_key,) + (() if unit.lang else (source.lang_key,))
      if not isinstance(record, dict) or any(k not in record for k in keys):
        raise ValueError(
          f"{unit.path}:{lineno}: expected an object with {' and '.join(map(repr, keys))} key"
          f"{'s' if len(keys) > 1 else ''}"
        )
      lang = unit.lang or check_language_name(record[source.lang_key], f"{unit.path}:{lineno}")
      if not isinstance(record[source.text_key], str):
        raise ValueError(f"{unit.path}:{lineno}: {source.text_key!r} is not a string")
      if emit(lang, record[source.text_key]):
        yield out
        out = []
  elif source.format == "text":
    if source.text_split == "file":
      emit(unit.lang, "".join(line for _, line in _lines(unit.path)))
    elif source.text_split == "line":
      for _, line in _lines(unit.path, unit.start, unit.stop):
        if emit(unit.lang, line.rstrip("\n")):
          yield out
          out = []
    else:
      para: list[str] = []
      for _, line in _lines(unit.path):
        if line.strip():
          para.append(line.rstrip("\n"))
        elif para:
          if emit(unit.lang, "\n".join(para)):
            yield out
            out = []
          para = []
      if para:
        emit(unit.lang, "\n".join(para))
  else:  # tfds
    ds = _tfds_source(source)
    for start in range(unit.start, unit.stop, batch):
      idx = list(range(start, min(start + batch, unit.stop)))
      records = ds.__getitems__(idx)
      for i, record in zip(idx, records):
        if source.text_key not in record:
          raise ValueError(
            f"TFDS {source.path} record {i}: no {source.text_key!r} feature (features: {', '.join(record)})"
          )
        if unit.lang is not None:
          lang = unit.lang
        elif source.lang_key in record:
          lang = check_language_name(_as_str(record[source.lang_key]), f"TFDS {source.path} record {i}")
        else:
          raise ValueError(
            f"TFDS {source.path} record {i}: no {source.lang_key!r} feature; pass --lang for a single-language dataset"
          )
        try:
          out.append((lang, _as_str(record[source.text_key])))
        except UnicodeDecodeError as e:
          raise ValueError(f"TFDS {source.path} record {i}: text is not valid UTF-8 ({e.reason})") from None
      yield out
      out = []
  if out:
    yield out


# ----------------------------------------------------------------------------------------------------------------
# Tokenizing one unit
# ----------------------------------------------------------------------------------------------------------------


def split_document(ids: Sequence[int], max_len: int, bos: int, eos: int, min_tokens: int = 1) -> list[np.ndarray]:
  """`<bos> ids <eos>`, cut into sequences of at most max_len tokens, each with its own <bos> and <eos>."""
  body = max_len - 2
  ids = np.asarray(ids, TOKEN_DTYPE)
  out = []
  for start in range(0, len(ids), body):
    piece = ids[start : start + body]
    if len(piece) >= min_tokens:
      out.append(np.concatenate([[bos], piece, [eos]]).astype(TOKEN_DTYPE))
  return out


_TOKENIZERS: dict[str, tokenizer_lib.Tokenizer] = {}


def _tokenizer(path: str) -> tokenizer_lib.Tokenizer:
  if path not in _TOKENIZERS:
    _TOKENIZERS[path] = tokenizer_lib.load_tokenizer(path)
  return _TOKENIZERS[path]


class _ShardWriter:
  """An ArrayRecord file written under a temporary name and renamed to its final name on `commit` (a local path:
  for a bucket, `process_unit` writes into a local folder that it uploads)."""

  def __init__(self, path: str):
    # local-only: ArrayRecord writes local files; stale temporaries are left by an interrupted run of this unit
    os.makedirs(os.path.dirname(path), exist_ok=True)
    for stale in glob.glob(glob.escape(path) + ".tmp-*"):  # local-only: as above
      os.remove(stale)  # local-only: as above
    self.path, self.tmp = path, f"{path}.tmp-{os.getpid()}"
    self._writer = ArrayRecordWriter(self.tmp, WRITER_OPTIONS)
    self.documents = self.sequences = self.tokens = 0

  def write(self, seq: np.ndarray):
    self._writer.write(seq.tobytes())
    self.sequences += 1
    self.tokens += len(seq)

  def commit(self) -> dict:
    self._writer.close()
    os.replace(self.tmp, self.path)  # local-only: within the local stage folder
    return {"documents": self.documents, "sequences": self.sequences, "tokens": self.tokens}


def _atomic_write_json(path: str | os.PathLike, obj) -> None:
  fs.write_text(fs.path(path), json.dumps(obj, indent=1, sort_keys=True))


def _read_json(path: fs.Path):
  return json.loads(path.read_text())


def _unit_record_path(output_dir: fs.Path, unit: Unit) -> fs.Path:
  return output_dir / "_units" / (unit.name + ".json")


class _UnitWriter:
  """Splits a unit's tokenized documents into sequences and routes them to the train or eval shard of their
  language (every eval_every-th document of a language, until the unit's eval quota is met)."""

  def __init__(self, unit: Unit, settings: Settings, output_dir: str, bos: int, eos: int):
    self.unit, self.settings, self.output_dir, self.bos, self.eos = unit, settings, output_dir, bos, eos
    self.writers: dict[tuple[str, str], _ShardWriter] = {}
    self.seen: dict[str, int] = {}
    self.held_out: dict[str, int] = {}

  def add(self, lang: str, token_ids: Sequence[int]) -> None:
    seqs = split_document(token_ids, self.settings.max_len, self.bos, self.eos, self.settings.min_tokens)
    if not seqs:
      return
    i = self.seen.get(lang, 0)
    self.seen[lang] = i + 1
    split = "train"
    every = self.settings.eval_every
    if i % every == every - 1 and self.held_out.get(lang, 0) < self.unit.eval_quota:
      split = "eval"
      self.held_out[lang] = self.held_out.get(lang, 0) + 1
    key = (lang, split)
    if key not in self.writers:
      # local-only: the unit's local stage folder (process_unit uploads it to a bucket)
      path = os.path.join(self.output_dir, lang, split, self.unit.name + ".array_record")
      self.writers[key] = _ShardWriter(path)
    self.writers[key].documents += 1
    for seq in seqs:
      self.writers[key].write(seq)

  def commit(self, source: str) -> dict:
    """Renames the finished shards into place and returns the unit's record (written by the caller once the
    shards are where readers look for them)."""
    record: dict = {"unit": self.unit.name, "source": source, "languages": {}}
    for (lang, split), w in sorted(self.writers.items()):
      counts = w.commit()
      counts["path"] = os.path.relpath(w.path, self.output_dir)  # local-only: both inside the local stage folder
      record["languages"].setdefault(lang, {})[split] = counts
    return record


def _write_unit(
  unit: Unit,
  settings: Settings,
  output_dir: str | os.PathLike,
  bos: int,
  eos: int,
  source: str,
  documents: Iterable[tuple[str, Sequence[int]]],
) -> dict:
  """Writes a unit's shards (for a bucket: into a local folder, uploaded when complete), then its record."""
  out = fs.path(output_dir, "--output_dir")
  with fs.staged_dir(out) as stage:
    writer = _UnitWriter(unit, settings, stage, bos, eos)
    for lang, token_ids in documents:
      writer.add(lang, token_ids)
    record = writer.commit(source)
  (out / "_units").mkdir(parents=True, exist_ok=True)
  _atomic_write_json(_unit_record_path(out, unit), record)
  return record


def process_unit(
  unit: Unit, source: Source, settings: Settings, output_dir: str, languages: Sequence[str] | None = None
) -> dict:
  """Tokenizes one unit into `<lang>/{train,eval}/<unit>.array_record` and records its counts."""
  tok = _tokenizer(settings.tokenizer)
  ids = tok.special_ids()
  want = set(languages) if languages and unit.lang is None else None  # files of one language: chosen already

  def documents():
    for batch in read_unit(unit, source):
      batch = [(lang, text) for lang, text in batch if text and text.strip() and (want is None or lang in want)]
      if batch:
        yield from zip((lang for lang, _ in batch), tok.encode([text for _, text in batch]))

  return _write_unit(unit, settings, output_dir, ids["bos"], ids["eos"], source.name, documents())


def _process_task(task) -> dict:
  return process_unit(*task)


# ----------------------------------------------------------------------------------------------------------------
# The whole run
# ----------------------------------------------------------------------------------------------------------------


def _check_settings(output_dir: fs.Path, settings: Settings, tok: tokenizer_lib.Tokenizer) -> None:
  path = output_dir / "prepare.json"
  current = {
    "format": FORMAT_VERSION,
    "tokenizer_sha256": tok.sha256,
    "max_len": settings.max_len,
    "min_tokens": settings.min_tokens,
    "eval_documents": settings.eval_documents,
    "eval_every": settings.eval_every,
    "unit_mb": settings.unit_mb,
  }
  if path.exists():
    before = _read_json(path)
    diff = [f"{k} {before.get(k)!r} → {v!r}" for k, v in current.items() if before.get(k) != v]
    if diff:
      raise ValueError(f"{output_dir} was prepared with other settings ({'; '.join(diff)}); use a new --output_dir")
  else:
    _atomic_write_json(path, current)


def _check_source(output_dir: fs.Path, source: Source) -> None:
  """One source id stands for one input in an output directory."""
  path = output_dir / "_sources" / (source.name + ".json")
  if path.exists():
    before = _read_json(path)
    if before != source.describe():
      raise ValueError(
        f"source id {source.name!r} already names another input in {output_dir} "
        f"({before['format']} {before['path'] or ', '.join(before['files'])}); give this input "
        "its own --source id"
      )
  else:
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_json(path, source.describe())


def _unit_names(output_dir: fs.Path) -> list[str]:
  units = output_dir / "_units"
  return sorted(p.name for p in units.iterdir() if p.name.endswith(".json")) if units.exists() else []


def finished_units(
  output_dir: str | os.PathLike, known: Mapping[str, dict] | None = None, names: Sequence[str] | None = None
) -> list[dict]:
  """The records of every finished unit in `output_dir` (local or gs://), of all sources, by unit name. Records in
  `known` (by unit name) are not read again; the others are read on 32 threads (a bucket holds ~10⁴ of them)."""
  out = fs.path(output_dir, "--output_dir")
  names = _unit_names(out) if names is None else names
  known = known or {}
  missing = [n for n in names if n.removesuffix(".json") not in known]
  with concurrent.futures.ThreadPoolExecutor(32) as pool:
    read = dict(zip(missing, pool.map(lambda n: _read_json(out / "_units" / n), missing)))
  return [known[n.removesuffix(".json")] if n not in read else read[n] for n in names]


class StatsAccumulator:
  """stats.json content, summed over units' records in any order and merged (a Beam CombineFn's accumulator)."""

  def __init__(self):
    self.langs: dict[str, dict] = {}
    self.sources: dict[str, dict] = {}

  def add(self, record: dict) -> StatsAccumulator:
    source = record.get("source", "")
    src = self.sources.setdefault(source, {"units": 0, "languages": set(), "documents": 0, "tokens": 0})
    src["units"] += 1
    for lang, splits in record["languages"].items():
      src["languages"].add(lang)
      entry = self._lang(lang)
      for split, counts in splits.items():
        e = entry[split]
        for k in ("documents", "sequences", "tokens"):
          e[k] += counts[k]
        e["shards"].append(
          {"path": counts["path"], "sequences": counts["sequences"], "tokens": counts["tokens"], "source": source}
        )
        if split == "train":
          src["documents"] += counts["documents"]
          src["tokens"] += counts["tokens"]
    return self

  def _lang(self, lang: str) -> dict:
    return self.langs.setdefault(
      lang, {s: {"documents": 0, "sequences": 0, "tokens": 0, "shards": []} for s in ("train", "eval")}
    )

  def merge(self, other: StatsAccumulator) -> StatsAccumulator:
    for source, o in other.sources.items():
      src = self.sources.setdefault(source, {"units": 0, "languages": set(), "documents": 0, "tokens": 0})
      src["languages"] |= o["languages"]
      for k in ("units", "documents", "tokens"):
        src[k] += o[k]
    for lang, entry in other.langs.items():
      mine = self._lang(lang)
      for split, e in entry.items():
        for k in ("documents", "sequences", "tokens"):
          mine[split][k] += e[k]
        mine[split]["shards"] += e["shards"]
    return self

  def result(self, tokenizer_info: dict, settings: Settings) -> dict:
    langs, sources = self.langs, self.sources
    clash = sorted(set(sources) & set(langs))
    if clash:
      raise ValueError(
        f"source ids that are also language names: {', '.join(clash)}; a budget could not tell "
        "them apart (prepare them again under another --source id)"
      )
    for entry in langs.values():
      for e in entry.values():
        e["shards"].sort(key=lambda s: s["path"])
    return {
      "format": FORMAT_VERSION,
      "token_dtype": TOKEN_DTYPE.str,
      "tokenizer": tokenizer_info,
      "settings": dataclasses.asdict(settings),
      "languages": dict(sorted(langs.items())),
      "sources": {k: dict(v, languages=sorted(v["languages"])) for k, v in sorted(sources.items())},
      "totals": {
        s: {k: sum(v[s][k] for v in langs.values()) for k in ("documents", "sequences", "tokens")}
        for s in ("train", "eval")
      },
    }


def aggregate(records: Sequence[dict], tokenizer_info: dict, settings: Settings) -> dict:
  """stats.json content from the units' records."""
  acc = StatsAccumulator()
  for record in records:
    acc.add(record)
  return acc.result(tokenizer_info, settings)


def plan(
  source: Source,
  output_dir: str,
  settings: Settings,
  languages: Sequence[str] | None = None,
  shard_index: int = 0,
  num_shards: int = 1,
) -> tuple[fs.Path, tokenizer_lib.Tokenizer, Settings, list[Unit]]:
  """What every run does first: checks the flags, loads the tokenizer, lists this run's share of the units
  (every num_shards-th from shard_index on), and records (or compares) the settings and the source id."""
  if not 0 <= shard_index < num_shards:
    raise ValueError(f"shard_index {shard_index} is not in [0, num_shards={num_shards})")
  out = fs.path(output_dir, "--output_dir")
  tok = tokenizer_lib.load_tokenizer(settings.tokenizer)
  settings = dataclasses.replace(settings, tokenizer=tok.path)
  if languages:
    for lang in languages:
      check_language_name(lang, "--languages")
  units = list_units(source, settings, languages)[shard_index::num_shards]
  out.mkdir(parents=True, exist_ok=True)
  _check_settings(out, settings, tok)
  _check_source(out, source)
  return out, tok, settings, units


def check_found(
  source: Source, languages: Sequence[str] | None, units: Sequence[Unit], found: Mapping[str, int]
) -> None:
  """A whole run (not a share of a sharded one) must find documents, and every requested language; `found`:
  the sequences of each language in this run's units."""
  if sum(found.values()) == 0:
    raise ValueError(
      f"no documents found in the input ({source.format} "
      f"{source.path or ', '.join(source.files)}"
      f"{'; languages ' + ','.join(languages) if languages else ''})"
    )
  if languages:
    # Files of one language were chosen by list_units (bare codes resolved); else records name theirs.
    wanted = {u.lang for u in units} if all(u.lang for u in units) else set(languages)
    absent = sorted(wanted - set(found))
    if absent:
      raise ValueError(f"requested languages with no documents in the input: {', '.join(absent)}")


def prepare(
  source: Source,
  output_dir: str,
  settings: Settings,
  *,
  languages: Sequence[str] | None = None,
  num_workers: int = 0,
  shard_index: int = 0,
  num_shards: int = 1,
  progress: bool = True,
) -> dict:
  """Runs (or resumes) a prepare run (this run's share: every num_shards-th unit from shard_index on), then
  rebuilds stats.json from every finished unit in output_dir and returns it. num_workers 0 = in this process."""
  out, tok, settings, units = plan(source, output_dir, settings, languages, shard_index, num_shards)
  records = {}
  done_names = set(_unit_names(out))  # one listing, not a request per unit
  finished = [unit.name + ".json" for unit in units if unit.name + ".json" in done_names]
  records.update(zip((n.removesuffix(".json") for n in finished), finished_units(out, names=finished)))
  todo = [unit for unit in units if unit.name + ".json" not in done_names]
  tasks = [(u, source, settings, os.fspath(out), languages) for u in todo]
  bar = tqdm.tqdm(
    total=len(units),
    initial=len(units) - len(todo),
    unit="file",
    desc="prepare",
    disable=not progress,
    dynamic_ncols=True,
  )
  tokens = 0

  def done(record):
    nonlocal tokens
    records[record["unit"]] = record
    tokens += sum(c["tokens"] for s in record["languages"].values() for c in s.values())
    bar.set_postfix(tokens=f"{tokens:,}", refresh=False)
    bar.update(1)

  if num_workers > 1 and len(tasks) > 1:
    # spawn: workers start clean (no forked tokenizer or file handles) and import only this module.
    with multiprocessing.get_context("spawn").Pool(min(num_workers, len(tasks))) as pool:
      for record in pool.imap_unordered(_process_task, tasks):
        done(record)
  else:
    for task in tasks:
      done(_process_task(task))
  bar.close()

  if num_shards == 1:  # a share of a sharded run may hold no documents of some language, or none at all
    mine = aggregate([records[u.name] for u in units], tok.describe(), settings)["languages"]
    found = {lang: e["train"]["sequences"] + e["eval"]["sequences"] for lang, e in mine.items()}
    check_found(source, languages, units, found)
  # Every finished unit of every source; written again if another run finished a unit meanwhile.
  # stats.json last: every shard it lists is in place before it is written.
  while True:
    names = _unit_names(out)
    stats = aggregate(finished_units(out, records, names), tok.describe(), settings)
    _atomic_write_json(out / "stats.json", stats)
    if _unit_names(out) == names:
      return stats


def write_pretokenized(
  output_dir: str, documents: Mapping[str, Iterable[Sequence[int]]], tokenizer_info: dict, settings: Settings
) -> dict:
  """Writes already tokenized documents ({language: token id lists}, no <bos>/<eos>) in the same layout as
  `prepare`, for synthetic corpora (benchmarks, tests). `tokenizer_info` stands in for `Tokenizer.describe()`:
  at least vocab_size and special_ids."""
  out = fs.path(output_dir, "output_dir")
  if (out / "stats.json").exists():
    raise FileExistsError(f"{output_dir} already holds a prepared corpus (stats.json)")
  ids = tokenizer_info["special_ids"]
  records = []
  for lang, docs in sorted(documents.items()):
    check_language_name(lang, "write_pretokenized")
    unit = Unit(f"pretokenized-{lang}", "", lang, eval_quota=settings.eval_documents)
    records.append(
      _write_unit(unit, settings, out, ids["bos"], ids["eos"], "pretokenized", ((lang, doc) for doc in docs))
    )
  stats = aggregate(records, tokenizer_info, settings)
  _atomic_write_json(out / "stats.json", stats)
  return stats


def add_flags(parser: argparse.ArgumentParser) -> None:
  """The input, tokenizer and output flags (shared with data_pipeline.prepare_beam)."""
  src = parser.add_mutually_exclusive_group(required=True)
  src.add_argument(
    "--parquet_dir", help="FineWeb2-style tree <lang>_<Script>/train/*.parquet (with --lang: any tree of *.parquet)"
  )
  src.add_argument("--jsonl", nargs="+", help="JSON-lines files with text and lang")
  src.add_argument("--text_dir", help="<lang>.txt or <lang>/*.txt files")
  src.add_argument("--tfds", help="name of a locally prepared TFDS dataset")
  parser.add_argument("--tokenizer", required=True, help="SentencePiece .model or tokenizer.json")
  parser.add_argument("--output_dir", required=True)
  parser.add_argument(
    "--source",
    default="",
    help="id of this input, part of every unit name (default: the "
    "format); one per input when several runs fill one --output_dir",
  )
  parser.add_argument("--lang", default=None, help="one language for every document (single-language inputs)")
  parser.add_argument("--include_removed", action="store_true", help="parquet: also FineWeb2's *_removed subsets")
  parser.add_argument(
    "--shard_index", type=int, default=0, help="this run takes units shard_index, shard_index + num_shards, …"
  )
  parser.add_argument("--num_shards", type=int, default=1)
  parser.add_argument("--languages", default=None, help="comma-separated languages to keep (default: all)")
  parser.add_argument("--max_len", type=int, default=8192, help="longest stored sequence incl. <bos>/<eos>")
  parser.add_argument("--min_tokens", type=int, default=1, help="drop shorter sequences (text tokens)")
  parser.add_argument("--eval_documents", type=int, default=1000, help="held-out documents per language")
  parser.add_argument("--eval_every", type=int, default=10, help="hold out every n-th document (until enough)")
  parser.add_argument(
    "--unit_mb",
    type=float,
    default=Settings.unit_mb,
    help="input per unit of work (parquet row groups, or a byte range of a JSONL / text file)",
  )
  parser.add_argument("--text_split", default="line", choices=["line", "paragraph", "file"])
  parser.add_argument("--text_key", default="text", help="text column / field (StarCoder: content)")
  parser.add_argument("--lang_key", default="lang")
  parser.add_argument("--tfds_data_dir", default=None)
  parser.add_argument("--tfds_split", default="train")
  parser.add_argument("--tfds_unit_size", type=int, default=100_000)


def source_and_settings(args: argparse.Namespace) -> tuple[Source, Settings]:
  fmt = next(f for f in ("parquet_dir", "jsonl", "text_dir", "tfds") if getattr(args, f))
  source = Source(
    format=fmt.replace("_dir", ""),
    path=(getattr(args, fmt) if fmt != "jsonl" else ""),
    id=args.source,
    files=tuple(args.jsonl or ()),
    text_split=args.text_split,
    text_key=args.text_key,
    lang_key=args.lang_key,
    lang=args.lang,
    include_removed=args.include_removed,
    tfds_data_dir=args.tfds_data_dir,
    tfds_split=args.tfds_split,
    tfds_unit_size=args.tfds_unit_size,
  )
  settings = Settings(args.tokenizer, args.max_len, args.min_tokens, args.eval_documents, args.eval_every, args.unit_mb)
  return source, settings


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.ArgumentParser(
    prog="python -m data_pipeline.prepare",
    description=__doc__.split("\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  add_flags(parser)
  parser.add_argument("--num_workers", type=int, default=os.cpu_count() or 1)
  args = parser.parse_args(argv)
  run_command(
    args, lambda source, settings, **kw: prepare(source, args.output_dir, settings, **kw), num_workers=args.num_workers
  )


def run_command(args: argparse.Namespace, run, **kwargs) -> None:
  """A prepare command's body, whichever engine runs the units: `run(source, settings, languages=…,
  shard_index=…, num_shards=…, **kwargs)` → stats; bad input is one line and exit 2, an I/O failure exit 1; then
  the one-line summary."""
  try:
    source, settings = source_and_settings(args)
    stats = run(
      source,
      settings,
      languages=args.languages.split(",") if args.languages else None,
      shard_index=args.shard_index,
      num_shards=args.num_shards,
      **kwargs,
    )
  except (ValueError, FileNotFoundError, NotADirectoryError) as e:  # bad input
    cli.fail(cli.error_line(e))
  except OSError as e:  # unreadable input, read-only or full disk, …
    cli.fail(cli.error_line(e), cli.EXIT_FAILED)
  t = stats["totals"]
  print(
    f"{len(stats['languages'])} languages; train {t['train']['documents']:,} documents, "
    f"{t['train']['tokens']:,} tokens; eval {t['eval']['documents']:,} documents → "
    f"{fs.path(args.output_dir, '--output_dir') / 'stats.json'}"
  )


if __name__ == "__main__":
  main()
