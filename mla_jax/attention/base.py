"""The one interface every attention variant implements.

A variant writes two methods:

* `cache_entries(x, positions)`: what it caches for these tokens, a dict of
  token-major `[batch, seq, *per_token_shape]` arrays named as in
  `Config.cache_spec()` (GQA: rotated keys and values; MLA: the normalised
  latent and the rotated rope key).
* `attend(x, positions, kv, kv_len)`: the queries of `x` over the entries `kv`
  (the sequence's own, or a whole cache): project the queries, map queries and
  entries onto `mla_jax.attention.core`, project the output. `kv_len` None means
  causal attention over the sequence's own entries (training, prefill); in
  decode it is the number of tokens each sequence has cached (see `core.mask`).

Everything else (the training forward, prefill into a fixed-shape cache, the
decode step with per-sequence lengths, cache allocation and accounting) is
shared here.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mla_jax.attention import core
from mla_jax.config import AttentionConfig, RunOptions
from mla_jax.rules import constrain

Cache = dict[str, jax.Array]


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
  """Base class: subclasses implement `cache_entries` and `attend`."""

  def __init__(self, config: AttentionConfig, *, d_model: int, rngs: nnx.Rngs,
               options: RunOptions = RunOptions(), param_dtype=jnp.float32, init_std: float = 0.02,
               out_std: float = 0.0):
    config.validate(d_model)
    self.config = config
    self.options = options
    self.backend = core.backend(options, config)
    self.d_model = d_model
    self.dtype = options.compute_dtype
    self.param_dtype = param_dtype
    self.init_std = init_std
    self.out_std = out_std

  # ------------------------------------------------------------- the variant's part
  def cache_entries(self, x: jax.Array, positions: jax.Array) -> Cache:
    raise NotImplementedError

  def attend(self, x: jax.Array, positions: jax.Array, kv: Cache, kv_len: jax.Array | None) -> jax.Array:
    raise NotImplementedError

  # ------------------------------------------------------------- shared
  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    """Training forward: causal attention over the sequence."""
    return self.attend(x, positions, self.cache_entries(x, positions), None)

  def cache_axes(self) -> dict[str, tuple[str | None, ...]]:
    return cache_axes(self.config)

  def prefill(self, x: jax.Array, positions: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
    """Forward over a (right-padded) prompt batch, writing its entries at slots [0, seq).

    Slots past a sequence's true length hold padding; the decode step overwrites
    them in order and never attends past its own position, so they are harmless.
    """
    kv = self.cache_entries(x, positions)
    y = self.attend(x, positions, kv, None)
    axes = self.cache_axes()
    new_cache = {}
    for name, entries in kv.items():
      buf = cache[name]
      new_cache[name] = constrain(
          jax.lax.dynamic_update_slice(buf, entries.astype(buf.dtype), (0,) * buf.ndim), axes[name])
    return y, new_cache

  def decode(self, x: jax.Array, cache: Cache, lengths: jax.Array) -> tuple[jax.Array, Cache]:
    """One new token per sequence. x: [batch, 1, d]; lengths[b]: tokens sequence b
    already has in the cache, i.e. the new token's position and cache slot."""
    positions = lengths[:, None]
    kv = self.cache_entries(x, positions)
    axes = self.cache_axes()
    rows = jnp.arange(x.shape[0])
    new_cache = {}
    for name, entries in kv.items():
      buf = cache[name]
      # A scatter into each sequence's own slot: touches one row, not the cache.
      new_cache[name] = constrain(
          buf.at[rows, lengths].set(entries[:, 0].astype(buf.dtype), mode="drop"), axes[name])
    # slots [0, lengths[b]] hold sequence b's tokens, the new one included
    return self.attend(x, positions, new_cache, lengths + 1), new_cache
