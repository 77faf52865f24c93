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
import math

from mla_jax.attention import core
from mla_jax.attention.base import Attention
from mla_jax.authors_layout import Layout, Param, linear
from mla_jax.config import AttentionConfig, check, option
from mla_jax.layers import RMSNorm, dense, param, rope
from mla_jax.rules import constrain


@dataclasses.dataclass(frozen=True, kw_only=True)
class MFAConfig(AttentionConfig):
  head_dim: int = option(64, "MFA head width C (of every query head and the one K and V head).",
                         flag="mfa_head_dim")
  q_lora_rank: int = option(64, "MFA query latent width C_q.", flag="mfa_q_rank")

  def validate(self, d_model=None):
    super().validate(d_model)
    check(self.q_lora_rank >= 1, f"mfa: q_lora_rank must be >= 1, got {self.q_lora_rank}")
    check(self.head_dim % 2 == 0, f"mfa: RoPE needs an even head_dim, got {self.head_dim}")

  def cache_spec(self):
    return {"key": ((self.head_dim,), ("head_dim",)), "value": ((self.head_dim,), ("head_dim",))}

  def partition_entries(self):
    return 1

  def partition_entries_name(self):
    return "KV head (MFA has one, replicated on every device)"


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
    k = rope(dense(x, self.wk[...], "bsd,dc->bsc", self.dtype), positions, self.config)
    return {"key": k, "value": dense(x, self.wv[...], "bsd,dc->bsc", self.dtype)}

  def attend(self, x, positions, kv, kv_len):
    cfg = self.config
    c_q = self.q_norm(dense(x, self.wq_a[...], "bsd,dr->bsr", self.dtype))
    q = rope(dense(c_q, self.wq_b[...], "bsr,rhc->bshc", self.dtype), positions, cfg)
    q = constrain(q, ("batch", "length", "act_heads", "head_dim"))
    # MQA-shaped: one key and one value head ([B, T, C]: no head axes) serve every query head
    y, _ = core.expanded(core.heads_major(q), kv["key"], kv["value"], scale=1.0 / math.sqrt(cfg.head_dim),
                         kv_len=kv_len, backend=self.backend)
    return dense(core.token_major(y), self.wo[...], "bshc,hcd->bsd", self.dtype)

  # ---- the MLRA authors' checkpoints (their model/mfa.py)
  @staticmethod
  def authors_config(shape, config_json, num_heads):
    width = shape("c_k.weight")[0]
    return dict(num_heads=config_json.get("n_head", num_heads) or shape("w_q.weight")[0] // width,
                head_dim=width, q_lora_rank=shape("c_q.weight")[0])

  @staticmethod
  def authors_layout(cfg: MFAConfig, d: int) -> Layout:
    h, c, cq = cfg.num_heads, cfg.head_dim, cfg.q_lora_rank
    tensors = {"c_q.weight": (cq, d), "q_layernorm.weight": (cq,), "w_q.weight": (h * c, cq),
               "c_k.weight": (c, d), "c_v.weight": (c, d), "c_proj.weight": (d, h * c)}
    params = (linear("wq_a", "c_q.weight", d, cq), Param(("q_norm", "weight"), ("q_layernorm.weight",), lambda w: w),
              linear("wq_b", "w_q.weight", cq, h, c), linear("wk", "c_k.weight", d, c),
              linear("wv", "c_v.weight", d, c), linear("wo", "c_proj.weight", h, c, d))
    return Layout(tensors, params)
