"""Masked-LM cross-entropy over the tied vocabulary, per masked slot: `token_loss(features, ...)`.

`features [..., H]` are the MLM head's outputs before the decoder (compute dtype); the decoder is the tied
embedding `[V, H]` plus a float32 bias `[V]`, with float32 logits. Two implementations behind one signature, and
"auto" (the default) to pick one by the size of the logits:

  dense    the logits `[N, V]` of every masked slot at once (fastest while they fit); its backward pass
           (`jax.custom_vjp`) forms softmax − one-hot from the kept logits in one pass and takes the bias
           gradient as a matrix product (see `_dense_bwd`);
  chunked  a scan over vocabulary chunks with an online logsumexp and a running argmax. Its backward pass
           (`jax.custom_vjp`) recomputes each chunk's logits, so no `[N, V]` array exists in either pass; the
           largest temporary is one `[N, chunk]` float32 block.

At mmBERT's 256k vocabulary one float32 copy of the dense logits of 6k masked slots is 6.4 GB, and the training
step holds several (logits, softmax, their gradient): that, not compute, bounds the rows per chip. "auto" takes
the dense loss while one device's float32 logits `[masked slots, V]` are at most `AUTO_DENSE_BYTES` (the small
steps of CPU runs and tests, where the dense loss is faster) and the chunked one above (mmbert-base pre-training:
16 rows × 368 masked slots per chip at 256k rows make 5.6 GiB).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mmbert_jax import sharding

IMPLEMENTATIONS = ("auto", "dense", "chunked")
AUTO_DENSE_BYTES = 2**30  # "auto": the largest float32 logits block per device that takes the dense loss


def resolve_impl(impl: str, slots: int, vocab: int) -> str:
  """The implementation that `impl` stands for with `slots` masked slots per device and `vocab` decoder rows."""
  if impl != "auto":
    return impl
  return "dense" if 4 * slots * vocab <= AUTO_DENSE_BYTES else "chunked"


def describe(impl: str, chunk_size: int, slots: int, vocab: int) -> str:
  """How reports name the loss: "dense", "chunked/<rows per chunk>", or "auto→" either."""
  resolved = resolve_impl(impl, slots, vocab)
  name = resolved if resolved == "dense" else f"{resolved}/{chunk_size}"
  return name if impl != "auto" else f"auto→{name}"


def slots_per_device(shape: tuple[int, ...]) -> int:
  """Masked slots `[rows, ...]` held by one device when traced under a mesh: rows split over the batch axes."""
  mesh = jax.sharding.get_abstract_mesh()
  shards = 1 if mesh.empty else math.prod(mesh.shape[a] for a in sharding.BATCH_AXES if a in mesh.shape)
  return math.prod(shape) // (shards if shape and shape[0] % shards == 0 else 1)


def token_loss(
  features: jax.Array,
  embedding: jax.Array,
  bias: jax.Array,
  labels: jax.Array,
  *,
  impl: str = "auto",
  chunk_size: int = 8192,
) -> tuple[jax.Array, jax.Array]:
  """Per-slot negative log-likelihood of `labels` and whether the argmax hits it (both float32, shape of
  `labels`). Unweighted: padding slots are weighted by the caller."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"MLM loss impl {impl!r} is not one of {IMPLEMENTATIONS}")
  shape = labels.shape
  impl = resolve_impl(impl, slots_per_device(shape), embedding.shape[0])
  x = features.reshape(-1, features.shape[-1])
  labels = labels.reshape(-1)
  if impl == "dense":
    nll, hit = _dense(x, embedding, bias, labels)
  else:
    nll, hit = _chunked(x, *_split_vocab(embedding, bias, chunk_size), labels)
  return nll.reshape(shape), hit.reshape(shape)


def _dense_logits(x, embedding, bias):
  return jnp.einsum("nh,vh->nv", x, embedding, preferred_element_type=jnp.float32) + bias


@jax.custom_vjp
def _dense(x, embedding, bias, labels):
  return _dense_fwd(x, embedding, bias, labels)[0]


def _dense_fwd(x, embedding, bias, labels):
  logits = _dense_logits(x, embedding, bias)  # [N, V] float32, kept for the backward pass
  row_max = logits.max(-1)
  lse = row_max + jnp.log(jnp.exp(logits - row_max[:, None]).sum(-1))
  label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  # argmax as the first index holding the row's maximum: a plain min-reduce (XLA CPU runs argmax's variadic
  # (value, index) reduce several times slower), with argmax's ties (the earlier index).
  cols = jnp.arange(logits.shape[-1], dtype=labels.dtype)
  first_max = jnp.min(jnp.where(logits == row_max[:, None], cols, logits.shape[-1]), -1)
  return (lse - label_logit, (first_max == labels).astype(jnp.float32)), (x, embedding, bias, labels, logits, lse)


def _dense_bwd(residuals, cotangents):
  x, embedding, bias, labels, logits, lse = residuals
  g = cotangents[0]  # the hit indicator has no gradient
  cols = jnp.arange(logits.shape[-1], dtype=labels.dtype)
  # d nll / d logits = softmax − one_hot(label), in one pass over the logits
  d = g[:, None] * (jnp.exp(logits - lse[:, None]) - (cols == labels[:, None]))
  dx = jnp.einsum("nv,vh->nh", d.astype(x.dtype), embedding, preferred_element_type=jnp.float32)
  dw, db = _weight_and_bias_gradients(d, x)
  return dx.astype(x.dtype), dw.astype(embedding.dtype), db.astype(bias.dtype), None


_dense.defvjp(_dense_fwd, _dense_bwd)


def _weight_and_bias_gradients(d, x):
  """The decoder's gradients from d = d nll / d logits [N, V] float32 and its input x [N, H]: dᵀ·x [V, H] (d
  rounded to x's dtype) and the column sums of d [V], both float32.

  On CPU (float32) both come from one product, (x | 1)ᵀ·d [H + 1, V], with (x | 1)ᵀ written out: XLA:CPU hands
  a product to YNNPACK only when both operands are row-major in their contraction, and dᵀ·x contracts d's rows (it
  would take Eigen, at half the speed, beside the other products); transposing x costs far less than d, and the
  column sums would otherwise be a matrix-vector product on Eigen (or a reduction over d's leading axis, tens of
  times slower). Both barriers are needed: XLA folds a transpose of the operands or of the product back into
  the product."""
  cpu = sharding.target_platform() == "cpu"
  if not cpu or x.dtype != jnp.float32:
    dw = jnp.einsum("nv,nh->vh", d.astype(x.dtype), x, preferred_element_type=jnp.float32)
    # A TPU multiplies float32 in bfloat16 passes by default: the sums stay a reduction there.
    return dw, (jnp.ones((1, d.shape[0]), jnp.float32) @ d)[0] if cpu else d.sum(0)
  xt = jax.lax.optimization_barrier(jnp.concatenate([x.T, jnp.ones((1, x.shape[0]), x.dtype)]))
  product = jax.lax.optimization_barrier(jnp.matmul(xt, d, preferred_element_type=jnp.float32))
  return product[:-1].T, product[-1]


def _split_vocab(embedding, bias, chunk_size: int):
  """[V, H], [V] → [n, C, H], [n, C]; the padded vocabulary rows get logit −inf (probability 0, never argmax)."""
  if chunk_size <= 0:
    raise ValueError(f"MLM loss chunk_size must be positive; got {chunk_size}")
  v, h = embedding.shape
  chunk = min(chunk_size, v)
  n = -(-v // chunk)
  pad = n * chunk - v
  w = jnp.pad(embedding, ((0, pad), (0, 0))).reshape(n, chunk, h)
  b = jnp.pad(bias.astype(jnp.float32), (0, pad), constant_values=-jnp.inf).reshape(n, chunk)
  return w, b


def _chunk_logits(x, w_c, b_c):
  return jnp.einsum("nh,ch->nc", x, w_c, preferred_element_type=jnp.float32) + b_c


@jax.custom_vjp
def _chunked(x, w, b, labels):
  return _chunked_fwd(x, w, b, labels)[0]


def _chunked_fwd(x, w, b, labels):
  n_slots, chunk = x.shape[0], w.shape[1]
  neg_inf = jnp.full((n_slots,), -jnp.inf, jnp.float32)
  zeros = jnp.zeros((n_slots,), jnp.float32)

  def body(carry, xs):
    run_max, run_sum, label_logit, best, best_idx = carry
    w_c, b_c, c = xs
    logits = _chunk_logits(x, w_c, b_c)  # [N, C] float32
    cols = c * chunk + jnp.arange(chunk, dtype=labels.dtype)
    chunk_max = logits.max(-1)
    new_max = jnp.maximum(run_max, chunk_max)
    run_sum = run_sum * jnp.exp(run_max - new_max) + jnp.exp(logits - new_max[:, None]).sum(-1)
    label_logit = label_logit + jnp.where(cols == labels[:, None], logits, 0.0).sum(-1)
    # Strictly greater: ties keep the earlier index, as jnp.argmax over the whole vocabulary does.
    better = chunk_max > best
    best_idx = jnp.where(better, c * chunk + jnp.argmax(logits, -1).astype(labels.dtype), best_idx)
    return (new_max, run_sum, label_logit, jnp.maximum(best, chunk_max), best_idx), None

  init = (neg_inf, zeros, zeros, neg_inf, jnp.zeros_like(labels))
  (run_max, run_sum, label_logit, _, best_idx), _ = jax.lax.scan(
    body, init, (w, b, jnp.arange(w.shape[0], dtype=labels.dtype))
  )
  lse = run_max + jnp.log(run_sum)
  out = (lse - label_logit, (best_idx == labels).astype(jnp.float32))
  return out, (x, w, b, labels, lse)


def _chunked_bwd(residuals, cotangents):
  x, w, b, labels, lse = residuals
  g = cotangents[0]  # the hit indicator has no gradient
  chunk = w.shape[1]

  def body(dx, xs):
    w_c, b_c, c = xs
    logits = _chunk_logits(x, w_c, b_c)
    cols = c * chunk + jnp.arange(chunk, dtype=labels.dtype)
    # d nll / d logits = softmax − one_hot(label)
    d = g[:, None] * (jnp.exp(logits - lse[:, None]) - (cols == labels[:, None]))
    dx = dx + jnp.einsum("nc,ch->nh", d.astype(x.dtype), w_c, preferred_element_type=jnp.float32)
    dw_c, db_c = _weight_and_bias_gradients(d, x)
    return dx, (dw_c.astype(w.dtype), db_c)

  dx, (dw, db) = jax.lax.scan(body, jnp.zeros(x.shape, jnp.float32), (w, b, jnp.arange(w.shape[0], dtype=labels.dtype)))
  return dx.astype(x.dtype), dw, db.astype(b.dtype), None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)
