"""GTA: grouped-tied attention (arXiv 2505.21487).

One tied state per KV head serves as both key and value, and one half-width
rope key is shared by all heads:
    s_j = x W_KV,j                  (width d_h, h_kv heads)
    k_R = RoPE(x W_KR)              (width d_r = d_h / 2, shared)
    K_j = [s_j[:d_h - d_r] | k_R]   V_j = s_j
    q_i = [q_i[:d_h - d_r] | RoPE(q_i[d_h - d_r:])]
    head i reads KV head j = i // (h / h_kv); scale 1 / sqrt(d_h)

Cache per token: h_kv d_h + d_r (832 at the MLRA paper's config, 6 KV heads).
Under TP the tied states split with their KV heads; the rope key is replicated.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from mla_jax.attention.base import Attention, causal_dpa, resolve_impl
from mla_jax.config import AttentionConfig, _check, register
from mla_jax.layers import dense, masked_softmax, param, rope
from mla_jax.sharding import constrain


@dataclasses.dataclass(frozen=True, kw_only=True)
class GTAConfig(AttentionConfig):
  num_kv_heads: int
  head_dim: int
  rope_head_dim: int | None = None   # d_r; defaults to head_dim / 2

  VARIANTS = ("gta",)

  @property
  def rope_dim(self) -> int:
    return self.head_dim // 2 if self.rope_head_dim is None else self.rope_head_dim

  def validate(self, d_model=None):
    super().validate(d_model)
    h, kv = self.num_heads, self.num_kv_heads
    _check(kv >= 1 and h % kv == 0, f"num_heads={h} is not divisible by num_kv_heads={kv}: "
           f"pick num_kv_heads from {[d for d in range(1, h + 1) if h % d == 0]}")
    _check(0 < self.rope_dim < self.head_dim and self.rope_dim % 2 == 0,
           f"gta: rope_head_dim must be even and in (0, head_dim={self.head_dim}), got {self.rope_dim}")

  def cache_spec(self):
    return {"kv_state": ((self.num_kv_heads, self.head_dim), ("kv_heads", "head_dim")),
            "rope_key": ((self.rope_dim,), ("rope_dim",))}

  def partition_entries(self):
    return self.num_kv_heads

  def partition_entries_name(self):
    return "KV heads"


@register("gta")
class GTA(Attention):
  Config = GTAConfig

  def __init__(self, config: GTAConfig, **kw):
    super().__init__(config, **kw)
    rngs, d, h, kv, dh = kw["rngs"], self.d_model, config.num_heads, config.num_kv_heads, config.head_dim
    p = dict(std=self.init_std, dtype=self.param_dtype)
    self.wq = param(rngs, (d, h, dh), ("embed", "q_heads", "head_dim"), **p)
    self.w_kv = param(rngs, (d, kv, dh), ("embed", "kv_heads", "head_dim"), **p)
    self.w_kr = param(rngs, (d, config.rope_dim), ("embed", "rope_dim"), **p)
    self.wo = param(rngs, (h, dh, d), ("q_heads", "head_dim", "embed"), std=self.out_std,
                    dtype=self.param_dtype)

  def cache_entries(self, x, positions):
    state = dense(x, self.w_kv[...], "bsd,dhk->bshk", self.dtype)
    rope_key = rope(dense(x, self.w_kr[...], "bsd,dr->bsr", self.dtype), positions, self.config.rope_theta)
    return {"kv_state": constrain(state, ("batch", "length", "kv_heads", "head_dim")),
            "rope_key": rope_key}

  def attend(self, x, positions, kv, mask, impl="naive"):
    if impl in ("pallas", "auto"):
      impl = resolve_impl(impl, f"no Pallas decode kernel for {self.config.variant} yet")
    # The cache already is the tied state: 'naive' and 'absorbed' coincide.
    cfg = self.config
    n = cfg.head_dim - cfg.rope_dim
    q = dense(x, self.wq[...], "bsd,dhk->bshk", self.dtype)
    q = q.reshape(q.shape[:2] + (cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim))
    q = constrain(q, ("batch", "length", "kv_heads", "q_per_entry", "head_dim"))
    q_nope, q_pe = q[..., :n], rope(q[..., n:], positions, cfg.rope_theta)
    state = kv["kv_state"].astype(self.dtype)
    # K_j = [s_j[:n] | k_R]: score = q_nope . s_j[:n] + q_pe . k_R, never concatenated
    scores = (jnp.einsum("bskgn,btkn->bkgst", q_nope, state[..., :n], preferred_element_type=jnp.float32)
              + jnp.einsum("bskgr,btr->bkgst", q_pe, kv["rope_key"].astype(self.dtype),
                           preferred_element_type=jnp.float32)) / jnp.sqrt(cfg.head_dim)
    probs = masked_softmax(scores, mask[:, None, None]).astype(state.dtype)
    y = jnp.einsum("bkgst,btkd->bskgd", probs, state)                 # V_j = s_j
    y = y.reshape(y.shape[:2] + (cfg.num_heads, cfg.head_dim))
    return dense(y, self.wo[...], "bshk,hkd->bsd", self.dtype)

  def attend_dpa(self, x, positions, kv):
    cfg = self.config
    n = cfg.head_dim - cfg.rope_dim
    q = dense(x, self.wq[...], "bsd,dhk->bshk", self.dtype)
    q = jnp.concatenate([q[..., :n], rope(q[..., n:], positions, cfg.rope_theta)], -1)
    state = kv["kv_state"].astype(self.dtype)
    rope_key = jnp.broadcast_to(kv["rope_key"].astype(self.dtype)[:, :, None], state.shape[:3] + (cfg.rope_dim,))
    k = jnp.concatenate([state[..., :n], rope_key], -1)               # K_j = [s_j[:n] | k_R]
    y = causal_dpa(q, k, state)                                        # V_j = s_j
    return dense(y, self.wo[...], "bshk,hkd->bsd", self.dtype)
