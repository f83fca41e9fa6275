"""Will a run fit? Compile its real train step for a TPU slice ahead of time, on any machine.

  python -m mmbert_jax.aot --config=configs/pretrain.py:base --topology=v5p-64 [--config.micro_batch_size=192]

With libtpu installed (`pip install -e ".[tpu]"`; no TPU needed) this builds the config's (data, fsdp, tensor)
mesh on the slice's compile-only devices, builds the run's training program with `train.build_program` (the
builder the training loop uses: the same parameters, optimizer state with every moment sharded like its
parameter, and batch with the pipeline's masked slots per row), compiles its step, and prints per-chip memory
against the chip's HBM and the compiled FLOPs next to the analytic ones of `mmbert_jax.flops`. It exits with
status 1 when the step does not fit. Nothing is allocated: parameters, optimizer state and batches are shapes
with shardings.

Memory is per micro-batch: the step scans over `batch_size / micro_batch_size` micro-batches of
`micro_batch_size` rows, so lower `--config.micro_batch_size` until it fits. XLA's cost analysis counts the scan
body once, so FLOPs are compared per micro-batch; the analytic count charges windowed attention and the predicted
tokens only, while the compiled one includes the XLA path's dense S×S attention, every masked slot and the
elementwise work, so it is expected to be higher. Slice names follow Cloud TPU accelerator types: v5e and v6e
count chips (v6e-64 = 64 chips), v4 and v5p count TensorCores (v5p-64 = 32 chips, one megacore device each).
The same holds inside the step: with the chunked MLM loss (`model.loss_impl`) or scanned layers
(`model.scan_layers`) the compiled FLOPs count one vocabulary chunk and one layer group, so no ratio is printed.
Compare the switches by compiling once each, e.g. with `--config.model.loss_impl=dense` and
`--config.model.scan_layers=True`: the report names both and prints per-chip temporaries and compile seconds.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import sys
import time

import jax
import ml_collections
from absl import flags
from jax.experimental import topologies
from ml_collections import config_flags

from mmbert_jax import attention as attention_lib
from mmbert_jax import cli, mlm_loss, sharding, train
from mmbert_jax import flops as flops_lib

GiB = 2**30
MiB = 2**20

# Per-language metric sums are sized by the number of languages; the real count lives in the data pipeline. Any
# bound ≥ mmBERT's widest phase (1833 languages) compiles the same step up to a few KiB.
LANGUAGE_SLOTS = 2048


# --------------------------------------------------------------------------------------------------------------
# Slices
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Slice:
  """A Cloud TPU slice as libtpu's topology description needs it."""

  name: str  # accelerator type, e.g. "v5p-64"
  topology: str  # libtpu topology name, e.g. "v5p:2x4x4"
  chips: int
  hbm_bytes: int  # per chip, nominal
  usable_bytes: int  # per chip, what the TPU compiler lets a program use
  chip_config: str  # "megacore": the two TensorCores of a v4/v5p chip form one device
  wrap: tuple[bool, bool, bool]


# generation: (HBM GiB per chip: nominal, usable as libtpu's compiler reports it; TensorCores per chip counted
# in the name; chip grids of the slice shapes)
_GENERATIONS = {
  "v5e": (16, 15.75, 1, ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")),
  "v6e": (32, 31.24, 1, ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")),
  "v4": (32, 30.75, 2, ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8", "8x8x16", "8x16x16")),
  "v5p": (
    95,
    95.73,
    2,
    (
      "2x2x1",
      "2x2x2",
      "2x2x4",
      "2x4x4",
      "4x4x4",
      "4x4x8",
      "4x8x8",
      "8x8x8",
      "8x8x16",
      "8x16x16",
      "16x16x16",
      "16x16x24",
    ),
  ),
}


def _slices() -> dict[str, Slice]:
  out = {}
  for gen, (hbm, usable, cores, grids) in _GENERATIONS.items():
    for grid in grids:
      dims = [int(d) for d in grid.split("x")]
      chips = math.prod(dims)
      if len(dims) == 2:  # v5e/v6e: wraparound links only along full 16-chip sides
        wrap, chip_config = (dims[0] == 16, dims[1] == 16, False), "default"
      else:  # v4/v5p: a torus once the slice spans whole 4×4×4 cubes
        wrap, chip_config = (min(dims) >= 4,) * 3, "megacore"
      name = f"{gen}-{chips * cores}"
      out[name] = Slice(name, f"{gen}:{grid}", chips, hbm * GiB, int(usable * GiB), chip_config, wrap)
  return out


SLICES: dict[str, Slice] = _slices()


def get_slice(name: str) -> Slice:
  if name not in SLICES:
    known = sorted(SLICES, key=lambda n: (n.split("-")[0], int(n.split("-")[1])))
    raise ValueError(f"unknown topology {name!r}; known: {', '.join(known)}")
  return SLICES[name]


def topology_devices(s: Slice) -> list[jax.Device]:
  """Compile-only devices of the slice (libtpu's topology description; no TPU needs to be attached)."""
  if importlib.util.find_spec("libtpu") is None:
    raise ImportError("ahead-of-time TPU compilation needs libtpu: pip install libtpu (the `tpu` extra)")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: no chip is opened, nothing to guard
  # A slice smaller than one host (4 chips) is its own host: some libtpu versions reject it otherwise.
  dims = tuple(int(d) for d in s.topology.split(":")[1].split("x"))
  bounds = {"chips_per_host_bounds": (dims + (1, 1))[:3]} if math.prod(dims) < 4 else {}
  return list(
    topologies.get_topology_desc(
      topology_name=s.topology, platform="tpu", chip_config_name=s.chip_config, wrap=s.wrap, **bounds
    ).devices
  )


# --------------------------------------------------------------------------------------------------------------
# The step's inputs
# --------------------------------------------------------------------------------------------------------------


def num_languages(config: ml_collections.ConfigDict) -> int:
  """A comma-separated language list counts itself; a named set is bounded by LANGUAGE_SLOTS."""
  langs = str(config.data.languages)
  return len(langs.split(",")) if "," in langs else LANGUAGE_SLOTS


def tpu_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config as a TPU run resolves it: "auto" compute dtype is bfloat16 (this host may be a CPU)."""
  config = config.copy_and_resolve_references()
  if config.model.get("dtype") == "auto":
    config.model.dtype = "bfloat16"
  return config


def attention_impl(cfg, mesh) -> str:
  """The attention implementation the model will run on the mesh's devices."""
  with jax.set_mesh(mesh):  # "auto" → splash for a TPU mesh
    return attention_lib.resolve_impl(cfg)


# --------------------------------------------------------------------------------------------------------------
# Compile and report
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Report:
  """Per-chip memory and FLOPs of one compiled train step (memory and compiled FLOPs are None when the TPU
  compiler rejected the step for want of HBM; `compiler_error` then says how much it wanted)."""

  tpu: Slice
  device_kind: str
  mesh_shape: dict[str, int]
  model: str
  phase: str
  microbatches: int
  rows: int  # per micro-batch
  seq_len: int
  masked: int  # masked slots per row
  dtype: str
  attention: str
  remat: str
  loss: str  # MLM loss: "dense" or "chunked/<vocabulary rows per chunk>", after "auto→" when chosen by size
  scan_layers: bool
  analytic_flops: float  # whole slice, one micro-batch of full-length documents
  compile_seconds: float  # wall clock
  compile_cpu_seconds: float  # this process's CPU time, all threads (wall time on a shared host is noise)
  argument_bytes: int | None = None
  output_bytes: int | None = None
  alias_bytes: int | None = None  # outputs written in place of donated arguments (parameters, optimizer state)
  temp_bytes: int | None = None
  code_bytes: int | None = None
  compiled_flops: float | None = None  # per chip, one micro-batch
  kernel_calls: int | None = None  # Pallas kernel (tpu_custom_call) call sites in the compiled step
  compiler_error: str | None = None

  @property
  def total_bytes(self) -> int | None:
    if self.compiler_error:
      return None
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

  @property
  def fits(self) -> bool:
    return self.compiler_error is None and self.total_bytes <= self.tpu.usable_bytes

  def text(self) -> str:
    s = self.tpu
    size = _size
    mesh = " ".join(f"{k}={v}" for k, v in self.mesh_shape.items())
    lines = [
      f"{self.model} · {self.phase} on {s.name} ({s.topology}, {s.chips} chips of {self.device_kind}, "
      f"{s.hbm_bytes / GiB:.0f} GiB HBM each, {s.usable_bytes / GiB:.2f} GiB usable)",
      f"mesh {mesh} · {self.microbatches} micro-batch(es) × {self.rows} rows × {self.seq_len} tokens, "
      f"{self.masked} masked slots/row · {self.dtype} · attention {self.attention} · remat {self.remat}",
      f"MLM loss {self.loss} · layers {'scanned' if self.scan_layers else 'unrolled'}",
    ]
    if self.kernel_calls:
      lines += [f"Pallas kernel call sites in the compiled step: {self.kernel_calls}"]
    if self.compiler_error:
      lines += [f"per-chip memory: DOES NOT FIT; the TPU compiler says: {self.compiler_error}"]
    else:
      lines += [
        "per-chip memory:",
        f"  arguments      {size(self.argument_bytes)}",
        f"  outputs        {size(self.output_bytes)}  ({size(self.alias_bytes).strip()} of them in place of "
        "donated arguments)",
        f"  temporaries    {size(self.temp_bytes)}",
        f"  generated code {size(self.code_bytes)}",
        f"  total          {size(self.total_bytes)}  = {100 * self.total_bytes / s.usable_bytes:.0f}% of "
        f"{s.usable_bytes / GiB:.2f} GiB: {'fits' if self.fits else 'DOES NOT FIT'}",
      ]
    lines += ["FLOPs per micro-batch (the scan body counts once):"]
    inner_scans = self.scan_layers or "chunked" in self.loss
    if self.compiled_flops is not None:
      compiled_total = self.compiled_flops * s.chips
      lines += [
        f"  compiled (cost_analysis) {compiled_total:.4g}  ({self.compiled_flops:.4g} per chip)"
        + ("  (undercounted: XLA counts each inner scan body once)" if inner_scans else "")
      ]
    ratio = (
      ""
      if self.compiled_flops is None or inner_scans
      else f"  compiled/analytic {self.compiled_flops * s.chips / self.analytic_flops:.2f}"
    )
    lines += [
      f"  analytic (flops.py)      {self.analytic_flops:.4g}{ratio}",
      f"compiled in {self.compile_seconds:.1f} s wall, {self.compile_cpu_seconds:.1f} s CPU",
    ]
    return "\n".join(lines)


def _size(b: int) -> str:
  return f"{b / GiB:8.2f} GiB" if b >= GiB else f"{b / MiB:8.1f} MiB"


def _hbm_oom(error: Exception) -> str | None:
  """The TPU compiler's out-of-memory message (its first line), or None for any other error."""
  text = str(error)
  oom = "RESOURCE_EXHAUSTED" in text and ("HBM" in text or "memory" in text)
  return text.splitlines()[0] if oom else None


def lower_train_step(config: ml_collections.ConfigDict, topology: str) -> tuple[train.TrainProgram, dict]:
  """The training program of `config` on the slice `topology` (e.g. "v5p-64"), built by `train.build_program`
  exactly as the training loop builds it, and the report fields that describe it."""
  s = get_slice(topology)
  config = tpu_config(config)
  devices = topology_devices(s)
  mesh = sharding.make_mesh(dict(config.mesh), devices)
  cfg = train.model_config(config)
  cfg = cfg.replace(attention_impl=attention_impl(cfg, mesh))
  program = train.build_program(config, mesh, num_languages=num_languages(config), cfg=cfg)
  info = dict(
    tpu=s,
    device_kind=devices[0].device_kind,
    mesh_shape=dict(mesh.shape),
    model=config.model_preset,
    phase=config.phase,
    microbatches=program.microbatches,
    rows=program.rows,
    seq_len=program.seq_len,
    masked=program.masked,
    dtype=cfg.dtype,
    attention=cfg.attention_impl,
    remat=cfg.remat,
    scan_layers=cfg.scan_layers,
    loss=mlm_loss.describe(
      cfg.loss_impl, cfg.loss_chunk_size, program.rows // sharding.batch_divisor(mesh) * program.masked, cfg.vocab_size
    ),
    analytic_flops=flops_lib.flops_per_token(cfg, program.seq_len, config.data.mask_rate).total
    * program.rows
    * program.seq_len,
  )
  return program, info


def compile_train_step(config: ml_collections.ConfigDict, topology: str) -> Report:
  """Compile the training program's step for the slice `topology` (e.g. "v5p-64") and measure it."""
  start, start_cpu = time.perf_counter(), time.process_time()
  program, info = lower_train_step(config, topology)
  lowered = program.lower()
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if (oom := _hbm_oom(e)) is None:
      raise
    seconds = dict(compile_seconds=time.perf_counter() - start, compile_cpu_seconds=time.process_time() - start_cpu)
    return Report(**info, **seconds, compiler_error=oom)
  seconds = dict(compile_seconds=time.perf_counter() - start, compile_cpu_seconds=time.process_time() - start_cpu)

  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return Report(
    **info,
    **seconds,
    argument_bytes=mem.argument_size_in_bytes,
    output_bytes=mem.output_size_in_bytes,
    alias_bytes=mem.alias_size_in_bytes,
    temp_bytes=mem.temp_size_in_bytes,
    code_bytes=mem.generated_code_size_in_bytes,
    compiled_flops=float(cost["flops"]),
    kernel_calls=compiled.as_text().count('custom_call_target="tpu_custom_call"'),
  )


# The memory/compile-time switches of ModelConfig compared by `--compare`: MLM loss × layer stack.
SWITCHES = (("dense", False), ("chunked", False), ("dense", True), ("chunked", True))


def compare_switches(config: ml_collections.ConfigDict, topology: str) -> list[Report]:
  """The train step compiled once per (loss_impl, scan_layers) of `SWITCHES`, everything else as configured."""
  reports = []
  for loss_impl, scan in SWITCHES:
    c = config.copy_and_resolve_references()
    with c.unlocked():
      c.model.loss_impl, c.model.scan_layers = loss_impl, scan
    reports.append(compile_train_step(c, topology))
  return reports


def configured_report(reports: list[Report], config: ml_collections.ConfigDict) -> Report:
  """The report of `compare_switches` that compiled the configured loss ("auto" resolved) and layer stack."""
  cfg = train.model_config(tpu_config(config))
  r = reports[0]
  slots = r.rows // (r.mesh_shape["data"] * r.mesh_shape["fsdp"]) * r.masked
  impl = mlm_loss.resolve_impl(cfg.loss_impl, slots, cfg.vocab_size)
  return next(r for r in reports if r.loss.split("/")[0] == impl and r.scan_layers == cfg.scan_layers)


def comparison_table(reports: list[Report]) -> str:
  """One line per compiled variant: per-chip temporaries, total against usable HBM, compile seconds (wall and
  this process's CPU)."""
  lines = [f"{'MLM loss':<14}{'layers':<10}{'temporaries':>13}{'total':>13}{'compile wall':>14}{'CPU':>8}"]
  for r in reports:
    layers = "scanned" if r.scan_layers else "unrolled"
    if r.compiler_error:
      memory = f"{'—':>13}{'DOES NOT FIT':>13}"
    else:
      memory = f"{_size(r.temp_bytes):>13}{_size(r.total_bytes):>13}"
    lines.append(f"{r.loss:<14}{layers:<10}{memory}{r.compile_seconds:>12.0f} s{r.compile_cpu_seconds:>6.0f} s")
  return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


def define_flags():
  """Flags of the command line (defined on demand, so that importing this module defines none)."""
  config_flags.DEFINE_config_file("config", None, "Run config file (ml_collections).", lock_config=True)
  flags.DEFINE_string("topology", None, "TPU slice, e.g. v5e-8, v5p-64, v6e-256.")
  flags.DEFINE_bool(
    "compare",
    False,
    "Also compile the step for every MLM loss (dense, chunked) × layer stack "
    "(unrolled, scanned) and print their per-chip temporaries and compile seconds.",
  )
  flags.mark_flags_as_required(["config", "topology"])


def main(argv):
  cli.start(argv)
  config, topology = flags.FLAGS.config, flags.FLAGS.topology
  try:
    if flags.FLAGS.compare:
      reports = compare_switches(config, topology)
      report = configured_report(reports, config)
    else:
      report = compile_train_step(config, topology)
  except (ValueError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(report.text())
  if flags.FLAGS.compare:
    print("\nper chip, by model switch (--config.model.loss_impl, --config.model.scan_layers):")
    print(comparison_table(reports))
  if not report.fits:
    print(
      f"error: the train step does not fit in the {report.tpu.usable_bytes / GiB:.2f} GiB of a "
      f"{report.tpu.name} chip; lower --config.micro_batch_size, set --config.model.remat=full, or use a "
      "larger slice",
      file=sys.stderr,
    )
    sys.exit(1)


if __name__ == "__main__":
  if "JAX_PLATFORMS" not in os.environ:  # trace on the host CPU; never claim an attached accelerator
    jax.config.update("jax_platforms", "cpu")
  # The report's compile seconds and memory analysis come from a compile, never from a persistent-cache hit.
  jax.config.update("jax_enable_compilation_cache", False)
  cli.run(main, define_flags)
