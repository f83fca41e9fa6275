"""The training input pipeline: per-language shards → weighted mix → pack → MLM mask → batch, in Grain.

Design: the global batch of `batch_size` rows is built from `num_streams` independent row streams (a config value
that depends neither on the number of processes nor on the batch size; default = batch_size). Global row r of every
batch comes from stream r // rows_per_stream, and each stream's rows are one fixed sequence, so a run that changes
its (micro-)batch size or host count keeps reading the same rows in the same order. The streams read in visits:

  visits: one sequence for all streams, each language's visits in exact proportion per block of
    mix_block / read_block visits (sampling.BlockMixSelection; visit weights give documents the weights of token
    shares p_l ∝ n_l^tau from the phase's mixture); stream s makes visits s, s + num_streams, …
  a language's q-th visit reads its q-th block of `read_block` consecutive documents (sampling.BlockOrder: every
    pass reads every document once, in blocks in a new order; one shard range, one open, per visit). As the
    streams advance together, the visits made are a prefix of the sequence but for the last few: each language is
    read in whole passes, and no document is read more than one time more than another of its language
  → a stream's documents: its visits in buffers of `shuffle_blocks`, each buffer's documents in a random order
  → split documents longer than seq_len → best-fit / first-fit packing into `packing_bins` open rows, given out
    one at a time after about one row of packing (packing.StreamingPacker: every batch costs about the same)

So a batch opens about as many shards as it makes visits (a decay host's 4 rows of 8192 tokens: about one),
instead of one per document, while a batch still mixes the languages of shuffle_blocks visits per stream.

Each process builds only the streams of its own rows and masks row k of stream s with a Generator keyed by
(seed, s, k). The global batch sequence is therefore a function of the seed alone: it does not depend on the
number of processes, nor on the number of worker processes (`num_workers` > 0 spreads a process's streams over
`grain` `mp_prefetch` workers and reassembles their rows in order).

Shards are read through a per-process cache of at most `max_open_files` open readers (split between worker
processes), least recently used closed first, so any number of languages runs under a small `ulimit -n`; nothing
is opened at start-up, and each shard's record count is checked against stats.json when it is first opened.
Reads overlap: while a stream hands out one buffer, the visits of the next ones (`read_ahead` documents) are
read on a pool of `read_threads` threads (documents are a pure function of their index, so reading ahead changes
no batch). A `gs://` data_dir is read from
local copies of the phase's shards (`filesystem.local_copy`, once per host, before the first batch): ArrayRecord
reads local files only.

Iterator state is global by construction: `{"step", "rows", "streams": {stream id: grain state}, "pipeline":
config signature}` (`rows`: rows each stream has given). A process's `get_state()` holds its own streams; the
union over processes is the global state, and any process count that divides num_streams, with any batch size that
num_streams divides, can restore it (`data_pipeline.checkpoint` merges per-process files).
With one process, `ocp.args.JsonSave(it.get_state())` is a complete checkpoint.

Batches (numpy, per process; b = batch_size / process_count, K = max_masked):

  input_ids int32 [b, S]         after masking            segment_ids int32 [b, S]   document 1, 2, …; 0 = padding
  positions int32 [b, S]         restart at 0 per document lang_ids int32 [b, S]     index into `.languages`; -1 pad
  masked_positions int32 [b, K]  indices into S; 0 unused  masked_labels int32 [b, K] original ids
  masked_weights float32 [b, K]  1 real slot, 0 unused

  it = make_train_iterator(PipelineConfig(data_dir="data", languages="demo-pretrain", tau=0.7, seq_len=1024,
                                          batch_size=64, mask_rate=0.3))
  batch = next(it); state = it.get_state(); it.set_state(state)
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import resource
import threading
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader

from data_pipeline import filesystem as fs
from data_pipeline import masking, mixture, packing, sampling

STATE_VERSION = 3


def batch_schema(seq_len: int, max_masked: int) -> dict[str, tuple[int, type]]:
  """Length and dtype of each batch array per row (arrays are [rows, length]): the one description of a batch,
  which the training program's abstract batch (ahead-of-time compilation) is built from."""
  return {
    "input_ids": (seq_len, np.int32),
    "segment_ids": (seq_len, np.int32),
    "positions": (seq_len, np.int32),
    "masked_positions": (max_masked, np.int32),
    "masked_labels": (max_masked, np.int32),
    "masked_weights": (max_masked, np.float32),
    "lang_ids": (seq_len, np.int32),
  }


BATCH_KEYS = tuple(batch_schema(1, 1))


def masked_per_row(seq_len: int, mask_rate: float, max_masked: int | None = None) -> int:
  """K, the masked slots of every row: `max_masked` if set, else masking.default_max_masked."""
  return max_masked or masking.default_max_masked(seq_len, mask_rate)


_TRAIN, _EVAL = 0, 1  # mask RNG tags
_SEED_LANG, _SEED_MIX, _SEED_BINS, _SEED_BUFFER = 1, 2, 3, 4


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """Everything that determines the batch sequence (and a few knobs that do not: num_workers, prefetch)."""

  data_dir: str
  languages: tuple[str, ...] | str | None = None  # names, a named set ("demo-mid", "mmbert-pretrain") or None: all
  tau: float = 0.7
  budgets: Mapping[str, float] = dataclasses.field(default_factory=dict)  # fixed token shares
  max_passes: float | None = None  # cap on passes over a language (needs total_tokens)
  total_tokens: float | None = None  # phase length in tokens
  seq_len: int = 1024
  batch_size: int = 8  # global rows per batch
  mask_rate: float = 0.3
  max_masked: int | None = None  # K; None: masking.default_max_masked(seq_len, mask_rate)
  seed: int = 0
  num_streams: int | None = None  # independent row streams; None: batch_size. Fix it for a run:
  # it must divide every batch_size and be a multiple of every
  # process count the run may use
  packing: str = "first_fit"  # first_fit | best_fit
  packing_bins: int = 16  # rows a packer keeps open (more: less padding, more memory)
  mix_block: int = 4096  # documents per mixing block (exact proportions per block of visits, all streams together)
  vocab_size: int | None = None  # random replacements < vocab_size; None: the tokenizer's size
  mask_id: int = 4
  pad_id: int = 0
  num_workers: int = 0  # grain mp_prefetch worker processes per process (0: in-process)
  worker_buffer: int = 2  # batches each worker prepares ahead
  prefetch: int = 2  # batches prepared ahead by a thread when num_workers == 0
  max_open_files: int = 128  # open shard readers per process, its workers together
  read_block: int = 32  # consecutive documents a stream reads from a language per visit (one range read)
  shuffle_blocks: int = 8  # visits whose documents a stream shuffles together before packing
  read_threads: int = 64  # threads reading documents per (worker) process; 0: serial
  read_ahead: int = 256  # documents each stream requests beyond its current buffer (with read_threads)
  read_latency_ms: float = 0.0  # sleep per read request (benchmarks and tests of the overlap)
  open_latency_ms: float = 0.0  # sleep per shard open (a gcsfuse mount's round trip, in benchmarks)

  def __post_init__(self):
    if self.seq_len < 2 or self.batch_size < 1:
      raise ValueError(f"seq_len and batch_size must be positive, got {self.seq_len} and {self.batch_size}")
    if not 0.0 < self.mask_rate < 1.0:
      raise ValueError(f"mask_rate must be in (0, 1), got {self.mask_rate}")
    if self.packing not in packing.PACKERS:
      raise ValueError(f"packing must be one of {', '.join(packing.PACKERS)}, got {self.packing!r}")
    if self.streams < 1 or self.batch_size % self.streams:
      raise ValueError(f"num_streams {self.num_streams} must divide batch_size {self.batch_size}")
    if self.seed < 0:
      raise ValueError(f"seed must be non-negative, got {self.seed}")
    if self.max_open_files < 1:
      raise ValueError(f"max_open_files must be positive, got {self.max_open_files}")
    if self.read_threads < 0 or self.read_ahead < 0 or self.read_latency_ms < 0 or self.open_latency_ms < 0:
      raise ValueError(
        f"read_threads, read_ahead, read_latency_ms and open_latency_ms must be non-negative, got "
        f"{self.read_threads}, {self.read_ahead}, {self.read_latency_ms} and {self.open_latency_ms}"
      )
    if self.read_block < 1 or self.shuffle_blocks < 1:
      raise ValueError(
        f"read_block and shuffle_blocks must be positive, got {self.read_block} and {self.shuffle_blocks}"
      )
    if self.max_masked is not None and not 0 < self.max_masked <= self.seq_len:
      raise ValueError(f"max_masked must be in [1, seq_len={self.seq_len}], got {self.max_masked}")

  @property
  def streams(self) -> int:
    return self.batch_size if self.num_streams is None else self.num_streams

  @property
  def masked_per_row(self) -> int:
    return masked_per_row(self.seq_len, self.mask_rate, self.max_masked)

  @property
  def phase(self) -> mixture.PhaseSpec:
    return mixture.PhaseSpec(self.languages, self.tau, dict(self.budgets), self.max_passes, self.total_tokens)


def _seed32(*keys: int) -> int:
  return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def _lang_key(lang: str) -> int:
  return zlib.crc32(lang.encode())


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a (worker) process needs to build streams: picklable, no open files."""

  cfg: PipelineConfig
  languages: tuple[str, ...]
  shards: tuple[tuple[tuple[str, int], ...], ...]  # train shards per language: (path, records)
  doc_weights: tuple[float, ...]
  visit_weights: tuple[float, ...]  # per visit of read_block documents: doc weight × visits per pass / documents
  random_low: int  # random replacement ids: [random_low, random_high)
  random_high: int
  signature: Mapping[str, Any]  # identifies the batch sequence; stored in the iterator state

  @property
  def rows_per_stream(self) -> int:
    return self.cfg.batch_size // self.cfg.streams


def _shards(data_dir: fs.Path, shards: Sequence[dict], threads: int = 16) -> tuple[tuple[str, int], ...]:
  """(local filename, records) of shards listed in stats.json. Only their existence is checked here; shards in a
  bucket are copied to this host's cache first (in parallel, once per host), unless they would not fit its disk."""
  paths = [data_dir / shard["path"] for shard in shards]
  if not fs.is_remote(data_dir):
    for path in paths:
      if not path.exists():
        raise FileNotFoundError(f"shard {path} listed in stats.json is missing (re-run prepare)")
    return tuple((os.fspath(p), int(shard["sequences"])) for p, shard in zip(paths, shards))

  def stat(path):
    try:
      return path.stat()
    except FileNotFoundError:
      raise FileNotFoundError(f"shard {path} listed in stats.json is missing (re-run prepare)") from None

  with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
    stats = list(pool.map(stat, paths))
    cache = fs.cache_root()
    need = sum(st.length for p, st in zip(paths, stats) if not fs.cache_target(p, st, cache).exists())
    free = fs.free_space(cache)
    if need > free:
      raise ValueError(
        f"data_dir={data_dir}: the phase's shards not yet in this host's cache hold {need / 2**30:.1f} GiB, more "
        f"than the {free / 2**30:.1f} GiB free in {cache}; mount the bucket with gcsfuse and set data.data_dir to "
        "the mount (launch/tpu_pod.sh with DATA_BUCKET=...), or point MMBERT_JAX_CACHE at a larger disk"
      )
    local = list(pool.map(lambda a: fs.local_copy(a[0], cache, a[1]), zip(paths, stats)))
  return tuple((p, int(shard["sequences"])) for p, shard in zip(local, shards))


def visit_weights(doc_weights: Sequence[float], records: Sequence[int], block: int) -> tuple[float, ...]:
  """Weights of visits that give documents the weights `doc_weights`: a visit of a language of n records reads
  n / ceil(n / block) of them on average (`sampling.BlockOrder`)."""
  n = np.asarray(records, np.float64)
  w = np.asarray(doc_weights, np.float64) * np.ceil(n / block) / n
  return tuple(float(x) for x in w / w.sum())


def make_plan(cfg: PipelineConfig) -> tuple[Plan, mixture.Mixture, dict]:
  """Reads stats.json and computes the phase mixture (budgets may name languages or prepare sources)."""
  data_dir = fs.path(cfg.data_dir, "data_dir")
  stats = mixture.load_stats(data_dir)
  components = mixture.components(stats, list(cfg.budgets))
  mix = mixture.compute_mixture(mixture.counts_of(components), cfg.phase)
  tok = stats["tokenizer"]
  ids = tok["special_ids"]
  if ids.get("mask") != cfg.mask_id or ids.get("pad") != cfg.pad_id:
    raise ValueError(
      f"{cfg.data_dir} was tokenized with mask id {ids.get('mask')} and pad id {ids.get('pad')}, "
      f"the pipeline config says mask_id {cfg.mask_id}, pad_id {cfg.pad_id}"
    )
  vocab = cfg.vocab_size or tok["vocab_size"]
  if vocab < tok["vocab_size"]:
    raise ValueError(f"vocab_size {vocab} is smaller than the tokenizer's {tok['vocab_size']} ({tok['path']})")
  shards = tuple(_shards(data_dir, components[l], cfg.read_threads) for l in mix.languages)
  data = {l: [[s["path"], s["sequences"], s["tokens"]] for s in components[l]] for l in mix.languages}
  signature = {
    "seed": cfg.seed,
    "languages": list(mix.languages),
    "doc_weights": [round(float(w), 12) for w in mix.doc_weights],
    "seq_len": cfg.seq_len,
    "num_streams": cfg.streams,
    "packing": cfg.packing,
    "packing_bins": cfg.packing_bins,
    "mix_block": cfg.mix_block,
    "read_block": cfg.read_block,
    "shuffle_blocks": cfg.shuffle_blocks,
    "mask_rate": cfg.mask_rate,
    "max_masked": cfg.masked_per_row,
    "random_ids": [max(ids.values()) + 1, vocab],
    "data": hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16],
  }
  records = [sum(n for _, n in s) for s in shards]
  plan = Plan(
    cfg,
    mix.languages,
    shards,
    tuple(float(w) for w in mix.doc_weights),
    visit_weights(mix.doc_weights, records, cfg.read_block),
    max(ids.values()) + 1,
    vocab,
    signature,
  )
  return plan, mix, stats


# ----------------------------------------------------------------------------------------------------------------
# Reading shards with a bounded number of open files
# ----------------------------------------------------------------------------------------------------------------


class _ReaderCache:
  """The open ArrayRecord readers of this process, at most `capacity`, the least recently used closed first.

  Any number of threads read at once (an ArrayRecordReader is thread-safe); the lock guards only the cache: a shard
  is opened outside it (one thread opens, the others wanting that shard wait), and a reader in use by another
  thread is closed when its last read ends. `latency_s` makes every read request (one record, or a range of
  consecutive records) sleep that long in the reading thread, and `open_latency_s` every shard open (benchmarks
  and tests model a network disk or a gcsfuse mount with them)."""

  def __init__(self, capacity: int = 128):
    self.capacity = capacity
    self.latency_s = 0.0
    self.open_latency_s = 0.0
    self._readers: collections.OrderedDict[str, ArrayRecordReader] = collections.OrderedDict()
    self._users: collections.Counter = collections.Counter()  # reads in progress per reader (by id)
    self._retired: dict[int, ArrayRecordReader] = {}  # evicted while in use: closed after the read
    self._opening: dict[str, threading.Event] = {}  # shards being opened now
    # Reentrant: garbage collection inside a locked section may finalise an unreferenced iterator, whose close()
    # calls close_all() on this same thread (with a plain Lock that deadlocked).
    self._lock = threading.RLock()
    self.opened = 0  # readers opened so far (a measure of cache misses)
    self.reads = 0  # records read so far
    self.requests = 0  # read requests so far (a range of records is one)
    self.in_flight = 0  # read requests in progress now
    self.max_in_flight = 0  # the most seen at once
    self.waited_s = 0.0  # time the packers of this process waited for reads (not read ahead in time)

  def read(self, path: str, records: int, index: int) -> bytes:
    return self.read_range(path, records, index, 1)[0]

  def read_range(self, path: str, records: int, start: int, count: int) -> list[bytes]:
    """Records [start, start + count) of a shard, in one request."""
    reader = self._acquire(path, records)
    with self._lock:
      self.reads += count
      self.requests += 1
      self.in_flight += 1
      self.max_in_flight = max(self.max_in_flight, self.in_flight)
    try:
      if self.latency_s:
        time.sleep(self.latency_s)
      return reader.read(list(range(start, start + count)))
    except (RuntimeError, OSError, ValueError) as e:
      raise ValueError(
        f"{path} records {start}..{start + count - 1}: cannot read them ({str(e).splitlines()[0]}); delete "
        "the shard and its _units record, then re-run prepare"
      ) from None
    finally:
      with self._lock:
        self.in_flight -= 1
        self._users[id(reader)] -= 1
        if not self._users[id(reader)]:
          del self._users[id(reader)]
          retired = self._retired.pop(id(reader), None)
          if retired is not None:
            _close(retired)

  def _acquire(self, path: str, records: int) -> ArrayRecordReader:
    """The reader of `path`, counted as in use by the caller; opened (outside the lock) when not cached."""
    while True:
      with self._lock:
        reader = self._readers.get(path)
        if reader is not None:
          self._readers.move_to_end(path)
          self._users[id(reader)] += 1
          return reader
        opening = self._opening.get(path)
        if opening is None:
          opening = self._opening[path] = threading.Event()
          break
      opening.wait()  # another thread opens it; then look again
    try:
      reader = self._open(path, records)
    except BaseException:
      with self._lock:
        del self._opening[path]
      opening.set()
      raise
    with self._lock:
      while len(self._readers) >= self.capacity:
        self._evict(self._readers.popitem(last=False)[1])
      self._readers[path] = reader
      self._users[id(reader)] += 1
      del self._opening[path]
    opening.set()
    return reader

  def _evict(self, reader: ArrayRecordReader) -> None:
    if self._users[id(reader)]:
      self._retired[id(reader)] = reader
    else:
      _close(reader)

  def _open(self, path: str, records: int) -> ArrayRecordReader:
    if self.open_latency_s:
      time.sleep(self.open_latency_s)
    try:
      # No read-ahead inside the reader: a stream reads one range of a shard per visit.
      reader = ArrayRecordReader(path, "readahead_buffer_size:0", file_reader_buffer_size=32768)
      n = reader.num_records()
    except (RuntimeError, OSError, ValueError) as e:
      raise ValueError(f"{path}: cannot open the shard ({str(e).splitlines()[0]})") from None
    with self._lock:
      self.opened += 1
    if n != records:
      _close(reader)
      raise ValueError(
        f"shard {path} is corrupt or truncated: stats.json lists {records} records, the file holds "
        f"{n} (delete it and its _units record, then re-run prepare)"
      )
    return reader

  def close_all(self) -> None:
    with self._lock:
      while self._readers:
        self._evict(self._readers.popitem()[1])


def _close(reader: ArrayRecordReader) -> None:
  try:
    reader.close()
  except RuntimeError:  # raised by a reader of a damaged file; the descriptor is released all the same
    pass


READERS = _ReaderCache()  # one per process: every language and stream of the process shares it


def raise_open_file_limit() -> tuple[int, int]:
  """Raises this process's soft RLIMIT_NOFILE to its hard limit (allowed without privileges); returns both."""
  soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
  if hard == resource.RLIM_INFINITY or soft < hard:
    target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    try:
      resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
      soft = target
    except (ValueError, OSError):
      pass
  return soft, hard


class ShardSource(grain.sources.RandomAccessDataSource):
  """The records of some shards as one random-access source, read through `READERS` (opens nothing itself)."""

  def __init__(self, shards: Sequence[tuple[str, int]]):
    self._shards = tuple(shards)
    self._ends = np.cumsum([n for _, n in self._shards]).tolist()

  def __len__(self) -> int:
    return self._ends[-1] if self._ends else 0

  def address(self, index: int) -> tuple[str, int, int]:
    """(shard path, its records, record index in the shard) of record `index`."""
    i = bisect.bisect_right(self._ends, index)
    path, records = self._shards[i]
    return path, records, index - (self._ends[i - 1] if i else 0)

  def __getitem__(self, index: int) -> bytes:
    return READERS.read(*self.address(index))

  def __repr__(self) -> str:
    return f"ShardSource({len(self._shards)} shards, {len(self)} records)"


# ----------------------------------------------------------------------------------------------------------------
# Row streams
# ----------------------------------------------------------------------------------------------------------------


def _decode(record: bytes, lang: int) -> dict:
  return {"tokens": np.frombuffer(record, np.int32), "lang": lang}


def _ring_ranges(source: ShardSource, first: int, count: int) -> list[tuple[str, int, int, int]]:
  """(path, records, start, count) per shard of documents first, first + 1, … (count of them) of a language,
  wrapping around at its end."""
  n, out = len(source), []
  while count > 0:
    path, records, start = source.address(first)
    take = min(count, records - start)
    out.append((path, records, start, take))
    first, count = (first + take) % n, count - take
  return out


def _read_visit(visit: tuple[int, list]) -> tuple[int, list[dict]]:
  lang, ranges = visit
  return lang, [_decode(r, lang) for where in ranges for r in READERS.read_range(*where)]


class StreamDocuments:
  """The documents of one stream, as a function of their index k (so the packer's state is an index).

  The streams together read one sequence of visits, drawn by `sampling.BlockMixSelection` with each language's
  visits in proportion to `Plan.visit_weights`; stream s makes visits s, s + num_streams, s + 2·num_streams, …
  (so the visits of all streams made so far are, but for the last few, a prefix of that sequence, and each
  language's documents are read in whole passes, not some of them more often than others). A language's q-th
  visit reads block q of its `sampling.BlockOrder` (read_block consecutive documents: one or two shard ranges).
  A stream's visits form buffers of shuffle_blocks visits; k = w·slots + i (slots = shuffle_blocks × read_block)
  is document `window_order(w)[i]` of buffer w's m_w documents (its visits' in turn) for i < m_w, else an empty
  document that names the next buffer's first index (the packer goes on there)."""

  def __init__(
    self,
    plan: Plan,
    stream: int,
    orders: Sequence[sampling.BlockOrder],
    sources: Sequence[ShardSource],
    selection: sampling.BlockMixSelection,
  ):
    cfg = plan.cfg
    self._selection, self._orders, self._sources = selection, orders, sources
    self._stream, self._num_streams = stream, cfg.streams
    self.block, self.visits_per_window = cfg.read_block, cfg.shuffle_blocks
    self.slots = self.block * self.visits_per_window
    self._seed = _seed32(cfg.seed, _SEED_BUFFER)
    self._windows: dict[int, tuple[list, np.ndarray]] = {}

  def visit(self, v: int) -> tuple[int, list[tuple[str, int, int, int]]]:
    """(language, shard ranges) of this stream's visit v."""
    w, j = divmod(v, self.visits_per_window)
    return self._window(w)[0][j]

  def _window(self, w: int) -> tuple[list, np.ndarray]:
    """Buffer w's visits and, in the order handed out, its documents as (visit in the buffer, document)."""
    window = self._windows.get(w)
    if window is None:
      visits = []
      for v in range(w * self.visits_per_window, (w + 1) * self.visits_per_window):
        lang, q = self._selection[self._stream + self._num_streams * v]
        first, count = self._orders[lang][q]
        visits.append((lang, _ring_ranges(self._sources[lang], first, count)))
      sizes = [sum(r[3] for r in ranges) for _, ranges in visits]
      docs = np.concatenate([np.stack([np.full(n, j), np.arange(n)], 1) for j, n in enumerate(sizes)])
      order = sampling.window_order(self._seed, self._stream, w, len(docs))
      window = (visits, docs[order])
      if len(self._windows) >= 64:
        self._windows.pop(next(iter(self._windows)))
      self._windows[w] = window
    return window

  def size(self, w: int) -> int:
    """Documents in buffer w."""
    return len(self._window(w)[1])

  def slot(self, k: int) -> tuple[int, int] | None:
    """(visit, document in the visit) of document k; None for an empty one."""
    w, i = divmod(k, self.slots)
    docs = self._window(w)[1]
    if i >= len(docs):
      return None
    j, t = docs[i]
    return w * self.visits_per_window + int(j), int(t)


_EMPTY = np.zeros(0, np.int32)


class _Reads:
  """`documents(k)` for a packer, which asks for k = 0, 1, 2, …: the visits of k's buffer are read whole (one
  range request each), and, with a pool, the visits of the following buffers are put on it until `ahead`
  documents beyond this buffer are requested (a buffer of short visits, of small languages, lasts only a few
  batches: its successors must be in flight a shard open's latency ahead). Planning a buffer (its visits' mix
  slots, block orders and shuffle) is the packer's own CPU work, so it is spread out: each document asked for
  plans at most one more buffer, not all `ahead` documents' worth at a buffer's start (which made every few
  batches several times slower than the median). Document k is a pure function of k, so what is read ahead is
  exactly what a serial read would give. A restore asks for earlier documents: their visits are read again."""

  def __init__(self, docs: StreamDocuments, pool: concurrent.futures.Executor | None, ahead: int):
    self._docs, self._pool, self._ahead = docs, pool, ahead
    self._visits: dict[int, Any] = {}  # visit → (lang, documents), or a future of it
    self._low = -1  # first visit of the current buffer: earlier ones are dropped
    self._planned: dict[int, int] = {}  # buffer → its documents, for the buffers after the current one requested
    self.ahead = True  # False while a restore reads the documents of the rows it held

  def _request(self, v: int) -> None:
    if v not in self._visits:
      visit = self._docs.visit(v)
      self._visits[v] = self._pool.submit(_read_visit, visit) if self._pool is not None else None

  def _request_buffer(self, w: int) -> None:
    per_window = self._docs.visits_per_window
    for v in range(w * per_window, (w + 1) * per_window):
      self._request(v)

  def _get(self, v: int) -> tuple[int, list[dict]]:
    got = self._visits.get(v)
    if isinstance(got, tuple):
      return got
    t = time.perf_counter()
    waits = got is None or not got.done()
    got = _read_visit(self._docs.visit(v)) if got is None else got.result()
    if waits:  # the packer waited for this read
      READERS.waited_s += time.perf_counter() - t
    self._visits[v] = got
    return got

  def _plan(self, k: int) -> None:
    """With document k current: its buffer's successor requested, then at most one more buffer per call while
    fewer than `ahead` documents after k are requested. Counted from k, not from its buffer's end, the horizon
    shrinks by one document per call, so a buffer is planned about every (its documents) calls."""
    w = k // self._docs.slots
    for u in [u for u in self._planned if u <= w]:
      del self._planned[u]
    nxt = max(self._planned, default=w) + 1
    rest = max(0, self._docs.size(w) - k % self._docs.slots - 1)  # documents after k in its buffer
    if nxt == w + 1 or rest + sum(self._planned.values()) < self._ahead:
      self._request_buffer(nxt)
      self._planned[nxt] = self._docs.size(nxt)

  def __call__(self, k: int) -> dict:
    if self.ahead:
      per_window = self._docs.visits_per_window
      w = k // self._docs.slots
      low = w * per_window
      if low != self._low:  # a new buffer (or the first after a restore)
        for old in [old for old in self._visits if old < low]:
          got = self._visits.pop(old)
          if isinstance(got, concurrent.futures.Future):
            got.cancel()
        self._low = low
        if self._pool is not None:  # usually requested already, as a buffer planned ahead
          self._request_buffer(w)
      if self._pool is not None:
        self._plan(k)
    where = self._docs.slot(k)
    if where is None:  # the rest of the buffer is empty: go on at the next one
      return {"tokens": _EMPTY, "lang": -1, "next": (k // self._docs.slots + 1) * self._docs.slots}
    return self._get(where[0])[1][where[1]]

  def prefetch(self, ks) -> None:
    """Starts reading the visits of documents `ks` (those a restore is about to ask for)."""
    if self._pool is not None:
      for k in ks:
        where = self._docs.slot(k)
        if where is not None:
          self._request(where[0])

  def cancel(self) -> None:
    for got in self._visits.values():
      if got is not None and not isinstance(got, tuple):  # a future (checked without the module: also at exit)
        got.cancel()
    self._visits.clear()
    self._planned.clear()
    self._low = -1


class _Stream:
  """One row stream: its documents, packed row by row (`packing.StreamingPacker`, so every batch does about the
  same packing); counts the rows it has given."""

  def __init__(
    self,
    plan: Plan,
    stream: int,
    orders: Sequence[sampling.BlockOrder],
    sources: Sequence[ShardSource],
    selection: sampling.BlockMixSelection,
    pool: concurrent.futures.Executor | None = None,
  ):
    cfg = plan.cfg
    self._reads = _Reads(StreamDocuments(plan, stream, orders, sources, selection), pool, cfg.read_ahead)
    self._packer = packing.StreamingPacker(
      self._reads, cfg.seq_len, num_bins=cfg.packing_bins, packing=cfg.packing, pad_id=cfg.pad_id
    )
    self.rows = 0

  def take(self, k: int) -> list[dict]:
    out = [next(self._packer) for _ in range(k)]
    self.rows += k
    return out

  def get_state(self) -> dict:
    return self._packer.get_state()

  def set_state(self, state: Mapping[str, Any], rows: int) -> None:
    self._reads.cancel()
    self._reads.prefetch(sorted({k for row in (*state["open"], *state["closed"]) for k, _, _ in row}))
    self._reads.ahead = False
    try:
      self._packer.set_state(state)
    finally:
      self._reads.ahead = True
    self.rows = rows

  def close(self) -> None:
    self._reads.cancel()


def block_orders(
  plan: Plan,
) -> tuple[list[sampling.BlockOrder], list[ShardSource], sampling.BlockMixSelection]:
  """Each language's visit order and its records, and the visit sequence (shared by all streams of a process;
  they advance together, so a few blocks of the sequence cached serve them all)."""
  cfg = plan.cfg
  sources = [ShardSource(shards) for shards in plan.shards]
  orders = [
    sampling.BlockOrder(len(source), cfg.read_block, _seed32(cfg.seed, _SEED_LANG, _lang_key(lang)))
    for lang, source in zip(plan.languages, sources)
  ]
  # 256 block tables (a few hundred KiB): a host's streams plan read_ahead documents ahead each, far apart in the
  # sequence; with 16, a decay host at 1,834 languages computed each table 2.2 times (188 tables in 256 batches).
  selection = sampling.BlockMixSelection(
    plan.visit_weights, seed=_seed32(cfg.seed, _SEED_MIX), block=max(1, cfg.mix_block // cfg.read_block), cached=256
  )
  return orders, sources, selection


def _stack(rows: Sequence[dict]) -> dict[str, np.ndarray]:
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _mask(plan: Plan, rows: dict, rngs) -> dict[str, np.ndarray]:
  cfg = plan.cfg
  masked = masking.mask_rows(
    rows["tokens"],
    rows["segment_ids"],
    rngs,
    rate=cfg.mask_rate,
    max_masked=cfg.masked_per_row,
    mask_id=cfg.mask_id,
    random_low=plan.random_low,
    random_high=plan.random_high,
  )
  return {
    "input_ids": masked["input_ids"],
    "segment_ids": rows["segment_ids"],
    "positions": rows["positions"],
    "masked_positions": masked["masked_positions"],
    "masked_labels": masked["masked_labels"],
    "masked_weights": masked["masked_weights"],
    "lang_ids": rows["lang_ids"],
  }


class _RowStreamsIterator(grain.DatasetIterator):
  """Yields, per step, the masked rows of its streams plus `_rows` (global row ids) and `_state` (after the step)."""

  def __init__(self, plan: Plan, stream_ids: Sequence[int], start: Mapping[str, Any] | None):
    super().__init__()
    self._plan = plan
    orders, sources, selection = block_orders(plan)
    cfg = plan.cfg
    self._pool = (
      concurrent.futures.ThreadPoolExecutor(cfg.read_threads, thread_name_prefix="read") if cfg.read_threads else None
    )
    self._streams = {s: _Stream(plan, s, orders, sources, selection, self._pool) for s in stream_ids}
    if start is not None:
      self.set_state(start)

  def __next__(self) -> dict:
    k, cfg = self._plan.rows_per_stream, self._plan.cfg
    rows, row_ids, rngs = [], [], []
    for s, stream in self._streams.items():
      # Row j of stream s is masked by (seed, s, j) whatever the batch shape.
      rngs += [masking.row_rng(cfg.seed, _TRAIN, s, stream.rows + j) for j in range(k)]
      rows += stream.take(k)
      row_ids += [s * k + j for j in range(k)]
    batch = _mask(self._plan, _stack(rows), rngs)
    batch["_rows"] = np.asarray(row_ids, np.int64)
    batch["_state"] = self.get_state()
    return batch

  def get_state(self) -> dict:
    rows = {stream.rows for stream in self._streams.values()}
    assert len(rows) == 1, rows
    return {"rows": rows.pop(), "streams": {str(s): st.get_state() for s, st in self._streams.items()}}

  def set_state(self, state: Mapping[str, Any]) -> None:
    for s, stream in self._streams.items():
      if state["streams"][str(s)] is not None:  # None: the stream has not started
        stream.set_state(state["streams"][str(s)], state["rows"])

  def close(self) -> None:
    for stream in self._streams.values():
      stream.close()
    if self._pool is not None:
      self._pool.shutdown(wait=False, cancel_futures=True)
    super().close()


class _RowStreams(grain.IterDataset):
  """Some streams of a process. `set_slice` (called by grain in each mp_prefetch worker) keeps a worker's share."""

  def __init__(self, plan: Plan, stream_ids: Sequence[int], start: Mapping[str, Any] | None, open_files: int):
    super().__init__()
    self._plan, self._stream_ids, self._start, self._open_files = plan, tuple(stream_ids), start, open_files

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    del sequential_slice
    self._stream_ids = self._stream_ids[sl]

  def __iter__(self) -> _RowStreamsIterator:
    READERS.capacity = self._open_files
    READERS.latency_s = self._plan.cfg.read_latency_ms / 1e3
    READERS.open_latency_s = self._plan.cfg.open_latency_ms / 1e3
    return _RowStreamsIterator(self._plan, self._stream_ids, self._start)


# ----------------------------------------------------------------------------------------------------------------
# The training iterator
# ----------------------------------------------------------------------------------------------------------------


def _process_defaults(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # only for the defaults

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count})")
  return process_index, process_count


class TrainIterator(grain.DatasetIterator):
  """This process's batches; `get_state` / `set_state` carry a JSON-able, process-count independent state."""

  def __init__(self, plan: Plan, mix: mixture.Mixture, process_index: int, process_count: int):
    super().__init__()
    self._inner = None
    cfg = plan.cfg
    if cfg.batch_size % process_count:
      raise ValueError(f"batch_size {cfg.batch_size} is not divisible by process_count {process_count}")
    if cfg.streams % process_count:
      raise ValueError(
        f"num_streams {cfg.streams} is not divisible by process_count {process_count}; choose "
        "num_streams as a multiple of every process count the run may use"
      )
    self.config, self.mixture = cfg, mix
    self.languages: tuple[str, ...] = plan.languages
    self.process_index, self.process_count = process_index, process_count
    per_process = cfg.streams // process_count
    self.stream_ids = tuple(range(process_index * per_process, (process_index + 1) * per_process))
    self._plan = plan
    raise_open_file_limit()
    self._start({"rows": 0, "streams": {str(s): None for s in self.stream_ids}})

  def _start(self, state: Mapping[str, Any]) -> None:
    """Continues from `state`; streams (and workers) start with the next batch."""
    if self._inner is not None:
      self._inner.close()
      self._inner = None
    self._state = {"rows": state["rows"], "streams": {str(s): state["streams"][str(s)] for s in self.stream_ids}}

  def _open(self) -> None:
    cfg = self.config
    workers = min(cfg.num_workers, len(self.stream_ids))
    ds = _RowStreams(self._plan, self.stream_ids, self._state, open_files=max(1, cfg.max_open_files // max(workers, 1)))
    if workers > 0:
      from absl import flags  # grain's worker processes read absl flags; parse them when no app did

      if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
      # Batches come back pickled, not in shared memory: every array in flight would hold a descriptor.
      ds = grain.experimental.WithOptionsIterDataset(ds, grain.experimental.DatasetOptions(min_shm_size=1 << 62))
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=cfg.worker_buffer))
    elif cfg.prefetch > 0:
      ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=cfg.prefetch)
    self._parts = max(workers, 1)  # mp_prefetch interleaves workers round-robin: one part per worker per step
    self._inner = ds.__iter__()

  def __next__(self) -> dict[str, np.ndarray]:
    if self._inner is None:
      self._open()
    parts = [next(self._inner) for _ in range(self._parts)]
    rows_done = {p["_state"]["rows"] for p in parts}
    assert len(rows_done) == 1, f"workers out of step: {rows_done}"
    rows = np.concatenate([p["_rows"] for p in parts])
    order = np.argsort(rows)
    batch = {k: np.concatenate([p[k] for p in parts])[order] for k in BATCH_KEYS}
    streams = {}
    for p in parts:
      streams.update(p["_state"]["streams"])
    self._state = {"rows": rows_done.pop(), "streams": streams}
    return batch

  @property
  def step(self) -> int:
    """Batches of this batch size produced so far (the step of the next batch)."""
    return self._state["rows"] // self._plan.rows_per_stream

  def get_state(self) -> dict[str, Any]:
    return {
      "version": STATE_VERSION,
      "pipeline": dict(self._plan.signature),
      "step": self.step,
      "rows": self._state["rows"],
      "streams": {s: self._state["streams"][s] for s in sorted(self._state["streams"], key=int)},
    }

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Restores a state saved by any process count and batch size (it must hold this process's streams)."""
    if state.get("version") != STATE_VERSION:
      raise ValueError(
        f"iterator state version {state.get('version')} is not {STATE_VERSION} (saved by an older "
        "data_pipeline; a new phase starts with a fresh iterator)"
      )
    saved, now = state["pipeline"], self._plan.signature
    diff = [f"{k}: saved {saved.get(k)!r}, now {now[k]!r}" for k in now if saved.get(k) != now[k]]
    if diff:
      raise ValueError(
        "iterator state belongs to another pipeline (" + "; ".join(diff)[:500] + "); a new phase "
        "starts with a fresh iterator"
      )
    missing = [s for s in self.stream_ids if str(s) not in state["streams"]]
    if missing:
      raise ValueError(
        f"iterator state lacks streams {missing[:8]}{'…' if len(missing) > 8 else ''} of process "
        f"{self.process_index}/{self.process_count}: it holds one process's share; merge the "
        "states of all processes (data_pipeline.checkpoint does)"
      )
    self._start(state)

  def close(self) -> None:
    if self._inner is not None:
      self._inner.close()
      self._inner = None
    if READERS is not None:  # None while the interpreter shuts down
      READERS.close_all()
    super().close()


def make_train_iterator(
  cfg: PipelineConfig, process_index: int | None = None, process_count: int | None = None
) -> TrainIterator:
  """This process's training batches (defaults: jax.process_index() / jax.process_count())."""
  process_index, process_count = _process_defaults(process_index, process_count)
  plan, mix, _ = make_plan(cfg)
  return TrainIterator(plan, mix, process_index, process_count)


# ----------------------------------------------------------------------------------------------------------------
# Held-out evaluation
# ----------------------------------------------------------------------------------------------------------------


def eval_batches(
  cfg: PipelineConfig,
  process_index: int | None = None,
  process_count: int | None = None,
  *,
  languages: Sequence[str] | None = None,
  max_batches: int | None = None,
) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
  """Yields (language, batch) over each language's held-out documents, the same batches on every call.

  Documents are packed in order (no shuffling) into global batches of batch_size rows (the last padded with empty
  rows) and masked with fixed per-row seeds; each process gets its rows. `languages` defaults to the phase's;
  lang_ids index the phase's languages. Languages without eval documents are skipped.
  """
  process_index, process_count = _process_defaults(process_index, process_count)
  if cfg.batch_size % process_count:
    raise ValueError(f"batch_size {cfg.batch_size} is not divisible by process_count {process_count}")
  plan, _, stats = make_plan(cfg)
  eval_shards = mixture.components(stats, list(cfg.budgets), split="eval")
  b = cfg.batch_size // process_count
  for lang in languages or plan.languages:
    if lang not in plan.languages:
      raise ValueError(f"eval language {lang!r} is not in the pipeline's languages {plan.languages}")
    shards = [s for s in eval_shards.get(lang, ()) if s["sequences"]]
    if not shards:
      continue
    li = plan.languages.index(lang)
    ds = grain.MapDataset.source(ShardSource(_shards(fs.path(cfg.data_dir, "data_dir"), shards, cfg.read_threads)))
    ds = ds.map(lambda r, li=li: _decode(r, li))
    # Grain's read threads read ahead in order (the same documents, overlapped).
    ds = ds.to_iter_dataset(
      grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.read_ahead if cfg.read_threads else 0)
    )
    rows = packing.pack(
      ds, cfg.seq_len, packing=cfg.packing, num_bins=cfg.packing_bins, shuffle_bins=False, pad_id=cfg.pad_id
    ).__iter__()
    batch_index = 0
    while max_batches is None or batch_index < max_batches:
      batch_rows = [packing.to_row(r) for _, r in zip(range(cfg.batch_size), rows)]
      if not batch_rows:
        break
      batch_rows += [packing.empty_row(cfg.seq_len)] * (cfg.batch_size - len(batch_rows))
      mine = range(process_index * b, (process_index + 1) * b)
      rngs = [masking.row_rng(cfg.seed, _EVAL, _lang_key(lang), batch_index, r) for r in mine]
      yield lang, _mask(plan, _stack([batch_rows[r] for r in mine]), rngs)
      batch_index += 1
