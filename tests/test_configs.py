"""Every recipe number of docs/RECIPE.md in the phase configs, and the configs' internal consistency."""

import pytest
from helpers import load_config

from mmbert_jax import train
from mmbert_jax.model import get_config

B = 1_000_000_000


@pytest.mark.parametrize("size", ["small", "base"])
def test_pretrain(size):
  c = load_config("pretrain", size)
  assert c.model_preset == f"mmbert-{size}"
  assert (c.data.languages, c.data.tau, c.data.mask_rate, c.data.seq_len) == ("mmbert-pretrain", 0.7, 0.30, 1024)
  assert (c.model.global_rope_theta, c.model.local_rope_theta) == (10_000.0, 10_000.0)
  assert c.train_tokens == 2300 * B and c.batch_size == 4608 and c.micro_batch_size == 4608 // 12
  assert c.batch_warmup_tokens == {"small": 100 * B, "base": 60 * B}[size]
  assert c.schedule.warmup_tokens == {"small": 4 * B, "base": 3 * B}[size]
  assert c.schedule.decay_start_tokens < 0  # warmup then constant
  assert (c.optim.name, c.optim.peak_lr, c.optim.weight_decay) == ("stable_adamw", 8e-4, 8e-5)
  assert (c.optim.b1, c.optim.b2, c.optim.eps) == (0.9, 0.95, 1e-8)
  assert c.model.attn_out_dropout == 0.1 and c.seed == 21 and c.checkpoint_every_tokens == 10 * B
  assert dict(c.data.budgets) == {"dclm": 0.3017, "eng": 0.0434, "code": 0.0513} and c.data.max_passes == 5.0


@pytest.mark.parametrize("size", ["small", "base"])
def test_midtrain(size):
  c = load_config("midtrain", size)
  assert (c.data.languages, c.data.tau, c.data.mask_rate, c.data.seq_len) == ("mmbert-mid", 0.5, 0.15, 8192)
  assert (c.model.global_rope_theta, c.model.local_rope_theta) == (160_000.0, 160_000.0)
  assert c.train_tokens == 600 * B and c.batch_size == 4608 and c.batch_warmup_tokens == 0
  assert c.schedule.warmup_tokens == 0 and c.schedule.decay_start_tokens < 0  # constant LR
  assert (c.optim.peak_lr, c.optim.weight_decay, c.seed) == {"small": (4e-4, 4e-5, 12345), "base": (8e-4, 8e-5, 21)}[
    size
  ]


@pytest.mark.parametrize(
  "variant,languages,english", [("eng", "mmbert-mid", 0.179), ("cont", "mmbert-mid", 0.132), ("all", "all", 0.101)]
)
@pytest.mark.parametrize("size", ["small", "base"])
def test_decay(variant, languages, english, size):
  c = load_config("decay", f"{variant},{size}")
  assert c.phase == f"decay_{variant}"
  assert (c.data.languages, c.data.tau, c.data.mask_rate, c.data.seq_len) == (languages, 0.3, 0.05, 8192)
  assert dict(c.data.budgets) == {"eng": english, "code": {"eng": 0.031, "cont": 0.032, "all": 0.055}[variant]}
  assert c.data.max_passes == 5.0
  assert (c.model.global_rope_theta, c.model.local_rope_theta) == (160_000.0, 160_000.0)
  assert c.train_tokens == 100 * B and c.schedule.decay_tokens == 100 * B and c.schedule.decay_start_tokens == 0
  assert c.schedule.decay_shape == "1-sqrt"
  peak, final = (c.optim.peak_lr, c.schedule.final_fraction)
  assert {"base": (8e-4, 0.02), "small": (4e-4, 0.04)}[size] == (peak, final)
  lr = train.lr_schedule(c)
  assert float(lr(0)) == pytest.approx(peak) and float(lr(100 * B)) == pytest.approx(1.6e-5, rel=1e-4)


def test_decay_rejects_unknown_variant():
  with pytest.raises(ValueError, match="variant 'hot' is not one of"):
    load_config("decay", "hot,base")


@pytest.mark.parametrize(
  "name,arg", [("pretrain", "base"), ("midtrain", "small"), ("decay", "all,small"), ("demo", "")]
)
def test_configs_build_a_model_and_an_optimizer(name, arg):
  c = load_config(name, arg)
  cfg = train.model_config(c)
  set_fields = {k: v for k, v in c.model.items() if v is not None}  # None: the preset's value
  assert cfg == get_config(c.model_preset, **{**set_fields, "dtype": cfg.dtype})
  train.optimizer(c)
  assert c.batch_size % train.num_microbatches(c) == 0
