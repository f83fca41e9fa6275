"""Optimizers: StableAdamW (the mmBERT optimizer) and AdamW, as optax transformations.

StableAdamW (docs/RECIPE.md §3.4; optimi / ModernBERT `decoupled_stableadamw`) is Adam with debiased betas plus
per-tensor *update clipping*: each tensor's step is divided by max(1, rms), rms = sqrt(mean(g² / max(v̂, eps²))),
which replaces global gradient-norm clipping. Weight decay is fully decoupled: per step a decayed tensor shrinks by
`weight_decay · lr_eff / peak_lr`, so `weight_decay` means "decay per step at peak LR" (8e-5 in the recipe), not a
coefficient multiplied by the LR. Only tensors with ndim ≥ 2 are decayed (kernels and the tied embedding); norm
scales and the decoder bias are not.

The learning rate is driven by tokens, not by optimizer steps (the batch grows during batch-size warmup), so
it is an injected hyperparameter: the trainer computes `lr = schedule(tokens)` and writes it into the state
before each update::

  tx = optim.build("stable_adamw", learning_rate=0.0, peak_lr=8e-4, weight_decay=8e-5)
  opt_state = tx.init(params)
  ...
  opt_state = optim.with_learning_rate(opt_state, schedule(tokens_seen))   # works inside jit
  updates, opt_state = tx.update(grads, opt_state, params)
  metrics = {"lr": optim.learning_rate(opt_state), "clipped": optim.clipped_fraction(opt_state)}
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

OPTIMIZERS = ("stable_adamw", "adamw")


def decay_mask(params: Any) -> Any:
  """True for tensors that get weight decay: ndim ≥ 2 (kernels, embedding); norms and biases are 1-D."""
  return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


class ScaleByStableAdamState(NamedTuple):
  count: jax.Array  # int32 step counter t
  mu: optax.Updates  # debiased first moment m
  nu: optax.Updates  # debiased second moment v
  clipped_fraction: jax.Array  # fraction of tensors whose update was clipped (rms > 1) in the last step


def _debiased_beta(beta, t):
  """(β^t − β) / (β^t − 1): the EMA weight that makes m and v unbiased directly (0 at t = 1)."""
  beta_t = beta**t
  return (beta_t - beta) / (beta_t - 1)


def scale_by_stable_adam(
  b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8, weight_decay: float = 0.0, weight_decay_mask: Any = decay_mask
) -> optax.GradientTransformation:
  """StableAdamW direction `(m / (√v + eps) + weight_decay · p) / max(1, rms)` per tensor; scale by −lr after.

  `weight_decay` here is relative to the learning rate (wd / peak_lr for the fully decoupled form), so that the
  following `scale_by_learning_rate` turns it into `wd · lr_eff / peak_lr`. `weight_decay_mask` is a pytree of
  bools or a callable of the params, as in `optax.add_decayed_weights`.
  """
  # Masking follows optax's own convention, so both optimizers in this module decay the same tensors.
  decay = optax.add_decayed_weights(weight_decay, weight_decay_mask)

  def init_fn(params):
    return ScaleByStableAdamState(
      count=jnp.zeros([], jnp.int32),
      mu=optax.tree.zeros_like(params),
      nu=optax.tree.zeros_like(params),
      clipped_fraction=jnp.zeros([], jnp.float32),
    )

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("StableAdamW needs params for weight decay: call tx.update(grads, opt_state, params)")
    count = optax.safe_increment(state.count)
    t = count.astype(jnp.float32)
    mu = optax.tree.update_moment(updates, state.mu, _debiased_beta(b1, t), 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, _debiased_beta(b2, t), 2)
    # Per-tensor RMS of g / √v, with v floored at eps² (the current gradient is already inside v).
    rms = jax.tree.map(lambda g, v: jnp.sqrt(jnp.mean(jnp.square(g) / jnp.maximum(v, eps * eps))), updates, nu)
    adam = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu, nu)
    direction, _ = decay.update(adam, decay.init(params), params)
    # Update clipping scales the Adam step and the decay together: lr_eff = lr / max(1, rms).
    direction = jax.tree.map(lambda d, r: d / jnp.maximum(1.0, r), direction, rms)
    rms_leaves = jax.tree.leaves(rms)
    clipped = jnp.mean(jnp.stack([r > 1.0 for r in rms_leaves]).astype(jnp.float32)) if rms_leaves else 0.0
    return direction, ScaleByStableAdamState(
      count=count, mu=mu, nu=nu, clipped_fraction=jnp.asarray(clipped, jnp.float32)
    )

  return optax.GradientTransformation(init_fn, update_fn)


def stable_adamw(
  learning_rate: optax.ScalarOrSchedule,
  peak_lr: float,
  weight_decay: float,
  b1: float = 0.9,
  b2: float = 0.95,
  eps: float = 1e-8,
  weight_decay_mask: Any = decay_mask,
) -> optax.GradientTransformation:
  """StableAdamW with fully decoupled weight decay `weight_decay` (per step at peak LR)."""
  return optax.chain(
    scale_by_stable_adam(b1, b2, eps, weight_decay / peak_lr, weight_decay_mask),
    optax.scale_by_learning_rate(learning_rate),
  )


def adamw(
  learning_rate: optax.ScalarOrSchedule,
  peak_lr: float,
  weight_decay: float,
  b1: float = 0.9,
  b2: float = 0.95,
  eps: float = 1e-8,
  weight_decay_mask: Any = decay_mask,
) -> optax.GradientTransformation:
  """optax.adamw with the same fully decoupled meaning of `weight_decay` (optax multiplies its decay by lr)."""
  return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay / peak_lr, mask=weight_decay_mask)


_FACTORIES: dict[str, Callable[..., optax.GradientTransformation]] = {"stable_adamw": stable_adamw, "adamw": adamw}


def build(
  name: str,
  learning_rate: optax.ScalarOrSchedule,
  peak_lr: float,
  weight_decay: float,
  b1: float = 0.9,
  b2: float = 0.95,
  eps: float = 1e-8,
  weight_decay_mask: Any = decay_mask,
) -> optax.GradientTransformationExtraArgs:
  """The named optimizer with every numeric hyperparameter injected into its state.

  `learning_rate` is the initial value; set it per step with `with_learning_rate` (the token-driven path).
  A callable `learning_rate` is treated by optax as a schedule of the *step count* and cannot be overridden.
  `peak_lr` is the run's peak LR, the reference for the fully decoupled weight decay.
  """
  if name not in _FACTORIES:
    raise ValueError(f"unknown optimizer {name!r}; expected one of {list(OPTIMIZERS)}")
  if not peak_lr > 0:
    raise ValueError(f"peak_lr must be > 0 (the run's peak learning rate), got {peak_lr}")
  if weight_decay < 0:
    raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
  for key, beta in (("b1", b1), ("b2", b2)):
    if not 0 <= beta < 1:
      raise ValueError(f"{key} must be in [0, 1), got {beta}")
  factory = optax.inject_hyperparams(_FACTORIES[name], static_args=("weight_decay_mask",))
  return factory(
    learning_rate=learning_rate,
    peak_lr=peak_lr,
    weight_decay=weight_decay,
    b1=b1,
    b2=b2,
    eps=eps,
    weight_decay_mask=weight_decay_mask,
  )


# --------------------------------------------------------------------------------------------------------------
# Reading and writing the optimizer state
# --------------------------------------------------------------------------------------------------------------


def _unwrap(x):
  return x[...] if isinstance(x, nnx.Variable) else x


def with_learning_rate(opt_state: Any, lr: Any) -> Any:
  """A copy of `opt_state` whose injected learning rate is `lr` (a float or a traced scalar).

  Works on a plain optax state and on `nnx.Optimizer.opt_state` (assign the result back to it).
  """
  if "learning_rate" in (optax.tree.get(opt_state, "hyperparams_states", None) or {}):
    raise ValueError(
      "this optimizer's learning_rate is a step-count schedule; build it with a float "
      "learning_rate to inject a token-driven value"
    )
  current = optax.tree.get(opt_state, "learning_rate", None)
  if current is None:
    raise ValueError("opt_state has no injected learning_rate; build the optimizer with optim.build(...)")
  value = jnp.asarray(lr, jnp.result_type(_unwrap(current)))
  return optax.tree.set(opt_state, learning_rate=current.replace(value) if isinstance(current, nnx.Variable) else value)


def learning_rate(opt_state: Any) -> jax.Array | None:
  """The learning rate used by the last update (or the injected one, if set since)."""
  return _unwrap(optax.tree.get(opt_state, "learning_rate", None))


def clipped_fraction(opt_state: Any) -> jax.Array | None:
  """StableAdamW: fraction of tensors whose update was clipped in the last step; None for other optimizers."""
  return _unwrap(optax.tree.get(opt_state, "clipped_fraction", None))
