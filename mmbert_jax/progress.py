"""Where a run stands and where its time goes: the console progress line, step-time split and profiler traces.

Every log step the console shows the phase, tokens done / budget, tokens/s, MFU, the ETA of the phase and of the
whole curriculum, and the time per step split into waiting for data, waiting for the device and host work. On a
terminal it is a progress bar that redraws in place; elsewhere (CI, log files) one plain line per log step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import jax
import numpy as np
from tqdm import tqdm

from data_pipeline import filesystem as fs


class StepTimer:
  """Host-side wall time of named sections (`with timer("data"): ...`) between two `split` calls.

  The loop dispatches a step and reads the previous step's results afterwards, so the time blocked in that read
  ("device") is the part of the step the host could not overlap; "host" is the wall time left over (putting
  batches on devices, metrics, logging, checkpoint bookkeeping).
  """

  def __init__(self, clock: Callable[[], float] = time.perf_counter):
    self._clock = clock
    self._start = clock()
    self._sections: dict[str, float] = {}

  @contextlib.contextmanager
  def __call__(self, name: str):
    t = self._clock()
    try:
      yield
    finally:
      self._sections[name] = self._sections.get(name, 0.0) + self._clock() - t

  def split(self, steps: int) -> dict[str, float]:
    """Seconds per step since the last split: `step` (wall), `data`, `device`, every other timed section, and
    `host` (the wall time outside all sections); then starts over."""
    now = self._clock()
    steps = max(steps, 1)
    out = {"step": (now - self._start) / steps, "data": 0.0, "device": 0.0}
    out.update({name: seconds / steps for name, seconds in self._sections.items()})
    out["host"] = max(out["step"] - sum(self._sections.values()) / steps, 0.0)
    self._start, self._sections = now, {}
    return out


def format_count(n: float) -> str:
  """1234 → '1.23k', 2.3e12 → '2.30T'."""
  for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(n) >= scale:
      return f"{n / scale:.2f}{unit}"
  return f"{n:.0f}"


def format_duration(seconds: float | None) -> str:
  """'3d04h', '5h07m', '12m05s', '42s'; '?' when unknown."""
  if seconds is None or not math.isfinite(seconds):
    return "?"
  s = int(round(max(seconds, 0.0)))
  d, s = divmod(s, 86400)
  h, s = divmod(s, 3600)
  m, s = divmod(s, 60)
  if d:
    return f"{d}d{h:02d}h"
  if h:
    return f"{h}h{m:02d}m"
  if m:
    return f"{m}m{s:02d}s"
  return f"{s}s"


@dataclasses.dataclass(frozen=True)
class Part:
  """A part of a curriculum's work, in what its time depends on.

  phase     trains `tokens` at `cost` training FLOPs per token in rows of `length` tokens, after a start (setup:
            restoring `loads` checkpoints or initialising; the step's compilation) and before an end (final
            checkpoint and evaluation)
  merge     reads `loads` checkpoints, saves one and evaluates it (like a phase's end)
  finetune  `flops` of training and scoring in rows of `length` tokens, `compiles` programs compiled and `loads`
            checkpoints read (`finetune.Workload`, one per checkpoint and task)
  """

  name: str
  kind: str = "phase"  # phase | merge | finetune
  tokens: float = 0.0
  cost: float = 1.0
  length: int = 0
  flops: float = 0.0
  compiles: int = 0
  loads: int = 0


# Until a phase has ended, its end (final checkpoint and evaluation) is taken as this fraction of its measured start.
END_PER_START = 0.25


class Outlook:
  """What is left of a curriculum, in seconds, from what its phases measured: each phase's setup (its start up to
  the first step), the first step (which holds the step's compilation), its loop rate in seconds per FLOP and its
  end.

  The parts not yet run are estimated from those measurements: a phase as the latest setup of its kind, a first
  step (the median measured: one compilation timed while the host was busier, or one served by the compilation
  cache, moves it little), its FLOPs at a measured rate and the latest end; the merge as a phase's end and one
  restore per checkpoint read; the fine-tuning as its FLOPs at a measured rate, a first step per program it compiles
  and one restore per checkpoint it reads. A restore is the
  setup of the latest phase that started from a checkpoint (none yet: taken as 0); a phase that initialises instead
  (the first) also pays the process's one-time costs, which no later part repeats. A part's FLOPs are timed at
  the rate of the measured phase whose rows are closest to its own in length (the latest of equals): a step's
  FLOPs per second depend on its shapes, and fine-tuning's short rows run like pretraining's, not like the long
  rows of the later phases. The rates are the steady ones (`Progress.steady_rate`), without one-off stalls.

  The curriculum calls `begin(name)` before each phase and `end(name)` after it; the phase's `Progress` tells
  its first report (the start), its tokens/s and its last report (where its end begins).
  """

  def __init__(self, parts: Sequence[Part], clock: Callable[[], float] = time.monotonic):
    self.parts = list(parts)
    self._clock = clock
    self._begun: dict[str, float] = {}
    self._last_report: dict[str, float] = {}
    self.start_s: dict[str, float] = {}  # from begin() to the first report
    self.first_step_s: dict[str, float] = {}  # the first report's interval: the first step with its compilation
    self.end_s: dict[str, float] = {}
    self.seconds_per_cost: dict[str, float] = {}  # seconds per token / Part.cost (per FLOP), per phase measured
    self.shown: dict[str, tuple[float, float]] = {}  # the curriculum's ETA last shown (see Progress)

  def _part(self, name: str) -> Part:
    return next(p for p in self.parts if p.name == name)

  def begin(self, name: str) -> None:
    self._begun[name] = self._clock()

  def started(self, name: str, first_step_s: float = 0.0) -> None:
    """The phase's first progress report, `first_step_s` after its loop began: what came before it is the start."""
    if name in self._begun and name not in self.start_s:
      self.start_s[name] = self._clock() - self._begun[name]
      self.first_step_s[name] = min(first_step_s, self.start_s[name])

  def reported(self, name: str, tokens_per_s: float | None) -> None:
    self._last_report[name] = self._clock()
    if tokens_per_s:
      self.seconds_per_cost[name] = 1.0 / (tokens_per_s * self._part(name).cost)

  def end(self, name: str) -> None:
    """The phase is done: the time since its last report is its end."""
    if name in self._last_report:
      self.end_s[name] = self._clock() - self._last_report[name]

  def _latest(self, measured: dict[str, float]) -> float | None:
    """The value of the latest part measured (curriculum order)."""
    values = [measured[p.name] for p in self.parts if p.name in measured]
    return values[-1] if values else None

  def _per_cost(self, length: int) -> float | None:
    """Seconds per FLOP of the measured phase whose rows are closest to `length` tokens (the latest of equals)."""
    measured = [p for p in self.parts if p.name in self.seconds_per_cost]
    if not measured:
      return None
    distance = lambda p: abs(math.log(max(p.length, 1) / max(length, 1)))
    return self.seconds_per_cost[min(reversed(measured), key=distance).name]

  def _setup(self, restores: bool) -> float:
    """The setup (start before the first step) of the latest measured phase that started from a checkpoint
    (`restores`) or initialised; 0 when there is none."""
    kind = {n: s - self.first_step_s[n] for n, s in self.start_s.items() if bool(self._part(n).loads) == restores}
    return self._latest(kind) or 0.0

  def after_loop(self, name: str) -> float | None:
    """Seconds of the curriculum's work after the loop of phase `name` (its end, the later phases, the merge, the
    fine-tuning); None until a loop rate has been measured."""
    start = self._latest(self.start_s)
    if start is None or not self.seconds_per_cost:
      return None
    restore = self._setup(restores=True)
    compile_s = float(np.median(list(self.first_step_s.values())))
    end = self._latest(self.end_s)
    end = END_PER_START * start if end is None else end
    i = next(i for i, p in enumerate(self.parts) if p.name == name)
    seconds = end
    for part in self.parts[i + 1 :]:
      if part.kind == "phase":
        setup = self._setup(restores=bool(part.loads))
        seconds += setup + compile_s + part.tokens * part.cost * self._per_cost(part.length) + end
      elif part.kind == "merge":
        seconds += end + part.loads * restore
      else:
        seconds += part.flops * self._per_cost(part.length) + part.compiles * compile_s + part.loads * restore
    return seconds


class Progress:
  """Tokens done against the phase's budget, and ETAs at the rate measured since the first report.

  The first report's interval holds the compilation, so rates are measured from the first report on (the ETA is
  unknown until a second report). The curriculum's ETA adds the work after this phase's loop: `outlook`'s
  estimate, or else the `later_tokens` (the budget of the phases still to run) at this phase's rate.

  Both ETAs are smoothed: a new estimate may differ from the previous one counted down by the time since (what an
  exact estimate would give) by at most the noise of the measured rate (twice the relative standard error of the
  interval rates, between 2% and 50%), so one slow interval (an evaluation, a recompilation) moves it by that
  much and a lasting change of rate moves it over a few reports.

  `due(tokens)`: whether a step between log steps should also report (the first step read, each tenth of the
  phase, the last step), so that a phase with few log steps is not silent.
  """

  def __init__(
    self,
    phase: str,
    budget: int,
    *,
    tokens: int = 0,
    later_tokens: int = 0,
    outlook: Outlook | None = None,
    clock: Callable[[], float] = time.monotonic,
  ):
    self.phase, self.budget, self.later_tokens, self.outlook = phase, budget, later_tokens, outlook
    self._clock = clock
    self._last = self._first = (clock(), tokens)
    self._reports = 0
    self._intervals: list[tuple[float, float]] = []  # (seconds, tokens) between reports after the first
    # (time, value) of the ETA last shown; the curriculum's lives in the outlook, so it stays smooth across phases.
    self._shown: dict[str, tuple[float, float]] = {}
    self._shown_total = outlook.shown if outlook is not None else self._shown
    self._next_tenth = self._tenth(tokens) + 1

  def _tenth(self, tokens: int) -> int:
    return int(10 * tokens // self.budget) if self.budget else 10

  def due(self, tokens: int) -> bool:
    return self._reports == 0 or self._tenth(tokens) >= self._next_tenth or tokens >= self.budget

  def noise(self) -> float:
    """Relative uncertainty of the measured rate (see the class docstring)."""
    if len(self._intervals) < 2:
      return 0.5
    dt, dtok = np.array(self._intervals).T
    rates = dtok / np.maximum(dt, 1e-9)
    mean = np.average(rates, weights=dt)
    std = np.sqrt(np.average((rates - mean) ** 2, weights=dt))
    return float(np.clip(2 * std / mean / np.sqrt(len(rates)), 0.02, 0.5)) if mean > 0 else 0.5

  def steady_rate(self) -> float | None:
    """Tokens/s of the loop without its stalls (a recompilation when batch warmup changes the step's shape, a
    checkpoint), which later parts need not repeat: the median of the interval rates, once there are three."""
    if len(self._intervals) < 3:
      return None
    dt, dtok = np.array(self._intervals).T
    return float(np.median(dtok / np.maximum(dt, 1e-9)))

  @staticmethod
  def _smoothed(shown: dict[str, tuple[float, float]], key: str, now: float, raw: float | None, noise: float):
    if raw is None:
      return None
    if key in shown:
      t, value = shown[key]
      expected = max(value - (now - t), 0.0)
      raw = float(np.clip(raw, expected * (1 - noise), expected * (1 + noise))) if expected > 0 else raw
    shown[key] = (now, raw)
    return raw

  def update(self, step: int, tokens: int, **extra: Any) -> dict[str, Any]:
    """Fields of the progress line at `tokens` (extra fields, e.g. mfu, loss or the step-time split, pass
    through)."""
    now = self._clock()
    t_last, tok_last = self._last
    interval = (tokens - tok_last) / (now - t_last) if now > t_last else None
    t0, tok0 = self._first
    rate = (tokens - tok0) / (now - t0) if self._reports and now > t0 and tokens > tok0 else None
    if self._reports == 0:
      self._first = (now, tokens)
      if self.outlook is not None:
        self.outlook.started(self.phase, first_step_s=now - t_last)
    else:
      self._intervals.append((now - t_last, tokens - tok_last))
    self._reports += 1
    self._last = (now, tokens)
    self._next_tenth = self._tenth(tokens) + 1
    if self.outlook is not None:
      self.outlook.reported(self.phase, self.steady_rate() or rate)
    remaining = max(self.budget - tokens, 0)
    eta = remaining / rate if rate else None
    if self.outlook is not None:
      after = self.outlook.after_loop(self.phase)
      total = eta + after if eta is not None and after is not None else None
    else:
      total = (remaining + self.later_tokens) / rate if rate else None
    noise = self.noise()
    return {
      "phase": self.phase,
      "step": step,
      "tokens": tokens,
      "budget": self.budget,
      "fraction": tokens / self.budget if self.budget else 1.0,
      "tokens_per_s": interval,
      "eta_phase_s": 0.0 if remaining == 0 else self._smoothed(self._shown, "phase", now, eta, noise),
      "eta_total_s": self._smoothed(self._shown_total, "total", now, total, noise),
      "eta_phase_raw_s": eta,  # the estimates before smoothing
      "eta_total_raw_s": total,
      **extra,
    }


def format_progress(f: dict[str, Any]) -> str:
  """One line: 'pretrain step 120 | 1.23M/4.00M tok (30.8%) | 812.00k tok/s | MFU 41.2% | ETA 3m25s, curriculum
  1h02m | 0.630 s/step: data 0.010 device 0.600 host 0.020 | loss 3.210 acc 0.412 lr 8.0e-04'."""
  parts = [
    f"{f['phase']} step {f['step']}",
    f"{format_count(f['tokens'])}/{format_count(f['budget'])} tok ({100 * f['fraction']:.1f}%)",
  ]
  if f.get("tokens_per_s") is not None:
    parts.append(f"{format_count(f['tokens_per_s'])} tok/s")
  if f.get("mfu") is not None:
    parts.append(f"MFU {100 * f['mfu']:.1f}%")
  eta = f"ETA {format_duration(f.get('eta_phase_s'))}"
  if f.get("eta_total_s") is not None and f["eta_total_s"] != f.get("eta_phase_s"):
    eta += f", curriculum {format_duration(f['eta_total_s'])}"
  parts.append(eta)
  if "step_s" in f:
    parts.append(f"{f['step_s']:.3f} s/step: data {f['data_s']:.3f} device {f['device_s']:.3f} host {f['host_s']:.3f}")
  shown = [
    f"{name} {f[key]:{fmt}}"
    for key, name, fmt in (("loss", "loss", ".3f"), ("accuracy", "acc", ".3f"), ("lr", "lr", ".1e"))
    if f.get(key) is not None
  ]
  if shown:
    parts.append(" ".join(shown))
  return " | ".join(parts)


class Console:
  """Progress lines and messages on one stream: a bar redrawn in place on a terminal, plain lines otherwise."""

  def __init__(self, stream: TextIO | None = None, *, bar: bool | None = None, enabled: bool = True):
    self.stream = stream or sys.stderr
    self.enabled = enabled
    self.bar = (bar if bar is not None else _isatty(self.stream)) and enabled
    self._tqdm = None

  def progress(self, fields: dict[str, Any]) -> None:
    if not self.enabled:
      return
    if not self.bar:
      print(format_progress(fields), file=self.stream, flush=True)
      return
    total = max(int(fields["budget"]), 1)
    if self._tqdm is None:
      self._tqdm = tqdm(total=total, file=self.stream, dynamic_ncols=True, bar_format="{bar:24}| {desc}", leave=True)
    self._tqdm.n = min(int(fields["tokens"]), total)
    self._tqdm.set_description_str(format_progress(fields), refresh=True)

  def print(self, text: str) -> None:
    """A message above the bar (or a plain line)."""
    if not self.enabled:
      return
    if self._tqdm is not None:
      self._tqdm.write(text, file=self.stream)
    else:
      print(text, file=self.stream, flush=True)

  def close(self) -> None:
    if self._tqdm is not None:
      self._tqdm.close()
      self._tqdm = None


def _isatty(stream) -> bool:
  try:
    return stream.isatty()
  except (AttributeError, ValueError):
    return False


@dataclasses.dataclass
class Profiler:
  """A `jax.profiler` trace of steps [start_step, start_step + num_steps) into `<workdir>/profile`, on one
  process by default (TensorBoard's profile plugin and XProf read it: `tensorboard --logdir <workdir>`)."""

  workdir: str
  start_step: int
  num_steps: int
  process: int = 0  # the process that traces; -1: every process
  process_index: int = 0
  _active: bool = False

  @property
  def directory(self) -> str:
    return str(fs.path(self.workdir, "workdir") / "profile")

  @property
  def wanted(self) -> bool:
    return self.num_steps > 0 and self.process in (-1, self.process_index)

  def before_step(self, step: int) -> None:
    """`step`: the number of steps done so far (the next step's index)."""
    if self.wanted and not self._active and step == self.start_step:
      jax.profiler.start_trace(self.directory)
      self._active = True

  def after_step(self, step: int, wait: Callable[[], Any]) -> None:
    """`step`: steps done so far; `wait` blocks until the traced steps have run on the device."""
    if self._active and step >= self.start_step + self.num_steps:
      self.stop(wait)

  def stop(self, wait: Callable[[], Any] | None = None) -> None:
    if self._active:
      if wait is not None:
        wait()
      jax.profiler.stop_trace()
      self._active = False
