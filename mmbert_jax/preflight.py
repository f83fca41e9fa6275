"""Checks that run before anything expensive (devices, mesh, compilation): a run that cannot start fails in
seconds with one line naming the key or file and what to run or set, and leaves the workdir untouched.

  check(config, workdir, overrides)
      the values the loop validates (`train.validate`, for each phase with its `phase_overrides`), data_dir and
      its stats.json, init_from of later phases, the workdir's own checkpoints (phase, model size), model fields,
      the phase's languages and budgets against the data, the tokenizer against the model's vocabulary (a
      transformers init_from: its config.json against config.model, its vocabulary), W&B; and no `--config.`
      override that every phase of a curriculum replaces by its own value (it would change nothing:
      `--config.phase_overrides.<phase>.<key>` sets it)

Each failure is a `cli.ConfigError`: the entry point prints it as `error: …` and exits with status 2.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Mapping
from typing import Any

import ml_collections

from data_pipeline import filesystem as fs
from data_pipeline import mixture
from data_pipeline import tokenizer as tokenizer_lib
from mmbert_jax import checkpoint as ckpt_lib
from mmbert_jax import hf, phases, train
from mmbert_jax.cli import ConfigError
from mmbert_jax.model import ModelConfig, get_config

# Model fields that decide the parameter shapes; a checkpoint with other values belongs to another model size.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size")
# Phases that continue from the previous phase's checkpoint, and the phase to point `init_from` at.
CONTINUES_FROM = {"midtrain": "pretrain", "decay": "midtrain"}


def check(config: ml_collections.ConfigDict, workdir: str, overrides: Mapping[str, Any] | None = None) -> None:
  """Every check of a single-phase config, or of each phase of a curriculum config (in `<workdir>/<phase>`).
  `overrides`: {key: value} of the command line's `--config.<key>=<value>` flags."""
  workdir = str(_path(workdir, "--workdir"))
  cache = config.get("jax_cache_dir")
  if cache and (fs.is_remote(cache) or cache.startswith(("/", "~"))):  # a relative one is inside the workdir
    _path(cache, "config.jax_cache_dir")
  if "phases" not in config:
    check_phase(config, workdir)
    return
  if _latest_checkpoint(workdir) is not None:
    raise ConfigError(
      f"--workdir={workdir} holds a single phase's checkpoints, but {config.phases[0]}… is a "
      "curriculum (it runs each phase in <workdir>/<phase>): choose another --workdir"
    )
  _check_overrides(config, overrides or {})
  _check_merge(config)
  for phase in config.phases:
    try:
      phase_cfg = phases.phase_config(config, phase, workdir)
    except ValueError as e:
      raise ConfigError(str(e)) from None
    try:
      train.validate(phase_cfg)
    except ValueError as e:  # named as the key that set it: the phase's override, if it has one
      key = re.match(r"config\.([\w.]+)", str(e))
      if key and key[1] in _phase_keys(config, phase):
        raise ConfigError(str(e).replace(f"config.{key[1]}", f"config.phase_overrides.{phase}.{key[1]}", 1)) from None
      raise ConfigError(f"phase {phase}: {e}") from None
    inside = bool(config.phase_overrides[phase].get("init_from_phase"))
    check_phase(phase_cfg, str(fs.path(workdir) / phase), init_from_inside=inside)


def check_phase(config: ml_collections.ConfigDict, workdir: str, *, init_from_inside: bool = False) -> None:
  """One phase in `workdir`. `init_from_inside`: init_from names an earlier phase of the same curriculum (it
  need not exist yet)."""
  try:
    train.validate(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if config.init_from and not init_from_inside:
    _path(config.init_from, "config.init_from")
  _check_data(config)
  latest = _latest_checkpoint(workdir)
  if latest is not None:
    _check_own_checkpoint(config, workdir, *latest)
  else:
    _check_init_from(config, init_from_inside)
  _model_shape(config)  # an unknown model field or preset fails here, not after the mesh is built
  _check_mixture(config)
  if config.get("wandb") and config.wandb.get("project") and importlib.util.find_spec("wandb") is None:
    raise ConfigError(
      f"config.wandb.project={config.wandb.project} needs wandb: `pip install wandb`, or drop --config.wandb.project"
    )


def _check_merge(config: ml_collections.ConfigDict) -> None:
  """The merge reads the final checkpoints of phases this run trains (its base and its models)."""
  if "merge" not in config or not config.merge.method:
    return
  missing = [p for p in (config.merge.base, *config.merge.models) if p and p not in config.phases]
  if missing:
    raise ConfigError(
      f"config.merge names {', '.join(missing)}, not in config.phases ({', '.join(config.phases)}): "
      "add the phase(s), or run without the merge (--config.merge.method='')"
    )


def _phase_keys(config: ml_collections.ConfigDict, phase: str) -> dict[str, Any]:
  """{key: value} that `phase_overrides[phase]` sets (as `phases.phase_config` applies them: a section's keys one
  by one, a dict value as a whole)."""
  out = {}
  for key, value in config.phase_overrides[phase].items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update({f"{key}.{sub}": sub_value for sub, sub_value in value.items()})
    else:
      out["init_from" if key == "init_from_phase" else key] = value
  return out


def _check_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> None:
  """A `--config.<key>` that every phase replaces would be silently ignored: refused, naming the phases' values."""
  for key, value in overrides.items():
    if key.startswith("phase_overrides."):
      continue
    set_by = {}
    for phase in config.phases:
      keys = _phase_keys(config, phase)
      found = next((k for k in keys if key == k or key.startswith(f"{k}.")), None)
      if found is None:
        break
      set_by[phase] = keys[found]
    else:
      values = ", ".join(f"{phase}: {v!r}" for phase, v in set_by.items())
      raise ConfigError(
        f"--config.{key}={value}: every phase of this curriculum sets {key} itself ({values}), so the flag would "
        f"change nothing; set --config.phase_overrides.<phase>.{key} for the phases to change"
      )


def _path(value: str, key: str):
  """`fs.path`, its one-line error (scheme, malformed gs://) as a ConfigError naming `key`."""
  try:
    return fs.path(value, key)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _check_data(config: ml_collections.ConfigDict) -> None:
  data_dir = config.data.data_dir
  if not data_dir and "demo_corpus" in config:
    return  # the demo builds its corpus in <workdir>/data
  prepare = f"`python -m data_pipeline.prepare --output_dir {data_dir or 'DIR'} ...`"
  if not data_dir:
    raise ConfigError(
      f"config.data.data_dir is empty: set --config.data.data_dir=DIR to a directory prepared by "
      f"{prepare} (or `python -m data_pipeline.demo_corpus --data_dir DIR` for a small one)"
    )
  path = _path(data_dir, "config.data.data_dir")
  if not path.is_dir():
    raise ConfigError(f"config.data.data_dir={data_dir} does not exist: prepare it with {prepare}")
  if not (path / "stats.json").exists():
    raise ConfigError(
      f"config.data.data_dir={data_dir} has no stats.json: run {prepare} to completion (an "
      "unfinished prepare writes none)"
    )


def _check_mixture(config: ml_collections.ConfigDict) -> None:
  data_dir = config.data.data_dir
  if not data_dir:
    return
  try:  # the phase's mixture over this data: languages, budgets and pass caps that do not fit fail here
    stats = mixture.load_stats(data_dir)
    mixture.compute_mixture(
      mixture.counts_from_stats(stats, list(config.data.budgets)),
      train.pipeline_config(config, config.batch_size).phase,
    )
    if config.data.eval_languages:
      mixture.resolve_languages(config.data.eval_languages, list(stats["languages"]))
  except ValueError as e:
    raise ConfigError(
      f"config.data (languages={config.data.languages}, eval_languages="
      f"{config.data.eval_languages or '='}, budgets={dict(config.data.budgets)}) does not fit "
      f"{data_dir}: {e}"
    ) from None
  tokenizer = stats.get("tokenizer", {}).get("vocab_size", 0)
  vocab = _model_shape(config)["vocab_size"]
  if _from_transformers(config):
    _check_checkpoint_tokenizer(config, stats.get("tokenizer", {}))
  if tokenizer > vocab:  # ids past the embedding table would be clamped silently, not rejected
    raise ConfigError(
      f"{data_dir} was tokenized with {tokenizer} pieces but the model has vocab_size={vocab} "
      f"(config.model_preset={config.model_preset}): set --config.model.vocab_size={tokenizer} where "
      "the config has that key, or prepare the data with a tokenizer that fits"
    )


def _check_init_from(config: ml_collections.ConfigDict, inside: bool) -> None:
  phase = config.phase
  previous = next((prev for name, prev in CONTINUES_FROM.items() if phase.startswith(name)), None)
  if not config.init_from:
    if previous and not config.get("allow_random_init", False):
      raise ConfigError(
        f"config.init_from is empty, but phase {phase} continues from the {previous} checkpoint: "
        f"set --config.init_from=<the {previous} workdir> (or --config.allow_random_init=True to "
        "train it from random weights)"
      )
    return
  if inside:
    return
  if _from_transformers(config):
    if config.init_optimizer_state:
      raise ConfigError(
        f"config.init_from={config.init_from} is a transformers directory, which holds no optimizer state: "
        "drop --config.init_optimizer_state"
      )
    return
  try:
    ckpt_lib.resolve(config.init_from, "config.init_from")
  except ckpt_lib.CheckpointError as e:
    raise ConfigError(f"config.init_from={config.init_from}: {e}") from None


def _from_transformers(config: ml_collections.ConfigDict) -> bool:
  """Whether init_from names a transformers ModernBERT directory (config.json + safetensors)."""
  return bool(config.get("init_from")) and hf.is_model_dir(_path(config.init_from, "config.init_from"))


def _check_checkpoint_tokenizer(config: ml_collections.ConfigDict, info: dict[str, Any]) -> None:
  """The data of a run from a transformers directory must be tokenized with that checkpoint's tokenizer: the
  same file where the directory ships one (tokenizer.json / tokenizer.model), else the same vocabulary size and
  special ids; another tokenizer's ids would name other tokens."""
  directory = _path(config.init_from, "config.init_from")
  cfg = hf.read_config(directory)
  data_dir, used = config.data.data_dir, info.get("path", "its tokenizer")
  shipped = [directory / name for name in ("tokenizer.json", "tokenizer.model") if (directory / name).exists()]
  prepare = (
    f"prepare it with `python -m data_pipeline.prepare --tokenizer={shipped[0] if shipped else '<its tokenizer>'} ...`"
  )
  if shipped and info.get("sha256") not in {tokenizer_lib.file_sha256(p) for p in shipped}:
    raise ConfigError(
      f"{data_dir} was tokenized with {used}, not with the tokenizer of config.init_from={config.init_from} "
      f"({', '.join(p.name for p in shipped)}): {prepare}"
    )
  want = {"vocab_size": cfg.vocab_size, "pad": cfg.pad_id, "eos": cfg.eos_id, "bos": cfg.bos_id, "mask": cfg.mask_id}
  have = {"vocab_size": info.get("vocab_size"), **{k: info.get("special_ids", {}).get(k) for k in list(want)[1:]}}
  differ = [k for k in want if have[k] != want[k]]
  if not shipped and differ:
    raise ConfigError(
      f"{data_dir} was tokenized with {used} ({', '.join(f'{k}={have[k]}' for k in differ)}), but "
      f"config.init_from={config.init_from} has {', '.join(f'{k}={want[k]}' for k in differ)}: {prepare}"
    )


def _model_shape(config: ml_collections.ConfigDict) -> dict[str, Any]:
  # None: the preset's value; dtype "auto" is resolved on the device.
  overrides = {k: v for k, v in config.model.items() if k != "dtype" and v is not None}
  unknown = sorted(set(overrides) - set(ModelConfig.__dataclass_fields__))
  if unknown:
    raise ConfigError(
      f"config.model.{unknown[0]} is not a model field (fields: {', '.join(sorted(ModelConfig.__dataclass_fields__))})"
    )
  if _from_transformers(config):
    try:
      cfg = hf.run_config(config.init_from, overrides)
    except (ValueError, FileNotFoundError) as e:
      raise ConfigError(f"config.init_from={config.init_from}: {e}") from None
    return {k: getattr(cfg, k) for k in SHAPE_FIELDS}
  try:
    cfg = get_config(config.model_preset, **overrides)
  except ValueError as e:
    raise ConfigError(f"config.model_preset / config.model: {e}") from None
  return {k: getattr(cfg, k) for k in SHAPE_FIELDS}


def _latest_checkpoint(workdir: str) -> tuple[int, dict[str, Any]] | None:
  """(step, metadata) of the workdir's newest complete checkpoint, without starting a device backend."""
  directory = ckpt_lib.checkpoint_dir(workdir)
  if not directory.is_dir():
    return None
  found = ckpt_lib.steps(directory)
  if not found:
    return None
  path = directory / str(found[-1]) / "meta" / "metadata"  # the JSON item Orbax wrote
  try:
    return found[-1], json.loads(path.read_text())
  except (OSError, ValueError):
    return found[-1], {}


def _check_own_checkpoint(config: ml_collections.ConfigDict, workdir: str, step: int, meta: dict) -> None:
  saved_phase = meta.get("phase")
  if saved_phase is not None and saved_phase != config.phase:
    raise ConfigError(
      f"--workdir={workdir} holds checkpoints of phase {saved_phase} (step {step}), not "
      f"{config.phase}: choose a new --workdir (and --config.init_from={workdir} to start from them)"
    )
  saved = meta.get("model_config") or {}
  now = _model_shape(config)
  differ = [k for k in SHAPE_FIELDS if k in saved and saved[k] != now[k]]
  if differ:
    have = ", ".join(f"{k}={saved[k]}" for k in differ)
    want = ", ".join(f"{k}={now[k]}" for k in differ)
    raise ConfigError(
      f"--workdir={workdir} holds checkpoints of another model size ({have}; "
      f"config.model_preset={config.model_preset} gives {want}): choose a new --workdir"
    )
