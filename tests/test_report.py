"""`python -m mmbert_jax.report`: PNGs whose plotted data are the run's records."""

import json
import os

import numpy as np
import pytest
from helpers import load_config
from tiny_run import run_module

from mmbert_jax import metrics, report

# A curriculum in miniature: (phase, phase it starts from, tokens per step, steps, languages).
PHASES = [
  ("pretrain", None, 1000, 6, ("en", "de", "ru")),
  ("midtrain", "pretrain", 2000, 4, ("en", "de", "ru", "sw")),
  ("decay_eng", "midtrain", 2000, 3, ("en", "de", "ru", "sw")),
  ("decay_all", "midtrain", 2000, 3, ("en", "de", "ru", "sw", "fo")),
]
N_L = {"en": 9e6, "de": 4e6, "ru": 3e6, "sw": 2e5, "fo": 3e4}
EVAL_LANGUAGES = ("en", "de", "ru", "sw", "fo", "ti")


def _write_curriculum(root):
  """Records as the training loop writes them, through MetricWriter."""
  rng = np.random.default_rng(0)
  config = load_config("demo")
  config.phases = tuple(p[0] for p in PHASES)
  metrics.save_config(str(root), config)
  ends = {}
  for phase, parent, per_step, steps, langs in PHASES:
    before = ends.get(parent, 0)
    writer = metrics.MetricWriter(str(root / phase), enabled=True, console=False)
    w = np.array([N_L[l] ** 0.5 for l in langs])
    writer.write_json(
      "mixture",
      {"phase": phase, "languages": list(langs), "tokens": [N_L[l] for l in langs], "weights": list(w / w.sum())},
    )
    for step in range(1, steps + 1):
      writer.write(
        step,
        {
          "train/loss": float(rng.uniform(2, 6)),
          "train/lr": float(rng.uniform(1e-4, 1e-3)),
          "train/tokens": step * per_step,
          "train/total_tokens": before + step * per_step,
        },
      )
    results = {l: {"loss": float(rng.uniform(2, 8)), "accuracy": 0.3, "masked_tokens": 50.0} for l in EVAL_LANGUAGES}
    writer.write_eval(steps, {**results, "all": {"loss": 4.0}}, phase=phase, total_tokens=before + steps * per_step)
    writer.close()
    ends[phase] = before + steps * per_step


@pytest.fixture
def curriculum(tmp_path):
  root = tmp_path / "run"
  _write_curriculum(root)
  return root


def _records(path, name):
  with open(path / name) as f:
    return [json.loads(line) for line in f]


def test_loss_plot_is_the_metrics_over_total_tokens(curriculum):
  fig = report.plot_loss(report.load_run(str(curriculum)))
  ax, ax_lr = fig.axes
  curves = {line.get_label(): line.get_xydata() for line in ax.get_lines() if not line.get_label().startswith("_")}
  assert list(curves) == [p[0] for p in PHASES]
  for phase, *_ in PHASES:
    rows = _records(curriculum / phase, "metrics.jsonl")
    np.testing.assert_array_equal(curves[phase][:, 0], [r["train/total_tokens"] for r in rows])
    np.testing.assert_array_equal(curves[phase][:, 1], [r["train/loss"] for r in rows])
  lr_lines = [l.get_xydata() for l in ax_lr.get_lines() if l.get_xydata().shape[0] > 2]
  rows = _records(curriculum / "decay_all", "metrics.jsonl")
  np.testing.assert_array_equal(lr_lines[-1][:, 1], [r["train/lr"] for r in rows])
  # Phase boundaries: pretrain at 0, midtrain after pretrain's 6000 tokens, both decays after midtrain's 8000.
  boundaries = sorted({l.get_xdata()[0] for l in ax.get_lines() if l.get_linestyle() == "--"})
  assert boundaries == [0, 6000, 14000]
  assert [t.get_text() for t in ax.texts] == ["pretrain", "midtrain", "decay_eng / decay_all"]


def test_eval_plot_is_each_phase_final_eval_with_late_languages_marked(curriculum):
  fig = report.plot_eval(report.load_run(str(curriculum)))
  (ax,) = fig.axes
  languages = [t.get_text().split("\n")[0] for t in ax.get_xticklabels()]
  # Ordered by the phase that first trains on them; ti is evaluated but never trained on.
  assert languages == ["de", "en", "ru", "sw", "fo", "ti"]
  for line in ax.get_lines():
    final = _records(curriculum / line.get_label(), "eval.jsonl")[-1]["results"]
    np.testing.assert_array_equal(line.get_ydata(), [final[l]["loss"] for l in languages])
  highlighted = {languages[int(round(p.get_x() + p.get_width() / 2))] for p in ax.patches}
  assert highlighted == {"sw", "fo", "ti"}
  bold = {t.get_text().split("\n")[0] for t in ax.get_xticklabels() if t.get_fontweight() == "bold"}
  assert bold == highlighted
  assert [t.get_text() for t in ax.get_xticklabels()][3:] == ["sw\n(midtrain)", "fo\n(decay_all)", "ti\n(eval only)"]


def test_mixture_plot_is_p_l_per_phase_beside_n_l(curriculum):
  fig = report.plot_mixture(report.load_run(str(curriculum)))
  ax, ax_n = fig.axes
  languages = [t.get_text() for t in ax_n.get_xticklabels()]
  assert languages == ["en", "de", "ru", "sw", "fo"]  # by n_l, largest first
  assert ax.get_yscale() == "log" and ax_n.get_yscale() == "log"
  np.testing.assert_array_equal([b.get_height() for b in ax_n.patches], [N_L[l] for l in languages])
  for line in ax.get_lines():
    with open(curriculum / line.get_label() / "mixture.json") as f:
      mix = json.load(f)
    p = dict(zip(mix["languages"], mix["weights"]))
    np.testing.assert_array_equal(line.get_ydata(), [p.get(l, np.nan) for l in languages])


def test_report_command_writes_pngs_for_a_curriculum_and_a_phase(curriculum, tmp_path):
  proc = run_module("mmbert_jax.report", f"--workdir={curriculum}", timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  paths = proc.stdout.split()
  assert paths == [str(curriculum / "plots" / f"{n}.png") for n in report.PLOTS]
  for path in paths:
    with open(path, "rb") as f:
      data = f.read()
    assert data.startswith(b"\x89PNG") and len(data) > 10_000
  os.remove(curriculum / "config.json")  # phases run one by one: ordered by their start
  assert [p.name for p in report.load_run(str(curriculum))] == ["pretrain", "midtrain", "decay_all", "decay_eng"]
  one = report.write_plots(str(curriculum / "midtrain"), str(tmp_path / "one"))
  assert [os.path.basename(p) for p in one] == ["loss.png", "eval.png", "mixture.png"]
  (curriculum / "empty").mkdir()
  proc = run_module("mmbert_jax.report", f"--workdir={curriculum / 'empty'}", timeout=120)
  assert proc.returncode != 0 and "holds no run records" in proc.stderr
