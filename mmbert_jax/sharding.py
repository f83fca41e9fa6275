"""Device mesh and the one table that maps logical axis names to mesh axes.

Mesh axes: `data` (pure data parallel: replicas), `fsdp` (data parallel with parameters and optimizer state
sharded), `tensor` (heads, MLP and vocabulary split across devices). Batches are split over (data, fsdp).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # batch rows are split over these (also inside the kernels' shard_map)

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


def target_platform() -> str:
  """Platform the computation is built for: the current mesh's devices (AOT topologies included), else the
  default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.abstract_device is not None:
    return mesh.abstract_device.platform
  return jax.default_backend()


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


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
  """`x` pinned to the mesh axes of its logical axis names (`LOGICAL_AXIS_RULES`) when traced under a mesh
  (`jax.set_mesh`); unchanged outside one, or where a dimension does not divide over its axes.

  Activations need this: left to sharding propagation from the fsdp-sharded weights, XLA may keep every row of
  the global batch on every device and split the hidden dimension instead, so per-device activation memory (and
  attention work) grows with the slice's size rather than with the rows each device trains on."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  rules = dict(LOGICAL_AXIS_RULES)
  axes = [rules.get(name) if name else None for name in logical]
  sizes = [math.prod(mesh.shape[a] for a in ((m,) if isinstance(m, str) else m)) if m else 1 for m in axes]
  if any(dim % size for dim, size in zip(x.shape, sizes)):
    return x
  return jax.lax.with_sharding_constraint(x, P(*axes))


def batch_sharding(mesh: Mesh, ndim: int, leading: int = 0) -> NamedSharding:
  """Sharding of a batch array: `leading` unsharded axes (e.g. micro-batches), then rows over (data, fsdp)."""
  return NamedSharding(mesh, P(*([None] * leading), BATCH_AXES, *([None] * (ndim - leading - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh) -> int:
  """Global batch rows must be a multiple of this."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def check_process_feeds(mesh: Mesh) -> None:
  """Each process feeds the batch rows of its own devices, split along (data, fsdp); every other mesh axis must
  therefore stay inside one process (its devices all read the same rows). Raises a one-line ValueError otherwise:
  e.g. `tensor=2` with one process per GPU would train on wrong data without any error."""
  owner = np.vectorize(lambda d: d.process_index, otypes=[int])(mesh.devices)
  for i, axis in enumerate(mesh.axis_names):
    if axis in BATCH_AXES or mesh.shape[axis] == 1:
      continue
    if (owner != np.take(owner, [0], axis=i)).any():
      local = len(mesh.local_devices)
      raise ValueError(
        f"mesh: the {axis!r} axis ({mesh.shape[axis]} devices) spans processes, which feed "
        f"different rows; each process has {local} device(s). Use --config.mesh.{axis} of at most "
        f"{local} (a divisor of it), or one process per host"
      )
