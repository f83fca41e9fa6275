"""The mmBERT curriculum: phases run back to back, each starting from the checkpoint of the one before.

A single-phase config (`configs/pretrain.py`, `midtrain.py`, `decay.py`) trains one phase in `workdir`. A curriculum
config (`configs/demo.py`) lists `phases`; each runs in `<workdir>/<phase>` with its overrides from
`config.phase_overrides.<phase>` applied to the shared config, and `init_from` pointing at the workdir of the
phase named by its `init_from_phase`. A finished phase is not trained again (its final checkpoint is found and
the loop exits at once), so re-running the same command resumes the curriculum where it stopped. With
`config.merge`, the listed phases' final checkpoints are merged and the merge is evaluated like a phase.

A SIGTERM (`cli.handle_sigterm`) is read at the boundaries: before each phase, after a phase's final checkpoint
(one that arrived while it was saved included), before the merge and before fine-tuning. The run then stops with
status "preempted" (exit 75) and the same command resumes at that boundary. On a multi-process run the processes
agree at each boundary (a SIGTERM to any one stops all there); in the loop, its own sync point stops them together.
"""

from __future__ import annotations

import copy
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from data_pipeline import filesystem as fs
from data_pipeline import tasks as tasks_lib
from data_pipeline import tokenizer as tokenizer_lib
from mmbert_jax import checkpoint as ckpt_lib
from mmbert_jax import cli, evaluate, finetune, flops, merge, metrics, progress, train
from mmbert_jax.model import ModelConfig


def phase_config(config: ml_collections.ConfigDict, phase: str, workdir: str) -> ml_collections.ConfigDict:
  """The curriculum config with `phase_overrides[phase]` applied: keys must exist in the shared config; a
  section's keys merge, and a value replaces the shared one (a dict value replaces the whole dict)."""
  if phase not in config.phase_overrides:
    raise ValueError(
      f"config.phases names {phase!r}, but config.phase_overrides has no such entry "
      f"(have: {', '.join(config.phase_overrides)})"
    )
  overrides = config.phase_overrides[phase]
  flat = {}
  for key, value in overrides.items():
    if key == "init_from_phase":
      continue
    if isinstance(value, ml_collections.ConfigDict):
      flat.update({f"{key}.{sub}": sub_value for sub, sub_value in value.items()})
    else:
      flat[key] = value
  out = copy.deepcopy(config)
  out.lock()  # an override of a key the config does not have is an error, not a new key
  try:
    out.update_from_flattened_dict(flat)
  except (AttributeError, KeyError) as e:
    detail = " ".join(str(e.args[0] if e.args else e).split())  # ml_collections adds a "Did you mean" line
    raise ValueError(f"config.phase_overrides.{phase}: {detail}") from None
  with out.unlocked():
    out.phase = phase
    if "init_from_phase" in overrides:
      out.init_from = _inside(workdir, overrides.init_from_phase) if overrides.init_from_phase else ""
    for key in ("phases", "phase_overrides", "merge"):
      if key in out:
        del out[key]
  if not config.is_locked:
    out.unlock()
  return out


def _inside(workdir: str, name: str) -> str:
  """`<workdir>/<name>`, local or gs://."""
  return str(fs.path(workdir, "workdir") / name)


def merge_phases(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """`config.merge`: merge the listed phases' final checkpoints into `<workdir>/merged` and evaluate it. A merge
  whose save did not complete (killed; Orbax's temporary step directory is left) is done again."""
  m = config.merge
  out = _inside(workdir, "merged")
  if not ckpt_lib.steps(ckpt_lib.checkpoint_dir(out)):
    params, meta = merge.merge_checkpoints(
      m.method,
      base=_inside(workdir, m.base),
      models=[_inside(workdir, p) for p in m.models],
      density=m.density,
      lam=m.lam,
    )
    ckpt_lib.save_params(out, int(meta.get("step", 0)), params, meta)
  params, meta, _ = ckpt_lib.load_params(out)
  last = phase_config(config, m.models[-1], workdir)
  return evaluate.evaluate_params(
    params,
    ckpt_lib.model_config_of(meta),
    train.pipeline_config(last, last.eval_batch_size, eval=True),
    last.eval_max_batches,
  )


def _preempted(before: str) -> dict[str, Any] | None:
  """{"status": "preempted"} after a line saying where, if a SIGTERM arrived at any process: every process reaches
  each boundary in the same order, and they all stop there together (one all-gather of a flag)."""
  stop = cli.preempted()
  if jax.process_count() > 1:
    stop = bool(np.any(multihost_utils.process_allgather(np.asarray(stop))))
  if not stop:
    return None
  print(f"SIGTERM: stopped before {before}; run the same command again to resume", flush=True)
  return {"status": "preempted"}


def curriculum_outlook(config: ml_collections.ConfigDict, workdir: str) -> progress.Outlook:
  """The curriculum's parts for its ETA: each phase's tokens at its training FLOPs per token, the merge, and the
  fine-tuning of every checkpoint on each downstream task (`downstream_part`)."""
  parts, models = [], {}
  for phase in config.phases:
    c = phase_config(config, phase, workdir)
    models[phase] = train.model_config(c)
    cost = flops.flops_per_token(models[phase], c.data.seq_len, c.data.mask_rate).total
    loads = int(bool(c.init_from))  # the previous phase's checkpoint (or another run's)
    parts.append(progress.Part(phase, tokens=float(c.train_tokens), cost=cost, length=c.data.seq_len, loads=loads))
  if "merge" in config and config.merge.method:
    m = config.merge
    parts.append(progress.Part("merge", kind="merge", loads=len(m.models) + (m.method == "ties")))  # and its base
    models["merged"] = models[m.models[-1]]  # the merge keeps its last model's metadata (merge.merge_checkpoints)
  if "downstream" in config:
    parts.append(downstream_part(config, models))
  return progress.Outlook(parts)


def downstream_part(config: ml_collections.ConfigDict, models: dict[str, ModelConfig]) -> progress.Part:
  """`finetune.score_curriculum`'s work: every checkpoint (`models`: their architectures by name) and, with
  `random_init`, the first one's architecture at random weights, fine-tuned and scored on each task
  (`finetune.workload`: the task's size, epochs and row length, tokenized by the run's tokenizer when it exists).
  A program is compiled per architecture and task; a checkpoint is read per column, the first twice with
  `random_init`."""
  names = finetune.curriculum_checkpoints(config)
  random_init = bool(config.downstream.get("random_init", True))
  # As finetune.load_encoder reads them: a checkpoint's architecture with the attention kernel chosen where it runs.
  columns = [models[n].replace(attention_impl="auto") for n in names]
  columns = columns[:1] * random_init + columns
  settings = finetune.curriculum_settings(config)
  tasks = [tasks_lib.embedded(t) for t in config.downstream.tasks]
  tokenizer = None
  path = fs.path(config.data.data_dir, "config.data.data_dir") / "tokenizer.model" if config.data.data_dir else None
  if path is not None and path.exists():
    tokenizer = tokenizer_lib.load_tokenizer(str(path), tokenizer_lib.SpecialIds.from_model_config(columns[0]))
  work = {(cfg, t.name): finetune.workload(t, settings, cfg, tokenizer) for cfg in set(columns) for t in tasks}
  return progress.Part(
    "downstream",
    kind="finetune",
    flops=sum(work[cfg, t.name].flops(cfg) for cfg in columns for t in tasks),
    length=max(w.length for w in work.values()),
    compiles=len(work),
    loads=len(columns),
  )


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Train one phase, or every phase of a curriculum config; print the per-language eval table."""
  if "phases" not in config:
    result = train.train_and_evaluate(config, workdir)
    if result["eval"]:
      print(evaluate.format_eval_table({config.phase: result["eval"]}), flush=True)
    return result
  if jax.process_index() == 0:
    metrics.save_config(workdir, config)  # the curriculum's phase order, for `python -m mmbert_jax.report`
  evals: dict[str, dict] = {}
  results: dict[str, Any] = {}
  outlook = curriculum_outlook(config, workdir)
  for phase in config.phases:
    if stop := _preempted(f"phase {phase}"):
      return stop
    outlook.begin(phase)
    result = train.train_and_evaluate(phase_config(config, phase, workdir), _inside(workdir, phase), outlook=outlook)
    outlook.end(phase)
    results[phase] = result
    if result["status"] != "complete":
      return result
    evals[phase] = result["eval"]
    print(evaluate.format_eval_table(evals), flush=True)
  if "merge" in config and config.merge.method:
    if stop := _preempted("the merge"):
      return stop
    name = f"merged_{config.merge.method}"
    evals[name] = merge_phases(config, workdir)
    if jax.process_index() == 0:
      metrics.record_eval(_inside(workdir, "merged"), 0, evals[name], phase=name)
    print(evaluate.format_eval_table(evals), flush=True)
  if "downstream" in config and (stop := _preempted("fine-tuning")):
    return stop
  downstream = finetune.score_curriculum(config, workdir) if "downstream" in config else None
  return {"status": "complete", "phases": results, "eval": evals, "downstream": downstream}
