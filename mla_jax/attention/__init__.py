"""Attention variants. Importing this package registers every variant by name."""
from mla_jax.attention.base import DECODE_IMPLS, Attention, Cache  # noqa: F401
from mla_jax.attention.gqa import GQAAttention, GQAConfig  # noqa: F401
from mla_jax.attention.gta import GTA, GTAConfig  # noqa: F401
from mla_jax.attention.latent import (GLA, MLA, MLRA, GLAConfig, LatentAttention,  # noqa: F401
                                      MLAConfig, MLRAConfig)
from mla_jax.attention.mfa import MFA, MFAConfig  # noqa: F401
from mla_jax.attention.tpa import TPA, TPAConfig  # noqa: F401
