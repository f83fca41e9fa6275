"""Tests for mmbert_jax.merging against step-by-step numpy references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmbert_jax import merging


def _tree(rng, scale=1.0):
  return {
    "embed": {"embedding": (scale * rng.normal(size=(6, 4))).astype(np.float32)},
    "layers": [
      {
        "attn": {"qkv": {"kernel": (scale * rng.normal(size=(4, 12))).astype(np.float32)}},
        "norm": {"scale": (scale * rng.normal(size=(4,))).astype(np.float32)},
      },
      {"mlp": {"kernel": (scale * rng.normal(size=(4, 3, 2))).astype(np.float32)}},
    ],
  }


def _ties_reference(base, models, density, weights, lam):
  """TIES on one array with explicit per-entry loops (independent of the vectorised code)."""
  m = len(models)
  w = [1.0] * m if weights is None else list(weights)
  n = base.size
  k = max(1, min(n, math.floor(density * n + 0.5)))
  trimmed = []
  for theta in models:
    tau = (theta.astype(np.float64) - base.astype(np.float64)).ravel()
    # By counting: an entry is kept when fewer than k entries have a strictly larger magnitude.
    larger = (np.abs(tau)[None, :] > np.abs(tau)[:, None]).sum(axis=1)
    trimmed.append([tau[i] if larger[i] < k else 0.0 for i in range(n)])
  out = np.empty(n)
  for e in range(n):
    mass = sum(w[i] * trimmed[i][e] for i in range(m))
    sign = 1 if mass > 0 else (-1 if mass < 0 else 0)
    num = den = 0.0
    for i in range(m):
      t = trimmed[i][e]
      if t != 0 and sign != 0 and (t > 0) == (sign > 0):
        num += w[i] * t
        den += w[i]
    out[e] = base.ravel()[e] + lam * (num / den if den > 0 else 0.0)
  return out.reshape(base.shape)


def _leaves(tree):
  return jax.tree.leaves(tree)


@pytest.mark.parametrize(
  "density,weights,lam",
  [(0.3, None, 1.0), (0.5, [0.2, 1.0, 3.0], 0.7), (1.0, None, 1.0), (1.0, [1.0, 2.0, 0.5], 1.3), (0.01, None, 1.0)],
)
def test_ties_matches_per_entry_reference(density, weights, lam):
  rng = np.random.default_rng(0)
  base = _tree(rng)
  models = [jax.tree.map(lambda b, d: b + d, base, _tree(rng, 0.1)) for _ in range(3)]
  got = merging.ties(base, models, density=density, weights=weights, lam=lam)
  assert jax.tree.structure(got) == jax.tree.structure(base)
  for g, b, *ms in zip(_leaves(got), _leaves(base), *map(_leaves, models)):
    assert g.dtype == b.dtype and g.shape == b.shape
    np.testing.assert_allclose(np.asarray(g), _ties_reference(b, ms, density, weights, lam), rtol=1e-5, atol=1e-6)


def test_ties_hand_built_vectors():
  # One 1-D tensor, 3 models, density 0.5 (k = 3 of 6); every step checked by hand.
  base = {"w": np.zeros(6, np.float32)}
  taus = np.array(
    [
      [3.0, -1.0, 0.5, 2.0, -4.0, 0.1],  # keeps 3, 2, -4
      [-1.0, 2.0, -0.2, -3.0, 1.0, 0.3],  # keeps -1, 2, -3 (and 1: ties with |-1| at the k-th)
      [2.0, 2.0, 0.1, -1.0, 5.0, 0.0],
    ],  # keeps 2, 2, 5
    np.float32,
  )
  # Trimmed: [3, 0, 0, 2, -4, 0], [-1, 2, 0, -3, 1, 0], [2, 2, 0, 0, 5, 0].
  # Masses: 4, 4, 0, -1, 2, 0 → signs +, +, 0, -, +, 0.
  # Entry 0: agree {3, 2} → 2.5. Entry 1: {2, 2} → 2. Entry 2: nothing. Entry 3: {-3} → -3.
  # Entry 4: {1, 5} → 3. Entry 5: nothing.
  expected = np.array([2.5, 2.0, 0.0, -3.0, 3.0, 0.0])
  got = merging.ties(base, [{"w": t} for t in taus], density=0.5)
  np.testing.assert_allclose(np.asarray(got["w"]), expected, rtol=1e-6)
  np.testing.assert_allclose(_ties_reference(base["w"], list(taus), 0.5, None, 1.0), expected)

  # Weights enter the election: with model 1 weighted 4×, entry 4's mass is -4+4+5 = 5 > 0 and entry 3's mass
  # 2-12+0 < 0; the disjoint means are weighted: entry 0 mass 3-4+2 = 1 > 0 → (3·1 + 2·1)/2 = 2.5.
  w = [1.0, 4.0, 1.0]
  expected_w = np.array([2.5, 2.0, 0.0, -3.0, (4 * 1.0 + 5.0) / 5.0, 0.0])
  got_w = merging.ties(base, [{"w": t} for t in taus], density=0.5, weights=w, lam=1.0)
  np.testing.assert_allclose(np.asarray(got_w["w"]), expected_w, rtol=1e-6)
  # Weighted election flips a sign: model 1 weighted 10× makes entry 0's mass 3-10+2 < 0 → only -1 agrees.
  got_w10 = merging.ties(base, [{"w": t} for t in taus], density=0.5, weights=[1.0, 10.0, 1.0])
  assert float(got_w10["w"][0]) == pytest.approx(-1.0)

  # Masses that cancel exactly elect no sign: the entry keeps the base value, whichever order the models come in.
  base1 = {"w": np.full(2, 0.5, np.float32)}
  for pair in ([[1.0, 2.0], [-1.0, 1.0]], [[-1.0, 1.0], [1.0, 2.0]]):
    got0 = merging.ties(base1, [{"w": np.float32(0.5) + np.asarray(t, np.float32)} for t in pair], density=1.0)
    np.testing.assert_allclose(np.asarray(got0["w"]), [0.5, 0.5 + 1.5], rtol=1e-6)


def test_ties_weight_scale_invariant_and_lam_scales_task_vector():
  rng = np.random.default_rng(1)
  base = _tree(rng)
  models = [jax.tree.map(lambda b, d: b + d, base, _tree(rng, 0.1)) for _ in range(2)]
  a = merging.ties(base, models, density=0.4, weights=[1.0, 3.0])
  b = merging.ties(base, models, density=0.4, weights=[10.0, 30.0])
  half = merging.ties(base, models, density=0.4, weights=[1.0, 3.0], lam=0.5)
  for x, y, h, b0 in zip(_leaves(a), _leaves(b), _leaves(half), _leaves(base)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(h) - b0, 0.5 * (np.asarray(x) - b0), rtol=1e-5, atol=1e-6)


def test_ties_identities():
  rng = np.random.default_rng(2)
  base = _tree(rng)
  theta = jax.tree.map(lambda b, d: b + d, base, _tree(rng, 0.1))
  # Models equal to the base: nothing to merge.
  for got in (merging.ties(base, [base], density=0.2), merging.ties(base, [base, base, base], density=1.0)):
    for g, b in zip(_leaves(got), _leaves(base)):
      np.testing.assert_array_equal(g, b)
  # Models equal to each other, nothing trimmed: the merge returns that model.
  for n in (1, 3):
    got = merging.ties(base, [theta] * n, density=1.0, weights=[0.5] * n)
    for g, t in zip(_leaves(got), _leaves(theta)):
      np.testing.assert_allclose(g, t, rtol=1e-6, atol=1e-6)
  # ... and with trimming, the base plus the trimmed task vector of that model.
  got = merging.ties(base, [theta, theta], density=0.5)
  one = merging.ties(base, [theta], density=0.5)
  for g, o in zip(_leaves(got), _leaves(one)):
    np.testing.assert_array_equal(g, o)


def test_ties_keeps_dtype_and_is_deterministic():
  rng = np.random.default_rng(3)
  base = {"a": jnp.asarray(rng.normal(size=(8, 8)), jnp.bfloat16)}
  models = [{"a": base["a"] + jnp.asarray(rng.normal(size=(8, 8)), jnp.bfloat16)} for _ in range(2)]
  x = merging.ties(base, models, density=0.3)
  y = merging.ties(base, models, density=0.3)
  assert x["a"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(x["a"], np.float32), np.asarray(y["a"], np.float32))


def test_average_and_ema_against_numpy():
  rng = np.random.default_rng(4)
  trees = [_tree(rng) for _ in range(4)]
  w = np.array([0.5, 1.0, 2.0, 0.25])
  got = merging.average(trees, w)
  uni = merging.average(trees)
  for g, u, *xs in zip(_leaves(got), _leaves(uni), *map(_leaves, trees)):
    np.testing.assert_allclose(g, np.tensordot(w / w.sum(), np.stack(xs), axes=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(u, np.mean(np.stack(xs), axis=0), rtol=1e-5, atol=1e-6)

  decay = 0.6
  ew = merging.ema_weights(4, decay)
  expected_w = np.array([decay**3, decay**2, decay, 1.0])
  np.testing.assert_allclose(ew, expected_w / expected_w.sum())
  assert np.all(np.diff(ew) > 0)  # newest weighs most
  np.testing.assert_allclose(merging.ema_weights(5, 1.0), np.full(5, 0.2))
  got_ema = merging.ema(trees, decay)
  for g, *xs in zip(_leaves(got_ema), *map(_leaves, trees)):
    ref = sum(wi * x.astype(np.float64) for wi, x in zip(expected_w / expected_w.sum(), xs))
    np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-6)


def test_average_of_identical_trees_is_identity():
  rng = np.random.default_rng(5)
  t = _tree(rng)
  for got in (
    merging.average([t, t]),
    merging.average([t] * 3, [1, 2, 3]),
    merging.ema([t, t, t], 0.5),
    merging.average([t]),
  ):
    for g, x in zip(_leaves(got), _leaves(t)):
      np.testing.assert_allclose(g, x, rtol=1e-6, atol=1e-7)


def test_mismatches_fail_with_clear_errors():
  rng = np.random.default_rng(6)
  base = _tree(rng)
  other = _tree(rng)
  bad_shape = jax.tree.map(lambda x: x, other)
  bad_shape["layers"][1]["mlp"]["kernel"] = np.zeros((4, 3, 3), np.float32)
  with pytest.raises(ValueError, match=r"parameter 'layers/1/mlp/kernel': model 0 has shape \(4, 3, 3\)"):
    merging.ties(base, [bad_shape], density=0.5)
  with pytest.raises(ValueError, match=r"parameter 'layers/1/mlp/kernel': tree 1 has shape"):
    merging.average([base, bad_shape])

  missing = jax.tree.map(lambda x: x, other)
  del missing["layers"][0]["norm"]
  with pytest.raises(ValueError, match=r"model 1 has no parameter 'layers/0/norm/scale'"):
    merging.ties(base, [other, missing], density=0.5)
  extra = jax.tree.map(lambda x: x, other)
  extra["head"] = {"bias": np.zeros(3, np.float32)}
  with pytest.raises(ValueError, match=r"tree 1 has parameter 'head/bias' that tree 0 lacks"):
    merging.ema([base, extra], 0.9)

  bad_dtype = jax.tree.map(lambda x: x, other)
  bad_dtype["embed"]["embedding"] = bad_dtype["embed"]["embedding"].astype(np.float16)
  with pytest.raises(ValueError, match=r"parameter 'embed/embedding': model 0 has dtype float16"):
    merging.ties(base, [bad_dtype], density=0.5)
  with pytest.raises(ValueError, match=r"parameter 'step' has dtype int32"):
    merging.average([{"step": np.int32(3)}, {"step": np.int32(4)}])

  for density in (0.0, -0.1, 1.5):
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
      merging.ties(base, [other], density=density)
  with pytest.raises(ValueError, match=r"weights has 3 entries but there are 2 models"):
    merging.ties(base, [other, other], density=0.5, weights=[1, 2, 3])
  with pytest.raises(ValueError, match=r"weights has 1 entries but there are 2 trees"):
    merging.average([base, other], weights=[1.0])
  with pytest.raises(ValueError, match=r"non-negative"):
    merging.average([base, other], weights=[1.0, -1.0])
  with pytest.raises(ValueError, match=r"decay must be in \(0, 1\]"):
    merging.ema([base, other], 0.0)
  with pytest.raises(ValueError, match=r"at least one model"):
    merging.ties(base, [], density=0.5)


def test_works_on_nnx_state():
  from flax import nnx

  from mmbert_jax import model as model_lib

  cfg = model_lib.ModelConfig(
    vocab_size=64,
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    intermediate_size=48,
    local_window=8,
    max_position_embeddings=64,
  )
  states = [nnx.state(model_lib.MaskedLM(cfg, rngs=nnx.Rngs(s)), nnx.Param) for s in range(3)]
  merged = merging.ties(states[0], states[1:], density=0.2)
  avg = merging.average(states)
  assert jax.tree.structure(merged) == jax.tree.structure(states[0])
  for m, a, b, *xs in zip(_leaves(merged), _leaves(avg), _leaves(states[0]), *(_leaves(s) for s in states[1:])):
    np.testing.assert_allclose(
      m, _ties_reference(np.asarray(b), [np.asarray(x) for x in xs], 0.2, None, 1.0), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(a, np.mean([np.asarray(b)] + [np.asarray(x) for x in xs], axis=0), rtol=1e-5, atol=1e-6)
