"""The progress line, its ETAs and the step-time split, from a fake clock; the bar on a terminal; the profiler."""

import io
import os

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
  clock.t += 50.0  # first report: includes the compilation
  f = p.update(10, 250_000)
  assert f["tokens_per_s"] == pytest.approx(50_000 / 50)
  assert f["fraction"] == pytest.approx(0.25)
  assert f["eta_phase_s"] == pytest.approx(750_000 / 1000)
  clock.t += 10.0  # from here on the rate excludes the first interval
  f = p.update(20, 350_000)
  assert f["tokens_per_s"] == pytest.approx(10_000)
  assert f["eta_phase_s"] == pytest.approx(650_000 / 10_000)
  clock.t += 30.0
  f = p.update(30, 450_000, mfu=0.5, loss=2.0)
  rate = 200_000 / 40.0  # since the first report
  assert f["tokens_per_s"] == pytest.approx(100_000 / 30)
  assert f["eta_phase_s"] == pytest.approx(550_000 / rate)
  assert f["eta_total_s"] == pytest.approx((550_000 + 3_000_000) / rate)
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
