"""host_memory: glibc keeps freed memory for the next XLA:CPU execution (counted in page faults), only where JAX runs
on the CPU, and every command applies it before JAX starts."""

import os
import subprocess
import sys

import pytest
from helpers import ROOT

MB = 1 << 20
# A jitted function with a 64 MiB output and 64 MiB of temporaries: glibc maps blocks this large (they are above
# its 32 MiB mmap threshold) unless told to keep freed memory. Prints the minor page faults of each call after the
# first 20 (the kept heap grows to its peak over a varying number of calls: how freed blocks coalesce depends on
# which thread frees them when).
_PROBE = """
import resource, sys
sys.path.insert(0, {root!r})
from mmbert_jax import host_memory
print("applied", host_memory.configure(), flush=True)
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sin(x)[::-1] * jnp.cos(x))
x = jnp.ones(({n},), jnp.float32)
for call in range(60):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  if call >= 20:
    print("faults", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, flush=True)
"""


def _probe(choice: str):
  env = dict(os.environ, JAX_PLATFORMS="cpu", MMBERT_KEEP_FREED_MEMORY=choice)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  code = _PROBE.format(root=str(ROOT), n=64 * MB // 4)
  r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  lines = r.stdout.split("\n")
  applied = lines[0] == "applied True"
  return applied, [int(line.split()[1]) for line in lines if line.startswith("faults")]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_memory_is_kept_so_later_calls_fault_no_pages():
  pages = 64 * MB // os.sysconf("SC_PAGE_SIZE")
  applied, faults = _probe("0")  # glibc's defaults: every call maps its output afresh and faults it all in
  assert not applied and len(faults) == 40 and min(faults) >= pages, faults
  applied, faults = _probe("")  # on the CPU, by default: once the heap has grown, calls fault nothing in
  faulting = [f for f in faults if f >= pages // 100]
  assert applied and len(faults) == 40 and len(faulting) <= 10, faults


def test_an_accelerator_host_keeps_glibcs_defaults(monkeypatch):
  from mmbert_jax import host_memory

  monkeypatch.delenv("MMBERT_KEEP_FREED_MEMORY", raising=False)
  monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: True)
  assert host_memory.configure()  # this test process runs JAX on the CPU
  monkeypatch.setattr(host_memory, "jax_will_run_on_cpu", lambda: False)
  assert not host_memory.configure()
  monkeypatch.setenv("MMBERT_KEEP_FREED_MEMORY", "1")
  assert host_memory.configure()


def test_platform_is_read_from_jax_platforms_before_any_backend_starts():
  code = (
    f"import sys; sys.path.insert(0, {str(ROOT)!r}); from mmbert_jax import host_memory; "
    "print(host_memory.jax_will_run_on_cpu()); import jax._src.xla_bridge as xb; print(bool(xb._backends))"
  )
  for platforms, expected in (("cpu", "True"), ("tpu", "False"), ("cuda,cpu", "False"), ("", "True")):
    env = dict(os.environ, JAX_PLATFORMS=platforms)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == [expected, "False"], (platforms, r.stdout, r.stderr[-2000:])


def test_every_command_configures_it_first_and_a_bad_choice_is_one_line(tmp_path):
  env = dict(os.environ, MMBERT_KEEP_FREED_MEMORY="yes")
  command = [sys.executable, "-m", "mmbert_jax.main", "--config=configs/demo.py", f"--workdir={tmp_path}"]
  r = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 2
  assert r.stderr.strip() == "error: MMBERT_KEEP_FREED_MEMORY='yes': expected 0 or 1 (or unset: on CPU runs only)"
  assert not list(tmp_path.iterdir())  # before anything is written
