"""MLM masking of packed rows, as in BERT / ModernBERT, with a fixed-size list of masked positions.

Every real token (segment id > 0; padding never) is selected with probability `rate`, independently (ModernBERT's
per-token Bernoulli, not a fixed count). Of the selected tokens 80% become `<mask>`, 10% a random token and 10%
stay unchanged; the loss is taken on all of them. The sparse MLM head reads exactly K positions per row, so
selections are returned as `masked_positions [b, K]` with labels and weights (0 for unused slots, whose position
points at 0). K is fixed per phase (`default_max_masked`: mean + 4 standard deviations of a full row's count);
should a row select more than K, it keeps the K selected tokens with the smallest draws (a uniformly random
subset) and leaves the others unmasked, so inputs and labels always agree.

Randomness comes from one numpy Generator per row, so a row's mask depends only on the row's own seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

MASK_FRACTION, RANDOM_FRACTION = 0.8, 0.1  # the remaining 0.1 keeps the original token


def default_max_masked(seq_len: int, rate: float) -> int:
  """K: mean + 4σ of Binomial(seq_len, rate), rounded up to a multiple of 8, at most seq_len."""
  k = rate * seq_len + 4 * math.sqrt(seq_len * rate * (1 - rate))
  return min(seq_len, 8 * math.ceil(k / 8))


def row_rng(*keys: int) -> np.random.Generator:
  """The Generator of one row, from non-negative integer keys (seed, split tag, step, global row, …)."""
  return np.random.default_rng([int(k) for k in keys])


def mask_rows(
  tokens: np.ndarray,
  segment_ids: np.ndarray,
  rngs: Sequence[np.random.Generator],
  *,
  rate: float,
  max_masked: int,
  mask_id: int,
  random_low: int,
  random_high: int,
) -> dict[str, np.ndarray]:
  """Masks rows `tokens [b, S]`; random replacements are drawn uniformly from [random_low, random_high).

  Returns input_ids [b, S] int32, masked_positions [b, K] int32, masked_labels [b, K] int32 (original ids, 0 in
  unused slots) and masked_weights [b, K] float32.
  """
  b, s = tokens.shape
  k = max_masked
  select_u = np.empty((b, s))
  action_u = np.empty((b, s))
  random_ids = np.empty((b, s), np.int32)
  for i, rng in enumerate(rngs):
    select_u[i] = rng.random(s)
    action_u[i] = rng.random(s)
    random_ids[i] = rng.integers(random_low, random_high, s)

  selected = (segment_ids > 0) & (select_u < rate)
  counts = selected.sum(1)
  for i in np.nonzero(counts > k)[0]:
    # Keep the k selected tokens with the smallest draws: a uniformly random subset of the selection.
    idx = np.nonzero(selected[i])[0]
    selected[i] = False
    selected[i, idx[np.argsort(select_u[i, idx], kind="stable")[:k]]] = True

  input_ids = tokens.astype(np.int32, copy=True)
  to_mask = selected & (action_u < MASK_FRACTION)
  to_random = selected & (action_u >= MASK_FRACTION) & (action_u < MASK_FRACTION + RANDOM_FRACTION)
  input_ids[to_mask] = mask_id
  input_ids[to_random] = random_ids[to_random]

  # Selected positions first, in increasing order (stable sort of "not selected"), then unused slots.
  order = np.argsort(~selected, axis=1, kind="stable")[:, :k].astype(np.int32)
  used = np.arange(k)[None, :] < np.minimum(selected.sum(1), k)[:, None]
  positions = np.where(used, order, 0).astype(np.int32)
  labels = np.where(used, np.take_along_axis(tokens, positions, axis=1), 0).astype(np.int32)
  return {
    "input_ids": input_ids,
    "masked_positions": positions,
    "masked_labels": labels,
    "masked_weights": used.astype(np.float32),
  }
