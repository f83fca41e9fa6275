"""Input-pipeline figures per process: start-up, open files, batch-time percentiles, tokens/s, index memory.

  python -m data_pipeline.benchmark                          # synthetic corpus of 1,834 languages
  python -m data_pipeline.benchmark --data_dir data/ --languages all --workers 0,4
  python -m data_pipeline.benchmark --index_documents 50000000   # index memory per document, 1,834 languages
  python -m data_pipeline.benchmark --settings pretrain --workers 0 --read_latency_ms 5 --read_threads 0,16
  python -m data_pipeline.benchmark --settings decay --workers 0 --open_latency_ms 50 --read_latency_ms 5  # gcsfuse

Without --data_dir the corpus is synthetic: --num_languages languages (default 1,834, FineWeb2's count) whose
token counts spread log-uniformly over four orders of magnitude, document lengths log-normal around a median of
600 tokens (σ = 1.1; web text is of that order), random ids from a 256k vocabulary, prepared with max_len 8192.

Each setting is one host's share of a recipe micro-batch (--hosts hosts, configs/pretrain.py and configs/decay.py
with the README's v5p-64 micro-batch for seq 8192): the iterator of process 0 of --hosts, with the config's
num_streams. It is timed batch by batch over --cycles refill cycles after one cycle of warm-up; a cycle is
packing_bins / rows-per-stream batches, in which every stream gives out as many rows as it keeps open (a packer
that fills all its bins at once would refill once per cycle, so p50 / p99 over whole cycles would see it).
Reported per setting:

  startup   seconds from building the iterator to its first batch (stats.json, mixture, first refill)
  p50 p99   batch time percentiles (ms); the goal is p99 ≤ 3 × p50
  cpu       p99 / p50 of the CPU time per batch of this process (in-process runs: the same ratio without the
            waits that other load on the machine adds)
  tokens/s  batch tokens (rows × seq_len) per second, what the trainer consumes
  /cpu-s    batch tokens per CPU-second of this process (in-process runs: the pipeline's cost on one core,
            unaffected by other load on the machine)
  packing   real tokens / batch tokens
  files     most open file descriptors seen, this process and its workers together (goal ≤ 256)
  opens     shard readers opened per batch (least-recently-used cache misses; in-process runs only)
  threads   read threads per process (`PipelineConfig.read_threads`; 0: one read after the other)
  latency   injected sleep per read request (--read_latency_ms: a network disk; a stream's visit reads its block
            of consecutive documents in one request; the sleep runs in the thread that reads, so what overlaps in
            real reads overlaps here)
  inflight  most read requests in progress at once (in-process runs only)
  open      injected sleep per shard open (--open_latency_ms: a gcsfuse mount's round trip to the bucket)
  block     documents per visit (--read_block; `PipelineConfig.read_block`, shuffle_blocks visits per buffer)
  cpu_s     CPU seconds of this process over the timed batches (in-process runs only)
  wait99    p99 of the time per batch its packers waited for reads that read-ahead had not finished (ms): the
            part of the batch time that reads make; the rest is CPU, and, on a loaded machine, waiting for one
  waited    that wait over all batches, as a share of the batch time (in-process runs only)

--index_documents N writes N tiny documents over the languages (shards of at most 1M documents, like one FineWeb2
parquet file each), then reads decay batches and reports this process's anonymous memory, and the same for N / 4
documents, each in a fresh process: the index memory per document is the growth between the two sizes (the
pipeline's fixed state, the same at both, drops out); then with the largest shards all open (goal ≤ 2 bytes per
document).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import tempfile
import time
from collections.abc import Sequence

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from data_pipeline import cli, pipeline, prepare
from data_pipeline import filesystem as fs

SPECIAL_IDS = {"pad": 0, "eos": 1, "bos": 2, "unk": 3, "mask": 4}
TOKENIZER_INFO = {"path": "synthetic", "kind": "synthetic", "vocab_size": 256_000, "special_ids": SPECIAL_IDS}
# One host's share: the recipe's micro-batch rows and num_streams (configs/), on 8 hosts by default.
SETTINGS = {
  "pretrain": dict(seq_len=1024, batch_size=384, num_streams=128, mask_rate=0.30, tau=0.7),
  "decay": dict(seq_len=8192, batch_size=32, num_streams=32, mask_rate=0.05, tau=0.3),
}


def language_shares(languages: int, seed: int = 0) -> dict[str, float]:
  """Token shares of `languages` synthetic languages, log-uniform over four orders of magnitude."""
  rng = np.random.default_rng(seed)
  share = np.exp(rng.uniform(0.0, np.log(1e4), languages))
  share /= share.sum()
  return {f"l{i:04d}_Synt": float(s) for i, s in enumerate(share)}


def synthetic_corpus(
  data_dir: str,
  *,
  languages: int = 1834,
  tokens: int = 24_000_000,
  vocab_size: int = 256_000,
  median_len: int = 600,
  sigma: float = 1.1,
  max_len: int = 8192,
  seed: int = 0,
) -> dict:
  """Writes a prepared corpus of random token documents (at least 2 documents per language)."""
  rng = np.random.default_rng(seed)

  def docs(budget):
    for i in range(10**9):
      if budget <= 0 and i >= 2:
        return
      n = int(np.clip(rng.lognormal(np.log(median_len), sigma), 8, 32_768))
      budget -= n
      yield rng.integers(5, vocab_size, n, dtype=np.int32)

  documents = {lang: docs(int(tokens * s)) for lang, s in language_shares(languages, seed).items()}
  settings = prepare.Settings(tokenizer="", max_len=max_len, eval_documents=0)
  return prepare.write_pretokenized(data_dir, documents, dict(TOKENIZER_INFO, vocab_size=vocab_size), settings)


def index_corpus(data_dir: str, documents: int, *, languages: int = 1834, shard_documents: int = 1_000_000) -> dict:
  """`documents` two-token documents over the languages, written straight to shards (fast), and stats.json."""
  bos, eos = SPECIAL_IDS["bos"], SPECIAL_IDS["eos"]
  record = np.asarray([bos, 7, 8, eos], prepare.TOKEN_DTYPE).tobytes()
  shares = language_shares(languages)
  counts = np.maximum(1, np.floor(np.asarray(list(shares.values())) * documents)).astype(np.int64)
  records = []
  for lang, n in zip(shares, counts):
    for first in range(0, int(n), shard_documents):
      size = min(shard_documents, int(n) - first)
      name = f"index-{first // shard_documents:05d}"
      # local-only: ArrayRecord writes local files (the benchmark's corpus is a local temporary folder)
      path = os.path.join(lang, "train", f"{name}.array_record")
      os.makedirs(os.path.join(data_dir, lang, "train"), exist_ok=True)  # local-only: as above
      writer = ArrayRecordWriter(os.path.join(data_dir, path), prepare.WRITER_OPTIONS)  # local-only: as above
      for _ in range(size):
        writer.write(record)
      writer.close()
      records.append(
        {
          "unit": f"{name}-{lang}",
          "source": "index",
          "languages": {lang: {"train": {"documents": size, "sequences": size, "tokens": 4 * size, "path": path}}},
        }
      )
  settings = prepare.Settings(tokenizer="", max_len=8, eval_documents=0)
  stats = prepare.aggregate(records, TOKENIZER_INFO, settings)
  prepare._atomic_write_json(fs.path(data_dir, "data_dir") / "stats.json", stats)
  return stats


def open_files() -> int:
  """Open file descriptors of this process and its children (grain's workers)."""
  pids = [os.getpid()]
  for task in os.listdir("/proc/self/task"):  # local-only: /proc of this machine
    try:
      with open(f"/proc/self/task/{task}/children") as f:  # local-only: /proc
        pids += [int(p) for p in f.read().split()]
    except OSError:
      pass
  total = 0
  for pid in pids:
    try:
      total += len(os.listdir(f"/proc/{pid}/fd"))  # local-only: /proc
    except OSError:
      pass
  return total


def anon_memory() -> int:
  with open("/proc/self/status") as f:  # local-only: /proc
    for line in f:
      if line.startswith("RssAnon:"):
        return int(line.split()[1]) * 1024
  return 0


def run(cfg: pipeline.PipelineConfig, hosts: int, cycles: int) -> dict[str, float]:
  """Times one host's batches over `cycles` refill cycles after one cycle of warm-up."""
  rows = cfg.batch_size // cfg.streams
  cycle = cfg.packing_bins // math.gcd(cfg.packing_bins, rows)
  t0 = time.perf_counter()
  it = pipeline.make_train_iterator(cfg, 0, hosts)
  next(it)
  startup = time.perf_counter() - t0
  files = open_files()
  for _ in range(cycle - 1):
    next(it)
  times, real, opened, cpu = [], 0, pipeline.READERS.opened, time.process_time()
  pipeline.READERS.max_in_flight = 0
  cpu_times, waits = [], []
  for _ in range(cycles * cycle):
    t, c, w = time.perf_counter(), time.process_time(), pipeline.READERS.waited_s
    b = next(it)
    times.append(time.perf_counter() - t)
    cpu_times.append(time.process_time() - c)
    waits.append(pipeline.READERS.waited_s - w)
    real += int((b["segment_ids"] > 0).sum())
    files = max(files, open_files())
  opened = pipeline.READERS.opened - opened  # counted in this process: with workers 0 only
  inflight = pipeline.READERS.max_in_flight
  cpu = time.process_time() - cpu
  it.close()
  times = np.asarray(times)
  slots = len(times) * b["segment_ids"].size
  return {
    "startup_s": startup,
    "p50_ms": 1e3 * np.percentile(times, 50),
    "p99_ms": 1e3 * np.percentile(times, 99),
    "max_ms": 1e3 * times.max(),
    "tokens_per_s": slots / times.sum(),
    "packing": real / slots,
    "files": files,
    "batches": len(times),
    "rows": b["segment_ids"].shape[0],
    "in_flight": inflight if not cfg.num_workers else float("nan"),
    "opens_per_batch": opened / len(times) if not cfg.num_workers else float("nan"),
    "tokens_per_cpu_s": slots / cpu if not cfg.num_workers else float("nan"),
    "cpu_s": cpu if not cfg.num_workers else float("nan"),
    "wait_p99_ms": 1e3 * np.percentile(waits, 99) if not cfg.num_workers else float("nan"),
    "wait_share": sum(waits) / times.sum() if not cfg.num_workers else float("nan"),
    "cpu_p99_p50": (
      np.percentile(cpu_times, 99) / np.percentile(cpu_times, 50) if not cfg.num_workers else float("nan")
    ),
  }


def _index_memory_once(documents: int, languages: int, hosts: int, batches: int, largest: bool) -> dict:
  """In a fresh process: the anonymous memory an iterator over `documents` tiny documents holds after `batches`
  decay batches, and (largest=True) then with the largest shards all open."""
  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    stats = index_corpus(tmp, documents, languages=languages)
    out = {
      "write_s": time.perf_counter() - t0,
      "documents": stats["totals"]["train"]["documents"],
      "shards": sum(len(v["train"]["shards"]) for v in stats["languages"].values()),
      "languages": len(stats["languages"]),
    }
    cfg = pipeline.PipelineConfig(data_dir=tmp, **dict(SETTINGS["decay"], seq_len=1024), prefetch=0)
    base = anon_memory()
    t0 = time.perf_counter()
    it = pipeline.make_train_iterator(cfg, 0, hosts)
    out["plan_s"] = time.perf_counter() - t0
    next(it)
    out["first_s"] = time.perf_counter() - t0 - out["plan_s"]
    files = open_files()
    for _ in range(batches):
      next(it)
      files = max(files, open_files())
    out.update(used=anon_memory() - base, files=files, opened=pipeline.READERS.opened)
    if largest:  # the worst case for the index: the open readers all hold the largest shards
      shards = sorted(((n, p) for p, n in (s for v in it._plan.shards for s in v)), reverse=True)
      pipeline.READERS.close_all()
      base = anon_memory()
      held = shards[: pipeline.READERS.capacity]
      for n, path in held:
        pipeline.READERS.read(path, n, n - 1)
      out.update(held=len(held), held_documents=sum(n for n, _ in held), held_used=anon_memory() - base)
    it.close()
  return out


def index_memory(documents: int, languages: int, hosts: int, batches: int) -> None:
  runs = []
  with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
    for n, largest in ((documents // 4, False), (documents, True)):
      r = pool.apply(_index_memory_once, (n, languages, hosts, batches, largest))
      runs.append(r)
      print(
        f"{r['documents']:>13,} documents in {r['shards']} shards of {r['languages']} languages ({r['write_s']:.0f} s "
        f"to write): iterator built in {r['plan_s']:.1f} s, first batch {r['first_s']:.1f} s, {r['opened']:,} shard "
        f"opens, {r['files']} open files after {batches + 1} batches; anonymous memory +{r['used'] / 2**20:.0f} MiB "
        f"({r['used'] / r['documents']:.2f} bytes/document, fixed state included)"
      )
  small, big = runs
  per_doc = (big["used"] - small["used"]) / (big["documents"] - small["documents"])
  print(
    f"index memory: {per_doc:.2f} bytes per document (growth from {small['documents']:,} to {big['documents']:,} "
    f"documents); fixed state {(small['used'] - per_doc * small['documents']) / 2**20:.0f} MiB"
  )
  print(
    f"{big['held']} largest shards open ({big['held_documents']:,} documents): +{big['held_used'] / 2**20:.0f} MiB = "
    f"{big['held_used'] / big['held_documents']:.2f} bytes per document they hold"
  )


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.ArgumentParser(prog="python -m data_pipeline.benchmark", description=__doc__.split("\n")[0])
  parser.add_argument("--data_dir", default=None, help="a prepared corpus (default: a synthetic one)")
  parser.add_argument("--languages", default=None, help="phase languages (default: all)")
  parser.add_argument("--num_languages", type=int, default=1834, help="languages of the synthetic corpus")
  parser.add_argument("--corpus_tokens", type=int, default=24_000_000, help="size of the synthetic corpus")
  parser.add_argument("--settings", default="pretrain,decay", help=f"of {', '.join(SETTINGS)}")
  parser.add_argument("--hosts", type=int, default=8, help="hosts sharing each micro-batch")
  parser.add_argument("--workers", default="0,2", help="grain worker processes per process, comma-separated")
  parser.add_argument("--cycles", type=int, default=8, help="refill cycles timed per setting")
  parser.add_argument("--read_threads", default="64", help="read threads per process, comma-separated")
  parser.add_argument("--read_latency_ms", type=float, default=0.0, help="injected sleep per read request")
  parser.add_argument("--open_latency_ms", type=float, default=0.0, help="injected sleep per shard open")
  parser.add_argument("--read_block", default="32", help="documents per visit, comma-separated")
  parser.add_argument("--shuffle_blocks", type=int, default=8, help="visits shuffled together")
  parser.add_argument("--read_ahead", type=int, default=256, help="documents each stream requests ahead")
  parser.add_argument("--packing", default="best_fit")
  parser.add_argument("--packing_bins", type=int, default=16)
  parser.add_argument("--index_documents", type=int, default=0, help="measure index memory at this many documents")
  args = parser.parse_args(argv)

  print(f"RLIMIT_NOFILE soft/hard after raising: {pipeline.raise_open_file_limit()}")
  blocks = [int(b) for b in args.read_block.split(",")]
  if args.index_documents:
    index_memory(args.index_documents, args.num_languages, args.hosts, batches=200)
    return
  with tempfile.TemporaryDirectory() as tmp:
    data_dir = args.data_dir
    if data_dir is None:
      data_dir = tmp
      t0 = time.perf_counter()
      stats = synthetic_corpus(tmp, languages=args.num_languages, tokens=args.corpus_tokens)
      t = stats["totals"]["train"]
      print(
        f"synthetic corpus: {len(stats['languages'])} languages, {t['documents']:,} documents, "
        f"{t['tokens']:,} tokens ({time.perf_counter() - t0:.1f} s to write)"
      )
    print(
      f"{'setting':>9} {'seq':>5} {'rows':>5} {'workers':>7} {'startup':>8} {'p50':>8} {'p99':>8} {'p99/p50':>7} "
      f"{'cpu':>5} {'max':>8} {'tokens/s':>9} {'/cpu-s':>7} {'packing':>7} {'files':>5} {'opens':>6} "
      f"{'batches':>7} {'threads':>7} {'latency':>8} {'inflight':>8} {'open':>8} {'block':>5} {'cpu_s':>6} "
      f"{'wait99':>7} {'waited':>6}"
    )
    for name in args.settings.split(","):
      for workers in map(int, args.workers.split(",")):
        for threads, block in [(t, b) for t in map(int, args.read_threads.split(",")) for b in blocks]:
          cfg = pipeline.PipelineConfig(
            data_dir=data_dir,
            languages=args.languages,
            packing=args.packing,
            packing_bins=args.packing_bins,
            num_workers=workers,
            prefetch=0,
            read_threads=threads,
            read_latency_ms=args.read_latency_ms,
            open_latency_ms=args.open_latency_ms,
            read_block=block,
            shuffle_blocks=args.shuffle_blocks,
            read_ahead=args.read_ahead,
            **SETTINGS[name],
          )
          r = run(cfg, args.hosts, args.cycles)
          print(
            f"{name:>9} {cfg.seq_len:>5} {r['rows']:>5} {workers:>7} {r['startup_s']:>7.1f}s "
            f"{r['p50_ms']:>6.1f}ms {r['p99_ms']:>6.1f}ms {r['p99_ms'] / r['p50_ms']:>7.2f} "
            f"{r['cpu_p99_p50']:>5.2f} {r['max_ms']:>6.1f}ms {r['tokens_per_s'] / 1e6:>8.2f}M "
            f"{r['tokens_per_cpu_s'] / 1e6:>6.2f}M {r['packing']:>7.3f} {r['files']:>5} "
            f"{r['opens_per_batch']:>6.1f} {r['batches']:>7} {threads:>7} {args.read_latency_ms:>6.1f}ms "
            f"{r['in_flight']:>8} {args.open_latency_ms:>6.1f}ms {block:>5} {r['cpu_s']:>6.1f} "
            f"{r['wait_p99_ms']:>5.1f}ms {r['wait_share']:>6.1%}"
          )
    print(f"one host of {args.hosts}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main()
