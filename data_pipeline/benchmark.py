"""Input-pipeline throughput per process: read → mix → pack → mask → batch, and packing efficiency.

  python -m data_pipeline.benchmark                          # synthetic web-like corpus, seq 1024 and 8192
  python -m data_pipeline.benchmark --data_dir data/ --languages demo-mid --num_workers 4

Without --data_dir the corpus is synthetic: 12 languages with skewed sizes, document lengths log-normal around a
median of 600 tokens (σ = 1.1; web text is of that order), random ids from a 256k vocabulary, prepared with
max_len 8192. Each setting builds batches of about --batch_tokens tokens (rows = batch_tokens / seq_len, one
stream per row) and times --batches of them after a warm-up. Reported per setting:

  slots/s   batch tokens per second (rows × seq_len), what the trainer consumes; the goal is ≥ 1M per process
  real/s    non-padding tokens per second
  /cpu-s    slots per CPU-second of this process (with num_workers 0: the cost of the pipeline on one core,
            unaffected by other load on the machine)
  packing   real tokens / slots
  masked    masked tokens / real tokens (the mask rate, minus rows that hit the K cap)
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Sequence

import numpy as np

from data_pipeline import pipeline, prepare

SPECIAL_IDS = {"pad": 0, "eos": 1, "bos": 2, "unk": 3, "mask": 4}


def synthetic_corpus(data_dir: str, *, languages: int = 12, tokens: int = 24_000_000, vocab_size: int = 256_000,
                     median_len: int = 600, sigma: float = 1.1, max_len: int = 8192, seed: int = 0) -> dict:
  """Writes a prepared corpus of random token documents; language i holds a share ∝ 0.7^i of the tokens."""
  rng = np.random.default_rng(seed)
  share = 0.7 ** np.arange(languages)
  share /= share.sum()

  def docs(budget):
    while budget > 0:
      n = int(np.clip(rng.lognormal(np.log(median_len), sigma), 8, 32_768))
      budget -= n
      yield rng.integers(5, vocab_size, n, dtype=np.int32)

  documents = {f"lang{i:02d}": docs(int(tokens * s)) for i, s in enumerate(share)}
  info = {"path": "synthetic", "kind": "synthetic", "vocab_size": vocab_size, "special_ids": SPECIAL_IDS}
  settings = prepare.Settings(tokenizer="", max_len=max_len, eval_documents=0)
  return prepare.write_pretokenized(data_dir, documents, info, settings)


def run(cfg: pipeline.PipelineConfig, batches: int, warmup: int = 3) -> dict[str, float]:
  """Times `batches` batches of one iterator (after `warmup`) and returns the figures."""
  t0 = time.perf_counter()
  it = pipeline.make_train_iterator(cfg, 0, 1)
  for _ in range(warmup):
    next(it)
  startup = time.perf_counter() - t0
  real = masked = 0
  t0, cpu0 = time.perf_counter(), time.process_time()
  for _ in range(batches):
    b = next(it)
    real += int((b["segment_ids"] > 0).sum())
    masked += int(b["masked_weights"].sum())
  dt, cpu = time.perf_counter() - t0, time.process_time() - cpu0
  it.close()
  slots = batches * cfg.batch_size * cfg.seq_len
  return {"startup_s": startup, "batches_per_s": batches / dt, "slots_per_s": slots / dt, "real_per_s": real / dt,
          "slots_per_cpu_s": slots / cpu, "packing": real / slots, "masked": masked / real}


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m data_pipeline.benchmark", description=__doc__.split("\n")[0])
  parser.add_argument("--data_dir", default=None, help="a prepared corpus (default: a synthetic one)")
  parser.add_argument("--languages", default=None, help="phase languages (default: all)")
  parser.add_argument("--corpus_tokens", type=int, default=24_000_000, help="size of the synthetic corpus")
  parser.add_argument("--seq_lens", default="1024,8192")
  parser.add_argument("--packing", default="first_fit,best_fit")
  parser.add_argument("--batch_tokens", type=int, default=65_536, help="tokens per batch (rows = this / seq_len)")
  parser.add_argument("--batches", type=int, default=60)
  parser.add_argument("--packing_bins", type=int, default=16)
  parser.add_argument("--mask_rate", type=float, default=0.3)
  parser.add_argument("--num_workers", type=int, default=0)
  parser.add_argument("--prefetch", type=int, default=0, help="thread prefetch (0: measure the pipeline alone)")
  args = parser.parse_args(argv)

  with tempfile.TemporaryDirectory() as tmp:
    data_dir = args.data_dir
    if data_dir is None:
      data_dir = tmp
      t0 = time.perf_counter()
      stats = synthetic_corpus(tmp, tokens=args.corpus_tokens)
      t = stats["totals"]["train"]
      print(f"synthetic corpus: {len(stats['languages'])} languages, {t['documents']:,} documents, "
            f"{t['tokens']:,} tokens ({time.perf_counter() - t0:.1f} s to write)")
    print(f"{'seq_len':>8} {'rows':>5} {'packing':>10} {'batch/s':>8} {'slots/s':>10} {'real/s':>10} "
          f"{'/cpu-s':>10} {'packing':>8} {'masked':>7} {'startup':>8}")
    for seq_len in map(int, args.seq_lens.split(",")):
      rows = max(1, args.batch_tokens // seq_len)
      for packer in args.packing.split(","):
        cfg = pipeline.PipelineConfig(
            data_dir=data_dir, languages=args.languages, seq_len=seq_len, batch_size=rows, mask_rate=args.mask_rate,
            packing=packer, packing_bins=args.packing_bins, num_workers=args.num_workers, prefetch=args.prefetch)
        r = run(cfg, args.batches)
        print(f"{seq_len:>8} {rows:>5} {packer:>10} {r['batches_per_s']:>8.1f} {r['slots_per_s'] / 1e6:>9.2f}M "
              f"{r['real_per_s'] / 1e6:>9.2f}M {r['slots_per_cpu_s'] / 1e6:>9.2f}M {r['packing']:>8.3f} "
              f"{r['masked']:>7.3f} {r['startup_s']:>7.1f}s")
    print(f"per process, {os.cpu_count()} CPUs, num_workers={args.num_workers}, load average "
          f"{os.getloadavg()[0]:.1f}" + (" (/cpu-s excludes worker processes)" if args.num_workers else ""))


if __name__ == "__main__":
  main()
