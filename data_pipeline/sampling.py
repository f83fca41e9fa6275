"""Index-addressable sampling for Grain: a fresh shuffle every pass, a block-randomized weighted mix, and the
block order in which a language's documents are read.

Both are random access (element i is a pure function of i and the seed), so the Grain iterators above them
checkpoint as a single index, and both cost O(1) per element:

  EpochShuffle        repeats a dataset forever, permuting it anew on every pass. Grain's `shuffle` is built on
                      `index_shuffle`, which takes ~50 µs per element at 10^3 elements (2 ms at 10; ~5 µs from
                      6·10^4 on), and many languages are that small; here a numpy permutation per pass is cached
                      (uint16: 4 KiB for the default `max_cached` of 2048, so 1,834 languages hold at most 15 MiB
                      of permutations). Above `max_cached` elements Grain's own shuffle is used.
  BlockMixSelection   a `grain.transforms.DatasetSelectionMap` for `MapDataset.select_from_datasets`: blocks of
                      about `block` elements hold each dataset in its exact proportion (cumulative counts
                      floor(w_l · block · b + φ_l), random phases φ_l), in a random order within the block.
                      Grain's `MapDataset.mix` walks all datasets per element (slow with hundreds of languages)
                      and interleaves in the same fixed pattern for every seed.
  BlockOrder          the visits of a language read in blocks of consecutive documents: each pass turns the
                      language's documents (a ring) by a random offset, cuts it into blocks of `block` documents
                      (the last one shorter) and visits them in a new random order;
                      every pass reads every document once, and a block is one contiguous range of records.
  window_order        the order in which a stream hands out the documents of a buffer of visits (a random
                      permutation of the buffer's slots, one per buffer).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import grain
import numpy as np

_CACHED_BLOCKS = 2


class EpochShuffle(grain.MapDataset):
  """parent[perm_e[i]] for element e·n + i, with a new permutation perm_e of range(n) for every pass e."""

  def __init__(self, parent: grain.MapDataset, seed: int):
    super().__init__(parent)
    self._n = len(parent)
    if self._n == 0:
      raise ValueError("cannot repeat an empty dataset")
    self._seed = seed
    self._dtype = np.uint16 if self._n <= 1 << 16 else np.int32
    self._cache: dict[int, np.ndarray] = {}

  def __len__(self) -> int:
    return sys.maxsize

  def __getstate__(self):
    return {**self.__dict__, "_cache": {}}

  def _perm(self, epoch: int) -> np.ndarray:
    perm = self._cache.get(epoch)
    if perm is None:
      perm = np.random.default_rng([self._seed, epoch]).permutation(self._n).astype(self._dtype)
      if len(self._cache) >= _CACHED_BLOCKS:
        self._cache.pop(next(iter(self._cache)))
      self._cache[epoch] = perm
    return perm

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, i = divmod(index, self._n)
    return self._parent[int(self._perm(epoch)[i])]

  def __str__(self) -> str:
    return f"EpochShuffle(n={self._n})"


def shuffled_forever(ds: grain.MapDataset, seed: int, max_cached: int = 2048) -> grain.MapDataset:
  """`ds` repeated forever with a new order every pass (seed < 2**32)."""
  if len(ds) <= max_cached:
    return EpochShuffle(ds, seed)
  return ds.shuffle(seed=seed).repeat()  # index_shuffle is fast for large datasets; reshuffles every epoch


class BlockMixSelection(grain.transforms.DatasetSelectionMap):
  """Global index → (dataset, index in dataset) with exact long-run proportions `weights` (see module doc)."""

  def __init__(self, weights: Sequence[float], seed: int, block: int = 4096, cached: int = _CACHED_BLOCKS):
    w = np.asarray(weights, np.float64)
    if w.ndim != 1 or len(w) == 0 or np.any(w < 0) or w.sum() <= 0:
      raise ValueError(f"mixing weights must be non-negative with a positive sum, got {list(weights)}")
    self._rate = w / w.sum() * block  # expected elements of each dataset per block
    self._phase = np.random.default_rng([seed, 0]).random(len(w))
    self._base = np.floor(self._phase)
    self._block, self._seed, self._cached = block, seed, cached
    self._cache: dict[int, tuple[int, np.ndarray, np.ndarray]] = {}

  def __len__(self) -> int:
    return sys.maxsize

  def __getstate__(self):
    return {**self.__dict__, "_cache": {}}

  def _cum(self, b: int) -> np.ndarray:
    """Elements of each dataset in blocks [0, b)."""
    return (np.floor(self._rate * b + self._phase) - self._base).astype(np.int64)

  def _start(self, b: int) -> int:
    return int(self._cum(b).sum())

  def _block_table(self, b: int) -> tuple[int, np.ndarray, np.ndarray]:
    # Least recently used out first: streams far apart in the sequence share the cache (first in, first out, a
    # decay host at 1,834 languages computed each block 2.5 times; this cut its CPU per batch by about 16%).
    table = self._cache.pop(b, None)
    if table is not None:
      self._cache[b] = table
    else:
      lo = self._cum(b)
      counts = self._cum(b + 1) - lo
      which = np.repeat(np.arange(len(counts)), counts)
      which = which[np.random.default_rng([self._seed, 1, b]).permutation(len(which))]
      # k-th occurrence of dataset d in the block reads element lo[d] + k of d.
      order = np.argsort(which, kind="stable")
      rank = np.empty(len(which), np.int64)
      rank[order] = np.arange(len(which)) - np.repeat(np.cumsum(counts) - counts, counts)
      table = (int(lo.sum()), which, lo[which] + rank)
      if len(self._cache) >= self._cached:
        self._cache.pop(next(iter(self._cache)))
      self._cache[b] = table
    return table

  def __getitem__(self, index: int) -> tuple[int, int]:
    b = index // self._block  # block b starts within ±len(weights) of b·block
    start, which, where = self._block_table(b)
    while index < start:
      b -= 1
      start, which, where = self._block_table(b)
    while index >= start + len(which):
      b += 1
      start, which, where = self._block_table(b)
    return int(which[index - start]), int(where[index - start])


def _splitmix64(x: int) -> int:
  x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
  x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
  x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
  return x ^ (x >> 31)


class BlockOrder:
  """Visit q of a language of `n` documents → (first document, count) on the ring of its documents (see the
  module doc). Pass e covers visits [e·per_pass, (e + 1)·per_pass)."""

  def __init__(self, n: int, block: int, seed: int, max_cached: int = 2048):
    if n < 1 or block < 1:
      raise ValueError(f"a block order needs documents and a positive block, got n={n}, block={block}")
    self.n, self.block, self._seed = n, block, seed
    self.full, self.rest = divmod(n, block)
    self.per_pass = self.full + (self.rest > 0)
    self._order = shuffled_forever(grain.MapDataset.range(self.full), seed, max_cached) if self.full else None

  def __getitem__(self, visit: int) -> tuple[int, int]:
    epoch, i = divmod(visit, self.per_pass)
    offset = _splitmix64((self._seed << 32) ^ epoch)
    # The short block comes at a random place in the pass: every visit of a pass reads n / per_pass documents in
    # expectation (a partial pass reads the language in its mean proportions too).
    short = (offset >> 32) % self.per_pass if self.rest else self.per_pass
    offset %= self.n
    if i == short:
      return (offset + self.full * self.block) % self.n, self.rest
    i -= i > short
    return (offset + int(self._order[epoch * self.full + i]) * self.block) % self.n, self.block


def window_order(seed: int, stream: int, window: int, slots: int) -> np.ndarray:
  """The documents of buffer `window` of a stream (`slots` of them) in the order the stream hands them out."""
  return np.random.default_rng([seed, stream, window]).permutation(slots)
