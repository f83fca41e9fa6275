"""The benchmarks: the data pipeline's synthetic corpora and figures, and the train step against transformers."""

import importlib.util
import re
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT

from data_pipeline import benchmark, pipeline


def test_synthetic_corpus_and_figures(tmp_path):
  stats = benchmark.synthetic_corpus(str(tmp_path), languages=40, tokens=300_000, max_len=512)
  train = {l: v["train"] for l, v in stats["languages"].items()}
  assert len(train) == 40 and all(t["documents"] >= 2 for t in train.values())
  tokens = np.array([t["tokens"] for t in train.values()])
  assert 300_000 <= tokens.sum() < 450_000 and tokens.max() / tokens.min() > 20  # skewed sizes
  cfg = pipeline.PipelineConfig(
    data_dir=str(tmp_path), seq_len=256, batch_size=8, num_streams=4, mask_rate=0.3, prefetch=0, packing_bins=8
  )
  r = benchmark.run(cfg, hosts=2, cycles=3)
  assert r["batches"] == 3 * 4 and r["rows"] == 4  # a refill cycle: 8 bins / 2 rows per stream
  assert 0.8 < r["packing"] <= 1.0 and 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"]
  assert r["tokens_per_s"] > 0 and 0 < r["files"] < 256


def test_index_corpus(tmp_path):
  stats = benchmark.index_corpus(str(tmp_path), 5000, languages=30, shard_documents=400)
  assert abs(stats["totals"]["train"]["documents"] - 5000) <= 30
  shards = [s for v in stats["languages"].values() for s in v["train"]["shards"]]
  assert max(s["sequences"] for s in shards) == 400 and len(shards) > 30
  it = pipeline.make_train_iterator(
    pipeline.PipelineConfig(data_dir=str(tmp_path), seq_len=64, batch_size=4, mask_rate=0.3, prefetch=0), 0, 1
  )
  assert next(it)["input_ids"].shape == (4, 64)
  it.close()


def test_command(capsys):
  benchmark.main(
    ["--corpus_tokens", "200000", "--num_languages", "20", "--settings", "decay", "--workers", "0", "--cycles", "1"]
  )
  lines = capsys.readouterr().out.splitlines()
  rows = [l.split() for l in lines if l.split() and l.split()[0] == "decay"]
  assert [(r[1], r[2], r[3]) for r in rows] == [("8192", "4", "0")]
  assert 0 < float(rows[0][12]) <= 1 and float(rows[0][14]) >= 0 and float(rows[0][8]) >= 1


def test_injected_read_latency(capsys):
  """--read_latency_ms: serial reads are one at a time and slow; read threads overlap them."""
  benchmark.main(
    [
      "--corpus_tokens",
      "200000",
      "--num_languages",
      "20",
      "--settings",
      "pretrain",
      "--workers",
      "0",
      "--cycles",
      "1",
      "--read_latency_ms=3",
      "--read_threads",
      "0,8",
    ]
  )
  lines = capsys.readouterr().out.splitlines()
  rows = [l.split() for l in lines if l.split() and l.split()[0] == "pretrain"]
  assert [(r[16], r[17], r[18]) for r in rows] == [("0", "3.0ms", "1"), ("8", "3.0ms", rows[1][18])]
  assert int(rows[1][18]) >= 4 and all(float(r[10].rstrip("M")) > 0 for r in rows)
  pipeline.READERS.latency_s = 0.0


def test_injected_open_latency_and_blocks(tmp_path):
  """--open_latency_ms sleeps in every shard open: read serially, a batch takes, and waits for reads, at least its
  opens × the latency; documents read in blocks open fewer shards per batch than documents read one at a time."""
  benchmark.synthetic_corpus(str(tmp_path), languages=30, tokens=400_000, max_len=512)
  opens = {}
  for block in (1, 32):
    cfg = pipeline.PipelineConfig(
      data_dir=str(tmp_path),
      seq_len=512,
      batch_size=8,
      num_streams=4,
      mask_rate=0.3,
      prefetch=0,
      packing_bins=4,
      read_threads=0,
      read_block=block,
      open_latency_ms=20,
      max_open_files=4,
    )
    r = benchmark.run(cfg, hosts=2, cycles=2)
    batch_s = r["rows"] * cfg.seq_len / r["tokens_per_s"]
    assert r["opens_per_batch"] > 0 and batch_s >= 0.02 * r["opens_per_batch"], r
    # read serially, every open is waited for: the wait figures hold at least the sleeps
    assert r["wait_share"] * batch_s >= 0.02 * r["opens_per_batch"] and r["wait_p99_ms"] >= 20, r
    opens[block] = r["opens_per_batch"]
  pipeline.READERS.open_latency_s = 0.0
  assert opens[32] < opens[1] / 2, opens


@pytest.mark.slow
def test_versus_torch_prints_both_sides_and_their_ratio():
  """The train-step comparison with transformers at a tiny shape: one alternated run per side, each on one core."""
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  args = ["--preset=tiny", "--layers=2", "--vocab=1000", "--seq_len=64", "--batch=2", "--runs=1", "--warmup=1"]
  proc = subprocess.run(
    [sys.executable, "-m", "mmbert_jax.benchmarks.versus_torch", *args, "--steps=2", "--threads=1"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = proc.stdout
  assert "hidden 64, intermediate 96, 4 heads, 2 layers, vocab 1000, 2 × 64 tokens, 19 masked per row" in out
  assert "1 threads per side" in out and "load average before:" in out and "children's CPU" in out
  runs = {m[0]: m[1:] for m in re.findall(r"run 1 (jax|torch)\s+tokens/s\s+([\d,]+).*?loss ([\d.]+) → ([\d.]+)", out)}
  assert set(runs) == {"jax", "torch"}, out
  for tokens, first, last in runs.values():
    assert float(tokens.replace(",", "")) > 0
    assert abs(float(first) - np.log(1000)) < 0.5  # a freshly initialised model predicts about uniformly
    assert float(last) < float(first)  # three AdamW steps on one batch lower its loss
  median = {m[0]: float(m[1].replace(",", "")) for m in re.findall(r"median (jax|torch)\s+tokens/s\s+([\d,]+)", out)}
  ratio = float(re.search(r"ratio jax/torch ([\d.]+)", out).group(1))
  assert median["jax"] == float(runs["jax"][0].replace(",", "")) and ratio == pytest.approx(
    median["jax"] / median["torch"], rel=0.05, abs=0.01
  )
  # The GEMMs timed alone are the step's linear layers and sparse head: flops.py's count for this batch.
  from mmbert_jax import flops, get_config

  cfg = get_config("tiny", num_layers=2, vocab_size=1000)
  f = flops.training_flops(cfg, np.ones((2, 64), np.int32), num_masked=2 * 19)
  gemms = re.findall(r"median (jax|torch)\s+GEMMs alone\s+([\d.]+) ms \(([\d,.]+) GFLOP/s of ([\d,.]+) GFLOP\)", out)
  assert {g[0] for g in gemms} == {"jax", "torch"}, out
  for _, ms, rate, gflop in gemms:
    assert float(gflop) == pytest.approx((f.linears + f.head) / 1e9, rel=1e-3)
    assert float(rate.replace(",", "")) == pytest.approx(float(gflop) / float(ms) * 1e3, rel=0.02)
  assert len(re.findall(r"run 1 (?:jax|torch) .*GEMMs alone\s+[\d.]+ ms", out)) == 2, out


def test_versus_torch_names_the_missing_extra(monkeypatch):
  from mmbert_jax.benchmarks import versus_torch

  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
  assert versus_torch.missing_torch() == (
    "torch not installed: the PyTorch side needs the test extra (pip install -e '.[test]')"
  )
  monkeypatch.setattr(importlib.util, "find_spec", real)
  assert versus_torch.missing_torch() is None or importlib.util.find_spec("torch") is None
