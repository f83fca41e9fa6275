"""Attention for the encoder: one signature, several implementations.

`attention(q, k, v, segment_ids, window)` computes softmax(q·kᵀ/√d)·v over keys of the same document
(`segment_ids` equal and non-zero) and, for local layers, with |i − j| ≤ window. Layout `[B, S, N, D]`.
The XLA implementation here is the reference every kernel is tested against.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla",)


def segment_mask(segment_ids: jax.Array) -> jax.Array:
  """[B, S] segment ids → boolean [B, 1, S, S]: same document and the key is not padding.

  A padding query has no allowed key; the finite mask value of the XLA path turns that row into a harmless
  average instead of NaN (a NaN there would leak into real rows through 0·NaN in the backward pass).
  """
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  return (same & (segment_ids[:, None, :] != 0))[:, None]


def xla_attention(q, k, v, segment_ids, window: int | None):
  return jax.nn.dot_product_attention(
      q, k, v, mask=segment_mask(segment_ids),
      local_window_size=None if window is None else (window, window),
      implementation="xla")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, window: int | None,
              *, impl: str = "xla") -> jax.Array:
  """Bidirectional attention within documents; `window` is the one-sided local window (None = global)."""
  if impl == "xla":
    return xla_attention(q, k, v, segment_ids, window)
  raise ValueError(f"attention impl {impl!r} is not one of {IMPLEMENTATIONS}")
