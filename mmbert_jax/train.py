"""Training loop of one phase: `train_and_evaluate(config, workdir)`.

Reads top to bottom: config → components; model state (sharded by the logical axis rules); loss and the train
step (gradient accumulation over micro-batches, StableAdamW, token-driven learning rate); the training program
(`build_program`: the one place that lays out parameters and optimizer state, describes the batch and jits the
step, for the loop, ahead-of-time compilation, benchmarks and tests alike); host batches → global arrays;
preemption; and `PhaseRun`, which sets up mesh, program, data and writers (resuming this run's checkpoint, or
handing off from `config.init_from`) and runs the loop with metrics, eval, checkpoints and preemption.

The schedule's clock is *slot tokens* (rows × seq_len), known on every host without a device sync; real
(non-padding) tokens are counted per language for metrics and carried across phases.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import signal
import time
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from data_pipeline import mixture as mixture_lib
from data_pipeline import pipeline as data_lib
from mmbert_jax import attention as attention_lib
from mmbert_jax import checkpoint as ckpt_lib
from mmbert_jax import cli, hf, optim, progress, schedules, sharding, storage
from mmbert_jax import flops as flops_lib
from mmbert_jax import metrics as metrics_lib
from mmbert_jax import model as model_lib
from mmbert_jax.model import RUNTIME_FIELDS, MaskedLM, ModelConfig, abstract_model, get_config


class NonFiniteLossError(RuntimeError):
  pass


class ConfigChangeError(ValueError):
  """A resumed run's config differs from its checkpoint's in keys that change what is trained."""


# Keys a resumed run may change freely: how it runs and reports, not what it computes. Every other key (model,
# optimizer, schedule, data mixture, batch, seed) must match the checkpoint's unless allow_config_change is set.
BOOKKEEPING_KEYS = frozenset(
  {
    "phase",
    "workdir",
    "train_tokens",
    "mesh",
    "num_devices",
    "jax_cache_dir",
    "peak_flops_per_device",
    "log_every_steps",
    "eval_every_steps",
    "eval_batch_size",
    "eval_max_batches",
    "checkpoint_every_tokens",
    "keep_checkpoints",
    "storage_warn_s",
    "storage_timeout_s",
    "skip_nonfinite",
    "max_consecutive_skips",
    "allow_config_change",
    "init_from",
    "init_optimizer_state",
    "data.data_dir",
    "data.num_workers",
    "data.read_threads",
    "data.read_ahead",
    "data.eval_languages",
    "data.eval_mask_rate",
  }
  | {f"model.{name}" for name in RUNTIME_FIELDS - {"attn_out_dropout"}}
)


# --------------------------------------------------------------------------------------------------------------
# Config → components
# --------------------------------------------------------------------------------------------------------------


def validate(config: ml_collections.ConfigDict) -> None:
  """One-line errors for values the loop cannot run with (before anything is built or written)."""
  positive = {
    "batch_size": config.batch_size,
    "log_every_steps": config.log_every_steps,
    "checkpoint_every_tokens": config.checkpoint_every_tokens,
    "keep_checkpoints": config.keep_checkpoints,
    "eval_batch_size": config.eval_batch_size,
    "max_consecutive_skips": config.max_consecutive_skips,
    "data.seq_len": config.data.seq_len,
    "storage_warn_s": config.storage_warn_s,
    "storage_timeout_s": config.storage_timeout_s,
  }
  for key, value in positive.items():
    if not value > 0:
      raise ValueError(f"config.{key} must be positive; got {value}")
  for key in ("eval_every_steps", "micro_batch_size", "train_tokens", "eval_max_batches"):
    if config[key] < 0:
      raise ValueError(f"config.{key} must be ≥ 0; got {config[key]}")
  lr = config.optim.peak_lr
  if not (math.isfinite(lr) and 0 < lr <= float(np.finfo(np.float32).max)):
    raise ValueError(f"config.optim.peak_lr must be a positive number finite in float32; got {lr}")
  for key, value in config.schedule.items():
    if isinstance(value, (int, float)) and not math.isfinite(value):
      raise ValueError(f"config.schedule.{key} must be finite; got {value}")
  for key in ("warmup_tokens", "decay_tokens"):
    if config.schedule[key] < 0:
      raise ValueError(f"config.schedule.{key} must be ≥ 0; got {config.schedule[key]}")
  if not 0 <= config.schedule.final_fraction <= 1:
    raise ValueError(f"config.schedule.final_fraction must be in [0, 1]; got {config.schedule.final_fraction}")


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def changed_keys(saved_json: str, config: ml_collections.ConfigDict) -> dict[str, tuple[Any, Any]]:
  """{key: (checkpoint's value, config's value)} for the keys that change the run's math (not BOOKKEEPING_KEYS).
  A key absent on one side counts as None (unset)."""
  saved, now = _flat(json.loads(saved_json)), _flat(json.loads(config.to_json()))
  bookkeeping = lambda key: any(key == k or key.startswith(f"{k}.") for k in BOOKKEEPING_KEYS)
  return {
    k: (saved.get(k), now.get(k))
    for k in sorted(set(saved) | set(now))
    if not bookkeeping(k) and saved.get(k) != now.get(k)
  }


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  overrides = {k: v for k, v in config.model.items() if v is not None}  # None: the preset's value
  if overrides.get("dtype") == "auto":
    overrides["dtype"] = "float32" if jax.default_backend() == "cpu" else "bfloat16"
  if config.get("init_from") and hf.is_model_dir(config.init_from):  # architecture from its config.json
    return hf.run_config(config.init_from, overrides)
  return get_config(config.model_preset, **overrides)


def lr_schedule(config: ml_collections.ConfigDict):
  """The phase's learning rate as a numpy function of its tokens, computed on the host: no device sync."""
  s = config.schedule
  return schedules.host_wsd_schedule(
    config.optim.peak_lr,
    warmup_tokens=s.warmup_tokens,
    decay_start_tokens=None if s.decay_start_tokens < 0 else s.decay_start_tokens,
    decay_tokens=s.decay_tokens,
    final_fraction=s.final_fraction,
    decay_shape=s.decay_shape,
  )


def optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  o = config.optim
  return optim.build(
    o.name, learning_rate=0.0, peak_lr=o.peak_lr, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps
  )


def pipeline_config(config: ml_collections.ConfigDict, batch_size: int, *, eval: bool = False):
  """The data pipeline's config for this phase's training batches, or for its held-out batches."""
  d = config.data
  if eval:  # every eval language counts alone: no mixture, and the configured eval mask rate
    return data_lib.PipelineConfig(
      data_dir=d.data_dir,
      languages=d.eval_languages or d.languages,
      seq_len=d.seq_len,
      batch_size=batch_size,
      mask_rate=d.eval_mask_rate or d.mask_rate,
      seed=config.seed,
      packing=d.packing,
    )
  return data_lib.PipelineConfig(
    data_dir=d.data_dir,
    languages=d.languages,
    tau=d.tau,
    budgets=dict(d.budgets),
    max_passes=d.max_passes or None,
    total_tokens=float(config.train_tokens) if d.max_passes else None,
    seq_len=d.seq_len,
    batch_size=batch_size,
    mask_rate=d.mask_rate,
    max_masked=d.max_masked or None,
    seed=config.seed,
    packing=d.packing,
    num_workers=d.num_workers,
    num_streams=d.num_streams or None,
    read_threads=d.read_threads,
    read_ahead=d.read_ahead,
    read_block=d.read_block,
    shuffle_blocks=d.shuffle_blocks,
  )


def num_microbatches(config: ml_collections.ConfigDict) -> int:
  micro = config.micro_batch_size or config.batch_size
  if config.batch_size % micro:
    raise ValueError(f"config.batch_size={config.batch_size} is not a multiple of config.micro_batch_size={micro}")
  return config.batch_size // micro


# --------------------------------------------------------------------------------------------------------------
# Model state
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ModelGraph:
  """A model as jitted functions take it: its config, its NNX graph (the structure without arrays) and the
  abstract parameters (ShapeDtypeStructs with their shardings; None where only the graph is needed).
  `bind(params)` joins the graph with a pure dict of parameters into a MaskedLM."""

  cfg: ModelConfig
  graph: Any
  abstract_params: Any

  def bind(self, params) -> MaskedLM:
    return nnx.merge(self.graph, params, copy=True)


def model_graph(cfg: ModelConfig, mesh, seed: int = 0) -> ModelGraph:
  """Shapes and shardings only: nothing is allocated (ahead-of-time compilation, restore targets)."""
  with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    graph, state = nnx.split(abstract_model(cfg, seed))
    shardings = nnx.to_pure_dict(nnx.get_named_sharding(state, mesh))
  abstract = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nnx.to_pure_dict(state), shardings
  )
  return ModelGraph(cfg, graph, abstract)


def init_model(cfg: ModelConfig, mesh, seed: int) -> tuple[ModelGraph, Any]:
  """Sharded float32 parameters (pure dict) created directly on their devices."""
  with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    graph, params = nnx.split(nnx.jit(lambda: MaskedLM(cfg, rngs=nnx.Rngs(seed)))())
  params = nnx.to_pure_dict(params)
  return ModelGraph(cfg, graph, abstract_like(params)), params


def abstract_like(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


# --------------------------------------------------------------------------------------------------------------
# Loss and steps
# --------------------------------------------------------------------------------------------------------------


def per_language_sums(values: jax.Array, languages: jax.Array, num_languages: int, *, compare: bool | None = None):
  """Σ values per language id → [num_languages] float32. `compare` (default: on a TPU) sums over an
  [N, num_languages] comparison, fused into one reduction: a segment sum is a scatter-add, which a TPU lowers to a
  sort of the ids."""
  if compare is None:
    compare = sharding.target_platform() == "tpu"
  values, languages = values.ravel(), languages.ravel()
  if not compare:
    return jax.ops.segment_sum(values, languages, num_languages)
  hits = languages[:, None] == jnp.arange(num_languages, dtype=languages.dtype)
  return jnp.where(hits, values[:, None], 0.0).sum(0)


def mlm_stats(token_loss, batch, num_languages: int) -> dict[str, jax.Array]:
  """Sums (not means) over the masked slots, so micro-batches and devices add up exactly. `token_loss` is the
  per-slot (negative log-likelihood, argmax hit) pair of `MaskedLM.masked_lm_loss`."""
  nll, hit = token_loss
  w = batch["masked_weights"]
  ce = nll * w
  correct = hit * w
  lang_masked = jnp.maximum(jnp.take_along_axis(batch["lang_ids"], batch["masked_positions"], axis=1), 0)
  lang_tok = batch["lang_ids"]
  return {
    "loss_sum": ce.sum(),
    "correct": correct.sum(),
    "count": w.sum(),
    "lang_loss_sum": per_language_sums(ce, lang_masked, num_languages),
    "lang_correct": per_language_sums(correct, lang_masked, num_languages),
    "lang_count": per_language_sums(w, lang_masked, num_languages),
    # Over every token (not the masked slots) a TPU keeps the [tokens, languages] comparison in memory (0.1 GiB
    # more temporaries in the pre-training step): a segment sum costs less there.
    "lang_tokens": per_language_sums(
      (lang_tok >= 0).astype(jnp.float32), jnp.maximum(lang_tok, 0), num_languages, compare=False
    ),
  }


def _forward(model: MaskedLM, batch, rngs=None, stacked=None):
  return model.masked_lm_loss(
    batch["input_ids"],
    batch["segment_ids"],
    batch["positions"],
    batch["masked_positions"],
    batch["masked_labels"],
    rngs=rngs,
    stacked=stacked,
  )


def _params_like(tree) -> bool:
  """A parameter tree, or an optimizer-state subtree shaped like one (Adam's moments)."""
  return isinstance(tree, dict) and "layers" in tree


def stacked_update(tx, grads, opt_state, params, split, join):
  """`tx.update` of parameters held as (rest, scanned layers stacked over the groups), returning per-layer
  updates and state: the rest is updated as usual, the stacked layers by `tx.update` vmapped over the groups, so
  each layer's tensors are updated exactly as on their own (per-tensor clipping and decay rules included). The
  state's other leaves (step count, hyperparameters) are the rest's; StableAdamW's `clipped_fraction` counts every
  tensor of both parts."""
  g_rest, g_stacked = grads
  p_rest, p_stacked = params
  part = lambda i: lambda t: split(t)[i] if _params_like(t) else t
  s_rest = jax.tree.map(part(0), opt_state, is_leaf=_params_like)
  s_stacked = jax.tree.map(part(1), opt_state, is_leaf=_params_like)
  axes = jax.tree.map(lambda t: 0 if _params_like(t) else None, opt_state, is_leaf=_params_like)
  u_rest, new_rest = tx.update(g_rest, s_rest, p_rest)
  u_stacked, new_stacked = jax.vmap(tx.update, in_axes=(0, axes, 0), out_axes=(0, 0))(g_stacked, s_stacked, p_stacked)
  new_opt = jax.tree.map(lambda r, s: join(r, s) if _params_like(r) else r, new_rest, new_stacked, is_leaf=_params_like)
  clipped = optax.tree.get(new_rest, "clipped_fraction", None)
  if clipped is not None:  # fractions of n_rest tensors and of n_stacked tensors in each of `groups` slices
    n_rest, n_stacked = len(jax.tree.leaves(g_rest)), len(jax.tree.leaves(g_stacked))
    per_group = optax.tree.get(new_stacked, "clipped_fraction")
    tensors = jnp.round(clipped * n_rest) + jnp.round(per_group * n_stacked).sum()
    new_opt = optax.tree.set(new_opt, clipped_fraction=tensors / (n_rest + per_group.shape[0] * n_stacked))
  return join(u_rest, u_stacked), new_opt


def make_train_step(model: ModelGraph, tx, *, num_languages: int, seed: int):
  """The MLM train step as a pure function (params, opt_state, micro-batches [m, b, ...], lr, step) →
  (params, opt_state, metrics), not yet jitted: `TrainProgram` jits it with the run's shardings.

  With `scan_layers`, the scanned layers' parameters are stacked once per step (`model_lib.stack_layers`), before
  the micro-batches, which differentiate with respect to the stacked copy; the optimizer updates the stacked layers
  as one program vmapped over the groups (`stacked_update`), so its per-tensor rules (StableAdamW's update
  clipping, the decay mask) still see per-layer tensors, and the compiled step holds one copy of the optimizer per
  group position instead of one per layer. At rest, parameters and optimizer state stay per layer."""
  scanned = {i for index in model_lib.scanned_layer_indices(model.cfg) for i in index} if model.cfg.scan_layers else ()

  def split(params):
    """(params without the scanned layers, the scanned layers stacked)."""
    rest = {**params, "layers": {i: p for i, p in params["layers"].items() if i not in scanned}}
    return rest, model_lib.stack_layers(model.cfg, {i: params["layers"][i] for i in scanned})

  def join(rest, stacked):
    return {**rest, "layers": {**rest["layers"], **model_lib.unstack_layers(model.cfg, stacked)}}

  def step(params, opt_state, batches, lr, step_index):
    base = jax.random.fold_in(jax.random.key(seed), step_index)
    wrt = split(params) if scanned else params

    def loss_fn(wrt, batch, key):
      stacked = None
      if scanned:  # the scanned layers' own parameters are bound but unused: the stacked copy replaces them
        rest, stacked = wrt
        wrt = {**rest, "layers": {**params["layers"], **rest["layers"]}}
      stats = mlm_stats(
        _forward(model.bind(wrt), batch, rngs=nnx.Rngs(dropout=key), stacked=stacked), batch, num_languages
      )
      return stats["loss_sum"], stats

    def micro(carry, xs):
      grads, totals = carry
      batch, i = xs
      (_, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(wrt, batch, jax.random.fold_in(base, i))
      return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, totals, stats)), None

    n_micro = batches["input_ids"].shape[0]
    zero_stats = jax.eval_shape(lambda: loss_fn(wrt, jax.tree.map(lambda x: x[0], batches), base)[1])
    init = (jax.tree.map(jnp.zeros_like, wrt), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_stats))
    (grads, totals), _ = jax.lax.scan(micro, init, (batches, jnp.arange(n_micro)))
    count = jnp.maximum(totals["count"], 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)  # mean over every masked token of the step
    grad_norm = optax.tree.norm(grads)
    injected = optim.with_learning_rate(opt_state, lr)
    if scanned:
      updates, new_opt = stacked_update(tx, grads, injected, wrt, split, join)
    else:
      updates, new_opt = tx.update(grads, injected, params)
    new_params = optax.apply_updates(params, updates)
    # A step is kept only if its loss, gradients and new parameters are finite; otherwise it changes nothing and
    # the host stops (or skips, if configured).
    finite = jnp.isfinite(totals["loss_sum"]) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(new_params))
    if_finite = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    metrics = {
      "loss": totals["loss_sum"] / count,
      "accuracy": totals["correct"] / count,
      "grad_norm": grad_norm,
      "lr": optim.learning_rate(new_opt),
      "clipped_fraction": optim.clipped_fraction(new_opt),
      "finite": finite,
      "masked_tokens": totals["count"],
      "lang_loss_sum": totals["lang_loss_sum"],
      "lang_count": totals["lang_count"],
      "lang_tokens": totals["lang_tokens"],
    }
    return if_finite(new_params, params), if_finite(new_opt, opt_state), metrics

  return step


# --------------------------------------------------------------------------------------------------------------
# The training program: the one place that derives the state layout, the batch and the jitted step
# --------------------------------------------------------------------------------------------------------------


def shardings_of(tree):
  return jax.tree.map(lambda x: x.sharding, tree)


def optimizer_state_layout(tx: optax.GradientTransformation, abstract_params, mesh):
  """The optimizer state as shapes with shardings: every moment sharded like its parameter; counts, scalars and
  injected hyperparameters replicated. (`jax.jit(tx.init)` left to itself replicates the moments: `zeros_like`
  does not inherit its argument's sharding.)"""
  abstract = jax.eval_shape(tx.init, abstract_params)
  layout = optax.tree_map_params(
    tx,
    lambda _, sh: sh,
    abstract,
    shardings_of(abstract_params),
    transform_non_params=lambda _: sharding.replicated(mesh),
  )
  return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), abstract, layout)


# XLA:CPU hands reductions to YNNPACK as well as dots; its reductions over a leading axis (the decoder bias
# gradient: column sums of [masked, vocab]) run tens of times slower than XLA's own loops, and a reduction taken
# out of its fusion leaves the fusion's producer to be written out whole (the softmax sums, LayerNorm moments).
# XLA's own reductions longer than 32 are split by its tree-reduction pass into a reduce-window and a reduce, each
# a kernel of its own outside any fusion (188 extra kernels per step of the CPU benchmark); unsplit, they fuse.
CPU_COMPILER_OPTIONS = {
  "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT",
  "xla_disable_hlo_passes": "tree_reduction_rewriter",
}


def compiler_options(mesh) -> dict[str, str] | None:
  """XLA options of the train step on `mesh`'s platform (`CPU_COMPILER_OPTIONS` on CPU, none elsewhere)."""
  return CPU_COMPILER_OPTIONS if mesh.devices.flat[0].platform == "cpu" else None


def jit_update_step(step, param_shardings, opt_shardings, mesh):
  """`step(params, opt_state, batch, lr, step_index) → (params, opt_state, outputs)` jitted so that parameters and
  optimizer state keep their layout (donated, updated in place) and the outputs come back replicated."""
  return jax.jit(
    step,
    in_shardings=(param_shardings, opt_shardings, None, None, None),
    out_shardings=(param_shardings, opt_shardings, sharding.replicated(mesh)),
    donate_argnums=(0, 1),
    compiler_options=compiler_options(mesh),
  )


@dataclasses.dataclass(frozen=True)
class TrainProgram:
  """What a run's training step takes and gives, derived once from its config and mesh (`build_program`): the
  model graph with its sharded abstract parameters, the optimizer state laid out like them, the batch, the
  initialisers and the jitted step. The loop, ahead-of-time compilation, benchmarks and tests all use this one."""

  mesh: Any
  model: ModelGraph
  tx: optax.GradientTransformation
  abstract_opt_state: Any
  microbatches: int  # per step at the full batch (fewer during batch-size warmup)
  rows: int  # global rows per micro-batch
  seq_len: int
  masked: int  # masked slots per row: the pipeline's own figure
  num_languages: int
  seed: int
  step: Any  # jitted: (params, opt_state, batch [m, rows, ...], lr, step) → (params, opt_state, metrics)
  _init_opt: Any

  @property
  def cfg(self) -> ModelConfig:
    return self.model.cfg

  @property
  def abstract_params(self):
    return self.model.abstract_params

  @property
  def param_shardings(self):
    return shardings_of(self.model.abstract_params)

  @property
  def opt_shardings(self):
    return shardings_of(self.abstract_opt_state)

  def abstract_batch(self, microbatches: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """The step's batch as shapes: [micro-batches, rows, length] per key of the pipeline's batch schema, rows
    split over (data, fsdp) as `make_put` places them."""
    m = self.microbatches if microbatches is None else microbatches
    return {
      k: jax.ShapeDtypeStruct((m, self.rows, n), dtype, sharding=sharding.batch_sharding(self.mesh, 3, 1))
      for k, (n, dtype) in data_lib.batch_schema(self.seq_len, self.masked).items()
    }

  def init_params(self):
    return init_model(self.cfg, self.mesh, self.seed)[1]

  def init_opt_state(self, params):
    """A fresh optimizer state for `params`, in the program's layout."""
    return self._init_opt(params)

  def init(self):
    params = self.init_params()
    return params, self.init_opt_state(params)

  def lower(self, microbatches: int | None = None):
    """The step lowered for the program's abstract inputs (nothing allocated)."""
    scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype)
    with jax.set_mesh(self.mesh):
      return self.step.lower(
        self.abstract_params,
        self.abstract_opt_state,
        self.abstract_batch(microbatches),
        scalar(jnp.float32),
        scalar(jnp.int32),
      )


def build_program(
  config: ml_collections.ConfigDict, mesh, *, num_languages: int, cfg: ModelConfig | None = None
) -> TrainProgram:
  """The training program of `config` on `mesh`. `cfg`: the model config if not the run config's own (e.g. with
  the attention implementation resolved for another platform)."""
  cfg = model_config(config) if cfg is None else cfg
  m = num_microbatches(config)
  rows = config.batch_size // m
  if rows % sharding.batch_divisor(mesh):
    raise ValueError(
      f"micro-batch of {rows} rows is not divisible by data×fsdp = {sharding.batch_divisor(mesh)} devices; "
      "change --config.micro_batch_size or --config.mesh"
    )
  model = model_graph(cfg, mesh, config.seed)
  tx = optimizer(config)
  abstract_opt = optimizer_state_layout(tx, model.abstract_params, mesh)
  param_shardings, opt_shardings = shardings_of(model.abstract_params), shardings_of(abstract_opt)
  step = make_train_step(model, tx, num_languages=num_languages, seed=config.seed)
  return TrainProgram(
    mesh=mesh,
    model=model,
    tx=tx,
    abstract_opt_state=abstract_opt,
    microbatches=m,
    rows=rows,
    seq_len=config.data.seq_len,
    masked=data_lib.masked_per_row(config.data.seq_len, config.data.mask_rate, config.data.max_masked or None),
    num_languages=num_languages,
    seed=config.seed,
    step=jit_update_step(step, param_shardings, opt_shardings, mesh),
    _init_opt=jax.jit(tx.init, out_shardings=opt_shardings),
  )


def make_eval_step(model: ModelGraph):
  @jax.jit
  def eval_step(params, batch):
    return mlm_stats(_forward(model.bind(params), batch), batch, num_languages=1)

  return eval_step


def eval_per_language(eval_step, params, batches: Iterable[tuple[str, dict]], put) -> dict[str, dict[str, float]]:
  """Held-out MLM loss and accuracy per language (and over all of them) from (language, batch) pairs."""
  sums: dict[str, np.ndarray] = {}
  for lang, batch in batches:
    stats = jax.device_get(eval_step(params, put(batch)))
    row = np.array([stats["loss_sum"], stats["correct"], stats["count"]], np.float64)
    sums[lang] = sums.get(lang, 0) + row
  if not sums:
    return {}
  sums["all"] = sum(sums.values())
  return {
    lang: {"loss": float(s[0] / max(s[2], 1.0)), "accuracy": float(s[1] / max(s[2], 1.0)), "masked_tokens": float(s[2])}
    for lang, s in sums.items()
  }


# --------------------------------------------------------------------------------------------------------------
# Host-side batches → global arrays
# --------------------------------------------------------------------------------------------------------------


def make_put(mesh, leading: int):
  def put(batch: dict[str, np.ndarray]):
    return {
      k: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, np.ndim(v), leading), np.asarray(v))
      for k, v in batch.items()
      if k in data_lib.BATCH_KEYS
    }

  return put


def stack_microbatches(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.stack([b[k] for b in batches]) for k in data_lib.BATCH_KEYS}


# --------------------------------------------------------------------------------------------------------------
# Preemption
# --------------------------------------------------------------------------------------------------------------


class Preemption:
  """A SIGTERM (preemption notice, `kill`) to any one process stops every process after the same step.

  One process: SIGTERM sets a flag, read at step boundaries. Under jax.distributed, the coordination service's
  preemption sync manager owns SIGTERM (jax.distributed.initialize installs its handler; a Python handler would
  replace it): the process that receives the signal posts the notice to the coordination service, and every process
  agrees in the background on the call after the furthest process's last one. `should_stop` is then a local check,
  no collective: `multihost_utils.reached_preemption_sync_point(n)` on the n-th call, true on every process at the
  same call. The count runs across the phases of one process and is the same everywhere because every process runs
  the same loop. (With jax_enable_preemption_service off, the flags are all-gathered every step instead.)
  """

  calls = 0  # per process, across phases: the sync manager compares it with the point agreed on

  def __init__(self):
    self.requested = cli.preempted()  # a SIGTERM during start-up (restore, compilation) stops after the first step
    self.synced = jax.distributed.is_initialized() and _has_preemption_service()
    self._previous = None if self.synced else signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    self.requested = True
    previous = getattr(self, "_previous", None)
    if callable(previous):  # the process's handler (cli.handle_sigterm): a signal during the final save is kept
      previous(signum, frame)

  def should_stop(self) -> bool:
    if self.synced:
      Preemption.calls += 1
      return multihost_utils.reached_preemption_sync_point(Preemption.calls)
    if jax.process_count() == 1:
      return self.requested
    return bool(multihost_utils.process_allgather(np.array(self.requested)).any())

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _has_preemption_service() -> bool:
  try:  # a call with the count already given changes nothing; it raises if the service was disabled
    multihost_utils.reached_preemption_sync_point(Preemption.calls)
    return True
  except RuntimeError:
    return False


# --------------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------------


# What the host reads of every step (the rest only at log steps): the non-finite check, tokens per language, and
# the per-step record (steps.jsonl).
STEP_KEYS = ("finite", "lang_tokens", "loss", "accuracy", "lr")


@dataclasses.dataclass
class DispatchedStep:
  """A step sent to the devices whose metrics the host has not read yet (reading them waits for the step)."""

  metrics: dict[str, jax.Array]
  step: int
  tokens: int
  slot_tokens: int
  microbatches: int
  segment_ids: np.ndarray


class PhaseRun:
  """One phase in one workdir: mesh, model and optimizer state, data, checkpointer and metric writer, and the
  loop over them. Everything the loop changes (params, opt_state, step, tokens, meta) is a field of this object.
  `later_tokens` / `outlook`: the curriculum's work after this phase (for the curriculum's ETA).
  """

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    later_tokens: int = 0,
    outlook: progress.Outlook | None = None,
  ):
    self.config, self.workdir, self.later_tokens, self.outlook = config, workdir, later_tokens, outlook
    validate(config)
    try:
      self._setup(config, workdir)
    except BaseException:
      self.close(wait=False)  # what was opened before the error (files, checkpoint manager, data workers)
      raise

  def _setup(self, config: ml_collections.ConfigDict, workdir: str) -> None:
    self.cfg = cfg = model_config(config)
    devices = jax.devices()
    if config.num_devices:
      if jax.process_count() > 1:
        raise ValueError("config.num_devices works only in a single-process run")
      devices = devices[: config.num_devices]
    self.mesh = mesh = sharding.make_mesh(dict(config.mesh), devices)
    sharding.check_process_feeds(mesh)
    with jax.set_mesh(mesh):
      attention_lib.resolve_impl(cfg, seq_len=config.data.seq_len)  # a kernel that cannot run fails here, not in jit
    self.console = progress.Console(enabled=jax.process_index() == 0)
    self.writer = metrics_lib.MetricWriter(
      workdir, console=self.console.print, console_keys=("eval/loss", "eval/accuracy"), wandb=config.get("wandb")
    )
    self.writer.write_config(config)
    self.schedule = lr_schedule(config)

    self.train_data = data_lib.make_train_iterator(
      pipeline_config(config, config.batch_size // num_microbatches(config))
    )
    self.languages = list(self.train_data.languages)
    self.program = program = build_program(config, mesh, num_languages=len(self.languages), cfg=cfg)
    self.eval_config = pipeline_config(config, config.eval_batch_size, eval=True)
    mix = self.train_data.mixture
    self.writer.write_json(
      "mixture",
      {
        "phase": config.phase,
        "languages": list(mix.languages),
        "tokens": mix.tokens.tolist(),
        "weights": mix.weights.tolist(),
        "budgeted": list(mix.budgeted),
        "tau": config.data.tau,
      },
    )
    self.train_tags = metrics_lib.LanguageTags.from_tokens(dict(zip(mix.languages, mix.tokens)), config.log_languages)
    self.data_tokens = {
      lang: n for lang, (n, _) in mixture_lib.counts_from_stats(mixture_lib.load_stats(config.data.data_dir)).items()
    }

    # Resume this run, or start from the previous phase, or initialise.
    self.checkpointer = ckpt_lib.Checkpointer(workdir, max_to_keep=config.keep_checkpoints)
    self.step, self.tokens = 0, 0
    self.meta: dict[str, Any] = {
      "phase": config.phase,
      "total_tokens_before": 0,
      "tokens_per_language": {},
      "history": [],
    }
    # Restores place every array in the program's layout, whatever layout it was saved in (moments saved
    # replicated come back sharded like their parameters).
    restored = self.checkpointer.restore_latest(
      abstract_params=program.abstract_params,
      abstract_opt_state=program.abstract_opt_state,
      data_iter=self.train_data,
      warn=lambda line: self.writer.text("run", f"warning: {line}"),
      check_meta=self._check_config_change,
    )
    if restored is not None:
      self.params, self.opt_state, self.meta = restored["params"], restored["opt_state"], restored["meta"]
      self.step, self.tokens = self.meta["step"], self.meta["tokens"]
      self.writer.forget_after(self.step)
      self.writer.text("run", f"resumed {workdir} at step {self.step} ({self.tokens:,} tokens)")
    elif config.init_from:
      handoff = ckpt_lib.restore_for_handoff(
        config.init_from,
        program.abstract_params,
        program.abstract_opt_state if config.init_optimizer_state else None,
        require_complete=True,
      )
      self.params = handoff["params"]
      self.opt_state = handoff["opt_state"] if config.init_optimizer_state else program.init_opt_state(self.params)
      prev = handoff["meta"]
      self.meta["total_tokens_before"] = prev.get("total_tokens_before", 0) + prev.get("tokens", 0)
      self.meta["tokens_per_language"] = dict(prev.get("tokens_per_language", {}))
      self.meta["history"] = prev.get("history", []) + [
        {"phase": prev.get("phase"), "source": handoff["source"], "tokens": prev.get("tokens", 0)}
      ]
      self.writer.text("run", f"phase {config.phase}: starting from {handoff['source']} (phase {prev.get('phase')})")
    else:
      self.params, self.opt_state = program.init()

    self.eval_step = make_eval_step(program.model)
    self.put_train, self.put_eval = make_put(mesh, leading=1), make_put(mesh, leading=0)
    self.device_kind = jax.devices()[0].device_kind
    self.t_last_log = time.time()
    self.consecutive_skips = 0
    self.preemption = Preemption()
    self.timer = progress.StepTimer()
    self.progress = progress.Progress(
      config.phase, config.train_tokens, tokens=self.tokens, later_tokens=self.later_tokens, outlook=self.outlook
    )
    self.last_logged_step = self.step
    self.profiler = progress.Profiler(
      workdir, config.profile_start_step, config.profile_steps, config.profile_process, jax.process_index()
    )

  def _check_config_change(self, meta: dict[str, Any]) -> None:
    changes = changed_keys(meta.get("config", "{}"), self.config)
    if not changes:
      return
    listed = ", ".join(f"{k} ({old!r} → {new!r})" for k, (old, new) in changes.items())
    if not self.config.allow_config_change:
      raise ConfigChangeError(
        f"{self.checkpointer.directory} was trained with another config: {listed}; re-run "
        "with the checkpoint's values, or pass --config.allow_config_change=True to resume "
        "with the new ones"
      )
    self.writer.text("run", f"resuming with a changed config (allow_config_change): {listed}")

  # ---- actions ----------------------------------------------------------------------------------------------------

  def save(self, final: bool = False) -> None:
    self.meta.update(
      step=self.step,
      tokens=self.tokens,
      model_config=dataclasses.asdict(self.cfg),
      phase=self.config.phase,
      languages=self.languages,
      complete=final,
      config=self.config.to_json(),
    )
    self.checkpointer.save(
      self.step, params=self.params, opt_state=self.opt_state, data_iter=self.train_data, meta=self.meta
    )
    self.writer.flush()  # a gs:// workdir's metrics reach the bucket with every checkpoint

  def evaluate(self) -> dict[str, dict[str, float]]:
    config = self.config
    eval_data = data_lib.eval_batches(self.eval_config, max_batches=config.eval_max_batches)
    result = eval_per_language(self.eval_step, self.params, eval_data, self.put_eval)
    per_lang = {lang: r for lang, r in result.items() if lang != "all"}
    tags = metrics_lib.LanguageTags.from_tokens(
      {lang: self.data_tokens.get(lang, 0) for lang in per_lang}, config.log_languages
    )
    self.writer.write(
      self.step,
      tags.losses(
        {lang: r["loss"] * r["masked_tokens"] for lang, r in per_lang.items()},
        {lang: r["masked_tokens"] for lang, r in per_lang.items()},
        prefix="eval",
        group_prefix="eval_group",
      )
      | {"eval/loss": result.get("all", {}).get("loss"), "eval/accuracy": result.get("all", {}).get("accuracy")},
    )
    self.writer.write_eval(
      self.step,
      result,
      phase=config.phase,
      tokens=self.tokens,
      total_tokens=self.meta["total_tokens_before"] + self.tokens,
    )
    return result

  def next_batch(self, n_micro: int) -> tuple[list[dict[str, np.ndarray]], dict[str, jax.Array]]:
    """The next `n_micro` micro-batches: as the host drew them, and stacked as the step takes them."""
    micro = [next(self.train_data) for _ in range(n_micro)]
    return micro, self.put_train(stack_microbatches(micro))

  def dispatch_step(self) -> DispatchedStep:
    """Draws this step's micro-batches and starts the train step on the devices (without waiting for it)."""
    config = self.config
    n_micro = schedules.batch_warmup(
      self.tokens,
      num_microbatches=self.program.microbatches,
      warmup_tokens=config.batch_warmup_tokens,
      start_fraction=config.batch_warmup_start_fraction,
    )
    with self.timer("data"):
      micro, batch = self.next_batch(n_micro)
    slot_tokens = n_micro * self.program.rows * config.data.seq_len
    # The LR at the end of this step's tokens (warmup starts above 0), on the host: nothing waits for the devices.
    lr = np.float32(self.schedule(self.tokens + slot_tokens))
    self.profiler.before_step(self.step)
    with self.timer("device"):  # dispatch; a backend without asynchronous dispatch runs the step right here
      self.params, self.opt_state, metrics = self.program.step(
        self.params, self.opt_state, batch, lr, np.int32(self.step)
      )
    self.step += 1
    self.tokens += slot_tokens
    self.profiler.after_step(self.step, wait=functools.partial(jax.block_until_ready, metrics))
    return DispatchedStep(
      metrics, self.step, self.tokens, slot_tokens, n_micro, np.concatenate([b["segment_ids"] for b in micro])
    )

  def record(self, done: DispatchedStep) -> None:
    """Reads a dispatched step's metrics: stops (or skips) on a non-finite step, counts tokens per language,
    and logs every `log_every_steps`."""
    config = self.config
    logging = done.step % config.log_every_steps == 0
    with self.timer("device"):  # waits for the step; only what every step needs comes to the host between logs
      host = jax.device_get(done.metrics if logging else {k: done.metrics[k] for k in STEP_KEYS})
    if not bool(host["finite"]):
      what = (
        f"step {done.step}: loss, gradients or updated parameters are not finite "
        f"(loss={float(done.metrics['loss'])}, grad_norm={float(done.metrics['grad_norm'])}); the parameters "
        "were not updated"
      )
      if not config.skip_nonfinite:
        raise NonFiniteLossError(
          f"{what}. {self._checkpoint_status()} Set --config.skip_nonfinite=True to skip such steps."
        )
      self.consecutive_skips += 1
      if self.consecutive_skips >= config.max_consecutive_skips:
        raise NonFiniteLossError(
          f"{what}; {self.consecutive_skips} non-finite steps in a row "
          f"(max_consecutive_skips), stopping. {self._checkpoint_status()}"
        )
      self.writer.text("run", f"{what}: step skipped")
    else:
      self.consecutive_skips = 0
    for i, lang in enumerate(self.languages):
      self.meta["tokens_per_language"][lang] = self.meta["tokens_per_language"].get(lang, 0) + int(
        host["lang_tokens"][i]
      )
    total_tokens = self.meta["total_tokens_before"] + done.tokens
    step_record = {k: host[k] for k in ("loss", "accuracy", "lr")}
    self.writer.write_step(done.step, step_record | {"tokens": done.tokens, "total_tokens": total_tokens})
    if logging:
      self._log(done, host)
    elif self.progress.due(done.tokens):  # the first step, and every 10% of the phase between log steps
      self.console.progress(
        self.progress.update(done.step, done.tokens, **{k: float(v) for k, v in step_record.items()})
      )

  def _checkpoint_status(self) -> str:
    latest = self.checkpointer.latest_step()
    if latest is None:
      return f"No checkpoint has been written to {self.checkpointer.directory} yet."
    return f"The last checkpoint, {self.checkpointer.directory}/{latest}, is intact."

  def _log(self, done: DispatchedStep, host: dict[str, np.ndarray]) -> None:
    config, mesh = self.config, self.mesh
    now = time.time()
    seconds = (now - self.t_last_log) / config.log_every_steps
    self.t_last_log = now
    flops = flops_lib.training_flops(self.cfg, done.segment_ids, float(host["masked_tokens"]) / jax.process_count())
    flops_total = flops.total * jax.process_count()
    real_tokens = float(host["lang_tokens"].sum())
    lang_loss = self.train_tags.losses(
      dict(zip(self.languages, host["lang_loss_sum"].tolist())),
      dict(zip(self.languages, host["lang_count"].tolist())),
      prefix="train_lang",
      group_prefix="train_group",
    )
    mfu = flops_lib.mfu(flops_total, seconds, mesh.size, self.device_kind) or (
      flops_total / (seconds * mesh.size * config.peak_flops_per_device) if config.peak_flops_per_device else None
    )
    split = self.timer.split(done.step - self.last_logged_step)
    self.last_logged_step = done.step
    self.console.progress(
      self.progress.update(
        done.step,
        done.tokens,
        mfu=mfu,
        loss=float(host["loss"]),
        accuracy=float(host["accuracy"]),
        lr=float(host["lr"]),
        **{f"{k}_s": v for k, v in split.items()},
      )
    )
    self.writer.write(
      done.step,
      {
        "train/loss": host["loss"],
        "train/accuracy": host["accuracy"],
        "train/grad_norm": host["grad_norm"],
        "train/lr": host["lr"],
        "train/clipped_fraction": host["clipped_fraction"],
        "train/tokens": done.tokens,
        "train/total_tokens": self.meta["total_tokens_before"] + done.tokens,
        "train/real_tokens_per_s": real_tokens / seconds,
        "train/tokens_per_s": done.slot_tokens / seconds,
        "train/model_flops_per_s": flops_total / seconds,
        "train/mfu": mfu,
        "train/microbatches": done.microbatches,
      }
      | {f"time/{k}_s": v for k, v in split.items()}
      | lang_loss,
    )

  # ---- the loop ---------------------------------------------------------------------------------------------------

  def run(self) -> str:
    """Trains until `train_tokens` ("complete", with a final checkpoint) or SIGTERM ("preempted", saved).

    The host reads a step's metrics only after dispatching the next one, so the devices do not wait for it;
    before a checkpoint, a stop or the end, the step not yet read is read first."""
    config = self.config
    next_save = (self.tokens // config.checkpoint_every_tokens + 1) * config.checkpoint_every_tokens
    unread: DispatchedStep | None = None
    status = "complete"
    self.t_last_log = time.time()
    with jax.set_mesh(self.mesh):
      while self.tokens < config.train_tokens:
        self.checkpointer.check()  # a failed background save stops the run at the next step
        done = self.dispatch_step()
        if unread is not None:
          self.record(unread)
        unread = done
        if config.eval_every_steps and self.step % config.eval_every_steps == 0:
          with self.timer("eval"):
            self.evaluate()
        if self.tokens >= next_save and self.tokens < config.train_tokens:  # the final checkpoint is written below
          self.record(unread)
          unread = None
          with self.timer("checkpoint"):
            self.save()
          next_save += config.checkpoint_every_tokens
        if self.preemption.should_stop():
          if unread is not None:
            self.record(unread)
            unread = None
          if self.checkpointer.latest_step() != self.step:
            self.save()
          status = "preempted"
          self.writer.text(
            "run",
            f"SIGTERM: saved step {self.step} to {self.checkpointer.directory}; re-run the same command to resume",
          )
          break
      if unread is not None:
        self.record(unread)
      if status == "complete" and self.checkpointer.latest_step() != self.step:
        self.save(final=True)
    return status

  def close(self, wait: bool = True, storage_down: bool = False) -> None:
    """Waits for the last checkpoint (raising its failure, if any) and releases everything opened.
    `storage_down`: the run's bucket does not answer; the checkpoint manager and the metric writer, whose close
    would wait on it, are left as they are (the process ends)."""
    checkpointer = getattr(self, "checkpointer", None)
    try:
      profiler = getattr(self, "profiler", None)
      if profiler is not None:
        profiler.stop()
      if wait and checkpointer is not None:
        checkpointer.wait()
      if wait and getattr(self, "writer", None) is not None:
        self.writer.flush()  # the last records of a gs:// workdir; a failed upload fails the run
    finally:
      parts = ("console", "checkpointer", "preemption", "writer", "train_data")
      for part in parts if not storage_down else ("console", "preemption", "train_data"):
        close = getattr(getattr(self, part, None), "close", None)
        if close:
          close()


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  later_tokens: int = 0,
  outlook: progress.Outlook | None = None,
) -> dict[str, Any]:
  """Train one phase in `workdir` (resuming if it holds checkpoints); returns a summary with the final eval.
  `later_tokens`: the budget of the curriculum's phases after this one, or `outlook`: the curriculum's work after
  this phase (for the curriculum's ETA)."""
  run = PhaseRun(config, workdir, later_tokens=later_tokens, outlook=outlook)
  try:
    status = run.run()
    final_eval = run.evaluate() if status == "complete" else {}
  except BaseException as e:
    # Nothing more is sent to a bucket that does not answer (closing would wait on it); what is complete stays.
    down = storage.unavailable(e) is not None
    run.close(wait=not down, storage_down=down)
    raise
  run.close()
  return {
    "status": status,
    "step": run.step,
    "tokens": run.tokens,
    "eval": final_eval,
    "languages": run.languages,
    "workdir": workdir,
  }
