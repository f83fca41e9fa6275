"""The mmBERT curriculum: phases run back to back, each starting from the checkpoint of the one before.

A single-phase config (`configs/pretrain.py`, `midtrain.py`, `decay.py`) trains one phase in `workdir`. A curriculum
config (`configs/demo.py`) lists `phases`; each runs in `<workdir>/<phase>` with its overrides from
`config.phase_overrides.<phase>` applied to the shared config, and `init_from` pointing at the workdir of the
phase named by its `init_from_phase`. A finished phase is not trained again (its final checkpoint is found and
the loop exits at once), so re-running the same command resumes the curriculum where it stopped.
"""
from __future__ import annotations

import copy
import os
from typing import Any

import ml_collections

from mmbert_jax import train


def phase_config(config: ml_collections.ConfigDict, phase: str, workdir: str) -> ml_collections.ConfigDict:
  """The curriculum config with `phase_overrides[phase]` applied (nested keys merge, values replace)."""
  if phase not in config.phase_overrides:
    raise ValueError(f"config.phases names {phase!r}, but config.phase_overrides has no such entry "
                     f"(have: {', '.join(config.phase_overrides)})")
  overrides = config.phase_overrides[phase]
  out = copy.deepcopy(config)
  with out.unlocked():
    out.phase = phase
    for key, value in overrides.items():
      if key == "init_from_phase":
        out.init_from = os.path.join(workdir, value) if value else ""
      elif isinstance(value, ml_collections.ConfigDict):
        if key not in out:
          raise ValueError(f"config.phase_overrides.{phase}.{key}: no such section in the config")
        for sub, sub_value in value.items():
          if sub not in out[key]:
            raise ValueError(f"config.phase_overrides.{phase}.{key}.{sub}: no such key in config.{key}")
          out[key][sub] = sub_value
      else:
        if key not in out:
          raise ValueError(f"config.phase_overrides.{phase}.{key}: no such key in the config")
        out[key] = value
    for key in ("phases", "phase_overrides", "merge"):
      if key in out:
        del out[key]
  return out


def format_eval_table(results: dict[str, dict[str, dict[str, float]]], metric: str = "loss") -> str:
  """Rows: languages; columns: phases (or merged models). Languages a column did not evaluate show '—'."""
  columns = list(results)
  languages = sorted({lang for r in results.values() for lang in r if lang != "all"})
  languages.append("all")
  width = max([len(c) for c in columns] + [8])
  lines = [f"held-out MLM {metric} per language".center(10 + (width + 2) * len(columns)),
           "language  " + "  ".join(c.rjust(width) for c in columns)]
  for lang in languages:
    cells = [f"{results[c][lang][metric]:.3f}" if lang in results[c] else "—" for c in columns]
    lines.append(f"{lang:<10}" + "  ".join(cell.rjust(width) for cell in cells))
  return "\n".join(lines)


def prepare_demo_data(config: ml_collections.ConfigDict, workdir: str) -> None:
  """`config.demo_corpus`: build the embedded corpus in `<workdir>/data` (once) and point the data there."""
  if "demo_corpus" not in config or config.data.data_dir:
    return
  from data_pipeline import demo_corpus
  data_dir = os.path.join(workdir, "data")
  d = config.demo_corpus
  demo_corpus.prepare_demo(data_dir, languages=d.languages, scale=d.scale, vocab_size=d.vocab_size,
                           max_len=max(config.data.seq_len, 256), progress=False)
  with config.unlocked():
    config.data.data_dir = data_dir


def merge_phases(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """`config.merge`: merge the listed phases' final checkpoints into `<workdir>/merged` and evaluate it."""
  from mmbert_jax import checkpoint as ckpt_lib
  from mmbert_jax import evaluate, merge
  m = config.merge
  out = os.path.join(workdir, "merged")
  if not os.path.exists(ckpt_lib.checkpoint_dir(out)):
    params, meta = merge.merge(m.method, base=os.path.join(workdir, m.base),
                               models=[os.path.join(workdir, p) for p in m.models], density=m.density, lam=m.lam)
    ckpt_lib.save_params(out, int(meta.get("step", 0)), params, meta)
  params, meta, _ = ckpt_lib.load_params(out)
  last = phase_config(config, m.models[-1], workdir)
  return evaluate.evaluate_params(params, ckpt_lib.model_config_of(meta),
                                  train.pipeline_config(last, last.eval_batch_size, eval=True),
                                  last.eval_max_batches)


def use_compilation_cache(config: ml_collections.ConfigDict, workdir: str) -> None:
  """`config.jax_cache_dir` (relative paths are inside the workdir): compiled steps are reused across phases
  of the same shapes and across restarts."""
  if config.get("jax_cache_dir"):
    import jax
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, config.jax_cache_dir))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Train one phase, or every phase of a curriculum config; print the per-language eval table."""
  use_compilation_cache(config, workdir)
  prepare_demo_data(config, workdir)
  if "phases" not in config:
    result = train.train_and_evaluate(config, workdir)
    if result["eval"]:
      print(format_eval_table({config.phase: result["eval"]}), flush=True)
    return result
  evals: dict[str, dict] = {}
  results: dict[str, Any] = {}
  for phase in config.phases:
    result = train.train_and_evaluate(phase_config(config, phase, workdir), os.path.join(workdir, phase))
    results[phase] = result
    if result["status"] != "complete":
      return result
    evals[phase] = result["eval"]
    print(format_eval_table(evals), flush=True)
  if "merge" in config and config.merge.method:
    evals[f"merged_{config.merge.method}"] = merge_phases(config, workdir)
    print(format_eval_table(evals), flush=True)
  downstream = None
  if "downstream" in config:
    from mmbert_jax import finetune
    downstream = finetune.score_curriculum(config, workdir)
  return {"status": "complete", "phases": results, "eval": evals, "downstream": downstream}
