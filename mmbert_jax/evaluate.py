"""Held-out MLM loss and accuracy per language for one or more checkpoints, side by side.

  python -m mmbert_jax.evaluate --checkpoint=RUN/decay_eng,RUN/decay_all,RUN/merged --data=DATA_DIR \
      [--languages=en,fo,ti] [--seq_len=1024] [--mask_rate=0.15] [--batch_size=32] [--max_batches=8]

Every checkpoint sees the same batches (same documents, same masks), so the columns compare directly.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
from absl import app, flags
from flax import nnx

from data_pipeline import filesystem as fs
from data_pipeline import pipeline as data_lib
from mmbert_jax import checkpoint as ckpt_lib
from mmbert_jax import cli, sharding, train
from mmbert_jax.model import ModelConfig, abstract_model

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_list("checkpoint", [], "Checkpoints: workdirs, checkpoints/ dirs or checkpoints/<step> dirs.")
  flags.DEFINE_string("data", None, "Prepared data directory (python -m data_pipeline.prepare).")
  flags.DEFINE_list("languages", [], "Languages to evaluate (default: every language with held-out data).")
  flags.DEFINE_integer("seq_len", 1024, "Row length of the held-out batches.")
  flags.DEFINE_float("mask_rate", 0.15, "Fraction of tokens masked.")
  flags.DEFINE_integer("batch_size", 32, "Rows per batch.")
  flags.DEFINE_integer("max_batches", 8, "Batches per language (0: all held-out data).")
  flags.DEFINE_integer("seed", 0, "Seed of the masks.")


def format_eval_table(results: dict[str, dict[str, dict[str, float]]], metric: str = "loss") -> str:
  """Rows: languages; columns: phases (or merged models). Languages a column did not evaluate show '—'."""
  columns = list(results)
  languages = sorted({lang for r in results.values() for lang in r if lang != "all"})
  languages.append("all")
  width = max([len(c) for c in columns] + [8])
  lines = [
    f"held-out MLM {metric} per language".center(10 + (width + 2) * len(columns)),
    "language  " + "  ".join(c.rjust(width) for c in columns),
  ]
  for lang in languages:
    cells = [f"{results[c][lang][metric]:.3f}" if lang in results[c] else "—" for c in columns]
    lines.append(f"{lang:<10}" + "  ".join(cell.rjust(width) for cell in cells))
  return "\n".join(lines)


@functools.lru_cache(maxsize=8)
def _eval_step(cfg: ModelConfig):
  """One jitted eval step per model config: every checkpoint of the same model reuses its compilation."""
  return train.make_eval_step(train.ModelGraph(cfg, nnx.graphdef(abstract_model(cfg)), None))


def evaluate_params(params, cfg: ModelConfig, pipeline_config, max_batches: int | None = None) -> dict[str, Any]:
  """{language: {loss, accuracy, masked_tokens}} plus "all", on one device."""
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  eval_step = _eval_step(cfg)
  params = jax.device_put(params, sharding.replicated(mesh))
  with jax.set_mesh(mesh):
    return train.eval_per_language(
      eval_step,
      params,
      data_lib.eval_batches(pipeline_config, max_batches=max_batches),
      train.make_put(mesh, leading=0),
    )


def column_names(paths: Sequence[str]) -> list[str]:
  """The shortest trailing path parts that tell the checkpoints apart (run names; 'run/checkpoints/12' when
  step directories of different runs share a step)."""
  parts = [str(fs.path(p, "--checkpoint")).split("/") for p in paths]
  for n in range(1, max(len(p) for p in parts) + 1):
    names = ["/".join(p[-n:]) for p in parts]
    if len(set(names)) == len(names):
      return names
  raise ValueError(f"the same checkpoint is given twice: {list(paths)}")


def evaluate_checkpoints(paths: Sequence[str], pipeline_config, max_batches: int | None = None) -> dict[str, Any]:
  """{column name: evaluate_params(...)} for each checkpoint, in the order given (see `column_names`)."""
  results = {}
  for name, path in zip(column_names(paths), paths):
    params, meta, _ = ckpt_lib.load_params(path)
    cfg = ckpt_lib.model_config_of(meta).replace(attention_impl="auto")  # the run's kernel may not run here
    results[name] = evaluate_params(params, cfg, pipeline_config, max_batches)
  return results


def main(argv):
  cli.start(argv)
  if not FLAGS.checkpoint or not FLAGS.data:
    raise app.UsageError("--checkpoint and --data are required")
  try:
    pipeline_config = data_lib.PipelineConfig(
      data_dir=str(fs.path(FLAGS.data, "--data")),
      languages=tuple(FLAGS.languages) or None,
      seq_len=FLAGS.seq_len,
      batch_size=FLAGS.batch_size,
      mask_rate=FLAGS.mask_rate,
      seed=FLAGS.seed,
    )
    results = evaluate_checkpoints(FLAGS.checkpoint, pipeline_config, FLAGS.max_batches or None)
  except (ckpt_lib.CheckpointError, FileNotFoundError, ValueError) as e:
    cli.fail(e)
  print(format_eval_table(results))
  print(format_eval_table(results, metric="accuracy"))


if __name__ == "__main__":
  cli.run(main, define_flags)
