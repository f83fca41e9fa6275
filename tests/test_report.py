"""`python -m mmbert_jax.report`: PNGs whose plotted data are the run's records."""

import itertools
import json
import os

import numpy as np
import pytest
from helpers import load_config
from tiny_run import run_module

from mmbert_jax import metrics, phases, report, train

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


@pytest.mark.slow
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


# ---------------------------------------------------------------------------------------------------------------
# Every step, the real schedule, many languages, a bucket and a running phase
# ---------------------------------------------------------------------------------------------------------------

STEP_TOKENS, DECAY_STEPS = 4096, 30


def _decay_phase(workdir, *, steps=DECAY_STEPS, before=1_000_000):
  """A decay_all phase of the demo as the loop records it: a step record every step, log records every 25 steps."""
  rng = np.random.default_rng(1)
  config = phases.phase_config(load_config("demo"), "decay_all", str(workdir))
  config.train_tokens = DECAY_STEPS * STEP_TOKENS
  config.log_every_steps = 25
  schedule = train.lr_schedule(config)
  writer = metrics.MetricWriter(str(workdir), enabled=True, console=False)
  writer.write_config(config)
  for step in range(1, steps + 1):
    tokens = step * STEP_TOKENS
    record = {"loss": float(rng.uniform(3, 5)), "accuracy": 0.2, "lr": float(schedule(tokens)), "tokens": tokens}
    writer.write_step(step, record | {"total_tokens": before + tokens})
    if step % config.log_every_steps == 0:
      writer.write(step, {"train/loss": record["loss"], "train/lr": record["lr"], "train/tokens": tokens})
  writer.close()
  return config


def _lines(ax):
  return {line.get_gid(): line for line in ax.get_lines() if line.get_gid()}


def test_loss_plot_has_every_step_and_the_schedule_of_the_phase(tmp_path):
  config = _decay_phase(tmp_path / "decay_all")
  (phase,) = report.load_run(str(tmp_path / "decay_all"))  # a one-phase report
  fig = report.plot_loss([phase])
  ax, ax_lr = fig.axes
  steps = _records(tmp_path / "decay_all", "steps.jsonl")
  loss = _lines(ax)["decay_all/loss"]
  assert len(loss.get_xdata()) == DECAY_STEPS  # every step, though only step 25 was logged
  np.testing.assert_array_equal(loss.get_xdata(), [1_000_000 + s["tokens"] for s in steps])
  np.testing.assert_array_equal(loss.get_ydata(), [s["loss"] for s in steps])
  smoothed = _lines(ax)["decay_all/smoothed"].get_ydata()
  y, w = np.array([s["loss"] for s in steps]), max(5, DECAY_STEPS // 20)
  window = [y[i - w // 2 : i + w // 2 + 1].mean() for i in range(w // 2, DECAY_STEPS - w // 2)]
  np.testing.assert_allclose(smoothed[w // 2 : DECAY_STEPS - w // 2], window)
  assert smoothed[0] == pytest.approx(y[: w // 2 + 1].mean())  # fewer points at the ends
  assert [t.get_text() for t in ax.get_legend().get_texts()] == ["decay_all"]
  # The LR panel: the phase's 1−sqrt decay from its config over its whole budget, the logged LR on top.
  x, lr = _lines(ax_lr)["decay_all/schedule"].get_data()
  assert x[0] == 1_000_000 and x[-1] == 1_000_000 + config.train_tokens and len(x) >= 200
  s = config.schedule
  pick = np.linspace(0, len(x) - 1, 20).astype(int)
  progress = np.minimum((x[pick] - 1_000_000) / s.decay_tokens, 1.0)
  peak, floor = config.optim.peak_lr, s.final_fraction
  np.testing.assert_allclose(lr[pick], peak * (floor + (1 - floor) * (1 - np.sqrt(progress))), rtol=0, atol=1e-6)
  assert lr[0] == pytest.approx(peak) and lr[-1] == pytest.approx(peak * floor)
  logged = _lines(ax_lr)["decay_all/logged"]
  np.testing.assert_array_equal(logged.get_ydata(), [s["lr"] for s in steps])


def test_mixture_plot_of_1834_languages_is_readable():
  from matplotlib.backends.backend_agg import FigureCanvasAgg

  rng = np.random.default_rng(2)
  names = [f"{a}{b}{c}_Latn" for a, b, c in itertools.product("abcdefghijklm", repeat=3)][:1834]
  n = dict(zip(names, np.exp(rng.uniform(np.log(1e3), np.log(1e10), len(names)))))
  by_n = sorted(names, key=lambda l: -n[l])

  def mixture(name, langs, tau):
    w = np.array([n[l] ** tau for l in langs])
    return report.Phase(
      name, "", [], [], {"languages": langs, "tokens": [n[l] for l in langs], "weights": list(w / w.sum())}, None
    )

  runs = [mixture("midtrain", by_n[:110], 0.5), mixture("decay_all", names, 0.3)]
  fig = report.plot_mixture(runs)
  canvas = FigureCanvasAgg(fig)
  canvas.draw()
  width, height = fig.bbox.width, fig.bbox.height  # pixels of the PNG
  assert width <= 1600 and height <= 800
  renderer = canvas.get_renderer()
  for ax in fig.axes:
    for axis, lim in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
      shown = [t for t in axis.get_major_ticks() if min(lim) <= t.get_loc() <= max(lim)]  # drawn: inside the view
      labels = [t.label1 for t in shown if t.label1.get_visible() and t.label1.get_text()]
      assert len(labels) <= 60
      boxes = [t.get_window_extent(renderer) for t in labels]
      for t, box in zip(labels, boxes):
        assert t.get_fontsize() >= 7
        assert 0 <= box.x0 and box.x1 <= width + 1 and 0 <= box.y0 and box.y1 <= height + 1, t.get_text()
      for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b) or a.intersection(a, b).width * a.intersection(a, b).height < 1.0
  ax, ax_rank, ax_n, ax_rank_n = fig.axes
  labels = [t.get_text() for t in ax_n.get_xticklabels()]
  assert labels == by_n[: report.HEAD] + ["other 1,794"]  # the largest by name, the rest as one group
  tail = by_n[report.HEAD :]
  np.testing.assert_allclose(
    [b.get_height() for b in ax_n.patches], [n[l] for l in by_n[: report.HEAD]] + [sum(n[l] for l in tail)]
  )
  p = dict(zip(runs[1].mixture["languages"], runs[1].mixture["weights"]))
  head_p = _lines(ax)["decay_all/p"].get_ydata()
  np.testing.assert_allclose(head_p, [p[l] for l in by_n[: report.HEAD]] + [sum(p[l] for l in tail)])
  rank = _lines(ax_rank)["decay_all/rank_p"]
  np.testing.assert_array_equal(rank.get_xdata(), np.arange(1, 1835))
  np.testing.assert_allclose(rank.get_ydata(), [p[l] for l in by_n])
  mid = _lines(ax_rank)["midtrain/rank_p"].get_ydata()
  assert np.isfinite(mid[:110]).all() and np.isnan(mid[110:]).all()  # midtrain's languages only
  np.testing.assert_allclose(_lines(ax_rank_n)["rank_n"].get_ydata(), [n[l] for l in by_n])


def test_eval_plot_of_many_languages_labels_at_most_60():
  rng = np.random.default_rng(3)
  langs = [f"l{i:03d}" for i in range(300)]
  mix = {"languages": langs[:100], "tokens": list(range(100, 0, -1)), "weights": [0.01] * 100}
  results = {l: {"loss": float(rng.uniform(2, 8))} for l in langs}
  runs = [
    report.Phase("midtrain", "", [], [{"results": results}], mix, None),
    report.Phase("decay_all", "", [], [{"results": results}], dict(mix, languages=langs[:250]), None),
  ]
  fig = report.plot_eval(runs)
  fig.draw_without_rendering()
  (ax,) = fig.axes
  ticks = [t for t in ax.get_xticklabels() if t.get_text()]
  assert 0 < len(ticks) <= 60
  line = ax.get_lines()[0]
  order = langs  # by entry phase (midtrain's 100 by tokens, then decay_all's 150, then eval only), then name
  np.testing.assert_array_equal(line.get_ydata(), [results[l]["loss"] for l in order])
  assert [t.get_text() for t in ticks] == order[:: int(np.ceil(300 / 60))]
  assert [round(p.get_x() + 0.5) for p in ax.patches] == [100, 250]  # one span per block entering late
  assert [t.get_text() for t in ax.texts] == ["enter in decay_all", "enter in eval only"]


@pytest.mark.gcs
def test_report_of_a_bucket_workdir_and_of_a_running_phase(gcs_bucket, tmp_path):
  import uuid

  from data_pipeline import filesystem as fs

  root = fs.path(f"{gcs_bucket}/{uuid.uuid4().hex[:8]}/run")
  _write_curriculum(root)
  paths = report.write_plots(str(root))
  assert paths == [str(root / "plots" / f"{n}.png") for n in report.PLOTS]
  assert all((root / "plots" / f"{n}.png").read_bytes().startswith(b"\x89PNG") for n in report.PLOTS)
  # A phase still running: records up to a step whose line is half written, no log step or evaluation yet.
  running = tmp_path / "running"
  _decay_phase(running, steps=7)
  with open(running / "steps.jsonl", "a") as f:
    f.write('{"step": 8, "loss": 4.')
  os.remove(running / "metrics.jsonl")
  assert [os.path.basename(p) for p in report.write_plots(str(running))] == ["loss.png"]
  (phase,) = report.load_run(str(running))
  np.testing.assert_array_equal(
    report.loss_curves([phase])["decay_all"]["tokens"], 1_000_000 + STEP_TOKENS * np.arange(1, 8)
  )
  # Its schedule is drawn over the whole budget, ahead of the steps done.
  x, _ = _lines(report.plot_loss([phase]).axes[1])["decay_all/schedule"].get_data()
  assert x[-1] == 1_000_000 + DECAY_STEPS * STEP_TOKENS


def test_plots_are_written_together_or_not_at_all(curriculum, tmp_path, monkeypatch):
  """A failure (or a kill) while drawing leaves the plots of before, byte for byte, and no partial file."""
  out = tmp_path / "plots"
  first = report.write_plots(curriculum, str(out))
  assert sorted(os.path.basename(p) for p in first) == ["eval.png", "loss.png", "mixture.png"]
  before = {name: (out / name).read_bytes() for name in os.listdir(out)}

  def broken(phases):
    raise RuntimeError("drawing failed")

  monkeypatch.setattr(report, "plot_mixture", broken)  # the last plot: loss and eval are drawn by then
  monkeypatch.setattr(report, "plot_loss", lambda phases: _other_figure())
  with pytest.raises(RuntimeError, match="drawing failed"):
    report.write_plots(curriculum, str(out))
  assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
  assert [name for name in os.listdir(tmp_path) if "tmp" in name] == []  # no temporary folder left beside it


def _other_figure():
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots()
  ax.plot([0, 1], [1, 0])
  return fig
