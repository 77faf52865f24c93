"""TPA: tensor product attention (arXiv 2501.06425), contextual factors.

Per token, queries, keys and values are sums of R outer products of a head
factor A (width h) and a feature factor B (width d_h):
    A_Q = x W_AQ  [h, R_Q]    B_Q = RoPE(x W_BQ)  [R_Q, d_h]    Q = A_Q B_Q / R_Q
    A_K = x W_AK  [h, R_K]    B_K = RoPE(x W_BK)  [R_K, d_h]    K = A_K B_K / R_K
    A_V = x W_AV  [h, R_V]    B_V = x W_BV        [R_V, d_h]    V = A_V B_V / R_V
RoPE acts on the B factors (it commutes with the contraction over R), so the
cache holds the factors themselves: (R_K + R_V)(h + d_h) per token (608 at the
MLRA paper's config, R_K = R_V = 2).

Decode from the factors (`absorbed`) never rebuilds K or V (TPA's own scoring,
with the core's softmax):
    s_it = sum_r A_K[t, i, r] (q_i . B_K[t, r]) / R_K
    o_i  = sum_r sum_t (p_it A_V[t, i, r]) B_V[t, r] / R_V
Training, prefill and `naive` decode rebuild K and V and go through `core.expanded`. Under TP the A factors carry
heads and split; the B factors are replicated: (R_K + R_V)(h / T + d_h) per device.
"""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from mla_jax import quant
from mla_jax.attention import core
from mla_jax.attention.base import Attention
from mla_jax.authors_layout import Layout, linear
from mla_jax.config import AttentionConfig, check, option
from mla_jax.layers import dense, param, rope, xavier_uniform_3d
from mla_jax.rules import constrain


@dataclasses.dataclass(frozen=True, kw_only=True)
class TPAConfig(AttentionConfig):
  head_dim: int = option(32, "Head width.")
  q_rank: int = option(6, "TPA query rank R_Q.", flag="tpa_q_rank")
  k_rank: int = option(2, "TPA key rank R_K.", flag="tpa_k_rank", legacy="tpa_kv_rank")
  v_rank: int = option(2, "TPA value rank R_V.", flag="tpa_v_rank", legacy="tpa_kv_rank")
  xavier_init: bool = option(True, "The TPA authors' factor initialisation (False: N(0, init_std)).",
                             flag="tpa_xavier_init")

  def validate(self, d_model=None):
    super().validate(d_model)
    for name in ("q_rank", "k_rank", "v_rank"):
      check(getattr(self, name) >= 1, f"tpa: {name} must be >= 1, got {getattr(self, name)}")
    check(self.head_dim % 2 == 0, f"tpa: RoPE needs an even head_dim, got {self.head_dim}")

  def cache_spec(self):
    h, dh = self.num_heads, self.head_dim
    return {"key_a": ((h, self.k_rank), ("kv_heads", "tpa_rank")),
            "key_b": ((self.k_rank, dh), ("tpa_rank", "head_dim")),
            "value_a": ((h, self.v_rank), ("kv_heads", "tpa_rank")),
            "value_b": ((self.v_rank, dh), ("tpa_rank", "head_dim"))}

  def partition_entries(self):
    return self.num_heads

  def partition_entries_name(self):
    return "heads (the A factors)"


class TPA(Attention):
  Config = TPAConfig

  def __init__(self, config: TPAConfig, **kw):
    super().__init__(config, **kw)
    rngs, d, h, dh = kw["rngs"], self.d_model, config.num_heads, config.head_dim
    p = dict(std=self.init_std, dtype=self.param_dtype,
             init=xavier_uniform_3d if config.xavier_init else None)
    self.wa_q = param(rngs, (d, h, config.q_rank), ("embed", "q_heads", "tpa_rank"), **p)
    self.wb_q = param(rngs, (d, config.q_rank, dh), ("embed", "tpa_rank", "head_dim"), **p)
    self.wa_k = param(rngs, (d, h, config.k_rank), ("embed", "kv_heads", "tpa_rank"), **p)
    self.wb_k = param(rngs, (d, config.k_rank, dh), ("embed", "tpa_rank", "head_dim"), **p)
    self.wa_v = param(rngs, (d, h, config.v_rank), ("embed", "kv_heads", "tpa_rank"), **p)
    self.wb_v = param(rngs, (d, config.v_rank, dh), ("embed", "tpa_rank", "head_dim"), **p)
    self.wo = param(rngs, (h, dh, d), ("q_heads", "head_dim", "embed"), std=self.out_std,
                    dtype=self.param_dtype)

  def cache_entries(self, x, positions):
    return {
        "key_a": constrain(dense(x, self.wa_k[...], "bsd,dhr->bshr", self.dtype),
                           ("batch", "length", "kv_heads", "tpa_rank")),
        "key_b": rope(dense(x, self.wb_k[...], "bsd,drk->bsrk", self.dtype), positions, self.config),
        "value_a": constrain(dense(x, self.wa_v[...], "bsd,dhr->bshr", self.dtype),
                             ("batch", "length", "kv_heads", "tpa_rank")),
        "value_b": dense(x, self.wb_v[...], "bsd,drk->bsrk", self.dtype),
    }

  def attend(self, x, positions, kv, kv_len):
    cfg = self.config
    a_q = dense(x, self.wa_q[...], "bsd,dhr->bshr", self.dtype)
    b_q = rope(dense(x, self.wb_q[...], "bsd,drk->bsrk", self.dtype), positions, cfg)
    q = constrain(jnp.einsum("bshr,bsrk->bshk", a_q, b_q) / cfg.q_rank, ("batch", "length", "act_heads", "head_dim"))
    q = core.heads_major(q)                                             # [B, h, S, d_h]
    scale = 1.0 / math.sqrt(cfg.head_dim)
    if kv_len is None or self.backend.decode_form == "naive":
      f = {name: quant.dequantized(a, self.dtype) for name, a in kv.items()}
      k = jnp.einsum("bthr,btrk->bhtk", f["key_a"], f["key_b"]) / cfg.k_rank
      v = jnp.einsum("bthr,btrk->bhtk", f["value_a"], f["value_b"]) / cfg.v_rank
      y, _ = core.expanded(q, k, v, scale=scale, kv_len=kv_len, backend=self.backend)
    else:                                                               # from the factors
      self.backend.xla_only("tpa decodes from its cached factors in XLA; no Pallas kernel reads them")

      def attend_factors(factors, visible):
        f = {name: quant.dequantized(a, self.dtype) for name, a in factors.items()}
        q_dot_b = jnp.einsum("bhsk,btrk->bhstr", q, f["key_b"])         # q_i . B_K[t, r]
        scores = jnp.einsum("bhstr,bthr->bhst", q_dot_b, f["key_a"], preferred_element_type=jnp.float32)
        probs, lse = core.softmax(scores * (scale / cfg.k_rank), visible)
        weights = probs.astype(self.dtype)[..., None] * jnp.swapaxes(f["value_a"], 1, 2)[:, :, None]
        return jnp.einsum("bhstr,btrk->bhsk", weights, f["value_b"]) / cfg.v_rank, lse  # p_it A_V[t,i,r] B_V[t,r]

      y, _ = core.over_keys(attend_factors, kv, kv_len, q.shape[-2], axis=1)    # token-major factors
    return dense(core.token_major(y), self.wo[...], "bshk,hkd->bsd", self.dtype)

  # ---- the MLRA authors' checkpoints (their model/tpa.py)
  @staticmethod
  def authors_config(shape, config_json, num_heads):
    a_q, b_q = shape("c_qkv.W_A_q.weight")[0], shape("c_qkv.W_B_q.weight")[0]
    width = shape("c_proj.weight")[1]                               # heads x head_dim
    q_rank = config_json.get("q_rank", round(math.sqrt(a_q * b_q / width)))
    heads = config_json.get("n_head", num_heads) or a_q // q_rank
    return dict(num_heads=heads, head_dim=b_q // q_rank, q_rank=q_rank, k_rank=shape("c_qkv.W_A_k.weight")[0] // heads,
                v_rank=shape("c_qkv.W_A_v.weight")[0] // heads, xavier_init=False)

  @staticmethod
  def authors_layout(cfg: TPAConfig, d: int) -> Layout:
    h, dh = cfg.num_heads, cfg.head_dim
    tensors, params = {"c_proj.weight": (d, h * dh)}, [linear("wo", "c_proj.weight", h, dh, d)]
    for name, rank in (("q", cfg.q_rank), ("k", cfg.k_rank), ("v", cfg.v_rank)):
      tensors[f"c_qkv.W_A_{name}.weight"] = (h * rank, d)
      tensors[f"c_qkv.W_B_{name}.weight"] = (rank * dh, d)
      params += [linear(f"wa_{name}", f"c_qkv.W_A_{name}.weight", d, h, rank),      # head-major
                 linear(f"wb_{name}", f"c_qkv.W_B_{name}.weight", d, rank, dh)]
    return Layout(tensors, tuple(params))
