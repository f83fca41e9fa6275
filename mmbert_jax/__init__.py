"""mmbert_jax: pretraining mmBERT-style multilingual encoders in JAX."""

import importlib.util
import os

import jax
from jax._src import hardware_utils  # jax's own probe of the PCI bus for TPU chips and GPUs


def _skip_absent_tpu() -> None:
  """With libtpu installed on a machine that has no TPU (and no GPU), jax still starts its TPU backend on first
  use, which prints libtpu's initialisation trace before falling back to the CPU. Such a machine gets the CPU
  directly. Ahead-of-time TPU compilation (mmbert_jax.aot) loads libtpu on its own and is unaffected; JAX_PLATFORMS
  or JAX_FORCE_TPU_INIT in the environment take precedence."""
  if os.environ.get("JAX_PLATFORMS") or "JAX_FORCE_TPU_INIT" in os.environ or jax.config.jax_platforms:
    return
  if importlib.util.find_spec("libtpu") is None:
    return
  try:
    accelerators = (
      hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
      or hardware_utils.has_visible_nvidia_gpu()
      or hardware_utils.num_available_amd_gpus(1) > 0
    )
  except OSError:  # an unreadable bus: leave jax's choice alone
    return
  if not accelerators:
    jax.config.update("jax_platforms", "cpu")


_skip_absent_tpu()

from mmbert_jax.model import MaskedLM, ModelConfig, get_config  # noqa: E402

__all__ = ["MaskedLM", "ModelConfig", "get_config"]
