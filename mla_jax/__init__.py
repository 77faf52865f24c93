"""mla_jax: multi-head latent attention, MLRA and their baselines in JAX / Flax NNX."""
from mla_jax.config import ModelConfig, attention_config, variants  # noqa: F401
from mla_jax.model import Transformer, abstract_model, count_params  # noqa: F401

__version__ = "0.1.0"
