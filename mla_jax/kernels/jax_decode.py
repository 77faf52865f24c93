"""GQA / MQA decoding through JAX's own Pallas GPU decode ops
(`jax.experimental.pallas.ops.gpu.decode_attention`), not a kernel of ours.

Those ops cut the cache into `k_splits` equal chunks of whole `block_k` tiles,
so the cache length must split that way; `plan` picks the split or says why it
cannot.
"""
from __future__ import annotations

import jax.numpy as jnp


def _is_pow2(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def plan(seq_len: int, head_dim: int) -> tuple[tuple[int, int] | None, str | None]:
  """((k_splits, block_k), None), or (None, why the op cannot take this cache)."""
  if not _is_pow2(head_dim) or head_dim < 16:
    return None, f"head width {head_dim} is not a power of 2 >= 16"
  for k_splits in (16, 8, 4, 2, 1):
    if seq_len % k_splits or seq_len // k_splits < 16:
      continue
    for block_k in (128, 64, 32, 16):
      if (seq_len // k_splits) % block_k == 0:
        return (k_splits, block_k), None
  return None, f"a cache of {seq_len} slots does not split into 16-token tiles (use a multiple of 16)"


def _ops():
  from jax.experimental.pallas.ops.gpu import decode_attention
  return decode_attention


def _lse(residuals):
  """The ops' residuals are the softmax denominator l and the running max m of the scaled scores."""
  l, m = residuals
  return m + jnp.log(l)


def gqa(q, k, v, kv_len, *, scale: float, interpret: bool):
  """q [B, Hq, D], k and v [B, T, Hkv, D], kv_len [B] -> ([B, Hq, D], lse [B, Hq])."""
  (k_splits, block_k), _ = plan(k.shape[1], k.shape[-1])
  out, residuals = _ops().gqa(q, k.astype(q.dtype), v.astype(q.dtype), kv_seq_len=kv_len, sm_scale=scale,
                              k_splits=k_splits, block_k=block_k, interpret=interpret, return_residuals=True)
  return out, _lse(residuals)


def mqa(q, k, v, kv_len, *, scale: float, interpret: bool):
  """q [B, H, D], k and v [B, T, D], kv_len [B] -> ([B, H, D], lse [B, H])."""
  (k_splits, block_k), _ = plan(k.shape[1], k.shape[-1])
  out, residuals = _ops().mqa(q, k.astype(q.dtype), v.astype(q.dtype), kv_seq_len=kv_len, sm_scale=scale,
                              k_splits=k_splits, block_k=block_k, interpret=interpret, return_residuals=True)
  return out, _lse(residuals)
