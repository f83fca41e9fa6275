"""The chunked MLM cross-entropy equals the dense one (loss, hits, gradients) and holds less memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import tiny_config

from mmbert_jax import MaskedLM, get_config, mlm_loss, sharding, train

VOCAB = 1000


def _batch(seed=0, rows=3, seq=40, k=12):
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, VOCAB, (rows, seq)).astype(np.int32)
  seg = np.ones((rows, seq), np.int32)
  seg[2, 25:] = 0
  mp = np.stack([rng.choice(seq, k, replace=False) for _ in range(rows)]).astype(np.int32)
  labels = np.take_along_axis(ids, mp, 1)
  labels[0, :3] = [0, 1, VOCAB - 1]  # the first and the last vocabulary chunk
  weights = (np.take_along_axis(seg, mp, 1) > 0).astype(np.float32)
  weights[1, -2:] = 0.0  # padding slots: their labels must not count
  labels[1, -2:] = VOCAB - 2
  return ids, seg, mp, labels, weights


def _loss_and_grads(cfg, batch):
  ids, seg, mp, labels, weights = (jnp.asarray(a) for a in batch)
  model = MaskedLM(cfg, rngs=nnx.Rngs(0))
  model.decoder_bias[...] = 0.5 * jax.random.normal(jax.random.key(7), (VOCAB,))  # not a symmetric zero bias

  def loss_fn(m):
    nll, hit = m.masked_lm_loss(ids, seg, None, mp, labels)
    return (nll * weights).sum() / weights.sum(), (nll, hit)  # the train step's mean over masked slots

  (loss, (nll, hit)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  logits = model(ids, seg, masked_positions=mp)
  return float(loss), np.asarray(nll), np.asarray(hit), nnx.to_pure_dict(grads), np.asarray(logits, np.float64)


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [128, 333, VOCAB])  # 8 chunks (last one padded), uneven, a single chunk
def test_chunked_equals_dense_in_float32(chunk):
  batch = _batch()
  weights, labels = batch[4], batch[3]
  loss_d, nll_d, hit_d, grads_d, logits = _loss_and_grads(
    get_config("tiny", vocab_size=VOCAB, loss_impl="dense"), batch
  )
  loss_c, nll_c, hit_c, grads_c, _ = _loss_and_grads(
    get_config("tiny", vocab_size=VOCAB, loss_impl="chunked", loss_chunk_size=chunk), batch
  )
  # Independent reference: float64 log-softmax of the model's logits.
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  want = lse - np.take_along_axis(logits, labels[..., None], -1)[..., 0]
  np.testing.assert_allclose(nll_c, want, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(nll_c, nll_d, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(hit_c, (logits.argmax(-1) == labels).astype(np.float32))
  np.testing.assert_array_equal(hit_c, hit_d)
  np.testing.assert_allclose(loss_c, (want * weights).sum() / weights.sum(), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads_d), jax.tree.leaves(grads_c)):
    np.testing.assert_allclose(b, a, atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_chunked_equals_dense_in_bfloat16():
  batch = _batch(1)
  out = [
    _loss_and_grads(get_config("tiny", vocab_size=VOCAB, dtype="bfloat16", loss_impl=impl, loss_chunk_size=256), batch)
    for impl in ("dense", "chunked")
  ]
  (loss_d, nll_d, hit_d, grads_d, _), (loss_c, nll_c, hit_c, grads_c, _) = out
  np.testing.assert_allclose(loss_c, loss_d, rtol=1e-2)
  np.testing.assert_allclose(nll_c, nll_d, rtol=2e-2, atol=2e-2)
  assert (hit_c == hit_d).mean() > 0.9
  for a, b in zip(jax.tree.leaves(grads_d), jax.tree.leaves(grads_c)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.linalg.norm(a - b) <= 2e-2 * np.linalg.norm(a) + 1e-6


@pytest.mark.parametrize("chunk", [128, VOCAB])
def test_chunked_equals_dense_with_logits_up_to_1e3(chunk):
  """A trained decoder can put a few vocabulary rows far above or below the rest (a large bias): the chunked
  logsumexp must carry its running max across chunks, or exp overflows float32 at a logit of 89 (inf loss, NaN
  gradients). Reference: float64 log-softmax and its gradient (softmax − one-hot) from the same inputs."""
  rng = np.random.default_rng(3)
  n, h = 10, 16
  x = rng.normal(size=(n, h)).astype(np.float32)
  w = (0.5 * rng.normal(size=(VOCAB, h))).astype(np.float32)
  b = rng.normal(size=VOCAB).astype(np.float32)
  b[[3, 777]] = [1000.0, 990.0]  # the largest logits, in the first and in a later chunk
  b[[500, 999]] = -1000.0
  labels = np.array([3, 777, 500, 999, 0, 1, 2, 250, 640, 998], np.int32)
  g = rng.uniform(0.5, 1.5, n).astype(np.float32)  # per-slot loss weights, as the train step's mean applies

  logits = x.astype(np.float64) @ w.T.astype(np.float64) + b
  top = logits.max(-1, keepdims=True)
  lse = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
  want = lse - logits[np.arange(n), labels]
  d = g[:, None] * (np.exp(logits - lse[:, None]) - np.eye(VOCAB)[labels])
  want_grads = (d @ w, d.T @ x, d.sum(0))

  def run(impl):
    def weighted(x, w, b):
      nll, hit = mlm_loss.token_loss(x, w, b, jnp.asarray(labels), impl=impl, chunk_size=chunk)
      return (nll * g).sum(), (nll, hit)

    (_, (nll, hit)), grads = jax.value_and_grad(weighted, argnums=(0, 1, 2), has_aux=True)(x, w, b)
    return np.asarray(nll), np.asarray(hit), [np.asarray(a) for a in grads]

  nll_d, hit_d, grads_d = run("dense")
  nll_c, hit_c, grads_c = run("chunked")
  assert np.isfinite(nll_c).all() and all(np.isfinite(a).all() for a in grads_c)
  # float32 logits near 1e3 carry an ulp of 6e-5: the nll is exact to a few of them.
  np.testing.assert_allclose(nll_c, want, rtol=0, atol=5e-4)
  np.testing.assert_allclose(nll_c, nll_d, rtol=0, atol=5e-4)
  assert want[2] > 1900 and want[0] < 1e-3  # the labels span the whole range
  np.testing.assert_array_equal(hit_c, logits.argmax(-1) == labels)
  np.testing.assert_array_equal(hit_c, hit_d)
  for got, dense, ref in zip(grads_c, grads_d, want_grads):
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    np.testing.assert_allclose(got, dense, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_ties_keep_the_first_index_across_chunks():
  # Every logit is its bias; the largest value sits at 5 and again at 700 (another chunk): argmax is 5.
  x = jnp.zeros((2, 8))
  emb = jnp.zeros((VOCAB, 8))
  bias = jnp.zeros(VOCAB).at[5].set(3.0).at[700].set(3.0)
  labels = jnp.array([5, 700])
  for impl in mlm_loss.IMPLEMENTATIONS:
    nll, hit = mlm_loss.token_loss(x, emb, bias, labels, impl=impl, chunk_size=256)
    np.testing.assert_array_equal(hit, [1.0, 0.0])
    want = np.log(2 * np.exp(3.0) + VOCAB - 2) - 3.0
    np.testing.assert_allclose(nll, [want, want], rtol=1e-6)


def test_auto_takes_dense_for_small_logits_and_chunked_for_large_ones_per_device():
  # The float32 logits one device would hold, 4 · slots · V bytes, against AUTO_DENSE_BYTES (1 GiB).
  assert mlm_loss.resolve_impl("auto", 8 * 154, 32_768) == "dense"  # the CPU benchmark's step: 0.15 GiB
  assert mlm_loss.resolve_impl("auto", 16 * 368, 256_000) == "chunked"  # mmbert-base pre-training per chip: 5.6 GiB
  assert mlm_loss.resolve_impl("dense", 16 * 368, 256_000) == "dense"

  def chunked(rows: int) -> bool:  # traced on shapes only: nothing is allocated
    args = [((rows, 368, 64), jnp.float32), ((256_000, 64), jnp.float32), ((256_000,), jnp.float32)]
    args = [jax.ShapeDtypeStruct(*a) for a in args] + [jax.ShapeDtypeStruct((rows, 368), jnp.int32)]
    return "scan" in str(jax.make_jaxpr(lambda *a: mlm_loss.token_loss(*a, impl="auto"))(*args))

  assert chunked(16) and not chunked(2)  # 5.6 GiB, 0.70 GiB
  with jax.set_mesh(sharding.make_mesh({"fsdp": 8}, jax.devices()[:8])):
    assert not chunked(16)  # 2 rows on each device


def test_dense_gradients_equal_autodiff_of_log_softmax():
  """The dense loss's hand-written backward pass (softmax − one-hot, the bias gradient as a product) against
  jax.grad of a log-softmax written out here, with a few logits near 500 (a shifted softmax is needed)."""
  rng = np.random.default_rng(3)
  n, h = 23, 16
  x = jnp.asarray(rng.normal(size=(n, h)), jnp.float32)
  emb = jnp.asarray(rng.normal(size=(VOCAB, h)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=VOCAB), jnp.float32).at[:3].add(500.0)
  labels = jnp.asarray(rng.integers(0, VOCAB, n), jnp.int32).at[:3].set(jnp.array([0, 1, VOCAB - 1]))
  g = jnp.asarray(rng.random(n), jnp.float32)  # per-slot weights, as the train step's

  def reference(x, emb, bias):
    logits = jnp.einsum("nh,vh->nv", x, emb, precision="highest") + bias
    logp = logits - jax.scipy.special.logsumexp(logits, -1, keepdims=True)
    return -(g * jnp.take_along_axis(logp, labels[:, None], -1)[:, 0]).sum(), jnp.argmax(logits, -1) == labels

  def dense(x, emb, bias):
    with jax.default_matmul_precision("highest"):
      nll, hit = mlm_loss.token_loss(x, emb, bias, labels, impl="dense")
    return (g * nll).sum(), hit

  (want, want_hit), want_grads = jax.value_and_grad(reference, (0, 1, 2), has_aux=True)(x, emb, bias)
  (got, hit), grads = jax.value_and_grad(dense, (0, 1, 2), has_aux=True)(x, emb, bias)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_array_equal(hit, want_hit.astype(np.float32))
  for name, a, b in zip(("x", "embedding", "bias"), grads, want_grads):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5, err_msg=name)  # logits near 500: ulp 3e-5


def test_bad_loss_config_errors():
  with pytest.raises(ValueError, match="loss_impl"):
    get_config("tiny", loss_impl="sparse")
  with pytest.raises(ValueError, match="loss_chunk_size"):
    get_config("tiny", loss_chunk_size=0)


def _train_step_temporaries(loss_impl: str, vocab: int) -> int:
  cfg = get_config("tiny", vocab_size=vocab, loss_impl=loss_impl, loss_chunk_size=512)
  config = tiny_config("", batch_size=8, micro_batch_size=8, **{"data.max_masked": 32, "optim.weight_decay": 0.0})
  mesh = sharding.make_mesh({"fsdp": 1}, jax.devices()[:1])
  program = train.build_program(config, mesh, num_languages=2, cfg=cfg)
  assert program.abstract_batch()["masked_weights"].shape == (1, 8, 32)
  return program.lower().compile().memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_chunked_train_step_temporaries_do_not_grow_with_the_logits():
  # 4096 → 16384 vocabulary rows: one float32 copy of the [8 × 32, V] logits grows by 12.6 MB. The dense step
  # keeps at least that copy (its backward pass reads it); the chunked one only [slots, chunk] blocks, so its
  # temporaries grow with the [V, H] parameter-sized arrays alone (H = 64 here: 3 MB per copy).
  logits_growth = 8 * 32 * (16384 - 4096) * 4
  growth = {
    impl: _train_step_temporaries(impl, 16384) - _train_step_temporaries(impl, 4096) for impl in ("dense", "chunked")
  }
  assert growth["dense"] >= logits_growth, growth
  assert growth["chunked"] < logits_growth / 2, growth
