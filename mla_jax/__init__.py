"""mla_jax: multi-head latent attention, MLRA and their baselines in JAX / Flax NNX."""
from mla_jax.config import ModelConfig, RunOptions  # noqa: F401
from mla_jax.model import Transformer, abstract_model, count_params, with_options  # noqa: F401
from mla_jax.registry import attention_config, config_from_dict, variants  # noqa: F401

__version__ = "0.2.0"
