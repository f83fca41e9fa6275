"""The Pallas/Triton flash-attention kernel: window block ranges, block skipping, layouts, CUDA lowering."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmbert_jax import attention
from mmbert_jax import model as model_lib
from mmbert_jax.kernels import flash_gpu

TRITON_CALL = "__gpu$xla.gpu.triton"


def needed_blocks(seq, block, other_block, window):
  """Brute force: for each block of one axis, the blocks of the other axis holding an in-window pair."""
  i = np.arange(seq)
  near = np.abs(i[:, None] - i[None, :]) <= (seq if window is None else window)
  tiles = near.reshape(seq // block, block, seq // other_block, other_block).any(axis=(1, 3))
  return [set(np.flatnonzero(row)) for row in tiles]


@pytest.mark.parametrize(
  "seq,bq,bk,window",
  [
    (256, 32, 32, 40),
    (256, 64, 32, 0),
    (256, 32, 128, 64),
    (512, 128, 64, 64),
    (160, 32, 32, 500),
    (8192, 128, 128, 64),
    (1024, 128, 128, None),
  ],
)
def test_block_range_is_exactly_the_needed_blocks(seq, bq, bk, window):
  for i, needed in enumerate(needed_blocks(seq, bq, bk, window)):  # forward and dq: kv blocks of q block i
    lo, hi = flash_gpu.block_range(i, bq, bk, seq // bk, window)
    assert set(range(int(lo), int(hi))) == needed, (i, lo, hi)
  for j, needed in enumerate(needed_blocks(seq, bk, bq, window)):  # dk/dv: q blocks of kv block j
    lo, hi = flash_gpu.block_range(j, bk, bq, seq // bq, window)
    assert set(range(int(lo), int(hi))) == needed, (j, lo, hi)
  assert flash_gpu.visited_kv_blocks(seq, bq, bk, window) == sum(map(len, needed_blocks(seq, bq, bk, window)))


def test_local_layer_visits_under_five_percent_of_global_at_8192():
  local = flash_gpu.visited_kv_blocks(8192, 128, 128, 64)
  assert local <= 0.05 * flash_gpu.visited_kv_blocks(8192, 128, 128, None)


def _poisoned(seq=128, block=32, window=20):
  """Inputs whose keys/values in blocks q block 0 does not need (brute force) are NaN: only a kernel that skips
  those blocks stays finite on q block 0's rows."""
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, ct = (jax.random.normal(key, (1, seq, 2, 64), jnp.float32) for key in keys)
  needed = needed_blocks(seq, block, block, window)[0]
  assert needed == set(range(len(needed))) and len(needed) < seq // block  # a prefix: some blocks are skipped
  far = (jnp.arange(seq) >= len(needed) * block)[None, :, None, None]
  return q, k, v, ct, jnp.where(far, jnp.nan, k), jnp.where(far, jnp.nan, v)


BLOCKS = flash_gpu.BlockSizes(32, 32)


@pytest.mark.slow
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
  dk_ref, dv_ref = jax.grad(lambda k, v: jnp.sum(attention.xla_attention(q, k, v, seg, 20) * ct), argnums=(0, 1))(k, v)
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


@pytest.mark.slow
def test_bnsd_layout_and_no_segments():
  keys = jax.random.split(jax.random.key(1), 3)
  q, k, v = (jax.random.normal(key, (2, 128, 2, 64), jnp.float32) for key in keys)
  ones = jnp.ones((2, 128), jnp.int32)
  blocks = flash_gpu.BlockSizes(64, 32, block_q_dkv=32, block_kv_dkv=64)
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)
  kernel = lambda *a: flash_gpu.flash_attention(*a, window=24, block_sizes=blocks, layout="bnsd", interpret=True)
  out, grads = jax.value_and_grad(lambda *a: jnp.sum(jnp.sin(kernel(*a))), argnums=(0, 1, 2))(
    *map(heads_first, (q, k, v))
  )
  ref, ref_grads = jax.value_and_grad(
    lambda *a: jnp.sum(jnp.sin(attention.xla_attention(*a, ones, 24))), argnums=(0, 1, 2)
  )(q, k, v)
  np.testing.assert_allclose(out, ref, rtol=1e-5)
  np.testing.assert_allclose(
    heads_first(kernel(*map(heads_first, (q, k, v)))), attention.xla_attention(q, k, v, ones, 24), atol=1e-5
  )
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(heads_first(g), r, atol=1e-5)


def test_bfloat16_inputs():
  """bf16 q/k/v (the training dtype): float32 accumulation keeps the error at bf16 rounding level."""
  keys = jax.random.split(jax.random.key(2), 3)
  q, k, v = (jax.random.normal(key, (1, 128, 2, 64), jnp.float32) for key in keys)
  seg = jnp.asarray(np.repeat([1, 2], 64)[None], jnp.int32)
  out = flash_gpu.flash_attention(
    *(x.astype(jnp.bfloat16) for x in (q, k, v)),
    seg,
    window=32,
    block_sizes=flash_gpu.BlockSizes(32, 32),
    interpret=True,
  )
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), attention.xla_attention(q, k, v, seg, 32), atol=3e-2)


@pytest.mark.parametrize(
  "seq,blocks,message",
  [
    (96, flash_gpu.BlockSizes(128, 128), "block_q=96 .*must be a power of two >= 16 for Triton"),
    (384, flash_gpu.BlockSizes(192, 128), "block_q=192 .*must be a power of two >= 16"),
    (400, flash_gpu.BlockSizes(16, 200), "block_kv=200 .*must be a power of two >= 16"),
    (256, flash_gpu.BlockSizes(128, 128, block_q_dkv=8), "block_q_dkv=8 .*must be a power of two >= 16"),
  ],
)
def test_triton_tiles_are_checked_before_lowering(seq, blocks, message):
  """Tiles that divide S but that Triton cannot lower fail up front with one line; interpret mode accepts them."""
  x = jnp.zeros((1, seq, 1, 64), jnp.float32)
  with pytest.raises(ValueError, match=message) as error:
    flash_gpu.flash_attention(x, x, x, block_sizes=blocks)
  assert "\n" not in str(error.value)
  blocks.for_seq_len(seq, interpret=True)


def test_local_kv_tile_visits_fewer_keys():
  """The model's local-layer kv tile (64) reads fewer keys per q block than the global tile (128) at ±64."""
  cfg = model_lib.ModelConfig()
  local = attention.kernel_options(cfg, "pallas_gpu", cfg.window)
  glob = attention.kernel_options(cfg, "pallas_gpu", None)
  assert (local.block_kv, glob.block_kv) == (64, 128)
  keys = lambda bk: flash_gpu.visited_kv_blocks(8192, cfg.attention_block_q, bk, cfg.window) * bk
  assert keys(local.block_kv) < 0.7 * keys(glob.block_kv)  # 256 instead of 384 keys away from the edges
  assert attention.kernel_options(cfg, "splash", cfg.window).block_kv == 128  # splash tiles stay 128-lane


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
      jax.jit(fn), platforms=["cuda"], disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
    )(x, x, x, seg)
    text = exported.mlir_module()
    assert exported.platforms == ("cuda",)
    assert text.count(f"@{TRITON_CALL}") == len(kernels)
    for name in kernels:
      assert f'name = "{name}"' in text


# --------------------------------------------------------------------------------------------------------------
# The model and the real train step, built for CUDA on this CPU host (ModelConfig.attention_platform)
# --------------------------------------------------------------------------------------------------------------

KERNEL_NAMES = ("flash_fwd", "flash_bwd_dq", "flash_bwd_dkv")


def export_for_cuda(fn, *args):
  exported = jax.export.export(
    fn, platforms=["cuda"], disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
  )(*args)
  assert exported.platforms == ("cuda",)
  text = exported.mlir_module()
  counts = {name: text.count(f'name = "{name}"') for name in KERNEL_NAMES}
  assert text.count(f"@{TRITON_CALL}") == sum(counts.values())
  return exported, counts


def cuda_model_config(**kw):
  return model_lib.ModelConfig(
    vocab_size=1024,
    hidden_size=128,
    num_layers=3,
    num_heads=2,
    intermediate_size=128,
    local_window=128,
    max_position_embeddings=512,
    dtype="bfloat16",
    attention_impl="auto",
    attention_platform="cuda",
    **kw,
  )


@pytest.mark.parametrize("remat,forward_calls", [("none", 3), ("full", 6), ("attention", 3), ("dots", 3)])
def test_model_forward_backward_lowers_for_cuda(remat, forward_calls):
  """3 layers (one global, two ±64 local): one forward and two backward kernels per layer; a remat policy that
  does not keep the kernels' named residuals runs the forward kernel again in the backward pass."""
  from flax import nnx

  cfg = cuda_model_config(remat=remat)
  abstract = nnx.eval_shape(lambda: model_lib.MaskedLM(cfg, rngs=nnx.Rngs(0)))
  assert [layer.attn.impl for layer in abstract.layers] == ["pallas_gpu"] * 3  # "auto" on a CUDA target
  graphdef, params = nnx.split(abstract, nnx.Param)
  ids = jax.ShapeDtypeStruct((2, 256), jnp.int32)
  loss = lambda params, ids, seg: nnx.merge(graphdef, params)(ids, seg).astype(jnp.float32).mean()
  _, counts = export_for_cuda(jax.jit(jax.grad(loss)), params, ids, ids)
  assert counts == {"flash_fwd": forward_calls, "flash_bwd_dq": 3, "flash_bwd_dkv": 3}


def test_real_train_step_lowers_for_cuda_on_four_devices():
  """The training program's step (scan over micro-batches, optimizer update) with FSDP × tensor sharding over 4 devices:
  the kernels run in shard_map and lower to Triton, once per layer and pass in the scanned micro-batch body."""
  from helpers import load_config

  from mmbert_jax import sharding, train

  c = load_config("base")
  c.model_preset = "tiny"  # 4 layers, 4 heads of 16
  c.model.dtype = "bfloat16"
  c.data.seq_len = 256
  c.batch_size, c.micro_batch_size = 8, 4  # two micro-batches of 4 rows
  mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, jax.devices()[:4])
  cfg = train.model_config(c).replace(attention_platform="cuda")
  program = train.build_program(c, mesh, num_languages=4, cfg=cfg)
  with jax.set_mesh(mesh):
    exported, counts = export_for_cuda(
      program.step,
      program.abstract_params,
      program.abstract_opt_state,
      program.abstract_batch(),
      jax.ShapeDtypeStruct((), jnp.float32),
      jax.ShapeDtypeStruct((), jnp.int32),
    )
  assert counts == {name: cfg.num_layers for name in KERNEL_NAMES}
  assert exported.nr_devices == 4
  text = exported.mlir_module()
  assert "shard_map" in text
  # FSDP × tensor: the embedding table [V, H] arrives split over the 4 devices.
  assert 'tensor<1024x64xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"tensor"}, {"fsdp"}]>' in text
