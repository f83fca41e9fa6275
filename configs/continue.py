"""Continued pretraining of released weights on new data: a decay-style phase (5% masking, 1−sqrt decay, RoPE
theta 160k) from a transformers ModernBERT / mmBERT directory, over every language of the data with no fixed
English or code share (the data may hold a single new language).

  python -m mmbert_jax.main --config=configs/continue.py:small --workdir=W/fo --config.data.data_dir=DATA_FO \
      --config.init_from=hf/mmbert-small

The argument is the size whose optimizer settings are used (`small` or `base`); the architecture is the
checkpoint's (its config.json). Set `train_tokens` and `schedule.decay_tokens` to the size of the new data.
"""

from configs import decay


def get_config(arg: str = "small"):
  c = decay.get_config(f"all,{arg}")
  c.phase = "decay_continue"
  c.data.budgets = {}
  return c
