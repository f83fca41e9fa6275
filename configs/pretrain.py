"""Phase 1, pre-training: 60 languages, tau 0.7, 30% masking, seq 1024, RoPE theta 10k, 2.3T tokens.

  python -m mmbert_jax.main --config=configs/pretrain.py:base --workdir=gs://BUCKET/mmbert-base/pretrain \
      --config.data.data_dir=gs://BUCKET/data

Choices where the sources conflict (docs/RECIPE.md §10): mask rate 30% for both sizes (paper and blog; the base yaml
says 25%); 2.3T tokens (paper, blog, dataset card). Batch 4608 × 1024, grown from 1/12 over the first 60B (base) /
100B (small) tokens by accumulating 1..12 micro-batches of 384 rows. English takes a fixed 34.5% of tokens (its
share in language_counts.csv); the other languages share the rest by n^0.7.
"""
from configs import base


def get_config(size: str = "base"):
  c = base.get_config()
  base.size_overrides(c, size)
  c.phase = "pretrain"
  c.data.languages = "mmbert-pretrain"
  c.data.budgets = {"eng": 0.345}
  c.micro_batch_size = 384
  c.batch_warmup_tokens = {"base": 60_000_000_000, "small": 100_000_000_000}[size]
  c.schedule.warmup_tokens = {"base": 3_000_000_000, "small": 4_000_000_000}[size]
  c.train_tokens = 2_300_000_000_000
  return c
