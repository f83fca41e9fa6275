"""The run's record: config.json, TensorBoard text/hparams, bounded per-language tags, eval.jsonl, W&B."""

import json
import os
import struct
import sys
import types

import numpy as np
import pytest
from helpers import load_config

from mmbert_jax import metrics


def _events(workdir):
  """Every Event proto of the TensorBoard files in <workdir>/tb (TFRecord framing: length, crc, data, crc)."""
  from tensorboardX.proto import event_pb2

  out = []
  tb = os.path.join(workdir, "tb")
  for name in sorted(os.listdir(tb)):
    with open(os.path.join(tb, name), "rb") as f:
      data = f.read()
    i = 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i : i + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[i + 12 : i + 12 + n])
      out.append(event)
      i += 12 + n + 4
  return out


def test_config_json_tensorboard_text_and_hparams(tmp_path):
  config = load_config("demo")
  writer = metrics.MetricWriter(str(tmp_path), enabled=True)
  writer.write_config(config)
  writer.close()
  with open(tmp_path / "config.json") as f:
    saved = json.load(f)
  assert saved == json.loads(config.to_json_best_effort())
  assert saved["phase_overrides"]["midtrain"]["train_tokens"] == 240_000
  values = [v for e in _events(str(tmp_path)) for v in e.summary.value]
  text = next(v for v in values if v.tag.startswith("config"))
  assert '"peak_lr": 0.003' in text.tensor.string_val[0].decode()
  hparams = [v for v in values if v.metadata.plugin_data.plugin_name == "hparams"]
  assert {v.tag for v in hparams} >= {"_hparams_/experiment", "_hparams_/session_start_info"}
  from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData

  start = HParamsPluginData()
  start.ParseFromString(next(v for v in hparams if "session_start" in v.tag).metadata.plugin_data.content)
  assert start.session_start_info.hparams["optim.peak_lr"].number_value == pytest.approx(3e-3)
  assert start.session_start_info.hparams["data.eval_languages"].string_value.startswith("en,de")


def test_a_changed_config_keeps_the_previous_record(tmp_path):
  config = load_config("demo")
  for lr in (1e-3, 2e-3, 2e-3):
    config.optim.peak_lr = lr
    writer = metrics.MetricWriter(str(tmp_path), enabled=True)
    writer.write_config(config)
    writer.close()
  assert json.load(open(tmp_path / "config.json"))["optim"]["peak_lr"] == 2e-3
  assert json.load(open(tmp_path / "config.1.json"))["optim"]["peak_lr"] == 1e-3
  assert not (tmp_path / "config.2.json").exists()  # the same config twice is recorded once


def test_language_tags_are_bounded_with_group_aggregates():
  rng = np.random.default_rng(0)
  langs = [f"l{i:04d}" for i in range(1800)]
  tokens = dict(zip(langs, rng.permutation(np.arange(1, 1801) * 1000.0)))
  tags = metrics.LanguageTags.from_tokens(tokens, 5)
  by_size = sorted(langs, key=lambda lang: -tokens[lang])
  assert set(tags.shown) == set(by_size[:5]) | set(by_size[-5:])
  assert [len(g) for g in tags.groups.values()] == [600, 600, 600]
  assert set(tags.groups["high"]) == set(by_size[:600]) and set(tags.groups["low"]) == set(by_size[1200:])
  loss_sum = {lang: float(rng.uniform(1, 5)) * 10 for lang in langs}
  count = {lang: 10.0 for lang in langs}
  count[by_size[0]] = 0.0  # no masked token of it this step
  out = tags.losses(loss_sum, count, prefix="train_lang", group_prefix="train_group")
  assert len(out) == 9 + 3
  assert f"train_lang/{by_size[0]}/loss" not in out
  assert out[f"train_lang/{by_size[-1]}/loss"] == pytest.approx(loss_sum[by_size[-1]] / 10)
  mid = by_size[600:1200]
  assert out["train_group/mid/loss"] == pytest.approx(sum(loss_sum[l] for l in mid) / (10 * len(mid)))
  few = metrics.LanguageTags.from_tokens({"en": 5.0, "de": 3.0, "fo": 1.0}, 5)
  assert few.shown == ("en", "de", "fo") and few.groups == {"high": ("en",), "mid": ("de",), "low": ("fo",)}


def test_eval_and_json_records(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path), enabled=True, console=False)
  results = {"en": {"loss": 2.0, "accuracy": 0.5, "masked_tokens": 10.0}, "all": {"loss": 2.0}}
  writer.write_eval(7, results, phase="decay_all", total_tokens=1234)
  writer.write_eval(9, results, phase="decay_all", total_tokens=2000)
  writer.write_json("mixture", {"languages": ["en"], "weights": np.array([1.0])[0]})
  writer.close()
  lines = [json.loads(l) for l in open(tmp_path / "eval.jsonl")]
  assert [l["step"] for l in lines] == [7, 9] and lines[0]["results"] == results
  assert lines[0]["total_tokens"] == 1234 and lines[1]["phase"] == "decay_all"
  assert json.load(open(tmp_path / "mixture.json")) == {"languages": ["en"], "weights": 1.0}


def test_step_records_resume_without_duplicates_or_a_cut_line(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path), enabled=True, console=False)
  for step in range(1, 6):
    writer.write_step(step, {"loss": np.float32(1.0 / step), "lr": 1e-3, "tokens": 100 * step})
  writer.write(5, {"train/loss": 0.2})
  writer.close()
  with open(tmp_path / "steps.jsonl", "a") as f:
    f.write('{"step": 6, "lo')  # killed while writing step 6
  again = metrics.MetricWriter(str(tmp_path), enabled=True, console=False)
  again.forget_after(3)  # resumed from the checkpoint of step 3
  for step in range(4, 7):
    again.write_step(step, {"loss": -step, "tokens": 100 * step})
  again.close()
  records = [json.loads(line) for line in open(tmp_path / "steps.jsonl")]
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
  assert records[1] == {"step": 2, "loss": pytest.approx(0.5), "lr": 1e-3, "tokens": 200}
  assert [r["loss"] for r in records[3:]] == [-4, -5, -6]
  assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == []  # step 5 > 3: dropped


def test_console_can_be_handed_over(tmp_path, capsys):
  seen = []
  writer = metrics.MetricWriter(str(tmp_path), enabled=True, console=seen.append)
  writer.write(3, {"train/loss": 2.5, "train/other": 1.0})
  writer.close()
  quiet = metrics.MetricWriter(str(tmp_path / "q"), enabled=True, console=False)
  quiet.write(3, {"train/loss": 2.5})
  quiet.close()
  assert len(seen) == 1 and "step      3 loss=2.5" in seen[0]
  assert capsys.readouterr().err == ""


def test_wandb_writer_when_a_project_is_set(tmp_path, monkeypatch):
  calls = []

  class Run:
    def log(self, values, step):
      calls.append(("log", step, values))

    def finish(self):
      calls.append(("finish",))

  fake = types.ModuleType("wandb")
  fake.init = lambda **kw: calls.append(("init", kw)) or Run()
  monkeypatch.setitem(sys.modules, "wandb", fake)
  config = load_config("demo")
  writer = metrics.MetricWriter(
    str(tmp_path), enabled=True, console=False, wandb=dict(config.wandb, project="mmbert", entity="team")
  )
  writer.write_config(config)
  writer.write(5, {"train/loss": np.float32(2.5)})
  writer.close()
  init = calls[0][1]
  assert (init["project"], init["entity"], init["name"], init["resume"]) == ("mmbert", "team", "pretrain", "allow")
  assert init["config"]["optim.peak_lr"] == pytest.approx(3e-3) and init["dir"] == str(tmp_path)
  assert calls[1:] == [("log", 5, {"train/loss": 2.5}), ("finish",)]
  again = metrics.MetricWriter(str(tmp_path), enabled=True, wandb={"project": "mmbert"})
  again.write_config(config)
  again.close()
  assert calls[3][1]["id"] == init["id"]  # the same workdir resumes the same W&B run
  off = metrics.MetricWriter(str(tmp_path / "off"), enabled=True, wandb=dict(config.wandb))
  off.write_config(config)
  off.close()
  assert len([c for c in calls if c[0] == "init"]) == 2  # off by default: no project, no W&B


def test_missing_wandb_is_one_actionable_error(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
  writer = metrics.MetricWriter(str(tmp_path), enabled=True, wandb={"project": "mmbert"})
  with pytest.raises(ImportError, match="pip install wandb"):
    writer.write_config(load_config("demo"))
  writer.close()


# ---------------------------------------------------------------------------------------------------------------
# A gs:// workdir (the GCS emulator, tests/conftest.py): no append, so metrics.jsonl and the event file are staged
# locally and uploaded whole at flush points.
# ---------------------------------------------------------------------------------------------------------------


def _remote_steps(path):
  return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_a_bucket_workdir_gets_whole_files_at_flush_points(gcs_bucket, tmp_path, monkeypatch):
  import uuid

  from data_pipeline import filesystem as fs

  workdir = fs.path(f"{gcs_bucket}/{uuid.uuid4().hex[:8]}/run")
  writer = metrics.MetricWriter(str(workdir), enabled=True, console=False)
  writer.write_config(load_config("demo"))
  writer.write_step(1, {"loss": 3.0, "tokens": 10})
  writer.write(1, {"train/loss": 3.0})  # the first log step is uploaded at once
  writer.write_step(2, {"loss": 2.5, "tokens": 20})
  writer.write(2, {"train/loss": 2.5})  # within UPLOAD_EVERY_S of it: staged only
  assert _remote_steps(workdir / "metrics.jsonl") == [1] and _remote_steps(workdir / "steps.jsonl") == [1]
  monkeypatch.setattr(metrics, "UPLOAD_EVERY_S", 0.0)
  writer.write_step(3, {"loss": 2.0, "tokens": 30})  # step records go up with the log steps
  assert _remote_steps(workdir / "steps.jsonl") == [1]
  writer.write(3, {"train/loss": 2.0})
  assert _remote_steps(workdir / "metrics.jsonl") == [1, 2, 3] and _remote_steps(workdir / "steps.jsonl") == [1, 2, 3]
  writer.write_eval(3, {"all": {"loss": 2.0}})
  writer.write_eval(5, {"all": {"loss": 1.5}})  # replaced whole with both lines: no append in a bucket
  writer.close()
  assert _remote_steps(workdir / "eval.jsonl") == [3, 5]
  assert json.loads((workdir / "config.json").read_text())["phase"] == load_config("demo").phase
  fs.copy_tree(workdir / "tb", fs.path(str(tmp_path / "tb")))
  scalars = [(e.step, v.simple_value) for e in _events(str(tmp_path)) for v in e.summary.value if v.tag == "train/loss"]
  assert scalars == [(1, 3.0), (2, 2.5), (3, 2.0)]
  assert not list(tmp_path.glob("gs:*"))
  # A restart (resume at step 2) downloads the records, drops the later steps and continues them.
  again = metrics.MetricWriter(str(workdir), enabled=True, console=False)
  again.forget_after(2)
  again.write_step(3, {"loss": 1.9, "tokens": 30})
  again.write(3, {"train/loss": 1.9})
  again.close()
  assert _remote_steps(workdir / "metrics.jsonl") == [1, 2, 3]
  assert [json.loads(line) for line in (workdir / "steps.jsonl").read_text().splitlines()] == [
    {"step": 1, "loss": 3.0, "tokens": 10},
    {"step": 2, "loss": 2.5, "tokens": 20},
    {"step": 3, "loss": 1.9, "tokens": 30},
  ]
  assert json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])["train/loss"] == 1.9
  assert len(list((workdir / "tb").iterdir())) == 2  # one event file per process, as on local disk


def test_a_failed_upload_is_one_line_naming_the_bucket_object(gcs_bucket):
  writer = metrics.MetricWriter("gs://no-such-bucket/run", enabled=True, console=False)
  with pytest.raises(metrics.storage.WriteError) as e:
    writer.write(1, {"train/loss": 3.0})
  assert str(e.value).startswith("uploading metrics failed: ")
  assert str(e.value).endswith(" at gs://no-such-bucket/run/metrics.jsonl") and "\n" not in str(e.value)
  writer.close()  # the run has already failed: warns, does not raise again
