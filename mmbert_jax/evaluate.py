"""Held-out MLM loss and accuracy per language for one or more checkpoints, side by side.

  python -m mmbert_jax.evaluate --checkpoint=RUN/decay_eng,RUN/decay_all,RUN/merged --data=DATA_DIR \
      [--languages=en,fo,ti] [--seq_len=1024] [--mask_rate=0.15] [--batch_size=32] [--max_batches=8]

Every checkpoint sees the same batches (same documents, same masks), so the columns compare directly.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import jax
from absl import app, flags
from flax import nnx

from mmbert_jax import checkpoint as ckpt_lib
from mmbert_jax import phases, sharding, train
from mmbert_jax.model import MaskedLM, ModelConfig

flags.DEFINE_list("checkpoint", [], "Checkpoints: workdirs, checkpoints/ dirs or checkpoints/<step> dirs.")
flags.DEFINE_string("data", None, "Prepared data directory (python -m data_pipeline.prepare).")
flags.DEFINE_list("languages", [], "Languages to evaluate (default: every language with held-out data).")
flags.DEFINE_integer("seq_len", 1024, "Row length of the held-out batches.")
flags.DEFINE_float("mask_rate", 0.15, "Fraction of tokens masked.")
flags.DEFINE_integer("batch_size", 32, "Rows per batch.")
flags.DEFINE_integer("max_batches", 8, "Batches per language (0: all held-out data).")
flags.DEFINE_integer("seed", 0, "Seed of the masks.")
FLAGS = flags.FLAGS


def evaluate_params(params, cfg: ModelConfig, pipeline_config, max_batches: int | None = None) -> dict[str, Any]:
  """{language: {loss, accuracy, masked_tokens}} plus "all", on one device."""
  from data_pipeline import pipeline as data_lib
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  graph, _ = nnx.split(nnx.eval_shape(lambda: MaskedLM(cfg, rngs=nnx.Rngs(0))))
  eval_step = train.make_eval_step(train.Model(cfg, graph, None))
  params = jax.device_put(params, sharding.replicated(mesh))
  with jax.set_mesh(mesh):
    return train.evaluate(eval_step, params, data_lib.eval_batches(pipeline_config, max_batches=max_batches),
                          train.make_put(mesh, leading=0))


def evaluate_checkpoints(paths: Sequence[str], pipeline_config, max_batches: int | None = None) -> dict[str, Any]:
  results = {}
  for path in paths:
    params, meta, source = ckpt_lib.load_params(path)
    name = os.path.basename(os.path.normpath(path))
    results[name] = evaluate_params(params, ckpt_lib.model_config_of(meta), pipeline_config, max_batches)
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS.checkpoint or not FLAGS.data:
    raise app.UsageError("--checkpoint and --data are required")
  from data_pipeline import pipeline as data_lib
  pipeline_config = data_lib.PipelineConfig(
      data_dir=FLAGS.data, languages=tuple(FLAGS.languages) or None, seq_len=FLAGS.seq_len,
      batch_size=FLAGS.batch_size, mask_rate=FLAGS.mask_rate, seed=FLAGS.seed)
  results = evaluate_checkpoints(FLAGS.checkpoint, pipeline_config, FLAGS.max_batches or None)
  print(phases.format_eval_table(results))


if __name__ == "__main__":
  app.run(main)
