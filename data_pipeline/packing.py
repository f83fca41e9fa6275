"""Packing documents into fixed-length rows: grain's first-fit / best-fit packers, plus language ids per token.

Input elements are `{"tokens": int32[n], "lang": int}`. Documents longer than a row are first cut into row-sized
pieces (grain's packers refuse longer inputs). The packer fills `num_bins` rows at a time and emits them all when
a document fits in none; each row carries `segment_ids` (1, 2, … per document, 0 = padding) and `positions`
(restarting at 0 in every document), so attention can stay inside documents. The language of each document
travels as a non-sequence meta feature and is spread over its tokens by `to_row`.
"""
from __future__ import annotations

import grain
import numpy as np

PACKERS = {
    "first_fit": grain.experimental.FirstFitPackIterDataset,
    "best_fit": grain.experimental.BestFitPackIterDataset,
}


class SplitLong(grain.experimental.FlatMapTransform):
  """Cuts a document into pieces of at most `seq_len` tokens, all with the document's language."""

  max_fan_out = 1 << 20   # only bounds the MapDataset form of FlatMap; this one runs on an IterDataset

  def __init__(self, seq_len: int):
    self.seq_len = seq_len

  def flat_map(self, element):
    tokens = element["tokens"]
    if len(tokens) <= self.seq_len:
      return [element]
    return [{"tokens": tokens[i:i + self.seq_len], "lang": element["lang"]}
            for i in range(0, len(tokens), self.seq_len)]


def pack(ds: grain.IterDataset, seq_len: int, *, packing: str = "first_fit", num_bins: int = 16, seed: int = 0,
         shuffle_bins: bool = True, pad_id: int = 0) -> grain.IterDataset:
  """Documents → packed rows `{"tokens", "tokens_segment_ids", "tokens_positions": int32[seq_len], "lang": [..]}`."""
  if packing not in PACKERS:
    raise ValueError(f"packing must be one of {', '.join(PACKERS)}, got {packing!r}")
  ds = grain.experimental.FlatMapIterDataset(ds, SplitLong(seq_len))
  return PACKERS[packing](ds, length_struct={"tokens": seq_len}, num_packing_bins=num_bins, seed=seed,
                          shuffle_bins=shuffle_bins, meta_features=("lang",), padding_struct={"tokens": pad_id})


def to_row(packed: dict) -> dict[str, np.ndarray]:
  """A packed element → tokens, segment_ids, positions and lang_ids (the document's language, -1 on padding)."""
  segment_ids = packed["tokens_segment_ids"]
  langs = np.asarray([-1] + list(packed["lang"]), np.int32)   # segment j (1-based) is the j-th document
  return {"tokens": packed["tokens"], "segment_ids": segment_ids, "positions": packed["tokens_positions"],
          "lang_ids": langs[segment_ids]}


def empty_row(seq_len: int) -> dict[str, np.ndarray]:
  """A row of padding only (fills the last eval batch)."""
  zeros = np.zeros(seq_len, np.int32)
  return {"tokens": zeros, "segment_ids": zeros, "positions": zeros, "lang_ids": np.full(seq_len, -1, np.int32)}
