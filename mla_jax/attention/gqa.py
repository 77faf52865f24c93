"""MHA, MQA and GQA: one module, the number of KV heads is the only difference.

    q_i = RoPE(x W_Q,i)   k_j = RoPE(x W_K,j)   v_j = x W_V,j
    head i reads KV head j = i // (h / h_kv)        (contiguous groups)
    options: biases on q, k, v (Qwen2: x W + b); per-head RMSNorms on q and k
    before RoPE (Qwen3: q_i = RoPE(RMSNorm(x W_Q,i)), one weight shared by all heads)
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
from mla_jax.authors_layout import Layout, Param, linear
from mla_jax.config import AttentionConfig, check, option
from mla_jax.layers import RMSNorm, dense, param, rope, zeros
from mla_jax.rules import constrain


@dataclasses.dataclass(frozen=True, kw_only=True)
class GQAConfig(AttentionConfig):
  num_kv_heads: int | None = option(2, "KV heads (None: one per query head).")
  head_dim: int = option(32, "Head width.")
  rope: bool = option(True, "RoPE on queries and keys (False: positions from the GPT-2 flavour's table).",
                      flag="mha_rope")
  gated: bool = option(False, "Output gate sigmoid(x W_g) before the output projection.")
  qkv_bias: bool = option(False, "Biases on the query, key and value projections (Qwen2).")
  qk_norm: bool = option(False, "RMSNorm each query and key head before RoPE (Qwen3).")

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
    if config.qkv_bias:
      self.bq = zeros((h, dh), ("q_heads", "head_dim"), self.param_dtype)
      self.bk = zeros((kv, dh), ("kv_heads", "head_dim"), self.param_dtype)
      self.bv = zeros((kv, dh), ("kv_heads", "head_dim"), self.param_dtype)
    if config.qk_norm:
      self.q_norm = RMSNorm(dh, ("head_dim",), eps=self.norm_eps, param_dtype=self.param_dtype)
      self.k_norm = RMSNorm(dh, ("head_dim",), eps=self.norm_eps, param_dtype=self.param_dtype)

  def _project(self, x, which: str):
    """x W (+ b) [B, S, heads, d_h], q and k RMSNormed per head where the config says."""
    y = dense(x, getattr(self, "w" + which)[...], "bsd,dhk->bshk", self.dtype)
    if self.config.qkv_bias:
      y = y + getattr(self, "b" + which)[...].astype(y.dtype)
    if self.config.qk_norm and which in "qk":
      y = getattr(self, which + "_norm")(y)
    return y

  def cache_entries(self, x, positions):
    k = self._project(x, "k")
    if self.config.rope:
      k = rope(k, positions, self.config)
    v = self._project(x, "v")
    axes = ("batch", "length", "kv_heads", "head_dim")
    return {"key": constrain(k, axes), "value": constrain(v, axes)}

  def attend(self, x, positions, kv, kv_len):
    cfg = self.config
    q = self._project(x, "q")
    if cfg.rope:
      q = rope(q, positions, cfg)
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

  # ---- Hugging Face checkpoints (Llama, Mistral, Qwen2, Qwen3: `model.layers.{i}.self_attn.*`)
  @staticmethod
  def hf_config(hf):
    h = hf["num_attention_heads"]
    kv = hf.get("num_key_value_heads") or h
    return dict(num_heads=h, num_kv_heads=kv, head_dim=hf.get("head_dim") or hf["hidden_size"] // h,
                qkv_bias=hf.get("model_type") == "qwen2", qk_norm=hf.get("model_type") == "qwen3")

  @staticmethod
  def hf_layout(cfg: GQAConfig, d: int, hf: dict) -> Layout:
    h, kv, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if cfg.gated or not cfg.rope:
      raise ValueError("the Llama/Qwen formats have no output gate and always apply RoPE")
    heads = {"q": h, "k": kv, "v": kv}
    tensors = {f"{n}_proj.weight": (heads[n] * dh, d) for n in "qkv"} | {"o_proj.weight": (d, h * dh)}
    params = [linear("w" + n, f"{n}_proj.weight", d, heads[n], dh) for n in "qkv"]
    params.append(linear("wo", "o_proj.weight", h, dh, d))
    if cfg.qkv_bias:
      for n in "qkv":
        tensors[f"{n}_proj.bias"] = (heads[n] * dh,)
        params.append(Param(("b" + n,), (f"{n}_proj.bias",), lambda b, k=heads[n]: b.reshape(k, dh)))
    if cfg.qk_norm:
      for n in "qk":
        tensors[f"{n}_norm.weight"] = (dh,)
        params.append(Param((f"{n}_norm", "weight"), (f"{n}_norm.weight",), lambda w: w))
    return Layout(tensors, tuple(params))
