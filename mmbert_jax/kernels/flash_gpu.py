"""Flash attention for GPUs in Pallas (lowered through Triton) with packed segments and a two-sided window.

softmax(q·kᵀ·scale)·v restricted to keys of the same segment and, for local layers, to |i − j| ≤ window.
Forward: one program per (q block, batch, head) runs the online softmax over only those kv blocks that intersect
[q_start − window, q_end + window], so a local layer costs O(S·window) instead of O(S²). Backward: two kernels that
recompute the probabilities from the saved log-sum-exp: one program per kv block accumulates dk, dv over the
mirrored range of q blocks, one program per q block accumulates dq. Every query may attend to itself (same
segment, distance 0), so no softmax row is ever empty, padding rows included.

Layout `bsnd` ([B, S, N, D], the model's) or `bnsd` ([B, N, S, D]); S must be a multiple of the block sizes and
D a power of two. Triton needs power-of-two tiles of at least 16 rows (`tl.dot`'s minimum), which is checked up
front; interpret mode (`interpret=True`, the only mode on CPU) accepts any tile dividing S.

With `residual_checkpoint_name`, the output and log-sum-exp saved for the backward carry that `checkpoint_name`, so
a remat policy that saves the name (`jax.checkpoint_policies.save_only_these_names`) keeps the forward kernel
from running a second time in the backward pass.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

LAYOUTS = ("bsnd", "bnsd")
# Logits are kept in base 2 (exp2 is the cheap instruction); scores are multiplied by log2(e) up front.
_LOG2E = math.log2(math.e)
# Finite, so a block whose entries are all masked for a row cannot produce inf − inf; its weights are wiped by
# the rescaling factor as soon as the row meets a real key (the diagonal guarantees one).
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
# Smallest tile Triton's tl.dot accepts; tiles must also be powers of two (Triton tensor shapes).
MIN_TRITON_BLOCK = 16


def check_triton_block(name: str, size: int, seq_len: int | None = None) -> None:
  """Raises a one-line ValueError unless `size` is a tile Triton can lower: a power of two ≥ 16."""
  if size < MIN_TRITON_BLOCK or size & (size - 1):
    at = "" if seq_len is None else f" (sequence length {seq_len})"
    raise ValueError(
      f"flash attention {name}={size}{at} must be a power of two >= {MIN_TRITON_BLOCK} for Triton; "
      f"pick power-of-two tiles that divide the sequence length (interpret mode accepts any divisor)"
    )


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes. The backward sizes default to the forward ones."""

  block_q: int = 128
  block_kv: int = 128
  block_q_dkv: int | None = None  # dk/dv kernel: q blocks iterated by each program
  block_kv_dkv: int | None = None  # dk/dv kernel: the kv block each program owns
  block_q_dq: int | None = None  # dq kernel: the q block each program owns
  block_kv_dq: int | None = None  # dq kernel: kv blocks iterated by each program

  def for_seq_len(self, seq_len: int, *, interpret: bool = False) -> BlockSizes:
    """Fills the backward sizes, caps every size at `seq_len`, and checks that each divides it and, unless
    `interpret`, that Triton can lower it."""
    sizes = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    for name in ("block_q_dkv", "block_q_dq"):
      sizes[name] = sizes[name] or self.block_q
    for name in ("block_kv_dkv", "block_kv_dq"):
      sizes[name] = sizes[name] or self.block_kv
    for name, size in sizes.items():
      if not isinstance(size, int) or size <= 0:
        raise ValueError(f"flash attention {name}={size!r}: expected a positive int")
      size = min(size, seq_len)
      if seq_len % size:
        raise ValueError(
          f"flash attention {name}={size} does not divide the sequence length {seq_len}; "
          f"pick a block size that divides it"
        )
      if not interpret:
        check_triton_block(name, size, seq_len)
      sizes[name] = size
    return BlockSizes(**sizes)


def block_range(block, block_size: int, other_block_size: int, num_other_blocks: int, window: int | None):
  """Blocks [lo, hi) of the other sequence axis holding a position within `window` of block `block`.

  Block `block` spans [block·block_size, (block + 1)·block_size − 1]; the other axis is cut into
  `num_other_blocks` blocks of `other_block_size`. Accepts Python ints and traced int32 scalars alike: the
  kernels call it with `pl.program_id`, `visited_kv_blocks` with plain ints.
  """
  if window is None:
    return 0, num_other_blocks
  first = block * block_size - window
  last = block * block_size + block_size - 1 + window
  lo = lax.div(lax.max(first, 0), other_block_size)
  hi = lax.min(lax.div(last, other_block_size) + 1, num_other_blocks)
  return lo, hi


def visited_kv_blocks(seq_len: int, block_q: int, block_kv: int, window: int | None) -> int:
  """kv blocks the forward kernel visits for one (batch, head): Σ over q blocks of the iterated range."""
  num_kv = seq_len // block_kv
  total = 0
  for i in range(seq_len // block_q):
    lo, hi = block_range(i, block_q, block_kv, num_kv, window)
    total += int(hi) - int(lo)
  return total


@dataclasses.dataclass(frozen=True)
class _Options:
  """Everything static about one call; hashable, so it can be a custom_vjp non-differentiable argument."""

  window: int | None
  sm_scale: float
  blocks: BlockSizes
  layout: str
  num_warps: int
  num_stages: int
  interpret: bool
  residual_checkpoint_name: str | None = None


# --------------------------------------------------------------------------------------------------------------
# Kernels. Refs arrive with batch and head squeezed: q/k/v/o [rows, D], per-row statistics [rows].
# --------------------------------------------------------------------------------------------------------------


def _scores(q, k, q_pos, k_pos, q_seg, k_seg, opts: _Options):
  """Masked base-2 logits [bq, bk] of a q tile against a k tile."""
  s = plgpu.dot(q, k, trans_b=True) * (opts.sm_scale * _LOG2E)
  keep = None
  if q_seg is not None:
    keep = q_seg[:, None] == k_seg[None, :]
  if opts.window is not None:
    near = jnp.abs(q_pos[:, None] - k_pos[None, :]) <= opts.window
    keep = near if keep is None else keep & near
  return s if keep is None else jnp.where(keep, s, _MASK_VALUE)


def _fwd_kernel(q_ref, k_ref, v_ref, *refs, opts: _Options, has_segments: bool):
  seg_ref, o_ref, lse_ref = refs if has_segments else (None, *refs)
  bq, bk = opts.blocks.block_q, opts.blocks.block_kv
  i = pl.program_id(0)
  q_rows = pl.ds(i * bq, bq)
  q = q_ref[...]
  q_pos = i * bq + jnp.arange(bq)
  q_seg = seg_ref[q_rows] if has_segments else None

  def body(j, carry):
    acc, m, l = carry
    kv = pl.ds(j * bk, bk)
    s = _scores(q, k_ref[kv, :], q_pos, j * bk + jnp.arange(bk), q_seg, seg_ref[kv] if has_segments else None, opts)
    m_new = jnp.maximum(m, s.max(axis=-1))
    p = jnp.exp2(s - m_new[:, None])
    alpha = jnp.exp2(m - m_new)
    v = v_ref[kv, :]
    acc = alpha[:, None] * acc + plgpu.dot(p.astype(v.dtype), v)
    return acc, m_new, alpha * l + p.sum(axis=-1)

  lo, hi = block_range(i, bq, bk, k_ref.shape[0] // bk, opts.window)
  init = (
    jnp.zeros((bq, q.shape[-1]), jnp.float32),
    jnp.full((bq,), -jnp.inf, jnp.float32),
    jnp.zeros((bq,), jnp.float32),
  )
  acc, m, l = lax.fori_loop(lo, hi, body, init)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log2(l)


def _dq_kernel(q_ref, k_ref, v_ref, *refs, opts: _Options, has_segments: bool):
  seg_ref, do_ref, lse_ref, delta_ref, dq_ref = refs if has_segments else (None, *refs)
  bq, bk = opts.blocks.block_q_dq, opts.blocks.block_kv_dq
  i = pl.program_id(0)
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
  q_pos = i * bq + jnp.arange(bq)
  q_seg = seg_ref[pl.ds(i * bq, bq)] if has_segments else None

  def body(j, dq):
    kv = pl.ds(j * bk, bk)
    k, v = k_ref[kv, :], v_ref[kv, :]
    s = _scores(q, k, q_pos, j * bk + jnp.arange(bk), q_seg, seg_ref[kv] if has_segments else None, opts)
    p = jnp.exp2(s - lse[:, None])
    ds = p * (plgpu.dot(do, v, trans_b=True) - delta[:, None])
    return dq + plgpu.dot(ds.astype(k.dtype), k)

  lo, hi = block_range(i, bq, bk, k_ref.shape[0] // bk, opts.window)
  dq = lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * opts.sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, *refs, opts: _Options, has_segments: bool):
  seg_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs if has_segments else (None, *refs)
  bq, bk = opts.blocks.block_q_dkv, opts.blocks.block_kv_dkv
  j = pl.program_id(0)
  k, v = k_ref[...], v_ref[...]
  k_pos = j * bk + jnp.arange(bk)
  k_seg = seg_ref[pl.ds(j * bk, bk)] if has_segments else None

  def body(i, carry):
    dk, dv = carry
    rows = pl.ds(i * bq, bq)
    q, do = q_ref[rows, :], do_ref[rows, :]
    s = _scores(q, k, i * bq + jnp.arange(bq), k_pos, seg_ref[rows] if has_segments else None, k_seg, opts)
    p = jnp.exp2(s - lse_ref[rows][:, None])
    dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True)
    ds = p * (plgpu.dot(do, v, trans_b=True) - delta_ref[rows][:, None])
    return dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True), dv

  # The window is symmetric, so the q blocks that see this kv block follow the same formula with roles swapped.
  lo, hi = block_range(j, bk, bq, q_ref.shape[0] // bq, opts.window)
  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(lo, hi, body, (zeros, zeros))
  dk_ref[...] = (dk * opts.sm_scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# --------------------------------------------------------------------------------------------------------------
# pallas_call plumbing. Every grid is (sequence blocks, batch, heads).
# --------------------------------------------------------------------------------------------------------------


def _rows_spec(layout: str, shape, block: int | None) -> pl.BlockSpec:
  """[B, S, N, D] or [B, N, S, D] operand: one block of rows (block) or the whole sequence (None)."""
  d = shape[-1]
  seq_len = shape[1] if layout == "bsnd" else shape[2]
  rows = seq_len if block is None else block
  at = (lambda i: 0) if block is None else (lambda i: i)
  if layout == "bsnd":
    return pl.BlockSpec((None, rows, None, d), lambda i, b, n: (b, at(i), n, 0))
  return pl.BlockSpec((None, None, rows, d), lambda i, b, n: (b, n, at(i), 0))


def _stats_spec(seq_len: int, block: int | None) -> pl.BlockSpec:
  """Per-row float32 statistics [B, N, S] (log-sum-exp, delta)."""
  if block is None:
    return pl.BlockSpec((None, None, seq_len), lambda i, b, n: (b, n, 0))
  return pl.BlockSpec((None, None, block), lambda i, b, n: (b, n, i))


def _segments(segment_ids):
  """Extra operand and spec for the segment ids [B, S] (the kernels slice them themselves)."""
  if segment_ids is None:
    return [], []
  return [segment_ids], [pl.BlockSpec((None, segment_ids.shape[1]), lambda i, b, n: (b, 0))]


def _dims(q, layout):
  b, x, y, _ = q.shape
  return (b, x, y) if layout == "bsnd" else (b, y, x)  # batch, seq, heads


def _call(kernel, name, grid, in_specs, out_specs, out_shape, opts, has_segments):
  return pl.pallas_call(
    functools.partial(kernel, opts=opts, has_segments=has_segments),
    grid=grid,
    in_specs=in_specs,
    out_specs=out_specs,
    out_shape=out_shape,
    compiler_params=plgpu.CompilerParams(num_warps=opts.num_warps, num_stages=opts.num_stages),
    interpret=opts.interpret,
    name=name,
  )


def _forward(q, k, v, segment_ids, opts: _Options):
  batch, seq_len, heads = _dims(q, opts.layout)
  bq = opts.blocks.block_q
  seg_args, seg_specs = _segments(segment_ids)
  out, lse = _call(
    _fwd_kernel,
    "flash_fwd",
    (seq_len // bq, batch, heads),
    [
      _rows_spec(opts.layout, q.shape, bq),
      _rows_spec(opts.layout, k.shape, None),
      _rows_spec(opts.layout, v.shape, None),
      *seg_specs,
    ],
    [_rows_spec(opts.layout, q.shape, bq), _stats_spec(seq_len, bq)],
    [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((batch, heads, seq_len), jnp.float32)],
    opts,
    segment_ids is not None,
  )(q, k, v, *seg_args)
  return out, lse


def _backward(q, k, v, segment_ids, out, lse, do, opts: _Options):
  batch, seq_len, heads = _dims(q, opts.layout)
  b = opts.blocks
  # delta_i = Σ_d o·do, the softmax-Jacobian term shared by every key of row i (elementwise: XLA fuses it).
  delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
  delta = jnp.swapaxes(delta, 1, 2) if opts.layout == "bsnd" else delta
  seg_args, seg_specs = _segments(segment_ids)
  has_segments = segment_ids is not None
  spec = functools.partial(_rows_spec, opts.layout)

  dq = _call(
    _dq_kernel,
    "flash_bwd_dq",
    (seq_len // b.block_q_dq, batch, heads),
    [
      spec(q.shape, b.block_q_dq),
      spec(k.shape, None),
      spec(v.shape, None),
      *seg_specs,
      spec(do.shape, b.block_q_dq),
      _stats_spec(seq_len, b.block_q_dq),
      _stats_spec(seq_len, b.block_q_dq),
    ],
    spec(q.shape, b.block_q_dq),
    jax.ShapeDtypeStruct(q.shape, q.dtype),
    opts,
    has_segments,
  )(q, k, v, *seg_args, do, lse, delta)
  dk, dv = _call(
    _dkv_kernel,
    "flash_bwd_dkv",
    (seq_len // b.block_kv_dkv, batch, heads),
    [
      spec(q.shape, None),
      spec(k.shape, b.block_kv_dkv),
      spec(v.shape, b.block_kv_dkv),
      *seg_specs,
      spec(do.shape, None),
      _stats_spec(seq_len, None),
      _stats_spec(seq_len, None),
    ],
    [spec(k.shape, b.block_kv_dkv), spec(v.shape, b.block_kv_dkv)],
    [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    opts,
    has_segments,
  )(q, k, v, *seg_args, do, lse, delta)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, segment_ids, opts: _Options):
  return _forward(q, k, v, segment_ids, opts)[0]


def _flash_fwd(q, k, v, segment_ids, opts: _Options):
  out, lse = _forward(q, k, v, segment_ids, opts)
  if opts.residual_checkpoint_name is not None:
    out, lse = (checkpoint_name(x, opts.residual_checkpoint_name) for x in (out, lse))
  return out, (q, k, v, segment_ids, out, lse)


def _flash_bwd(opts: _Options, residuals, do):
  q, k, v, segment_ids, out, lse = residuals
  dq, dk, dv = _backward(q, k, v, segment_ids, out, lse, do, opts)
  return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  segment_ids: jax.Array | None = None,
  *,
  window: int | None = None,
  sm_scale: float | None = None,
  block_sizes: BlockSizes = BlockSizes(),
  layout: str = "bsnd",
  num_warps: int | None = None,
  num_stages: int = 2,
  interpret: bool = False,
  residual_checkpoint_name: str | None = None,
) -> jax.Array:
  """Attention within segments and, if `window` is set, within |i − j| ≤ window. Differentiable in q, k, v.

  q, k, v: [B, S, N, D] (`layout="bsnd"`) or [B, N, S, D] (`"bnsd"`); segment_ids: int32 [B, S] or None (one
  segment). `sm_scale` defaults to 1/√D. `num_warps` (default 4 for D ≤ 64, else 8) and `num_stages` apply to
  all three kernels.
  """
  if layout not in LAYOUTS:
    raise ValueError(f"flash attention layout {layout!r} is not one of {LAYOUTS}")
  if not q.shape == k.shape == v.shape:
    raise ValueError(f"flash attention needs q, k, v of one shape; got {q.shape}, {k.shape}, {v.shape}")
  batch, seq_len, _ = _dims(q, layout)
  d = q.shape[-1]
  if d & (d - 1):
    raise ValueError(f"flash attention head_dim {d} must be a power of two")
  if segment_ids is not None and segment_ids.shape != (batch, seq_len):
    raise ValueError(f"segment_ids shape {segment_ids.shape} does not match (batch, seq) = {(batch, seq_len)}")
  if window is not None and (not isinstance(window, int) or window < 0):
    raise ValueError(f"flash attention window={window!r}: expected a non-negative int or None")
  opts = _Options(
    window=window,
    sm_scale=1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale),
    blocks=block_sizes.for_seq_len(seq_len, interpret=interpret),
    layout=layout,
    num_warps=num_warps or (4 if d <= 64 else 8),
    num_stages=num_stages,
    interpret=interpret,
    residual_checkpoint_name=residual_checkpoint_name,
  )
  return _flash(q, k, v, segment_ids, opts)
