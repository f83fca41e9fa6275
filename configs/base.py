"""Defaults shared by every run; phase configs override only what differs.

Not run on its own; see pretrain.py, midtrain.py, decay.py and demo.py for run commands.
"""

import dataclasses

import ml_collections
from ml_collections import config_dict

from mmbert_jax.model import ModelConfig


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.phase = "pretrain"
  c.seed = 21
  c.workdir = ""  # or --workdir

  # Model: a preset of mmbert_jax.model.PRESETS plus field overrides.
  c.model_preset = "mmbert-base"
  c.model = ml_collections.ConfigDict(
    dict(
      global_rope_theta=10_000.0,
      local_rope_theta=10_000.0,
      attn_out_dropout=0.1,  # original pre-training: dropout only after the attention output projection
      dtype="auto",  # bfloat16 on accelerators, float32 on CPU
      attention_impl="auto",  # splash on TPU, Pallas flash on GPU, XLA on CPU
      remat="none",
      # MLM cross-entropy: "chunked" never holds the [masked, vocab] logits but recomputes them in the backward pass
      # (+1/3 head FLOPs); "dense" holds them and is faster for small ones; "auto" takes dense while one device's
      # float32 logits are at most 1 GiB (CPU runs, tests), chunked above (mmbert-base pre-training on TPU).
      loss_impl="auto",
      loss_chunk_size=8192,
      scan_layers=False,  # True: layers as one scan over global/local groups (compiles once)
    )
  )
  # Every other ModelConfig field can be set as well (--config.model.hidden_size=128); unset, the preset's value.
  for field in dataclasses.fields(ModelConfig):
    if field.name not in c.model:
      c.model[field.name] = config_dict.placeholder(_value_type(field))

  # Data: prepared shards (python -m data_pipeline.prepare) and this phase's mixture and masking.
  c.data = ml_collections.ConfigDict(
    dict(
      data_dir="",
      languages="mmbert-pretrain",  # a named set, a comma-separated list, or "all"
      eval_languages="",  # languages evaluated each phase ("" = the training languages)
      eval_mask_rate=0.0,  # mask rate of the held-out batches (0 = the phase's); fix it to compare phases
      tau=0.7,
      budgets=ml_collections.ConfigDict(),  # fixed token shares {language: share}, taken off the top
      max_passes=0.0,  # cap on passes over a language's data (0 = no cap)
      seq_len=1024,
      mask_rate=0.30,
      max_masked=0,  # masked slots per row for the sparse head (0 = from mask_rate)
      packing="best_fit",
      num_workers=0,
      # Reads with locality: a row stream reads `read_block` consecutive documents of a language per visit (one
      # shard open and one range read) and shuffles the documents of `shuffle_blocks` visits together. Both
      # change the batches (part of the iterator's signature); see data_pipeline/pipeline.py.
      read_block=32,
      shuffle_blocks=8,
      # Reads in flight: the visits of a stream's next buffers, `read_ahead` documents beyond the current one, are
      # read on `read_threads` threads per process, so latency (a gcsfuse mount) overlaps; 0 threads
      # reads serially.
      read_threads=64,
      read_ahead=256,
      # Row streams of the data pipeline, fixed for a run: a resume with another micro_batch_size or host count
      # reads the same rows in the same order. It must divide micro_batch_size and be a multiple of the host
      # count (0 = micro_batch_size: a change of it then needs a fresh data iterator).
      num_streams=0,
    )
  )

  # Batch: `batch_size` rows per optimizer step, accumulated from micro-batches of `micro_batch_size` rows.
  c.batch_size = 4608
  c.micro_batch_size = 0  # 0 = one micro-batch of batch_size rows
  c.batch_warmup_tokens = 0  # grow the batch from batch_warmup_start_fraction over these tokens
  c.batch_warmup_start_fraction = 1 / 12
  c.eval_batch_size = 64
  c.eval_max_batches = 8  # held-out batches per language and eval

  # Optimizer and learning rate (all token counts are rows × seq_len since the phase started).
  c.optim = ml_collections.ConfigDict(
    dict(name="stable_adamw", peak_lr=8e-4, weight_decay=8e-5, b1=0.9, b2=0.95, eps=1e-8)
  )
  c.schedule = ml_collections.ConfigDict(
    dict(warmup_tokens=0, decay_start_tokens=-1, decay_tokens=0, final_fraction=0.02, decay_shape="1-sqrt")
  )
  c.train_tokens = 0

  # Sharding: mesh axis sizes (-1 = all remaining devices).
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  c.jax_cache_dir = ""  # persistent compilation cache (relative: inside the workdir; "" = off)
  c.num_devices = 0  # use only the first N devices of each process (0 = all)
  c.peak_flops_per_device = 0.0  # for MFU on devices missing from mmbert_jax.flops' table (0 = table only)

  # Bookkeeping.
  c.log_every_steps = 10
  c.eval_every_steps = 0  # 0 = only at the end of the phase
  c.checkpoint_every_tokens = 10_000_000_000
  c.keep_checkpoints = 3
  c.storage_warn_s = 30.0  # a bucket that has not answered for this long gets a warning line (retries go on)
  c.storage_timeout_s = 1800.0  # ... and after this long the run stops with exit 1 (the last checkpoint is kept)
  c.skip_nonfinite = False  # False: stop on a non-finite step; True: skip it (parameters unchanged)
  c.max_consecutive_skips = 10  # skip mode stops after this many non-finite steps in a row
  c.allow_config_change = False  # resume even though keys that change the run's math differ from the checkpoint
  c.init_from = ""  # previous phase: a workdir, its checkpoints/ or a checkpoints/<step> dir
  c.init_optimizer_state = False  # also carry the optimizer moments over from init_from
  c.allow_random_init = False  # let a midtrain / decay phase start without init_from (random weights)

  # Watching the run.
  c.log_languages = 10  # per-language tags: the N languages with most and N with fewest tokens
  c.profile_steps = 0  # jax.profiler trace of this many steps into <workdir>/profile (0 = off)
  c.profile_start_step = 10  # ... starting after this many steps (past compilation)
  c.profile_process = 0  # the process that traces (-1 = every process)
  c.wandb = ml_collections.ConfigDict(dict(project="", entity="", name="", group="", mode=""))  # W&B if project
  return c


def _value_type(field: dataclasses.Field) -> type:
  """The type a ModelConfig field takes: its default's, or for a None default the annotation's (`str | None`)."""
  if field.default is not None:
    return type(field.default)
  return {"str": str, "int": int, "float": float, "bool": bool}[str(field.type).split("|")[0].strip()]


def size_overrides(c: ml_collections.ConfigDict, size: str) -> None:
  """mmBERT-small vs mmBERT-base."""
  if size not in ("small", "base"):
    raise ValueError(f"size must be 'small' or 'base', got {size!r}")
  c.model_preset = f"mmbert-{size}"
