"""Phase 2, mid-training / context extension: 110 languages, tau 0.5, 15% masking, seq 8192, RoPE theta 160k.

  python -m mmbert_jax.main --config=configs/midtrain.py:base --workdir=gs://BUCKET/mmbert-base/midtrain \
      --config.data.data_dir=gs://BUCKET/data --config.init_from=gs://BUCKET/mmbert-base/pretrain

600B tokens at a constant learning rate, starting from the pre-training checkpoint (`init_from`). Choices
(docs/RECIPE.md §10): 4608 rows × 8192 per step as in the public configs; the small model uses its yaml's halved peak
LR and weight decay (4e-4, 4e-5) and seed 12345. Fixed shares (docs/RECIPE.md §6.1): DCLM 6.7%, the other English
sources 5.5% (English 12.1%), code 3.3%; at most 5 passes over any language. 32 row streams: they divide the
micro-batches the README suggests per slice (32, 64, 576 rows).
"""

from configs import base


def get_config(size: str = "base"):
  c = base.get_config()
  base.size_overrides(c, size)
  c.phase = "midtrain"
  c.model.global_rope_theta = 160_000.0
  c.model.local_rope_theta = 160_000.0
  c.data.languages = "mmbert-mid"
  c.data.budgets = {"dclm": 0.0666, "eng": 0.0548, "code": 0.0333}
  c.data.max_passes = 5.0
  c.data.num_streams = 32
  c.data.tau = 0.5
  c.data.mask_rate = 0.15
  c.data.seq_len = 8192
  c.micro_batch_size = 576
  c.train_tokens = 600_000_000_000
  if size == "small":
    c.seed = 12345
    c.optim.peak_lr = 4e-4
    c.optim.weight_decay = 4e-5
  return c
