"""TPU splash attention (Pallas) for the encoder: `FullMask` for global layers, `LocalMask((w, w))` for local ones.

Packing goes through `SegmentIds`, which the kernel ANDs with the static mask. Padding (segment 0) is a segment of
its own: real tokens never see it, and every padding query sees at least itself, so no softmax row is empty.
Splash skips the kv blocks its mask marks as all-zero, so a local layer visits O(S·w) blocks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask_info as mask_info_lib


def _mask(seq_len: int, num_heads: int, window: int | None) -> sm.MultiHeadMask:
  shape = (seq_len, seq_len)
  head = sm.FullMask(shape) if window is None else sm.LocalMask(shape, window_size=(window, window), offset=0)
  return sm.MultiHeadMask([head] * num_heads)


LANES = 128  # splash tiles must be multiples of the TPU lane width


def block_sizes(seq_len: int, block_q: int, block_kv: int) -> sk.BlockSizes:
  """Forward and backward tiles from the two configured sizes, capped at the sequence length."""
  bq, bkv = min(block_q, seq_len), min(block_kv, seq_len)
  for name, size in (("block_q", bq), ("block_kv", bkv)):
    if size % LANES:
      raise ValueError(f"splash attention {name}={size} (sequence length {seq_len}) must be a multiple of {LANES}")
    if seq_len % size:
      raise ValueError(
        f"splash attention {name}={size} does not divide the sequence length {seq_len}; "
        f"pick a block size that divides it"
      )
  return sk.BlockSizes(
    block_q=bq,
    block_kv=bkv,
    block_kv_compute=bkv,
    block_q_dkv=bq,
    block_kv_dkv=bkv,
    block_kv_dkv_compute=bkv,
    block_q_dq=bq,
    block_kv_dq=bkv,
  )


def make_kernel(
  seq_len: int,
  num_heads: int,
  window: int | None,
  block_q: int,
  block_kv: int,
  head_shards: int = 1,
  interpret: bool = False,
  residual_checkpoint_name: str | None = None,
) -> sk.SplashAttentionKernel:
  """The splash kernel for one layer kind. With `residual_checkpoint_name`, the output and log-sum-exp saved for
  the backward carry that checkpoint name.

  Built anew at every call: its tables become constants of the trace that calls it (a kernel cached across traces
  would carry the first trace's tracers when that one was a remat or jit trace). The costly host part, the
  block-sparsity tables, is cached by splash itself (`process_mask` is an lru_cache keyed by the mask's value).
  """
  return sk.make_splash_mha(
    _mask(seq_len, num_heads, window),
    block_sizes=block_sizes(seq_len, block_q, block_kv),
    head_shards=head_shards,
    q_seq_shards=1,
    interpret=interpret,
    residual_checkpoint_name=residual_checkpoint_name,
  )


def apply(kernel: sk.SplashAttentionKernel, q, k, v, segment_ids):
  """q, k, v [B, S, N, D] and segment_ids [B, S] → [B, S, N, D]; the kernel itself runs per example."""
  scale = 1.0 / np.sqrt(q.shape[-1])
  to_heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # [B, N, S, D]
  out = jax.vmap(kernel)(
    to_heads_first(q * jnp.asarray(scale, q.dtype)),
    to_heads_first(k),
    to_heads_first(v),
    sk.SegmentIds(q=segment_ids, kv=segment_ids),
  )
  return to_heads_first(out)


def visited_kv_blocks(seq_len: int, block_q: int, block_kv: int, window: int | None) -> int:
  """kv blocks the forward kernel computes for one head: the non-zero entries of splash's own block mask."""
  info, _ = mask_info_lib.process_mask(_mask(seq_len, 1, window), (min(block_q, seq_len), min(block_kv, seq_len)))
  if info.block_mask is None:  # every block is fully visible: splash drops the table
    return (seq_len // min(block_q, seq_len)) * (seq_len // min(block_kv, seq_len))
  return int(np.count_nonzero(np.asarray(info.block_mask)))
