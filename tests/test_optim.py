"""StableAdamW and AdamW against a float64 NumPy transcription of docs/RECIPE.md §3.4."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mmbert_jax import optim, schedules
from mmbert_jax.model import MaskedLM, get_config

PEAK_LR, WD, B1, B2, EPS = 1e-3, 0.05, 0.9, 0.95, 1e-8
SPIKE_STEP = 5  # 1-based step whose gradient is 10× larger
WARMUP_TOKENS = 1000.0
TOKENS_PER_STEP = [100, 200, 300, 400, 400, 400, 400]  # grows as under batch-size warmup
DECAYED = {"dense": {"kernel": True}, "norm": {"scale": False}, "head": {"bias": False}}


def reference(params, grads, lrs, *, clip=True):
  """docs/RECIPE.md §3.4 line by line, float64. Returns params after each step and the clipped fraction per step."""
  p = {k: {n: np.array(x, np.float64) for n, x in d.items()} for k, d in params.items()}
  m = {k: {n: np.zeros_like(x) for n, x in d.items()} for k, d in p.items()}
  v = {k: {n: np.zeros_like(x) for n, x in d.items()} for k, d in p.items()}
  history, clipped, rms_all = [], [], []
  for t, (g_t, lr) in enumerate(zip(grads, lrs), start=1):
    b1h = (B1**t - B1) / (B1**t - 1)
    b2h = (B2**t - B2) / (B2**t - 1)
    n_clipped, rms_t = 0, []
    for k in p:
      for n in p[k]:
        g = np.asarray(g_t[k][n], np.float64)
        m[k][n] = m[k][n] + (1 - b1h) * (g - m[k][n])  # lerp(m, g, 1 − b1h)
        v[k][n] = b2h * v[k][n] + (1 - b2h) * g * g
        rms = np.sqrt(np.mean(g * g / np.maximum(v[k][n], EPS**2)))
        lr_eff = lr / max(1.0, rms) if clip else lr
        if DECAYED[k][n]:
          p[k][n] *= 1 - (lr_eff / PEAK_LR) * WD
        p[k][n] -= lr_eff * m[k][n] / (np.sqrt(v[k][n]) + EPS)
        n_clipped += rms > 1
        rms_t.append(rms)
    history.append({k: {n: x.copy() for n, x in d.items()} for k, d in p.items()})
    clipped.append(n_clipped / sum(len(d) for d in p.values()))
    rms_all.append(rms_t)
  return history, clipped, rms_all


def make_problem():
  rng = np.random.default_rng(0)
  params = {
    "dense": {"kernel": rng.normal(size=(6, 5))},
    "norm": {"scale": 1 + 0.1 * rng.normal(size=(5,))},
    "head": {"bias": 0.1 * rng.normal(size=(5,))},
  }
  # Shrinking gradients keep rms clearly below 1 except at the 10× spike; the bias gradient is so small that
  # v stays under eps², which exercises the max(v, eps²) floor.
  base = {
    "dense": {"kernel": rng.normal(size=(6, 5))},
    "norm": {"scale": rng.normal(size=(5,))},
    "head": {"bias": 1e-10 * rng.normal(size=(5,))},
  }
  grads = []
  for t in range(1, len(TOKENS_PER_STEP) + 1):
    scale = 0.8**t * (10.0 if t == SPIKE_STEP else 1.0)
    grads.append(jax.tree.map(lambda b: b * scale * (1 + 0.05 * rng.normal(size=b.shape)), base))
  return params, grads


def lr_from_tokens(tokens):
  """Closed form of the pre-training schedule: linear warmup to the peak, then constant."""
  return PEAK_LR * min(1.0, tokens / WARMUP_TOKENS)


def run_optax(tx, params, grads):
  """The trainer's path: lr computed from tokens seen and injected inside the jitted step."""
  schedule = schedules.wsd_schedule(PEAK_LR, warmup_tokens=WARMUP_TOKENS)

  @jax.jit
  def step(params, opt_state, grads, tokens):
    opt_state = optim.with_learning_rate(opt_state, schedule(tokens))
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  opt_state = tx.init(params)
  tokens, history, clipped, lrs = 0.0, [], [], []
  for g, n in zip(grads, TOKENS_PER_STEP):
    tokens += n
    params, opt_state = step(params, opt_state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g), tokens)
    history.append(params)
    clipped.append(optim.clipped_fraction(opt_state))
    lrs.append(float(optim.learning_rate(opt_state)))
  return history, clipped, lrs


def test_stable_adamw_matches_numpy_formula():
  params, grads = make_problem()
  lrs = [lr_from_tokens(t) for t in np.cumsum(TOKENS_PER_STEP)]
  ref_history, ref_clipped, ref_rms = reference(params, grads, lrs)
  # The problem is built so that clipping happens at the spike only, and no rms sits on the threshold.
  assert ref_clipped[SPIKE_STEP - 1] == pytest.approx(2 / 3)
  assert all(c == 0 for i, c in enumerate(ref_clipped) if i != SPIKE_STEP - 1)
  assert all(abs(r - 1) > 0.05 for rms_t in ref_rms[1:] for r in rms_t)

  tx = optim.build("stable_adamw", learning_rate=0.0, peak_lr=PEAK_LR, weight_decay=WD, b1=B1, b2=B2, eps=EPS)
  history, clipped, used_lrs = run_optax(tx, params, grads)
  np.testing.assert_allclose(used_lrs, lrs, rtol=1e-6)
  for step, (got, want) in enumerate(zip(history, ref_history), start=1):
    for k in want:
      for n in want[k]:
        np.testing.assert_allclose(got[k][n], want[k][n], rtol=0, atol=1e-6, err_msg=f"step {step} {k}/{n}")
  # At t = 1 rms is exactly 1 by construction (v = g²), so the comparison starts at t = 2.
  np.testing.assert_allclose(clipped[1:], ref_clipped[1:])


def test_clipping_changes_the_result():
  """Guard for the test above: without clipping the spike step lands somewhere measurably different."""
  params, grads = make_problem()
  lrs = [lr_from_tokens(t) for t in np.cumsum(TOKENS_PER_STEP)]
  clipped, _, _ = reference(params, grads, lrs, clip=True)
  unclipped, _, _ = reference(params, grads, lrs, clip=False)
  k = SPIKE_STEP - 1
  assert np.abs(clipped[k]["dense"]["kernel"] - unclipped[k]["dense"]["kernel"]).max() > 1e-4


def test_adamw_matches_fully_decoupled_formula():
  """optax.adamw with weight_decay = wd / peak_lr equals the same update without clipping."""
  params, grads = make_problem()
  lrs = [lr_from_tokens(t) for t in np.cumsum(TOKENS_PER_STEP)]
  ref_history, _, _ = reference(params, grads, lrs, clip=False)
  tx = optim.build("adamw", learning_rate=0.0, peak_lr=PEAK_LR, weight_decay=WD, b1=B1, b2=B2, eps=EPS)
  history, clipped, _ = run_optax(tx, params, grads)
  assert clipped[-1] is None
  for got, want in zip(history, ref_history):
    for k in want:
      for n in want[k]:
        np.testing.assert_allclose(got[k][n], want[k][n], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_decay_only_on_matrices(name):
  """With zero gradients only decay acts: kernels shrink by lr/peak·wd, 1-D tensors do not move at all."""
  params, _ = make_problem()
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  tx = optim.build(name, learning_rate=0.0, peak_lr=PEAK_LR, weight_decay=WD)
  lr = 0.5 * PEAK_LR
  state = optim.with_learning_rate(tx.init(params), lr)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new["dense"]["kernel"], params["dense"]["kernel"] * (1 - lr / PEAK_LR * WD), rtol=1e-6)
  np.testing.assert_array_equal(new["norm"]["scale"], params["norm"]["scale"])
  np.testing.assert_array_equal(new["head"]["bias"], params["head"]["bias"])


def test_custom_mask_is_used():
  params = {"a": jnp.ones((2, 2)), "b": jnp.ones((2, 2))}
  tx = optim.build("stable_adamw", 0.0, PEAK_LR, WD, weight_decay_mask={"a": True, "b": False})
  state = optim.with_learning_rate(tx.init(params), PEAK_LR)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  assert float(updates["a"][0, 0]) == pytest.approx(-PEAK_LR * WD / PEAK_LR)
  assert float(updates["b"][0, 0]) == 0.0


def test_nnx_optimizer_on_the_model():
  """Default mask on the real parameter tree: embedding and kernels decay; norms and the decoder bias do not."""
  model = MaskedLM(get_config("tiny"), rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optim.build("stable_adamw", 0.0, PEAK_LR, WD), wrt=nnx.Param)
  before = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree.leaves_with_path(nnx.state(model, nnx.Param))}

  @nnx.jit
  def step(model, optimizer, lr):
    optimizer.opt_state = optim.with_learning_rate(optimizer.opt_state, lr)
    optimizer.update(model, jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param)))

  step(model, optimizer, PEAK_LR)
  assert float(optim.learning_rate(optimizer.opt_state)) == pytest.approx(PEAK_LR)
  assert float(optim.clipped_fraction(optimizer.opt_state)) == 0.0
  after = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree.leaves_with_path(nnx.state(model, nnx.Param))}
  names = {"decayed": [], "kept": []}
  for key, old in before.items():
    if np.array_equal(after[key], old):
      names["kept"].append(key)
    else:
      np.testing.assert_allclose(after[key], old * (1 - WD), rtol=1e-6, atol=1e-9, err_msg=key)
      names["decayed"].append(key)
  assert any("embedding" in k for k in names["decayed"])
  assert any("wqkv" in k for k in names["decayed"])
  assert any("decoder_bias" in k for k in names["kept"])
  assert all(("norm" in k or "bias" in k) for k in names["kept"])
  assert not any(("norm" in k or "bias" in k) for k in names["decayed"])


def test_bad_input_errors():
  with pytest.raises(ValueError, match="stable_adamw"):
    optim.build("sgd", 1e-3, PEAK_LR, WD)
  with pytest.raises(ValueError, match="peak_lr"):
    optim.build("stable_adamw", 1e-3, 0.0, WD)
  with pytest.raises(ValueError, match="b2"):
    optim.build("stable_adamw", 1e-3, PEAK_LR, WD, b2=1.0)
  params = {"w": jnp.ones((2, 2))}
  scheduled = optim.build("stable_adamw", optax.constant_schedule(1e-3), PEAK_LR, WD)
  with pytest.raises(ValueError, match="step-count schedule"):
    optim.with_learning_rate(scheduled.init(params), 1e-3)
  with pytest.raises(ValueError, match="optim.build"):
    optim.with_learning_rate(optax.adam(1e-3).init(params), 1e-3)
  tx = optim.build("stable_adamw", 1e-3, PEAK_LR, WD)
  with pytest.raises(ValueError, match="needs params"):
    tx.update(params, tx.init(params))
