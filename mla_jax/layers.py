"""Pieces every layer shares: parameters with axis names, norms, RoPE, MLPs and
projections. The attention math lives in `mla_jax/attention/` (its core in
`mla_jax/attention/core.py`).
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mla_jax import compat
from mla_jax.config import AttentionConfig
from mla_jax.rules import constrain


def param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None], *,
          std: float = 0.02, dtype=jnp.float32, init=None) -> nnx.Param:
  """A weight drawn from N(0, std^2) (std 0 gives zeros), or from `init(key,
  shape, dtype)`, named by logical axes."""
  shape = tuple(int(s) for s in shape)
  if init is not None:
    value = init(rngs.params(), shape, dtype)
  elif std == 0.0:
    value = jnp.zeros(shape, dtype)
  else:
    value = std * jax.random.normal(rngs.params(), shape, dtype)
  return compat.param(value, axes)


def ones(shape: Sequence[int], axes: Sequence[str | None], dtype=jnp.float32) -> nnx.Param:
  return compat.param(jnp.ones(tuple(shape), dtype), axes)


def zeros(shape: Sequence[int], axes: Sequence[str | None], dtype=jnp.float32) -> nnx.Param:
  return compat.param(jnp.zeros(tuple(shape), dtype), axes)


def xavier_uniform_3d(key, shape, dtype=jnp.float32):
  """torch.nn.init.xavier_uniform_ on a 3-D tensor [s0, s1, s2]: fan_in = s1 s2,
  fan_out = s0 s2 (how the TPA authors initialise their factor projections)."""
  s0, s1, s2 = shape
  bound = math.sqrt(6.0 / (s1 * s2 + s0 * s2))
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float = 1e-6) -> jax.Array:
  """RMSNorm over the last axis, computed in fp32 (Llama / the MLRA code base)."""
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (weight.astype(jnp.float32) * normed).astype(x.dtype)


class RMSNorm(nnx.Module):
  """RMSNorm with one weight vector; `shape` may carry leading axes (one norm
  per latent block, as in GLA and MLRA), normalising only the last axis."""

  def __init__(self, shape: int | Sequence[int], axes: Sequence[str | None] = ("norm",),
               eps: float = 1e-6, param_dtype=jnp.float32):
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    self.weight = ones(shape, axes, param_dtype)
    self.eps = eps

  def __call__(self, x):
    return rms_norm(x, self.weight[...], self.eps)


class LayerNorm(nnx.Module):
  """LayerNorm with scale and bias (GPT-2 / nanoGPT), computed in fp32."""

  def __init__(self, dim: int, eps: float = 1e-5, param_dtype=jnp.float32):
    self.scale = ones((dim,), ("norm",), param_dtype)
    self.bias = zeros((dim,), ("norm",), param_dtype)
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(dim: int, theta: float = 10000.0, config: AttentionConfig | None = None):
  """RoPE's inverse frequencies [dim / 2] and the factor on cos and sin, with
  the context scaling `config.rope_scaling` names (Hugging Face's formulas):

    linear: every frequency / factor
    llama3: wavelengths longer than L / low_freq_factor (L the pretraining
            context) / factor, shorter than L / high_freq_factor kept, a
            smooth blend between
    yarn:   a per-dimension blend of kept and / factor frequencies, ramping over
            the dimensions that turn between beta_fast and beta_slow times
            within L; cos and sin times 0.1 mscale ln(factor) + 1 (or as given)

  `config.rope_inv_freq`, where set, gives the frequencies themselves.
  """
  half = dim // 2
  if config is not None and config.rope_inv_freq:           # a converted model's kept frequencies
    if len(config.rope_inv_freq) != half:
      raise ValueError(f"rope_inv_freq holds {len(config.rope_inv_freq)} frequencies for a RoPE {dim} wide")
    return jnp.asarray(config.rope_inv_freq, jnp.float32), 1.0
  inv_freq = 1.0 / (theta ** (jnp.arange(0, half, dtype=jnp.float32) * 2.0 / dim))
  kind = config.rope_scaling if config is not None else "none"
  if kind == "none":
    return inv_freq, 1.0
  c, factor = config, config.rope_factor
  if kind == "linear":
    return inv_freq / factor, 1.0
  if kind == "llama3":
    low_wavelen = c.rope_original_max_len / c.rope_low_freq_factor
    high_wavelen = c.rope_original_max_len / c.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (c.rope_original_max_len / wavelen - c.rope_low_freq_factor) / (
        c.rope_high_freq_factor - c.rope_low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return jnp.where(medium, blended, scaled), 1.0
  # yarn: the dimension that turns `rotations` times within the pretraining context
  def turning_dim(rotations):
    return dim * math.log(c.rope_original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))
  low = max(math.floor(turning_dim(c.rope_beta_fast)), 0)
  high = min(math.ceil(turning_dim(c.rope_beta_slow)), dim - 1)
  high = high + 0.001 if low == high else high
  ramp = jnp.clip((jnp.arange(half, dtype=jnp.float32) - low) / (high - low), 0, 1)
  kept = 1 - ramp
  inv_freq = inv_freq / factor * (1 - kept) + inv_freq * kept
  if c.rope_attention_factor:
    scale = c.rope_attention_factor
  elif c.rope_mscale and c.rope_mscale_all_dim:
    scale = _yarn_mscale(factor, c.rope_mscale) / _yarn_mscale(factor, c.rope_mscale_all_dim)
  else:
    scale = _yarn_mscale(factor)
  return inv_freq, scale


def yarn_softmax_factor(config: AttentionConfig) -> float:
  """DeepSeek's MLA multiplies its softmax scale by mscale(factor, mscale_all_dim)^2
  under a scaled RoPE (1 otherwise)."""
  if config.rope_scaling == "none" or not config.rope_mscale_all_dim:
    return 1.0
  return _yarn_mscale(config.rope_factor, config.rope_mscale_all_dim) ** 2


def rope(x: jax.Array, positions: jax.Array, theta: float | AttentionConfig = 10000.0) -> jax.Array:
  """Half-split (non-interleaved) rotary embedding.

  x: [batch, seq, ..., dim] with dim even; positions: [batch, seq] (int);
  `theta` the base, or an attention config (its base and scaling).
  y = [x1 cos - x2 sin, x1 sin + x2 cos] with x1, x2 the two halves of x.
  """
  dim = x.shape[-1]
  if dim == 0:
    return x
  if dim % 2:
    raise ValueError(f"RoPE needs an even width, got {dim}")
  half = dim // 2
  config = theta if isinstance(theta, AttentionConfig) else None
  inv_freq, scale = rope_frequencies(dim, config.rope_theta if config else theta, config)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, S, half]
  # Broadcast over any axes between seq and dim (heads, blocks, ...).
  angles = angles.reshape(angles.shape[:2] + (1,) * (x.ndim - 3) + (half,))
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  if scale != 1.0:
    cos, sin = cos * scale, sin * scale
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., :half], x32[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


def _einsum_spec(spec: str) -> tuple[str, str, str]:
  inputs, out = spec.replace(" ", "").split("->")
  lhs, rhs = inputs.split(",")
  return lhs, rhs, out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _einsum(spec, a, b, out_dtype):
  return jnp.einsum(spec, a, b, preferred_element_type=out_dtype)


def _einsum_fwd(spec, a, b, out_dtype):
  return _einsum(spec, a, b, out_dtype), (a, b)


def _einsum_bwd(spec, out_dtype, res, g):
  # Each operand's gradient is itself one einsum, written in the operand's own
  # axis order. JAX's generic dot_general transpose instead emits the product
  # in another order and transposes it, which on XLA:CPU makes it copy-transpose
  # the (larger) activation gradient before every weight-gradient matmul.
  lhs, rhs, out = _einsum_spec(spec)
  a, b = res
  da = jnp.einsum(f"{out},{rhs}->{lhs}", g, b, preferred_element_type=jnp.float32)
  db = jnp.einsum(f"{lhs},{out}->{rhs}", a, g, preferred_element_type=jnp.float32)
  return da.astype(a.dtype), db.astype(b.dtype)


_einsum.defvjp(_einsum_fwd, _einsum_bwd)


def einsum(spec: str, a: jax.Array, b: jax.Array, preferred_element_type=None) -> jax.Array:
  """jnp.einsum of two operands with a hand-written backward (see `_einsum_bwd`).

  The same math as jnp.einsum; the backward needs every index to appear in two
  of (lhs, rhs, out), which holds for projections and attention contractions;
  other specs fall back to jnp.einsum."""
  lhs, rhs, out = _einsum_spec(spec)
  if any(sum(c in t for t in (lhs, rhs, out)) < 2 for c in set(lhs + rhs)) or len(set(lhs)) != len(lhs) \
      or len(set(rhs)) != len(rhs):
    return jnp.einsum(spec, a, b, preferred_element_type=preferred_element_type)
  return _einsum(spec, a, b, preferred_element_type)


def dense(x: jax.Array, w: jax.Array, spec: str, dtype) -> jax.Array:
  """einsum in the compute dtype (weights are stored in param_dtype)."""
  return einsum(spec, x.astype(dtype), w.astype(dtype))


class SwiGLU(nnx.Module):
  """Llama MLP: W2 (silu(x W1) * x W3); W2 starts at zero like the MLRA code base."""

  def __init__(self, d_model: int, hidden: int, *, rngs: nnx.Rngs, dtype, param_dtype,
               init_std: float = 0.02, out_std: float = 0.0):
    self.w_gate = param(rngs, (d_model, hidden), ("embed", "mlp"), std=init_std, dtype=param_dtype)
    self.w_up = param(rngs, (d_model, hidden), ("embed", "mlp"), std=init_std, dtype=param_dtype)
    self.w_down = param(rngs, (hidden, d_model), ("mlp", "embed"), std=out_std, dtype=param_dtype)
    self.dtype = dtype

  def __call__(self, x):
    gate = dense(x, self.w_gate[...], "bsd,df->bsf", self.dtype)
    up = dense(x, self.w_up[...], "bsd,df->bsf", self.dtype)
    h = constrain(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"))
    return dense(h, self.w_down[...], "bsf,fd->bsd", self.dtype)


class GeluMLP(nnx.Module):
  """GPT-2 MLP: W_proj gelu(x W_fc), width 4d, no biases."""

  def __init__(self, d_model: int, hidden: int, *, rngs: nnx.Rngs, dtype, param_dtype,
               init_std: float = 0.02, out_std: float = 0.02):
    self.w_fc = param(rngs, (d_model, hidden), ("embed", "mlp"), std=init_std, dtype=param_dtype)
    self.w_proj = param(rngs, (hidden, d_model), ("mlp", "embed"), std=out_std, dtype=param_dtype)
    self.dtype = dtype

  def __call__(self, x):
    h = jax.nn.gelu(dense(x, self.w_fc[...], "bsd,df->bsf", self.dtype), approximate=True)
    h = constrain(h, ("batch", "length", "act_mlp"))
    return dense(h, self.w_proj[...], "bsf,fd->bsd", self.dtype)

