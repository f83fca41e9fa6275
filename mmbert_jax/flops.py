"""Analytic training FLOPs of the encoder and model FLOPs utilisation (docs/ARCHITECTURE.md §8).

Matmul FLOPs only (2·m·n·k), training = 3 × forward, counted on real tokens (no padding, no cross-document
attention pairs, no rematerialisation):

  F_step = 6 · T · L · (4H² + 3HI)          encoder linears (Wqkv 3H², Wo H², Wi 2HI, Wo_mlp HI) on T real tokens
         + 12 · H · Σ_layers P_ℓ            attention: QKᵀ and PV, 2H each per (query, key) pair, × 3
         + 6 · M · (H² + HV)                head dense + tied decoder on the M predicted tokens

P_ℓ sums over documents: L_d² on global layers; L_d(2w+1) − w(w+1) on local layers (w one-sided; L_d² when
L_d ≤ w+1). `6 · N_params · T` is wrong for a sparse-MLM encoder: it charges the 256k-vocab decoder on every token
and ignores attention. Document lengths come from the batch's `segment_ids` on the host (numpy), so they are exact.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mmbert_jax.model import ModelConfig

# Dense bf16 peak FLOP/s per chip, keyed by `jax.Device.device_kind`.
PEAK_BF16_FLOPS: dict[str, float] = {
  "NVIDIA H100 80GB HBM3": 989.4e12,  # H100 SXM
  "NVIDIA H100 PCIe": 756e12,
  "NVIDIA H200": 989.4e12,  # H200 SXM; the H200 NVL (lower clocks) reports the same name
  "NVIDIA A100-SXM4-40GB": 312e12,
  "NVIDIA A100-SXM4-80GB": 312e12,
  "NVIDIA A100-PCIE-40GB": 312e12,
  "NVIDIA A100 80GB PCIe": 312e12,
  "TPU v4": 275e12,
  "TPU v5 lite": 197e12,  # v5e
  "TPU v5": 459e12,  # v5p
  "TPU v5p": 459e12,
  "TPU v6 lite": 918e12,  # v6e (Trillium)
}


@dataclasses.dataclass(frozen=True)
class StepFlops:
  """Training FLOPs of one step, by part; `tokens` is the number of real (non-padding) tokens T."""

  linears: float
  attention: float
  head: float
  tokens: int

  @property
  def total(self) -> float:
    return self.linears + self.attention + self.head

  @property
  def per_token(self) -> float:
    return self.total / self.tokens if self.tokens else 0.0


def document_lengths(segment_ids: np.ndarray) -> np.ndarray:
  """Lengths of the documents in a packed batch `[B, S]` (a document = a run of one non-zero id in a row)."""
  seg = np.asarray(segment_ids)
  if seg.ndim == 1:
    seg = seg[None]
  if seg.ndim != 2:
    raise ValueError(f"segment_ids must be [batch, seq] (or [seq]), got shape {np.shape(segment_ids)}")
  if seg.size == 0:
    return np.zeros(0, np.int64)
  starts = np.ones(seg.shape, bool)
  starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
  run_ids = np.cumsum(starts.ravel()) - 1
  lengths = np.bincount(run_ids)
  values = seg.ravel()[starts.ravel()]
  rows = np.nonzero(starts)[0]
  real = values != 0
  # A segment id that reappears later in its row would attend across the gap: not a packed layout.
  pairs = np.stack([rows[real], values[real]], 1)
  if len(np.unique(pairs, axis=0)) != len(pairs):
    raise ValueError("segment_ids must give each document one contiguous run per row (0 = padding)")
  return lengths[real].astype(np.int64)


def attention_pairs(lengths: np.ndarray, window: int | None) -> int:
  """(query, key) pairs one layer attends over: Σ L² (global, window=None) or pairs with |i − j| ≤ window."""
  lengths = np.asarray(lengths, np.int64)
  full = lengths * lengths
  if window is None:
    return int(full.sum())
  banded = lengths * (2 * window + 1) - window * (window + 1)
  return int(np.where(lengths <= window + 1, full, banded).sum())


def training_flops(cfg: ModelConfig, segment_ids: np.ndarray, num_masked: float | None) -> StepFlops:
  """Training FLOPs of one step on this batch; `num_masked` predicted tokens (None: dense head on every token)."""
  lengths = document_lengths(segment_ids)
  h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  t = int(lengths.sum())
  m = t if num_masked is None else num_masked
  if not 0 <= m <= t:
    raise ValueError(f"num_masked must be in [0, {t}] (the real tokens of the batch), got {num_masked}")
  pairs = sum(attention_pairs(lengths, None if cfg.is_global(layer) else cfg.window) for layer in range(cfg.num_layers))
  return StepFlops(
    linears=6.0 * t * cfg.num_layers * (4 * h * h + 3 * h * i),
    attention=12.0 * h * pairs,
    head=6.0 * m * (h * h + h * v),
    tokens=t,
  )


def flops_per_token(cfg: ModelConfig, seq_len: int, mask_rate: float | None) -> StepFlops:
  """One document filling a `seq_len` row with `mask_rate` of it predicted (None: dense head)."""
  num_masked = None if mask_rate is None else mask_rate * seq_len
  f = training_flops(cfg, np.ones((1, seq_len), np.int32), num_masked)
  return StepFlops(f.linears / seq_len, f.attention / seq_len, f.head / seq_len, tokens=1)


def peak_flops(device_kind: str) -> float | None:
  """Dense bf16 peak FLOP/s of one chip, or None when unknown (CPU, unlisted accelerators)."""
  return PEAK_BF16_FLOPS.get(device_kind)


def mfu(flops: float, seconds: float, n_devices: int, device_kind: str) -> float | None:
  """Model FLOPs utilisation: flops / (seconds · n_devices · peak); None for unknown devices."""
  peak = peak_flops(device_kind)
  if peak is None or seconds <= 0 or n_devices <= 0:
    return None
  return flops / (seconds * n_devices * peak)
