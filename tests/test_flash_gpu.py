"""The Pallas/Triton flash-attention kernel: window block ranges, block skipping, layouts, CUDA lowering."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmbert_jax import attention
from mmbert_jax.kernels import flash_gpu

TRITON_CALL = "__gpu$xla.gpu.triton"


def needed_blocks(seq, block, other_block, window):
  """Brute force: for each block of one axis, the blocks of the other axis holding an in-window pair."""
  i = np.arange(seq)
  near = np.abs(i[:, None] - i[None, :]) <= (seq if window is None else window)
  tiles = near.reshape(seq // block, block, seq // other_block, other_block).any(axis=(1, 3))
  return [set(np.flatnonzero(row)) for row in tiles]


@pytest.mark.parametrize("seq,bq,bk,window", [
    (256, 32, 32, 40), (256, 64, 32, 0), (256, 32, 128, 64), (512, 128, 64, 64), (160, 32, 32, 500),
    (8192, 128, 128, 64), (1024, 128, 128, None)])
def test_block_range_is_exactly_the_needed_blocks(seq, bq, bk, window):
  for i, needed in enumerate(needed_blocks(seq, bq, bk, window)):           # forward and dq: kv blocks of q block i
    lo, hi = flash_gpu.block_range(i, bq, bk, seq // bk, window)
    assert set(range(int(lo), int(hi))) == needed, (i, lo, hi)
  for j, needed in enumerate(needed_blocks(seq, bk, bq, window)):           # dk/dv: q blocks of kv block j
    lo, hi = flash_gpu.block_range(j, bk, bq, seq // bq, window)
    assert set(range(int(lo), int(hi))) == needed, (j, lo, hi)
  assert flash_gpu.visited_kv_blocks(seq, bq, bk, window) == sum(map(len, needed_blocks(seq, bq, bk, window)))


def test_local_layer_visits_under_five_percent_of_global_at_8192():
  local = flash_gpu.visited_kv_blocks(8192, 128, 128, 64)
  assert local <= 0.05 * flash_gpu.visited_kv_blocks(8192, 128, 128, None)


def _poisoned(seq=128, block=32, window=20):
  """Inputs whose keys/values beyond q block 0's kv range are NaN: only a kernel that skips them stays finite."""
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, ct = (jax.random.normal(key, (1, seq, 2, 64), jnp.float32) for key in keys)
  _, hi = flash_gpu.block_range(0, block, block, seq // block, window)
  far = (jnp.arange(seq) >= int(hi) * block)[None, :, None, None]
  return q, k, v, ct, jnp.where(far, jnp.nan, k), jnp.where(far, jnp.nan, v)


BLOCKS = flash_gpu.BlockSizes(32, 32)


def test_out_of_window_blocks_are_never_read():
  q, k, v, ct, k_bad, v_bad = _poisoned(window=20)
  seg = jnp.ones(q.shape[:2], jnp.int32)
  run = lambda q, k, v: flash_gpu.flash_attention(q, k, v, seg, window=20, block_sizes=BLOCKS, interpret=True)
  out = run(q, k_bad, v_bad)[:, :32]
  np.testing.assert_allclose(out, attention.xla_attention(q, k, v, seg, 20)[:, :32], atol=1e-5)
  # Backward: dq of q block 0 reads the same kv range (cotangent only on those rows).
  ct = ct.at[:, 32:].set(0)
  dq = jax.grad(lambda q: jnp.sum(run(q, k_bad, v_bad) * ct))(q)
  dq_ref = jax.grad(lambda q: jnp.sum(attention.xla_attention(q, k, v, seg, 20) * ct))(q)
  np.testing.assert_allclose(dq[:, :32], dq_ref[:, :32], atol=1e-5)
  # dk/dv of kv block 0 read the mirrored q range: poison the queries and output cotangents beyond it instead.
  q_bad, ct_bad = (jnp.where(jnp.isnan(k_bad), jnp.nan, x) for x in (q, ct))
  dk, dv = jax.grad(lambda k, v: jnp.sum(run(q_bad, k, v) * ct_bad), argnums=(0, 1))(k, v)
  dk_ref, dv_ref = jax.grad(lambda k, v: jnp.sum(attention.xla_attention(q, k, v, seg, 20) * ct),
                            argnums=(0, 1))(k, v)
  np.testing.assert_allclose(dk[:, :32], dk_ref[:, :32], atol=1e-5)
  np.testing.assert_allclose(dv[:, :32], dv_ref[:, :32], atol=1e-5)


def test_poison_reaches_a_kernel_that_reads_every_block():
  """Control for the test above: with a window wider than S the same rows do turn NaN."""
  q, k, v, ct, k_bad, v_bad = _poisoned(window=20)
  run = lambda q, k, v: flash_gpu.flash_attention(q, k, v, window=10_000, block_sizes=BLOCKS, interpret=True)
  assert np.isnan(np.asarray(run(q, k_bad, v_bad)[:, :32])).all()
  q_bad, ct_bad = (jnp.where(jnp.isnan(k_bad), jnp.nan, x) for x in (q, ct))
  dk, dv = jax.grad(lambda k, v: jnp.sum(run(q_bad, k, v) * ct_bad), argnums=(0, 1))(k, v)
  assert np.isnan(np.asarray(dk[:, :32])).all() and np.isnan(np.asarray(dv[:, :32])).all()


def test_bnsd_layout_and_no_segments():
  keys = jax.random.split(jax.random.key(1), 3)
  q, k, v = (jax.random.normal(key, (2, 128, 2, 64), jnp.float32) for key in keys)
  ones = jnp.ones((2, 128), jnp.int32)
  blocks = flash_gpu.BlockSizes(64, 32, block_q_dkv=32, block_kv_dkv=64)
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)
  kernel = lambda *a: flash_gpu.flash_attention(*a, window=24, block_sizes=blocks, layout="bnsd", interpret=True)
  out, grads = jax.value_and_grad(lambda *a: jnp.sum(jnp.sin(kernel(*a))), argnums=(0, 1, 2))(
      *map(heads_first, (q, k, v)))
  ref, ref_grads = jax.value_and_grad(lambda *a: jnp.sum(jnp.sin(attention.xla_attention(*a, ones, 24))),
                                      argnums=(0, 1, 2))(q, k, v)
  np.testing.assert_allclose(out, ref, rtol=1e-5)
  np.testing.assert_allclose(heads_first(kernel(*map(heads_first, (q, k, v)))),
                             attention.xla_attention(q, k, v, ones, 24), atol=1e-5)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(heads_first(g), r, atol=1e-5)


def test_bfloat16_inputs():
  """bf16 q/k/v (the training dtype): float32 accumulation keeps the error at bf16 rounding level."""
  keys = jax.random.split(jax.random.key(2), 3)
  q, k, v = (jax.random.normal(key, (1, 128, 2, 64), jnp.float32) for key in keys)
  seg = jnp.asarray(np.repeat([1, 2], 64)[None], jnp.int32)
  out = flash_gpu.flash_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), seg, window=32,
                                  block_sizes=flash_gpu.BlockSizes(32, 32), interpret=True)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), attention.xla_attention(q, k, v, seg, 32), atol=3e-2)


def test_bad_arguments_say_what_is_wrong():
  x = jnp.zeros((1, 128, 2, 48))
  with pytest.raises(ValueError, match="head_dim 48 must be a power of two"):
    flash_gpu.flash_attention(x, x, x, interpret=True)
  y = jnp.zeros((1, 128, 2, 64))
  with pytest.raises(ValueError, match="layout 'sbnd' is not one of"):
    flash_gpu.flash_attention(y, y, y, layout="sbnd", interpret=True)
  with pytest.raises(ValueError, match="block_kv=96 does not divide the sequence length 128"):
    flash_gpu.flash_attention(y, y, y, block_sizes=flash_gpu.BlockSizes(64, 96), interpret=True)
  with pytest.raises(ValueError, match="segment_ids shape"):
    flash_gpu.flash_attention(y, y, y, jnp.ones((1, 64), jnp.int32), interpret=True)


def test_lowers_to_triton_for_cuda_forward_and_backward():
  """jax.export for CUDA on this CPU host: the kernels lower through Pallas → Triton into custom calls."""
  x = jax.ShapeDtypeStruct((2, 256, 6, 64), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((2, 256), jnp.int32)
  blocks = flash_gpu.BlockSizes(64, 64)
  fwd = lambda q, k, v, s: flash_gpu.flash_attention(q, k, v, s, window=64, block_sizes=blocks)
  bwd = lambda q, k, v, s: jax.grad(lambda *a: jnp.sum(fwd(*a, s).astype(jnp.float32)), argnums=(0, 1, 2))(q, k, v)
  for fn, kernels in ((fwd, ["flash_fwd"]), (bwd, ["flash_fwd", "flash_bwd_dq", "flash_bwd_dkv"])):
    exported = jax.export.export(
        jax.jit(fn), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(x, x, x, seg)
    text = exported.mlir_module()
    assert exported.platforms == ("cuda",)
    assert text.count(f"@{TRITON_CALL}") == len(kernels)
    for name in kernels:
      assert f'name = "{name}"' in text
