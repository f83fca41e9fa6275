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
