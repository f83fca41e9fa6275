"""mmbert_jax: pretraining mmBERT-style multilingual encoders in JAX."""
from mmbert_jax.model import MaskedLM, ModelConfig, get_config

__all__ = ["MaskedLM", "ModelConfig", "get_config"]
