"""Orbax checkpoints of a training run, and the phase handoff that starts one run from another's checkpoint.

A run's checkpoints live in `<workdir>/checkpoints/<step>/` with four separate items, so each can be restored
alone: `params` (pure dict of float32 arrays), `opt_state`, `data_iter` (the data pipeline's JSON state) and
`meta` (phase, step, token counters, model config). Orbax writes each step to a temporary directory and renames it
when complete (in a bucket, which has no folder rename, it marks a complete step with a commit file), so a save
killed half-way is never taken for a checkpoint. Paths are local or `gs://` (`data_pipeline.filesystem`); Orbax
writes buckets itself.
"""

from __future__ import annotations

import copy
import logging as logging_lib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

from data_pipeline import checkpoint as data_ckpt
from data_pipeline import filesystem as fs
from mmbert_jax import hf, storage
from mmbert_jax.model import ModelConfig, abstract_model


class CheckpointError(ValueError):
  pass


class ParamsMismatchError(CheckpointError):
  """The checkpoint's parameters do not have the model's names or shapes (the model config changed)."""


def checkpoint_dir(workdir: str | epath.Path) -> epath.Path:
  return fs.path(workdir, "workdir") / "checkpoints"


class _Manager(ocp.CheckpointManager):
  """Orbax's manager without its own calls to JAX's preemption sync point (in `save` and in the background thread
  that finishes a save; only logging and metrics use them): the sync manager keeps the last count it was given, and
  the training loop gives it its own, once per step (train.Preemption)."""

  def reached_preemption(self, step: int) -> bool:
    return False


class _QuietBackgroundFailure(logging_lib.Filter):
  """Orbax logs the traceback of a background save that failed, then hands the error to the waiting caller, which
  reports it as one line (`Checkpointer.check`, `wait`); a storage outage, which the command reports as one line
  too (`storage.unavailable`), is not logged by any of its writers either."""

  def filter(self, record: logging_lib.LogRecord) -> bool:
    if record.pathname.endswith("future.py") and "raised an exception" in record.getMessage():
      return False
    return not (record.exc_info and storage.unavailable(record.exc_info[1]) is not None)


logging_lib.getLogger("absl").addFilter(_QuietBackgroundFailure())


class _QuietReadOnly(logging_lib.Filter):
  """Orbax announces every read-only manager with a warning (the phase hand-off, merge, export, evaluate and
  fine-tuning read checkpoints that way): nothing a user can act on. Its other warnings pass."""

  def filter(self, record: logging_lib.LogRecord) -> bool:
    return not str(record.msg).startswith("Given directory is read only")


logging_lib.getLogger("absl").addFilter(_QuietReadOnly())


def bound_storage_retries(timeout_s: float) -> None:
  """Tensorstore writes and reads Orbax's arrays in a bucket with retries of its own (32 tries, at most 32 s apart,
  by default: about 15 minutes). They are set to end a minute after `timeout_s` (`config.storage_timeout_s`), the
  bound that `data_pipeline.filesystem` gives every other request: a command line ends there first, with one line;
  a write that only tensorstore retries fails the run a minute later (exit 1). Orbax builds each save's
  tensorstore context from these defaults."""
  delays = [min(2.0**n, 32.0) for n in range(int(timeout_s // 32) + 8)]  # 1 s doubling to 32 s, as tensorstore does
  tries = next(n + 1 for n in range(len(delays)) if sum(delays[: n + 1]) >= timeout_s + 60)
  retries = {"max_retries": tries, "initial_delay": "1s", "max_delay": "32s"}
  for context in (ts_utils._BASE_TS_CONTEXT, ts_utils._DEFAULT_OCDBT_TS_CONTEXT):
    context["gcs_request_retries"] = dict(retries)


def _manager(directory: epath.Path, *, data_iter: bool = False, **options) -> ocp.CheckpointManager:
  handlers = dict(
    params=ocp.StandardCheckpointHandler(), opt_state=ocp.StandardCheckpointHandler(), meta=ocp.JsonCheckpointHandler()
  )
  if options.get("read_only"):
    # What Orbax would otherwise change itself, with a warning line each; the data iterator's handler is known so
    # that reading a step's item metadata does not warn about an item it cannot restore.
    options.update(save_interval_steps=0, create=False)
    data_iter = True
  if data_iter:
    # Each process writes its own streams; restore merges them, so the process count may change (elastic).
    handlers["data_iter"] = data_ckpt.PipelineCheckpointHandler()
  return _Manager(directory, item_handlers=handlers, options=ocp.CheckpointManagerOptions(**options))


class Checkpointer:
  """Saves and restores the train state of one run (asynchronously; keeps the last `max_to_keep`).

  A failed save (disk full, read-only) is raised as `storage.WriteError` by the first `check` after the background
  save has ended, or by the next `save` or `wait`: Orbax writes each step to a temporary directory first, so the
  complete checkpoints before it stay intact.
  """

  def __init__(self, workdir: str | epath.Path, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = checkpoint_dir(workdir)
    try:
      self.manager = _manager(
        self.directory, data_iter=True, max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
      )
    except OSError as e:
      raise storage.write_error("creating the checkpoint directory", str(self.directory), e) from e

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def check(self) -> None:
    """Raises the error of an asynchronous save that failed since the last check (without waiting)."""
    try:
      self.manager.check_for_errors()
    except Exception as e:  # whatever the storage layer raised (OSError, tensorstore's ValueError, ...)
      raise storage.write_error("saving a checkpoint", str(self.directory), e) from e

  def save(self, step: int, *, params, opt_state, data_iter, meta: dict) -> None:
    """Starts saving `step`; `meta` is copied first, so the caller may keep changing it."""
    self.check()
    try:
      self.manager.save(
        step,
        args=ocp.args.Composite(
          params=ocp.args.StandardSave(params),
          opt_state=ocp.args.StandardSave(opt_state),
          data_iter=data_ckpt.PipelineSave(data_iter),
          meta=ocp.args.JsonSave(copy.deepcopy(meta)),
        ),
        force=True,
      )
    except Exception as e:  # tensorstore reports a full disk as ValueError, Python as OSError
      if storage.is_storage_error(e):
        raise storage.write_error(f"saving checkpoint {step}", str(self.directory), e) from e
      raise

  def restore(self, step: int, *, abstract_params, abstract_opt_state, data_iter) -> dict[str, Any]:
    """Everything of `step`, onto the shardings carried by the abstract (ShapeDtypeStruct) trees; the data
    iterator `data_iter` is moved to the saved position in place."""
    check_params_fit(self.manager, step, abstract_params, self.directory)
    restored = self.manager.restore(
      step,
      args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params),
        opt_state=ocp.args.StandardRestore(abstract_opt_state),
        data_iter=data_ckpt.PipelineRestore(data_iter),
        meta=ocp.args.JsonRestore(),
      ),
    )
    return dict(restored)

  def restore_latest(
    self, *, abstract_params, abstract_opt_state, data_iter, warn, check_meta=lambda meta: None
  ) -> dict[str, Any] | None:
    """Everything of the newest step that restores (see `restore`), or None when there is no checkpoint.

    Newer steps that do not restore (damaged files) are moved aside to `corrupt-<step>` (never deleted), each
    named by one line through `warn`. When no step restores, raises CheckpointError and moves nothing.
    `check_meta(meta)` sees a step's metadata before its arrays are read; what it raises (e.g. a refused config
    change) is not damage and propagates.
    """
    steps = sorted(self.all_steps(), reverse=True)
    failed: list[tuple[int, Exception]] = []
    for step in steps:
      try:
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      except Exception as e:  # an unreadable meta item: damage
        failed.append((step, e))
        continue
      check_meta(meta)
      try:
        restored = self.restore(
          step, abstract_params=abstract_params, abstract_opt_state=abstract_opt_state, data_iter=data_iter
        )
      except Exception as e:  # whatever damaged files raise (tensorstore, zstd, JSON, KeyError) or a shape error
        failed.append((step, e))
        continue
      for bad, error in failed:
        where = self._move_aside(bad)
        warn(
          f"checkpoint {self.directory}/{bad} does not restore ({storage.reason(error)}); moved to {where}, "
          f"resuming from step {step}"
        )
      return restored
    if not failed:
      return None
    newest, error = failed[0]
    if all(isinstance(e, ParamsMismatchError) for _, e in failed):  # a config change, not damage
      raise error
    raise CheckpointError(
      f"no checkpoint in {self.directory} restores (newest, step {newest}: "
      f"{storage.reason(error)}); nothing was moved. Move the damaged steps away or use "
      "another --workdir"
    )

  def _move_aside(self, step: int) -> str:
    target = self.directory / f"corrupt-{step}"
    n = 1
    while target.exists():
      n += 1
      target = self.directory / f"corrupt-{step}.{n}"
    if jax.process_index() == 0:
      fs.move_tree(self.directory / str(step), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"mmbert_jax: moved checkpoint {step} aside")
    self.manager.reload()
    logging.warning("moved damaged checkpoint %s/%d to %s", self.directory, step, target)
    return str(target)

  def wait(self) -> None:
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      raise storage.write_error("saving a checkpoint", str(self.directory), e) from e

  def close(self) -> None:
    self.manager.close()


def _flat(tree) -> dict[str, Any]:
  return {
    jax.tree_util.keystr(path, simple=True, separator="/"): leaf
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def check_params_fit(manager: ocp.CheckpointManager, step: int, abstract_params, where: str | epath.Path) -> None:
  """One clear error naming the first parameter whose stored shape differs from the model's."""
  try:
    stored = manager.item_metadata(step)["params"]
  except (KeyError, OSError, ValueError) as e:  # unreadable metadata: a damaged checkpoint
    raise CheckpointError(
      f"{where}/{step}: the parameters' metadata does not read ({type(e).__name__}: "
      f"{str(e).splitlines()[0] if str(e) else ''})"
    ) from e
  if stored is None:
    raise CheckpointError(f"{where}/{step}: no 'params' item in this checkpoint")
  have, want = _flat(stored), _flat(abstract_params)
  for name in sorted(set(have) | set(want)):
    if name not in have:
      raise ParamsMismatchError(f"{where}/{step}: parameter {name!r} is not in the checkpoint (model config differs?)")
    if name not in want:
      raise ParamsMismatchError(f"{where}/{step}: checkpoint parameter {name!r} does not exist in the model")
    if tuple(have[name].shape) != tuple(want[name].shape):
      raise ParamsMismatchError(
        f"{where}/{step}: parameter {name!r} has shape {tuple(have[name].shape)} in the "
        f"checkpoint but {tuple(want[name].shape)} in the model"
      )


def steps(directory: str | epath.Path) -> list[int]:
  """Complete checkpoints in a checkpoints/ directory, oldest first."""
  return sorted(ocp.utils.checkpoint_steps(fs.path(directory, "checkpoint directory")))


def resolve(path: str | epath.Path, key: str = "checkpoint") -> tuple[epath.Path, int]:
  """`init_from` → (checkpoint manager directory, step). Accepts a run's workdir (its latest checkpoint), its
  `checkpoints/` directory, or one step directory `.../checkpoints/<step>`, local or `gs://`. `key` names the flag
  or config key in the error for a path that is not local or gs://."""
  try:
    path = fs.path(path, key)
  except ValueError as e:  # a scheme other than gs://, or a malformed gs:// path
    raise CheckpointError(str(e)) from None
  if not path.exists():
    raise CheckpointError(f"checkpoint path {path} does not exist")
  if names_a_step(path):
    return path.parent, int(path.name)
  for directory in (checkpoint_dir(path), path):
    if directory.is_dir():
      found = steps(directory)
      if found:
        return directory, found[-1]
  raise CheckpointError(
    f"no complete checkpoint under {path} (expected a workdir, its checkpoints/ "
    "directory or a checkpoints/<step> directory)"
  )


def names_a_step(path: str | epath.Path) -> bool:
  """Whether `path` is one step directory `.../checkpoints/<step>` (not a workdir or `checkpoints/`)."""
  path = fs.path(path, "checkpoint")
  return path.name.isdigit() and (path / "params").is_dir()


def _unreadable(directory: epath.Path, step: int, error: Exception) -> CheckpointError:
  """Another run's checkpoint that does not read (damaged files): one line naming it; nothing there is changed
  (only a run's own latest checkpoint is ever moved aside, by `Checkpointer.restore_latest`)."""
  return CheckpointError(
    f"checkpoint {directory}/{step} (step {step}) does not restore ({storage.reason(error)}); it was left as it "
    "is: repair it or name another step"
  )


def read_meta(directory: str | epath.Path, step: int) -> dict[str, Any]:
  directory = fs.path(directory, "checkpoint directory")
  with _manager(directory, read_only=True) as manager:
    try:
      return dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
    except Exception as e:  # whatever damaged files raise (JSON, tensorstore, a missing item)
      raise _unreadable(directory, step, e) from e


def restore_for_handoff(
  path: str | epath.Path,
  abstract_params,
  abstract_opt_state=None,
  *,
  require_complete: bool = False,
  key: str = "init_from",
) -> dict[str, Any]:
  """Params (and, if `abstract_opt_state` is given, optimizer state) of another run's checkpoint, restored into
  this run's shapes and shardings, plus that checkpoint's metadata. With `require_complete`, a workdir (or its
  checkpoints/) whose latest checkpoint is not its run's final one is refused: only an explicit
  `checkpoints/<step>` may start from an unfinished run. A transformers ModernBERT directory (config.json +
  safetensors) gives its weights and no optimizer state; its metadata is {"phase": "transformers", "tokens": 0}."""
  if hf.is_model_dir(path):
    return _restore_transformers(path, abstract_params, abstract_opt_state, key)
  directory, step = resolve(path, key)
  with _manager(directory, read_only=True) as manager:
    if require_complete and not names_a_step(path):
      meta = read_meta(directory, step)
      if not meta.get("complete", True):  # params-only checkpoints (merges, imports) carry complete=True
        raise CheckpointError(
          f"init_from {path}: that run is not finished (its latest checkpoint, "
          f"{directory}/{step}, is not final); finish it, or start from that step explicitly: "
          f"--config.init_from={directory}/{step}"
        )
    check_params_fit(manager, step, abstract_params, directory)
    items = dict(params=ocp.args.StandardRestore(abstract_params), meta=ocp.args.JsonRestore())
    if abstract_opt_state is not None:
      items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
    try:
      restored = dict(manager.restore(step, args=ocp.args.Composite(**items)))
    except Exception as e:  # Orbax wraps tensorstore's error in a bare Exception
      raise _unreadable(directory, step, e) from e
  restored["source"] = f"{directory}/{step}"
  return restored


def _restore_transformers(path, abstract_params, abstract_opt_state, key: str) -> dict[str, Any]:
  if abstract_opt_state is not None:
    raise CheckpointError(f"{key} {path}: a transformers directory holds no optimizer state; drop init_optimizer_state")
  params = nnx.to_pure_dict(nnx.state(hf.load(path), nnx.Param))
  have, want = _flat(params), _flat(abstract_params)
  for name in sorted(set(have) | set(want)):
    if name not in have or name not in want or tuple(have[name].shape) != tuple(want[name].shape):
      shapes = [tuple(t[name].shape) if name in t else None for t in (have, want)]
      raise CheckpointError(f"{key} {path}: parameter {name} has shape {shapes[0]}, this run's model {shapes[1]}")
  # Every process reads the whole directory and keeps the shards its devices hold, in this run's shardings.
  params = jax.tree.map(
    lambda v, a: jax.make_array_from_callback(a.shape, a.sharding, lambda index, v=np.asarray(v): v[index]),
    params,
    abstract_params,
  )
  return {"params": params, "meta": {"phase": "transformers", "tokens": 0}, "source": str(fs.path(path, key))}


def model_config_of(meta: dict[str, Any]) -> ModelConfig:
  if "model_config" not in meta:
    raise CheckpointError("checkpoint metadata has no 'model_config' (not written by mmbert_jax.train?)")
  return ModelConfig(**meta["model_config"])


def load_params(path: str | epath.Path) -> tuple[Any, dict[str, Any], str]:
  """(params as a pure dict on the default device, metadata, 'dir/step') of a checkpoint, without a mesh.

  `path` is anything `resolve` accepts. The model config stored in the metadata gives the restore target.
  """
  directory, step = resolve(path)
  meta = read_meta(directory, step)
  # Shapes only: the attention kernel the run used (e.g. splash on TPU) need not run on this host.
  cfg = model_config_of(meta).replace(attention_impl="xla")
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
    nnx.to_pure_dict(nnx.state(abstract_model(cfg), nnx.Param)),
  )
  restored = restore_for_handoff(f"{directory}/{step}", abstract)
  return restored["params"], meta, restored["source"]


def save_params(workdir: str | epath.Path, step: int, params, meta: dict[str, Any]) -> str:
  """A params-only checkpoint (merges, imports): usable as `init_from` and by export/evaluate. The temporary
  directory of a save that did not complete (killed) is removed first; complete checkpoints are never replaced."""
  directory = checkpoint_dir(workdir)
  if directory.exists() and ocp.utils.checkpoint_steps(directory):
    raise CheckpointError(f"{directory} already holds checkpoints; choose a new output directory")
  options = dict(create=True, enable_async_checkpointing=False, cleanup_tmp_directories=True)
  try:
    with _manager(directory, **options) as manager:
      manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)))
  except Exception as e:  # tensorstore reports a full disk as ValueError, Python as OSError
    if storage.is_storage_error(e):
      raise storage.write_error(f"saving checkpoint {step}", str(directory), e) from e
    raise
  return f"{directory}/{step}"


def load_model(path: str | epath.Path, **overrides):
  """A MaskedLM with the parameters of a checkpoint (e.g. for export or evaluation), its metadata and source.
  Attention runs with the implementation that suits this host ('auto') unless `overrides` name one."""
  params, meta, source = load_params(path)
  cfg = model_config_of(meta).replace(**{"attention_impl": "auto", **overrides})
  graph, state = nnx.split(abstract_model(cfg))
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graph, state), meta, source
