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
    del out["phases"]
    del out["phase_overrides"]
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


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Train one phase, or every phase of a curriculum config; print the per-language eval table."""
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
  return {"status": "complete", "phases": results, "eval": evals}
