"""MFA: multi-matrix factorization attention (arXiv 2412.19255).

Many large query heads from a low-rank query, one key head and one value head:
    c_q = RMSNorm(x W_QD)            (width C_q)
    q_i = RoPE(c_q W_QU,i)           (h heads of width C)
    k = RoPE(x W_K)    v = x W_V     (one head each, width C)
    y = sum_i softmax(q_i k^T / sqrt(C)) v W_O,i

Cache per token: 2 C (512 at the MLRA paper's config, 24 heads of C = 256).
Under TP the query heads split; the single K and V are replicated.

MFA-KR (key reuse, cache C) is not implemented: the paper describes it as a
re-parameterised value projection over the key cache, and neither it nor the
MLRA authors' code pins down the exact form.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from mla_jax import sharding
from mla_jax.attention.base import Attention, causal_dpa, resolve_impl
from mla_jax.kernels import jax_decode
from mla_jax.config import AttentionConfig, _check, register
from mla_jax.layers import RMSNorm, dense, masked_softmax, param, rope
from mla_jax.sharding import constrain


@dataclasses.dataclass(frozen=True, kw_only=True)
class MFAConfig(AttentionConfig):
  head_dim: int                    # C
  q_lora_rank: int                 # C_q

  VARIANTS = ("mfa",)

  def validate(self, d_model=None):
    super().validate(d_model)
    _check(self.q_lora_rank >= 1, f"mfa: q_lora_rank must be >= 1, got {self.q_lora_rank}")
    _check(self.head_dim % 2 == 0, f"mfa: RoPE needs an even head_dim, got {self.head_dim}")

  def cache_spec(self):
    return {"key": ((self.head_dim,), ("head_dim",)), "value": ((self.head_dim,), ("head_dim",))}

  def partition_entries(self):
    return 1

  def partition_entries_name(self):
    return "KV head (MFA has one, replicated on every device)"


@register("mfa")
class MFA(Attention):
  Config = MFAConfig

  def __init__(self, config: MFAConfig, **kw):
    super().__init__(config, **kw)
    rngs, d, h, c = kw["rngs"], self.d_model, config.num_heads, config.head_dim
    p = dict(std=self.init_std, dtype=self.param_dtype)
    self.wq_a = param(rngs, (d, config.q_lora_rank), ("embed", "q_lora"), **p)
    self.q_norm = RMSNorm(config.q_lora_rank, ("q_lora",), param_dtype=self.param_dtype)
    self.wq_b = param(rngs, (config.q_lora_rank, h, c), ("q_lora", "q_heads", "head_dim"), **p)
    self.wk = param(rngs, (d, c), ("embed", "head_dim"), **p)
    self.wv = param(rngs, (d, c), ("embed", "head_dim"), **p)
    self.wo = param(rngs, (h, c, d), ("q_heads", "head_dim", "embed"), std=self.out_std,
                    dtype=self.param_dtype)

  def cache_entries(self, x, positions):
    k = rope(dense(x, self.wk[...], "bsd,dc->bsc", self.dtype), positions, self.config.rope_theta)
    return {"key": k, "value": dense(x, self.wv[...], "bsd,dc->bsc", self.dtype)}

  def attend(self, x, positions, kv, mask, impl="naive"):
    # MQA-shaped: nothing to absorb, 'naive' and 'absorbed' coincide.
    cfg = self.config
    c_q = self.q_norm(dense(x, self.wq_a[...], "bsd,dr->bsr", self.dtype))
    q = rope(dense(c_q, self.wq_b[...], "bsr,rhc->bshc", self.dtype), positions, cfg.rope_theta)
    q = constrain(q, ("batch", "length", "act_heads", "head_dim"))
    if impl in ("pallas", "auto"):
      why = "the kernel decodes one token per sequence" if x.shape[1] != 1 else \
          jax_decode.plan(kv["key"].shape[1], cfg.head_dim)[1]
      impl = resolve_impl(impl, why)
    if impl == "pallas":                                  # MQA-shaped: JAX's own decode op
      kv_len = jnp.sum(mask[:, 0, :], axis=-1).astype(jnp.int32)
      cache_axes = ("cache_batch", "cache_length", "head_dim")
      y = sharding.per_device(
          lambda q, k, v, n: jax_decode.mqa(q, k, v, n, scale=1.0 / cfg.head_dim ** 0.5),
          (q[:, 0], kv["key"], kv["value"], kv_len),
          (("batch", "q_heads", None), cache_axes, cache_axes, ("batch",)), ("batch", "q_heads", None))
      return dense(y[:, None], self.wo[...], "bshc,hcd->bsd", self.dtype)
    scores = jnp.einsum("bshc,btc->bhst", q, kv["key"].astype(self.dtype),
                        preferred_element_type=jnp.float32) / jnp.sqrt(cfg.head_dim)
    probs = masked_softmax(scores, mask[:, None]).astype(self.dtype)
    y = jnp.einsum("bhst,btc->bshc", probs, kv["value"].astype(self.dtype))
    return dense(y, self.wo[...], "bshc,hcd->bsd", self.dtype)

  def attend_dpa(self, x, positions, kv):
    cfg = self.config
    c_q = self.q_norm(dense(x, self.wq_a[...], "bsd,dr->bsr", self.dtype))
    q = rope(dense(c_q, self.wq_b[...], "bsr,rhc->bshc", self.dtype), positions, cfg.rope_theta)
    y = causal_dpa(q, kv["key"][:, :, None], kv["value"][:, :, None])  # one K and one V head
    return dense(y, self.wo[...], "bshc,hcd->bsd", self.dtype)
