"""Learning-rate and batch-size schedules, counted in tokens (docs/RECIPE.md §3.2, §3.3).

mmBERT schedules everything by tokens seen, not by optimizer steps: the batch grows during batch-size warmup,
so a step is not a fixed amount of data. Each phase has its own schedule whose position is *tokens since the
phase started*:

  pre-training   warmup then constant   wsd_schedule(8e-4, warmup_tokens=3e9)
  mid-training   constant               wsd_schedule(8e-4)
  decay          decay from the start   wsd_schedule(8e-4, decay_start_tokens=0, decay_tokens=100e9,
                                                     final_fraction=0.02, decay_shape="1-sqrt")

`phase_start_tokens` lets the trainer pass its global token counter instead. `wsd_schedule` is a jnp function
(jit-able; float32 resolves a 3T-token position to ~0.3M tokens, far below one step). `host_wsd_schedule` is the
same schedule in numpy float64: the training loop computes each step's learning rate on the host, where a jnp
schedule would queue behind the running step and reading its value would wait for that step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

DECAY_SHAPES = ("1-sqrt", "inverse_sqrt", "linear", "cosine")


def _checked_decay(decay_tokens: float, final_fraction: float, shape: str) -> float:
  if shape not in DECAY_SHAPES:
    raise ValueError(f"unknown decay_shape {shape!r}; expected one of {list(DECAY_SHAPES)}")
  if not decay_tokens > 0:
    raise ValueError(f"decay_tokens must be > 0 to decay, got {decay_tokens}")
  if not 0 <= final_fraction <= 1:
    raise ValueError(f"final_fraction must be in [0, 1], got {final_fraction}")
  if shape == "inverse_sqrt" and final_fraction == 0:
    raise ValueError("decay_shape 'inverse_sqrt' never reaches 0: give final_fraction > 0")
  return float(decay_tokens)


def _checked_wsd(
  peak_lr, warmup_tokens, decay_start_tokens, decay_tokens, final_fraction, decay_shape, phase_start_tokens
) -> tuple[float, float | None, float, float]:
  """wsd_schedule's arguments as floats (token counts reach 1e12: as Python ints they would enter jnp as int32 and
  overflow), or a ValueError naming the one that cannot be used."""
  if not peak_lr > 0:
    raise ValueError(f"peak_lr must be > 0, got {peak_lr}")
  warmup_tokens, decay_tokens, phase_start_tokens = map(float, (warmup_tokens, decay_tokens, phase_start_tokens))
  decay_start_tokens = None if decay_start_tokens is None else float(decay_start_tokens)
  if warmup_tokens < 0 or phase_start_tokens < 0:
    raise ValueError(f"warmup_tokens ({warmup_tokens}) and phase_start_tokens ({phase_start_tokens}) must be >= 0")
  if decay_start_tokens is not None:
    if decay_start_tokens < warmup_tokens:
      raise ValueError(
        f"decay_start_tokens ({decay_start_tokens}) must be >= warmup_tokens ({warmup_tokens}): "
        "decay starts after warmup"
      )
    _checked_decay(decay_tokens, final_fraction, decay_shape)
  return warmup_tokens, decay_start_tokens, decay_tokens, phase_start_tokens


def decay_schedule(peak_lr: float, decay_tokens: float, final_fraction: float, shape: str = "1-sqrt") -> optax.Schedule:
  """Decay from `peak_lr` at t = 0 to `final_fraction · peak_lr` at t = decay_tokens, held there after.

  With α = final_fraction and s = min(t / decay_tokens, 1):
    1-sqrt        peak · [α + (1 − α)(1 − √s)]            (the mmBERT-base decay; the blog's "inverse sqrt")
    inverse_sqrt  peak / √(1 + s (α⁻² − 1))               (1/√t shape anchored to reach α at the end; α > 0)
    linear        peak · [α + (1 − α)(1 − s)]
    cosine        peak · [α + (1 − α) · ½(1 + cos πs)]
  """
  decay_tokens = _checked_decay(decay_tokens, final_fraction, shape)
  end = peak_lr * final_fraction
  if shape == "linear":
    return optax.linear_schedule(peak_lr, end, decay_tokens)
  if shape == "cosine":
    return optax.cosine_decay_schedule(peak_lr, decay_tokens, alpha=final_fraction)
  progress = lambda t: jnp.clip(t / decay_tokens, 0.0, 1.0)
  if shape == "1-sqrt":
    return lambda t: end + (peak_lr - end) * (1.0 - jnp.sqrt(progress(t)))
  return lambda t: peak_lr * jax.lax.rsqrt(1.0 + progress(t) * (final_fraction**-2 - 1.0))


def wsd_schedule(
  peak_lr: float,
  *,
  warmup_tokens: float = 0,
  decay_start_tokens: float | None = None,
  decay_tokens: float = 0,
  final_fraction: float = 0.0,
  decay_shape: str = "1-sqrt",
  phase_start_tokens: float = 0,
) -> Callable[[jax.typing.ArrayLike], jax.Array]:
  """Warmup-stable-decay learning rate as a function of tokens.

  Position t = tokens − phase_start_tokens (negative counts as 0). Linear warmup from 0 to `peak_lr` over
  `warmup_tokens`; constant `peak_lr` until `decay_start_tokens` (None: never decay); then `decay_schedule`
  over `decay_tokens`, ending at `final_fraction · peak_lr` and held there.
  """
  warmup_tokens, decay_start_tokens, decay_tokens, phase_start_tokens = _checked_wsd(
    peak_lr, warmup_tokens, decay_start_tokens, decay_tokens, final_fraction, decay_shape, phase_start_tokens
  )
  pieces, boundaries = [], []
  if warmup_tokens > 0:
    pieces.append(optax.linear_schedule(0.0, peak_lr, warmup_tokens))
    boundaries.append(warmup_tokens)
  if decay_start_tokens is None or decay_start_tokens > warmup_tokens:
    pieces.append(optax.constant_schedule(peak_lr))
    boundaries.append(decay_start_tokens)
  if decay_start_tokens is not None:
    pieces.append(decay_schedule(peak_lr, decay_tokens, final_fraction, decay_shape))
  # join_schedules hands each piece the tokens since its own boundary.
  joined = optax.join_schedules(pieces, boundaries[: len(pieces) - 1])

  def schedule(tokens):
    t = jnp.maximum(jnp.asarray(tokens, jnp.float32) - phase_start_tokens, 0.0)
    return (joined(t) + jnp.zeros_like(t)).astype(jnp.float32)

  return schedule


def host_wsd_schedule(
  peak_lr: float,
  *,
  warmup_tokens: float = 0,
  decay_start_tokens: float | None = None,
  decay_tokens: float = 0,
  final_fraction: float = 0.0,
  decay_shape: str = "1-sqrt",
  phase_start_tokens: float = 0,
) -> Callable[[np.typing.ArrayLike], np.ndarray]:
  """`wsd_schedule` in numpy float64, for the host: same arguments, same errors, same values (to float32
  precision); a token count gives a numpy float64 scalar, an array of them an array."""
  warmup_tokens, decay_start_tokens, decay_tokens, phase_start_tokens = _checked_wsd(
    peak_lr, warmup_tokens, decay_start_tokens, decay_tokens, final_fraction, decay_shape, phase_start_tokens
  )
  end = peak_lr * final_fraction

  def decay(s):  # s = decay progress in [0, 1]; the formulas of decay_schedule
    if decay_shape == "1-sqrt":
      return end + (peak_lr - end) * (1.0 - np.sqrt(s))
    if decay_shape == "inverse_sqrt":
      return peak_lr / np.sqrt(1.0 + s * (final_fraction**-2 - 1.0))
    if decay_shape == "linear":
      return end + (peak_lr - end) * (1.0 - s)
    return end + (peak_lr - end) * 0.5 * (1.0 + np.cos(np.pi * s))

  def schedule(tokens):
    t = np.maximum(np.asarray(tokens, np.float64) - phase_start_tokens, 0.0)
    lr = np.full_like(t, peak_lr)
    if warmup_tokens > 0:
      lr = np.where(t < warmup_tokens, peak_lr * t / warmup_tokens, lr)
    if decay_start_tokens is not None:
      lr = np.where(t < decay_start_tokens, lr, decay(np.clip((t - decay_start_tokens) / decay_tokens, 0.0, 1.0)))
    return lr[()]

  return schedule


def batch_warmup(
  tokens: float,
  *,
  num_microbatches: int,
  warmup_tokens: float,
  start_fraction: float = 1 / 12,
  level_duration: str = "steps",
) -> int:
  """Number of micro-batches (1..num_microbatches) to accumulate into the next optimizer step.

  The full batch is `num_microbatches` fixed-size micro-batches; warmup starts at ⌈start_fraction · n⌉ of them
  and grows by one micro-batch per level, reaching n once `tokens` ≥ `warmup_tokens` (docs/RECIPE.md §3.3: 384 →
  4608 sequences = 1 → 12 micro-batches of 384). With `level_duration="steps"` every level below n lasts the
  same number of optimizer steps, so level k spans tokens ∝ k (ModernBERT's BatchSizeWarmupScheduler); with
  "tokens" every level spans the same number of tokens. `tokens` is counted from the phase start, globally.
  """
  n = num_microbatches
  if not (isinstance(n, (int, np.integer)) and n >= 1):
    raise ValueError(f"num_microbatches must be a positive integer, got {n!r}")
  if not 0 < start_fraction <= 1:
    raise ValueError(f"start_fraction must be in (0, 1], got {start_fraction}")
  if level_duration not in ("steps", "tokens"):
    raise ValueError(f"level_duration must be 'steps' or 'tokens', got {level_duration!r}")
  start = min(n, max(1, math.ceil(start_fraction * n - 1e-9)))
  if warmup_tokens <= 0 or start == n or tokens >= warmup_tokens:
    return n
  levels = np.arange(start, n, dtype=np.float64)  # the sizes used during warmup
  span = levels if level_duration == "steps" else np.ones_like(levels)  # tokens each level lasts, relative
  level_ends = warmup_tokens * np.cumsum(span) / span.sum()
  return int(start + np.searchsorted(level_ends, tokens, side="right"))
