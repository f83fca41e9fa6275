"""Merging checkpoints (the command line of `mmbert_jax.merging`, whose algorithms work on parameter trees):
TIES over decay variants (mmBERT-base) or an exponential average over one run (mmBERT-small).

  python -m mmbert_jax.merge --method=ties --base=RUN/midtrain \
      --models=RUN/decay_eng,RUN/decay_cont,RUN/decay_all --density=0.5 --out=RUN/merged [--hf_out=DIR]
  python -m mmbert_jax.merge --method=ema --run=RUN/decay_all --decay=0.5 --out=RUN/merged_ema
  python -m mmbert_jax.merge --method=average --models=A,B,C --out=OUT

Each input is a workdir (its latest checkpoint), its checkpoints/ directory or one checkpoints/<step> directory,
local or gs://. The output is a params-only Orbax checkpoint: `init_from` of a further phase, or input of export
and evaluate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from absl import app, flags

from data_pipeline import filesystem as fs
from mmbert_jax import checkpoint as ckpt_lib
from mmbert_jax import cli, export, merging
from mmbert_jax.model import RUNTIME_FIELDS

METHODS = ("ties", "ema", "average")
FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_enum("method", "ties", METHODS, "Merge method.")
  flags.DEFINE_string("base", None, "ties: checkpoint the task vectors are taken against (e.g. the mid-training end).")
  flags.DEFINE_list("models", [], "ties/average: checkpoints to merge.")
  flags.DEFINE_string("run", None, "ema: a workdir whose checkpoints (oldest → newest) are averaged.")
  flags.DEFINE_float("density", 0.5, "ties: fraction of each task vector's entries kept per tensor.")
  flags.DEFINE_list("weights", [], "ties/average: one weight per model (default: equal).")
  flags.DEFINE_float("lam", 1.0, "ties: scale of the merged task vector.")
  flags.DEFINE_float("decay", 0.5, "ema: weight ratio between consecutive checkpoints (newest weighs most).")
  flags.DEFINE_string("out", None, "Output workdir for the merged checkpoint.")
  flags.DEFINE_string("hf_out", None, "Also write a transformers ModernBertForMaskedLM directory here.")


def _check_same_model(metas: Sequence[dict], names: Sequence[str]) -> None:
  first = metas[0]["model_config"]
  for meta, name in zip(metas[1:], names[1:]):
    other = meta["model_config"]
    diff = sorted(k for k in set(first) | set(other) if k not in RUNTIME_FIELDS and first.get(k) != other.get(k))
    if diff:
      values = ", ".join(f"{k}={other.get(k)!r} vs {first.get(k)!r}" for k in diff)
      raise ckpt_lib.CheckpointError(
        f"{name}: model config differs from {names[0]} ({values}); only checkpoints of the same model can be merged"
      )


def _load_all(paths: Sequence[str]):
  # Metadata first: a merge of different models fails before any parameters are read.
  resolved = [ckpt_lib.resolve(p) for p in paths]
  sources = [f"{directory}/{step}" for directory, step in resolved]
  metas = [ckpt_lib.read_meta(directory, step) for directory, step in resolved]
  for meta, source in zip(metas, sources):
    try:
      ckpt_lib.model_config_of(meta)
    except ckpt_lib.CheckpointError as e:
      raise ckpt_lib.CheckpointError(f"{source}: {e}") from None
  _check_same_model(metas, sources)
  params = [ckpt_lib.load_params(source)[0] for source in sources]
  return params, metas, sources


def merge_checkpoints(
  method: str,
  *,
  base: str | None = None,
  models: Sequence[str] = (),
  run: str | None = None,
  density: float = 0.5,
  weights: Sequence[float] | None = None,
  lam: float = 1.0,
  decay: float = 0.5,
) -> tuple[Any, dict[str, Any]]:
  """Merged params and the metadata to save with them."""
  weights = [float(w) for w in weights] if weights else None
  if method == "ties":
    if not base or not models:
      raise ValueError("--method=ties needs --base and --models")
    params, metas, sources = _load_all([base, *models])
    merged = merging.ties(params[0], params[1:], density=density, weights=weights, lam=lam)
    recipe = {
      "method": "ties",
      "base": sources[0],
      "models": sources[1:],
      "density": density,
      "weights": weights,
      "lam": lam,
    }
  elif method == "average":
    if not models:
      raise ValueError("--method=average needs --models")
    params, metas, sources = _load_all(models)
    merged = merging.average(params, weights)
    recipe = {"method": "average", "models": sources, "weights": weights}
  elif method == "ema":
    if not run:
      raise ValueError("--method=ema needs --run (a workdir with several checkpoints)")
    directory, _ = ckpt_lib.resolve(run)
    steps = ckpt_lib.steps(directory)
    params, metas, sources = _load_all([f"{directory}/{s}" for s in steps])
    merged = merging.ema(params, decay)
    recipe = {
      "method": "ema",
      "models": sources,
      "decay": decay,
      "weights": merging.ema_weights(len(params), decay).tolist(),
    }
  else:
    raise ValueError(f"unknown merge method {method!r}; expected one of {METHODS}")
  meta = dict(metas[-1])
  meta.update(phase=f"merged_{method}", merge=recipe, complete=True)
  return merged, meta


def main(argv):
  cli.start(argv)
  if not FLAGS.out:
    raise app.UsageError("--out is required")
  try:
    # Both outputs are checked before the (slow) merge: an existing one is never overwritten.
    directory = ckpt_lib.checkpoint_dir(fs.path(FLAGS.out, "--out"))
    if directory.is_dir() and ckpt_lib.steps(directory):
      raise FileExistsError(f"{directory} already holds checkpoints; choose a new --out")
    if FLAGS.hf_out:
      export.check_new_output(FLAGS.hf_out, "--hf_out")
    merged, meta = merge_checkpoints(
      FLAGS.method,
      base=FLAGS.base,
      models=FLAGS.models,
      run=FLAGS.run,
      density=FLAGS.density,
      weights=FLAGS.weights,
      lam=FLAGS.lam,
      decay=FLAGS.decay,
    )
    where = ckpt_lib.save_params(FLAGS.out, int(meta.get("step", 0)), merged, meta)
    print(f"merged checkpoint: {where}")
    if FLAGS.hf_out:
      export.export(where, FLAGS.hf_out)
      print(f"transformers directory: {FLAGS.hf_out}")
  except (ckpt_lib.CheckpointError, FileExistsError, FileNotFoundError, ValueError) as e:
    cli.fail(e)


if __name__ == "__main__":
  cli.run(main, define_flags)
