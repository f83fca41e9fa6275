"""Train-step throughput: tokens/s, model FLOP/s and MFU, next to the FLOP/s of a large matmul measured in the
same run (what this backend can actually do).

  python -m mmbert_jax.benchmarks.train_step                             # bench shape (mmbert-small width, 4 layers)
  python -m mmbert_jax.benchmarks.train_step --preset=mmbert-base --layers=22 --vocab=256000 --seq_len=1024 \
      --batch=32 --mask_rate=0.3 --dtype=bfloat16                        # the mmbert-base pre-training shape
  python -m mmbert_jax.benchmarks.train_step --profile_top=25            # and the step's 25 slowest XLA ops

The step is the real one (`train.build_program`: sparse MLM head, StableAdamW, gradient accumulation scan) on
synthetic packed rows (documents of 64–512 tokens), sharded over all local devices (fsdp).
"""

from __future__ import annotations

import collections
import glob
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from configs import base as base_config
from mmbert_jax import cli, mlm_loss, sharding, train
from mmbert_jax import flops as flops_lib
from mmbert_jax.model import get_config

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("preset", "mmbert-small", "Model preset whose width is used.")
  flags.DEFINE_integer("layers", 4, "Number of layers.")
  flags.DEFINE_integer("vocab", 32_768, "Vocabulary size.")
  flags.DEFINE_integer("seq_len", 512, "Row length.")
  flags.DEFINE_integer("batch", 8, "Rows per step.")
  flags.DEFINE_float("mask_rate", 0.3, "Fraction of tokens predicted (sparse head).")
  flags.DEFINE_string("dtype", "auto", "Compute dtype (auto: bfloat16 on accelerators, float32 on CPU).")
  flags.DEFINE_string("attention_impl", "auto", "Attention implementation.")
  flags.DEFINE_string("remat", "none", "Rematerialisation policy.")
  flags.DEFINE_string("loss_impl", "auto", "MLM cross-entropy: auto, dense or chunked.")
  flags.DEFINE_integer("loss_chunk_size", 8192, "Vocabulary rows per chunk of the chunked loss.")
  flags.DEFINE_bool("scan_layers", False, "Run the layers as one scan over global/local groups.")
  flags.DEFINE_integer("steps", 5, "Timed steps after the compiling one.")
  flags.DEFINE_integer("matmul", 4096, "Size n of the n×n×n reference matmul.")
  flags.DEFINE_integer("profile_top", 0, "Also trace --steps steps (jax.profiler) and print the N slowest XLA ops.")


def synthetic_batch(rng, rows, seq, k, vocab, slots):
  """Packed rows of random documents with per-document positions and k masked tokens in `slots` slots per row."""
  seg = np.zeros((rows, seq), np.int32)
  pos = np.zeros((rows, seq), np.int32)
  for r in range(rows):
    start, doc = 0, 1
    while start < seq:
      n = min(int(rng.integers(64, 513)), seq - start)
      seg[r, start : start + n], pos[r, start : start + n] = doc, np.arange(n)
      start, doc = start + n, doc + 1
  ids = rng.integers(5, vocab, (rows, seq)).astype(np.int32)
  mp = np.zeros((rows, slots), np.int32)
  mp[:, :k] = np.stack([rng.choice(seq, k, replace=False) for _ in range(rows)])
  weights = np.zeros((rows, slots), np.float32)
  weights[:, :k] = 1.0
  return dict(
    input_ids=ids,
    segment_ids=seg,
    positions=pos,
    masked_positions=mp,
    masked_labels=np.take_along_axis(ids, mp, 1),
    masked_weights=weights,
    lang_ids=np.zeros((rows, seq), np.int32),
  )


def matmul_flops_per_s(n: int, dtype, steps: int = 5) -> float:
  a = jnp.ones((n, n), dtype)
  matmul = jax.jit(lambda x: x @ x)
  jax.block_until_ready(matmul(a))  # compile
  start = time.perf_counter()
  for _ in range(steps):
    out = matmul(a)
  jax.block_until_ready(out)
  return 2 * n**3 * steps / (time.perf_counter() - start)


def build_step(cfg, rows: int, seq_len: int, mask_rate: float, max_masked: int = 0):
  """The real train step on one synthetic batch: (mesh, run, batch, program); each `run()` is one step
  (parameters and optimizer state updated in place) and returns its loss. `max_masked` > 0 sets the masked
  slots per row (the pipeline's default otherwise)."""
  mesh = sharding.make_mesh({"fsdp": -1})
  k = max(1, int(round(mask_rate * seq_len)))
  config = base_config.get_config()  # the recipe's optimizer (StableAdamW) and seed
  config.update_from_flattened_dict(
    {
      "batch_size": rows,
      "micro_batch_size": rows,
      "data.seq_len": seq_len,
      "data.mask_rate": mask_rate,
      "data.max_masked": max_masked,
    }
  )
  program = train.build_program(config, mesh, num_languages=1, cfg=cfg)
  params, opt = program.init()
  step = program.step
  # k predicted tokens per row in the pipeline's program.masked slots (the rest are unused, weight 0).
  batch = synthetic_batch(np.random.default_rng(0), rows, seq_len, k, cfg.vocab_size, program.masked)
  device_batch = train.make_put(mesh, leading=1)(train.stack_microbatches([batch]))
  state = {"params": params, "opt": opt}

  def run():
    with jax.set_mesh(mesh):
      state["params"], state["opt"], metrics = step(
        state["params"], state["opt"], device_batch, jnp.float32(1e-4), jnp.int32(0)
      )
    return metrics["loss"]

  return mesh, run, batch, program


def op_table(program, run, steps: int, top: int) -> list[tuple[str, float, float, str]]:
  """The `top` XLA ops of `steps` traced steps: (instruction, ms per step, share of all op time, what it computes:
  the jax op it came from). Op time is summed over XLA's CPU worker threads, so ops that run side by side count in
  full. A product that XLA runs on Eigen (`dot.N`, not a YNNPACK fusion) returns at once and computes on Eigen's
  threads: its time runs from its start to its "end: dot.N" event, not just its own event (the dispatch)."""
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(steps):
        jax.block_until_ready(run())
    (path,) = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)  # local-only: the profiler's temporary dir
    profile = jax.profiler.ProfileData.from_file(path)
  events = sorted(
    (event.start_ns, event.duration_ns, event.name)
    for plane in profile.planes
    for line in plane.lines
    if line.name.startswith("tf_XLA")  # the CPU worker threads: one event per executed op
    for event in line.events
    if not event.name.startswith(("ThunkExecutor", "SlinkyThreadPool", "ThreadpoolListener"))
  )
  eigen_starts = collections.defaultdict(collections.deque)
  ns = collections.Counter()
  for start, duration, name in events:
    if re.fullmatch(r"dot(\.\d+)?", name):
      eigen_starts[name].append(start)
    elif name.startswith("end: dot") and eigen_starts[name[5:]]:
      ns[name[5:]] += start + duration - eigen_starts[name[5:]].popleft()
    elif not name.startswith("end: "):
      ns[name] += duration
  text = program.lower().compile().as_text()
  source = dict(re.findall(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]*)"', text, re.M))
  source = {k: v.split("closed_call/")[-1].removeprefix("jit(step)/") for k, v in source.items()}
  total = sum(ns.values()) or 1
  return [(name, t / 1e6 / steps, t / total, source.get(name, "")) for name, t in ns.most_common(top)]


def main(argv):
  cli.start(argv)
  dtype = FLAGS.dtype if FLAGS.dtype != "auto" else ("float32" if jax.default_backend() == "cpu" else "bfloat16")
  cfg = get_config(
    FLAGS.preset,
    num_layers=FLAGS.layers,
    vocab_size=FLAGS.vocab,
    dtype=dtype,
    attention_impl=FLAGS.attention_impl,
    remat=FLAGS.remat,
    loss_impl=FLAGS.loss_impl,
    loss_chunk_size=FLAGS.loss_chunk_size,
    scan_layers=FLAGS.scan_layers,
  )
  rows = FLAGS.batch
  k = max(1, int(round(FLAGS.mask_rate * FLAGS.seq_len)))
  mesh, run, batch, program = build_step(cfg, rows, FLAGS.seq_len, FLAGS.mask_rate)

  t0 = time.perf_counter()
  jax.block_until_ready(run())
  compile_s = time.perf_counter() - t0
  start = time.perf_counter()
  for _ in range(FLAGS.steps):
    loss = run()
  jax.block_until_ready(loss)
  seconds = (time.perf_counter() - start) / FLAGS.steps

  f = flops_lib.training_flops(cfg, batch["segment_ids"], num_masked=rows * k)
  tokens = rows * FLAGS.seq_len
  n = mesh.size
  kind = jax.devices()[0].device_kind
  matmul = matmul_flops_per_s(FLAGS.matmul, jnp.dtype(dtype))
  peak = flops_lib.peak_flops(kind)
  print(f"device: {n} × {kind} ({jax.default_backend()}), compute dtype {dtype}, attention {FLAGS.attention_impl}")
  print(
    f"model: {FLAGS.preset} width, {cfg.num_layers} layers, vocab {cfg.vocab_size}, "
    f"{rows} × {FLAGS.seq_len} tokens per step, {k} masked per row; MLM loss "
    f"{mlm_loss.describe(cfg.loss_impl, cfg.loss_chunk_size, rows * program.masked // n, cfg.vocab_size)}, "
    f"layers {'scanned' if cfg.scan_layers else 'unrolled'}"
  )
  print(f"first step (compile) {compile_s:.1f} s; step {seconds * 1e3:.1f} ms")
  print(f"tokens/s {tokens / seconds:,.0f} ({tokens / seconds / n:,.0f} per device)")
  print(
    f"model FLOPs per step {f.total:.3e} (linears {f.linears:.2e}, attention {f.attention:.2e}, "
    f"head {f.head:.2e}); model FLOP/s {f.total / seconds:.3e} ({f.total / seconds / n:.3e} per device)"
  )
  print(
    f"{FLAGS.matmul}³ matmul on one device: {matmul:.3e} FLOP/s → step reaches "
    f"{100 * f.total / seconds / n / matmul:.1f}% of it"
  )
  if peak:
    print(f"MFU {100 * flops_lib.mfu(f.total, seconds, n, kind):.1f}% of the {peak:.3e} FLOP/s bf16 peak")
  else:
    print(f"MFU: no peak FLOP/s known for {kind!r}")
  if FLAGS.profile_top:
    print(f"slowest XLA ops over {FLAGS.steps} traced steps (ms per step, share of all op time):")
    for name, ms, share, op in op_table(program, run, FLAGS.steps, FLAGS.profile_top):
      print(f"  {ms:9.1f} ms {100 * share:5.1f}%  {name:36s} {op}")


if __name__ == "__main__":
  cli.run(main, define_flags)
