"""Merging trained checkpoints: TIES-merging, weighted averages and exponential (EMA-style) weighting.

mmBERT merges its decay-phase checkpoints after training (docs/RECIPE.md §5): the base model combines the best
checkpoint of each decay mixture with TIES-merging, the small model an exponentially weighted set of Decay-All
checkpoints.
Everything here works on plain parameter pytrees (nested dicts of arrays, or `nnx.State`) and returns a tree of the
same structure and dtypes; arithmetic is done in float32. Trees must match exactly: same structure, and per
parameter the same shape and dtype; a mismatch raises a one-line error naming the parameter path.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


# ---------------------------------------------------------------------------------------------------------------------
# Checks.


def _path_str(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _flatten(tree: PyTree) -> tuple[list[str], list[Any]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [_path_str(p) for p, _ in flat], [x for _, x in flat]


def _check_compatible(trees: Sequence[PyTree], names: Sequence[str]) -> list[list[Any]]:
  """Returns the leaves of every tree, after checking that structure, shapes and dtypes all agree."""
  ref_paths, ref_leaves = _flatten(trees[0])
  ref_def = jax.tree.structure(trees[0])
  leaves = [ref_leaves]
  for tree, name in zip(trees[1:], names[1:]):
    paths, tree_leaves = _flatten(tree)
    if paths != ref_paths:
      missing = [p for p in ref_paths if p not in set(paths)]
      extra = [p for p in paths if p not in set(ref_paths)]
      if missing:
        raise ValueError(f"{name} has no parameter '{missing[0]}' that {names[0]} has; merged trees must match")
      if extra:
        raise ValueError(f"{name} has parameter '{extra[0]}' that {names[0]} lacks; merged trees must match")
      raise ValueError(f"{name} orders its parameters differently from {names[0]}; merged trees must match")
    if jax.tree.structure(tree) != ref_def:
      raise ValueError(
        f"{name} has the same parameter paths as {names[0]} but different container types "
        f"({jax.tree.structure(tree)} vs {ref_def})"
      )
    for path, a, b in zip(paths, ref_leaves, tree_leaves):
      if np.shape(a) != np.shape(b):
        raise ValueError(f"parameter '{path}': {name} has shape {np.shape(b)} but {names[0]} has {np.shape(a)}")
      if jnp.result_type(a) != jnp.result_type(b):
        raise ValueError(
          f"parameter '{path}': {name} has dtype {jnp.result_type(b)} but {names[0]} has {jnp.result_type(a)}"
        )
    leaves.append(tree_leaves)
  for path, a in zip(ref_paths, ref_leaves):
    if not jnp.issubdtype(jnp.result_type(a), jnp.floating):
      raise ValueError(
        f"parameter '{path}' has dtype {jnp.result_type(a)}; only floating-point parameters can be merged"
      )
  return leaves


def _check_weights(weights, n: int, what: str) -> np.ndarray:
  """Weights as a float64 vector of length n: finite, non-negative, not all zero."""
  if weights is None:
    return np.ones(n)
  w = np.asarray(weights, dtype=np.float64)
  if w.ndim != 1 or len(w) != n:
    raise ValueError(f"weights has {w.size} entries but there are {n} {what}; give one weight per {what[:-1]}")
  if not np.all(np.isfinite(w)) or np.any(w < 0) or not np.any(w > 0):
    raise ValueError(f"weights must be finite, non-negative and not all zero, got {w.tolist()}")
  return w


# ---------------------------------------------------------------------------------------------------------------------
# Averages.


def average(trees: Sequence[PyTree], weights: Sequence[float] | None = None) -> PyTree:
  """Weighted mean Σ_i w_i θ_i / Σ_i w_i of parameter trees (uniform when `weights` is None)."""
  trees = list(trees)
  if not trees:
    raise ValueError("average needs at least one tree")
  w = _check_weights(weights, len(trees), "trees")
  w = w / w.sum()
  leaves = _check_compatible(trees, [f"tree {i}" for i in range(len(trees))])

  def mean(*xs):
    # θ_0 + Σ w_i (θ_i − θ_0): exactly θ when every tree is the same θ, whatever the weights.
    first = jnp.asarray(xs[0], jnp.float32)
    acc = first + sum(float(wi) * (jnp.asarray(x, jnp.float32) - first) for wi, x in zip(w[1:], xs[1:]))
    return acc.astype(jnp.result_type(xs[0]))

  merged = [mean(*xs) for xs in zip(*leaves)]
  return jax.tree.unflatten(jax.tree.structure(trees[0]), merged)


def ema_weights(n: int, decay: float) -> np.ndarray:
  """Normalised weights w_i ∝ decay^(n−1−i) for n checkpoints ordered oldest → newest.

  The newest checkpoint gets the largest weight and each older one `decay` times the next; decay = 1 is the
  uniform average. (This is a finite exponential weighting of the given checkpoints, not the running-EMA recurrence,
  which would give the oldest checkpoint the whole tail mass decay^(n−1).)
  """
  if not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"ema_weights needs n >= 1 checkpoints, got {n!r}")
  if not 0 < decay <= 1:
    raise ValueError(f"decay must be in (0, 1], got {decay}")
  w = decay ** np.arange(n - 1, -1, -1, dtype=np.float64)
  return w / w.sum()


def ema(trees: Sequence[PyTree], decay: float) -> PyTree:
  """Exponentially weighted average of checkpoints ordered oldest → newest (see `ema_weights`)."""
  trees = list(trees)
  if not trees:
    raise ValueError("ema needs at least one tree")
  return average(trees, ema_weights(len(trees), decay))


# ---------------------------------------------------------------------------------------------------------------------
# TIES-merging.


def num_kept(size: int, density: float) -> int:
  """How many entries of a tensor with `size` entries TIES keeps: density·size rounded half-up, at least 1."""
  return max(1, min(size, math.floor(density * size + 0.5)))


@functools.partial(jax.jit, static_argnames=("k",))
def _ties_tensor(base, models, weights, lam, *, k):
  """TIES on one tensor. models [M, *shape], weights [M], k = entries kept per task vector."""
  base32 = base.astype(jnp.float32)
  tau = models.astype(jnp.float32) - base32  # task vectors
  mag = jnp.abs(tau).reshape(len(tau), -1)
  if k < mag.shape[1]:
    # Keep every entry at least as large as the k-th largest magnitude: equal magnitudes at the threshold are all
    # kept, so the result does not depend on the order of the entries.
    kth = jnp.sort(mag, axis=1)[:, mag.shape[1] - k]
    tau = jnp.where((mag >= kth[:, None]).reshape(tau.shape), tau, 0.0)
  w = weights.reshape((-1,) + (1,) * base.ndim)
  elected = jnp.sign(jnp.sum(w * tau, axis=0))  # sign of the total (weighted) mass
  agree = (jnp.sign(tau) == elected) & (tau != 0)  # a zero mass elects 0: nobody agrees
  num = jnp.sum(jnp.where(agree, w * tau, 0.0), axis=0)
  den = jnp.sum(jnp.where(agree, w, 0.0), axis=0)
  merged_tau = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)
  return (base32 + lam * merged_tau).astype(base.dtype)


def ties(
  base: PyTree, models: Sequence[PyTree], *, density: float, weights: Sequence[float] | None = None, lam: float = 1.0
) -> PyTree:
  """TIES-merging (Yadav et al. 2023, arXiv:2306.01708) of `models` relative to `base`.

  For every parameter tensor, with task vectors τ_i = θ_i − θ_base:
    1. Trim: keep the k = `num_kept(size, density)` largest-magnitude entries of each τ_i and zero the rest,
       per tensor (as mergekit does; the paper's reference code ranks over the whole flattened model). Entries tied
       with the k-th largest magnitude are all kept, so the choice is deterministic.
    2. Elect: γ = sign(Σ_i w_i τ̂_i), the sign with the larger total mass. A total of exactly 0 elects no sign and
       the entry keeps the base value (mergekit picks + there; the paper's code picks the majority sign of the whole
       vector; neither is symmetric under τ → −τ).
    3. Disjoint mean: τ_m = Σ_{i∈A} w_i τ̂_i / Σ_{i∈A} w_i over A = {i : τ̂_i ≠ 0 and sign(τ̂_i) = γ}; 0 where A is empty.
    4. θ = θ_base + lam · τ_m.
  Weights follow mergekit's `ties` with `normalize: true`: they scale each τ_i before the election and weight the
  disjoint mean, so only their ratios matter; None gives the paper's unweighted rule. The paper uses lam = 1 with
  the disjoint mean.

  Args:
    base: reference parameters θ_base (e.g. the end of mid-training).
    models: the fine-tuned/decayed parameter trees θ_i, each with the structure, shapes and dtypes of `base`.
    density: fraction of each task vector's entries kept, in (0, 1]; 1 keeps all.
    weights: optional non-negative weight per model.
    lam: scale of the merged task vector.
  Returns:
    The merged tree, with the structure and dtypes of `base`.
  """
  models = list(models)
  if not models:
    raise ValueError("ties needs at least one model to merge into the base")
  if not 0 < density <= 1:
    raise ValueError(f"density must be in (0, 1], got {density}")
  w = jnp.asarray(_check_weights(weights, len(models), "models"), jnp.float32)
  leaves = _check_compatible([base] + models, ["base"] + [f"model {i}" for i in range(len(models))])
  merged = []
  for base_leaf, *model_leaves in zip(*leaves):
    stacked = jnp.stack([jnp.asarray(x) for x in model_leaves])
    merged.append(
      _ties_tensor(jnp.asarray(base_leaf), stacked, w, jnp.float32(lam), k=num_kept(int(np.size(base_leaf)), density))
    )
  return jax.tree.unflatten(jax.tree.structure(base), merged)
