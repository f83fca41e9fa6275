"""The embedded demo: a tiny mmBERT trained through all three phases on a multilingual corpus built at run time
from the CLDR locale data in `babel` (no download), then TIES-merged. About 8 minutes on 2 idle CPU cores.

  python -m mmbert_jax.main --config=configs/demo.py --workdir=/tmp/mmbert_demo

pretrain (12 languages, tau 0.7, 30% masking, seq 128, theta 10k) → midtrain (36 languages, tau 0.5, 15%,
seq 256, theta 160k) → decay_eng / decay_cont / decay_all (tau 0.3, 5%, 1−sqrt decay; decay_all adds every other
CLDR language, e.g. Faroese `fo` and Tigrinya `ti`) → TIES merge of the three decay variants. After each phase it
prints the held-out MLM loss per language; languages that enter only in decay_all show how much they gain. Last,
each of the six checkpoints is fine-tuned on the two embedded downstream tasks that measure pretraining (word
order: were a list's words shuffled? in 59 languages, and the same learnt in English only and scored in the 58
others) and scored side by side with the same model at random weights and each task's chance level.
"""

import ml_collections

from configs import base

DECAY = dict(
  init_from_phase="midtrain",
  data=dict(tau=0.3, mask_rate=0.05),
  schedule=dict(decay_start_tokens=0, decay_tokens=120_000, final_fraction=0.02, decay_shape="1-sqrt"),
  train_tokens=120_000,
)


def get_config(arg: str = ""):
  del arg
  c = base.get_config()
  c.seed = 0
  c.model_preset = "tiny"
  c.model.vocab_size = 2000
  c.model.attn_out_dropout = 0.0
  c.demo_corpus = ml_collections.ConfigDict(dict(languages="demo-decay", scale=1.0, vocab_size=2000))
  c.data.seq_len = 128
  c.data.eval_languages = "en,de,ru,zh,ar,hi,nl,sw,ta,fi,cy,is,fo,ti"
  c.data.eval_mask_rate = 0.15
  c.batch_size = 16
  c.micro_batch_size = 8
  c.eval_batch_size = 16
  c.eval_max_batches = 2
  c.optim.peak_lr = 3e-3
  c.optim.weight_decay = 1e-5
  c.log_every_steps = 25
  c.checkpoint_every_tokens = 200_000
  c.keep_checkpoints = 2
  c.jax_cache_dir = "jax_cache"  # the three decay variants share one compiled step

  c.phases = ("pretrain", "midtrain", "decay_eng", "decay_cont", "decay_all")
  c.phase_overrides = ml_collections.ConfigDict(
    dict(
      pretrain=dict(
        data=dict(languages="demo-pretrain", tau=0.7, mask_rate=0.30, seq_len=128),
        batch_warmup_tokens=60_000,
        schedule=dict(warmup_tokens=40_000),
        train_tokens=800_000,
      ),
      midtrain=dict(
        init_from_phase="pretrain",
        model=dict(global_rope_theta=160_000.0, local_rope_theta=160_000.0),
        data=dict(languages="demo-mid", tau=0.5, mask_rate=0.15, seq_len=256),
        train_tokens=240_000,
      ),
      decay_eng=_decay("demo-mid", english=0.25),
      decay_cont=_decay("demo-mid"),
      decay_all=_decay("demo-decay"),
    )
  )
  c.merge = ml_collections.ConfigDict(
    dict(method="ties", base="midtrain", models=("decay_eng", "decay_cont", "decay_all"), density=0.5, lam=1.0)
  )
  # Then every phase and the merge are fine-tuned and scored on the embedded CLDR word-order tasks
  # (mmbert_jax.finetune), next to the same model with random weights (random_init) and each task's chance level.
  # 64 tokens hold 95% of their test texts whole (at 32, 41% lost their end, where a shuffle often shows).
  c.downstream = ml_collections.ConfigDict(
    dict(
      tasks=("cldr_order", "cldr_order_en"),
      epochs=0,  # 0: by model size (mmbert_jax.finetune.Settings.for_model: 10 epochs at 3e-4 for this size)
      batch_size=32,
      peak_lr=0.0,
      max_len=64,
      random_init=True,
    )
  )
  return c


def _decay(languages: str, english: float = 0.0):
  phase = dict(DECAY, model=dict(global_rope_theta=160_000.0, local_rope_theta=160_000.0))
  phase["data"] = dict(DECAY["data"], languages=languages, seq_len=256, budgets={"en": english} if english else {})
  return phase
