"""Orbax checkpoint items for the training iterator, restorable with a different number of processes.

Every process saves its own streams to `process_{i}-of-{n}.json` (the file layout of `grain.checkpoint`); restore
reads all those files, merges their streams into the global state and hands this process's share to the iterator.
So a run saved on 8 hosts resumes on 4 (or 16) with the same global batch sequence.

  mngr.save(step, args=ocp.args.Composite(params=..., data_iter=PipelineSave(it)))
  mngr.restore(step, args=ocp.args.Composite(params=..., data_iter=PipelineRestore(fresh_it)))

With a single process, `ocp.args.JsonSave(it.get_state())` / `JsonRestore()` + `it.set_state` is equivalent, and
`grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)` work too (same process count only).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import grain
import orbax.checkpoint as ocp
from etils import epath

from data_pipeline import filesystem as fs
from data_pipeline import pipeline

_FILE_RE = re.compile(r"process_(\d+)-of-(\d+)\.json")


def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
  """The global state from the states of all processes of one save."""
  if not states:
    raise ValueError("no iterator states to merge")
  steps = {s["step"] for s in states}
  if len(steps) != 1:
    raise ValueError(f"iterator states of one checkpoint are at different steps {sorted(steps)}")
  merged = dict(states[0], streams={})
  for s in states:
    if s["pipeline"] != states[0]["pipeline"]:
      raise ValueError("iterator states of one checkpoint come from different pipelines")
    merged["streams"].update(s["streams"])
  return merged


def load_state(directory: str | os.PathLike) -> dict[str, Any]:
  """Reads and merges every `process_*-of-*.json` in `directory` (local or gs://). No state, or the states of
  only some processes, is an error: a resumed run must not silently start its data over."""
  directory = fs.path(directory, "data iterator checkpoint")
  files = sorted(
    (f for f in directory.glob("process_*-of-*.json") if _FILE_RE.fullmatch(f.name)),
    key=lambda f: int(_FILE_RE.fullmatch(f.name).group(1)),
  )
  if not files:
    raise FileNotFoundError(f"no process_*-of-*.json iterator states in {directory}")
  found = {(int(m.group(1)), int(m.group(2))) for m in (_FILE_RE.fullmatch(f.name) for f in files)}
  counts = {n for _, n in found}
  if len(counts) != 1 or found != {(i, n) for n in counts for i in range(n)}:
    raise ValueError(f"{directory} holds an incomplete set of iterator states: {sorted(f.name for f in files)}")
  return merge_states([json.loads(f.read_text()) for f in files])


class PipelineCheckpointHandler(grain.checkpoint.CheckpointHandler):
  """Saves this process's state file; restores from the files of all processes."""

  def save(self, directory: epath.Path, item: Any = None, args: Any = None):
    it = item or args.item
    name = f"process_{it.process_index}-of-{it.process_count}.json"
    fs.write_text(epath.Path(directory) / name, json.dumps(it.get_state()))

  def restore(self, directory: epath.Path, item: Any = None, args: Any = None):
    it = item or args.item
    it.set_state(load_state(directory))
    return it


@ocp.args.register_with_handler(PipelineCheckpointHandler, for_save=True)
@dataclasses.dataclass
class PipelineSave(ocp.args.CheckpointArgs):
  item: pipeline.TrainIterator


@ocp.args.register_with_handler(PipelineCheckpointHandler, for_restore=True)
@dataclasses.dataclass
class PipelineRestore(ocp.args.CheckpointArgs):
  item: pipeline.TrainIterator
