"""Attention kernels: kv blocks visited by local vs global layers, and wall-clock timings on this backend.

  python -m mmbert_jax.benchmarks.attention                          # block counts at S=1024, 8192; timings at S=256
  python -m mmbert_jax.benchmarks.attention --time_seq_lens=256,1024 # more timings (interpret mode is slow on CPU)
  python -m mmbert_jax.benchmarks.attention --mode=hardware          # on a GPU or TPU: xla vs kernel vs cuDNN

Block counts are per (example, head) for the forward pass: for pallas_gpu from the kernel's own iteration range
(`flash_gpu.block_range`), for splash from the block mask splash builds. The kernels run in interpret mode
unless the backend is the one they are built for; interpret timings show the cost of emulation, not kernel speed.

`--mode=hardware` times forward and forward+backward in bfloat16 at S = 1024 and 8192 (`--hw_tokens` tokens per
call, mmBERT-base heads: 12 × 64, one document per row) for global and ±64 local layers: the XLA path, this
backend's kernel (splash on TPU, pallas_gpu on GPU, with the model's default tiles) and, for global layers on a
GPU, `jax.nn.dot_product_attention(implementation="cudnn")` (cuDNN has no two-sided window). TFLOP/s are printed
twice: counting the matmul FLOPs of the (query, key) tiles the implementation visits, and counting all S×S pairs
(dense attention's FLOPs; for a local layer this is the speed a dense computation would need to match it).
FLOPs per pair: 4·D forward and 10·D backward (dq, dk, dv, dp and the recomputed scores are not counted twice:
the FlashAttention convention, backward = 2.5 × forward). On CPU the mode runs the kernel in interpret mode, which
only checks that the mode works.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from mmbert_jax import attention, cli
from mmbert_jax import model as model_lib
from mmbert_jax.kernels import flash_gpu, splash

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_list("count_seq_lens", ["1024", "8192"], "Sequence lengths for block counts.")
  flags.DEFINE_list("time_seq_lens", ["256"], "Sequence lengths for timings.")
  flags.DEFINE_integer("window", 64, "One-sided local window (mmBERT: 64).")
  flags.DEFINE_integer("block", 128, "block_q = block_kv.")
  flags.DEFINE_integer("batch", 1, "Batch size for timings.")
  flags.DEFINE_integer("heads", 6, "Heads for timings (head_dim 64).")
  flags.DEFINE_integer("repeats", 3, "Timed calls after the compiling one; the median is printed.")
  flags.DEFINE_list("impls", ["xla", "splash", "pallas_gpu"], "Implementations to time.")
  flags.DEFINE_enum(
    "mode",
    "counts",
    ["counts", "hardware"],
    "counts: block counts and float32 timings; hardware: bf16 TFLOP/s of xla/kernel/cuDNN.",
  )
  flags.DEFINE_list("hw_seq_lens", ["1024", "8192"], "hardware mode: sequence lengths.")
  flags.DEFINE_integer("hw_tokens", 32768, "hardware mode: tokens per call (batch = tokens / S).")
  flags.DEFINE_integer("hw_heads", 12, "hardware mode: heads of 64 (mmBERT-base: 12).")


def block_counts(seq_lens, block, window):
  print(f"kv blocks visited per (example, head), forward, block {block}, local window ±{window}")
  print(f"{'S':>6} {'kernel':>11} {'global':>8} {'local':>8} {'local/global':>13}")
  for s in seq_lens:
    for name, count in (("pallas_gpu", flash_gpu.visited_kv_blocks), ("splash", splash.visited_kv_blocks)):
      glob, loc = count(s, block, block, None), count(s, block, block, window)
      print(f"{s:>6} {name:>11} {glob:>8} {loc:>8} {100 * loc / glob:>12.2f}%")


def _median_ms(fn, args, repeats):
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return first * 1e3, float(np.median(times)) * 1e3


def timings(seq_lens, impls, batch, heads, block, window, repeats):
  backend = jax.default_backend()
  print(
    f"\ntimings on {backend} ({jax.devices()[0].device_kind}), batch {batch}, {heads} heads × 64, float32, "
    f"block {block}; ms (median of {repeats}; first call incl. compile in brackets)"
  )
  print(f"{'S':>6} {'impl':>22} {'layer':>7} {'fwd':>18} {'fwd+bwd':>18}")
  for s in seq_lens:
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (batch, s, heads, 64), jnp.float32) for key in keys)
    seg = jnp.asarray(np.repeat(np.arange(1, 5), s // 4)[None].repeat(batch, 0), jnp.int32)  # 4 documents
    for impl in impls:
      interpret = {"splash": backend != "tpu", "pallas_gpu": backend != "gpu"}.get(impl, False)
      for layer, w in (("global", None), ("local", window)):
        fwd = jax.jit(
          lambda q, k, v, impl=impl, w=w: attention.attention(
            q, k, v, seg, w, impl=impl, block_q=block, block_kv=block, interpret=interpret
          )
        )
        bwd = jax.jit(jax.grad(lambda q, k, v, f=fwd: jnp.sum(f(q, k, v)), argnums=(0, 1, 2)))
        row = []
        for fn in (fwd, bwd):
          first, steady = _median_ms(fn, (q, k, v), repeats)
          row.append(f"{steady:9.1f} [{first:6.0f}]")
        label = impl + (" (interpret)" if interpret else "")
        print(f"{s:>6} {label:>22} {layer:>7} {row[0]:>18} {row[1]:>18}")


# --------------------------------------------------------------------------------------------------------------
# Hardware mode
# --------------------------------------------------------------------------------------------------------------

FWD_FLOPS_PER_PAIR = 4  # × head_dim: q·kᵀ and p·v
BWD_FLOPS_PER_PAIR = 10  # × head_dim: dv, dp, ds·k (dq), dsᵀ·q (dk) and the recomputed q·kᵀ


def visited_pairs(impl: str, seq_len: int, window: int | None, options: attention.KernelOptions):
  """(forward, backward) (query, key) pairs per (example, head) in the tiles `impl` computes."""
  if impl == "pallas_gpu":
    blocks = options.flash_block_sizes().for_seq_len(seq_len, interpret=True)
    tiles = lambda bq, bk: flash_gpu.visited_kv_blocks(seq_len, bq, bk, window) * bq * bk
    return tiles(blocks.block_q, blocks.block_kv), tiles(blocks.block_q_dq, blocks.block_kv_dq)
  if impl == "splash":
    bq, bk = min(options.block_q, seq_len), min(options.block_kv, seq_len)
    pairs = splash.visited_kv_blocks(seq_len, bq, bk, window) * bq * bk
    return pairs, pairs
  return seq_len * seq_len, seq_len * seq_len  # xla and cuDNN compute every pair


def _attention_fn(impl: str, kernel: str, window, seg, options):
  if impl == "cudnn":
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
  if impl == "kernel":
    return lambda q, k, v: attention.attention(q, k, v, seg, window, impl=kernel, options=options)
  return lambda q, k, v: attention.attention(q, k, v, seg, window, impl="xla")


def hardware(seq_lens, tokens: int, heads: int, window: int, repeats: int, head_dim: int = 64):
  backend = jax.default_backend()
  kernel = {"tpu": "splash", "gpu": "pallas_gpu"}.get(backend, "pallas_gpu")
  interpret = backend not in ("tpu", "gpu")
  cfg = model_lib.ModelConfig(local_window=2 * window, attention_interpret=interpret)
  print(
    f"\nhardware mode on {backend} ({jax.devices()[0].device_kind}): bfloat16, {heads} heads × {head_dim}, "
    f"{tokens} tokens per call, one document per row; kernel = {kernel}"
    f"{' (INTERPRET mode: not kernel speed)' if interpret else ''}; ms median of {repeats}; TFLOP/s over "
    f"visited tiles / over all S×S pairs"
  )
  print(
    f"{'S':>6} {'batch':>5} {'layer':>6} {'impl':>8} {'fwd ms':>9} {'fwd+bwd ms':>11} "
    f"{'fwd TF/s':>17} {'fwd+bwd TF/s':>17}"
  )
  for s in seq_lens:
    batch = max(1, tokens // s)
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, ct = (jax.random.normal(key, (batch, s, heads, head_dim), jnp.bfloat16) for key in keys)
    seg = jnp.ones((batch, s), jnp.int32)
    for layer, w in (("global", None), ("local", window)):
      options = attention.kernel_options(cfg, kernel, w)
      for impl in ("xla", "kernel", "cudnn"):
        if impl == "cudnn" and (backend != "gpu" or w is not None):
          continue  # cuDNN: GPU only, and no two-sided window
        fn = _attention_fn(impl, kernel, w, seg, options)
        grad = jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v).astype(jnp.float32) * ct), argnums=(0, 1, 2))
        try:
          ms = [_median_ms(jax.jit(f), (q, k, v), repeats)[1] for f in (fn, grad)]
        except Exception as e:  # an OOM or an unsupported shape: report it and go on
          print(f"{s:>6} {batch:>5} {layer:>6} {impl:>8}  failed: {str(e).splitlines()[0][:100]}")
          continue
        fwd_pairs, bwd_pairs = visited_pairs(kernel if impl == "kernel" else impl, s, w, options)
        scale = batch * heads * head_dim
        visited = (
          FWD_FLOPS_PER_PAIR * fwd_pairs * scale,
          (FWD_FLOPS_PER_PAIR * fwd_pairs + BWD_FLOPS_PER_PAIR * bwd_pairs) * scale,
        )
        dense = (FWD_FLOPS_PER_PAIR * s * s * scale, (FWD_FLOPS_PER_PAIR + BWD_FLOPS_PER_PAIR) * s * s * scale)
        rate = lambda i: f"{visited[i] / ms[i] / 1e9:7.2f} / {dense[i] / ms[i] / 1e9:7.2f}"
        print(f"{s:>6} {batch:>5} {layer:>6} {impl:>8} {ms[0]:9.2f} {ms[1]:11.2f} {rate(0):>17} {rate(1):>17}")


def main(argv):
  cli.start(argv)
  if FLAGS.mode == "hardware":
    hardware([int(s) for s in FLAGS.hw_seq_lens], FLAGS.hw_tokens, FLAGS.hw_heads, FLAGS.window, FLAGS.repeats)
    return
  block_counts([int(s) for s in FLAGS.count_seq_lens], FLAGS.block, FLAGS.window)
  timings(
    [int(s) for s in FLAGS.time_seq_lens],
    FLAGS.impls,
    FLAGS.batch,
    FLAGS.heads,
    FLAGS.block,
    FLAGS.window,
    FLAGS.repeats,
  )


if __name__ == "__main__":
  cli.run(main, define_flags)
