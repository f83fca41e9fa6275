"""Device mesh and the one table that maps logical axis names to mesh axes.

Mesh axes: `data` (pure data parallel: replicas), `fsdp` (data parallel with parameters and optimizer state
sharded), `tensor` (heads, MLP and vocabulary split across devices). Batches are split over (data, fsdp).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")    # batch rows are split over these (also inside the kernels' shard_map)

# Logical parameter axes (named in mmbert_jax.model) → mesh axes. The only place sharding is decided.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
)


def mesh_shape(sizes: dict[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolve one -1 ("the rest") in {data, fsdp, tensor} sizes; the product must equal the device count."""
  unknown = [a for a in MESH_AXES if int(sizes.get(a, 1)) == -1]
  if len(unknown) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {unknown}")
  known = math.prod(int(sizes.get(a, 1)) for a in MESH_AXES if a not in unknown)
  if unknown:
    if num_devices % known:
      raise ValueError(f"mesh: {num_devices} devices are not divisible by the fixed axes' product {known}")
    sizes = {**sizes, unknown[0]: num_devices // known}
  shape = tuple(int(sizes.get(a, 1)) for a in MESH_AXES)
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh: data×fsdp×tensor = {'×'.join(map(str, shape))} ≠ {num_devices} devices")
  return shape


def make_mesh(sizes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """An Auto (GSPMD-propagated) mesh over `devices` (default: all), tensor axis innermost (fastest links)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(sizes, len(devices))
  if devices[0].platform == "cpu" or len(devices) != len(jax.devices()):
    grid = np.array(devices).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def batch_sharding(mesh: Mesh, ndim: int, leading: int = 0) -> NamedSharding:
  """Sharding of a batch array: `leading` unsharded axes (e.g. micro-batches), then rows over (data, fsdp)."""
  return NamedSharding(mesh, P(*([None] * leading), BATCH_AXES, *([None] * (ndim - leading - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh) -> int:
  """Global batch rows must be a multiple of this."""
  return mesh.shape["data"] * mesh.shape["fsdp"]
