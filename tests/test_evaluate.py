"""`python -m mmbert_jax.evaluate`: held-out MLM loss and accuracy per language for several checkpoints side by side,
checked against the masked cross-entropy computed here from the model's dense logits on the same held-out batches."""

import os

import numpy as np
import pytest
from flax import nnx
from tiny_run import run_module, step_dir, trained_run

from data_pipeline import pipeline as data_lib
from mmbert_jax import checkpoint as ckpt_lib
from mmbert_jax import evaluate

LANGUAGES = ("en", "de", "zh", "sw")
SEQ_LEN, BATCH_SIZE, MAX_BATCHES, MASK_RATE = 64, 4, 2, 0.15


@pytest.fixture(scope="module")
def run(demo_data, tmp_path_factory):
  return trained_run(demo_data, tmp_path_factory)


@pytest.fixture(scope="module")
def references(run, demo_data):
  """The independent numbers for the step-4 and the final checkpoint."""
  return {path: _reference(path, _pipeline(demo_data)) for path in (step_dir(run, 4), run)}


def _pipeline(data_dir):
  return data_lib.PipelineConfig(
    data_dir=data_dir, languages=LANGUAGES, seq_len=SEQ_LEN, batch_size=BATCH_SIZE, mask_rate=MASK_RATE, seed=0
  )


def _reference(path, pipeline_config):
  """{language: (loss, accuracy, masked tokens)} from dense logits [B, S, V] and a float64 log-softmax in numpy."""
  model, _, _ = ckpt_lib.load_model(path)
  forward = nnx.jit(lambda m, ids, segments, positions: m(ids, segments, positions))
  sums = {}
  for lang, batch in data_lib.eval_batches(pipeline_config, max_batches=MAX_BATCHES):
    logits = np.asarray(forward(model, batch["input_ids"], batch["segment_ids"], batch["positions"]), np.float64)
    rows = np.arange(len(logits))[:, None]
    at = logits[rows, batch["masked_positions"]]  # [B, K, V]
    top = at.max(-1, keepdims=True)
    log_z = (top + np.log(np.exp(at - top).sum(-1, keepdims=True)))[..., 0]
    labels, w = batch["masked_labels"], batch["masked_weights"].astype(np.float64)
    ce = log_z - np.take_along_axis(at, labels[..., None], -1)[..., 0]
    correct = at.argmax(-1) == labels
    s = sums.setdefault(lang, np.zeros(3))
    s += [(ce * w).sum(), (correct * w).sum(), w.sum()]
  sums["all"] = sum(sums.values())
  return {lang: (s[0] / s[2], s[1] / s[2], s[2]) for lang, s in sums.items()}


@pytest.mark.slow
def test_two_checkpoints_match_the_independent_masked_cross_entropy(run, demo_data, references):
  paths = [step_dir(run, 4), run]
  results = evaluate.evaluate_checkpoints(paths, _pipeline(demo_data), max_batches=MAX_BATCHES)
  assert list(results) == ["4", os.path.basename(run)]
  for path, column in zip(paths, results.values()):
    want = references[path]
    assert set(column) == set(LANGUAGES) | {"all"}
    for lang, (loss, accuracy, count) in want.items():
      assert column[lang]["masked_tokens"] == count > 0
      np.testing.assert_allclose(column[lang]["loss"], loss, rtol=1e-5, err_msg=f"{path} {lang}")
      np.testing.assert_allclose(column[lang]["accuracy"], accuracy, rtol=0, atol=1e-12, err_msg=f"{path} {lang}")
  early, final = results.values()
  assert final["all"]["loss"] < early["all"]["loss"]  # eight more training steps lower the held-out loss


def test_cli_prints_the_loss_and_accuracy_tables(run, demo_data, references):
  proc = run_module(
    "mmbert_jax.evaluate",
    f"--checkpoint={step_dir(run, 4)},{run}",
    f"--data={demo_data}",
    f"--languages={','.join(LANGUAGES)}",
    f"--seq_len={SEQ_LEN}",
    f"--batch_size={BATCH_SIZE}",
    f"--max_batches={MAX_BATCHES}",
    f"--mask_rate={MASK_RATE}",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  tables = {}
  for i, line in enumerate(lines):
    if line.strip().startswith("held-out MLM"):
      metric = line.split()[2]
      header = lines[i + 1].split()
      assert header == ["language", "4", os.path.basename(run)]
      rows = {}
      for row in lines[i + 2 : i + 3 + len(LANGUAGES)]:
        lang, *cells = row.split()
        rows[lang] = [float(c) for c in cells]
      tables[metric] = rows
  assert set(tables) == {"loss", "accuracy"}
  for column, path in enumerate([step_dir(run, 4), run]):
    want = references[path]
    for lang, (loss, accuracy, _) in want.items():
      assert abs(tables["loss"][lang][column] - loss) <= 5e-4 + 1e-6, (path, lang)
      assert abs(tables["accuracy"][lang][column] - accuracy) <= 5e-4 + 1e-6, (path, lang)


def test_column_names_tell_checkpoints_apart_and_missing_ones_are_named(run, demo_data, tmp_path):
  assert evaluate.column_names(["/x/decay_eng", "/x/decay_all/"]) == ["decay_eng", "decay_all"]
  assert evaluate.column_names(["/x/a/checkpoints/12", "/x/b/checkpoints/12"]) == [
    "a/checkpoints/12",
    "b/checkpoints/12",
  ]
  with pytest.raises(ValueError, match="given twice"):
    evaluate.column_names([run, run + "/"])
  with pytest.raises(ckpt_lib.CheckpointError, match="does not exist"):
    evaluate.evaluate_checkpoints([run, str(tmp_path / "nowhere")], _pipeline(demo_data), max_batches=1)
