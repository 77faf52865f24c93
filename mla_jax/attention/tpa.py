"""TPA: tensor product attention (arXiv 2501.06425), contextual factors.

Per token, queries, keys and values are sums of R outer products of a head
factor A (width h) and a feature factor B (width d_h):
    A_Q = x W_AQ  [h, R_Q]    B_Q = RoPE(x W_BQ)  [R_Q, d_h]    Q = A_Q B_Q / R_Q
    A_K = x W_AK  [h, R_K]    B_K = RoPE(x W_BK)  [R_K, d_h]    K = A_K B_K / R_K
    A_V = x W_AV  [h, R_V]    B_V = x W_BV        [R_V, d_h]    V = A_V B_V / R_V
RoPE acts on the B factors (it commutes with the contraction over R), so the
cache holds the factors themselves: (R_K + R_V)(h + d_h) per token (608 at the
MLRA paper's config, R_K = R_V = 2).

Decode from the factors (`absorbed`) never rebuilds K or V:
    s_it = sum_r A_K[t, i, r] (q_i . B_K[t, r]) / R_K
    o_i  = sum_r sum_t (p_it A_V[t, i, r]) B_V[t, r] / R_V
`naive` rebuilds K and V for every cached token. Under TP the A factors carry
heads and split; the B factors are replicated: (R_K + R_V)(h / T + d_h) per device.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from mla_jax.attention.base import Attention, causal_dpa, resolve_impl
from mla_jax.config import AttentionConfig, _check, register
from mla_jax.layers import dense, masked_softmax, param, rope, xavier_uniform_3d
from mla_jax.sharding import constrain


@dataclasses.dataclass(frozen=True, kw_only=True)
class TPAConfig(AttentionConfig):
  head_dim: int
  q_rank: int = 6                  # R_Q
  k_rank: int = 2                  # R_K
  v_rank: int = 2                  # R_V
  xavier_init: bool = True         # the authors' factor initialisation (False: N(0, init_std))

  VARIANTS = ("tpa",)

  def validate(self, d_model=None):
    super().validate(d_model)
    for name in ("q_rank", "k_rank", "v_rank"):
      _check(getattr(self, name) >= 1, f"tpa: {name} must be >= 1, got {getattr(self, name)}")
    _check(self.head_dim % 2 == 0, f"tpa: RoPE needs an even head_dim, got {self.head_dim}")

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


@register("tpa")
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

  def _queries(self, x, positions):
    cfg = self.config
    a_q = dense(x, self.wa_q[...], "bsd,dhr->bshr", self.dtype)
    b_q = rope(dense(x, self.wb_q[...], "bsd,drk->bsrk", self.dtype), positions, cfg.rope_theta)
    q = jnp.einsum("bshr,bsrk->bshk", a_q, b_q) / cfg.q_rank
    return constrain(q, ("batch", "length", "act_heads", "head_dim"))

  def cache_entries(self, x, positions):
    theta = self.config.rope_theta
    return {
        "key_a": constrain(dense(x, self.wa_k[...], "bsd,dhr->bshr", self.dtype),
                           ("batch", "length", "kv_heads", "tpa_rank")),
        "key_b": rope(dense(x, self.wb_k[...], "bsd,drk->bsrk", self.dtype), positions, theta),
        "value_a": constrain(dense(x, self.wa_v[...], "bsd,dhr->bshr", self.dtype),
                             ("batch", "length", "kv_heads", "tpa_rank")),
        "value_b": dense(x, self.wb_v[...], "bsd,drk->bsrk", self.dtype),
    }

  def _output(self, y):
    return dense(y, self.wo[...], "bshk,hkd->bsd", self.dtype)

  def _attend_expanded(self, x, positions, kv, mask):
    cfg = self.config
    q = self._queries(x, positions)
    f = {name: a.astype(self.dtype) for name, a in kv.items()}
    k = jnp.einsum("bthr,btrk->bthk", f["key_a"], f["key_b"]) / cfg.k_rank
    v = jnp.einsum("bthr,btrk->bthk", f["value_a"], f["value_b"]) / cfg.v_rank
    scores = jnp.einsum("bshk,bthk->bhst", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(cfg.head_dim)
    probs = masked_softmax(scores, mask[:, None]).astype(v.dtype)
    return self._output(jnp.einsum("bhst,bthk->bshk", probs, v))

  def _attend_factored(self, x, positions, kv, mask):
    cfg = self.config
    q = self._queries(x, positions)
    f = {name: a.astype(self.dtype) for name, a in kv.items()}
    q_dot_b = jnp.einsum("bshk,btrk->bhstr", q, f["key_b"])           # q_i . B_K[t, r]
    scores = jnp.einsum("bhstr,bthr->bhst", q_dot_b, f["key_a"],
                        preferred_element_type=jnp.float32) / (cfg.k_rank * jnp.sqrt(cfg.head_dim))
    probs = masked_softmax(scores, mask[:, None]).astype(self.dtype)
    weights = probs[..., None] * jnp.swapaxes(f["value_a"], 1, 2)[:, :, None]   # p_it A_V[t, i, r]
    y = jnp.einsum("bhstr,btrk->bshk", weights, f["value_b"]) / cfg.v_rank
    return self._output(y)

  def attend(self, x, positions, kv, mask, impl="naive"):
    if impl in ("pallas", "auto"):
      impl = resolve_impl(impl, f"no Pallas decode kernel for {self.config.variant} yet")
    if impl == "naive":
      return self._attend_expanded(x, positions, kv, mask)
    return self._attend_factored(x, positions, kv, mask)

  def attend_dpa(self, x, positions, kv):
    cfg = self.config
    f = {name: a.astype(self.dtype) for name, a in kv.items()}
    k = jnp.einsum("bthr,btrk->bthk", f["key_a"], f["key_b"]) / cfg.k_rank
    v = jnp.einsum("bthr,btrk->bthk", f["value_a"], f["value_b"]) / cfg.v_rank
    return self._output(causal_dpa(self._queries(x, positions), k, v))
