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

from mla_jax import quant, rules
from mla_jax.attention import core
from mla_jax.config import AttentionConfig, RunOptions
from mla_jax.paging import NULL_PAGE
from mla_jax.rules import constrain

Cache = dict[str, jax.Array]

# A page pool's leading axes: any page serves any sequence (no batch axis); each
# page's slots split over `context` like a dense cache's tokens.
POOL_AXES = (None, "cache_length")


def cache_layout(config: AttentionConfig, fmt="float32") -> dict[str, quant.Stored]:
  """Every cache array of `config` stored in the cache format `fmt` (a name, a
  dtype or a `quant.Format`), the scales of quantized arrays included."""
  return quant.layout(config.cache_spec(), quant.cache_format(fmt), config.variant)


def cache_axes(config: AttentionConfig, fmt="float32") -> dict[str, tuple[str | None, ...]]:
  """Logical axes of each cache array: [cache_batch, cache_length, *per-token axes]."""
  return {name: ("cache_batch", "cache_length") + s.axes for name, s in cache_layout(config, fmt).items()}


def init_pages(config: AttentionConfig, num_pages: int, page_size: int, fmt="float32") -> Cache:
  """A zero page pool [num_pages, page_size, ...] per array (see `Attention.step`)."""
  return {name: jnp.zeros((num_pages, page_size) + s.shape, s.dtype) for name, s in cache_layout(config, fmt).items()}


def init_cache(config: AttentionConfig, batch: int, max_len: int, fmt="float32") -> Cache:
  """A zero cache of fixed shape [batch, max_len, ...] per array (needs no weights)."""
  axes = cache_axes(config, fmt)
  return {name: constrain(jnp.zeros((batch, max_len) + s.shape, s.dtype), axes[name])
          for name, s in cache_layout(config, fmt).items()}


def stored(entries: Cache, cache: Cache) -> Cache:
  """New cache entries as `cache` stores them: cast, or quantized with their
  scales where the cache holds NAME + quant.SCALE beside NAME."""
  out = {}
  for name, x in entries.items():
    scales = cache.get(name + quant.SCALE)
    if scales is None:
      out[name] = x.astype(cache[name].dtype)
    else:
      fmt = quant.cache_format(cache[name].dtype)
      out[name], out[name + quant.SCALE] = quant.quantize(x, fmt, x.shape[-1] // scales.shape[-1])
  return out


def as_read(view: Cache) -> Cache:
  """Cache arrays as `attend` takes them: each quantized one and its scales as one `quant.Quantized`."""
  out = {}
  for name, x in view.items():
    if name.endswith(quant.SCALE):
      continue
    scales = view.get(name + quant.SCALE)
    if scales is None:
      out[name] = x
    else:
      width, tiles = (a.pool.shape[-1] if isinstance(a, core.Paged) else a.shape[-1] for a in (x, scales))
      out[name] = quant.Quantized(x, scales, width // tiles)
  return out


class Attention(nnx.Module):
  """Base class: subclasses implement `cache_entries` and `attend`."""

  def __init__(self, config: AttentionConfig, *, d_model: int, rngs: nnx.Rngs,
               options: RunOptions = RunOptions(), param_dtype=jnp.float32, init_std: float = 0.02,
               out_std: float = 0.0, norm_eps: float = 1e-6):
    config.validate(d_model)
    cache_layout(config, options.cache_format)      # a format the variant cannot hold: one line, here
    self.config = config
    self.options = options
    self.backend = core.backend(options, config)
    self.d_model = d_model
    self.dtype = options.compute_dtype
    self.param_dtype = param_dtype
    self.init_std = init_std
    self.out_std = out_std
    self.norm_eps = norm_eps          # of the RMSNorms inside attention (latents, query latents, q/k norms)

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

  def cache_axes(self, cache: Cache | None = None) -> dict[str, tuple[str | None, ...]]:
    """Logical axes of the arrays of `cache` (default: those the run options' format stores)."""
    if cache is None:
      return cache_axes(self.config, self.options.cache_format)
    axes = cache_axes(self.config)
    return {name: axes[name] if name in axes else quant.scale_axes(axes[name[:-len(quant.SCALE)]]) for name in cache}

  def prefill(self, x: jax.Array, positions: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
    """Forward over a (right-padded) prompt batch, writing its entries at slots [0, seq).

    Slots past a sequence's true length hold padding; the decode step overwrites
    them in order and never attends past its own position, so they are harmless.
    The prompt attends to its entries as the cache holds them (quantized ones
    dequantized), so its logits and the next decode step see the same keys.
    """
    kv = self.cache_entries(x, positions)
    new = stored(kv, cache)
    if any(name.endswith(quant.SCALE) for name in new):
      kv = {name: quant.dequantized(a, self.dtype) for name, a in as_read(new).items()}
    y = self.attend(x, positions, kv, None)
    axes = self.cache_axes(cache)
    new_cache = {}
    for name, entries in new.items():
      buf = cache[name]
      new_cache[name] = constrain(jax.lax.dynamic_update_slice(buf, entries, (0,) * buf.ndim), axes[name])
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
    page_size]. Positions past a row's table land in the null page. A quantized
    cache (NAME beside NAME + quant.SCALE) is written quantized and read by the
    core as stored."""
    positions = lengths[:, None] + jnp.arange(x.shape[1], dtype=lengths.dtype)
    new = stored(self.cache_entries(x, positions), cache)
    axes = self.cache_axes(cache)
    new_cache, view = {}, {}
    kv_len = lengths + x.shape[1]     # slots [0, lengths[b] + S) hold sequence b's tokens, the new ones included
    ways = rules.mesh_axis_size("context")   # the devices splitting each sequence's tokens (see core.over_keys)
    for name, entries in new.items():
      buf = cache[name]
      if pages is None:
        # A scatter into each sequence's own slots: touches S rows, not the cache.
        buf = buf.at[jnp.arange(x.shape[0])[:, None], positions].set(entries, mode="drop")
        new_cache[name] = view[name] = constrain(buf, axes[name])
      else:
        page_size = buf.shape[1]
        page = jnp.take_along_axis(pages, positions // page_size, axis=1, mode="fill", fill_value=NULL_PAGE)
        buf = buf.at[page, positions % page_size].set(entries)
        new_cache[name] = constrain(buf, POOL_AXES + axes[name][2:])
        if self.reads_pages():        # a kernel reads the pools through the table
          view[name] = core.Paged(new_cache[name], pages)
        else:                         # XLA reads the table's pages gathered: the table's width bounds the work
          view[name] = constrain(core.Paged(buf, pages).dense(ways), axes[name])
          if ways > 1:                # whose slots are device-major, not in token order
            kv_len = core.Slots(lengths + x.shape[1], core.Paged(buf, pages).slot_tokens(ways))
    return self.attend(x, positions, as_read(view), kv_len), new_cache
