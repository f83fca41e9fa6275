"""The benchmark's synthetic corpus and figures."""
import pytest

from data_pipeline import benchmark, pipeline


def test_synthetic_corpus_and_figures(tmp_path):
  stats = benchmark.synthetic_corpus(str(tmp_path), tokens=300_000, max_len=512)
  train = [stats["languages"][f"lang{i:02d}"]["train"]["tokens"] for i in range(12)]
  assert abs(sum(train) - 300_000) < 30_000 and all(a > b for a, b in zip(train, train[1:]))
  cfg = pipeline.PipelineConfig(data_dir=str(tmp_path), seq_len=256, batch_size=8, mask_rate=0.3, prefetch=0)
  r = benchmark.run(cfg, batches=20)
  assert 0.8 < r["packing"] <= 1.0
  assert abs(r["masked"] - 0.3) < 0.03
  assert r["real_per_s"] == pytest.approx(r["slots_per_s"] * r["packing"])
  assert r["slots_per_s"] > 0


def test_command(capsys):
  benchmark.main(["--corpus_tokens", "200000", "--seq_lens", "128,256", "--packing", "best_fit",
                  "--batch_tokens", "1024", "--batches", "4"])
  lines = capsys.readouterr().out.splitlines()
  rows = [l.split() for l in lines if l.split() and l.split()[0] in ("128", "256")]
  assert [(r[0], r[1], r[2]) for r in rows] == [("128", "8", "best_fit"), ("256", "4", "best_fit")]
  assert all(0 < float(r[7]) <= 1 for r in rows)
