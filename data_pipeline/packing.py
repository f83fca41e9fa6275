"""Packing documents into fixed-length rows: grain's first-fit / best-fit packers, plus language ids per token, and
a streaming packer that gives out one row at a time (the training streams use it).

Input elements are `{"tokens": int32[n], "lang": int}`. Documents longer than a row are first cut into row-sized
pieces (grain's packers refuse longer inputs). The packer fills `num_bins` rows at a time and emits them all when
a document fits in none; each row carries `segment_ids` (1, 2, … per document, 0 = padding) and `positions`
(restarting at 0 in every document), so attention can stay inside documents. The language of each document
travels as a non-sequence meta feature and is spread over its tokens by `to_row`.
"""

from __future__ import annotations

import collections

import grain
import numpy as np

PACKERS = {
  "first_fit": grain.experimental.FirstFitPackIterDataset,
  "best_fit": grain.experimental.BestFitPackIterDataset,
}


class SplitLong(grain.experimental.FlatMapTransform):
  """Cuts a document into pieces of at most `seq_len` tokens, all with the document's language."""

  max_fan_out = 1 << 20  # only bounds the MapDataset form of FlatMap; this one runs on an IterDataset

  def __init__(self, seq_len: int):
    self.seq_len = seq_len

  def flat_map(self, element):
    tokens = element["tokens"]
    if len(tokens) <= self.seq_len:
      return [element]
    return [
      {"tokens": tokens[i : i + self.seq_len], "lang": element["lang"]} for i in range(0, len(tokens), self.seq_len)
    ]


def pack(
  ds: grain.IterDataset,
  seq_len: int,
  *,
  packing: str = "first_fit",
  num_bins: int = 16,
  seed: int = 0,
  shuffle_bins: bool = True,
  pad_id: int = 0,
) -> grain.IterDataset:
  """Documents → packed rows `{"tokens", "tokens_segment_ids", "tokens_positions": int32[seq_len], "lang": [..]}`."""
  if packing not in PACKERS:
    raise ValueError(f"packing must be one of {', '.join(PACKERS)}, got {packing!r}")
  ds = grain.experimental.FlatMapIterDataset(ds, SplitLong(seq_len))
  return PACKERS[packing](
    ds,
    length_struct={"tokens": seq_len},
    num_packing_bins=num_bins,
    seed=seed,
    shuffle_bins=shuffle_bins,
    meta_features=("lang",),
    padding_struct={"tokens": pad_id},
  )


def to_row(packed: dict) -> dict[str, np.ndarray]:
  """A packed element → tokens, segment_ids, positions and lang_ids (the document's language, -1 on padding)."""
  segment_ids = packed["tokens_segment_ids"]
  langs = np.asarray([-1] + list(packed["lang"]), np.int32)  # segment j (1-based) is the j-th document
  return {
    "tokens": packed["tokens"],
    "segment_ids": segment_ids,
    "positions": packed["tokens_positions"],
    "lang_ids": langs[segment_ids],
  }


def empty_row(seq_len: int) -> dict[str, np.ndarray]:
  """A row of padding only (fills the last eval batch)."""
  zeros = np.zeros(seq_len, np.int32)
  return {"tokens": zeros, "segment_ids": zeros, "positions": zeros, "lang_ids": np.full(seq_len, -1, np.int32)}


class StreamingPacker:
  """Packs an indexed sequence of documents into rows one row at a time, with the same rows format as `to_row`.

  Up to `num_bins` rows are open. A document piece (documents are cut into pieces of at most seq_len tokens) goes
  into the open row that it fills best (best_fit: least room left; first_fit: the first with room); when it fits
  none and all rows are open, the fullest row is closed, and the piece starts a new row. Each call reads pieces
  until the rows held (open and closed) hold `fill` × num_bins × seq_len tokens, then gives out the first closed
  row, or else the fullest open one. So every row costs about one row of reading and packing; Grain's packers
  instead fill all their bins and give them out together, doing a whole refill on one call in num_bins.

  `documents(k)` returns document k as `{"tokens": int32[n], "lang": int}` (random access, so the state is small:
  the next document and piece, and the pieces of the rows held, which a restore reads again); an empty document
  with `"next": k2` says that documents k + 1 … k2 − 1 are empty too.
  """

  def __init__(
    self, documents, seq_len: int, *, num_bins: int = 16, packing: str = "best_fit", pad_id: int = 0, fill: float = 0.9
  ):
    if packing not in PACKERS:
      raise ValueError(f"packing must be one of {', '.join(PACKERS)}, got {packing!r}")
    self._documents, self._seq_len, self._num_bins = documents, seq_len, num_bins
    self._best_fit, self._pad_id = packing == "best_fit", pad_id
    self._target = fill * num_bins * seq_len
    self._next = [0, 0]  # document index, token offset of its next piece
    self._doc: dict | None = None  # the document self._next points into
    self._open: list[list[tuple]] = []  # open rows: pieces (doc, start, stop, tokens, lang)
    self._used: list[int] = []
    self._closed: collections.deque = collections.deque()  # closed rows, given out first
    self._held = 0  # tokens in open and closed rows

  def _piece(self) -> tuple[int, int, int, np.ndarray, int]:
    k, start = self._next
    if self._doc is None:
      self._doc = self._documents(k)
    tokens = self._doc["tokens"]
    stop = min(start + self._seq_len, len(tokens))
    piece = (k, start, stop, tokens[start:stop], int(self._doc["lang"]))
    if stop >= len(tokens):  # an empty document may name the next index with documents ("next")
      self._next, self._doc = [self._doc.get("next", k + 1), 0], None
    else:
      self._next = [k, stop]
    return piece

  def _place(self, piece) -> None:
    m = piece[2] - piece[1]
    if m == 0:  # an empty document
      return
    self._held += m
    fits = [i for i, used in enumerate(self._used) if used + m <= self._seq_len]
    if fits:
      i = max(fits, key=lambda i: self._used[i]) if self._best_fit else fits[0]
      self._open[i].append(piece)
      self._used[i] += m
      return
    if len(self._open) >= self._num_bins:
      self._close_fullest()
    self._open.append([piece])
    self._used.append(m)

  def _close_fullest(self) -> None:
    i = max(range(len(self._used)), key=lambda i: self._used[i])  # the first of the fullest
    self._closed.append(self._open.pop(i))
    del self._used[i]

  def _row(self, pieces) -> dict[str, np.ndarray]:
    n = self._seq_len
    tokens = np.full(n, self._pad_id, np.int32)
    segment_ids = np.zeros(n, np.int32)
    positions = np.zeros(n, np.int32)
    lang_ids = np.full(n, -1, np.int32)
    at = 0
    for j, (_, start, stop, piece, lang) in enumerate(pieces, 1):
      m = stop - start
      tokens[at : at + m], segment_ids[at : at + m], lang_ids[at : at + m] = piece, j, lang
      positions[at : at + m] = np.arange(m)
      at += m
    return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions, "lang_ids": lang_ids}

  def __next__(self) -> dict[str, np.ndarray]:
    while self._held < self._target:
      self._place(self._piece())
    if not self._closed:
      self._close_fullest()
    pieces = self._closed.popleft()
    self._held -= sum(b - a for _, a, b, _, _ in pieces)
    return self._row(pieces)

  def __iter__(self):
    return self

  def held_rows(self) -> list[dict[str, np.ndarray]]:
    """The rows held, closed and open, as rows (what has been read but not given out)."""
    return [self._row(pieces) for pieces in (*self._closed, *self._open)]

  def get_state(self) -> dict:
    spans = lambda rows: [[[k, a, b] for k, a, b, _, _ in row] for row in rows]
    return {"next": list(self._next), "open": spans(self._open), "closed": spans(self._closed)}

  def set_state(self, state) -> None:
    cache: dict[int, dict] = {}

    def pieces(row):
      out = []
      for k, a, b in row:
        if k not in cache:
          cache[k] = self._documents(k)
        out.append((k, a, b, cache[k]["tokens"][a:b], int(cache[k]["lang"])))
      return out

    self._next, self._doc = list(state["next"]), None
    self._open = [pieces(row) for row in state["open"]]
    self._used = [sum(b - a for _, a, b in row) for row in state["open"]]
    self._closed = collections.deque(pieces(row) for row in state["closed"])
    self._held = sum(self._used) + sum(b - a for row in state["closed"] for _, a, b in row)
