"""Training loop of one phase: `train_and_evaluate(config, workdir)`.

Reads top to bottom: mesh → model and optimizer state (sharded by the logical axis rules) → resume from this
run's checkpoint, or hand off from `config.init_from` → data → jitted train step (gradient accumulation over
micro-batches, StableAdamW, token-driven learning rate) → loop with metrics, eval, checkpoints and preemption.

The schedule's clock is *slot tokens* (rows × seq_len), known on every host without a device sync; real
(non-padding) tokens are counted per language for metrics and carried across phases.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import signal
import time
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from mmbert_jax import attention as attention_lib
from mmbert_jax import checkpoint as ckpt_lib
from mmbert_jax import flops as flops_lib
from mmbert_jax import metrics as metrics_lib
from mmbert_jax import optim, schedules, sharding
from mmbert_jax.model import MaskedLM, ModelConfig, get_config

BATCH_KEYS = ("input_ids", "segment_ids", "positions", "masked_positions", "masked_labels", "masked_weights",
              "lang_ids")


class NonFiniteLossError(RuntimeError):
  pass


# --------------------------------------------------------------------------------------------------------------
# Config → components
# --------------------------------------------------------------------------------------------------------------

def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  overrides = dict(config.model)
  if overrides.get("dtype") == "auto":
    overrides["dtype"] = "float32" if jax.default_backend() == "cpu" else "bfloat16"
  return get_config(config.model_preset, **overrides)


def lr_schedule(config: ml_collections.ConfigDict):
  s = config.schedule
  return schedules.wsd_schedule(
      config.optim.peak_lr, warmup_tokens=s.warmup_tokens,
      decay_start_tokens=None if s.decay_start_tokens < 0 else s.decay_start_tokens,
      decay_tokens=s.decay_tokens, final_fraction=s.final_fraction, decay_shape=s.decay_shape)


def optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  o = config.optim
  return optim.build(o.name, learning_rate=0.0, peak_lr=o.peak_lr, weight_decay=o.weight_decay,
                     b1=o.b1, b2=o.b2, eps=o.eps)


def pipeline_config(config: ml_collections.ConfigDict, batch_size: int, *, eval: bool = False):
  """The data pipeline's config for this phase's training batches, or for its held-out batches."""
  from data_pipeline import pipeline as data_lib
  d = config.data
  if eval:  # every eval language counts alone: no mixture, and the configured eval mask rate
    return data_lib.PipelineConfig(
        data_dir=d.data_dir, languages=d.eval_languages or d.languages, seq_len=d.seq_len, batch_size=batch_size,
        mask_rate=d.eval_mask_rate or d.mask_rate, seed=config.seed, packing=d.packing)
  return data_lib.PipelineConfig(
      data_dir=d.data_dir, languages=d.languages, tau=d.tau, budgets=dict(d.budgets),
      max_passes=d.max_passes or None, total_tokens=float(config.train_tokens) if d.max_passes else None,
      seq_len=d.seq_len, batch_size=batch_size, mask_rate=d.mask_rate, max_masked=d.max_masked or None,
      seed=config.seed, packing=d.packing, num_workers=d.num_workers)


def num_microbatches(config: ml_collections.ConfigDict) -> int:
  micro = config.micro_batch_size or config.batch_size
  if config.batch_size % micro:
    raise ValueError(f"config.batch_size={config.batch_size} is not a multiple of "
                     f"config.micro_batch_size={micro}")
  return config.batch_size // micro


# --------------------------------------------------------------------------------------------------------------
# Model state
# --------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Model:
  """An NNX model as a jitted function needs it: the graph, and its parameters as a pure dict."""
  cfg: ModelConfig
  graph: Any
  abstract_params: Any     # ShapeDtypeStructs carrying the parameter shardings

  def bind(self, params) -> MaskedLM:
    return nnx.merge(self.graph, params, copy=True)


def abstract_model(cfg: ModelConfig, mesh, seed: int = 0) -> Model:
  """Shapes and shardings only: nothing is allocated (ahead-of-time compilation, restore targets)."""
  with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    graph, state = nnx.split(nnx.eval_shape(lambda: MaskedLM(cfg, rngs=nnx.Rngs(seed))))
    shardings = nnx.to_pure_dict(nnx.get_named_sharding(state, mesh))
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nnx.to_pure_dict(state), shardings)
  return Model(cfg, graph, abstract)


def init_model(cfg: ModelConfig, mesh, seed: int) -> tuple[Model, Any]:
  """Sharded float32 parameters (pure dict) created directly on their devices."""
  with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    graph, params = nnx.split(nnx.jit(lambda: MaskedLM(cfg, rngs=nnx.Rngs(seed)))())
  params = nnx.to_pure_dict(params)
  return Model(cfg, graph, abstract_like(params)), params


def abstract_like(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


# --------------------------------------------------------------------------------------------------------------
# Loss and steps
# --------------------------------------------------------------------------------------------------------------

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
      "loss_sum": ce.sum(), "correct": correct.sum(), "count": w.sum(),
      "lang_loss_sum": jax.ops.segment_sum(ce.ravel(), lang_masked.ravel(), num_languages),
      "lang_correct": jax.ops.segment_sum(correct.ravel(), lang_masked.ravel(), num_languages),
      "lang_count": jax.ops.segment_sum(w.ravel(), lang_masked.ravel(), num_languages),
      "lang_tokens": jax.ops.segment_sum((lang_tok >= 0).ravel().astype(jnp.float32),
                                         jnp.maximum(lang_tok, 0).ravel(), num_languages),
  }


def _forward(model: MaskedLM, batch, rngs=None):
  return model.masked_lm_loss(batch["input_ids"], batch["segment_ids"], batch["positions"],
                              batch["masked_positions"], batch["masked_labels"], rngs=rngs)


def make_train_step(model: Model, tx, mesh, *, num_languages: int, seed: int, param_shardings, opt_shardings):
  """(params, opt_state, micro-batches [m, b, ...], lr, step) → (params, opt_state, metrics)."""

  def loss_fn(params, batch, key):
    stats = mlm_stats(_forward(model.bind(params), batch, rngs=nnx.Rngs(dropout=key)), batch, num_languages)
    return stats["loss_sum"], stats

  def step(params, opt_state, batches, lr, step_index):
    base = jax.random.fold_in(jax.random.key(seed), step_index)

    def micro(carry, xs):
      grads, totals = carry
      batch, i = xs
      (_, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, jax.random.fold_in(base, i))
      return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, totals, stats)), None

    m = batches["input_ids"].shape[0]
    zero_stats = jax.eval_shape(lambda: loss_fn(params, jax.tree.map(lambda x: x[0], batches), base)[1])
    init = (jax.tree.map(jnp.zeros_like, params), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_stats))
    (grads, totals), _ = jax.lax.scan(micro, init, (batches, jnp.arange(m)))
    count = jnp.maximum(totals["count"], 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)            # mean over every masked token of the step
    grad_norm = optax.tree.norm(grads)
    updates, new_opt = tx.update(grads, optim.with_learning_rate(opt_state, lr), params)
    new_params = optax.apply_updates(params, updates)
    # A non-finite step changes nothing; the host then stops (or skips, if configured).
    finite = jnp.isfinite(totals["loss_sum"]) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    metrics = {
        "loss": totals["loss_sum"] / count, "accuracy": totals["correct"] / count, "grad_norm": grad_norm,
        "lr": optim.learning_rate(new_opt), "clipped_fraction": optim.clipped_fraction(new_opt),
        "finite": finite, "masked_tokens": totals["count"],
        "lang_loss_sum": totals["lang_loss_sum"], "lang_count": totals["lang_count"],
        "lang_tokens": totals["lang_tokens"],
    }
    return keep(new_params, params), keep(new_opt, opt_state), metrics

  return jax.jit(step, in_shardings=(param_shardings, opt_shardings, None, None, None),
                 out_shardings=(param_shardings, opt_shardings, sharding.replicated(mesh)),
                 donate_argnums=(0, 1))


def fresh_train_state(cfg: ModelConfig, config: ml_collections.ConfigDict, mesh, *, seed: int = 0,
                      num_languages: int = 1):
  """A newly initialised (params, opt_state) and the jitted step for them: benchmarks and tests."""
  model, params = init_model(cfg, mesh, seed)
  tx = optimizer(config)
  with jax.set_mesh(mesh):
    opt_state = jax.jit(tx.init)(params)
  step = make_train_step(model, tx, mesh, num_languages=num_languages, seed=seed,
                         param_shardings=jax.tree.map(lambda x: x.sharding, params),
                         opt_shardings=jax.tree.map(lambda x: x.sharding, opt_state))
  return params, opt_state, step


def make_eval_step(model: Model):
  @jax.jit
  def eval_step(params, batch):
    return mlm_stats(_forward(model.bind(params), batch), batch, num_languages=1)
  return eval_step


def evaluate(eval_step, params, batches: Iterable[tuple[str, dict]], put) -> dict[str, dict[str, float]]:
  """Held-out MLM loss and accuracy per language (and over all of them) from (language, batch) pairs."""
  sums: dict[str, np.ndarray] = {}
  for lang, batch in batches:
    stats = jax.device_get(eval_step(params, put(batch)))
    row = np.array([stats["loss_sum"], stats["correct"], stats["count"]], np.float64)
    sums[lang] = sums.get(lang, 0) + row
  if not sums:
    return {}
  sums["all"] = sum(sums.values())
  return {lang: {"loss": float(s[0] / max(s[2], 1.0)), "accuracy": float(s[1] / max(s[2], 1.0)),
                 "masked_tokens": float(s[2])}
          for lang, s in sums.items()}


# --------------------------------------------------------------------------------------------------------------
# Host-side batches → global arrays
# --------------------------------------------------------------------------------------------------------------

def make_put(mesh, leading: int):
  def put(batch: dict[str, np.ndarray]):
    return {k: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, np.ndim(v), leading),
                                                      np.asarray(v))
            for k, v in batch.items() if k in BATCH_KEYS}
  return put


def stack_microbatches(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.stack([b[k] for b in batches]) for k in BATCH_KEYS}


# --------------------------------------------------------------------------------------------------------------
# Preemption
# --------------------------------------------------------------------------------------------------------------

class Preemption:
  """SIGTERM (preemption notice, `kill`) sets a flag; every process agrees on it at step boundaries."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    self.requested = True

  def should_stop(self) -> bool:
    if jax.process_count() == 1:
      return self.requested
    return bool(multihost_utils.process_allgather(np.array(self.requested)).any())

  def close(self):
    signal.signal(signal.SIGTERM, self._previous)


# --------------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------------

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Train one phase in `workdir` (resuming if it holds checkpoints); returns a summary with the final eval."""
  from data_pipeline import pipeline as data_lib  # data is its own package; imported here so models load without it

  cfg = model_config(config)
  devices = jax.devices()
  if config.num_devices:
    if jax.process_count() > 1:
      raise ValueError("config.num_devices works only in a single-process run")
    devices = devices[:config.num_devices]
  mesh = sharding.make_mesh(dict(config.mesh), devices)
  with jax.set_mesh(mesh):
    attention_lib.resolve_impl(cfg, seq_len=config.data.seq_len)  # a kernel that cannot run fails here, not in jit
  n_micro = num_microbatches(config)
  micro_rows = config.batch_size // n_micro
  if micro_rows % sharding.batch_divisor(mesh):
    raise ValueError(f"micro-batch of {micro_rows} rows is not divisible by data×fsdp = "
                     f"{sharding.batch_divisor(mesh)} devices")
  writer = metrics_lib.MetricWriter(workdir)
  model = abstract_model(cfg, mesh, config.seed)
  tx = optimizer(config)
  param_shardings = jax.tree.map(lambda x: x.sharding, model.abstract_params)
  with jax.set_mesh(mesh):
    init_opt = jax.jit(tx.init).lower(model.abstract_params).compile()  # moments follow the param shardings
  opt_shardings = init_opt.output_shardings
  abstract_opt = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              jax.eval_shape(tx.init, model.abstract_params), opt_shardings)
  schedule = lr_schedule(config)

  train_data = data_lib.make_train_iterator(pipeline_config(config, micro_rows))
  languages = list(train_data.languages)
  eval_config = pipeline_config(config, config.eval_batch_size, eval=True)

  # ---- resume this run, or start from the previous phase, or initialise ------------------------------------------
  checkpointer = ckpt_lib.Checkpointer(workdir, max_to_keep=config.keep_checkpoints)
  step, tokens = 0, 0
  meta: dict[str, Any] = {"phase": config.phase, "total_tokens_before": 0, "tokens_per_language": {},
                          "history": []}
  latest = checkpointer.latest_step()
  if latest is not None:
    restored = checkpointer.restore(latest, abstract_params=model.abstract_params, abstract_opt_state=abstract_opt,
                                    data_iter=train_data)
    params, opt_state, meta = restored["params"], restored["opt_state"], restored["meta"]
    step, tokens = meta["step"], meta["tokens"]
    writer.text("run", f"resumed {workdir} at step {step} ({tokens:,} tokens)")
  elif config.init_from:
    handoff = ckpt_lib.restore_for_handoff(config.init_from, model.abstract_params,
                                           abstract_opt if config.init_optimizer_state else None)
    params = handoff["params"]
    opt_state = handoff["opt_state"] if config.init_optimizer_state else init_opt(params)
    prev = handoff["meta"]
    meta["total_tokens_before"] = prev.get("total_tokens_before", 0) + prev.get("tokens", 0)
    meta["tokens_per_language"] = dict(prev.get("tokens_per_language", {}))
    meta["history"] = prev.get("history", []) + [{"phase": prev.get("phase"), "source": handoff["source"],
                                                  "tokens": prev.get("tokens", 0)}]
    writer.text("run", f"phase {config.phase}: starting from {handoff['source']} (phase {prev.get('phase')})")
  else:
    _, params = init_model(cfg, mesh, config.seed)
    opt_state = init_opt(params)

  train_step = make_train_step(model, tx, mesh, num_languages=len(languages), seed=config.seed,
                               param_shardings=param_shardings, opt_shardings=opt_shardings)
  eval_step = make_eval_step(model)
  put_train, put_eval = make_put(mesh, leading=1), make_put(mesh, leading=0)

  def save(final: bool = False):
    meta.update(step=step, tokens=tokens, model_config=dataclasses.asdict(cfg), phase=config.phase,
                languages=languages, complete=final, config=config.to_json())
    checkpointer.save(step, params=params, opt_state=opt_state, data_iter=train_data, meta=meta)

  def run_eval():
    eval_data = data_lib.eval_batches(eval_config, max_batches=config.eval_max_batches)
    result = evaluate(eval_step, params, eval_data, put_eval)
    writer.write(step, {f"eval/{lang}/loss": r["loss"] for lang, r in result.items() if lang != "all"}
                 | {"eval/loss": result.get("all", {}).get("loss"),
                    "eval/accuracy": result.get("all", {}).get("accuracy")})
    return result

  # ---- loop -----------------------------------------------------------------------------------------------------
  preemption = Preemption()
  seq_len = config.data.seq_len
  next_save = (tokens // config.checkpoint_every_tokens + 1) * config.checkpoint_every_tokens
  device_kind = jax.devices()[0].device_kind
  pending = None  # metrics of the previous step, read after the next one is dispatched (keeps the device busy)
  status = "complete"
  t_last = time.time()

  def consume(p):
    nonlocal t_last
    host = jax.device_get(p["metrics"])
    if not bool(host["finite"]):
      if not config.skip_nonfinite:
        raise NonFiniteLossError(
            f"step {p['step']}: loss/gradients are not finite (loss={float(host['loss'])}); parameters were not "
            f"updated and the last checkpoint in {checkpointer.directory} is intact. Set "
            "--config.skip_nonfinite=True to skip such steps.")
      writer.text("run", f"step {p['step']}: non-finite loss, step skipped")
    for i, lang in enumerate(languages):
      meta["tokens_per_language"][lang] = meta["tokens_per_language"].get(lang, 0) + int(host["lang_tokens"][i])
    if p["step"] % config.log_every_steps == 0:
      now = time.time()
      seconds = (now - t_last) / config.log_every_steps
      t_last = now
      flops = flops_lib.training_flops(cfg, p["segment_ids"], float(host["masked_tokens"]) / jax.process_count())
      flops_total = flops.total * jax.process_count()
      real_tokens = float(host["lang_tokens"].sum())
      lang_loss = {f"train_lang/{lang}/loss": host["lang_loss_sum"][i] / host["lang_count"][i]
                   for i, lang in enumerate(languages) if host["lang_count"][i] > 0}
      writer.write(p["step"], {
          "train/loss": host["loss"], "train/accuracy": host["accuracy"], "train/grad_norm": host["grad_norm"],
          "train/lr": host["lr"], "train/clipped_fraction": host["clipped_fraction"],
          "train/tokens": p["tokens"], "train/real_tokens_per_s": real_tokens / seconds,
          "train/tokens_per_s": p["slot_tokens"] / seconds, "train/model_flops_per_s": flops_total / seconds,
          "train/mfu": (flops_lib.mfu(flops_total, seconds, mesh.size, device_kind)
                        or (flops_total / (seconds * mesh.size * config.peak_flops_per_device)
                            if config.peak_flops_per_device else None)),
          "train/microbatches": p["micro"]} | lang_loss)
    return host

  try:
    with jax.set_mesh(mesh):
      while tokens < config.train_tokens:
        m = schedules.batch_warmup(tokens, num_microbatches=n_micro, warmup_tokens=config.batch_warmup_tokens,
                                   start_fraction=config.batch_warmup_start_fraction)
        micro = [next(train_data) for _ in range(m)]
        slot_tokens = m * micro_rows * seq_len
        lr = float(schedule(tokens + slot_tokens))  # the LR at the end of this step's tokens: warmup starts above 0
        params, opt_state, metrics = train_step(params, opt_state, put_train(stack_microbatches(micro)),
                                                jnp.float32(lr), jnp.int32(step))
        step += 1
        tokens += slot_tokens
        if pending is not None:
          consume(pending)
        pending = {"metrics": metrics, "step": step, "tokens": tokens, "slot_tokens": slot_tokens, "micro": m,
                   "segment_ids": np.concatenate([b["segment_ids"] for b in micro])}
        if config.eval_every_steps and step % config.eval_every_steps == 0:
          run_eval()
        if tokens >= next_save and tokens < config.train_tokens:  # the final checkpoint is written below
          consume(pending)
          pending = None
          save()
          next_save += config.checkpoint_every_tokens
        if preemption.should_stop():
          if pending is not None:
            consume(pending)
            pending = None
          if checkpointer.latest_step() != step:
            save()
          status = "preempted"
          writer.text("run", f"SIGTERM: saved step {step} to {checkpointer.directory}; re-run the same command "
                      "to resume")
          break
      if pending is not None:
        consume(pending)
      if status == "complete" and checkpointer.latest_step() != step:
        save(final=True)
    final_eval = run_eval() if status == "complete" else {}
  finally:
    checkpointer.wait()
    checkpointer.close()
    preemption.close()
    writer.close()
    close = getattr(train_data, "close", None)
    if close:
      close()
  return {"status": status, "step": step, "tokens": tokens, "eval": final_eval, "languages": languages,
          "workdir": workdir}
