"""Attention kernels: kv blocks visited by local vs global layers, and wall-clock timings on this backend.

  python -m mmbert_jax.benchmarks.attention                          # block counts at S=1024, 8192; timings at S=256
  python -m mmbert_jax.benchmarks.attention --time_seq_lens=256,1024 # more timings (interpret mode is slow on CPU)

Block counts are per (example, head) for the forward pass: for pallas_gpu from the kernel's own iteration range
(`flash_gpu.block_range`), for splash from the block mask splash builds. The kernels run in interpret mode
unless the backend is the one they are built for; interpret timings show the cost of emulation, not kernel speed.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from mmbert_jax import attention
from mmbert_jax.kernels import flash_gpu, splash

_COUNT_SEQ_LENS = flags.DEFINE_list("count_seq_lens", ["1024", "8192"], "Sequence lengths for block counts.")
_TIME_SEQ_LENS = flags.DEFINE_list("time_seq_lens", ["256"], "Sequence lengths for timings.")
_WINDOW = flags.DEFINE_integer("window", 64, "One-sided local window (mmBERT: 64).")
_BLOCK = flags.DEFINE_integer("block", 128, "block_q = block_kv.")
_BATCH = flags.DEFINE_integer("batch", 1, "Batch size for timings.")
_HEADS = flags.DEFINE_integer("heads", 6, "Heads for timings (head_dim 64).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls after the compiling one; the median is printed.")
_IMPLS = flags.DEFINE_list("impls", ["xla", "splash", "pallas_gpu"], "Implementations to time.")


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
  print(f"\ntimings on {backend} ({jax.devices()[0].device_kind}), batch {batch}, {heads} heads × 64, float32, "
        f"block {block}; ms (median of {repeats}; first call incl. compile in brackets)")
  print(f"{'S':>6} {'impl':>22} {'layer':>7} {'fwd':>18} {'fwd+bwd':>18}")
  for s in seq_lens:
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (batch, s, heads, 64), jnp.float32) for key in keys)
    seg = jnp.asarray(np.repeat(np.arange(1, 5), s // 4)[None].repeat(batch, 0), jnp.int32)   # 4 documents
    for impl in impls:
      interpret = {"splash": backend != "tpu", "pallas_gpu": backend != "gpu"}.get(impl, False)
      for layer, w in (("global", None), ("local", window)):
        fwd = jax.jit(lambda q, k, v, impl=impl, w=w: attention.attention(
            q, k, v, seg, w, impl=impl, block_q=block, block_kv=block, interpret=interpret))
        bwd = jax.jit(jax.grad(lambda q, k, v, f=fwd: jnp.sum(f(q, k, v)), argnums=(0, 1, 2)))
        row = []
        for fn in (fwd, bwd):
          first, steady = _median_ms(fn, (q, k, v), repeats)
          row.append(f"{steady:9.1f} [{first:6.0f}]")
        label = impl + (" (interpret)" if interpret else "")
        print(f"{s:>6} {label:>22} {layer:>7} {row[0]:>18} {row[1]:>18}")


def main(argv):
  del argv
  block_counts([int(s) for s in _COUNT_SEQ_LENS.value], _BLOCK.value, _WINDOW.value)
  timings([int(s) for s in _TIME_SEQ_LENS.value], _IMPLS.value, _BATCH.value, _HEADS.value, _BLOCK.value,
          _WINDOW.value, _REPEATS.value)


if __name__ == "__main__":
  app.run(main)
