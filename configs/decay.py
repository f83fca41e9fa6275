"""Phase 3, decay: tau 0.3, 5% masking, seq 8192, RoPE theta 160k, 100B tokens, 1−sqrt decay to 2% of the peak LR.

  python -m mmbert_jax.main --config=configs/decay.py:all,base --workdir=gs://BUCKET/mmbert-base/decay_all \
      --config.data.data_dir=gs://BUCKET/data --config.init_from=gs://BUCKET/mmbert-base/midtrain

The argument is `variant[,size]`: variant `eng` (110 languages, English raised to 17.9%, code 3.1%), `cont` (the
110 mid-training languages, English 13.2%, code 3.2%) or `all` (every language in the data, 1833 in mmBERT,
English 10.1%, code 5.5%); no language is read more than 5 times;
size `base` (default) or `small`. All three start from the same mid-training checkpoint and are merged afterwards
(python -m mmbert_jax.merge). Choices (docs/RECIPE.md §10): the decay shape is 1−sqrt for both sizes (the base yaml;
the small yaml says linear); the small model decays from its 4e-4 peak to 1.6e-5 (final fraction 0.04), the same
final LR as its yaml.
"""

from configs import base

VARIANTS = {
  # variant: (language set, English share, code share) from mmBERT's token counts per language (docs/RECIPE.md §6.1)
  "eng": ("mmbert-mid", 0.179, 0.031),
  "cont": ("mmbert-mid", 0.132, 0.032),
  "all": ("all", 0.101, 0.055),
}


def get_config(arg: str = "all,base"):
  variant, _, size = arg.partition(",")
  if variant not in VARIANTS:
    raise ValueError(f"configs/decay.py: variant {variant!r} is not one of {sorted(VARIANTS)} (use e.g. 'all,base')")
  size = size or "base"
  c = base.get_config()
  base.size_overrides(c, size)
  c.phase = f"decay_{variant}"
  c.model.global_rope_theta = 160_000.0
  c.model.local_rope_theta = 160_000.0
  c.data.languages, english, code = VARIANTS[variant]
  c.data.budgets = {"eng": english, "code": code}  # the sources' split of English is not published for decay
  c.data.max_passes = 5.0  # docs/RECIPE.md §6.2: no language read more than 5 times
  c.data.num_streams = 32
  c.data.tau = 0.3
  c.data.mask_rate = 0.05
  c.data.seq_len = 8192
  c.micro_batch_size = 576
  c.schedule.decay_start_tokens = 0
  c.schedule.decay_tokens = 100_000_000_000
  c.schedule.decay_shape = "1-sqrt"
  c.train_tokens = 100_000_000_000
  if size == "small":
    c.seed = 12345
    c.optim.peak_lr = 4e-4
    c.optim.weight_decay = 4e-5
    c.schedule.final_fraction = 0.04
  return c
