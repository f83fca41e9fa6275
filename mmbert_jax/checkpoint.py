"""Orbax checkpoints of a training run, and the phase handoff that starts one run from another's checkpoint.

A run's checkpoints live in `<workdir>/checkpoints/<step>/` with four separate items, so each can be restored
alone: `params` (pure dict of float32 arrays), `opt_state`, `data_iter` (the data pipeline's JSON state) and
`meta` (phase, step, token counters, model config). Orbax writes each step to a temporary directory and renames it
when complete, so a save killed half-way is never taken for a checkpoint.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath



class CheckpointError(ValueError):
  pass


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints")


def _manager(directory: str, **options) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      epath.Path(directory),
      item_handlers=dict(params=ocp.StandardCheckpointHandler(), opt_state=ocp.StandardCheckpointHandler(),
                         data_iter=ocp.JsonCheckpointHandler(), meta=ocp.JsonCheckpointHandler()),
      options=ocp.CheckpointManagerOptions(**options))


class Checkpointer:
  """Saves and restores the train state of one run (asynchronously; keeps the last `max_to_keep`)."""

  def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = checkpoint_dir(workdir)
    self.manager = _manager(self.directory, max_to_keep=max_to_keep, create=True,
                            enable_async_checkpointing=async_save)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, *, params, opt_state, data_state: dict, meta: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        opt_state=ocp.args.StandardSave(opt_state),
        data_iter=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, *, abstract_params, abstract_opt_state) -> dict[str, Any]:
    """Everything of `step`, onto the shardings carried by the abstract (ShapeDtypeStruct) trees."""
    check_params_fit(self.manager, step, abstract_params, self.directory)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params),
        opt_state=ocp.args.StandardRestore(abstract_opt_state),
        data_iter=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    return dict(restored)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def _flat(tree) -> dict[str, Any]:
  return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_params_fit(manager: ocp.CheckpointManager, step: int, abstract_params, where: str) -> None:
  """One clear error naming the first parameter whose stored shape differs from the model's."""
  stored = manager.item_metadata(step)["params"]
  if stored is None:
    raise CheckpointError(f"{where}/{step}: no 'params' item in this checkpoint")
  have, want = _flat(stored), _flat(abstract_params)
  for name in sorted(set(have) | set(want)):
    if name not in have:
      raise CheckpointError(f"{where}/{step}: parameter {name!r} is not in the checkpoint (model config differs?)")
    if name not in want:
      raise CheckpointError(f"{where}/{step}: checkpoint parameter {name!r} does not exist in the model")
    if tuple(have[name].shape) != tuple(want[name].shape):
      raise CheckpointError(f"{where}/{step}: parameter {name!r} has shape {tuple(have[name].shape)} in the "
                            f"checkpoint but {tuple(want[name].shape)} in the model")


def resolve(path: str) -> tuple[str, int]:
  """`init_from` → (checkpoint manager directory, step). Accepts a run's workdir (its latest checkpoint), its
  `checkpoints/` directory, or one step directory `.../checkpoints/<step>`."""
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise CheckpointError(f"init_from: {path} does not exist")
  name = os.path.basename(path.rstrip("/"))
  if name.isdigit() and os.path.isdir(os.path.join(path, "params")):
    return os.path.dirname(path), int(name)
  for directory in (checkpoint_dir(path), path):
    if os.path.isdir(directory):
      steps = ocp.utils.checkpoint_steps(epath.Path(directory))
      if steps:
        return directory, max(steps)
  raise CheckpointError(f"init_from: no complete checkpoint under {path} (expected a workdir, its checkpoints/ "
                        "directory or a checkpoints/<step> directory)")


def read_meta(directory: str, step: int) -> dict[str, Any]:
  with _manager(directory, read_only=True) as manager:
    return dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])


def restore_for_handoff(path: str, abstract_params, abstract_opt_state=None) -> dict[str, Any]:
  """Params (and, if `abstract_opt_state` is given, optimizer state) of another run's checkpoint, restored into
  this run's shapes and shardings, plus that checkpoint's metadata."""
  directory, step = resolve(path)
  with _manager(directory, read_only=True) as manager:
    check_params_fit(manager, step, abstract_params, directory)
    items = dict(params=ocp.args.StandardRestore(abstract_params), meta=ocp.args.JsonRestore())
    if abstract_opt_state is not None:
      items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
    restored = dict(manager.restore(step, args=ocp.args.Composite(**items)))
  restored["source"] = f"{directory}/{step}"
  return restored
