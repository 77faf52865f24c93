"""The one interface every attention variant implements.

A variant writes three methods:

* `cache_entries(x, positions)`: what it caches for these tokens, a dict of
  `[batch, seq, *per_token_shape]` arrays named as in `Config.cache_spec()`
  (GQA: rotated keys and values; MLA: the normalised latent and the rotated
  rope key).
* `attend(x, positions, kv)`: causal attention of the sequence `x` over its own
  entries `kv` (training and prefill).
* `attend_cache(x, positions, cache, valid, decode_impl)`: one new token per
  sequence attending over a preallocated cache; `valid[b, t]` says which cache
  slots hold sequence b's tokens.

Everything else (the training forward, prefill into a fixed-shape cache, the
single-token decode step with per-sequence lengths, cache allocation and
accounting) is shared here.
"""
from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from mla_jax.config import AttentionConfig
from mla_jax.sharding import constrain

DECODE_IMPLS = ("naive", "absorbed")

Cache = dict[str, jax.Array]


def check_decode_impl(decode_impl: str) -> None:
  if decode_impl not in DECODE_IMPLS:
    raise ValueError(f"unknown decode_impl {decode_impl!r}; choose one of {', '.join(DECODE_IMPLS)}")


def cache_axes(config: AttentionConfig) -> dict[str, tuple[str | None, ...]]:
  """Logical axes of each cache array: [cache_batch, cache_length, *per-token axes]."""
  return {name: ("cache_batch", "cache_length") + tuple(axes)
          for name, (_, axes) in config.cache_spec().items()}


def init_cache(config: AttentionConfig, batch: int, max_len: int, dtype=jnp.float32) -> Cache:
  """A zero cache of fixed shape [batch, max_len, ...] per array (needs no weights)."""
  axes = cache_axes(config)
  return {name: constrain(jnp.zeros((batch, max_len) + tuple(shape), dtype), axes[name])
          for name, (shape, _) in config.cache_spec().items()}


class Attention(nnx.Module):
  """Base class: subclasses set `Config` and implement the three methods above."""

  Config: ClassVar[type[AttentionConfig]]

  def __init__(self, config: AttentionConfig, *, d_model: int, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32, init_std: float = 0.02,
               out_std: float = 0.0):
    config.validate(d_model)
    self.config = config
    self.d_model = d_model
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.init_std = init_std
    self.out_std = out_std

  # ------------------------------------------------------------- the variant's part
  def cache_entries(self, x: jax.Array, positions: jax.Array) -> Cache:
    raise NotImplementedError

  def attend(self, x: jax.Array, positions: jax.Array, kv: Cache) -> jax.Array:
    raise NotImplementedError

  def attend_cache(self, x: jax.Array, positions: jax.Array, cache: Cache, valid: jax.Array,
                   decode_impl: str) -> jax.Array:
    raise NotImplementedError

  # ------------------------------------------------------------- shared
  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    """Training forward: causal attention over the sequence."""
    return self.attend(x, positions, self.cache_entries(x, positions))

  def cache_axes(self) -> dict[str, tuple[str | None, ...]]:
    return cache_axes(self.config)

  def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> Cache:
    return init_cache(self.config, batch, max_len, dtype)

  def cache_elements_per_token(self) -> int:
    return self.config.cache_elements_per_token()

  def prefill(self, x: jax.Array, positions: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
    """Forward over a (right-padded) prompt batch, writing its entries at slots [0, seq).

    Slots past a sequence's true length hold padding; the decode step overwrites
    them in order and never attends past its own position, so they are harmless.
    """
    kv = self.cache_entries(x, positions)
    y = self.attend(x, positions, kv)
    axes = self.cache_axes()
    new_cache = {}
    for name, entries in kv.items():
      buf = cache[name]
      start = (0,) * buf.ndim
      new_cache[name] = constrain(
          jax.lax.dynamic_update_slice(buf, entries.astype(buf.dtype), start), axes[name])
    return y, new_cache

  def decode(self, x: jax.Array, cache: Cache, lengths: jax.Array,
             decode_impl: str = "absorbed") -> tuple[jax.Array, Cache]:
    """One new token per sequence. x: [batch, 1, d]; lengths[b]: tokens sequence b
    already has in the cache, i.e. the new token's position and cache slot."""
    check_decode_impl(decode_impl)
    batch = x.shape[0]
    positions = lengths[:, None]
    kv = self.cache_entries(x, positions)
    axes = self.cache_axes()
    rows = jnp.arange(batch)
    new_cache = {}
    for name, entries in kv.items():
      buf = cache[name]
      # A scatter into each sequence's own slot: touches one row, not the cache.
      new_cache[name] = constrain(
          buf.at[rows, lengths].set(entries[:, 0].astype(buf.dtype), mode="drop"), axes[name])
    max_len = next(iter(new_cache.values())).shape[1]
    valid = jnp.arange(max_len)[None, :] <= lengths[:, None]
    y = self.attend_cache(x, positions, new_cache, valid, decode_impl)
    return y, new_cache
