"""MHA, MQA and GQA: one module, the number of KV heads is the only difference.

    q_i = RoPE(x W_Q,i)   k_j = RoPE(x W_K,j)   v_j = x W_V,j
    head i reads KV head j = i // (h / h_kv)        (contiguous groups)
    y = sum_i softmax(q_i k_j^T / sqrt(d_h)) v_j W_O,i

Cache per token: 2 h_kv d_h (keys after RoPE, values). MHA: h_kv = h; MQA: h_kv = 1
(the registry pins these). Under tensor parallelism the KV heads split across
`tensor`; query heads follow their KV head (`q_heads` maps to tensor x
tensor_rep, KV-major).
"""
from __future__ import annotations

import dataclasses
import math

import jax

from mla_jax.attention import core
from mla_jax.attention.base import Attention
from mla_jax.authors_layout import Layout, linear
from mla_jax.config import AttentionConfig, check, option
from mla_jax.layers import dense, param, rope
from mla_jax.rules import constrain


@dataclasses.dataclass(frozen=True, kw_only=True)
class GQAConfig(AttentionConfig):
  num_kv_heads: int | None = option(2, "KV heads (None: one per query head).")
  head_dim: int = option(32, "Head width.")
  rope: bool = option(True, "RoPE on queries and keys (False: positions from the GPT-2 flavour's table).",
                      flag="mha_rope")
  gated: bool = option(False, "Output gate sigmoid(x W_g) before the output projection.")

  def __post_init__(self):
    if self.num_kv_heads is None:
      object.__setattr__(self, "num_kv_heads", self.num_heads)
    super().__post_init__()

  def validate(self, d_model=None):
    super().validate(d_model)
    h, kv = self.num_heads, self.num_kv_heads
    check(kv >= 1, f"num_kv_heads must be >= 1, got {kv}")
    check(h % kv == 0, f"num_heads={h} is not divisible by num_kv_heads={kv}: "
          f"pick num_kv_heads from {[d for d in range(1, h + 1) if h % d == 0]}")
    check(self.head_dim >= 1, f"head_dim must be >= 1, got {self.head_dim}")
    check(not self.rope or self.head_dim % 2 == 0, f"RoPE needs an even head_dim, got {self.head_dim}")

  def cache_spec(self):
    kv_shape = (self.num_kv_heads, self.head_dim)
    axes = ("kv_heads", "head_dim")
    return {"key": (kv_shape, axes), "value": (kv_shape, axes)}

  def partition_entries(self):
    return self.num_kv_heads

  def partition_entries_name(self):
    return "KV heads"


class GQAAttention(Attention):
  Config = GQAConfig

  def __init__(self, config: GQAConfig, **kw):
    super().__init__(config, **kw)
    rngs, d, h, kv, dh = kw["rngs"], self.d_model, config.num_heads, config.num_kv_heads, config.head_dim
    p = dict(std=self.init_std, dtype=self.param_dtype)
    self.wq = param(rngs, (d, h, dh), ("embed", "q_heads", "head_dim"), **p)
    self.wk = param(rngs, (d, kv, dh), ("embed", "kv_heads", "head_dim"), **p)
    self.wv = param(rngs, (d, kv, dh), ("embed", "kv_heads", "head_dim"), **p)
    self.wo = param(rngs, (h, dh, d), ("q_heads", "head_dim", "embed"), std=self.out_std,
                    dtype=self.param_dtype)
    if config.gated:
      self.wg = param(rngs, (d, h, dh), ("embed", "q_heads", "head_dim"), **p)

  def cache_entries(self, x, positions):
    k = dense(x, self.wk[...], "bsd,dhk->bshk", self.dtype)
    if self.config.rope:
      k = rope(k, positions, self.config.rope_theta)
    v = dense(x, self.wv[...], "bsd,dhk->bshk", self.dtype)
    axes = ("batch", "length", "kv_heads", "head_dim")
    return {"key": constrain(k, axes), "value": constrain(v, axes)}

  def attend(self, x, positions, kv, kv_len):
    cfg = self.config
    q = dense(x, self.wq[...], "bsd,dhk->bshk", self.dtype)
    if cfg.rope:
      q = rope(q, positions, cfg.rope_theta)
    # [B, S, h] -> [B, S, h_kv, group]: head i = kv * group + g reads KV head kv
    q = q.reshape(q.shape[:2] + (cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim))
    q = constrain(q, ("batch", "length", "kv_heads", "q_per_entry", "head_dim"))
    y, _ = core.expanded(core.heads_major(q), core.heads_major(kv["key"]), core.heads_major(kv["value"]),
                         scale=1.0 / math.sqrt(cfg.head_dim), kv_len=kv_len, backend=self.backend)
    y = core.token_major(y).reshape(x.shape[:2] + (cfg.num_heads, cfg.head_dim))
    if cfg.gated:
      y = y * jax.nn.sigmoid(dense(x, self.wg[...], "bsd,dhk->bshk", self.dtype))
    return dense(y, self.wo[...], "bshk,hkd->bsd", self.dtype)

  # ---- the MLRA authors' checkpoints (their model/mha.py, gqa.py, gqa_gated.py)
  @staticmethod
  def authors_config(shape, config_json, num_heads):
    heads = config_json.get("n_head", num_heads)
    if heads is None:
      raise ValueError("no config.json beside the checkpoint: pass --convert_num_heads (the query heads "
                       "cannot be read off c_q's shape)")
    head_dim = config_json.get("head_dim", shape("c_q.weight")[0] // heads)
    return dict(num_heads=heads, head_dim=head_dim, num_kv_heads=shape("c_k.weight")[0] // head_dim,
                gated=shape.has("c_gated"))

  @staticmethod
  def authors_layout(cfg: GQAConfig, d: int) -> Layout:
    h, kv, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    tensors = {"c_q.weight": (h * dh, d), "c_k.weight": (kv * dh, d), "c_v.weight": (kv * dh, d),
               "c_proj.weight": (d, h * dh)}
    params = [linear("wq", "c_q.weight", d, h, dh), linear("wk", "c_k.weight", d, kv, dh),
              linear("wv", "c_v.weight", d, kv, dh), linear("wo", "c_proj.weight", h, dh, d)]
    if cfg.gated:
      tensors["c_gated.weight"] = (h * dh, d)
      params.append(linear("wg", "c_gated.weight", d, h, dh))
    return Layout(tensors, tuple(params))
