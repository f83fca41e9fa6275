"""The Pallas kernels (splash, pallas_gpu) in interpret mode against the XLA reference, and implementation choice."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from mmbert_jax import attention
from mmbert_jax import model as model_lib

KERNELS = ("splash", "pallas_gpu")
HEAD_DIM = 64


def packed_segments(batch: int, seq: int) -> np.ndarray:
  """Row 0: three documents, then padding; row 1: one document, then padding; further rows: one full document."""
  seg = np.ones((batch, seq), np.int32)
  cuts = [0, 3 * seq // 10, 6 * seq // 10, 9 * seq // 10]
  for doc, (a, b) in enumerate(zip(cuts, cuts[1:]), start=1):
    seg[0, a:b] = doc
  seg[0, cuts[-1] :] = 0
  if batch > 1:
    seg[1, seq - seq // 8 :] = 0
  return seg


def qkv(batch, seq, heads, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  q, k, v, ct = (jax.random.normal(key, (batch, seq, heads, HEAD_DIM), jnp.float32) for key in keys)
  return q, k, v, ct


def attention_and_grads(impl, q, k, v, segment_ids, window, ct, **kw):
  """Output and d(Σ out·ct)/d(q, k, v), where ct is zero on padding rows (padding rows are free to differ)."""
  ct = ct * (segment_ids != 0)[:, :, None, None]

  def loss(q, k, v):
    out = attention.attention(q, k, v, segment_ids, window, impl=impl, **kw)
    return jnp.sum(out * ct), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


def assert_matches_reference(impl, q, k, v, segment_ids, window, ct, **kw):
  out, grads = attention_and_grads(impl, q, k, v, segment_ids, window, ct, interpret=True, **kw)
  ref_out, ref_grads = attention_and_grads("xla", q, k, v, segment_ids, window, ct)
  real = np.asarray(segment_ids != 0)[:, :, None, None]
  assert np.all(np.isfinite(out)), "padding rows must stay finite"
  np.testing.assert_allclose(np.where(real, out, 0), np.where(real, ref_out, 0), atol=1e-5, rtol=0)
  for name, g, ref in zip("qkv", grads, ref_grads):
    assert np.all(np.isfinite(g)), f"d{name} has non-finite entries"
    np.testing.assert_allclose(g, ref, atol=1e-5, rtol=0, err_msg=f"d{name}")


@pytest.mark.parametrize("seq,window", [(96, None), (96, 20), (384, 20), (384, 64)])
def test_float32_xla_path_equals_autodiff_of_dot_product_attention(seq, window):
  """The float32 XLA path (its backward pass written out) against jax.grad of jax.nn.dot_product_attention, the
  path of the other dtypes: outputs and gradients. Dense scores (S = 96) match on padding rows too; local
  layers at S = 384 run in blocks of 128 queries against their ±window keys, and match on real rows (padding
  rows, which have no key, average other values there and get no cotangent here)."""
  q, k, v, ct = qkv(2, seq, 3)
  seg = jnp.asarray(packed_segments(2, seq))
  banded = seq % attention.LOCAL_BLOCK == 0 and window is not None
  real = np.asarray(seg != 0)[:, :, None, None] if banded else np.ones((1, 1, 1, 1), bool)
  ct = ct * real

  def run(fn):
    def loss(q, k, v):
      out = fn(q, k, v)
      return jnp.sum(out * ct), out

    with jax.default_matmul_precision("highest"):
      (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return np.where(real, out, 0), grads

  want, want_grads = run(
    lambda q, k, v: jax.nn.dot_product_attention(
      q,
      k,
      v,
      mask=attention.segment_mask(seg),
      local_window_size=None if window is None else (window, window),
      implementation="xla",
    )
  )
  got, grads = run(lambda q, k, v: attention.xla_attention(q, k, v, seg, window))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  for name, g, ref in zip("qkv", grads, want_grads):
    assert np.all(np.isfinite(g)), f"d{name} has non-finite entries"
    np.testing.assert_allclose(g, ref, atol=1e-5, rtol=0, err_msg=f"d{name}")


# Global and local layers; 256 is a multiple of the window 64 but not of 48 or 100; 6 and 12 heads (the presets).
CASES = [
  (256, 6, None),
  (256, 12, 64),
  (256, 6, 48),
  (128, 12, 100),
]


@pytest.mark.slow
@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("seq,heads,window", CASES)
def test_kernel_matches_xla(impl, seq, heads, window):
  q, k, v, ct = qkv(2, seq, heads)
  assert_matches_reference(impl, q, k, v, jnp.asarray(packed_segments(2, seq)), window, ct)


def test_gpu_kernel_small_blocks_window_spanning_blocks():
  """S = 160 (not a multiple of the window), blocks of 32: each q block sees a range of several kv blocks."""
  q, k, v, ct = qkv(2, 160, 6, seed=1)
  assert_matches_reference("pallas_gpu", q, k, v, jnp.asarray(packed_segments(2, 160)), 40, ct, block_q=32, block_kv=32)


@pytest.mark.slow
@pytest.mark.parametrize("impl", KERNELS)
def test_kernel_under_mesh_shard_map(impl):
  """8 devices: batch over (data, fsdp), heads over tensor; results equal the unsharded reference."""
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  q, k, v, ct = qkv(4, 256, 6, seed=2)
  seg = jnp.asarray(packed_segments(4, 256))
  ref_out, ref_grads = attention_and_grads("xla", q, k, v, seg, 48, ct)
  with jax.set_mesh(mesh):
    x = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor"))
    args = [jax.device_put(a, x) for a in (q, k, v)]
    seg_sharded = jax.device_put(seg, NamedSharding(mesh, P(("data", "fsdp"))))
    out, grads = attention_and_grads(impl, *args, seg_sharded, 48, jax.device_put(ct, x), interpret=True)
    hlo = jax.jit(lambda *a: attention.attention(*a, seg_sharded, 48, impl=impl, interpret=True)).lower(*args).as_text()
  assert "shard_map" in hlo or "manual" in hlo.lower()
  assert out.sharding.spec == x.spec
  real = np.asarray(seg != 0)[:, :, None, None]
  np.testing.assert_allclose(np.where(real, out, 0), np.where(real, ref_out, 0), atol=1e-5, rtol=0)
  for g, ref in zip(grads, ref_grads):
    np.testing.assert_allclose(g, ref, atol=1e-5, rtol=0)


def rms_errors(impl, q, k, v, segment_ids, window, ct, reference, **kw):
  """Root-mean-square error of the output and of dq, dk, dv on real rows against float32 `reference` results."""
  out, grads = attention_and_grads(impl, q, k, v, segment_ids, window, ct, **kw)
  real = np.asarray(segment_ids != 0)[:, :, None, None]
  return np.array(
    [
      np.sqrt(np.mean(np.square(np.where(real, np.asarray(x, np.float32) - r, 0))))
      for x, r in zip((out, *grads), reference)
    ]
  )


@pytest.mark.slow
@pytest.mark.parametrize("impl", KERNELS)
def test_bfloat16_forward_and_gradients_within_xla_error(impl):
  """bf16 q/k/v at S = 512 with a ±64 window (most kv blocks skipped), packed rows and a padding tail.

  The reference is float32 attention on the same bf16-rounded inputs; the XLA path in bf16 rounds the
  probabilities and outputs to bf16 and keeps the logits and the softmax statistics in float32. The kernels sit
  at 0.70–1.04× the XLA path's error. The bound, 1.15×, fails each bf16 rounding a kernel must not add: the
  logits or the saved log-sum-exp (1.6× on the output, 3× on dq), the backward's probabilities before dS (1.28×
  on dq, 1.24× on dk), dP = dO·Vᵀ (1.30×, 1.26×), the forward accumulator at each kv block (1.30× on the output).
  The tiles are the model's defaults (`kernel_options`), local kv tile and backward tiles included.
  """
  seq, window = 512, 64
  seg = jnp.asarray(packed_segments(2, seq))
  q, k, v, ct = (x.astype(jnp.bfloat16) for x in qkv(2, seq, 2, seed=4))
  ref_out, ref_grads = attention_and_grads(
    "xla", *(x.astype(jnp.float32) for x in (q, k, v)), seg, window, ct.astype(jnp.float32)
  )
  reference = [np.asarray(x) for x in (ref_out, *ref_grads)]
  xla = rms_errors("xla", q, k, v, seg, window, ct, reference)
  cfg = small_config(local_window=2 * window, attention_impl=impl, attention_interpret=True)
  kernel = rms_errors(impl, q, k, v, seg, window, ct, reference, options=attention.kernel_options(cfg, impl, window))
  assert np.all(xla > 0)
  for name, err, err_xla in zip(("out", "dq", "dk", "dv"), kernel, xla):
    assert err <= 1.15 * err_xla, f"{impl} bf16 {name} error {err:.3g} > 1.15 × XLA's {err_xla:.3g}"


# --------------------------------------------------------------------------------------------------------------
# Implementation choice and build-time errors
# --------------------------------------------------------------------------------------------------------------


def small_config(**kw):
  base = dict(
    vocab_size=1024,
    hidden_size=128,
    num_layers=3,
    num_heads=2,
    intermediate_size=128,
    local_window=64,
    max_position_embeddings=512,
  )
  return model_lib.ModelConfig(**{**base, **kw})


@pytest.mark.parametrize(
  "platform,expected", [("tpu", "splash"), ("gpu", "pallas_gpu"), ("cuda", "pallas_gpu"), ("cpu", "xla")]
)
def test_auto_picks_the_platform_kernel(platform, expected):
  assert attention.resolve_impl(small_config(attention_impl="auto"), platform=platform) == expected


def test_forced_kernels_resolve_where_they_run():
  assert attention.resolve_impl(small_config(attention_impl="splash"), platform="tpu") == "splash"
  assert attention.resolve_impl(small_config(attention_impl="pallas_gpu"), platform="gpu") == "pallas_gpu"
  assert attention.resolve_impl(small_config(attention_impl="xla"), platform="tpu") == "xla"
  assert (
    attention.resolve_impl(small_config(attention_impl="splash", attention_interpret=True), platform="cpu") == "splash"
  )


@pytest.mark.parametrize(
  "kw,platform,message",
  [
    (dict(attention_impl="splash"), "gpu", "needs a TPU"),
    (dict(attention_impl="pallas_gpu"), "tpu", "needs a GPU"),
    (dict(attention_impl="splash", attention_block_kv=64), "tpu", "multiples of 128"),
    (dict(attention_impl="pallas_gpu", hidden_size=96, num_heads=2), "gpu", "power-of-two head_dim"),
    (
      dict(attention_impl="pallas_gpu", attention_block_kv_bwd=48),
      "gpu",
      "attention_block_kv_bwd=48 must be a power of two >= 16 for Triton",
    ),
    (dict(attention_impl="auto", attention_block_kv_local=8), "cuda", "attention_block_kv_local=8 must be"),
  ],
)
def test_impossible_combinations_fail_at_resolve(kw, platform, message):
  with pytest.raises(ValueError, match=message):
    attention.resolve_impl(small_config(**kw), platform=platform)


def test_block_sizes_must_divide_seq_len():
  with pytest.raises(ValueError, match="does not divide the sequence length 384"):
    attention.resolve_impl(small_config(attention_impl="splash", attention_block_q=256), platform="tpu", seq_len=384)
  with pytest.raises(ValueError, match="does not divide the sequence length 200"):
    attention.resolve_impl(
      small_config(attention_impl="pallas_gpu", attention_block_kv=64), platform="gpu", seq_len=200
    )
  fits = small_config(attention_impl="pallas_gpu", attention_block_q=64, attention_block_kv=64)
  assert attention.resolve_impl(fits, platform="gpu", seq_len=192) == "pallas_gpu"
  # 128-row tiles capped at S = 96 divide it, but Triton cannot lower them; interpret mode can run them.
  with pytest.raises(ValueError, match="block_q=96 \\(sequence length 96\\) must be a power of two"):
    attention.resolve_impl(small_config(attention_impl="pallas_gpu"), platform="gpu", seq_len=96)
  interpreted = small_config(
    attention_impl="pallas_gpu",
    attention_interpret=True,
    attention_block_kv_local=48,
    attention_block_q_bwd=48,
    attention_block_kv_bwd=48,
  )
  assert attention.resolve_impl(interpreted, platform="cpu", seq_len=96) == "pallas_gpu"


def test_model_construction_rejects_kernel_without_accelerator():
  """On this CPU-only host, a forced kernel without interpret mode fails when the model is built."""
  with pytest.raises(ValueError, match="needs a TPU but this build targets 'cpu'"):
    nnx.eval_shape(lambda: model_lib.MaskedLM(small_config(attention_impl="splash"), rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="attention_impl 'flash' is not one of"):
    small_config(attention_impl="flash")


def test_explicit_mesh_and_indivisible_heads_are_rejected():
  explicit = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Explicit,) * 3)
  with jax.set_mesh(explicit), pytest.raises(ValueError, match="needs Auto mesh axes"):
    attention.resolve_impl(small_config(attention_impl="pallas_gpu", attention_interpret=True))
  auto = jax.make_mesh((1, 1, 8), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  with jax.set_mesh(auto), pytest.raises(ValueError, match="num_heads 2 is not divisible by the mesh's 'tensor'"):
    attention.resolve_impl(small_config(attention_impl="splash", attention_interpret=True))


# --------------------------------------------------------------------------------------------------------------
# Whole model
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("impl", KERNELS)
def test_masked_lm_logits_match_xla(impl):
  """3 layers (one global, two ±32 local), packed rows with padding: same logits on every real token."""
  seq = 256
  seg = jnp.asarray(packed_segments(2, seq))
  ids = jnp.where(seg != 0, jax.random.randint(jax.random.key(3), seg.shape, 5, 1024), 0)
  ref_model = model_lib.MaskedLM(small_config(), rngs=nnx.Rngs(0))
  kernel_model = model_lib.MaskedLM(small_config(attention_impl=impl, attention_interpret=True), rngs=nnx.Rngs(0))
  assert {layer.attn.impl for layer in kernel_model.layers} == {impl}
  for a, b in zip(
    jax.tree.leaves(nnx.state(ref_model, nnx.Param)), jax.tree.leaves(nnx.state(kernel_model, nnx.Param))
  ):
    np.testing.assert_array_equal(a, b)  # same seed, same parameters: only attention differs
  logits = nnx.jit(lambda m: m(ids, seg))(kernel_model)
  ref_logits = nnx.jit(lambda m: m(ids, seg))(ref_model)
  real = np.asarray(seg != 0)[..., None]
  assert np.all(np.isfinite(logits))
  np.testing.assert_allclose(np.where(real, logits, 0), np.where(real, ref_logits, 0), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_remat_keeping_attention_residuals_gives_same_gradients():
  """remat="attention" keeps the kernel's named output and log-sum-exp and recomputes the rest of the layer: the
  parameter gradients equal those of the XLA path without remat (one global and one local layer; the loss
  leaves out padding rows, where the paths differ)."""
  seq = 128
  seg = jnp.asarray(packed_segments(2, seq))
  ids = jnp.where(seg != 0, jax.random.randint(jax.random.key(5), seg.shape, 5, 1024), 0)
  grads = []
  for kw in (dict(), dict(attention_impl="pallas_gpu", attention_interpret=True, remat="attention")):
    model = model_lib.MaskedLM(small_config(num_layers=2, **kw), rngs=nnx.Rngs(0))
    grads.append(nnx.jit(nnx.grad(lambda m: jnp.mean(m(ids, seg) ** 2 * (seg != 0)[..., None])))(model))
  for a, b in zip(*map(jax.tree.leaves, grads)):
    np.testing.assert_allclose(b, a, atol=1e-6, rtol=1e-4)


@pytest.mark.slow
def test_hardware_benchmark_mode_runs_and_counts_visited_pairs(capsys):
  """The hardware mode of benchmarks/attention runs end to end here (kernel in interpret mode, no cuDNN on CPU);
  its visited-pair counts lie between the in-window pairs (brute force) and all S×S pairs."""
  from mmbert_jax.benchmarks import attention as bench

  bench.hardware([128], tokens=128, heads=1, window=32, repeats=1)
  rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.split()[:1] == ["128"]]
  assert [(r[2], r[3]) for r in rows] == [
    ("global", "xla"),
    ("global", "kernel"),
    ("local", "xla"),
    ("local", "kernel"),
  ]
  assert all(float(r[4]) > 0 and float(r[5]) > 0 for r in rows)
  seq, window = 8192, 64
  i = np.arange(seq)
  in_window = int(np.sum(np.minimum(i + window, seq - 1) - np.maximum(i - window, 0) + 1))  # |i − j| ≤ w
  cfg = model_lib.ModelConfig()
  for impl in KERNELS:
    fwd, bwd = bench.visited_pairs(impl, seq, window, attention.kernel_options(cfg, impl, window))
    assert in_window < fwd < 0.05 * seq * seq and in_window < bwd < 0.05 * seq * seq, impl
  assert bench.visited_pairs("pallas_gpu", seq, None, attention.KernelOptions()) == (seq * seq, seq * seq)
