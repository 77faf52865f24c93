"""Split-K flash decoding over a latent cache: a Pallas GPU (Triton) kernel.

One kernel serves the whole latent family. The cache holds, per token, NB
latent blocks of width L and one rope key of width R; each block is attended
by its own HB query heads with one softmax per (block, head):

    s_t = (q_lat . c_t + q_rope . r_t) * scale      context = sum_t softmax(s)_t c_t

MLA is NB = 1 (L = 512 at DeepSeek's size), GLA-G is NB = G latent heads with
their head groups, MLRA is NB = 4 blocks (the caller sums blocks outside the
softmax). The value is the latent itself: the kernel returns the [B, NB, HB, L]
context and the log-sum-exp of every row.

Split-K: the sequence is cut into `k_splits` chunks processed by separate
programs; each writes an unnormalised partial context with its running max m
and sum l, and `_combine` merges them exactly through their log-sum-exps.

Triton wants power-of-2 shapes for everything it loads, which 576 = 512 + 64
and 24 heads are not. So the latent and the rope key are separate operands
(two dots, never a 576-wide tile), heads are padded up to a multiple of
`block_h` (>= 16, the smallest Triton dot), and the sequence is read in
`block_k` tiles with masked loads past its end. Block sizes are chosen to fit a
shared-memory budget per program (`SMEM_BUDGET`, below Hopper's 228 KB per SM).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from mla_jax import compat

SMEM_BUDGET = 192 * 1024   # bytes per program: key tiles for NUM_STAGES stages plus the query tile
NUM_STAGES = 2


def _is_pow2(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def unsupported(latent_dim: int, rope_dim: int) -> str | None:
  """Why the Triton kernel cannot take these widths (None when it can)."""
  if not _is_pow2(latent_dim) or latent_dim < 16:
    return f"latent block width {latent_dim} is not a power of 2 >= 16"
  if rope_dim and (not _is_pow2(rope_dim) or rope_dim < 16):
    return f"rope width {rope_dim} is not a power of 2 >= 16"
  return None


def choose_block_k(latent_dim: int, rope_dim: int, itemsize: int, block_h: int) -> int:
  """The largest key tile (64, 32 or 16 tokens) whose pipelined tiles fit SMEM_BUDGET."""
  for block_k in (64, 32, 16):
    tiles = NUM_STAGES * block_k * (latent_dim + rope_dim) * itemsize
    query = block_h * (latent_dim + rope_dim) * itemsize
    if tiles + query <= SMEM_BUDGET:
      return block_k
  return 16


def _kernel(len_ref, ql_ref, qr_ref, lat_ref, rope_ref, o_ref, m_ref, l_ref, *,
            scale: float, block_k: int, split_len: int, seq_len: int):
  """One program: `block_h` heads of one block of one sequence, one split of its keys."""
  gpu = compat.pallas_gpu()
  split = pl.program_id(3)
  kv_len = len_ref[0]
  start = split * split_len
  stop = jnp.minimum(start + split_len, kv_len)
  q_lat = ql_ref[...]
  q_rope = None if qr_ref is None else qr_ref[...]
  block_h = q_lat.shape[0]
  offsets = jnp.arange(block_k)

  def body(i, carry):
    acc, m_prev, l_prev = carry
    first = start + i * block_k
    pos = first + offsets
    in_cache = (pos < seq_len)[:, None]
    latent = gpu.load(lat_ref.at[pl.ds(first, block_k), :], mask=in_cache, other=0.0)
    scores = gpu.dot(q_lat, latent, trans_b=True, allow_tf32=False)                    # [block_h, block_k]
    if q_rope is not None:
      rope_key = gpu.load(rope_ref.at[pl.ds(first, block_k), :], mask=in_cache, other=0.0)
      scores += gpu.dot(q_rope, rope_key, trans_b=True, allow_tf32=False)
    scores = scores.astype(jnp.float32) * scale
    scores = jnp.where((pos < stop)[None, :], scores, -jnp.inf)
    m_next = jnp.maximum(m_prev, scores.max(axis=-1))
    # a row that has seen only masked keys keeps m = -inf; exp(-inf - -inf) must not be NaN
    safe_m = jnp.where(m_next == -jnp.inf, 0.0, m_next)
    correction = jnp.exp(m_prev - safe_m)
    p = jnp.exp(scores - safe_m[:, None])
    l_next = correction * l_prev + p.sum(axis=-1)
    acc = correction[:, None] * acc + gpu.dot(p.astype(latent.dtype), latent, allow_tf32=False)
    return acc, m_next, l_next

  n_blocks = jnp.maximum(pl.cdiv(stop - start, block_k), 0)
  init = (jnp.zeros((block_h, q_lat.shape[1]), jnp.float32),
          jnp.full((block_h,), -jnp.inf, jnp.float32), jnp.zeros((block_h,), jnp.float32))
  acc, m, l = lax.fori_loop(0, n_blocks, body, init)
  o_ref[...] = acc.astype(o_ref.dtype)
  m_ref[...] = m
  l_ref[...] = l


def _combine(o, m, l):
  """Merge split-K partials exactly: o [S, ...heads, L] unnormalised, m and l [S, ...heads]."""
  m_all = m.max(axis=0)
  safe = jnp.where(m_all == -jnp.inf, 0.0, m_all)
  weight = jnp.exp(m - safe[None])                       # 0 for splits that saw no key
  denom = (weight * l).sum(axis=0)
  context = (weight[..., None] * o.astype(jnp.float32)).sum(axis=0) / jnp.maximum(denom, 1e-30)[..., None]
  lse = safe + jnp.log(jnp.maximum(denom, 1e-30))
  return context, lse


@functools.partial(jax.jit, static_argnames=("scale", "k_splits", "block_h", "block_k", "interpret",
                                             "return_partials", "num_warps"))
def latent_decode(q_latent, q_rope, latent, rope, kv_len, *, scale: float, k_splits: int = 4,
                  block_h: int = 16, block_k: int | None = None, interpret: bool = False,
                  return_partials: bool = False, num_warps: int = 4):
  """Decode attention of one new token per sequence over a latent cache.

  q_latent [B, NB, HB, L], q_rope [B, NB, HB, R] or None, latent [B, T, NB, L],
  rope [B, T, R] or None, kv_len [B] (keys t < kv_len[b] are valid).
  Returns context [B, NB, HB, L] (float32) and lse [B, NB, HB]; with
  `return_partials`, also the per-split (o, m, l) before combining.
  """
  batch, nb, heads, width = q_latent.shape
  seq_len = latent.shape[1]
  rope_dim = 0 if rope is None else rope.shape[-1]
  why = unsupported(width, rope_dim)
  if why:
    raise ValueError(f"the Pallas latent-decode kernel cannot run this shape: {why}; use the XLA "
                     "absorbed path (decode_impl='absorbed')")
  if block_k is None:
    block_k = choose_block_k(width, rope_dim, latent.dtype.itemsize, block_h)
  padded = pl.cdiv(heads, block_h) * block_h              # heads padded to whole tiles
  if padded != heads:
    pad = [(0, 0), (0, 0), (0, padded - heads), (0, 0)]
    q_latent = jnp.pad(q_latent, pad)
    q_rope = None if q_rope is None else jnp.pad(q_rope, pad)
  split_len = pl.cdiv(pl.cdiv(seq_len, k_splits), block_k) * block_k
  grid = (batch, nb, padded // block_h, k_splits)
  q_spec = lambda w: pl.BlockSpec((None, None, block_h, w), lambda b, n, h, s: (b, n, h, 0))  # noqa: E731
  in_specs = [
      pl.BlockSpec((1,), lambda b, n, h, s: (b,)),                                   # kv_len
      q_spec(width),
      None if q_rope is None else q_spec(rope_dim),
      pl.BlockSpec((None, seq_len, None, width), lambda b, n, h, s: (b, 0, n, 0)),   # this block's latents
      None if rope is None else pl.BlockSpec((None, seq_len, rope_dim), lambda b, n, h, s: (b, 0, 0)),
  ]
  part = (k_splits, batch, nb, padded)
  out_specs = [pl.BlockSpec((None, None, None, block_h, width), lambda b, n, h, s: (s, b, n, h, 0)),
               pl.BlockSpec((None, None, None, block_h), lambda b, n, h, s: (s, b, n, h)),
               pl.BlockSpec((None, None, None, block_h), lambda b, n, h, s: (s, b, n, h))]
  out_shape = [jax.ShapeDtypeStruct(part + (width,), jnp.float32),
               jax.ShapeDtypeStruct(part, jnp.float32), jax.ShapeDtypeStruct(part, jnp.float32)]
  kernel = functools.partial(_kernel, scale=scale, block_k=block_k, split_len=split_len, seq_len=seq_len)
  o, m, l = pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=compat.pallas_gpu_params(num_warps=num_warps, num_stages=NUM_STAGES),
      interpret=interpret, name="latent_decode",
  )(kv_len.astype(jnp.int32), q_latent, q_rope, latent, rope)
  o, m, l = o[..., :heads, :], m[..., :heads], l[..., :heads]
  context, lse = _combine(o, m, l)
  if return_partials:
    return context, lse, (o, m, l)
  return context, lse


def reference(q_latent, q_rope, latent, rope, kv_len, *, scale: float):
  """The same attention in plain jnp (for tests and as a fallback)."""
  s = jnp.einsum("bnhl,btnl->bnht", q_latent.astype(jnp.float32), latent.astype(jnp.float32))
  if rope is not None:
    s += jnp.einsum("bnhr,btr->bnht", q_rope.astype(jnp.float32), rope.astype(jnp.float32))
  s = s * scale
  valid = jnp.arange(latent.shape[1])[None, :] < kv_len[:, None]
  s = jnp.where(valid[:, None, None, :], s, -jnp.inf)
  lse = jax.nn.logsumexp(s, axis=-1)
  p = jnp.exp(s - lse[..., None])
  return jnp.einsum("bnht,btnl->bnhl", p, latent.astype(jnp.float32)), lse


