"""Splash attention: block sparsity, tile checks, and an ahead-of-time TPU compile of the whole model."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mmbert_jax import attention
from mmbert_jax import model as model_lib
from mmbert_jax.kernels import splash


def needed_blocks(seq, block_q, block_kv, window):
  """Brute force: [q blocks, kv blocks], True where the tile holds an in-window (query, key) pair."""
  i = np.arange(seq)
  near = np.abs(i[:, None] - i[None, :]) <= (seq if window is None else window)
  return near.reshape(seq // block_q, block_q, seq // block_kv, block_kv).any(axis=(1, 3))


def needed_block_count(seq, block_q, block_kv, window):
  return int(needed_blocks(seq, block_q, block_kv, window).sum())


@pytest.mark.parametrize(
  "seq,bq,bkv,window", [(1024, 128, 128, 64), (1024, 128, 128, None), (2048, 256, 128, 64), (1024, 128, 256, 300)]
)
def test_splash_visits_only_blocks_inside_the_window(seq, bq, bkv, window):
  assert splash.visited_kv_blocks(seq, bq, bkv, window) == needed_block_count(seq, bq, bkv, window)


def visited_tiles(info, shape):
  """[q blocks, kv blocks] tiles a splash kernel computes for head 0: its grid keeps only the non-zero tiles of
  each q block row (`block_mask`), `data_next` says which kv block each one is."""
  visited = np.zeros(shape, bool)
  for i, j in zip(*np.nonzero(np.asarray(info.block_mask)[0])):
    visited[i, np.asarray(info.data_next)[0, i, j]] = True
  return visited


@pytest.mark.slow
def test_skipped_blocks_are_never_read():
  """S = 512, ±64, tiles of 128: the kernel's own block mask skips exactly the tiles brute force finds empty, and
  NaN in the keys/values of those tiles (for q block 0) or in the queries/cotangents of those tiles (for kv block 0)
  does not reach q block 0's outputs and dq, or kv block 0's dk and dv."""
  seq, window, block = 512, 64, 128
  kernel = splash.make_kernel(seq, 2, window, block, block, interpret=True)
  needed = needed_blocks(seq, block, block, window)
  assert not needed.all()
  np.testing.assert_array_equal(visited_tiles(kernel.fwd_mask_info, needed.shape), needed)
  np.testing.assert_array_equal(visited_tiles(kernel.dq_mask_info, needed.shape), needed)

  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, ct = (jax.random.normal(key, (1, seq, 2, 64), jnp.float32) for key in keys)
  seg = jnp.asarray(np.repeat([1, 2], seq // 2)[None], jnp.int32)
  far = (jnp.arange(seq) >= needed[0].sum() * block)[None, :, None, None]  # tiles block 0 does not need
  poison = lambda x: jnp.where(far, jnp.nan, x)
  run = lambda q, k, v: splash.apply(kernel, q, k, v, seg)
  ref = lambda q, k, v: attention.xla_attention(q, k, v, seg, window)
  near = slice(0, block)
  ct0 = jnp.where(jnp.arange(seq)[None, :, None, None] < block, ct, 0)

  def loss_q(q):
    out = run(q, poison(k), poison(v))
    return jnp.sum(out * ct0), out

  (_, out), dq = jax.jit(jax.value_and_grad(loss_q, has_aux=True))(q)
  dq_ref = jax.grad(lambda q: jnp.sum(ref(q, k, v) * ct0))(q)
  np.testing.assert_allclose(out[:, near], ref(q, k, v)[:, near], atol=1e-5)
  np.testing.assert_allclose(dq[:, near], dq_ref[:, near], atol=1e-5)
  dk, dv = jax.jit(jax.grad(lambda k, v: jnp.sum(run(poison(q), k, v) * poison(ct)), argnums=(0, 1)))(k, v)
  dk_ref, dv_ref = jax.grad(lambda k, v: jnp.sum(ref(q, k, v) * ct), argnums=(0, 1))(k, v)
  np.testing.assert_allclose(dk[:, near], dk_ref[:, near], atol=1e-5)
  np.testing.assert_allclose(dv[:, near], dv_ref[:, near], atol=1e-5)
  # Control: a kernel that reads every tile turns the same rows NaN.
  dense = splash.make_kernel(seq, 2, None, block, block, interpret=True)
  out = jax.jit(lambda *a: splash.apply(dense, *a, seg))(q, poison(k), poison(v))
  assert np.isnan(np.asarray(out[:, near])).all()


@pytest.mark.parametrize(
  "seq,bq,bkv,message",
  [
    (256, 64, 128, "block_q=64 .* must be a multiple of 128"),
    (384, 256, 128, "block_q=256 does not divide the sequence length 384"),
    (384, 128, 256, "block_kv=256 does not divide the sequence length 384"),
  ],
)
def test_block_sizes_are_checked(seq, bq, bkv, message):
  with pytest.raises(ValueError, match=message):
    splash.block_sizes(seq, bq, bkv)


RULES = (("vocab", None), ("embed", "fsdp"), ("heads", "tensor"), ("head_dim", None), ("mlp", "tensor"), ("norm", None))


def lower_for_tpu(**kw):
  """grad(mean logits) of a 2-layer model (one global, one ±64 local) lowered for a v5e 2x2 slice."""
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (`pip install libtpu`); it is needed to compile for a TPU topology")
  # Compiling needs no TPU; without this, libtpu's single-process lockfile fails concurrent test runs.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies

  topology = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu")
  mesh = Mesh(np.array(topology.devices).reshape(2, 1, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  cfg = model_lib.ModelConfig(
    vocab_size=1024,
    hidden_size=256,
    num_layers=2,
    num_heads=4,
    intermediate_size=256,
    local_window=128,
    global_every_n=2,
    dtype="bfloat16",
    attention_impl="auto",
    **kw,
  )
  batch, seq = 4, 512
  with jax.set_mesh(mesh), nnx.logical_axis_rules(RULES):
    abstract = nnx.eval_shape(lambda: model_lib.MaskedLM(cfg, rngs=nnx.Rngs(0)))
    assert [layer.attn.impl for layer in abstract.layers] == ["splash", "splash"]
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)

    def loss(params, rest, ids, segment_ids):
      return nnx.merge(graphdef, params, rest)(ids, segment_ids).mean()

    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=NamedSharding(mesh, P(("data", "fsdp"))))
    return jax.jit(jax.grad(loss)).lower(params, rest, ids, ids), params


@pytest.mark.slow
def test_model_forward_backward_compiles_for_tpu():
  """AOT compile for a v5e 2x2 slice: auto picks splash, which runs in shard_map."""
  lowered, params = lower_for_tpu()
  compiled = lowered.compile()
  assert "tpu_custom_call" in lowered.as_text()
  assert compiled.memory_analysis().argument_size_in_bytes > 0
  grads = jax.tree.leaves(compiled.output_shardings)
  assert len(grads) == len(jax.tree.leaves(params))


def test_remat_keeps_splash_residuals():
  """Per layer one forward and two backward splash kernels; remat="full" runs the forward again, "attention"
  keeps its named residuals. The kernels are built inside the remat trace first: later traces must not see its
  tracers."""
  for remat, calls in (("full", 8), ("attention", 6), ("full", 8)):
    lowered, _ = lower_for_tpu(remat=remat)
    assert lowered.as_text().count("tpu_custom_call") == calls, remat
