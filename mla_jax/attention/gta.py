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
import math

from mla_jax import quant
from mla_jax.attention import core
from mla_jax.attention.base import Attention
from mla_jax.authors_layout import Layout, linear
from mla_jax.config import AttentionConfig, check, option
from mla_jax.layers import dense, param, rope
from mla_jax.rules import constrain


@dataclasses.dataclass(frozen=True, kw_only=True)
class GTAConfig(AttentionConfig):
  num_kv_heads: int = option(2, "KV heads (one tied key/value state each).")
  head_dim: int = option(32, "Head width.")
  rope_head_dim: int | None = option(None, "Width d_r of the shared rope key (default head_dim / 2).",
                                     flag="gta_rope_head_dim")

  @property
  def rope_dim(self) -> int:
    return self.head_dim // 2 if self.rope_head_dim is None else self.rope_head_dim

  def validate(self, d_model=None):
    super().validate(d_model)
    h, kv = self.num_heads, self.num_kv_heads
    check(kv >= 1 and h % kv == 0, f"num_heads={h} is not divisible by num_kv_heads={kv}: "
          f"pick num_kv_heads from {[d for d in range(1, h + 1) if h % d == 0]}")
    check(0 < self.rope_dim < self.head_dim and self.rope_dim % 2 == 0,
          f"gta: rope_head_dim must be even and in (0, head_dim={self.head_dim}), got {self.rope_dim}")

  def cache_spec(self):
    return {"kv_state": ((self.num_kv_heads, self.head_dim), ("kv_heads", "head_dim")),
            "rope_key": ((self.rope_dim,), ("rope_dim",))}

  def partition_entries(self):
    return self.num_kv_heads

  def partition_entries_name(self):
    return "KV heads"


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
    rope_key = rope(dense(x, self.w_kr[...], "bsd,dr->bsr", self.dtype), positions, self.config)
    return {"kv_state": constrain(state, ("batch", "length", "kv_heads", "head_dim")),
            "rope_key": rope_key}

  def attend(self, x, positions, kv, kv_len):
    cfg = self.config
    n = cfg.head_dim - cfg.rope_dim
    q = dense(x, self.wq[...], "bsd,dhk->bshk", self.dtype)
    q = q.reshape(q.shape[:2] + (cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim))
    q = constrain(q, ("batch", "length", "kv_heads", "q_per_entry", "head_dim"))
    q_nope, q_pe = core.heads_major(q[..., :n]), core.heads_major(rope(q[..., n:], positions, cfg))
    state = core.heads_major(kv["kv_state"])                            # [B, h_kv, T, d_h]
    # K_j = [s_j[:n] | k_R] (its rope part scored separately, never concatenated), V_j = s_j
    y, _ = core.expanded(q_nope, quant.prefix(state, n), state, scale=1.0 / math.sqrt(cfg.head_dim), kv_len=kv_len,
                         q_rope=q_pe, rope_key=kv["rope_key"], backend=self.backend)
    y = core.token_major(y).reshape(x.shape[:2] + (cfg.num_heads, cfg.head_dim))
    return dense(y, self.wo[...], "bshk,hkd->bsd", self.dtype)

  # ---- the MLRA authors' checkpoints (their model/gta.py)
  @staticmethod
  def authors_config(shape, config_json, num_heads):
    rope_dim = shape("W_rope_k.weight")[0]
    head_dim = config_json.get("head_dim", 2 * rope_dim)          # their rope width is head_dim / 2
    return dict(num_heads=config_json.get("n_head", num_heads) or shape("c_q.weight")[0] // head_dim,
                head_dim=head_dim, num_kv_heads=shape("kv_proj.weight")[0] // head_dim, rope_head_dim=rope_dim)

  @staticmethod
  def authors_layout(cfg: GTAConfig, d: int) -> Layout:
    h, kv, dh, dr = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rope_dim
    tensors = {"c_q.weight": (h * dh, d), "kv_proj.weight": (kv * dh, d), "W_rope_k.weight": (dr, d),
               "c_proj.weight": (d, h * dh)}
    params = (linear("wq", "c_q.weight", d, h, dh), linear("w_kv", "kv_proj.weight", d, kv, dh),
              linear("w_kr", "W_rope_k.weight", d, dr), linear("wo", "c_proj.weight", h, dh, d))
    return Layout(tensors, params)
