"""The host's C allocator when XLA runs on the CPU.

XLA:CPU takes each execution's temporaries and outputs from `posix_memalign`. glibc serves a block above its mmap
threshold (32 MiB at most) with a fresh `mmap` and hands it back with `munmap` when it is freed, so a CPU train step
faults in every page of its temporaries again at every step: at `benchmarks.versus_torch`'s shape about 300,000
minor page faults (~1.2 GB) and a second of system CPU time per step. `keep_freed_memory` has glibc keep freed
memory for the next step instead: no `mmap` for large blocks, no trimming of the heap's top, and one arena (a worker
thread's own arena cannot grow past 64 MiB, so it would map every large block again). The heap grows over the first
steps and stays: freed blocks are reused only where they fit, so it settles at about twice the step's working set
(peak resident memory 4.0 GB against 2.0 GB at that shape) — memory traded for a step without system time.

The arena limit only holds for threads that have not allocated yet, so it is set before JAX starts its backends,
and only where JAX will run on the CPU: an accelerator host keeps glibc's defaults (its data pipeline and checkpoint
writers return memory to the system).
"""

from __future__ import annotations

import ctypes
import os
import sys

import jax
from jax._src import hardware_utils  # jax's own probe of the PCI bus for TPU chips and GPUs

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))  # a trim threshold of -1: never trim


def accelerators_on_host() -> bool | None:
  """Whether the PCI bus shows a TPU chip or an NVIDIA or AMD GPU (jax's own probe; no backend starts); None when
  the bus cannot be read."""
  try:
    return (
      hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
      or hardware_utils.has_visible_nvidia_gpu()
      or hardware_utils.num_available_amd_gpus(1) > 0
    )
  except OSError:
    return None


def jax_will_run_on_cpu() -> bool:
  """Whether JAX's default backend will be the CPU, decided before any backend starts: `jax_platforms`
  (JAX_PLATFORMS) when set, else the absence of accelerators on the host (an unreadable bus counts as none known:
  False)."""
  platforms = jax.config.jax_platforms
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return accelerators_on_host() is False


def keep_freed_memory() -> bool:
  """Apply `SETTINGS` with glibc's `mallopt`; returns whether all of them took (False off Linux and glibc)."""
  if not sys.platform.startswith("linux"):
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
  return all(mallopt(param, value) == 1 for param, value in SETTINGS)


def configure() -> bool:
  """At the start of a command, before JAX starts a backend: `keep_freed_memory` where JAX will run on the CPU.
  MMBERT_KEEP_FREED_MEMORY=0 leaves glibc's defaults, =1 applies the settings on any host."""
  choice = os.environ.get("MMBERT_KEEP_FREED_MEMORY", "")
  if choice not in ("", "0", "1"):
    raise ValueError(f"MMBERT_KEEP_FREED_MEMORY={choice!r}: expected 0 or 1 (or unset: on CPU runs only)")
  if choice == "0" or (choice == "" and not jax_will_run_on_cpu()):
    return False
  return keep_freed_memory()
