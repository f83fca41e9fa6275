"""MLM masking: Bernoulli selection, 80/10/10, never padding, K cap, determinism."""

import math

import numpy as np
import pytest

from data_pipeline import masking

MASK, LOW, HIGH = 4, 5, 1000


def _rows(b, s, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(LOW, HIGH, (b, s)).astype(np.int32)
  seg = np.zeros((b, s), np.int32)
  for i in range(b):
    n = rng.integers(s // 4, s + 1)  # real tokens, then padding
    seg[i, :n] = 1 + (np.arange(n) * 3 // n)
  tokens[seg == 0] = 0
  return tokens, seg


def _mask(tokens, seg, rate, k, seed=0):
  rngs = [masking.row_rng(seed, 0, i) for i in range(len(tokens))]
  return masking.mask_rows(tokens, seg, rngs, rate=rate, max_masked=k, mask_id=MASK, random_low=LOW, random_high=HIGH)


def _selected(out, shape):
  sel = np.zeros(shape, bool)
  rows = np.repeat(np.arange(shape[0]), out["masked_positions"].shape[1])
  w = out["masked_weights"].reshape(-1) > 0
  sel[rows[w], out["masked_positions"].reshape(-1)[w]] = True
  return sel


@pytest.mark.parametrize("rate", [0.3, 0.15, 0.05])
def test_rates_and_80_10_10_in_expectation(rate):
  tokens, seg = _rows(400, 256)
  out = _mask(tokens, seg, rate, masking.default_max_masked(256, rate))
  sel = _selected(out, tokens.shape)
  real = seg > 0
  n_real, n_sel = real.sum(), sel.sum()
  # Selection rate within 4 binomial standard deviations.
  assert abs(n_sel / n_real - rate) < 4 * math.sqrt(rate * (1 - rate) / n_real)
  inp = out["input_ids"][sel]
  orig = tokens[sel]
  is_mask = inp == MASK
  kept = inp == orig
  rand = ~is_mask & ~kept
  tol = 4 * math.sqrt(0.25 / n_sel)
  assert abs(is_mask.mean() - 0.8) < tol
  assert abs(rand.mean() - 0.1) < tol
  # A random replacement equals the original with probability 1/995: "kept" is 10% plus that.
  assert abs(kept.mean() - (0.1 + 0.1 / (HIGH - LOW))) < tol
  assert np.all((inp[rand] >= LOW) & (inp[rand] < HIGH))


def test_padding_is_never_touched_and_labels_are_the_originals():
  tokens, seg = _rows(64, 128, seed=1)
  out = _mask(tokens, seg, 0.5, 128)
  sel = _selected(out, tokens.shape)
  assert not (sel & (seg == 0)).any()
  np.testing.assert_array_equal(out["input_ids"][~sel], tokens[~sel])  # unselected tokens unchanged
  w = out["masked_weights"] > 0
  rows = np.broadcast_to(np.arange(64)[:, None], w.shape)
  np.testing.assert_array_equal(out["masked_labels"][w], tokens[rows[w], out["masked_positions"][w]])
  assert np.all(out["masked_positions"][~w] == 0) and np.all(out["masked_labels"][~w] == 0)
  # Real slots come first, positions increasing.
  for i in range(64):
    n = int(w[i].sum())
    assert np.all(w[i, :n]) and np.all(np.diff(out["masked_positions"][i, :n]) > 0)
  assert out["input_ids"].dtype == np.int32 and out["masked_weights"].dtype == np.float32


def test_overflow_keeps_k_and_restores_the_rest():
  tokens, seg = _rows(32, 128, seed=2)
  seg[:] = 1
  k = 20  # far below 0.5 * 128
  out = _mask(tokens, seg, 0.5, k)
  assert np.all(out["masked_weights"].sum(1) == k)
  sel = _selected(out, tokens.shape)
  changed = out["input_ids"] != tokens
  assert not (changed & ~sel).any()  # every change is at a listed position
  # The kept selections are the k smallest selection draws of the row (a random subset of the selected).
  for i in range(32):
    u = masking.row_rng(0, 0, i).random(128)
    np.testing.assert_array_equal(np.sort(np.argsort(u)[:k]), np.nonzero(sel[i])[0])


def test_same_seed_same_mask():
  tokens, seg = _rows(8, 64)
  a, b = _mask(tokens, seg, 0.3, 40, seed=5), _mask(tokens, seg, 0.3, 40, seed=5)
  c = _mask(tokens, seg, 0.3, 40, seed=6)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(a["masked_positions"], c["masked_positions"])


def test_default_k():
  for s, rate in [(1024, 0.3), (8192, 0.15), (8192, 0.05), (16, 0.5)]:
    k = masking.default_max_masked(s, rate)
    assert k % 8 == 0 or k == s
    assert k >= rate * s + 4 * math.sqrt(s * rate * (1 - rate)) or k == s
    assert k <= s
