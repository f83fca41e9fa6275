"""This project's train step against transformers' PyTorch `ModernBertForMaskedLM` on the same config and CPU.

  python -m mmbert_jax.benchmarks.versus_torch                  # bench shape, 3 alternated runs, all cores
  python -m mmbert_jax.benchmarks.versus_torch --threads=2 --runs=5

Each run is one subprocess per side, alternated (jax torch jax torch …) so that both see the same host load and
each framework has its own threads: a child is pinned to `--threads` cores (XLA's CPU thread pool sizes itself to
the schedulable cores; torch also gets `torch.set_num_threads`). A child compiles / warms up, then times `--steps`
steps and prints one JSON line; the parent prints every run, the medians of tokens/s and the ratio, with each
child's process CPU seconds per step (the system time and minor page faults among them) and the load average before
and after. The jax side runs as this project's commands do on a CPU: its C allocator keeps freed memory for the next
step (`mmbert_jax.host_memory`); the torch side keeps glibc's defaults, or the same settings with
`--torch_keeps_freed_memory` (a control).

Same work on both sides: float32, the same shape (mmbert-small width by default), the same batch (packed rows of
random tokens; k = round(mask_rate × seq_len) masked tokens per row at the same positions with the same labels),
the sparse MLM head on the masked tokens only (ours: `max_masked` = k slots per row, no padding slot; transformers:
`sparse_prediction=True`), the tied decoder, an AdamW-family update of every parameter. What differs: ours attends
within each packed document (segment mask), transformers over the whole row (it has no document mask; the dense
S × S work is the same), and ours is StableAdamW (AdamW with per-tensor update clipping, no decay of norms and
biases) where transformers' side uses `torch.optim.AdamW`. `torch` and `transformers` come from the test extra.

Each child then times the step's matrix products alone (`gemm_shapes`: every linear layer and the sparse head, each
forward product with its two backward ones, float32, same threads), so the parent can print how much of each
side's step is GEMMs and how much is the rest (attention, norms, activations, loss, optimizer, dispatch).
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from absl import flags

from mmbert_jax import cli

FLAGS = flags.FLAGS
SIDES = ("jax", "torch")


def define_flags() -> None:
  flags.DEFINE_string("preset", "mmbert-small", "Model preset whose width is used (its hidden size, heads, MLP).")
  flags.DEFINE_integer("hidden", 0, "Hidden size (0: the preset's).")
  flags.DEFINE_integer("intermediate", 0, "GLU half-width (0: the preset's).")
  flags.DEFINE_integer("heads", 0, "Attention heads (0: the preset's).")
  flags.DEFINE_integer("window", 0, "Total local attention window (0: the preset's).")
  flags.DEFINE_integer("layers", 4, "Number of layers.")
  flags.DEFINE_integer("vocab", 32_768, "Vocabulary size.")
  flags.DEFINE_integer("seq_len", 512, "Row length.")
  flags.DEFINE_integer("batch", 8, "Rows per step.")
  flags.DEFINE_float("mask_rate", 0.3, "Fraction of tokens predicted (sparse head).")
  flags.DEFINE_integer("threads", 0, "Cores per side (0: every core this process may run on).")
  flags.DEFINE_integer("runs", 3, "Alternated runs per side.")
  # 10: on the CPU this project's C allocator settings (host_memory) let the heap grow over the first steps (2 to more
  # than 15 at the bench shape, varying from run to run: page faults are printed beside each run's figures).
  flags.DEFINE_integer("warmup", 10, "Untimed steps per run (the first compiles).")
  flags.DEFINE_integer("steps", 5, "Timed steps per run.")
  flags.DEFINE_enum("side", None, SIDES, "Run one side in this process and print its JSON line (what a run starts).")
  flags.DEFINE_bool(
    "torch_keeps_freed_memory",
    False,
    "A control: the torch side also runs with the C allocator settings that this project's commands apply on the "
    "CPU (mmbert_jax.host_memory); by default it runs with glibc's.",
  )


def model_config():
  from mmbert_jax.model import get_config

  cfg = get_config(FLAGS.preset, num_layers=FLAGS.layers, vocab_size=FLAGS.vocab, dtype="float32")
  overrides = dict(hidden_size=FLAGS.hidden, intermediate_size=FLAGS.intermediate, num_heads=FLAGS.heads)
  overrides["local_window"] = FLAGS.window
  return cfg.replace(attention_impl="xla", **{k: v for k, v in overrides.items() if v})


def masked_count() -> int:
  return max(1, int(round(FLAGS.mask_rate * FLAGS.seq_len)))


def gemm_shapes(cfg) -> list[tuple[int, int, int]]:
  """The (m, k, n) of every forward matrix product of the step: per layer q, k, v, the attention output and the
  GeGLU's three; the head's dense layer and tied decoder on the masked tokens. Each also runs twice backward
  (x-gradient [m, n]·[n, k], weight gradient [k, m]·[m, n]), so a step does 6·Σ m·k·n GEMM FLOPs."""
  t, m = FLAGS.batch * FLAGS.seq_len, FLAGS.batch * masked_count()
  h, i, nd = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim
  layer = [(t, h, nd)] * 3 + [(t, nd, h)] + [(t, h, i)] * 2 + [(t, i, h)]
  return layer * cfg.num_layers + [(m, h, h), (m, h, cfg.vocab_size)]


def _gemm_seconds(run, sync) -> float:
  """Seconds per call of `run` (every product of `gemm_shapes`, forward and backward), after one warm-up call."""
  sync(run())
  start = time.perf_counter()
  for _ in range(FLAGS.steps):
    out = run()
  sync(out)
  return (time.perf_counter() - start) / FLAGS.steps


def _timed(step, sync) -> dict:
  """Warm-up steps, then the timed ones: wall and process CPU seconds per step, and the first step's loss."""
  t0 = time.perf_counter()
  first = float(sync(step()))
  first_s = time.perf_counter() - t0
  for _ in range(FLAGS.warmup - 1):
    sync(step())
  wall, cpu, usage = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
  for _ in range(FLAGS.steps):
    loss = step()
  sync(loss)
  wall, cpu = (time.perf_counter() - wall) / FLAGS.steps, (time.process_time() - cpu) / FLAGS.steps
  after = resource.getrusage(resource.RUSAGE_SELF)
  tokens = FLAGS.batch * FLAGS.seq_len
  return dict(
    tokens_per_s=tokens / wall,
    step_s=wall,
    cpu_s=cpu,
    system_s=(after.ru_stime - usage.ru_stime) / FLAGS.steps,
    page_faults=(after.ru_minflt - usage.ru_minflt) / FLAGS.steps,
    first_step_s=first_s,
    first_loss=first,
    loss=float(sync(loss)),
  )


def run_jax() -> dict:
  import jax

  from mmbert_jax.benchmarks import train_step

  cfg = model_config()
  _, step, _, _ = train_step.build_step(cfg, FLAGS.batch, FLAGS.seq_len, FLAGS.mask_rate, max_masked=masked_count())
  out = _timed(step, jax.block_until_ready)
  keys = iter(jax.random.split(jax.random.key(0), 3 * len(gemm_shapes(cfg))))
  operands = [
    [jax.random.normal(next(keys), shape) for shape in ((m, k), (k, n), (m, n))] for m, k, n in gemm_shapes(cfg)
  ]
  gemms = jax.jit(lambda ops: [(x @ w, dy @ w.T, x.T @ dy) for x, w, dy in ops])
  gemm_s = _gemm_seconds(lambda: gemms(operands), jax.block_until_ready)
  return out | dict(gemm_s=gemm_s, devices=jax.device_count(), version=jax.__version__)


def run_torch(threads: int) -> dict:
  import numpy as np
  import torch
  import transformers

  from mmbert_jax.benchmarks import train_step

  torch.set_num_threads(threads)
  torch.manual_seed(0)
  cfg = model_config()
  hf_cfg = transformers.ModernBertConfig(
    vocab_size=cfg.vocab_size,
    hidden_size=cfg.hidden_size,
    intermediate_size=cfg.intermediate_size,
    num_hidden_layers=cfg.num_layers,
    num_attention_heads=cfg.num_heads,
    local_attention=cfg.local_window,
    global_attn_every_n_layers=cfg.global_every_n,
    global_rope_theta=cfg.global_rope_theta,
    local_rope_theta=cfg.local_rope_theta,
    max_position_embeddings=max(cfg.max_position_embeddings, FLAGS.seq_len),
    norm_eps=cfg.norm_eps,
    pad_token_id=cfg.pad_id,
    eos_token_id=cfg.eos_id,
    bos_token_id=cfg.bos_id,
    cls_token_id=cfg.eos_id,
    sep_token_id=cfg.eos_id,
    sparse_prediction=True,
    attn_implementation="sdpa",
  )
  model = transformers.ModernBertForMaskedLM(hf_cfg).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=8e-5)
  k = masked_count()
  b = train_step.synthetic_batch(np.random.default_rng(0), FLAGS.batch, FLAGS.seq_len, k, cfg.vocab_size, k)
  ids = torch.from_numpy(b["input_ids"].astype(np.int64))
  labels = torch.full(ids.shape, -100, dtype=torch.int64)
  rows = np.arange(FLAGS.batch)[:, None]
  labels[rows, b["masked_positions"]] = torch.from_numpy(b["masked_labels"].astype(np.int64))

  def step():
    opt.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    opt.step()
    return loss.detach()

  out = _timed(step, lambda x: x)
  operands = [[torch.randn(*shape) for shape in ((m, k), (k, n), (m, n))] for m, k, n in gemm_shapes(cfg)]
  gemms = lambda: [(x @ w, dy @ w.T, x.T @ dy) for x, w, dy in operands]
  gemm_s = _gemm_seconds(gemms, lambda x: x)
  return out | dict(gemm_s=gemm_s, threads_in_use=torch.get_num_threads(), version=torch.__version__)


def child(side: str, threads: int) -> None:
  cores = sorted(os.sched_getaffinity(0))
  os.sched_setaffinity(0, cores[:threads])  # before XLA or torch size their thread pools
  out = run_jax() if side == "jax" else run_torch(threads)
  print(json.dumps(dict(side=side, threads=threads, load=os.getloadavg()[0]) | out), flush=True)


def missing_torch() -> str | None:
  missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
  if missing:
    return f"{' and '.join(missing)} not installed: the PyTorch side needs the test extra (pip install -e '.[test]')"
  return None


def _child_env(threads: int) -> dict:
  env = dict(os.environ, OMP_NUM_THREADS=str(threads), JAX_PLATFORMS="cpu")
  # One CPU device: a forced host device count (the test suite's) would split the threads between fake devices.
  xla = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f)
  env["XLA_FLAGS"] = xla
  return env


def run_side(side: str, threads: int) -> dict:
  argv = [sys.executable, "-m", "mmbert_jax.benchmarks.versus_torch", f"--side={side}", f"--threads={threads}"]
  argv += [f"--{f}={FLAGS[f].value}" for f in _FORWARDED]
  env = _child_env(threads)
  if side == "torch":  # cli.start applies host_memory in every child; torch's side keeps glibc's defaults unless asked
    env["MMBERT_KEEP_FREED_MEMORY"] = "1" if FLAGS.torch_keeps_freed_memory else "0"
  proc = subprocess.run(argv, capture_output=True, text=True, env=env)
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  if proc.returncode or not lines:
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    cli.fail(f"the {side} side failed (exit {proc.returncode}): {tail}", cli.EXIT_FAILED)
  return json.loads(lines[-1])


_FORWARDED = (
  "preset",
  "hidden",
  "intermediate",
  "heads",
  "window",
  "layers",
  "vocab",
  "seq_len",
  "batch",
  "mask_rate",
  "warmup",
  "steps",
)


def main(argv):
  cli.start(argv)
  available = len(os.sched_getaffinity(0))
  threads = FLAGS.threads or available
  if not 0 < threads <= available:
    raise cli.ConfigError(f"--threads={FLAGS.threads}: this process may run on {available} cores")
  for name in ("runs", "warmup", "steps", "batch", "seq_len", "layers"):
    if FLAGS[name].value < 1:
      raise cli.ConfigError(f"--{name} must be at least 1; got {FLAGS[name].value}")
  if FLAGS.side:
    child(FLAGS.side, threads)
    return
  if error := missing_torch():
    cli.fail(error, cli.EXIT_FAILED)
  cfg = model_config()
  k = masked_count()
  print(
    f"config: hidden {cfg.hidden_size}, intermediate {cfg.intermediate_size}, {cfg.num_heads} heads, "
    f"{cfg.num_layers} layers, vocab {cfg.vocab_size}, {FLAGS.batch} × {FLAGS.seq_len} tokens, {k} masked per row; "
    f"float32 on CPU, {threads} threads per side, {FLAGS.steps} timed steps per run"
  )
  load_before = os.getloadavg()
  print(f"load average before: {' '.join(f'{x:.2f}' for x in load_before)}")
  results = {side: [] for side in SIDES}
  for i in range(FLAGS.runs):
    for side in SIDES:
      r = run_side(side, threads)
      results[side].append(r)
      print(
        f"run {i + 1} {side:5s} tokens/s {r['tokens_per_s']:9,.0f}  step {r['step_s'] * 1e3:8.1f} ms  "
        f"cpu {r['cpu_s']:6.2f} s/step (system {r['system_s']:5.2f}, {r['page_faults']:8,.0f} page faults)  "
        f"first step {r['first_step_s']:6.1f} s  loss {r['first_loss']:.3f} → "
        f"{r['loss']:.3f}  GEMMs alone {r['gemm_s'] * 1e3:8.1f} ms  load {r['load']:.2f}",
        flush=True,
      )
  median = {side: statistics.median(r["tokens_per_s"] for r in results[side]) for side in SIDES}
  cpu = {side: statistics.median(r["cpu_s"] for r in results[side]) for side in SIDES}
  for side in SIDES:
    print(f"median {side:5s} tokens/s {median[side]:9,.0f}  cpu {cpu[side]:.2f} s/step")
  print(f"ratio jax/torch {median['jax'] / median['torch']:.2f}")
  gemm_flops = 6 * sum(m * k * n for m, k, n in gemm_shapes(cfg))
  for side in SIDES:
    gemm = statistics.median(r["gemm_s"] for r in results[side])
    step = statistics.median(r["step_s"] for r in results[side])
    print(
      f"median {side:5s} GEMMs alone {gemm * 1e3:9.2f} ms ({gemm_flops / gemm / 1e9:,.1f} GFLOP/s of "
      f"{gemm_flops / 1e9:.4g} GFLOP); step − GEMMs {(step - gemm) * 1e3:9.2f} ms"
    )
  children = resource.getrusage(resource.RUSAGE_CHILDREN)
  print(
    f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
    f"children's CPU {children.ru_utime + children.ru_stime:.1f} s"
  )


if __name__ == "__main__":
  cli.run(main, define_flags)
