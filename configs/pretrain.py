"""Phase 1, pre-training: 60 languages, tau 0.7, 30% masking, seq 1024, RoPE theta 10k, 2.3T tokens.

  python -m mmbert_jax.main --config=configs/pretrain.py:base --workdir=gs://BUCKET/mmbert-base/pretrain \
      --config.data.data_dir=gs://BUCKET/data

Choices where the sources conflict (docs/RECIPE.md §10): mask rate 30% for both sizes (paper and blog; the base yaml
says 25%); 2.3T tokens (paper, blog, dataset card). Batch 4608 × 1024, grown from 1/12 over the first 60B (base) /
100B (small) tokens by accumulating 1..12 micro-batches of 384 rows. Fixed shares
(docs/RECIPE.md §6.1): DCLM 30.2% (prepared with `--source dclm --lang eng`), the other English sources 4.3%
(`--lang eng`), code 5.1% (`--lang code`); the FineWeb2 languages share the rest by n^0.7, none read more than 5
times. The data pipeline's 128 row streams divide every micro-batch of 384 rows and any host count up to 128.
"""

from configs import base


def get_config(size: str = "base"):
  c = base.get_config()
  base.size_overrides(c, size)
  c.phase = "pretrain"
  c.data.languages = "mmbert-pretrain"
  c.data.budgets = {"dclm": 0.3017, "eng": 0.0434, "code": 0.0513}  # English 34.51%, code 5.13%
  c.data.max_passes = 5.0
  c.data.num_streams = 128
  c.micro_batch_size = 384
  c.batch_warmup_tokens = {"base": 60_000_000_000, "small": 100_000_000_000}[size]
  c.schedule.warmup_tokens = {"base": 3_000_000_000, "small": 4_000_000_000}[size]
  c.train_tokens = 2_300_000_000_000
  return c
