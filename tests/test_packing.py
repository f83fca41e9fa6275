"""Packing: whole documents per segment, positions restart, no document lost or duplicated, language ids."""
import grain
import numpy as np
import pytest

from data_pipeline import packing

S = 64


def _docs(n=300, seed=0):
  rng = np.random.default_rng(seed)
  docs = []
  for d in range(n):
    length = int(rng.integers(1, 3 * S))       # some longer than a row
    # Token = 1000·(document + 1) + offset: identifies the document and the position in it.
    docs.append({"tokens": (1000 * (d + 1) + np.arange(length)).astype(np.int32), "lang": d % 5})
  return docs


def _pack(docs, kind, bins=8):
  ds = grain.MapDataset.source(docs).to_iter_dataset()
  return [packing.to_row(r) for r in packing.pack(ds, S, packing=kind, num_bins=bins, seed=1)]


@pytest.mark.parametrize("kind", ["first_fit", "best_fit"])
def test_segments_hold_whole_documents_and_positions_restart(kind):
  docs = _docs()
  rows = _pack(docs, kind)
  pieces = {}
  for row in rows:
    seg, pos, tok, lang = row["segment_ids"], row["positions"], row["tokens"], row["lang_ids"]
    assert seg.shape == pos.shape == tok.shape == lang.shape == (S,)
    n = seg.max()
    # Segments 1..n in contiguous runs, then padding only.
    assert np.array_equal(np.unique(seg[seg > 0]), np.arange(1, n + 1))
    assert np.all(np.diff(seg[seg > 0]) >= 0)
    if (seg == 0).any():
      first_pad = np.argmax(seg == 0)
      assert np.all(seg[first_pad:] == 0) and np.all(tok[first_pad:] == 0) and np.all(lang[first_pad:] == -1)
    for j in range(1, n + 1):
      t, p, l = tok[seg == j], pos[seg == j], lang[seg == j]
      d = t[0] // 1000 - 1
      # One document per segment (so a segment mask keeps attention inside it), consecutive tokens,
      # positions 0, 1, 2, … and the document's language on every token.
      assert np.all(t // 1000 - 1 == d)
      assert np.array_equal(p, np.arange(len(t)))
      assert np.array_equal(np.diff(t), np.ones(len(t) - 1))
      assert np.all(l == docs[d]["lang"])
      pieces.setdefault(d, []).append(t)
    # Different segments are different documents or different pieces of one.
    starts = [tok[seg == j][0] for j in range(1, n + 1)]
    assert len(set(starts)) == len(starts)
  # Every document comes back exactly once, long ones as consecutive pieces of at most S tokens.
  assert sorted(pieces) == list(range(len(docs)))
  for d, ps in pieces.items():
    assert all(len(p) <= S for p in ps)
    np.testing.assert_array_equal(np.sort(np.concatenate(ps)), docs[d]["tokens"])


def test_packing_is_reasonably_dense_and_best_fit_is_not_worse():
  docs = _docs(600, seed=3)
  fill = {}
  for kind in ("first_fit", "best_fit"):
    rows = _pack(docs, kind, bins=16)
    fill[kind] = np.mean([np.mean(r["segment_ids"] > 0) for r in rows])
  assert fill["first_fit"] > 0.8
  assert fill["best_fit"] >= fill["first_fit"] - 0.02


def test_segment_mask_blocks_cross_document_attention():
  rows = _pack(_docs(50), "first_fit")
  for row in rows:
    seg, tok = row["segment_ids"], row["tokens"]
    allowed = (seg[:, None] == seg[None, :]) & (seg[:, None] > 0)
    same_doc = (tok[:, None] // 1000 == tok[None, :] // 1000) & (seg[:, None] > 0) & (seg[None, :] > 0)
    # Attention allowed ⇒ same document (a split document's pieces are separate segments).
    assert not (allowed & ~same_doc).any()


def test_unknown_packer():
  with pytest.raises(ValueError, match="packing must be one of first_fit, best_fit"):
    packing.pack(grain.MapDataset.source(_docs(2)).to_iter_dataset(), S, packing="greedy")
