"""Hugging Face interop: `ModernBertForMaskedLM` directories (config.json + safetensors) ⇄ `MaskedLM`.

Every torch Linear stores `W[out, in]`; our kernels are `W.T`, with the fused projections reshaped so heads and
the GLU halves are explicit axes (docs/ARCHITECTURE.md §3). `decoder.weight` is tied to the embedding and not written.
Directories may be local or `gs://` (safetensors reads and writes local files: `data_pipeline.filesystem` copies).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from safetensors import flax as safetensors_flax

from data_pipeline import filesystem as fs
from mmbert_jax.model import RUNTIME_FIELDS, MaskedLM, ModelConfig, abstract_model

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"


def is_model_dir(path: str | epath.Path) -> bool:
  """A transformers model directory: its config.json next to safetensors weights (a training workdir also holds a
  config.json, the run's config, but no weights files)."""
  path = fs.path(path, "model directory")
  return (path / CONFIG_FILE).exists() and any((path / name).exists() for name in (WEIGHTS_FILE, WEIGHTS_INDEX_FILE))


class HFConfigError(ValueError):
  """A config.json this model cannot represent; the message names the field."""


# ---------------------------------------------------------------------------------------------------------------
# config.json ⇄ ModelConfig
# ---------------------------------------------------------------------------------------------------------------


def _rope_theta(hf: dict[str, Any], kind: str, legacy_key: str, default: float) -> float:
  params = (hf.get("rope_parameters") or {}).get(kind) or {}
  rope_type = params.get("rope_type", "default")
  if rope_type != "default":
    raise HFConfigError(
      f"config.json: rope_parameters.{kind}.rope_type={rope_type!r} is not supported (only 'default' RoPE)"
    )
  return float(params.get("rope_theta", hf.get(legacy_key, default)))


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
  """ModelConfig from a ModernBERT config.json dict (transformers 5.x or legacy spellings)."""
  if hf.get("model_type") != "modernbert":
    raise HFConfigError(f"config.json: model_type={hf.get('model_type')!r}, expected 'modernbert'")
  unsupported = {
    "norm_bias": False,
    "attention_bias": False,
    "mlp_bias": False,
    "decoder_bias": True,
    "tie_word_embeddings": True,
  }
  for key, want in unsupported.items():
    if key in hf and bool(hf[key]) != want:
      raise HFConfigError(f"config.json: {key}={hf[key]!r} is not supported (expected {want})")
  act = hf.get("hidden_activation", "gelu")
  if act != "gelu":
    raise HFConfigError(f"config.json: hidden_activation={act!r} is not supported (expected 'gelu', exact GELU)")
  num_layers = int(hf.get("num_hidden_layers", 22))
  every_n = int(hf.get("global_attn_every_n_layers", 3))
  layer_types = hf.get("layer_types")
  if layer_types is not None:
    globals_ = [i for i, t in enumerate(layer_types) if t == "full_attention"]
    every_n = globals_[1] - globals_[0] if len(globals_) > 1 else num_layers
    expected = ["full_attention" if i % every_n == 0 else "sliding_attention" for i in range(num_layers)]
    if list(layer_types) != expected:
      raise HFConfigError(f"config.json: layer_types={layer_types} is not a 'global every n layers from 0' pattern")
  eps = hf.get("norm_eps", hf.get("layer_norm_eps", 1e-5))
  try:
    return ModelConfig(
      vocab_size=int(hf["vocab_size"]),
      hidden_size=int(hf["hidden_size"]),
      num_layers=num_layers,
      num_heads=int(hf["num_attention_heads"]),
      intermediate_size=int(hf["intermediate_size"]),
      local_window=int(hf.get("local_attention", 128)),
      global_every_n=every_n,
      global_rope_theta=_rope_theta(hf, "full_attention", "global_rope_theta", 160_000.0),
      local_rope_theta=_rope_theta(hf, "sliding_attention", "local_rope_theta", 10_000.0),
      norm_eps=float(eps),
      initializer_range=float(hf.get("initializer_range", 0.02)),
      max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
      pad_id=int(hf.get("pad_token_id", 0)),
      eos_id=int(hf.get("eos_token_id", hf.get("sep_token_id", 1))),
      bos_id=int(hf.get("bos_token_id", 2)),
      mask_id=int(hf.get("mask_token_id", 4)),
    )
  except KeyError as e:
    raise HFConfigError(f"config.json: required field {e.args[0]!r} is missing") from None
  except ValueError as e:
    raise HFConfigError(f"config.json: {e}") from None


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  """config.json for transformers' ModernBertForMaskedLM (5.x fields plus the legacy ones older versions read)."""
  return {
    "architectures": ["ModernBertForMaskedLM"],
    "model_type": "modernbert",
    "vocab_size": cfg.vocab_size,
    "hidden_size": cfg.hidden_size,
    "intermediate_size": cfg.intermediate_size,
    "num_hidden_layers": cfg.num_layers,
    "num_attention_heads": cfg.num_heads,
    "hidden_activation": "gelu",
    "max_position_embeddings": cfg.max_position_embeddings,
    "initializer_range": cfg.initializer_range,
    "initializer_cutoff_factor": 2.0,
    "norm_eps": cfg.norm_eps,
    "norm_bias": False,
    "attention_bias": False,
    "mlp_bias": False,
    "decoder_bias": True,
    "tie_word_embeddings": True,
    "local_attention": cfg.local_window,
    "global_attn_every_n_layers": cfg.global_every_n,
    "layer_types": ["full_attention" if cfg.is_global(i) else "sliding_attention" for i in range(cfg.num_layers)],
    "rope_parameters": {
      "full_attention": {"rope_type": "default", "rope_theta": cfg.global_rope_theta},
      "sliding_attention": {"rope_type": "default", "rope_theta": cfg.local_rope_theta},
    },
    "global_rope_theta": cfg.global_rope_theta,
    "local_rope_theta": cfg.local_rope_theta,
    "pad_token_id": cfg.pad_id,
    "eos_token_id": cfg.eos_id,
    "bos_token_id": cfg.bos_id,
    "cls_token_id": cfg.eos_id,
    "sep_token_id": cfg.eos_id,
    "mask_token_id": cfg.mask_id,
    "classifier_pooling": "mean",
    "position_embedding_type": "sans_pos",
    "attention_dropout": 0.0,
    "embedding_dropout": 0.0,
    "mlp_dropout": 0.0,
  }


# ---------------------------------------------------------------------------------------------------------------
# Weights: (our parameter path, HF key, HF → ours, ours → HF)
# ---------------------------------------------------------------------------------------------------------------

Mapping = tuple[tuple[Any, ...], str, Callable[[jax.Array], jax.Array], Callable[[jax.Array], jax.Array]]


def weight_map(cfg: ModelConfig) -> list[Mapping]:
  h, n, d, i_ = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size
  same = lambda w: w
  transpose = lambda w: w.T
  rows: list[Mapping] = [
    (("embedding",), "model.embeddings.tok_embeddings.weight", same, same),
    (("emb_norm", "scale"), "model.embeddings.norm.weight", same, same),
    (("final_norm", "scale"), "model.final_norm.weight", same, same),
    (("head_dense",), "head.dense.weight", transpose, transpose),
    (("head_norm", "scale"), "head.norm.weight", same, same),
    (("decoder_bias",), "decoder.bias", same, same),
  ]
  for layer in range(cfg.num_layers):
    p = f"model.layers.{layer}"
    if layer > 0:
      rows.append((("layers", layer, "attn_norm", "scale"), f"{p}.attn_norm.weight", same, same))
    rows += [
      (
        ("layers", layer, "attn", "wqkv"),
        f"{p}.attn.Wqkv.weight",
        lambda w: w.T.reshape(h, 3, n, d),
        lambda w: w.reshape(h, 3 * h).T,
      ),
      (
        ("layers", layer, "attn", "wo"),
        f"{p}.attn.Wo.weight",
        lambda w: w.T.reshape(n, d, h),
        lambda w: w.reshape(h, h).T,
      ),
      (("layers", layer, "mlp_norm", "scale"), f"{p}.mlp_norm.weight", same, same),
      (
        ("layers", layer, "mlp", "wi"),
        f"{p}.mlp.Wi.weight",
        lambda w: w.T.reshape(h, 2, i_),
        lambda w: w.reshape(h, 2 * i_).T,
      ),
      (("layers", layer, "mlp", "wo"), f"{p}.mlp.Wo.weight", transpose, transpose),
    ]
  return rows


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree, path, value):
  for key in path[:-1]:
    tree = tree[key]
  tree[path[-1]] = value


def _read_weights(path: epath.Path) -> dict[str, jax.Array]:
  single = path / WEIGHTS_FILE
  index = path / WEIGHTS_INDEX_FILE
  if single.exists():
    return safetensors_flax.load_file(fs.local_copy(single))
  if index.exists():
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    out: dict[str, jax.Array] = {}
    for name in files:
      out.update(safetensors_flax.load_file(fs.local_copy(path / name)))
    return out
  raise FileNotFoundError(f"{path}: neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE} found")


def read_config(path: str | epath.Path) -> ModelConfig:
  """The ModelConfig of a transformers ModernBERT directory's config.json."""
  config_path = fs.path(path, "model directory") / CONFIG_FILE
  if not config_path.exists():
    raise FileNotFoundError(f"{config_path} not found: expected a transformers ModernBertForMaskedLM directory")
  return config_from_hf(json.loads(config_path.read_text()))


def run_config(path: str | epath.Path, overrides: dict[str, Any]) -> ModelConfig:
  """The model of a run that starts from a transformers directory: every architectural field from its config.json.
  `overrides` (the run's `config.model` values that are set) may change how the model runs (`RUNTIME_FIELDS`:
  dtype, attention kernel, remat, dropout, …); an architectural one must repeat config.json's value."""
  cfg = read_config(path)
  for key, value in overrides.items():
    if key not in RUNTIME_FIELDS and key in ModelConfig.__dataclass_fields__ and getattr(cfg, key) != value:
      raise HFConfigError(
        f"config.model.{key}={value} conflicts with {path}/{CONFIG_FILE} ({key}={getattr(cfg, key)}): a run "
        f"that starts from a transformers directory takes its architecture from it; set "
        f"--config.model.{key}={getattr(cfg, key)} or leave it unset"
      )
  return cfg.replace(**{k: v for k, v in overrides.items() if k in RUNTIME_FIELDS})


def load(path: str | epath.Path, **overrides: Any) -> MaskedLM:
  """A `ModernBertForMaskedLM` directory (local or gs://) → MaskedLM (float32 params). `overrides` change
  ModelConfig fields that do not affect weights (e.g. dtype, attention_impl)."""
  path = fs.path(path, "model directory")
  cfg = read_config(path).replace(**overrides)
  weights = _read_weights(path)
  # Keys of ModernBertModel saved alone lack the "model." prefix; accept both layouts for the encoder.
  if "embeddings.tok_embeddings.weight" in weights:
    weights = {(k if k.startswith(("head.", "decoder.")) else f"model.{k}"): v for k, v in weights.items()}

  graphdef, abstract = nnx.split(abstract_model(cfg))
  params = nnx.to_pure_dict(abstract)
  for ours, key, from_hf, to_hf in weight_map(cfg):
    if key not in weights:
      raise KeyError(f"{path}: weight {key!r} is missing (is this a ModernBertForMaskedLM checkpoint?)")
    want = jax.eval_shape(to_hf, _get(params, ours)).shape
    if tuple(weights[key].shape) != want:
      raise ValueError(f"{path}: weight {key!r} has shape {tuple(weights[key].shape)}, but config.json implies {want}")
    _set(params, ours, from_hf(jnp.asarray(weights[key], jnp.float32)))
  nnx.replace_by_pure_dict(abstract, params)
  return nnx.merge(graphdef, abstract)


def save(model: MaskedLM, path: str | epath.Path) -> None:
  """Write `model` as a transformers ModernBertForMaskedLM directory (local or gs://: written locally, then
  uploaded). Refuses to overwrite existing weights."""
  path = fs.path(path, "model directory")
  for name in (CONFIG_FILE, WEIGHTS_FILE, WEIGHTS_INDEX_FILE):
    if (path / name).exists():
      raise FileExistsError(f"{path / name} exists; choose an empty directory")
  with fs.staged_dir(path) as local:
    write_local(model, local)


def write_local(model: MaskedLM, directory: str) -> None:
  """`save` into an existing local directory (what `save` uploads; `export` adds the tokenizer before that)."""
  cfg = model.config
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  tensors = {
    key: np.ascontiguousarray(np.asarray(to_hf(_get(params, ours)), np.float32))
    for ours, key, _, to_hf in weight_map(cfg)
  }
  safetensors_flax.save_file(
    {k: jnp.asarray(v) for k, v in tensors.items()},
    os.fspath(epath.Path(directory) / WEIGHTS_FILE),
    metadata={"format": "pt"},
  )
  (epath.Path(directory) / CONFIG_FILE).write_text(json.dumps(config_to_hf(cfg), indent=2, sort_keys=True))
