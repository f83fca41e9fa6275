"""Token-counted learning-rate and batch-size schedules against their closed forms."""

import collections
import math

import jax
import numpy as np
import pytest

from mmbert_jax import schedules

PEAK = 8e-4


@pytest.fixture(params=["jnp", "host"])
def wsd(request):
  """Each closed-form test runs on the jit-able float32 schedule and on the loop's numpy float64 one."""
  return {"jnp": schedules.wsd_schedule, "host": schedules.host_wsd_schedule}[request.param]


def closed_form_decay(shape, s, alpha):
  s = min(max(s, 0.0), 1.0)
  if shape == "1-sqrt":
    return PEAK * (alpha + (1 - alpha) * (1 - math.sqrt(s)))
  if shape == "inverse_sqrt":
    return PEAK / math.sqrt(1 + s * (alpha**-2 - 1))
  if shape == "linear":
    return PEAK * (alpha + (1 - alpha) * (1 - s))
  if shape == "cosine":
    return PEAK * (alpha + (1 - alpha) * 0.5 * (1 + math.cos(math.pi * s)))
  raise AssertionError(shape)


def test_pretrain_phase_warmup_then_constant(wsd):
  schedule = wsd(PEAK, warmup_tokens=3e9)
  for tokens, want in [(0, 0.0), (0.75e9, PEAK / 4), (1.5e9, PEAK / 2), (3e9, PEAK), (3.1e9, PEAK), (2.3e12, PEAK)]:
    assert float(schedule(tokens)) == pytest.approx(want, rel=1e-6, abs=1e-12), tokens


def test_midtrain_phase_is_constant(wsd):
  schedule = wsd(PEAK)
  for tokens in [0, 1, 1e9, 6e11]:
    assert float(schedule(tokens)) == pytest.approx(PEAK, rel=1e-7)


@pytest.mark.parametrize("shape", schedules.DECAY_SHAPES)
def test_decay_phase_shapes(wsd, shape):
  alpha, total = 0.02, 100e9
  schedule = wsd(PEAK, decay_start_tokens=0, decay_tokens=total, final_fraction=alpha, decay_shape=shape)
  for s in [0.0, 0.01, 0.25, 0.5, 0.9, 0.99, 1.0, 1.5]:
    want = closed_form_decay(shape, s, alpha)
    assert float(schedule(s * total)) == pytest.approx(want, rel=2e-6), s
  assert float(schedule(total)) == pytest.approx(1.6e-5, rel=1e-5)  # RECIPE: 0.02 · 8e-4


def test_full_warmup_stable_decay_and_phase_offset(wsd):
  warmup, start, length, alpha = 10.0, 90.0, 10.0, 0.0
  local = wsd(1e-3, warmup_tokens=warmup, decay_start_tokens=start, decay_tokens=length, final_fraction=alpha)
  offset = 1e6
  shifted = wsd(
    1e-3,
    warmup_tokens=warmup,
    decay_start_tokens=start,
    decay_tokens=length,
    final_fraction=alpha,
    phase_start_tokens=offset,
  )
  for t in [0, 2.5, 5, 10, 50, 89, 90, 92.5, 95, 99, 100, 120]:
    if t < warmup:
      want = 1e-3 * t / warmup
    elif t < start:
      want = 1e-3
    else:
      want = 1e-3 * (1 - math.sqrt(min(1.0, (t - start) / length)))
    assert float(local(t)) == pytest.approx(want, rel=1e-6, abs=1e-12), t
    assert float(shifted(offset + t)) == pytest.approx(want, rel=1e-6, abs=1e-12), t
  assert float(shifted(0.0)) == 0.0  # before the phase starts: position 0


def test_decay_right_after_warmup(wsd):
  schedule = wsd(1.0, warmup_tokens=4, decay_start_tokens=4, decay_tokens=4, final_fraction=0.5, decay_shape="linear")
  got = [float(schedule(t)) for t in range(10)]
  np.testing.assert_allclose(got, [0, 0.25, 0.5, 0.75, 1, 0.875, 0.75, 0.625, 0.5, 0.5], rtol=1e-6)


def test_jit_and_vectorised():
  schedule = schedules.wsd_schedule(
    PEAK, warmup_tokens=3e9, decay_start_tokens=5e9, decay_tokens=2e9, final_fraction=0.1, decay_shape="cosine"
  )
  tokens = np.linspace(0, 8e9, 33)
  jitted = np.asarray(jax.jit(schedule)(tokens))
  assert jitted.shape == tokens.shape
  np.testing.assert_allclose(jitted, [float(schedule(t)) for t in tokens], rtol=1e-6)
  const = schedules.wsd_schedule(PEAK)(np.zeros(3))
  assert const.shape == (3,)


@pytest.mark.parametrize("shape", schedules.DECAY_SHAPES)
def test_host_schedule_equals_the_jnp_schedule(shape):
  """The loop's numpy float64 learning rate is the jit-able float32 one, to float32 precision: on both sides of
  every boundary (phase start, end of warmup, start and end of the decay). Token counts below 2²⁴ are exact in
  float32, so only the arithmetic differs."""
  phase, warmup, decay_start, decay = 2**20, 2**18, 2**22, 2**21
  kw = dict(
    warmup_tokens=warmup,
    decay_start_tokens=decay_start,
    decay_tokens=decay,
    final_fraction=0.02,
    decay_shape=shape,
    phase_start_tokens=phase,
  )
  host, jitted = schedules.host_wsd_schedule(PEAK, **kw), jax.jit(schedules.wsd_schedule(PEAK, **kw))
  edges = phase + np.array([0, warmup, decay_start, decay_start + decay])
  tokens = np.unique(
    np.concatenate(
      [
        [0, phase // 2],
        edges - 1,
        edges,
        edges + 1,
        edges + 4096,
        phase + np.linspace(0, decay_start + 2 * decay, 101).round(),
      ]
    )
  )
  lr = host(tokens)
  assert lr.dtype == np.float64 and isinstance(host(tokens[5]), np.float64)
  np.testing.assert_allclose(lr, np.asarray(jitted(tokens), np.float64), rtol=2e-6, atol=1e-12)
  # Every piece is visited: 0 before the phase, the warmup ramp, the peak, the decay and its end held.
  assert lr[0] == 0 and 0 < host(phase + warmup // 2) < PEAK and host(phase + decay_start) == PEAK
  assert host(phase + decay_start + decay // 2) < PEAK and host(tokens[-1]) == pytest.approx(0.02 * PEAK)


def test_schedule_errors(wsd):
  with pytest.raises(ValueError, match="decay_shape"):
    wsd(PEAK, decay_start_tokens=0, decay_tokens=1, decay_shape="exp")
  with pytest.raises(ValueError, match="final_fraction > 0"):
    wsd(PEAK, decay_start_tokens=0, decay_tokens=1, decay_shape="inverse_sqrt")
  with pytest.raises(ValueError, match="decay_tokens"):
    wsd(PEAK, decay_start_tokens=0)
  with pytest.raises(ValueError, match="decay_start_tokens"):
    wsd(PEAK, warmup_tokens=10, decay_start_tokens=5, decay_tokens=1)
  with pytest.raises(ValueError, match="peak_lr"):
    wsd(0.0)


# --------------------------------------------------------------------------------------------------------------
# Batch-size warmup
# --------------------------------------------------------------------------------------------------------------


def simulate(n, warmup, micro_tokens, **kw):
  """The trainer's loop: ask how many micro-batches to accumulate, take the step, count its tokens."""
  tokens, sizes, starts = 0, [], []
  while True:
    k = schedules.batch_warmup(tokens, num_microbatches=n, warmup_tokens=warmup, **kw)
    if k == n:
      return sizes, starts, tokens
    sizes.append(k)
    starts.append(tokens)
    tokens += k * micro_tokens


def test_recipe_batch_warmup_base():
  """docs/RECIPE.md §3.3, base: 384 → 4608 sequences of 1024 tokens over 60B tokens, micro-batch 384 sequences."""
  seq, micro, full, warmup = 1024, 384, 4608, 60e9
  n, micro_tokens = full // micro, micro * seq
  sizes, _, warm_tokens = simulate(n, warmup, micro_tokens)
  assert sizes[0] * micro == 384
  assert sorted(set(sizes)) == list(range(1, 12))  # every level 1..11, then 12 = 4608 sequences
  assert sizes == sorted(sizes)
  # Equal steps per level: Σ_{k=1..11} k = 66 micro-batch units per "round" of one step at every level.
  steps = collections.Counter(sizes)
  expected = warmup / (66 * micro_tokens)
  assert expected == pytest.approx(2312, abs=1)
  assert all(abs(c - expected) <= 1 for c in steps.values()), steps
  # The warmup consumes its token budget, overshooting by less than one step.
  assert warmup <= warm_tokens < warmup + 11 * micro_tokens
  assert schedules.batch_warmup(2.3e12, num_microbatches=n, warmup_tokens=warmup) * micro == 4608


@pytest.mark.parametrize("mode", ["steps", "tokens"])
def test_batch_warmup_level_boundaries(mode):
  """Level k (start ≤ k < n) ends at W·Σ_{j≤k} span_j / Σ span_j with span_j = j (steps) or 1 (tokens)."""
  n, warmup = 24, 1e6
  start = 2  # ⌈24 / 12⌉
  levels = np.arange(start, n)
  span = levels if mode == "steps" else np.ones(len(levels))
  ends = warmup * np.cumsum(span) / span.sum()
  call = lambda t: schedules.batch_warmup(t, num_microbatches=n, warmup_tokens=warmup, level_duration=mode)
  assert call(0) == start
  for k, end in zip(levels, ends):
    assert call(end * (1 - 1e-9)) == k
    assert call(end) == k + 1
  assert call(warmup) == n and call(10 * warmup) == n
  if mode == "tokens":
    sizes, starts, _ = simulate(n, warmup, 100, level_duration=mode)
    first = {k: starts[sizes.index(k)] for k in set(sizes)}
    spans = np.diff([first[k] for k in sorted(first)])
    np.testing.assert_allclose(spans, warmup / (n - start), atol=n * 100)


def test_batch_warmup_edges():
  assert schedules.batch_warmup(0, num_microbatches=1, warmup_tokens=1e9) == 1
  assert schedules.batch_warmup(0, num_microbatches=12, warmup_tokens=0) == 12
  assert schedules.batch_warmup(0, num_microbatches=8, warmup_tokens=1e9) == 1  # ⌈8/12⌉ = 1
  assert schedules.batch_warmup(0, num_microbatches=12, warmup_tokens=1e9, start_fraction=0.5) == 6
  with pytest.raises(ValueError, match="num_microbatches"):
    schedules.batch_warmup(0, num_microbatches=0, warmup_tokens=1)
  with pytest.raises(ValueError, match="start_fraction"):
    schedules.batch_warmup(0, num_microbatches=4, warmup_tokens=1, start_fraction=0)
  with pytest.raises(ValueError, match="level_duration"):
    schedules.batch_warmup(0, num_microbatches=4, warmup_tokens=1, level_duration="time")


def test_recipe_scale_token_counts_do_not_overflow(wsd):
  # 100B-token decay and a 2.3T-token phase: Python ints beyond int32 must not reach jnp as integers.
  lr = wsd(
    8e-4,
    warmup_tokens=3_000_000_000,
    decay_start_tokens=2_200_000_000_000,
    decay_tokens=100_000_000_000,
    final_fraction=0.02,
  )
  assert float(lr(2_250_000_000_000)) == pytest.approx(8e-4 * (0.02 + 0.98 * (1 - math.sqrt(0.5))), rel=1e-5)
  assert float(lr(1_500_000_000)) == pytest.approx(4e-4, rel=1e-5)
