"""Shared test helpers: small configs for every variant, and parameter randomisation."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mla_jax import ModelConfig, RunOptions, Transformer, attention_config

# Small attention configs, one per variant, with every optional piece switched on
# somewhere (low-rank query, decoupled RoPE, gates).
LATENT = dict(kv_lora_rank=32, qk_nope_head_dim=8, qk_rope_head_dim=4)
SMALL_ATTENTION = {
    "mha": dict(num_heads=4, head_dim=8),
    "mqa": dict(num_heads=4, head_dim=8),
    "gqa": dict(num_heads=4, num_kv_heads=2, head_dim=8),
    "mla": dict(num_heads=4, q_lora_rank=16, **LATENT),
    "gla2": dict(num_heads=4, q_lora_rank=16, **LATENT),
    "gla4": dict(num_heads=8, q_lora_rank=0, **LATENT),
    "mlra2": dict(num_heads=4, q_lora_rank=16, **LATENT),
    "mlra4": dict(num_heads=4, q_lora_rank=16, **LATENT),
    "gta": dict(num_heads=4, num_kv_heads=2, head_dim=8),
    "tpa": dict(num_heads=4, head_dim=8, q_rank=3, k_rank=2, v_rank=2),
    "mfa": dict(num_heads=4, head_dim=16, q_lora_rank=16),
}
GATED = ("gqa", "mla", "gla2", "mlra2", "mlra4")


def small_config(variant: str, *, flavour="llama", gated=False, layers=2, d_model=32,
                 vocab=61, **attn_overrides) -> ModelConfig:
  kw = dict(SMALL_ATTENTION[variant], **attn_overrides)
  if gated:
    kw["gated"] = True
  if flavour == "gpt2" and variant in ("mha", "mqa", "gqa"):
    kw.setdefault("rope", False)
  return ModelConfig(flavour=flavour, vocab_size=vocab, d_model=d_model, num_layers=layers,
                     mlp_dim=2 * d_model, max_seq_len=64, attention=attention_config(variant, **kw))


def randomize(model: nnx.Module, seed: int = 0, std: float = 0.2) -> nnx.Module:
  """Replace EVERY parameter with random values: zero-initialised output
  projections would hide attention, unit norm weights would hide the norms."""
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  rng = np.random.default_rng(seed)       # NumPy's: a JAX draw compiles a program per shape
  for path, var in flat:
    value = var.get_value()
    noise = rng.standard_normal(value.shape, np.float32)
    path_str = "/".join(str(p) for p in path)
    if "norm" in path_str and path[-1] in ("weight", "scale"):
      new = 1.0 + 0.2 * noise
    elif path[-1] == "bias":
      new = 0.1 * noise
    else:
      new = std * noise
    var.set_value(jnp.asarray(new, value.dtype))
  return model


def random_model(config: ModelConfig, seed: int = 0, **options) -> Transformer:
  """Every parameter random; `options` are RunOptions fields (decode_impl=...)."""
  return randomize(Transformer(config, rngs=nnx.Rngs(seed), options=RunOptions(**options)), seed + 1)
