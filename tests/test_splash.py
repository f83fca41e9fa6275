"""Splash attention: block sparsity, tile checks, and an ahead-of-time TPU compile of the whole model."""
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mmbert_jax import model as model_lib
from mmbert_jax.kernels import splash


def needed_block_count(seq, block_q, block_kv, window):
  i = np.arange(seq)
  near = np.abs(i[:, None] - i[None, :]) <= (seq if window is None else window)
  return int(near.reshape(seq // block_q, block_q, seq // block_kv, block_kv).any(axis=(1, 3)).sum())


@pytest.mark.parametrize("seq,bq,bkv,window", [(1024, 128, 128, 64), (1024, 128, 128, None), (2048, 256, 128, 64),
                                               (1024, 128, 256, 300)])
def test_splash_visits_only_blocks_inside_the_window(seq, bq, bkv, window):
  assert splash.visited_kv_blocks(seq, bq, bkv, window) == needed_block_count(seq, bq, bkv, window)


@pytest.mark.parametrize("seq,bq,bkv,message", [
    (256, 64, 128, "block_q=64 .* must be a multiple of 128"),
    (384, 256, 128, "block_q=256 does not divide the sequence length 384"),
    (384, 128, 256, "block_kv=256 does not divide the sequence length 384"),
])
def test_block_sizes_are_checked(seq, bq, bkv, message):
  with pytest.raises(ValueError, match=message):
    splash.block_sizes(seq, bq, bkv)


RULES = (("vocab", None), ("embed", "fsdp"), ("heads", "tensor"), ("head_dim", None), ("mlp", "tensor"),
         ("norm", None))


def test_model_forward_backward_compiles_for_tpu():
  """AOT compile of grad(mean logits) for a v5e 2x2 slice: auto picks splash, which runs in shard_map."""
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (`pip install libtpu`); it is needed to compile for a TPU topology")
  # Compiling needs no TPU; without this, libtpu's single-process lockfile fails concurrent test runs.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  topology = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu")
  mesh = Mesh(np.array(topology.devices).reshape(2, 1, 2), ("data", "fsdp", "tensor"),
              axis_types=(AxisType.Auto,) * 3)
  cfg = model_lib.ModelConfig(vocab_size=1024, hidden_size=256, num_layers=2, num_heads=4, intermediate_size=256,
                              local_window=128, global_every_n=2, dtype="bfloat16", attention_impl="auto")
  batch, seq = 4, 512
  with jax.set_mesh(mesh), nnx.logical_axis_rules(RULES):
    abstract = nnx.eval_shape(lambda: model_lib.MaskedLM(cfg, rngs=nnx.Rngs(0)))
    assert [layer.attn.impl for layer in abstract.layers] == ["splash", "splash"]
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)

    def loss(params, rest, ids, segment_ids):
      return nnx.merge(graphdef, params, rest)(ids, segment_ids).mean()

    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=NamedSharding(mesh, P(("data", "fsdp"))))
    lowered = jax.jit(jax.grad(loss)).lower(params, rest, ids, ids)
    compiled = lowered.compile()
  assert "tpu_custom_call" in lowered.as_text()
  assert compiled.memory_analysis().argument_size_in_bytes > 0
  grads = jax.tree.leaves(compiled.output_shardings)
  assert len(grads) == len(jax.tree.leaves(params))
