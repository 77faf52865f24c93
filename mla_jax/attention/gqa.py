"""MHA, MQA and GQA: one module, the number of KV heads is the only difference.

    q_i = RoPE(x W_Q,i)   k_j = RoPE(x W_K,j)   v_j = x W_V,j
    head i reads KV head j = i // (h / h_kv)        (contiguous groups)
    y = sum_i softmax(q_i k_j^T / sqrt(d_h)) v_j W_O,i

Cache per token: 2 h_kv d_h (keys after RoPE, values). MHA: h_kv = h; MQA: h_kv = 1.
Under tensor parallelism the KV heads split across `tensor`; query heads follow
their KV head (`q_heads` maps to tensor x tensor_rep, KV-major).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mla_jax import sharding
from mla_jax.attention.base import Attention, QueryBlocks, causal_dpa, resolve_impl
from mla_jax.kernels import jax_decode
from mla_jax.config import AttentionConfig, _check, register
from mla_jax.layers import dense, masked_softmax, param, rope
from mla_jax.sharding import constrain


@dataclasses.dataclass(frozen=True, kw_only=True)
class GQAConfig(AttentionConfig):
  num_kv_heads: int | None = None   # None: mha -> num_heads, mqa -> 1
  head_dim: int
  rope: bool = True                 # False in the GPT-2 flavour (absolute positions)
  gated: bool = False               # y *= sigmoid(x W_g) before the output projection

  VARIANTS = ("mha", "mqa", "gqa")

  def __post_init__(self):
    if self.num_kv_heads is None:
      kv = {"mha": self.num_heads, "mqa": 1}.get(self.variant)
      _check(kv is not None, "gqa needs num_kv_heads")
      object.__setattr__(self, "num_kv_heads", kv)
    super().__post_init__()

  def validate(self, d_model=None):
    super().validate(d_model)
    h, kv = self.num_heads, self.num_kv_heads
    _check(kv >= 1, f"num_kv_heads must be >= 1, got {kv}")
    _check(h % kv == 0, f"num_heads={h} is not divisible by num_kv_heads={kv}: "
           f"pick num_kv_heads from {[d for d in range(1, h + 1) if h % d == 0]}")
    _check(self.variant != "mha" or kv == h, f"mha has num_kv_heads == num_heads ({h}), got {kv}; "
           "use variant 'gqa' for fewer KV heads")
    _check(self.variant != "mqa" or kv == 1, f"mqa has one KV head, got {kv}; use variant 'gqa'")
    _check(self.head_dim >= 1, f"head_dim must be >= 1, got {self.head_dim}")
    _check(not self.rope or self.head_dim % 2 == 0, f"RoPE needs an even head_dim, got {self.head_dim}")

  def cache_spec(self):
    kv_shape = (self.num_kv_heads, self.head_dim)
    axes = ("kv_heads", "head_dim")
    return {"key": (kv_shape, axes), "value": (kv_shape, axes)}

  def partition_entries(self):
    return self.num_kv_heads

  def partition_entries_name(self):
    return "KV heads"


@register("mha", "mqa", "gqa")
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

  def _queries(self, x, positions):
    cfg = self.config
    q = dense(x, self.wq[...], "bsd,dhk->bshk", self.dtype)
    if cfg.rope:
      q = rope(q, positions, cfg.rope_theta)
    # [B, S, h] -> [B, S, h_kv, group]: head i = kv * group + g reads KV head kv
    q = q.reshape(q.shape[:2] + (cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim))
    return constrain(q, ("batch", "length", "kv_heads", "q_per_entry", "head_dim"))

  def _output(self, x, y):
    """y: [B, S, h_kv, group, d_h] -> [B, S, d]."""
    y = y.reshape(y.shape[:2] + (self.config.num_heads, self.config.head_dim))
    if self.config.gated:
      y = y * jax.nn.sigmoid(dense(x, self.wg[...], "bsd,dhk->bshk", self.dtype))
    return dense(y, self.wo[...], "bshk,hkd->bsd", self.dtype)

  def cache_entries(self, x, positions):
    k = dense(x, self.wk[...], "bsd,dhk->bshk", self.dtype)
    if self.config.rope:
      k = rope(k, positions, self.config.rope_theta)
    v = dense(x, self.wv[...], "bsd,dhk->bshk", self.dtype)
    axes = ("batch", "length", "kv_heads", "head_dim")
    return {"key": constrain(k, axes), "value": constrain(v, axes)}

  def attend(self, x, positions, kv, mask, impl="naive"):
    # Nothing to absorb: 'naive' and 'absorbed' are the same computation here;
    # 'pallas' is JAX's own GPU decode op.
    if impl in ("pallas", "auto"):
      why = "the kernel decodes one token per sequence" if x.shape[1] != 1 else \
          jax_decode.plan(kv["key"].shape[1], self.config.head_dim)[1]
      impl = resolve_impl(impl, why)
    q = self._queries(x, positions)
    if impl == "pallas":
      q = q.reshape(q.shape[0], self.config.num_heads, self.config.head_dim)
      kv_len = jnp.sum(mask[:, 0, :], axis=-1).astype(jnp.int32)
      cache_axes = ("cache_batch", "cache_length", "kv_heads", "head_dim")
      y = sharding.per_device(
          lambda q, k, v, n: jax_decode.gqa(q, k, v, n, scale=1.0 / self.config.head_dim ** 0.5),
          (q, kv["key"], kv["value"], kv_len),
          (("batch", "q_heads", None), cache_axes, cache_axes, ("batch",)), ("batch", "q_heads", None))
      return self._output(x, y[:, None])
    k, v = kv["key"].astype(self.dtype), kv["value"].astype(self.dtype)
    scores = jnp.einsum("bskgd,btkd->bkgst", q, k,
                        preferred_element_type=jnp.float32) / jnp.sqrt(self.config.head_dim)
    probs = masked_softmax(scores, mask[:, None, None]).astype(v.dtype)
    return self._output(x, jnp.einsum("bkgst,btkd->bskgd", probs, v))

  def _causal(self, x, positions, kv):
    """Training and prefill: project once, lay q, k, v out heads-major once,
    then each query block scores the key prefix it can see."""
    if self.attention_impl == "dpa":
      return self.attend_dpa(x, positions, kv)
    q = self._queries(x, positions).transpose(0, 2, 3, 1, 4)                     # [B, K, G, S, D]
    k, v = (kv[name].astype(self.dtype).transpose(0, 2, 1, 3) for name in ("key", "value"))  # [B, K, T, D]
    blocks, outs = QueryBlocks(x.shape[1], self.causal_chunks), []
    for q_b, k_b, v_b, mask in zip(blocks.queries(q, 3), blocks.keys(k, 2), blocks.keys(v, 2), blocks.masks()):
      scores = jnp.einsum("bkgsd,bktd->bkgst", q_b, k_b,
                          preferred_element_type=jnp.float32) / jnp.sqrt(self.config.head_dim)
      probs = masked_softmax(scores, mask[:, None, None]).astype(v.dtype)
      outs.append(jnp.einsum("bkgst,bktd->bkgsd", probs, v_b))
    return self._output(x, blocks.join(outs, axis=3).transpose(0, 3, 1, 2, 4))

  def attend_dpa(self, x, positions, kv):
    cfg = self.config
    q = dense(x, self.wq[...], "bsd,dhk->bshk", self.dtype)
    if cfg.rope:
      q = rope(q, positions, cfg.rope_theta)
    return self._output(x, causal_dpa(q, kv["key"], kv["value"]))
