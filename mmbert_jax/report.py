"""Pictures of a run: `python -m mmbert_jax.report --workdir=W [--out=DIR]` writes PNG plots and prints their paths.

W is a curriculum root (one sub-directory per phase) or one phase's workdir, local or gs://. From each phase's
records (written by the training loop: `metrics.jsonl`, `eval.jsonl`, `mixture.json`, `config.json`):

  loss.png      training loss over total tokens across phases, phase boundaries marked, the LR schedule beneath
  eval.png      held-out loss per language after each phase; languages that enter after the first phase are
                highlighted
  mixture.png   the sampling weight p_l of each language per phase (log scale) above the data's tokens n_l
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app, flags
from etils import epath

from data_pipeline import filesystem as fs
from mmbert_jax import cli

FLAGS = flags.FLAGS
PLOTS = ("loss", "eval", "mixture")


@dataclasses.dataclass
class Phase:
  """One phase's records (or a merged model's: evaluations only)."""

  name: str
  directory: str
  metrics: list[dict[str, Any]]
  evals: list[dict[str, Any]]
  mixture: dict[str, Any] | None
  config: dict[str, Any] | None


def _read_jsonl(path: epath.Path) -> list[dict[str, Any]]:
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
  )


def _start(phase: Phase) -> float:
  """The curriculum's token count when the phase started (after the phases it continues from)."""
  row = next((m for m in phase.metrics if "train/total_tokens" in m), None)
  return row["train/total_tokens"] - row["train/tokens"] if row else float("inf")


def load_run(workdir: str | epath.Path) -> list[Phase]:
  """The phases of `workdir` in curriculum order: a curriculum's own (its config.json's `phases`), else phases run
  one by one in sub-directories by the token count they started at; then any other sub-directory with records
  (e.g. a merged model). A single phase's workdir gives one."""
  workdir = fs.path(workdir, "--workdir")
  if (workdir / "metrics.jsonl").exists():
    config = _read_json(workdir / "config.json") or {}
    return [_phase(workdir, config.get("phase") or workdir.name)]
  root = _read_json(workdir / "config.json") or {}
  children = sorted(workdir.iterdir()) if workdir.is_dir() else []
  names = [p.name for p in children if p.is_dir() and any((p / f).exists() for f in ("metrics.jsonl", "eval.jsonl"))]
  if not names:
    raise FileNotFoundError(
      f"{workdir} holds no run records (metrics.jsonl or eval.jsonl, in it or in its phase sub-directories)"
    )
  phases = {n: _phase(workdir / n, n) for n in names}
  listed = [p for p in root.get("phases", []) if p in phases]
  rest = sorted((n for n in names if n not in listed), key=lambda n: (_start(phases[n]), n))
  return [phases[n] for n in listed + rest]


# ---------------------------------------------------------------------------------------------------------------
# The data each plot shows
# ---------------------------------------------------------------------------------------------------------------


def loss_curves(phases: Sequence[Phase]) -> dict[str, dict[str, np.ndarray]]:
  """{phase: {"tokens", "loss", "lr", "start"}}: x is the curriculum's total tokens (train/total_tokens;
  train/tokens where a run did not log it), `start` the phase's first token."""
  out = {}
  for p in phases:
    rows = [m for m in p.metrics if "train/loss" in m]
    if not rows:
      continue
    total = np.array([m.get("train/total_tokens", m.get("train/tokens", 0)) for m in rows], np.float64)
    phase_tokens = np.array([m.get("train/tokens", 0) for m in rows], np.float64)
    out[p.name] = {
      "tokens": total,
      "loss": np.array([m["train/loss"] for m in rows], np.float64),
      "lr": np.array([m.get("train/lr", np.nan) for m in rows], np.float64),
      "start": float(total[0] - phase_tokens[0]),
    }
  return out


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


# ---------------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------------


def _figure(**kwargs):
  from matplotlib.figure import Figure  # the object API: no global state, no display; imported when drawing

  return Figure(layout="constrained", **kwargs)


def plot_loss(phases: Sequence[Phase]):
  curves = loss_curves(phases)
  fig = _figure(figsize=(10, 6.5))
  ax, ax_lr = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
  for name, c in curves.items():
    marker = "o" if len(c["tokens"]) <= 50 else None  # a short phase may have logged a single point
    (line,) = ax.plot(c["tokens"], c["loss"], label=name, linewidth=1.2, marker=marker, markersize=3)
    ax_lr.plot(c["tokens"], c["lr"], color=line.get_color(), linewidth=1.2, marker=marker, markersize=3)
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
      fontsize=8,
      color="0.35",
    )
  ax.set_ylabel("training MLM loss")
  ax.set_title("training loss over the curriculum")
  ax.legend(fontsize=8)
  ax_lr.set_ylabel("learning rate")
  ax_lr.set_xlabel("total tokens (rows × sequence length, all phases)")
  return fig


def plot_eval(phases: Sequence[Phase]):
  evals = final_eval(phases)
  entry = entry_phase(phases)
  first = next((p.name for p in phases if p.mixture), None)
  order = [p.name for p in phases]
  languages = sorted(
    {lang for r in evals.values() for lang in r},
    key=lambda lang: (order.index(entry[lang]) if lang in entry else len(order), lang),
  )
  late = [lang for lang in languages if entry.get(lang) != first]
  fig = _figure(figsize=(min(max(9, 3 + 0.45 * len(languages)), 40), 5))
  ax = fig.subplots()
  x = np.arange(len(languages))
  for name, r in evals.items():
    ax.plot(x, [r.get(lang, np.nan) for lang in languages], marker="o", linewidth=1, markersize=4, label=name)
  for i, lang in enumerate(languages):
    if lang in late:
      ax.axvspan(i - 0.5, i + 0.5, color="tab:orange", alpha=0.12, linewidth=0)
  ax.set_xticks(
    x, [f"{lang}\n({entry.get(lang, 'eval only')})" if lang in late else lang for lang in languages], fontsize=7
  )
  for label, lang in zip(ax.get_xticklabels(), languages):
    if lang in late:
      label.set_color("tab:orange")
      label.set_fontweight("bold")
  ax.set_xlim(-0.5, len(languages) - 0.5)
  ax.set_ylabel("held-out MLM loss")
  ax.set_title(f"held-out loss per language after each phase (shaded: enters after {first or 'the first phase'})")
  ax.legend(fontsize=8)
  return fig


def plot_mixture(phases: Sequence[Phase]):
  weights, tokens = mixtures(phases)
  languages = sorted(tokens, key=lambda lang: (-tokens[lang], lang))
  fig = _figure(figsize=(min(max(9, 3 + 0.3 * len(languages)), 40), 7))
  ax, ax_n = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
  x = np.arange(len(languages))
  for name, w in weights.items():
    ax.plot(x, [w.get(lang, np.nan) for lang in languages], marker="o", linewidth=1, markersize=3, label=name)
  ax.set_yscale("log")
  ax.set_ylabel("sampling weight p_l")
  ax.set_title("language mixture per phase (p_l ∝ n_l^tau) above the data's tokens per language")
  ax.legend(fontsize=8)
  ax_n.bar(x, [tokens[lang] for lang in languages], color="0.5")
  ax_n.set_yscale("log")
  ax_n.set_ylabel("training tokens n_l")
  ax_n.set_xticks(x, languages, rotation=90, fontsize=6 if len(languages) > 40 else 8)
  return fig


def write_plots(workdir: str, out_dir: str | None = None) -> list[str]:
  """Every plot the records allow, as PNGs in `out_dir` (default `<workdir>/plots`; local or gs://); returns their
  paths."""
  phases = load_run(workdir)
  out_dir = fs.path(out_dir, "--out") if out_dir else fs.path(workdir, "--workdir") / "plots"
  out_dir.mkdir(parents=True, exist_ok=True)
  available = {
    "loss": bool(loss_curves(phases)),
    "eval": bool(final_eval(phases)),
    "mixture": bool(mixtures(phases)[1]),
  }
  paths = []
  for name, plot in (("loss", plot_loss), ("eval", plot_eval), ("mixture", plot_mixture)):
    if available[name]:
      path = out_dir / f"{name}.png"
      with path.open("wb") as f:  # a bucket object is written whole when the file closes
        plot(phases).savefig(f, format="png", dpi=110)
      paths.append(str(path))
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
