"""Analytic FLOPs against docs/ARCHITECTURE.md §8, brute-force pair counts and the model's own parameter shapes."""

import jax
import numpy as np
import pytest
from flax import nnx

from mmbert_jax import flops
from mmbert_jax.model import MaskedLM, get_config


def expected_per_token(cfg, seq, mask_rate):
  """docs/ARCHITECTURE.md §8 for one document of length `seq`, written out independently of the module."""
  h, i, v, n_layers = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
  w = cfg.local_window // 2
  n_global = sum(1 for layer in range(n_layers) if layer % cfg.global_every_n == 0)
  local = seq * seq if seq <= w + 1 else seq * (2 * w + 1) - w * (w + 1)
  linears = 6 * n_layers * (4 * h * h + 3 * h * i)
  attention = 12 * h * (n_global * seq * seq + (n_layers - n_global) * local) / seq
  head = 6 * (1.0 if mask_rate is None else mask_rate) * (h * h + h * v)
  return linears, attention, head


# docs/ARCHITECTURE.md §8 per-token table, millions: (total, linears, attention, sparse head, dense head).
PUBLISHED = [
  ("mmbert-base", {}, 1024, 0.30, (1108, 662, 92, 355, 1183)),
  ("mmbert-base", {}, 8192, 0.15, (1460, 662, 621, 178, 1183)),
  ("mmbert-small", {}, 1024, 0.30, (476, 253, 46, 177, 591)),
  ("mmbert-small", {}, 8192, 0.15, (652, 253, 310, 89, 591)),
  ("mmbert-base", {"vocab_size": 50368}, 1024, 0.30, (824, 662, 92, 71, 236)),  # ModernBERT-base
  ("mmbert-base", {"vocab_size": 50368}, 8192, 0.30, (1353, 662, 621, 71, 236)),
]


@pytest.mark.parametrize("name,overrides,seq,mask,table", PUBLISHED)
def test_per_token_table(name, overrides, seq, mask, table):
  cfg = get_config(name, **overrides)
  got = flops.flops_per_token(cfg, seq, mask)
  dense = flops.flops_per_token(cfg, seq, None)
  linears, attention, head = expected_per_token(cfg, seq, mask)
  assert got.linears == pytest.approx(linears, rel=1e-12)
  assert got.attention == pytest.approx(attention, rel=1e-12)
  assert got.head == pytest.approx(head, rel=1e-12)
  assert dense.head == pytest.approx(expected_per_token(cfg, seq, None)[2], rel=1e-12)
  published = np.array(table, float)
  measured = np.array([got.total, got.linears, got.attention, got.head, dense.head]) / 1e6
  # Rounded to 1M; the 15% head (177.48M) is printed as 178, half of the rounded 355.
  np.testing.assert_allclose(measured, published, atol=0.6)


def brute_pairs(segment_ids, window):
  """Count (query, key) pairs the attention mask allows: same non-zero segment and, if local, |i − j| ≤ w."""
  seg = np.atleast_2d(segment_ids)
  idx = np.arange(seg.shape[1])
  allowed = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
  if window is not None:
    allowed &= np.abs(idx[:, None] - idx[None, :]) <= window
  return int(allowed.sum())


@pytest.mark.parametrize("window", [0, 1, 3, 8])
def test_local_pairs_against_brute_force(window):
  for length in [1, 2, 3, window, window + 1, window + 2, 2 * window + 3, 17, 40]:
    if length < 1:
      continue
    seg = np.ones((1, length), np.int32)
    assert flops.attention_pairs([length], window) == brute_pairs(seg, window), (length, window)
    assert flops.attention_pairs([length], None) == length * length


def test_packed_batch_pairs_and_lengths():
  seg = np.array(
    [[1, 1, 1, 2, 2, 0, 0, 0, 0, 0, 0, 0], [1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]]
  )
  lengths = flops.document_lengths(seg)
  np.testing.assert_array_equal(lengths, [3, 2, 1, 9, 1, 12])
  for window in [None, 0, 2, 4]:
    assert flops.attention_pairs(lengths, window) == brute_pairs(seg, window)


def test_training_flops_on_a_packed_batch():
  cfg = get_config("tiny")
  rng = np.random.default_rng(0)
  seg = np.zeros((4, 64), np.int32)
  for row in seg:
    pos, doc = 0, 1
    while pos < 56:
      n = int(rng.integers(1, 30))
      row[pos : pos + n] = doc
      pos, doc = pos + n, doc + 1
  t = int((seg != 0).sum())
  h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  pairs = sum(
    brute_pairs(seg, None if layer % cfg.global_every_n == 0 else cfg.local_window // 2)
    for layer in range(cfg.num_layers)
  )
  got = flops.training_flops(cfg, seg, num_masked=17)
  assert got.tokens == t
  assert got.linears == 6 * t * cfg.num_layers * (4 * h * h + 3 * h * i)
  assert got.attention == 12 * h * pairs
  assert got.head == 6 * 17 * (h * h + h * v)
  assert got.total == got.linears + got.attention + got.head
  assert flops.training_flops(cfg, seg, None).head == 6 * t * (h * h + h * v)


def test_linear_terms_match_the_model_parameters():
  """4H² + 3HI per layer and H² + HV in the head are the model's matmul weights (embedding reused as decoder)."""
  cfg = get_config("tiny")
  model = nnx.eval_shape(lambda: MaskedLM(cfg, rngs=nnx.Rngs(0)))
  sizes = {jax.tree_util.keystr(p): x.size for p, x in jax.tree.leaves_with_path(nnx.state(model, nnx.Param))}
  layer_matmuls = sum(s for k, s in sizes.items() if "layers" in k and "norm" not in k)
  head_matmuls = sizes["['head_dense'].value"] + sizes["['embedding'].value"]
  per_token = flops.flops_per_token(cfg, 1, 1.0)  # one token: no attention beyond itself
  assert per_token.linears == 6 * layer_matmuls
  assert per_token.head == 6 * head_matmuls


def test_mfu_and_peaks():
  assert flops.peak_flops("TPU v5 lite") == 197e12
  assert flops.peak_flops("TPU v6 lite") == 918e12
  assert flops.mfu(989.4e12 * 8 * 0.4 * 2.0, 2.0, 8, "NVIDIA H100 80GB HBM3") == pytest.approx(0.4)
  assert flops.mfu(1e12, 1.0, 1, "cpu") is None
  assert flops.mfu(1e12, 1.0, 1, jax.devices()[0].device_kind) is None  # the CPU test backend
  assert flops.mfu(1e12, 0.0, 1, "TPU v4") is None


def test_bad_input_errors():
  cfg = get_config("tiny")
  with pytest.raises(ValueError, match="num_masked"):
    flops.training_flops(cfg, np.ones((1, 8), np.int32), num_masked=9)
  with pytest.raises(ValueError, match="contiguous"):
    flops.document_lengths(np.array([[1, 1, 2, 1]]))
  with pytest.raises(ValueError, match=r"\[batch, seq\]"):
    flops.document_lengths(np.ones((2, 2, 2), np.int32))
