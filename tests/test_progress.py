"""The progress line, its ETAs and the step-time split, from a fake clock; the bar on a terminal; the profiler."""

import io
import os

import numpy as np
import pytest

from mmbert_jax import progress


class FakeClock:
  def __init__(self, t=1000.0):
    self.t = t

  def __call__(self):
    return self.t


def test_progress_fields_and_etas_follow_the_measured_rate():
  clock = FakeClock()
  p = progress.Progress("midtrain", budget=1_000_000, tokens=200_000, later_tokens=3_000_000, clock=clock)
  clock.t += 50.0  # first report: includes the compilation, so it gives no rate
  f = p.update(10, 250_000)
  assert f["tokens_per_s"] == pytest.approx(50_000 / 50)
  assert f["fraction"] == pytest.approx(0.25)
  assert f["eta_phase_s"] is None and f["eta_total_s"] is None
  clock.t += 10.0  # from here on the rate excludes the first interval
  f = p.update(20, 350_000)
  assert f["tokens_per_s"] == pytest.approx(10_000)
  assert f["eta_phase_s"] == f["eta_phase_raw_s"] == pytest.approx(650_000 / 10_000)
  clock.t += 30.0
  f = p.update(30, 450_000, mfu=0.5, loss=2.0)
  rate = 200_000 / 40.0  # since the first report
  assert f["tokens_per_s"] == pytest.approx(100_000 / 30)
  assert f["eta_phase_raw_s"] == pytest.approx(550_000 / rate)
  assert f["eta_total_raw_s"] == pytest.approx((550_000 + 3_000_000) / rate)
  # The rate fell threefold: the shown ETA moves from the previous one counted down (35 s) by at most the noise.
  assert f["eta_phase_s"] == pytest.approx((65 - 30) * (1 + p.noise()))
  assert (f["phase"], f["step"], f["tokens"], f["budget"], f["mfu"], f["loss"]) == (
    "midtrain",
    30,
    450_000,
    1_000_000,
    0.5,
    2.0,
  )
  clock.t += 5.0
  assert p.update(40, 1_200_000)["eta_phase_s"] == 0.0  # past the budget: nothing left


def test_step_timer_splits_wall_time():
  clock = FakeClock(0.0)
  timer = progress.StepTimer(clock)
  for _ in range(4):
    with timer("data"):
      clock.t += 0.5
    clock.t += 0.25  # host work outside any section
    with timer("device"):
      clock.t += 2.0
  with timer("eval"):
    clock.t += 4.0  # an evaluation in the interval is not host work
  split = timer.split(4)
  assert split == pytest.approx({"step": 3.75, "data": 0.5, "device": 2.0, "eval": 1.0, "host": 0.25})
  clock.t += 1.0
  assert timer.split(1) == pytest.approx({"step": 1.0, "data": 0.0, "device": 0.0, "host": 1.0})


def test_progress_line_shows_every_field():
  fields = {
    "phase": "pretrain",
    "step": 120,
    "tokens": 1_230_000,
    "budget": 4_000_000,
    "fraction": 0.3075,
    "tokens_per_s": 812_000.0,
    "eta_phase_s": 205.0,
    "eta_total_s": 3720.0,
    "mfu": 0.412,
    "step_s": 0.63,
    "data_s": 0.01,
    "device_s": 0.6,
    "host_s": 0.02,
    "loss": 3.21,
    "accuracy": 0.412,
    "lr": 8e-4,
  }
  line = progress.format_progress(fields)
  assert line == (
    "pretrain step 120 | 1.23M/4.00M tok (30.8%) | 812.00k tok/s | MFU 41.2% | ETA 3m25s, "
    "curriculum 1h02m | 0.630 s/step: data 0.010 device 0.600 host 0.020 | loss 3.210 acc 0.412 "
    "lr 8.0e-04"
  )
  assert "\n" not in line


@pytest.mark.parametrize(
  "seconds,text", [(None, "?"), (42.4, "42s"), (725, "12m05s"), (18_420, "5h07m"), (3 * 86400 + 4 * 3600 + 59, "3d04h")]
)
def test_durations(seconds, text):
  assert progress.format_duration(seconds) == text


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def test_console_plain_lines_off_a_terminal_and_a_bar_on_one():
  fields = {
    "phase": "decay_all",
    "step": 5,
    "tokens": 500,
    "budget": 1000,
    "fraction": 0.5,
    "tokens_per_s": 100.0,
    "eta_phase_s": 5.0,
    "eta_total_s": 5.0,
  }
  plain = io.StringIO()
  console = progress.Console(plain)
  console.progress(fields)
  console.print("a message")
  assert plain.getvalue().splitlines() == [progress.format_progress(fields), "a message"]

  tty = _Terminal()
  console = progress.Console(tty)
  assert console.bar
  console.progress(fields)
  console.progress(dict(fields, step=6, tokens=600, fraction=0.6))
  console.print("between")
  console.close()
  out = tty.getvalue()
  assert "\r" in out and "between" in out  # redrawn in place; messages go above the bar
  assert "decay_all step 6 | 600/1.00k tok (60.0%)" in out
  bars = [part.split("|")[0] for part in out.split("\r") if "decay_all" in part]
  full = [b.count("#") + b.count("█") for b in bars]
  assert full[:2] == [12, 14]  # 50% and 60% of the 24-column bar, full cells


def test_profiler_traces_the_chosen_steps(tmp_path):
  import jax.numpy as jnp

  prof = progress.Profiler(str(tmp_path), start_step=2, num_steps=2)
  x = jnp.ones((64, 64))
  started = []
  for step in range(6):
    prof.before_step(step)
    started.append(prof._active)
    y = (x @ x).block_until_ready()
    prof.after_step(step + 1, wait=y.block_until_ready)
  assert started == [False, False, True, True, False, False]
  traces = [f for _, _, files in os.walk(tmp_path / "profile") for f in files if f.endswith(".xplane.pb")]
  assert len(traces) == 1
  other = progress.Profiler(str(tmp_path / "other"), start_step=0, num_steps=1, process_index=1)
  other.before_step(0)  # only process 0 traces by default
  assert not other._active and not (tmp_path / "other").exists()


def test_eta_moves_by_at_most_the_noise_and_converges():
  """A phase at 10k tokens per ~1 s with ±20% noise per report, and a 5 s evaluation every 50 reports."""
  rng = np.random.default_rng(0)
  clock = FakeClock()
  budget = 2_000_000
  p = progress.Progress("pretrain", budget, clock=clock)
  clock.t += 40.0  # compilation
  p.update(1, 10_000)
  shown, raw_jumps, tokens = [], [], 10_000
  for step in range(2, 300):
    tokens = min(tokens + 10_000, budget)
    dt = rng.uniform(0.8, 1.2) + (5.0 if step % 50 == 0 else 0.0)
    clock.t += dt
    f = p.update(step, tokens)
    if shown and f["eta_phase_s"] and shown[-1][2]:
      expected = shown[-1][2] - dt  # the previous ETA counted down
      noise = p.noise()
      assert abs(f["eta_phase_s"] - expected) <= noise * expected + 1e-9, step
      assert 0.02 <= noise <= 0.5
      raw_jumps.append(abs(f["eta_phase_raw_s"] - expected) / expected)
    shown.append((tokens, clock.t, f["eta_phase_s"]))
    if tokens == budget:
      break
  assert shown[-1][2] == 0.0
  # The intervals with an evaluation move the raw estimate by more than the shown one may move.
  assert max(raw_jumps) > 2 * min(raw_jumps) and max(raw_jumps) > 0.03
  # From a quarter of the phase on, the shown ETA is within 10% (or 1 s) of the remaining time at the true mean rate
  # (1 s per 10k tokens, and 5 s every 50 reports).
  for tokens, _, eta in shown[:-1]:
    if tokens >= budget // 4:
      assert eta == pytest.approx((budget - tokens) / 10_000 * (1 + 5 / 50), rel=0.1, abs=1.0), tokens


@pytest.mark.parametrize("slow", [1.0, 3.0])
def test_curriculum_eta_adds_the_work_after_the_loop(slow):
  """Phase a (1000 tokens in rows of 128, from scratch), phase b (2000 tokens at twice a's FLOPs per token, rows of
  256, from a's checkpoint), a merge of three checkpoints and a fine-tuning (5000 FLOPs in rows of 32, two programs,
  four checkpoints read). `slow`: the same run on a host `slow` times slower (every duration scaled) gives ETAs
  `slow` times longer."""
  clock = FakeClock()
  outlook = progress.Outlook(
    [
      progress.Part("a", tokens=1000, cost=1.0, length=128),
      progress.Part("b", tokens=2000, cost=2.0, length=256, loads=1),
      progress.Part("merge", kind="merge", loads=3),
      progress.Part("downstream", kind="finetune", flops=5000, length=32, compiles=2, loads=4),
    ],
    clock=clock,
  )

  def wait(seconds):
    clock.t += slow * seconds

  outlook.begin("a")
  wait(5.0)  # setup before the loop's progress starts
  p = progress.Progress("a", 1000, outlook=outlook, clock=clock)
  wait(25.0)  # compilation and the first step
  p.update(1, 100)
  assert outlook.start_s == {"a": slow * 30.0} and outlook.first_step_s == {"a": slow * 25.0}
  for step, tokens in enumerate(range(200, 1001, 100), start=2):
    wait(1.0)  # 100 tokens/s: 0.01 s per FLOP
    f = p.update(step, tokens)
  # At a's last step: its end (no phase has ended yet: a quarter of its start); b's restore, first step, loop (2000
  # tokens × 2 FLOPs at 0.01 s) and end; the merge (an end and three restores); the fine-tuning (5000 FLOPs at a's
  # 0.01 s, two first steps and four restores). No phase has restored a checkpoint yet: a restore counts 0 (a's
  # 5 s setup initialised, with the one-time costs of the process).
  end, restore, first, per_flop = 0.25 * 30.0, 0.0, 25.0, 0.01
  after = (
    end
    + (restore + first + 2000 * 2 * per_flop + end)
    + (end + 3 * restore)
    + (5000 * per_flop + 2 * first + 4 * restore)
  )
  assert f["eta_phase_s"] == 0.0
  assert f["eta_total_raw_s"] == pytest.approx(slow * after)
  a_total = f["eta_total_s"]
  wait(12.0)  # a's final checkpoint and evaluation
  outlook.end("a")
  assert outlook.end_s == {"a": slow * 12.0}
  outlook.begin("b")
  wait(2.0)
  p = progress.Progress("b", 2000, outlook=outlook, clock=clock)
  wait(20.0)  # b's step compiles faster than a's
  p.update(1, 100)
  wait(10.0)
  f = p.update(2, 200)  # 10 tokens/s: b runs at 0.05 s per FLOP, five times slower than a
  assert f["eta_phase_raw_s"] == pytest.approx(slow * 1800 / 10)
  # The fine-tuning's short rows are timed at the rate of a (rows of 128), not b's (256); its programs as the median
  # first step measured (of a's 25 s and b's 20 s); a restore is b's setup, 2 s; an end a's 12 s.
  end, restore = 12.0, 2.0
  raw = 1800 / 10 + end + (end + 3 * restore) + (5000 * 0.01 + 2 * 22.5 + 4 * restore)
  assert f["eta_total_raw_s"] == pytest.approx(slow * raw)
  # The curriculum's ETA stays smooth across the phases: b's first moves from a's last counted down (44 s ago) by
  # at most the noise of a single interval (50%).
  expected = a_total - slow * 44.0
  assert f["eta_total_s"] == pytest.approx(np.clip(slow * raw, 0.5 * expected, 1.5 * expected))
  assert f["eta_total_s"] == pytest.approx(1.5 * expected) and 1.5 * expected < slow * raw
  # A stall of 30 s (a recompilation) slows b's own ETA (the mean rate) but not the rate the later parts are
  # estimated at (the median interval).
  for step, seconds in ((3, 10.0), (4, 40.0), (5, 10.0)):
    wait(seconds)
    f = p.update(step, 100 * step)
  assert p.steady_rate() == pytest.approx(10.0 / slow)
  assert outlook.seconds_per_cost["b"] == pytest.approx(slow / (10.0 * 2.0))
  assert f["eta_phase_raw_s"] == pytest.approx(1500 / (400 / (slow * 70.0)))


def test_each_part_is_timed_at_the_rate_of_the_phase_with_the_closest_rows():
  clock = FakeClock()
  parts = [progress.Part(name, tokens=100, cost=1.0, length=n) for name, n in (("p", 128), ("q", 512), ("r", 512))]
  outlook = progress.Outlook(parts, clock=clock)
  for part, per_token in zip(parts, (1.0, 2.0, 3.0)):
    outlook.begin(part.name)
    outlook.started(part.name, 0.0)
    outlook.reported(part.name, 1.0 / per_token)
  assert outlook._per_cost(32) == 1.0 and outlook._per_cost(200) == 1.0  # 200 is closer to 128 than to 512 (ratio)
  assert outlook._per_cost(300) == 3.0 and outlook._per_cost(8192) == 3.0  # the latest of the equals


def test_a_progress_line_at_the_first_step_and_every_tenth():
  """A 30-step phase logged every 25 steps still reports at its first step, each 10% and its last step."""
  clock = FakeClock()
  per_step, steps = 4096, 30
  p = progress.Progress("decay_all", per_step * steps, clock=clock)
  reported = []
  for step in range(1, steps + 1):
    clock.t += 1.0
    if step % 25 == 0 or p.due(step * per_step):
      p.update(step, step * per_step)
      reported.append(step)
  fractions = [s / steps for s in reported]
  assert reported[0] == 1 and reported[-1] == steps
  assert max(np.diff([0.0] + fractions)) <= 0.1 + 1 / steps  # no gap wider than a tenth (and one step)
  assert len(reported) <= 12


def test_the_demo_outlook_counts_every_fine_tuning_column():
  """The fine-tuning part from the task sizes (finetune.workload): each column of the downstream table
  (finetune.score_curriculum: each phase, the merge and, with random_init, the first checkpoint's architecture with
  random weights) on each task; programs compiled per architecture (pretrain's RoPE theta differs from the later
  phases') and task; checkpoints read per column."""
  from helpers import load_config

  from data_pipeline import tasks
  from mmbert_jax import finetune, phases, train

  config = load_config("demo")
  parts = {}
  for random_init in (True, False):
    with config.unlocked():
      config.downstream.random_init = random_init
    outlook = phases.curriculum_outlook(config, "/tmp/unused")
    [parts[random_init]] = [p for p in outlook.parts if p.kind == "finetune"]
  # The TIES merge reads its base and the three decay variants; every phase after pretrain restores one checkpoint.
  assert [(p.name, p.loads) for p in outlook.parts if p.kind != "finetune"] == [
    ("pretrain", 0),
    ("midtrain", 1),
    ("decay_eng", 1),
    ("decay_cont", 1),
    ("decay_all", 1),
    ("merge", 4),
  ]
  cfg = train.model_config(phases.phase_config(config, "midtrain", "/tmp/unused"))
  settings = finetune.Settings(batch_size=config.downstream.batch_size, max_len=config.downstream.max_len)
  column = sum(finetune.workload(tasks.embedded(t), settings, cfg).flops(cfg) for t in config.downstream.tasks)
  columns = len(config.phases) + 1  # and the merge
  assert parts[False].flops == pytest.approx(columns * column, rel=1e-9)
  assert parts[True].flops == pytest.approx((columns + 1) * column, rel=1e-9)
  tasks_n = len(config.downstream.tasks)
  assert (parts[True].compiles, parts[True].loads) == (2 * tasks_n, columns + 1)  # the first checkpoint read twice
  assert (parts[False].compiles, parts[False].loads) == (2 * tasks_n, columns)
  assert parts[True].length == config.downstream.max_len  # no tokenizer yet
