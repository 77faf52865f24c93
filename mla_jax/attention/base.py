"""The one interface every attention variant implements.

A variant writes two methods:

* `cache_entries(x, positions)`: what it caches for these tokens, a dict of
  `[batch, seq, *per_token_shape]` arrays named as in `Config.cache_spec()`
  (GQA: rotated keys and values; MLA: the normalised latent and the rotated
  rope key).
* `attend(x, positions, kv, mask, impl)`: the queries of `x` attending over the
  entries `kv` (a sequence's own, or a whole cache); `mask[b, s, t]` (batch may
  be 1) says which keys query s may see. `impl` is 'naive' (per-head keys and
  values, the form training uses) or 'absorbed' (the latent family's decode
  form; variants with nothing to absorb treat both alike).

Everything else (the causal training forward, prefill into a fixed-shape cache,
the single-token decode step with per-sequence lengths, cache allocation and
accounting) is shared here.
"""
from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from mla_jax import compat
from mla_jax.config import AttentionConfig
from mla_jax.sharding import constrain

DECODE_IMPLS = ("naive", "absorbed", "pallas", "auto")

Cache = dict[str, jax.Array]


def check_decode_impl(decode_impl: str) -> None:
  if decode_impl not in DECODE_IMPLS:
    raise ValueError(f"unknown decode_impl {decode_impl!r}; choose one of {', '.join(DECODE_IMPLS)}")


def resolve_impl(decode_impl: str, kernel_unsupported: str | None) -> str:
  """'auto' -> the Pallas kernel on a GPU when the shapes allow it, the XLA
  absorbed path otherwise; 'pallas' where the kernel cannot run is an error."""
  if decode_impl == "auto":
    return "pallas" if compat.on_gpu() and kernel_unsupported is None else "absorbed"
  if decode_impl == "pallas" and kernel_unsupported is not None:
    raise ValueError(f"decode_impl='pallas' cannot run here: {kernel_unsupported}; use 'auto' "
                     "(falls back to XLA) or 'absorbed'")
  return decode_impl


def causal_dpa(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """q [B, S, N, H], k and v [B, T, K, H] (N a multiple of K; query head n reads
  key head n // (N / K)) -> [B, S, N, H]; scale 1 / sqrt(H)."""
  return jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), is_causal=True)


def causal_mask(q_len: int, k_len: int) -> jax.Array:
  """[1, q_len, k_len] for the last q_len of k_len positions: query s sees keys t <= s."""
  return (jnp.arange(q_len)[:, None] + (k_len - q_len) >= jnp.arange(k_len)[None, :])[None]


def query_blocks(seq: int, chunks: int) -> list[tuple[int, int]]:
  """[lo, hi) bounds of `chunks` near-equal query blocks covering [0, seq).
  chunks 0: one block per 64 queries, at most 4 (smaller blocks save little of
  the masked work and cost more, smaller ops; and compile time)."""
  if chunks == 0:
    chunks = min(4, seq // 64)
  chunks = max(1, min(chunks, seq))
  bounds = [round(i * seq / chunks) for i in range(chunks + 1)]
  return list(zip(bounds[:-1], bounds[1:]))


class QueryBlocks:
  """Causal attention in query blocks: queries [lo, hi) attend to keys [0, hi)
  only, so the score blocks above the diagonal (about (n - 1) / 2n of them) are
  never computed, in the forward or the backward.

  Arrays are cut with split / concatenate rather than sliced: the gradient of
  a slice is a zero-padded full-length array per block, that of a split is a
  concatenation."""

  def __init__(self, seq: int, chunks: int):
    self.bounds = query_blocks(seq, chunks)

  def _parts(self, a, axis):
    return jnp.split(a, [hi for _, hi in self.bounds[:-1]], axis=axis) if len(self.bounds) > 1 else [a]

  def queries(self, a: jax.Array, axis: int) -> list[jax.Array]:
    """Each block's own positions along `axis`."""
    return self._parts(a, axis)

  def keys(self, a: jax.Array, axis: int) -> list[jax.Array]:
    """Each block's visible prefix along `axis`: [0, hi) (the last block sees all of `a`)."""
    parts = self._parts(a, axis)
    return [parts[0] if i == 0 else jnp.concatenate(parts[:i + 1], axis=axis)
            for i in range(len(parts) - 1)] + [a]

  def masks(self) -> list[jax.Array]:
    return [causal_mask(hi - lo, hi) for lo, hi in self.bounds]

  @staticmethod
  def join(outs: list[jax.Array], axis: int) -> jax.Array:
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=axis)


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
               out_std: float = 0.0, attention_impl: str = "einsum", causal_chunks: int = 0):
    config.validate(d_model)
    self.config = config
    self.attention_impl = attention_impl
    self.causal_chunks = causal_chunks
    self.d_model = d_model
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.init_std = init_std
    self.out_std = out_std

  # ------------------------------------------------------------- the variant's part
  def cache_entries(self, x: jax.Array, positions: jax.Array) -> Cache:
    raise NotImplementedError

  def attend(self, x: jax.Array, positions: jax.Array, kv: Cache, mask: jax.Array,
             impl: str = "naive") -> jax.Array:
    raise NotImplementedError

  def attend_dpa(self, x: jax.Array, positions: jax.Array, kv: Cache) -> jax.Array:
    """Causal attention through jax.nn.dot_product_attention (cuDNN on GPUs);
    variants whose shapes allow it override this."""
    raise NotImplementedError(f"{self.config.variant} has no dot_product_attention path")

  # ------------------------------------------------------------- shared
  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    """Training forward: causal attention over the sequence."""
    return self._causal(x, positions, self.cache_entries(x, positions))

  def training_impl(self) -> str:
    """How the training forward and prefill attend ('naive' or 'absorbed');
    the latent family picks whichever costs fewer FLOPs per query-key pair."""
    return "naive"

  def _causal(self, x, positions, kv):
    """Causal attention of x over its own entries, `causal_chunks` query blocks
    at a time (see `QueryBlocks`). Generic form: each block calls `attend` on
    the key prefix it can see; GQA and the latent family override this to
    project once for all blocks."""
    if self.attention_impl == "dpa":
      return self.attend_dpa(x, positions, kv)
    impl = self.training_impl()
    blocks = QueryBlocks(x.shape[1], self.causal_chunks)
    seen = {name: blocks.keys(entries, axis=1) for name, entries in kv.items()}
    outs = [self.attend(x_b, pos_b, {name: seen[name][i] for name in kv}, mask, impl)
            for i, (x_b, pos_b, mask) in enumerate(zip(blocks.queries(x, 1), blocks.queries(positions, 1),
                                                      blocks.masks()))]
    return blocks.join(outs, axis=1)

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
    y = self._causal(x, positions, kv)
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
    # slots [0, lengths[b]] hold sequence b's tokens, the new one included
    mask = (jnp.arange(max_len)[None, :] <= lengths[:, None])[:, None, :]
    y = self.attend(x, positions, new_cache, mask, decode_impl)
    return y, new_cache
