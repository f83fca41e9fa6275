"""Per-pass shuffles and the block-randomized weighted mix."""

import collections
import pickle

import grain
import numpy as np
import pytest

from data_pipeline import sampling


@pytest.mark.parametrize("n", [1, 7, 300])
def test_epoch_shuffle_reads_every_element_once_per_pass(n):
  ds = sampling.shuffled_forever(grain.MapDataset.range(n), seed=3)
  passes = [[ds[e * n + i] for i in range(n)] for e in range(4)]
  for p in passes:
    assert sorted(p) == list(range(n))
  if n > 2:
    assert len({tuple(p) for p in passes}) == 4  # a new order every pass
  again = sampling.shuffled_forever(grain.MapDataset.range(n), seed=3)
  assert [again[i] for i in range(2 * n)] == passes[0] + passes[1]
  other = sampling.shuffled_forever(grain.MapDataset.range(n), seed=4)
  if n > 2:
    assert [other[i] for i in range(n)] != passes[0]
  restored = pickle.loads(pickle.dumps(ds))
  assert [restored[i] for i in range(n, 2 * n)] == passes[1]


def test_large_datasets_use_grains_shuffle():
  ds = sampling.shuffled_forever(grain.MapDataset.range(50), seed=1, max_cached=10)
  assert not isinstance(ds, sampling.EpochShuffle)
  assert sorted(ds[i] for i in range(50, 100)) == list(range(50))


def test_block_mix_counts_are_exact_and_indices_consecutive():
  weights = [0.5, 0.3, 0.15, 0.05, 1e-3]
  sel = sampling.BlockMixSelection(weights, seed=0, block=256)
  picks = [sel[k] for k in range(256 * 40)]
  seen = collections.defaultdict(list)
  for d, i in picks:
    seen[d].append(i)
  share = np.asarray(weights) / sum(weights)
  for d in range(len(weights)):
    # Every element of a dataset exactly once, none skipped: indices 0..c-1.
    assert sorted(seen[d]) == list(range(len(seen[d])))
  # Any prefix holds each dataset in proportion, within one block's worth of order randomness.
  for prefix in (256, 1000, 5000, 10240):
    counts = collections.Counter(d for d, _ in picks[:prefix])
    for d in range(len(weights)):
      assert abs(counts[d] - share[d] * prefix) <= 256 * share[d] + 2


def test_block_mix_is_random_but_deterministic():
  a = sampling.BlockMixSelection([1, 1, 1], seed=0, block=64)
  b = sampling.BlockMixSelection([1, 1, 1], seed=0, block=64)
  c = sampling.BlockMixSelection([1, 1, 1], seed=1, block=64)
  first = [a[k][0] for k in range(192)]
  assert first == [b[k][0] for k in range(192)]
  assert first != [c[k][0] for k in range(192)]
  assert first[:3] != [0, 1, 2] or first[3:6] != [0, 1, 2]  # not a fixed round robin
  # Random access agrees with sequential access, also after pickling.
  d = pickle.loads(pickle.dumps(a))
  assert [d[k] for k in (150, 3, 77)] == [a[150], a[3], a[77]]


def test_block_mix_rejects_bad_weights():
  with pytest.raises(ValueError, match="non-negative with a positive sum"):
    sampling.BlockMixSelection([0.0, 0.0], seed=0)
  with pytest.raises(ValueError, match="non-negative"):
    sampling.BlockMixSelection([1.0, -1.0], seed=0)


@pytest.mark.parametrize("n,block,max_cached", [(1, 4, 2048), (5, 8, 2048), (32, 8, 2048), (37, 8, 2048), (300, 7, 8)])
def test_block_order_reads_every_document_once_per_pass(n, block, max_cached):
  """Every pass: blocks of consecutive documents (on the ring of n), all full but one of n mod block, covering
  every document once, in a new order and at a new offset."""
  order = sampling.BlockOrder(n, block, seed=11, max_cached=max_cached)
  per_pass = -(-n // block)
  assert order.per_pass == per_pass
  passes = []
  for e in range(5):
    docs, sizes = [], []
    for q in range(e * per_pass, (e + 1) * per_pass):
      first, count = order[q]
      assert 0 <= first < n
      docs += [(first + i) % n for i in range(count)]
      sizes.append(count)
    assert sorted(docs) == list(range(n))
    assert sorted(sizes) == sorted([block] * (n // block) + ([n % block] if n % block else []))
    passes.append(docs)
  if n > block:
    assert len({tuple(p) for p in passes}) == 5
  again = pickle.loads(pickle.dumps(sampling.BlockOrder(n, block, seed=11, max_cached=max_cached)))
  assert [again[q] for q in range(3 * per_pass)] == [order[q] for q in range(3 * per_pass)]


def test_block_order_short_block_anywhere_in_the_pass():
  """The short block's place in a pass is random, so each visit of a pass reads n / per_pass documents on average
  (a partial pass reads a language in its mean proportion too)."""
  order = sampling.BlockOrder(33, 8, seed=2)  # 4 blocks of 8 and one of 1 per pass
  places = collections.Counter(next(i for i in range(5) if order[e * 5 + i][1] == 1) for e in range(2000))
  assert sorted(places) == list(range(5)) and min(places.values()) > 300


def test_window_order_is_a_permutation_per_buffer():
  a, b = sampling.window_order(1, 0, 0, 64), sampling.window_order(1, 0, 1, 64)
  assert sorted(a) == list(range(64)) and sorted(b) == list(range(64)) and list(a) != list(b)
  assert list(sampling.window_order(1, 0, 0, 64)) == list(a) and list(sampling.window_order(1, 1, 0, 64)) != list(a)
