"""Pictures of a run: `python -m mmbert_jax.report --workdir=W [--out=DIR]` writes PNG plots and prints their paths.

W is a curriculum root (one sub-directory per phase) or one phase's workdir, local or gs://, finished or still
running (what exists is plotted). From each phase's records (written by the training loop: `steps.jsonl`,
`metrics.jsonl`, `eval.jsonl`, `mixture.json`, `config.json`):

  loss.png      training loss of every step over total tokens across phases (a smoothed line over it), phase
                boundaries marked; beneath, each phase's LR schedule (from its config.json) with the logged LR on top
  eval.png      held-out loss per language after each phase; languages that enter after the first phase are
                highlighted
  mixture.png   the sampling weight p_l of each language per phase (log scale) above the data's tokens n_l; with
                many languages, the largest by name and the rest as one group, beside a log-log rank plot of all
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app, flags
from etils import epath

from data_pipeline import filesystem as fs
from mmbert_jax import cli, schedules

FLAGS = flags.FLAGS
PLOTS = ("loss", "eval", "mixture")


RECORDS = ("steps.jsonl", "metrics.jsonl", "eval.jsonl", "mixture.json")  # what marks a phase's workdir
MAX_LABELS = 60  # labelled ticks per axis: more are unreadable at the default size
HEAD = 40  # with more than MAX_LABELS languages, the largest this many by name and the rest as one group
FONT = 8
DPI = 110


@dataclasses.dataclass
class Phase:
  """One phase's records (or a merged model's: evaluations only)."""

  name: str
  directory: str
  metrics: list[dict[str, Any]]
  evals: list[dict[str, Any]]
  mixture: dict[str, Any] | None
  config: dict[str, Any] | None
  steps: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def _read_jsonl(path: epath.Path) -> list[dict[str, Any]]:
  """The records of a JSONL file; a last line still being written (a running phase) is left out."""
  if not path.exists():
    return []
  lines = path.read_text().split("\n")  # the text after the last newline is empty, or a line not yet whole
  return [json.loads(line) for line in lines[:-1] if line.strip()]


def _read_json(path: epath.Path) -> dict[str, Any] | None:
  return json.loads(path.read_text()) if path.exists() else None


def _phase(directory: epath.Path, name: str) -> Phase:
  return Phase(
    name,
    str(directory),
    _read_jsonl(directory / "metrics.jsonl"),
    _read_jsonl(directory / "eval.jsonl"),
    _read_json(directory / "mixture.json"),
    _read_json(directory / "config.json"),
    _read_jsonl(directory / "steps.jsonl"),
  )


def _start(phase: Phase) -> float:
  """The curriculum's token count when the phase started (after the phases it continues from)."""
  row = next((m for m in phase.metrics if "train/total_tokens" in m), None)
  if row:
    return row["train/total_tokens"] - row["train/tokens"]
  row = next((m for m in phase.steps if "total_tokens" in m), None)
  return row["total_tokens"] - row["tokens"] if row else float("inf")


def load_run(workdir: str | epath.Path) -> list[Phase]:
  """The phases of `workdir` in curriculum order: a curriculum's own (its config.json's `phases`), else phases run
  one by one in sub-directories by the token count they started at; then any other sub-directory with records
  (e.g. a merged model). A single phase's workdir gives one."""
  workdir = fs.path(workdir, "--workdir")
  if any((workdir / f).exists() for f in RECORDS):
    config = _read_json(workdir / "config.json") or {}
    return [_phase(workdir, config.get("phase") or workdir.name)]
  root = _read_json(workdir / "config.json") or {}
  children = sorted(workdir.iterdir()) if workdir.is_dir() else []
  names = [p.name for p in children if p.is_dir() and any((p / f).exists() for f in RECORDS)]
  if not names:
    raise FileNotFoundError(
      f"{workdir} holds no run records ({', '.join(RECORDS)}, in it or in its phase sub-directories)"
    )
  phases = {n: _phase(workdir / n, n) for n in names}
  listed = [p for p in root.get("phases", []) if p in phases]
  rest = sorted((n for n in names if n not in listed), key=lambda n: (_start(phases[n]), n))
  return [phases[n] for n in listed + rest]


# ---------------------------------------------------------------------------------------------------------------
# The data each plot shows
# ---------------------------------------------------------------------------------------------------------------


def smooth(y: np.ndarray, window: int) -> np.ndarray:
  """The centred moving mean of `y` over `window` points (fewer at the ends; NaN points left out)."""
  y = np.asarray(y, np.float64)
  ok = np.isfinite(y)
  kernel = np.ones(max(int(window), 1))
  total = np.convolve(np.where(ok, y, 0.0), kernel, mode="same")
  count = np.convolve(ok.astype(np.float64), kernel, mode="same")
  with np.errstate(invalid="ignore", divide="ignore"):
    return total / count


def loss_curves(phases: Sequence[Phase]) -> dict[str, dict[str, np.ndarray]]:
  """{phase: {"tokens", "loss", "lr", "start"}}: x is the curriculum's total tokens (train/total_tokens;
  train/tokens where a run did not log it), `start` the phase's first token. Every step where the phase has
  steps.jsonl, else its log steps (metrics.jsonl)."""
  out = {}
  for p in phases:
    steps = [s for s in p.steps if "loss" in s]
    rows = [m for m in p.metrics if "train/loss" in m]
    if steps:
      total = np.array([s.get("total_tokens", s.get("tokens", 0)) for s in steps], np.float64)
      phase_tokens = np.array([s.get("tokens", 0) for s in steps], np.float64)
      loss = np.array([s["loss"] for s in steps], np.float64)
      lr = np.array([s.get("lr", np.nan) for s in steps], np.float64)
    elif rows:
      total = np.array([m.get("train/total_tokens", m.get("train/tokens", 0)) for m in rows], np.float64)
      phase_tokens = np.array([m.get("train/tokens", 0) for m in rows], np.float64)
      loss = np.array([m["train/loss"] for m in rows], np.float64)
      lr = np.array([m.get("train/lr", np.nan) for m in rows], np.float64)
    else:
      continue
    out[p.name] = {"tokens": total, "loss": loss, "lr": lr, "start": float(total[0] - phase_tokens[0])}
  return out


def lr_schedule_curve(phase: Phase, start: float, points: int = 400) -> tuple[np.ndarray, np.ndarray] | None:
  """(total tokens, LR) of the phase's schedule over its whole token budget, from its config.json (None without
  one): the same function the training loop computes each step's LR with (mmbert_jax/train.py `lr_schedule`)."""
  c = phase.config
  if not c or "schedule" not in c or "optim" not in c or not c.get("train_tokens"):
    return None
  s = c["schedule"]
  decay_start = s.get("decay_start_tokens", -1)
  decay_start = None if decay_start is None or decay_start < 0 else decay_start
  schedule = schedules.host_wsd_schedule(
    c["optim"]["peak_lr"],
    warmup_tokens=s.get("warmup_tokens", 0),
    decay_start_tokens=decay_start,
    decay_tokens=s.get("decay_tokens", 0),
    final_fraction=s.get("final_fraction", 0.0),
    decay_shape=s.get("decay_shape", "1-sqrt"),
  )
  budget = float(c["train_tokens"])
  corners = [t for t in (s.get("warmup_tokens", 0), decay_start) if t is not None and 0 < t < budget]
  t = np.unique(np.concatenate([np.linspace(0.0, budget, points), corners]))
  return start + t, np.asarray(schedule(t), np.float64)


def final_eval(phases: Sequence[Phase]) -> dict[str, dict[str, float]]:
  """{phase: {language: held-out loss}} from each phase's last evaluation ("all" left out)."""
  return {
    p.name: {lang: r["loss"] for lang, r in p.evals[-1]["results"].items() if lang != "all"} for p in phases if p.evals
  }


def entry_phase(phases: Sequence[Phase]) -> dict[str, str]:
  """{language: the first phase that trains on it}."""
  out: dict[str, str] = {}
  for p in phases:
    for lang in (p.mixture or {}).get("languages", []):
      out.setdefault(lang, p.name)
  return out


def mixtures(phases: Sequence[Phase]) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
  """({phase: {language: p_l}}, {language: n_l}), n_l as the phases' data report it."""
  weights, tokens = {}, {}
  for p in phases:
    if p.mixture:
      weights[p.name] = dict(zip(p.mixture["languages"], p.mixture["weights"]))
      tokens.update(zip(p.mixture["languages"], p.mixture["tokens"]))
  return weights, tokens


def head_and_tail(languages: Sequence[str], head: int = HEAD) -> tuple[list[str], list[str]]:
  """All languages when at most MAX_LABELS, else the first `head` and the rest (grouped in the plots)."""
  languages = list(languages)
  if len(languages) <= MAX_LABELS:
    return languages, []
  return languages[:head], languages[head:]


# ---------------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------------


def _figure(**kwargs):
  from matplotlib.figure import Figure  # the object API: no global state, no display; imported when drawing

  return Figure(layout="constrained", dpi=DPI, **kwargs)


def plot_loss(phases: Sequence[Phase]):
  from matplotlib.ticker import EngFormatter

  curves = loss_curves(phases)
  fig = _figure(figsize=(10, 6.5))
  ax, ax_lr = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
  handles = []
  for p in phases:
    if p.name not in curves:
      continue
    c = curves[p.name]
    n = len(c["tokens"])
    marker = "o" if n <= 50 else None  # a short phase may have a single point
    faint = 0.35 if n >= 10 else 1.0  # under the moving mean, when there is one
    (line,) = ax.plot(c["tokens"], c["loss"], label=p.name, linewidth=0.8, alpha=faint, marker=marker, markersize=2.5)
    line.set_gid(f"{p.name}/loss")
    color = line.get_color()
    handle = line
    if n >= 10:  # a window of ~5% of the phase's points, at least 5
      window = max(5, n // 20)
      (handle,) = ax.plot(
        c["tokens"], smooth(c["loss"], window), color=color, linewidth=1.6, label=f"_{p.name} moving mean"
      )
      handle.set_gid(f"{p.name}/smoothed")
    handles.append((handle, p.name))
    planned = lr_schedule_curve(p, c["start"])
    if planned is not None:
      (sched,) = ax_lr.plot(*planned, color=color, linewidth=1.2, label=f"_{p.name} schedule")
      sched.set_gid(f"{p.name}/schedule")
    (logged,) = ax_lr.plot(
      c["tokens"],
      c["lr"],
      color=color,
      linestyle="none" if planned is not None else "-",
      marker="o" if n <= 200 or planned is None else ".",
      markersize=2.5 if n <= 200 else 1.0,
      label=f"_{p.name} logged",
    )
    logged.set_gid(f"{p.name}/logged")
  starts: dict[float, list[str]] = {}
  for name, c in curves.items():
    starts.setdefault(c["start"], []).append(name)
  for start, names in sorted(starts.items()):
    for a in (ax, ax_lr):
      a.axvline(start, color="0.6", linestyle="--", linewidth=0.8)
    ax.annotate(
      " / ".join(names),
      (start, 1.0),
      xycoords=("data", "axes fraction"),
      rotation=90,
      va="top",
      ha="right",
      fontsize=FONT,
      color="0.35",
    )
  ax.set_ylabel("training MLM loss")
  ax.set_title("training loss over the curriculum (every step; line: moving mean)")
  ax.legend([h for h, _ in handles], [name for _, name in handles], fontsize=FONT)
  ax_lr.set_ylabel("learning rate")
  ax_lr.set_xlabel("total tokens (rows × sequence length, all phases); LR: schedule (line), logged (dots)")
  ax_lr.xaxis.set_major_formatter(EngFormatter(sep=""))  # 400k, 1.2M, 2T
  return fig


def _blocks(keys: Sequence[Any]) -> list[tuple[int, int]]:
  """[start, end) index ranges of the runs of equal consecutive keys."""
  edges = [0] + [i for i in range(1, len(keys)) if keys[i] != keys[i - 1]] + [len(keys)]
  return list(zip(edges[:-1], edges[1:]))


def _sparse_ticks(ax, x: np.ndarray, labels: Sequence[str]) -> int:
  """At most MAX_LABELS evenly spaced labelled ticks; returns the spacing."""
  every = max(1, int(np.ceil(len(labels) / MAX_LABELS)))
  ax.set_xticks(x[::every], list(labels)[::every], rotation=90, fontsize=7)
  return every


def plot_eval(phases: Sequence[Phase]):
  evals = final_eval(phases)
  entry = entry_phase(phases)
  _, tokens = mixtures(phases)
  first = next((p.name for p in phases if p.mixture), None)
  order = [p.name for p in phases]
  many = len({lang for r in evals.values() for lang in r}) > MAX_LABELS
  # Few languages: by entry phase, then name. Many: by entry phase, then training tokens (largest first).
  languages = sorted(
    {lang for r in evals.values() for lang in r},
    key=lambda lang: (
      order.index(entry[lang]) if lang in entry else len(order),
      -tokens.get(lang, 0) if many else 0,
      lang,
    ),
  )
  late = [entry.get(lang) != first for lang in languages]
  fig = _figure(figsize=(min(max(9, 3 + 0.5 * len(languages)), 16), 5.5))
  ax = fig.subplots()
  x = np.arange(len(languages))
  for name, r in evals.items():
    y = [r.get(lang, np.nan) for lang in languages]
    if many:
      ax.plot(x, y, marker="o", linestyle="none", markersize=2, label=name)
    else:
      ax.plot(x, y, marker="o", linewidth=1, markersize=4, label=name)
  if many:  # one shaded span per block of languages entering in the same phase
    for begin, end in _blocks([entry.get(lang) for lang in languages]):
      if not late[begin]:
        continue
      ax.axvspan(begin - 0.5, end - 0.5, color="tab:orange", alpha=0.12, linewidth=0)
      ax.annotate(
        f"enter in {entry.get(languages[begin], 'eval only')}",
        ((begin + end - 1) / 2, 1.0),
        xycoords=("data", "axes fraction"),
        ha="center",
        va="top",
        fontsize=FONT,
        color="tab:orange",
      )
    every = _sparse_ticks(ax, x, languages)
    ax.set_xlabel(f"{len(languages):,} languages by entry phase, then training tokens (every {every}th named)")
  else:
    for i, is_late in enumerate(late):
      if is_late:
        ax.axvspan(i - 0.5, i + 0.5, color="tab:orange", alpha=0.12, linewidth=0)
    ax.set_xticks(
      x,
      [f"{lang}\n({entry.get(lang, 'eval only')})" if is_late else lang for lang, is_late in zip(languages, late)],
      fontsize=7,
      rotation=90 if len(languages) > 20 else 0,
    )
    for label, is_late in zip(ax.get_xticklabels(), late):
      if is_late:
        label.set_color("tab:orange")
        label.set_fontweight("bold")
  ax.set_xlim(-0.5, len(languages) - 0.5)
  ax.set_ylabel("held-out MLM loss")
  ax.set_title(f"held-out loss per language after each phase (shaded: enters after {first or 'the first phase'})")
  ax.legend(fontsize=FONT)
  return fig


def plot_mixture(phases: Sequence[Phase]):
  weights, tokens = mixtures(phases)
  languages = sorted(tokens, key=lambda lang: (-tokens[lang], lang))
  head, tail = head_and_tail(languages)
  if tail:
    fig = _figure(figsize=(14, 7))
    (ax, ax_rank), (ax_n, ax_rank_n) = fig.subplots(2, 2, sharex="col", width_ratios=(3, 2), height_ratios=(3, 2))
  else:
    fig = _figure(figsize=(min(max(9, 3 + 0.2 * len(languages)), 14), 7))
    ax, ax_n = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
  # The named languages, then (with many) one group of the rest: its summed p_l and n_l.
  x = np.arange(len(head) + bool(tail))
  labels = head + ([f"other {len(tail):,}"] if tail else [])
  for name, w in weights.items():
    y = [w.get(lang, np.nan) for lang in head]
    if tail:
      in_tail = [w[lang] for lang in tail if lang in w]
      y.append(sum(in_tail) if in_tail else np.nan)
    (line,) = ax.plot(x, y, marker="o", linewidth=1, markersize=3, label=name)
    line.set_gid(f"{name}/p")
  ax.set_yscale("log")
  ax.set_ylabel("sampling weight p_l")
  ax.set_title(
    f"mixture per phase (p_l ∝ n_l^tau): the {len(head)} largest languages by n_l, the other {len(tail):,} summed"
    if tail
    else "language mixture per phase (p_l ∝ n_l^tau) above the data's tokens per language",
    fontsize=FONT + 2,
  )
  ax.legend(fontsize=FONT)
  bars = ax_n.bar(x, [tokens[lang] for lang in head] + ([sum(tokens[lang] for lang in tail)] if tail else []))
  for bar in bars:
    bar.set_color("0.5")
  if tail:
    bars[-1].set_color("0.75")
  ax_n.set_yscale("log")
  ax_n.set_ylabel("training tokens n_l")
  ax_n.set_xticks(x, labels, rotation=90, fontsize=7 if len(labels) > 40 else FONT)
  ax_n.set_xlim(-0.6, len(x) - 0.4)
  if tail:  # every language by its rank in n_l, log-log: the whole distribution at a glance
    rank = np.arange(1, len(languages) + 1)
    for name, w in weights.items():
      (line,) = ax_rank.plot(rank, [w.get(lang, np.nan) for lang in languages], linewidth=1, label=name)
      line.set_gid(f"{name}/rank_p")
    ax_rank.set(xscale="log", yscale="log", ylabel="p_l")
    ax_rank.set_title(
      f"all {len(languages):,} languages by rank of n_l (named: left of the dashed line)", fontsize=FONT + 2
    )
    (line,) = ax_rank_n.plot(rank, [tokens[lang] for lang in languages], color="0.4", linewidth=1.2)
    line.set_gid("rank_n")
    ax_rank_n.set(xscale="log", yscale="log", xlabel="rank of the language by n_l", ylabel="n_l")
    ax_rank.axvline(len(head) + 0.5, color="0.6", linestyle="--", linewidth=0.8)
    ax_rank_n.axvline(len(head) + 0.5, color="0.6", linestyle="--", linewidth=0.8)
  return fig


def write_plots(workdir: str, out_dir: str | None = None) -> list[str]:
  """Every plot the records allow, as PNGs in `out_dir` (default `<workdir>/plots`; local or gs://); returns their
  paths."""
  phases = load_run(workdir)
  out_dir = fs.path(out_dir, "--out") if out_dir else fs.path(workdir, "--workdir") / "plots"
  available = {
    "loss": bool(loss_curves(phases)),
    "eval": bool(final_eval(phases)),
    "mixture": bool(mixtures(phases)[1]),
  }
  paths = []
  # Drawn into a temporary folder and moved into place together: a kill or an error leaves the plots of before.
  with fs.staged_dir(out_dir) as staged:
    for name, plot in (("loss", plot_loss), ("eval", plot_eval), ("mixture", plot_mixture)):
      if available[name]:
        # local-only: staged_dir's folder is local (a bucket gets it uploaded)
        plot(phases).savefig(os.path.join(staged, f"{name}.png"), format="png", dpi=DPI)
        paths.append(str(out_dir / f"{name}.png"))
  return paths


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "A curriculum root or one phase's workdir.")
  flags.DEFINE_string("out", "", "Where the PNGs go (default <workdir>/plots).")


def main(argv):
  cli.start(argv)
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  try:
    paths = write_plots(FLAGS.workdir, FLAGS.out or None)
  except FileNotFoundError as e:
    raise cli.ConfigError(f"--workdir={FLAGS.workdir}: {e}") from None
  except ValueError as e:  # not a local or gs:// path (the message names the flag)
    raise cli.ConfigError(str(e)) from None
  for path in paths:
    print(path)


if __name__ == "__main__":
  cli.run(main, define_flags)
