"""mmbert_jax: pretraining mmBERT-style multilingual encoders in JAX."""

import importlib.util
import os
import signal
import sys

# `python -m mmbert_jax.main`: a preemption notice during the imports (seconds) is kept as a flag instead of killing
# the process (exit 143, which launchers take for a failure); `cli.handle_sigterm` takes the flag over.
early_sigterm = {"received": False}
if "-m" in sys.orig_argv and sys.orig_argv[sys.orig_argv.index("-m") + 1 :][:1] == ["mmbert_jax.main"]:
  signal.signal(signal.SIGTERM, lambda signum, frame: early_sigterm.update(received=True))

import jax  # noqa: E402

from mmbert_jax.host_memory import accelerators_on_host  # noqa: E402


def _skip_absent_tpu() -> None:
  """With libtpu installed on a machine that has no TPU (and no GPU), jax still starts its TPU backend on first
  use, which prints libtpu's initialisation trace before falling back to the CPU. Such a machine gets the CPU
  directly. Ahead-of-time TPU compilation (mmbert_jax.aot) loads libtpu on its own and is unaffected; JAX_PLATFORMS
  or JAX_FORCE_TPU_INIT in the environment take precedence."""
  if os.environ.get("JAX_PLATFORMS") or "JAX_FORCE_TPU_INIT" in os.environ or jax.config.jax_platforms:
    return
  if importlib.util.find_spec("libtpu") is None:
    return
  if accelerators_on_host() is False:  # None, an unreadable bus: leave jax's choice alone
    jax.config.update("jax_platforms", "cpu")


_skip_absent_tpu()

from mmbert_jax.model import MaskedLM, ModelConfig, get_config  # noqa: E402

__all__ = ["MaskedLM", "ModelConfig", "get_config"]
