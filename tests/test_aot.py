"""Ahead-of-time TPU compile of the real train step (mmbert_jax.aot): needs libtpu, not a TPU."""

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

if importlib.util.find_spec("libtpu") is None:
  pytest.skip(
    "libtpu is not installed (pip install libtpu, the `tpu` extra): no TPU topology to compile for",
    allow_module_level=True,
  )

from data_pipeline import masking  # noqa: E402
from mmbert_jax import aot  # noqa: E402

pytestmark = pytest.mark.aot
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(name: str, arg: str):
  spec = importlib.util.spec_from_file_location(f"config_{name}", ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _params(v, h, layers, i):
  """Parameter count from the architecture (docs/ARCHITECTURE.md): embedding + decoder bias + head dense + norms +
  per layer Wqkv, Wo, Wi (GLU, 2I), Wo_mlp."""
  return v * h + v + h * h + (2 * layers + 2) * h + layers * (4 * h * h + 3 * h * i)


def _dense_xla_flops(v, h, layers, i, rows, seq, masked):
  """Matmul FLOPs XLA must spend on one micro-batch: 3 × forward, every layer's attention over all S×S pairs
  (the XLA path masks a dense score matrix), the head over every masked slot."""
  tokens = rows * seq
  return (
    6 * tokens * layers * (4 * h * h + 3 * h * i)
    + 12 * h * rows * seq * seq * layers
    + 6 * rows * masked * (h * h + h * v)
  )


def _cli(*args):
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  return subprocess.run(
    [sys.executable, "-m", "mmbert_jax.aot", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
  )


def test_slice_names_follow_cloud_tpu_accelerator_types():
  # v5p/v4 names count TensorCores (2 per chip), v5e/v6e count chips (Cloud TPU docs, v5p table).
  assert (aot.get_slice("v5p-64").chips, aot.get_slice("v5p-64").topology) == (32, "v5p:2x4x4")
  assert (aot.get_slice("v5p-128").chips, aot.get_slice("v5p-128").topology) == (64, "v5p:4x4x4")
  assert (aot.get_slice("v6e-256").chips, aot.get_slice("v6e-256").topology) == (256, "v6e:16x16")
  assert (aot.get_slice("v5e-8").chips, aot.get_slice("v5e-8").topology) == (8, "v5e:2x4")
  # libtpu agrees: one megacore device per chip, of the right kind.
  for name, kind in (("v5p-64", "TPU v5"), ("v4-8", "TPU v4"), ("v6e-16", "TPU v6 lite")):
    devices = aot.topology_devices(aot.get_slice(name))
    assert len(devices) == aot.get_slice(name).chips
    assert {d.device_kind for d in devices} == {kind}


@pytest.mark.slow
def test_tiny_model_compiles_for_v5e_and_reports_memory_and_flops():
  c = _config("pretrain", "base")
  c.model_preset = "tiny"
  c.model.attention_impl = "xla"  # the FLOP check below counts the XLA path's dense attention
  c.model.loss_impl = "dense"  # ... and the head's logits once (cost analysis counts a scan body once)
  c.data.seq_len = 128
  c.batch_size, c.micro_batch_size = 32, 16
  r = aot.compile_train_step(c, "v5e-4")
  assert r.compiler_error is None and r.fits
  assert r.device_kind == "TPU v5 lite" and r.mesh_shape == {"data": 1, "fsdp": 4, "tensor": 1}
  assert (r.microbatches, r.rows, r.dtype, r.attention) == (2, 16, "bfloat16", "xla")

  v, h, layers, i = 1024, 64, 4, 96  # the tiny preset
  masked = masking.default_max_masked(128, 0.3)  # the pipeline's masked slots per row
  assert r.masked == masked
  state = 3 * 4 * _params(v, h, layers, i)  # float32 parameters, first and second moments
  batch = 2 * 16 * (4 * 128 + 3 * masked) * 4  # 4 int32 [S] and 3 [K] arrays per row
  assert r.argument_bytes >= (state + batch) / 4
  assert r.alias_bytes >= state / 4  # parameters and optimizer state are updated in place
  assert 0 < r.total_bytes < r.tpu.usable_bytes
  # Per micro-batch: the scan body counts once.
  ratio = r.compiled_flops * 4 / _dense_xla_flops(v, h, layers, i, rows=16, seq=128, masked=masked)
  assert 1.0 <= ratio <= 1.3, ratio
  assert "fits" in r.text() and "temporaries" in r.text()
  assert "MLM loss dense · layers unrolled" in r.text()


@pytest.mark.slow
@pytest.mark.parametrize("scan_layers", [False, True])
def test_tpu_step_scatters_only_the_embedding_gradient_in_float32(scan_layers):
  """The step as lowered for a TPU, where a scatter-add becomes a sort: the masked slots' hidden states are taken
  by a one-hot product (`model.take_positions`) and their per-language metrics are reduced comparisons
  (`train.per_language_sums`), so the scatter-adds left are the embedding gradient, into the float32 table, and
  the per-language token count."""
  c = _config("pretrain", "base")
  c.model_preset = "tiny"
  c.model.scan_layers = scan_layers
  c.data.seq_len = 128
  c.batch_size, c.micro_batch_size = 32, 16
  program, info = aot.lower_train_step(c, "v5e-4")
  text = program.lower().as_text()
  scatters = re.findall(r'"stablehlo.scatter".*?\}\) : \([^\n]*\) -> tensor<([^>]*)>', text, re.S)
  assert info["dtype"] == "bfloat16"
  # the tiny preset's [vocab, hidden] table; [languages]
  assert sorted(scatters) == sorted(["1024x64xf32", f"{aot.num_languages(c)}xf32"]), scatters


@pytest.mark.slow
@pytest.mark.heavy
def test_mmbert_base_pretrain_compiles_for_v5p_with_sharded_state():
  # The pretrain config with a 4-row batch (one row per chip of a v5p-8) keeps the compile short on a CPU.
  c = _config("pretrain", "base")
  c.batch_size, c.micro_batch_size = 4, 4
  c.model.attention_impl = "xla"  # the FLOP check below counts the XLA path's dense attention
  c.model.loss_impl = "dense"
  r = aot.compile_train_step(c, "v5p-8")
  assert r.compiler_error is None and r.fits
  assert r.model == "mmbert-base" and r.tpu.chips == 4 and r.rows == 4 and r.seq_len == 1024

  v, h, layers, i = 256_000, 768, 22, 1152
  state = 3 * 4 * _params(v, h, layers, i)
  assert r.alias_bytes >= state / 4
  assert r.argument_bytes < state / 2  # FSDP: replicated moments alone would take 2/3 of `state`
  masked = masking.default_max_masked(1024, 0.3)
  assert r.masked == masked
  ratio = r.compiled_flops * 4 / _dense_xla_flops(v, h, layers, i, rows=4, seq=1024, masked=masked)
  assert 1.0 <= ratio <= 1.3, ratio


def test_unknown_topology_lists_the_known_ones():
  r = _cli("--config=configs/pretrain.py:base", "--topology=v9-8")
  assert r.returncode == 2
  assert "unknown topology 'v9-8'" in r.stderr
  assert all(name in r.stderr for name in ("v5e-8", "v5p-64", "v6e-256", "v4-8"))


@pytest.mark.slow
def test_step_that_cannot_fit_exits_nonzero():
  r = _cli(
    "--config=configs/pretrain.py:base",
    "--topology=v5e-1",
    "--config.model_preset=tiny",
    "--config.model.attention_impl=xla",
    "--config.batch_size=4096",
    "--config.micro_batch_size=0",
  )
  assert r.returncode == 1, r.stderr[-2000:]
  assert "DOES NOT FIT" in r.stdout and "RESOURCE_EXHAUSTED" in r.stdout
  assert "does not fit in the 15.75 GiB of a v5e-1 chip" in r.stderr


@pytest.mark.slow
def test_splash_train_step_compiles_and_needs_less_memory_than_xla():
  """attention_impl="auto" compiles the real step with splash on a v5e-4 slice: one forward and two backward
  kernels per layer in the compiled HLO, and less per-chip memory than the XLA path's dense S×S scores."""
  reports = {}
  for impl in ("auto", "xla"):
    c = _config("pretrain", "base")
    c.model_preset = "tiny"  # 4 layers, 4 heads
    c.model.attention_impl = impl
    c.data.seq_len = 1024
    c.batch_size, c.micro_batch_size = 8, 8  # 2 rows per chip
    reports[impl] = aot.compile_train_step(c, "v5e-4")
  splash, xla = reports["auto"], reports["xla"]
  assert (splash.attention, xla.attention) == ("splash", "xla")
  assert splash.fits and xla.fits
  assert (splash.kernel_calls, xla.kernel_calls) == (4 * 3, 0)
  assert splash.total_bytes < xla.total_bytes, (splash.text(), xla.text())
  assert "Pallas kernel call sites in the compiled step: 12" in splash.text()


@pytest.mark.slow
@pytest.mark.heavy
def test_compare_prints_every_switch_and_the_chunked_head_needs_less():
  """`--compare` compiles the step once per MLM loss × layer stack; on a step whose head dominates (1k-row
  vocabulary chunks of a 32k vocabulary, 512 masked slots per chip) the chunked loss needs fewer temporaries."""
  r = _cli(
    "--config=configs/pretrain.py:base",
    "--topology=v5e-1",
    "--config.model_preset=tiny",
    "--config.model.vocab_size=32768",
    "--config.model.loss_chunk_size=1024",
    "--config.data.seq_len=256",
    "--config.batch_size=8",
    "--config.micro_batch_size=8",
    "--compare",
  )
  assert r.returncode == 0, r.stderr[-2000:]
  table = r.stdout.split("by model switch")[1].splitlines()[2:]
  rows = {
    (line.split()[0], line.split()[1]): float(line.split()[2]) * (1024 if line.split()[3] == "GiB" else 1)
    for line in table
    if line.strip()
  }
  assert set(rows) == {
    ("dense", "unrolled"),
    ("chunked/1024", "unrolled"),
    ("dense", "scanned"),
    ("chunked/1024", "scanned"),
  }, r.stdout
  assert rows[("chunked/1024", "unrolled")] < rows[("dense", "unrolled")], r.stdout
  # The configured variant ("auto": dense for these logits) prints its full report, compiled once.
  assert r.stdout.count("compiled in") == 1 and "MLM loss dense · layers unrolled" in r.stdout, r.stdout
  assert " s CPU" in r.stdout
