"""The NNX encoder: shapes, parameter counts, sparse head, padding safety, init statistics."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import checkpoint_name, print_saved_residuals

from mmbert_jax import MaskedLM, get_config
from mmbert_jax import attention as attention_lib
from mmbert_jax import model as model_lib


def _count_formula(v, h, layers, i):
  # docs/ARCHITECTURE.md §7: embedding, encoder linears, head dense + decoder bias + head norm, remaining norms.
  return v * h + layers * (4 * h * h + 3 * h * i) + (h * h + v + h) + (2 * layers + 1) * h


@pytest.mark.parametrize("preset,expected", [("mmbert-small", 140_897_536), ("mmbert-base", 307_786_240)])
def test_preset_parameter_counts(preset, expected):
  cfg = get_config(preset)
  assert model_lib.count_params(cfg) == expected
  assert _count_formula(cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.intermediate_size) == expected


def test_positions_restart_per_document():
  seg = np.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
  want = np.array([[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7]])
  np.testing.assert_array_equal(model_lib.positions_from_segments(jnp.asarray(seg)), want)


def test_rope_matches_complex_rotation():
  # Rotate-half RoPE equals multiplying (x[:d/2] + i·x[d/2:]) by e^{i·pos·freq}.
  x = np.random.default_rng(0).normal(size=(1, 5, 2, 8)).astype(np.float32)
  pos = np.arange(5)[None]
  got = np.asarray(model_lib.rope(jnp.asarray(x), jnp.asarray(pos), 10_000.0))
  freq = 1.0 / 10_000.0 ** (np.arange(0, 8, 2) / 8)
  z = (x[..., :4] + 1j * x[..., 4:]) * np.exp(1j * pos[..., None, None] * freq)
  np.testing.assert_allclose(got, np.concatenate([z.real, z.imag], -1), atol=1e-5)


@pytest.mark.slow
def test_sparse_head_equals_dense_at_masked_positions():
  cfg = get_config("tiny")
  model = MaskedLM(cfg, rngs=nnx.Rngs(0))
  ids = jax.random.randint(jax.random.key(1), (2, 48), 5, cfg.vocab_size)
  seg = jnp.array([[1] * 20 + [2] * 20 + [0] * 8, [1] * 48])
  idx = jnp.array([[0, 7, 19, 20, 39, 47], [1, 2, 3, 30, 31, 46]])
  dense = model(ids, seg)
  sparse = model(ids, seg, masked_positions=idx)
  np.testing.assert_allclose(sparse, jnp.take_along_axis(dense, idx[..., None], axis=1), atol=1e-6)


@pytest.mark.slow
def test_gradients_finite_with_fully_padded_rows():
  cfg = get_config("tiny", attn_out_dropout=0.1)
  model = MaskedLM(cfg, rngs=nnx.Rngs(0))
  ids = jax.random.randint(jax.random.key(1), (3, 40), 5, cfg.vocab_size)
  seg = jnp.stack([jnp.ones(40, jnp.int32), jnp.zeros(40, jnp.int32), jnp.array([1] * 10 + [0] * 30)])
  idx = jnp.tile(jnp.arange(0, 40, 5)[None], (3, 1))
  weights = (jnp.take_along_axis(seg, idx, axis=1) > 0).astype(jnp.float32)

  def loss_fn(m):
    logits = m(ids, seg, masked_positions=idx)
    labels = jnp.take_along_axis(ids, idx, axis=1)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1)[..., 0]
    return (ce * weights).sum() / weights.sum()

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  assert np.isfinite(loss)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  # A padding row's tokens must not influence a real row: changing them leaves real logits unchanged.
  model.eval()
  a = model(ids, seg)
  b = model(ids.at[1].set(7).at[2, 10:].set(9), seg)
  np.testing.assert_allclose(a[0], b[0], atol=1e-6)
  np.testing.assert_allclose(a[2, :10], b[2, :10], atol=1e-6)


def test_init_statistics():
  cfg = get_config("tiny", vocab_size=4096, hidden_size=128, intermediate_size=256)
  model = MaskedLM(cfg, rngs=nnx.Rngs(0))
  trunc_std = 0.8796  # std of a normal truncated at ±2σ, in units of σ
  emb = np.asarray(model.embedding[...])
  assert abs(emb.std() - 0.02 * trunc_std) < 5e-4 and np.abs(emb).max() <= 0.04
  wo = np.asarray(model.layers[1].attn.wo[...])
  out_std = 0.02 / math.sqrt(2 * cfg.num_layers)
  assert abs(wo.std() - out_std * trunc_std) < 0.05 * out_std and np.abs(wo).max() <= 2 * out_std
  assert model.layers[0].attn_norm is None and model.layers[1].attn_norm is not None
  assert np.all(np.asarray(model.decoder_bias[...]) == 0)


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params():
  cfg = get_config("tiny", dtype="bfloat16")
  model = MaskedLM(cfg, rngs=nnx.Rngs(0))
  ids = jnp.ones((1, 16), jnp.int32) * 9
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert model.encode(ids).dtype == jnp.bfloat16
  full = MaskedLM(get_config("tiny"), rngs=nnx.Rngs(0))(ids)
  np.testing.assert_allclose(model(ids), full, atol=0.1)


def test_embedding_gradient_of_a_frequent_token_is_summed_in_float32():
  """bfloat16 compute, one token 4,093 times in 4,096 (a pad or separator id is that frequent in a micro-batch):
  its embedding row's gradient of Σ embeddings is 4,093 in every component. Summed in bfloat16 it stops at 256."""
  model = MaskedLM(get_config("tiny", dtype="bfloat16"), rngs=nnx.Rngs(0))
  ids = jnp.full((8, 512), 7, jnp.int32).at[0, :3].set(9)
  grads = nnx.grad(lambda m: m.embed(ids).astype(jnp.float32).sum())(model)
  assert model.embed(ids).dtype == jnp.bfloat16
  want = np.zeros((1024, 64), np.float32)
  want[7], want[9] = 8 * 512 - 3, 3
  np.testing.assert_array_equal(grads.embedding[...], want)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_take_positions_as_a_one_hot_product_equals_indexing(dtype):
  """The TPU form of the masked slots' gather (a one-hot product) and the gather against numpy indexing: the same
  rows exactly, and gradients that add up the cotangents of a position taken more than once."""
  x = jax.random.normal(jax.random.key(0), (2, 16, 8)).astype(dtype)
  pos = jnp.array([[3, 0, 0, 15, 7, 0], [1, 1, 1, 2, 0, 14]])
  dy = jax.random.normal(jax.random.key(1), (2, 6, 8)).astype(dtype)
  rows = np.arange(2)[:, None]
  want = np.asarray(x.astype(jnp.float32))[rows, pos]
  want_dx = np.zeros((2, 16, 8), np.float32)
  np.add.at(want_dx, (rows, pos), np.asarray(dy.astype(jnp.float32)))
  for one_hot in (False, True):
    y, vjp = jax.vjp(lambda x: model_lib.take_positions(x, pos, one_hot=one_hot), x)
    (dx,) = vjp(dy)
    assert y.dtype == dx.dtype == x.dtype, one_hot
    np.testing.assert_array_equal(np.asarray(y.astype(jnp.float32)), want, err_msg=f"one_hot={one_hot}")
    # three cotangents summed: exact in float32 up to the order of the additions, one rounding in bfloat16
    tol = 1e-6 if dtype == "float32" else 2**-8
    np.testing.assert_allclose(np.asarray(dx.astype(jnp.float32)), want_dx, rtol=tol, atol=tol, err_msg=f"{one_hot}")


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_same_gradients(remat):
  ids = jax.random.randint(jax.random.key(1), (2, 32), 5, 1024)
  grads = []
  for policy in ("none", remat):
    model = MaskedLM(get_config("tiny", remat=policy), rngs=nnx.Rngs(0))
    grads.append(nnx.grad(lambda m: m(ids).mean())(model))
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("remat", sorted(model_lib.REMAT_POLICIES))
def test_scanned_layers_equal_unrolled(remat):
  """The MLM loss and its gradients in float32 with dropout, for every remat policy: unrolled layers, the scan
  stacking the per-layer parameters itself, and the scan given them stacked (the train step's way, whose gradient
  `unstack_layers` returns per layer) agree to 1e-6."""
  # 8 layers, global every 3: layer 0 alone, two scanned groups of (local, local, global), one remaining layer.
  cfg = get_config("tiny", num_layers=8, attn_out_dropout=0.1, remat=remat)
  rng = np.random.default_rng(1)
  ids = jnp.asarray(rng.integers(5, cfg.vocab_size, (2, 48)), jnp.int32)
  seg = jnp.array([[1] * 20 + [2] * 20 + [0] * 8, [1] * 48])
  masked = jnp.asarray(np.stack([rng.choice(40, 12, replace=False) for _ in range(2)]), jnp.int32)
  labels = jnp.asarray(rng.integers(5, cfg.vocab_size, (2, 12)), jnp.int32)

  def loss(model, stacked=None):
    # Training mode: dropout draws the same mask for each layer either way.
    nll, _ = model.masked_lm_loss(ids, seg, None, masked, labels, rngs=nnx.Rngs(dropout=3), stacked=stacked)
    return nll.mean()

  unrolled = MaskedLM(cfg, rngs=nnx.Rngs(0))
  scanned = MaskedLM(cfg.replace(scan_layers=True), rngs=nnx.Rngs(0))
  want_loss, want = nnx.value_and_grad(loss)(unrolled)
  want = nnx.to_pure_dict(want)
  got_loss, got = nnx.value_and_grad(loss)(scanned)
  got = nnx.to_pure_dict(got)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  assert got.keys() == want.keys() and len(got["layers"]) == 8  # the per-layer layout is unchanged
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(b, a, atol=1e-6)

  assert model_lib.scanned_layer_indices(cfg) == [[1, 4], [2, 5], [3, 6]]
  layers = nnx.to_pure_dict(nnx.state(scanned))["layers"]
  stacked = model_lib.stack_layers(cfg, layers)
  assert stacked[0]["attn"]["wqkv"].shape == (2, *layers[1]["attn"]["wqkv"].shape)
  graph, state = nnx.split(scanned)
  given_loss, given = jax.value_and_grad(lambda s: loss(nnx.merge(graph, state, copy=True), s))(stacked)
  np.testing.assert_allclose(given_loss, want_loss, rtol=1e-6)
  given = model_lib.unstack_layers(cfg, given)
  assert sorted(given) == [1, 2, 3, 4, 5, 6]
  for i in given:
    for a, b in zip(jax.tree.leaves(want["layers"][i]), jax.tree.leaves(given[i])):
      np.testing.assert_allclose(b, a, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_layer_norm_backward_equals_autodiff_of_its_formula(dtype):
  """The written-out LayerNorm backward against autodiff of the plain formula (float32 statistics), input and
  scale gradients, on rows with a large mean (where a missing centring term shows)."""
  eps = 1e-5
  x = (jax.random.normal(jax.random.key(0), (3, 5, 48)) * 2 + 3).astype(dtype)
  scale = 1 + 0.1 * jax.random.normal(jax.random.key(1), (48,))
  w = jax.random.normal(jax.random.key(2), (3, 5, 48))

  def reference(x, scale):
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps) * scale).astype(x.dtype)

  def loss(norm):
    return lambda x, scale: (norm(x, scale).astype(jnp.float32) * w).sum()

  got = jax.grad(loss(lambda x, s: model_lib.layer_norm(x, s, eps)), argnums=(0, 1))(x, scale)
  want = jax.grad(loss(reference), argnums=(0, 1))(x, scale)
  np.testing.assert_array_equal(model_lib.layer_norm(x, scale, eps), reference(x, scale))
  assert got[0].dtype == x.dtype and got[1].dtype == jnp.float32
  tol = dict(rtol=1e-5, atol=1e-5) if dtype == "float32" else dict(rtol=1e-2, atol=1e-2)
  np.testing.assert_allclose(np.asarray(got[0], np.float32), np.asarray(want[0], np.float32), **tol)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  "contract, x_shape, w_shape",
  [(1, (2, 5, 24), (24, 4, 4)), (1, (2, 5, 8), (8, 4, 8)), (2, (2, 5, 3, 8), (3, 8, 16))],
  ids=["narrowing", "widening", "two_axes"],
)
def test_dense_gradients_equal_autodiff_of_tensordot(contract, x_shape, w_shape):
  """`dense` on CPU (its own backward: the weight gradient with the smaller of x and dy written out transposed)
  against autodiff of the plain tensordot: output, input and weight gradients, for a layer that narrows (xᵀ·dy
  as (dyᵀ·x)ᵀ) and one that widens (xᵀ·dy), and with two contracted axes (the attention output
  [B, S, N, D] · [N, D, H])."""
  x = jax.random.normal(jax.random.key(0), x_shape)
  w = jax.random.normal(jax.random.key(1), w_shape)
  dy = jax.random.normal(jax.random.key(2), x_shape[: len(x_shape) - contract] + w_shape[contract:])

  def loss(f):
    return lambda x, w: (f(x, w) * dy).sum()

  with jax.default_matmul_precision("highest"):
    got = jax.grad(loss(lambda x, w: model_lib.dense(x, w, contract)), argnums=(0, 1))(x, w)
    want = jax.grad(loss(lambda x, w: jnp.tensordot(x, w, contract)), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(model_lib.dense(x, w, contract), jnp.tensordot(x, w, contract), rtol=1e-6, atol=1e-6)
  for a, b, name in zip(got, want, ("x", "w")):
    assert a.shape == b.shape, name
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-5, err_msg=name)


def test_each_layer_gets_its_own_dropout_key_from_one_draw(monkeypatch):
  """Every layer gets a distinct dropout key, and deriving them costs the same program at 22 layers as at 2 (one
  draw, split; a draw per layer put 22 scalar threefry hashes into the step)."""
  cfg = get_config("tiny", num_layers=4, attn_out_dropout=0.1)
  model = MaskedLM(cfg, rngs=nnx.Rngs(0))
  seen = []
  apply_layer = model_lib._apply_layer
  monkeypatch.setattr(
    model_lib, "_apply_layer", lambda c, lyr, x, s, p, key: seen.append(key) or apply_layer(c, lyr, x, s, p, key)
  )
  model.encode(jnp.full((1, 16), 7), rngs=nnx.Rngs(dropout=3))
  expected = model_lib.layer_dropout_keys(nnx.Rngs(dropout=3), cfg.num_layers)
  data = [jax.random.key_data(k) for k in seen]
  assert len({tuple(np.asarray(d).ravel()) for d in data}) == cfg.num_layers
  np.testing.assert_array_equal(np.stack(data), jax.random.key_data(expected))

  def program_size(n):
    text = jax.jit(lambda k: model_lib.layer_dropout_keys(nnx.Rngs(dropout=k), n)).lower(jax.random.key(0)).as_text()
    return text.count("\n")

  assert program_size(22) == program_size(2)


def test_scan_policy_keeps_layer_outputs_and_attention_residuals(capsys):
  """Inside the scan every policy saves the layer outputs; "none" also the attention kernels' residuals but no
  matmul, "dots" the matmuls as well, "full" nothing else: the backward pass recomputes the rest."""

  def layer(x, w):
    h = x @ w
    a = checkpoint_name(jnp.sin(h), attention_lib.CHECKPOINT_NAME)
    return jnp.tanh(checkpoint_name(jnp.cos(a) * h, model_lib.LAYER_OUTPUT)).sum()

  def saved(remat):
    print_saved_residuals(
      jax.checkpoint(layer, policy=model_lib.scan_policy(remat)), jnp.ones((4, 4)), jnp.ones((4, 4))
    )
    lines = capsys.readouterr().out.splitlines()
    named = {n for n in (model_lib.LAYER_OUTPUT, attention_lib.CHECKPOINT_NAME) if any(f"'{n}'" in x for x in lines)}
    return named, sum("dot_general" in x for x in lines)

  both = {model_lib.LAYER_OUTPUT, attention_lib.CHECKPOINT_NAME}
  assert saved("none") == (both, 0)
  assert saved("attention") == (both, 0)
  assert saved("dots") == (both, 1)
  assert saved("full") == ({model_lib.LAYER_OUTPUT}, 0)


def test_bad_model_config_errors():
  with pytest.raises(ValueError, match="not divisible by num_heads"):
    get_config("tiny", num_heads=5)
  with pytest.raises(ValueError, match="unknown model preset"):
    get_config("huge")
  with pytest.raises(ValueError, match="remat"):
    get_config("tiny", remat="sometimes")
