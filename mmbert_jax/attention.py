"""Attention for the encoder: one signature, several implementations.

`attention(q, k, v, segment_ids, window)` computes softmax(q·kᵀ/√d)·v over keys of the same document
(`segment_ids` equal and non-zero) and, for local layers, with |i − j| ≤ window. Layout `[B, S, N, D]`.

Implementations (`ModelConfig.attention_impl`):
  xla         `jax.nn.dot_product_attention` with a dense mask: the reference every kernel is tested against.
  splash      Pallas TPU splash attention (`kernels.splash`), block-sparse over the window.
  pallas_gpu  this project's Pallas/Triton flash attention (`kernels.flash_gpu`), skipping out-of-window blocks.
  auto        splash on TPU, pallas_gpu on GPU, xla elsewhere.
`resolve_impl` picks the implementation and rejects impossible combinations when the model is built;
`ModelConfig.attention_platform` overrides the platform it builds for (e.g. "cuda", to lower the GPU path with
`jax.export` on a host without a GPU). `kernel_options` turns the config into the tiles and launch parameters of
one layer (`KernelOptions`). The kernels name the residuals they save for the backward `CHECKPOINT_NAME`, so
the model's remat policies can keep them (see `model.REMAT_POLICIES`). The kernels
give padding (segment 0) a segment of its own, so padding rows hold finite values that differ from the XLA path's;
real rows agree. Under a mesh the kernels run in `jax.shard_map`: batch over ("data", "fsdp"), heads over "tensor".
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from mmbert_jax import sharding
from mmbert_jax.kernels import flash_gpu, splash

IMPLEMENTATIONS = ("auto", "xla", "splash", "pallas_gpu")
BATCH_AXES = sharding.BATCH_AXES
HEAD_AXIS = "tensor"
_GPU_PLATFORMS = ("gpu", "cuda", "rocm")
CHECKPOINT_NAME = "attention_residuals"  # the kernels' saved output and log-sum-exp


@dataclasses.dataclass(frozen=True)
class KernelOptions:
  """How a kernel runs one layer. Splash uses `block_q`, `block_kv`, `interpret` and `checkpoint_name` only."""

  block_q: int = 128
  block_kv: int = 128
  block_q_bwd: int | None = None  # pallas_gpu backward tiles; None: the forward ones
  block_kv_bwd: int | None = None
  num_warps: int | None = None  # pallas_gpu; None: the kernel's default for the head dim
  num_stages: int = 2
  interpret: bool = False
  checkpoint_name: str | None = None

  def flash_block_sizes(self) -> flash_gpu.BlockSizes:
    return flash_gpu.BlockSizes(
      self.block_q,
      self.block_kv,
      block_q_dkv=self.block_q_bwd,
      block_kv_dkv=self.block_kv_bwd,
      block_q_dq=self.block_q_bwd,
      block_kv_dq=self.block_kv_bwd,
    )


def kernel_options(cfg, impl: str, window: int | None) -> KernelOptions:
  """The options of a layer with one-sided `window` (None = global) under resolved `impl`, from a ModelConfig.

  pallas_gpu local layers use `attention_block_kv_local` as their forward kv tile.
  """
  local = window is not None and impl == "pallas_gpu"
  return KernelOptions(
    block_q=cfg.attention_block_q,
    block_kv=cfg.attention_block_kv_local if local else cfg.attention_block_kv,
    block_q_bwd=cfg.attention_block_q_bwd,
    block_kv_bwd=cfg.attention_block_kv_bwd,
    num_warps=cfg.attention_num_warps,
    num_stages=cfg.attention_num_stages,
    interpret=cfg.attention_interpret,
    checkpoint_name=CHECKPOINT_NAME,
  )


def segment_mask(segment_ids: jax.Array) -> jax.Array:
  """[B, S] segment ids → boolean [B, 1, S, S]: same document and the key is not padding.

  A padding query has no allowed key; the finite mask value of the XLA path turns that row into a harmless
  average instead of NaN (a NaN there would leak into real rows through 0·NaN in the backward pass).
  """
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  return (same & (segment_ids[:, None, :] != 0))[:, None]


def xla_attention(q, k, v, segment_ids, window: int | None):
  """The reference: dense [B, N, S, S] scores under the segment (and window) mask.

  float32 takes `_dense_attention`, whose backward pass is written out; other dtypes take
  `jax.nn.dot_product_attention`, whose roundings (bf16 probabilities and outputs, float32 scores and softmax)
  the kernels' bf16 errors are measured against."""
  if q.dtype == jnp.float32 and k.dtype == v.dtype == q.dtype:
    b, s = segment_ids.shape
    if window is not None and s % LOCAL_BLOCK == 0 and LOCAL_BLOCK + 2 * window < s:
      return _banded_attention(q, k, v, segment_ids, window).reshape(q.shape)
    mask = segment_mask(segment_ids)
    if window is not None:
      pos = jnp.arange(s)
      mask = mask & (abs(pos[:, None] - pos[None, :]) <= window)
    return _dense_attention(q, k, v, mask)
  return jax.nn.dot_product_attention(
    q,
    k,
    v,
    mask=segment_mask(segment_ids),
    local_window_size=None if window is None else (window, window),
    implementation="xla",
  )


LOCAL_BLOCK = 128  # float32 local layers: queries per block, each against its block ± window keys only


def _local_blocks(x, window: int):
  """[B, S, ...] → [B · S / LOCAL_BLOCK, LOCAL_BLOCK + 2 · window, ...]: for each block of queries, the rows
  within ±window of it, zero-padded at the ends (padded segment ids are 0: padding keys)."""
  b, s = x.shape[:2]
  span = LOCAL_BLOCK + 2 * window
  padded = jnp.pad(x, [(0, 0), (window, window)] + [(0, 0)] * (x.ndim - 2))
  blocks = jnp.stack([padded[:, j : j + span] for j in range(0, s, LOCAL_BLOCK)], 1)
  return blocks.reshape(b * (s // LOCAL_BLOCK), span, *x.shape[2:])


def _banded_attention(q, k, v, segment_ids, window: int):
  """Local attention over query blocks and their key windows (a third to a half of the dense [S, S] scores at
  S = 512, window 64). Real rows equal the dense path's; a padding row (no key) averages its block's window."""
  b, s = segment_ids.shape
  q_seg = segment_ids.reshape(-1, LOCAL_BLOCK)
  k_seg = _local_blocks(segment_ids, window)
  t, u = jnp.arange(LOCAL_BLOCK)[:, None], jnp.arange(LOCAL_BLOCK + 2 * window)[None, :]
  mask = (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] != 0) & (abs(t + window - u) <= window)
  qb = q.reshape(-1, LOCAL_BLOCK, *q.shape[2:])
  return _dense_attention(qb, _local_blocks(k, window), _local_blocks(v, window), mask[:, None])


# The masked score of jax.nn.dot_product_attention: finite, so a row without any allowed key averages its values.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


@jax.custom_vjp
def _dense_attention(q, k, v, mask):
  return _dense_attention_fwd(q, k, v, mask)[0]


def _dense_attention_fwd(q, k, v, mask):
  # The scale goes on q ([B, S, N, D]), not on the scores ([B, N, S, S]): XLA:CPU would read it as a
  # scores-sized broadcast operand of the product.
  q = q * q.shape[-1] ** -0.5
  s = jnp.einsum("btnd,bsnd->bnts", q, k)
  p = jax.nn.softmax(jnp.where(mask, s, _MASKED), axis=-1)
  out = jnp.einsum("bnts,bsnd->btnd", p, v)
  return out, (q, k, v, mask, p, out)


def _dense_attention_bwd(residuals, d_out):
  """Softmax backward as in FlashAttention: ds = p ⊙ (dp − rowsum(d_out ⊙ out)), the row sums taken over the
  head dim [B, S, N, D] instead of over the scores [B, N, S, S] (one elementwise pass over the scores)."""
  q, k, v, mask, p, out = residuals  # q scaled
  dv = jnp.einsum("bnts,btnd->bsnd", p, d_out)
  dp = jnp.einsum("btnd,bsnd->bnts", d_out, v)
  delta = jnp.sum(d_out * out, -1).transpose(0, 2, 1)[..., None]
  # Masked scores get no gradient (as through jnp.where); a row with keys has p = 0 there anyway, a padding
  # row without any has p = 1/S.
  ds = jnp.where(mask, p * (dp - delta), 0.0)
  dq = jnp.einsum("bnts,bsnd->btnd", ds, k) * q.shape[-1] ** -0.5
  dk = jnp.einsum("bnts,btnd->bsnd", ds, q)
  return dq, dk, dv, None


_dense_attention.defvjp(_dense_attention_fwd, _dense_attention_bwd)


# --------------------------------------------------------------------------------------------------------------
# Choosing an implementation (at build time)
# --------------------------------------------------------------------------------------------------------------


def resolve_impl(cfg, *, seq_len: int | None = None, platform: str | None = None) -> str:
  """The implementation `cfg.attention_impl` means here, or a ValueError saying why it cannot run.

  `cfg` is a `ModelConfig`; `platform` defaults to `cfg.attention_platform`, else `sharding.target_platform()`.
  Triton tiles are checked here (powers of two >= 16) unless in interpret mode. With `seq_len`, also checks that
  the kernel tiles divide it (the trainer knows the sequence length; the model does not).
  """
  impl, interpret = cfg.attention_impl, cfg.attention_interpret
  platform = platform or cfg.attention_platform or sharding.target_platform()
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention_impl {impl!r} is not one of {IMPLEMENTATIONS}")
  if impl == "auto":
    impl = "splash" if platform == "tpu" else "pallas_gpu" if platform in _GPU_PLATFORMS else "xla"
  needs = {"splash": ("tpu",), "pallas_gpu": _GPU_PLATFORMS}.get(impl)
  if needs and platform not in needs and not interpret:
    raise ValueError(
      f"attention_impl={impl!r} needs a {needs[0].upper()} but this build targets {platform!r}; "
      f"use 'auto' or 'xla', or set attention_interpret=True to run the kernel in interpret mode"
    )
  if impl == "xla":
    return impl
  bq, bkv = cfg.attention_block_q, cfg.attention_block_kv
  if impl == "splash" and (bq % splash.LANES or bkv % splash.LANES):
    raise ValueError(
      f"splash attention needs attention_block_q and attention_block_kv to be multiples of "
      f"{splash.LANES}; got {bq} and {bkv}"
    )
  if impl == "pallas_gpu" and cfg.head_dim & (cfg.head_dim - 1):
    raise ValueError(f"attention_impl='pallas_gpu' needs a power-of-two head_dim; got {cfg.head_dim}")
  if impl == "pallas_gpu" and not interpret:
    for name in (
      "attention_block_q",
      "attention_block_kv",
      "attention_block_kv_local",
      "attention_block_q_bwd",
      "attention_block_kv_bwd",
    ):
      flash_gpu.check_triton_block(name, getattr(cfg, name))
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    used = [a for a in (*BATCH_AXES, HEAD_AXIS) if a in mesh.axis_names]
    explicit = [a for a in used if mesh.axis_types[mesh.axis_names.index(a)] != AxisType.Auto]
    if explicit:
      raise ValueError(
        f"attention_impl={impl!r} runs in shard_map, which needs Auto mesh axes; axes {explicit} "
        f"are {mesh.axis_types}: build the mesh with axis_types=(AxisType.Auto, ...)"
      )
    if HEAD_AXIS in mesh.axis_names and cfg.num_heads % mesh.shape[HEAD_AXIS]:
      raise ValueError(
        f"num_heads {cfg.num_heads} is not divisible by the mesh's {HEAD_AXIS!r} axis ({mesh.shape[HEAD_AXIS]})"
      )
  if seq_len is not None:
    for window in (None, cfg.window):
      check_seq_len(impl, seq_len, kernel_options(cfg, impl, window))
  return impl


def check_seq_len(impl: str, seq_len: int, options: KernelOptions) -> None:
  """Raises a ValueError if the kernel tiles of `impl` do not fit a sequence of `seq_len`."""
  if impl == "splash":
    splash.block_sizes(seq_len, options.block_q, options.block_kv)
  elif impl == "pallas_gpu":
    options.flash_block_sizes().for_seq_len(seq_len, interpret=options.interpret)


# --------------------------------------------------------------------------------------------------------------
# Running the kernels, sharded when a mesh is set
# --------------------------------------------------------------------------------------------------------------


def _shard(local_fn, q, k, v, segment_ids, *extra, extra_specs=()):
  """Runs `local_fn(*extra, q, k, v, segment_ids)` per device: batch over data/fsdp, heads over tensor.

  Without a mesh it is a plain call. The kernels see whole sequences, so sequence sharding is not supported.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return local_fn(*extra, q, k, v, segment_ids)
  batch = tuple(a for a in BATCH_AXES if a in mesh.axis_names) or None
  heads = HEAD_AXIS if HEAD_AXIS in mesh.axis_names else None
  shards = math.prod(mesh.shape[a] for a in batch or ())
  if q.shape[0] % shards:
    raise ValueError(f"batch {q.shape[0]} is not divisible by the mesh's batch axes {batch} ({shards} shards)")
  x = P(batch, None, heads, None)
  return jax.shard_map(
    local_fn, mesh=mesh, in_specs=(*extra_specs, x, x, x, P(batch, None)), out_specs=x, check_vma=False
  )(*extra, q, k, v, segment_ids)


def _splash(q, k, v, segment_ids, window, o: KernelOptions):
  _, s, n, _ = q.shape
  mesh = jax.sharding.get_abstract_mesh()
  head_shards = mesh.shape[HEAD_AXIS] if not mesh.empty and HEAD_AXIS in mesh.axis_names else 1
  kernel = splash.make_kernel(s, n, window, o.block_q, o.block_kv, head_shards, o.interpret, o.checkpoint_name)
  specs = ()
  if not mesh.empty:
    heads = HEAD_AXIS if HEAD_AXIS in mesh.axis_names else None
    specs = (kernel.manual_sharding_spec(NamedSharding(mesh, P(heads, None))),)
  return _shard(splash.apply, q, k, v, segment_ids, kernel, extra_specs=specs)


def _pallas_gpu(q, k, v, segment_ids, window, o: KernelOptions):
  fn = functools.partial(
    flash_gpu.flash_attention,
    window=window,
    block_sizes=o.flash_block_sizes(),
    num_warps=o.num_warps,
    num_stages=o.num_stages,
    interpret=o.interpret,
    residual_checkpoint_name=o.checkpoint_name,
  )
  return _shard(fn, q, k, v, segment_ids)


def attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  segment_ids: jax.Array,
  window: int | None,
  *,
  impl: str = "xla",
  options: KernelOptions | None = None,
  **overrides,
) -> jax.Array:
  """Bidirectional attention within documents; `window` is the one-sided local window (None = global).

  `impl` is a resolved name (see `resolve_impl`); `options` (default `KernelOptions()`), with any of its fields
  overridden by keyword (`block_q=64, interpret=True`), say how the kernels run.
  """
  if impl == "xla":
    return xla_attention(q, k, v, segment_ids, window)
  if impl not in ("splash", "pallas_gpu"):
    raise ValueError(
      f"attention impl {impl!r} is not one of ('xla', 'splash', 'pallas_gpu'); resolve 'auto' with resolve_impl first"
    )
  options = dataclasses.replace(options or KernelOptions(), **overrides)
  check_seq_len(impl, q.shape[1], options)
  run = _splash if impl == "splash" else _pallas_gpu
  return run(q, k, v, segment_ids, window, options)
