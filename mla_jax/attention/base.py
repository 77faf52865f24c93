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
shared here. `step` writes S new tokens per sequence into a dense cache or a
paged pool and attends over them: decode is its S = 1 case.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mla_jax.attention import core
from mla_jax.config import AttentionConfig, RunOptions
from mla_jax.paging import NULL_PAGE
from mla_jax.rules import constrain

Cache = dict[str, jax.Array]


def cache_axes(config: AttentionConfig) -> dict[str, tuple[str | None, ...]]:
  """Logical axes of each cache array: [cache_batch, cache_length, *per-token axes]."""
  return {name: ("cache_batch", "cache_length") + tuple(axes)
          for name, (_, axes) in config.cache_spec().items()}


def init_pages(config: AttentionConfig, num_pages: int, page_size: int, dtype=jnp.float32) -> Cache:
  """A zero page pool [num_pages, page_size, ...] per array (see `Attention.step`)."""
  return {name: jnp.zeros((num_pages, page_size) + tuple(shape), dtype)
          for name, (shape, _) in config.cache_spec().items()}


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

  def reads_pages(self) -> bool:
    """Whether `attend` takes a paged cache as `core.Paged` pools (a kernel reads
    them in place) rather than gathered into a dense view."""
    return False

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
    """One new token per sequence: `step` with x [batch, 1, d]."""
    return self.step(x, cache, lengths)

  def step(self, x: jax.Array, cache: Cache, lengths: jax.Array,
           pages: jax.Array | None = None) -> tuple[jax.Array, Cache]:
    """S new tokens per sequence, causal among themselves (decode: S = 1; a
    prefill chunk or a speculative draft: S > 1). x: [batch, S, d]; lengths[b]:
    tokens sequence b already has cached, so its new ones take positions
    lengths[b] + [0, S).

    `cache` holds dense [batch, max_len, ...] arrays, or with `pages` (an int32
    [batch, width] page table, see mla_jax.paging) pools [num_pages, page_size,
    ...]: token t of row b lives at pool[pages[b, t // page_size], t %
    page_size]. Positions past a row's table land in the null page."""
    positions = lengths[:, None] + jnp.arange(x.shape[1], dtype=lengths.dtype)
    kv = self.cache_entries(x, positions)
    axes = self.cache_axes()
    new_cache, view = {}, {}
    for name, entries in kv.items():
      buf = cache[name]
      entries = entries.astype(buf.dtype)
      if pages is None:
        # A scatter into each sequence's own slots: touches S rows, not the cache.
        buf = buf.at[jnp.arange(x.shape[0])[:, None], positions].set(entries, mode="drop")
        new_cache[name] = view[name] = constrain(buf, axes[name])
      else:
        page_size = buf.shape[1]
        page = jnp.take_along_axis(pages, positions // page_size, axis=1, mode="fill", fill_value=NULL_PAGE)
        buf = buf.at[page, positions % page_size].set(entries)
        new_cache[name] = constrain(buf, (None, None) + axes[name][2:])
        if self.reads_pages():        # a kernel reads the pools through the table
          view[name] = core.Paged(new_cache[name], pages)
        else:                         # XLA reads the table's pages gathered: the table's width bounds the work
          view[name] = constrain(core.Paged(buf, pages).dense(), axes[name])
    # slots [0, lengths[b] + S) hold sequence b's tokens, the new ones included
    return self.attend(x, positions, view, lengths + x.shape[1]), new_cache
