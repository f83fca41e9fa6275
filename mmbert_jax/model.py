"""The mmBERT / ModernBERT encoder with its masked-language-model head, in Flax NNX.

Forward pass (docs/ARCHITECTURE.md §2): LN(embed) → L pre-norm layers (layer 0 skips its attention norm) with fused
QKV, rotate-half RoPE (θ by layer kind), global attention every `global_every_n` layers and ±w local attention
otherwise, GeGLU MLP → final LN → head dense → GELU → LN → tied decoder + bias. No other biases.

Inputs are packed rows: `input_ids [B, S]`, `segment_ids [B, S]` (document index, 0 = padding) and
`positions [B, S]` restarting at 0 in every document. Parameters are float32; `ModelConfig.dtype` sets the compute
dtype. Every parameter carries logical axis names; `mmbert_jax.sharding` maps them to mesh axes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mmbert_jax import attention as attention_lib
from mmbert_jax import mlm_loss, sharding

_SAVE_ATTENTION = jax.checkpoint_policies.save_only_these_names(attention_lib.CHECKPOINT_NAME)
# What a rematerialised layer keeps for the backward pass. "attention" and "dots" keep the Pallas kernels' output
# and log-sum-exp (named attention_lib.CHECKPOINT_NAME), so the forward kernel runs once; "full" keeps nothing and
# runs it again. On the XLA path "attention" recomputes as much as "full".
REMAT_POLICIES = {
  "none": None,
  "full": jax.checkpoint_policies.nothing_saveable,
  "attention": _SAVE_ATTENTION,
  "dots": jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _SAVE_ATTENTION
  ),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything a layer needs to know, and nothing about the run.

  Attention kernel tiles. `attention_block_q`/`attention_block_kv` tile both kernels' forward pass (splash: also
  its backward; multiples of 128). The other tile and launch fields are pallas_gpu (Triton) only; their defaults
  are sized for an H100/H200 SM (64 K 32-bit registers, at most 255 per thread; 227 KiB shared memory per block)
  at head_dim 64, counting f32 registers per thread as tile elements / (32 · num_warps):
  - forward 128×128, 4 warps (128 threads): f32 accumulator [128, 64] 64 registers, f32 scores/probabilities
    [128, 128] 128, the bf16 q tile 32: ≈ 224, at the limit but unspilled (the tiling of FlashAttention-2 and
    of JAX's own Pallas GPU kernel at this head dim), two CTAs per SM.
  - local layers' forward kv tile 64: a q block of 128 rows needs keys [start − 64, end + 64], 256 keys; 64-wide
    kv tiles cover exactly those (4 tiles) where 128-wide ones read 384 (3 tiles), a third less work, and the
    [128, 64] score tile halves its 128 registers.
  - backward 64×64: the dk/dv kernel keeps two f32 accumulators [kv, 64] plus bf16 k and v for its whole loop, and
    per step bf16 q, do [q, 64] and f32 s, p, dp, ds [q, kv] (about three live); at 64×64 that is
    2 × 32 + 2 × 16 + 2 × 16 + 3 × 32 ≈ 224 registers, where the forward's 128×128 would need ≈ 640 and spill.
    The dq kernel is the mirror image.
  - 2 pipeline stages: double-buffered bf16 tiles take 2 × 2 × 16 KiB (forward k, v) or 2 × 2 × 8 KiB
    (backward), far below shared memory; more stages mostly help larger head dims.
  """

  vocab_size: int = 256_000
  hidden_size: int = 768
  num_layers: int = 22
  num_heads: int = 12
  intermediate_size: int = 1152  # GLU half-width: Wi produces 2× this
  local_window: int = 128  # total window: local layers attend |i − j| ≤ local_window // 2
  global_every_n: int = 3  # layer i is global iff i % global_every_n == 0
  global_rope_theta: float = 160_000.0
  local_rope_theta: float = 160_000.0
  norm_eps: float = 1e-5
  attn_out_dropout: float = 0.0  # dropout after the attention output projection (0.1 in pre-training)
  initializer_range: float = 0.02
  max_position_embeddings: int = 8192
  pad_id: int = 0
  eos_id: int = 1  # also cls and sep
  bos_id: int = 2
  unk_id: int = 3
  mask_id: int = 4
  dtype: str = "float32"  # compute dtype; parameters stay float32
  attention_impl: str = "xla"  # auto | xla | splash | pallas_gpu (see mmbert_jax.attention)
  attention_block_q: int = 128  # kernel tiling (Pallas implementations; see the docstring)
  attention_block_kv: int = 128
  attention_block_kv_local: int = 64  # pallas_gpu: forward kv tile of local layers
  attention_block_q_bwd: int = 64  # pallas_gpu: backward tiles (dq and dk/dv kernels)
  attention_block_kv_bwd: int = 64
  attention_num_warps: int = 4  # pallas_gpu: Triton warps per program (all three kernels)
  attention_num_stages: int = 2  # pallas_gpu: Triton software-pipelining stages
  attention_interpret: bool = False  # run the Pallas kernels in interpret mode (CPU tests)
  attention_platform: str | None = None  # build for this platform ("cuda", "tpu") instead of the current one
  remat: str = "none"  # none | full | attention | dots (see REMAT_POLICIES)
  scan_layers: bool = False  # run the layers as a scan over groups of global_every_n (one compiled body)
  loss_impl: str = "auto"  # MLM cross-entropy: auto | dense | chunked (no [masked, vocab] logits; mlm_loss.py)
  loss_chunk_size: int = 8192  # vocabulary rows per chunk of the chunked loss

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim {self.head_dim} must be even for rotate-half RoPE")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat {self.remat!r} is not one of {sorted(REMAT_POLICIES)}")
    if self.attention_impl not in attention_lib.IMPLEMENTATIONS:
      raise ValueError(f"attention_impl {self.attention_impl!r} is not one of {attention_lib.IMPLEMENTATIONS}")
    if self.loss_impl not in mlm_loss.IMPLEMENTATIONS:
      raise ValueError(f"loss_impl {self.loss_impl!r} is not one of {mlm_loss.IMPLEMENTATIONS}")
    for name in (
      "attention_block_q",
      "attention_block_kv",
      "attention_block_kv_local",
      "attention_block_q_bwd",
      "attention_block_kv_bwd",
      "attention_num_warps",
      "attention_num_stages",
      "loss_chunk_size",
    ):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name} must be positive; got {getattr(self, name)}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def window(self) -> int:
    """One-sided local window (64 for mmBERT)."""
    return self.local_window // 2

  def is_global(self, layer: int) -> bool:
    return layer % self.global_every_n == 0

  def replace(self, **kw) -> ModelConfig:
    return dataclasses.replace(self, **kw)


PRESETS: dict[str, ModelConfig] = {
  "tiny": ModelConfig(
    vocab_size=1024,
    hidden_size=64,
    num_layers=4,
    num_heads=4,
    intermediate_size=96,
    local_window=16,
    max_position_embeddings=1024,
  ),
  "mmbert-small": ModelConfig(hidden_size=384, num_heads=6),
  "mmbert-base": ModelConfig(hidden_size=768, num_heads=12),
}


def get_config(name: str, **overrides: Any) -> ModelConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides)


# --------------------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------------------


def _param(rngs: nnx.Rngs, std: float | None, shape: tuple[int, ...], names: tuple[str | None, ...]) -> nnx.Param:
  """A float32 parameter: truncated normal ±2σ (σ = std), or ones for std=None (norm scales), or zeros for 0."""
  if std is None:
    value = jnp.ones(shape, jnp.float32)
  elif std == 0:
    value = jnp.zeros(shape, jnp.float32)
  else:
    value = std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32)
  # Shard at construction only under a mesh; outside one (tests, conversion) parameters stay plain arrays.
  return nnx.Param(value, out_sharding=names, eager_sharding=not jax.sharding.get_abstract_mesh().empty)


def _norm_stats(x, eps):
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)  # two-pass variance
  return x32, mean, jax.lax.rsqrt(var + eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def layer_norm(x, scale, eps):
  """LayerNorm without bias over the last axis, statistics in float32, output in x's dtype."""
  return _layer_norm_fwd(x, scale, eps)[0]


def _layer_norm_fwd(x, scale, eps):
  x32, mean, rstd = _norm_stats(x, eps)
  return ((x32 - mean) * rstd * scale).astype(x.dtype), (x, mean, rstd, scale)


def _layer_norm_bwd(eps, residuals, dy):
  # The closed form, two row means and one pass (as torch's layer_norm backward). Autodiff's version reaches XLA
  # CPU as a chain of elementwise ops that it fuses, recomputed, into each consumer (the weight gradients'
  # transposes): 0.2 s of a 3.3 s CPU bench step. It also keeps x in the compute dtype, not float32 differences.
  x, mean, rstd, scale = residuals
  xhat = (x.astype(jnp.float32) - mean) * rstd
  dy32 = dy.astype(jnp.float32)
  g = dy32 * scale
  dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
  dscale = (dy32 * xhat).reshape(-1, x.shape[-1]).sum(0)
  return dx.astype(x.dtype), dscale.astype(scale.dtype)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def dense(x: jax.Array, w: jax.Array, contract: int = 1) -> jax.Array:
  """x [..., K₁…K_c] · w [K₁…K_c, N…] → [..., N…]: x's last `contract` axes against w's first ones."""
  if sharding.target_platform() != "cpu":
    return jnp.tensordot(x, w, contract)
  k = math.prod(w.shape[:contract])
  y = _dense_cpu(x.reshape(-1, k), w.reshape(k, -1))
  return y.reshape(*x.shape[: x.ndim - contract], *w.shape[contract:])


@jax.custom_vjp
def _dense_cpu(x, w):
  return x @ w


def _dense_cpu_fwd(x, w):
  return x @ w, (x, w)


def _dense_cpu_bwd(residuals, dy):
  # XLA:CPU hands a product to YNNPACK only when both operands are row-major in their contraction; the weight
  # gradient xᵀ·dy contracts x's rows, and XLA folds a plain transpose of x back into the product, which then
  # runs on Eigen (slower, and beside the next product on the same two cores). The barrier keeps xᵀ a copy. A
  # layer that narrows (the GeGLU output [T, 1152] → [T, 384]) transposes dy instead, the smaller of the two, and
  # then the [N, K] product (both barriers: XLA folds either transpose back).
  x, w = residuals
  if x.shape[1] <= dy.shape[1]:
    dw = jax.lax.optimization_barrier(x.T) @ dy
  else:
    dw = jax.lax.optimization_barrier(jax.lax.optimization_barrier(dy.T) @ x).T
  return dy @ w.T, dw


_dense_cpu.defvjp(_dense_cpu_fwd, _dense_cpu_bwd)


class LayerNorm(nnx.Module):
  """LayerNorm without bias, two-pass variance, statistics in float32 (`layer_norm`)."""

  def __init__(self, size: int, eps: float, rngs: nnx.Rngs):
    self.scale = _param(rngs, None, (size,), ("norm",))
    self.eps = eps

  def __call__(self, x):
    return layer_norm(x, self.scale[...], self.eps)


def gelu(x):
  return jax.nn.gelu(x, approximate=False)  # exact erf GELU, as torch nn.GELU()


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotate-half RoPE over the full head dim. x [B, S, N, D], positions [B, S]."""
  d = x.shape[-1]
  inv_freq = 1.0 / theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, S, D/2]
  emb = jnp.concatenate([freqs, freqs], -1)[:, :, None, :]  # [B, S, 1, D]
  # cos/sin rounded to the activation dtype first, the rotation itself in float32 (as HF and the original).
  cos = jnp.cos(emb).astype(x.dtype).astype(jnp.float32)
  sin = jnp.sin(emb).astype(x.dtype).astype(jnp.float32)
  x32 = x.astype(jnp.float32)
  rotated = jnp.concatenate([-x32[..., d // 2 :], x32[..., : d // 2]], -1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
    h, n, d = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    out_std = cfg.initializer_range / math.sqrt(2 * cfg.num_layers)
    self.wqkv = _param(rngs, cfg.initializer_range, (h, 3, n, d), ("embed", None, "heads", "head_dim"))
    self.wo = _param(rngs, out_std, (n, d, h), ("heads", "head_dim", "embed"))
    self.dropout = nnx.Dropout(cfg.attn_out_dropout)
    self.is_global = cfg.is_global(layer)
    self.theta = cfg.global_rope_theta if self.is_global else cfg.local_rope_theta
    self.window = None if self.is_global else cfg.window
    self.impl = attention_lib.resolve_impl(cfg)  # an impossible impl/platform/mesh combination fails here
    self.kernel_options = attention_lib.kernel_options(cfg, self.impl, self.window)
    self.dtype = jnp.dtype(cfg.dtype)

  def __call__(self, x, segment_ids, positions, rngs=None):
    # One product per projection: slicing a fused [B, S, 3, N, D] output costs a pad of the whole array per
    # slice in the backward pass, where slicing the weight pads only the [H, N, D] weight gradient.
    w = self.wqkv[...].astype(self.dtype)
    q, k, v = (dense(x, w[:, c]) for c in range(3))
    q, k = rope(q, positions, self.theta), rope(k, positions, self.theta)
    out = attention_lib.attention(q, k, v, segment_ids, self.window, impl=self.impl, options=self.kernel_options)
    out = dense(out, self.wo[...].astype(self.dtype), contract=2)
    if rngs is None:  # inference and eval: no dropout
      return out
    return self.dropout(out, deterministic=False, rngs=rngs)


class GeGLU(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    h, i = cfg.hidden_size, cfg.intermediate_size
    self.wi = _param(rngs, cfg.initializer_range, (h, 2, i), ("embed", None, "mlp"))
    self.wo = _param(rngs, cfg.initializer_range / math.sqrt(2 * cfg.num_layers), (i, h), ("mlp", "embed"))
    self.dtype = jnp.dtype(cfg.dtype)

  def __call__(self, x):
    wi = self.wi[...].astype(self.dtype)  # two products, not one sliced in two (as in Attention)
    u, g = (dense(x, wi[:, c]) for c in range(2))
    return dense(gelu(u) * g, self.wo[...].astype(self.dtype))


class EncoderLayer(nnx.Module):
  def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
    # Layer 0 reads the embedding norm's output directly: no attention pre-norm.
    self.attn_norm = LayerNorm(cfg.hidden_size, cfg.norm_eps, rngs) if layer > 0 else None
    self.attn = Attention(cfg, layer, rngs)
    self.mlp_norm = LayerNorm(cfg.hidden_size, cfg.norm_eps, rngs)
    self.mlp = GeGLU(cfg, rngs)

  def __call__(self, x, segment_ids, positions, rngs=None):
    h = x if self.attn_norm is None else self.attn_norm(x)
    x = x + self.attn(h, segment_ids, positions, rngs)
    return x + self.mlp(self.mlp_norm(x))


# --------------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------------


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
  """Per-document positions: 0 at each document's first token, counting up inside it."""
  s = segment_ids.shape[-1]
  idx = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), segment_ids.shape)
  starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


def layer_dropout_keys(rngs: nnx.Rngs, num_layers: int) -> jax.Array:
  """One dropout key per layer [num_layers], the same whether the layers run unrolled or scanned: one draw from
  the `dropout` stream, split. (A draw per layer is a scalar threefry hash each, and at 22 layers those
  thousands of unfused scalar ops were half of the TPU compiler's HLO-pass time for the step.)"""
  return jax.random.split(rngs.dropout(), num_layers)


# Hidden states [B, S, H] (and the head's [B, K, H]): rows over the batch axes, the rest whole on each device.
ACTIVATIONS = ("batch", None, None)


def take_positions(x: jax.Array, positions: jax.Array, *, one_hot: bool | None = None) -> jax.Array:
  """The rows of x [B, S, H] at positions [B, K] → [B, K, H] (the masked slots' hidden states).

  `one_hot` (default: on a TPU) takes them as a product with a one-hot [B, K, S] matrix: the gradient of a gather
  is a scatter-add, which a TPU lowers to a sort of the indices, several times slower to compile than the product
  (README, "Will it fit?"); the product's gradient is a product, for about 0.2% more FLOPs at S = 1024 (K ≈ 0.3·S).
  HIGHEST precision keeps a float32 gather exact (one term per row; the default would round x to bfloat16)."""
  if one_hot is None:
    one_hot = sharding.target_platform() == "tpu"
  if not one_hot:
    return jnp.take_along_axis(x, positions[..., None], axis=1)
  selector = jax.nn.one_hot(positions, x.shape[1], dtype=x.dtype)
  return jnp.einsum("bks,bsh->bkh", selector, x, precision=jax.lax.Precision.HIGHEST)


def _apply_layer(cfg: ModelConfig, layer: EncoderLayer, x, segment_ids, positions, key):
  if cfg.remat == "none":
    x = layer(x, segment_ids, positions, key)
  else:
    x = nnx.remat(lambda lyr, *a: lyr(*a), policy=REMAT_POLICIES[cfg.remat])(layer, x, segment_ids, positions, key)
  return sharding.constrain(x, ACTIVATIONS)


# Scanned layers: a layer's output (the next layer's input, in the compute dtype) is saved under this name.
LAYER_OUTPUT = "layer_output"


def scan_policy(remat: str):
  """What the scanned group body keeps for the backward pass: every layer's output plus what the `remat` policy
  keeps, and for "none" the attention kernels' residuals. Everything else (LayerNorm statistics in float32, RoPE,
  GeGLU activations, and for "none" and "attention" the projections) is recomputed from those: left to itself,
  `lax.scan` keeps every intermediate of its body, stacked over the groups."""
  keep = REMAT_POLICIES[remat] or _SAVE_ATTENTION
  return jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.save_only_these_names(LAYER_OUTPUT), keep
  )


def scanned_layer_indices(cfg: ModelConfig) -> list[list[int]]:
  """The layers that `scan_layers` runs as one scan: [position in the group][group] → layer index. Layer 0 (no
  attention pre-norm) and the layers after the last whole group of `global_every_n` run on their own."""
  period = cfg.global_every_n
  groups = (cfg.num_layers - 1) // period
  return [[1 + g * period + j for g in range(groups)] for j in range(period)] if groups else []


def stack_layers(cfg: ModelConfig, layers: dict) -> list:
  """Per-layer parameters {layer index: tree} → one tree per group position, stacked over the groups (the scan's
  layout). Parameters stay per layer at rest (checkpoints, HF files, optimizer state)."""
  return [jax.tree.map(lambda *a: jnp.stack(a), *[layers[i] for i in index]) for index in scanned_layer_indices(cfg)]


def unstack_layers(cfg: ModelConfig, stacked: list) -> dict:
  """The inverse of `stack_layers`: {layer index: tree} of the scanned layers."""
  out = {}
  for index, tree in zip(scanned_layer_indices(cfg), stacked):
    for g, i in enumerate(index):
      out[i] = jax.tree.map(lambda a, g=g: a[g], tree)
  return out


class MaskedLM(nnx.Module):
  """ModernBertForMaskedLM in NNX. `model(input_ids, segment_ids, positions)` → logits [B, S, V]."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    h = cfg.hidden_size
    out_std = cfg.initializer_range / math.sqrt(2 * cfg.num_layers)
    self.embedding = _param(rngs, cfg.initializer_range, (cfg.vocab_size, h), ("vocab", "embed"))
    self.emb_norm = LayerNorm(h, cfg.norm_eps, rngs)
    self.layers = nnx.List([EncoderLayer(cfg, i, rngs) for i in range(cfg.num_layers)])
    self.final_norm = LayerNorm(h, cfg.norm_eps, rngs)
    self.head_dense = _param(rngs, out_std, (h, h), ("embed", None))
    self.head_norm = LayerNorm(h, cfg.norm_eps, rngs)
    self.decoder_bias = _param(rngs, 0, (cfg.vocab_size,), ("vocab",))

  def encode(
    self, input_ids, segment_ids=None, positions=None, *, rngs: nnx.Rngs | None = None, stacked=None
  ) -> jax.Array:
    """Final-norm hidden states [B, S, H] in the compute dtype. `rngs` (a `dropout` stream) enables dropout.
    With `scan_layers`, `stacked` (`stack_layers` of this model's layers) replaces the scanned layers'
    parameters: a train step stacks them once, outside its micro-batches and its gradient."""
    cfg = self.config
    if segment_ids is None:
      segment_ids = jnp.ones_like(input_ids)
    if positions is None:
      positions = positions_from_segments(segment_ids)
    x = self.emb_norm(self.embed(input_ids))
    x = sharding.constrain(x, ACTIVATIONS)
    keys = None if rngs is None else layer_dropout_keys(rngs, cfg.num_layers)
    if cfg.scan_layers:
      x = self._scanned_layers(x, segment_ids, positions, keys, stacked)
    else:
      for i, layer in enumerate(self.layers):
        x = _apply_layer(cfg, layer, x, segment_ids, positions, None if keys is None else keys[i])
    return self.final_norm(x)

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """Token embeddings [B, S, H] in the compute dtype, gathered from the float32 table and then rounded: the
    gradient of a gather is a scatter-add, which adds in its operand's dtype, so gathering from a bfloat16 copy
    would sum a frequent token's cotangents in bfloat16 (one repeated 4,096 times gets 256, not 4,096)."""
    return self.embedding[...][input_ids].astype(self.config.dtype)

  def _scanned_layers(self, x, segment_ids, positions, keys, stacked):
    """Layer 0 alone, then the groups of `global_every_n` layers that share one structure (local…, global) as one
    `lax.scan` over their stacked parameters (`stack_layers`; stacked here unless given), then any remaining
    layers. The group body is rematerialised by `scan_policy`."""
    cfg = self.config
    indices = scanned_layer_indices(cfg)
    scanned = {i for index in indices for i in index}
    key = lambda i: None if keys is None else keys[i]
    x = _apply_layer(cfg, self.layers[0], x, segment_ids, positions, key(0))
    if indices:
      graphdefs = [nnx.graphdef(self.layers[index[0]]) for index in indices]
      if stacked is None:
        stacked = stack_layers(cfg, {i: nnx.to_pure_dict(nnx.state(self.layers[i])) for i in scanned})

      def group(x, xs):
        states, group_keys = xs
        for j, (graphdef, state) in enumerate(zip(graphdefs, states)):
          layer = nnx.merge(graphdef, state)
          x = layer(x, segment_ids, positions, None if group_keys is None else group_keys[j])
          x = checkpoint_name(sharding.constrain(x, ACTIVATIONS), LAYER_OUTPUT)
        return x, None

      body = jax.checkpoint(group, policy=scan_policy(cfg.remat), prevent_cse=False)
      group_keys = None if keys is None else keys[jnp.asarray(indices).T]  # [group, position]
      x, _ = jax.lax.scan(body, x, (stacked, group_keys))
    for i in range(1 + len(scanned), cfg.num_layers):
      x = _apply_layer(cfg, self.layers[i], x, segment_ids, positions, key(i))
    return x

  def head_features(self, x: jax.Array) -> jax.Array:
    """The MLM head before the tied decoder: dense → GELU → LN, in the compute dtype."""
    return self.head_norm(gelu(dense(x, self.head_dense[...].astype(self.config.dtype))))

  def head(self, x: jax.Array) -> jax.Array:
    """MLM head on hidden states [..., H] → float32 logits [..., V]."""
    logits = jnp.einsum(
      "...h,vh->...v",
      self.head_features(x),
      self.embedding[...].astype(self.config.dtype),
      preferred_element_type=jnp.float32,
    )
    return logits + self.decoder_bias[...]

  def masked_lm_loss(
    self,
    input_ids,
    segment_ids,
    positions,
    masked_positions,
    masked_labels,
    *,
    rngs: nnx.Rngs | None = None,
    stacked=None,
  ) -> tuple[jax.Array, jax.Array]:
    """Per-slot negative log-likelihood of `masked_labels [B, K]` and argmax hits at `masked_positions`, by
    `ModelConfig.loss_impl` (see mmbert_jax.mlm_loss): the training loss, without necessarily any logits.
    `stacked`: see `encode`."""
    cfg = self.config
    x = self.encode(input_ids, segment_ids, positions, rngs=rngs, stacked=stacked)
    x = sharding.constrain(take_positions(x, masked_positions), ACTIVATIONS)
    x = self.head_features(x)
    return mlm_loss.token_loss(
      x,
      self.embedding[...].astype(cfg.dtype),
      self.decoder_bias[...],
      masked_labels,
      impl=cfg.loss_impl,
      chunk_size=cfg.loss_chunk_size,
    )

  def __call__(
    self, input_ids, segment_ids=None, positions=None, masked_positions=None, *, rngs: nnx.Rngs | None = None
  ) -> jax.Array:
    """Dense logits [B, S, V]; with `masked_positions [B, K]`, sparse logits [B, K, V] at those indices only.
    Dropout (attention output) is active only when `rngs` is given."""
    x = self.encode(input_ids, segment_ids, positions, rngs=rngs)
    if masked_positions is not None:
      x = take_positions(x, masked_positions)
    return self.head(x)


# ModelConfig fields that say how the model runs, not what it computes (every attention_* field picks or tunes a
# kernel): checkpoints of one model may differ in them, and a run may change them when it resumes.
RUNTIME_FIELDS = frozenset(
  {"dtype", "remat", "attn_out_dropout", "scan_layers", "loss_impl", "loss_chunk_size"}
  | {f.name for f in dataclasses.fields(ModelConfig) if f.name.startswith("attention_")}
)


def abstract_model(cfg: ModelConfig, seed: int = 0) -> MaskedLM:
  """The model with shapes in place of arrays: nothing is allocated (restore targets, graphs, compilation).
  Under a mesh and logical axis rules its parameters carry their shardings."""
  return nnx.eval_shape(lambda: MaskedLM(cfg, rngs=nnx.Rngs(seed)))


def count_params(cfg: ModelConfig) -> int:
  """Parameter count from shapes alone (no memory is allocated)."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(abstract_model(cfg), nnx.Param)))
