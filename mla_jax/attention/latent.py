"""The latent family: MLA, GLA-2/-4 and MLRA-2/-4, as one piece of math.

Notation: d model width, h query heads, d_n no-RoPE q/k width, d_r decoupled
RoPE width, d_v value width, d_c KV latent width.

Query (all variants, DeepSeek-V2 style):
    c_q = RMSNorm(x W_DQ) * sqrt(d / q_lora_rank)     (q_lora_rank 0: q = x W_Q)
    [q_nope | q_pe] = c_q W_UQ   per head; q_pe rotated (half-split RoPE)

Keys and values: the latent is cut into B = R * G *blocks* of width d_b = d_c / B
(R branches of G blocks each); each block has its own RMSNorm:
    [c_1 .. c_B | k_pe] = x W_DKV
    c_b  = RMSNorm_b(c_b) * sqrt(d / d_b)             (cached)
    k_pe = RoPE(k_pe), ONE rope key shared by all heads (cached)
Block b = (branch r, group g) serves the H_g = h / G query heads of group g:
    k_nope_bi = c_b W_UK,b,i     v_bi = c_b W_UV,b,i  (head i of group g)
    y_i = R^-1/2 sum_r softmax_t((q_nope_i . k_nope_(r,g),i + q_pe_i . k_pe) / sqrt(d_n + d_r)) V_(r,g),i

which gives the variants:
    MLA    R = 1, G = 1  one latent, one softmax per head
    GLA-G  R = 1, G = 2|4 latent heads, each serving a contiguous group of heads
    MLRA-4 R = 4, G = 1  every head attends to every block with a separate softmax
    MLRA-2 R = 2, G = 2  two GLA-2 branches, summed
MLA puts the block sum inside one softmax; MLRA moves it outside. Cache per
token: d_c + d_r for all of them (576 at the MLRA paper's config).

Absorbed decode never builds per-head keys or values: fold W_UK into the
query, attend over the latent itself (MQA over a d_b + d_r "head"), apply W_UV
after:
    q~_bi = W_UK,b,i^T q_nope_i                      (width d_b)
    s_bit = q~_bi . c_b,t + q_pe_i . k_pe_t
    z_bi  = sum_t softmax(s_bi / sqrt(d_n + d_r))_t c_b,t
    y_i   = R^-1/2 sum_r W_UV,(r,g),i^T z_(r,g),i

Tensor parallelism: blocks are the cache entries (`latent_blocks` -> tensor);
each device keeps its blocks' latents, norms and W_UK/W_UV slices; the rope
key is replicated; per-branch partial outputs are summed across devices by the
output projection. MLA's single latent is replicated on every device.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from mla_jax.attention.base import Attention, QueryBlocks, causal_dpa, resolve_impl
from mla_jax import compat, sharding
from mla_jax.kernels import latent_decode as kernel
from mla_jax.config import AttentionConfig, _check, register
from mla_jax.layers import RMSNorm, dense, masked_softmax, param, rms_norm, rope
from mla_jax.sharding import constrain


@dataclasses.dataclass(frozen=True, kw_only=True)
class LatentConfig(AttentionConfig):
  q_lora_rank: int = 0             # 0: full-rank query projection
  kv_lora_rank: int                # d_c, the whole latent (all blocks)
  qk_nope_head_dim: int            # d_n
  qk_rope_head_dim: int = 0        # d_r; 0 = "MLA without RoPE" (positions from elsewhere)
  v_head_dim: int | None = None    # d_v; defaults to d_n
  scales: bool = True              # q / kv variance scales (False: the *_no_scale ablation)
  gated: bool = False              # y *= sigmoid(x W_g) before the output projection

  VARIANTS = ()

  @property
  def branches(self) -> int:       # R: separate softmaxes summed per head
    raise NotImplementedError

  @property
  def groups(self) -> int:         # G: latent blocks per branch, each serving h / G heads
    raise NotImplementedError

  @property
  def num_blocks(self) -> int:
    return self.branches * self.groups

  @property
  def block_dim(self) -> int:
    return self.kv_lora_rank // self.num_blocks

  @property
  def value_dim(self) -> int:
    return self.v_head_dim if self.v_head_dim is not None else self.qk_nope_head_dim

  def validate(self, d_model=None):
    super().validate(d_model)
    _check(self.kv_lora_rank >= 1, f"kv_lora_rank must be >= 1, got {self.kv_lora_rank}")
    _check(self.q_lora_rank >= 0, f"q_lora_rank must be >= 0, got {self.q_lora_rank}")
    _check(self.qk_nope_head_dim >= 1, f"qk_nope_head_dim must be >= 1, got {self.qk_nope_head_dim}")
    _check(self.qk_rope_head_dim >= 0 and self.qk_rope_head_dim % 2 == 0,
           f"qk_rope_head_dim must be even and >= 0, got {self.qk_rope_head_dim}")
    _check(self.value_dim >= 1, f"v_head_dim must be >= 1, got {self.v_head_dim}")
    _check(self.kv_lora_rank % self.num_blocks == 0,
           f"{self.variant}: kv_lora_rank={self.kv_lora_rank} must split into {self.num_blocks} "
           f"equal blocks; use a multiple of {self.num_blocks}")
    _check(self.num_heads % self.groups == 0,
           f"{self.variant}: num_heads={self.num_heads} must split into {self.groups} head groups; "
           f"use a multiple of {self.groups}")

  def dpa_unsupported(self):
    qk, v = self.qk_nope_head_dim + self.qk_rope_head_dim, self.value_dim
    if qk != v:
      return f"its query/key heads are {qk} wide and its value heads {v} (they must match)"
    return None

  def cache_spec(self):
    spec = {"kv_latent": ((self.num_blocks, self.block_dim), ("latent_blocks", "latent_dim"))}
    if self.qk_rope_head_dim:
      spec["rope_key"] = ((self.qk_rope_head_dim,), ("rope_dim",))
    return spec

  def partition_entries(self):
    return self.num_blocks


@dataclasses.dataclass(frozen=True, kw_only=True)
class MLAConfig(LatentConfig):
  VARIANTS = ("mla",)
  branches = property(lambda self: 1)
  groups = property(lambda self: 1)

  def partition_entries_name(self):
    return "latent (MLA has one, replicated on every device)"


@dataclasses.dataclass(frozen=True, kw_only=True)
class GLAConfig(LatentConfig):
  VARIANTS = ("gla2", "gla4")
  branches = property(lambda self: 1)
  groups = property(lambda self: int(self.variant[-1]))

  def partition_entries_name(self):
    return "latent heads"


@dataclasses.dataclass(frozen=True, kw_only=True)
class MLRAConfig(LatentConfig):
  latent_blocks: int = 4           # B; 4 in both MLRA-2 and MLRA-4

  VARIANTS = ("mlra2", "mlra4")
  branches = property(lambda self: int(self.variant[-1]))
  groups = property(lambda self: self.latent_blocks // self.branches)

  def validate(self, d_model=None):
    _check(self.latent_blocks % self.branches == 0,
           f"{self.variant}: latent_blocks={self.latent_blocks} must be a multiple of "
           f"{self.branches} branches")
    super().validate(d_model)

  def partition_entries_name(self):
    return "latent blocks"


class LatentAttention(Attention):
  """Shared implementation; MLA, GLA and MLRA below only pick their config."""

  def __init__(self, config: LatentConfig, **kw):
    super().__init__(config, **kw)
    rngs, d = kw["rngs"], self.d_model
    h, dn, dr, dv = config.num_heads, config.qk_nope_head_dim, config.qk_rope_head_dim, config.value_dim
    nb, db, groups = config.num_blocks, config.block_dim, config.groups
    per_group = h // groups
    p = dict(std=self.init_std, dtype=self.param_dtype)
    # Query heads are stored as [group, head in group]. With one branch the group
    # axis follows the blocks onto `tensor`; with several (MLRA-2) a group's
    # blocks sit on different devices, so it stays unsharded.
    group_axis = "latent_blocks" if config.branches == 1 else None
    self.head_axes = (group_axis, "q_per_entry")
    if config.q_lora_rank:
      self.wq_a = param(rngs, (d, config.q_lora_rank), ("embed", "q_lora"), **p)
      self.q_norm = RMSNorm(config.q_lora_rank, ("q_lora",), param_dtype=self.param_dtype)
      self.wq_b = param(rngs, (config.q_lora_rank, groups, per_group, dn + dr),
                        ("q_lora",) + self.head_axes + ("qk_dim",), **p)
    else:
      self.wq = param(rngs, (d, groups, per_group, dn + dr), ("embed",) + self.head_axes + ("qk_dim",), **p)
    self.w_dkv = param(rngs, (d, nb, db), ("embed", "latent_blocks", "latent_dim"), **p)
    self.kv_norm = RMSNorm((nb, db), ("latent_blocks", "latent_dim"), param_dtype=self.param_dtype)
    if dr:
      self.w_kr = param(rngs, (d, dr), ("embed", "rope_dim"), **p)
    self.w_uk = param(rngs, (nb, db, per_group, dn), ("latent_blocks", "latent_dim", "q_per_entry", "qk_nope"), **p)
    self.w_uv = param(rngs, (nb, db, per_group, dv), ("latent_blocks", "latent_dim", "q_per_entry", "v_dim"), **p)
    self.wo = param(rngs, (groups, per_group, dv, d), self.head_axes + ("v_dim", "embed"),
                    std=self.out_std, dtype=self.param_dtype)
    if config.gated:
      self.wg = param(rngs, (d, groups, per_group, dv), ("embed",) + self.head_axes + ("v_dim",), **p)
    self.q_scale = math.sqrt(d / config.q_lora_rank) if (config.scales and config.q_lora_rank) else 1.0
    self.kv_scale = math.sqrt(d / db) if config.scales else 1.0
    self.softmax_scale = 1.0 / math.sqrt(dn + dr)

  # --------------------------------------------------------------- projections
  def _queries(self, x, positions):
    """q_nope [B, S, G, H_g, d_n] and rotated q_pe [B, S, G, H_g, d_r]."""
    cfg = self.config
    if cfg.q_lora_rank:
      c_q = self.q_norm(dense(x, self.wq_a[...], "bsd,dr->bsr", self.dtype)) * self.q_scale
      q = dense(c_q, self.wq_b[...], "bsr,rgjk->bsgjk", self.dtype)
    else:
      q = dense(x, self.wq[...], "bsd,dgjk->bsgjk", self.dtype)
    q = constrain(q, ("batch", "length") + self.head_axes + ("qk_dim",))
    q_nope, q_pe = q[..., :cfg.qk_nope_head_dim], q[..., cfg.qk_nope_head_dim:]
    return q_nope, rope(q_pe, positions, cfg.rope_theta)

  def cache_entries(self, x, positions):
    latent = dense(x, self.w_dkv[...], "bsd,dnc->bsnc", self.dtype)
    latent = self.kv_norm(latent) * self.kv_scale
    out = {"kv_latent": constrain(latent, ("batch", "length", "latent_blocks", "latent_dim"))}
    if self.config.qk_rope_head_dim:
      out["rope_key"] = rope(dense(x, self.w_kr[...], "bsd,dr->bsr", self.dtype), positions,
                             self.config.rope_theta)
    return out

  def _blocks(self, w):
    """[B_blocks, ...] -> [R, G, ...]: block b = branch r * G + group g."""
    return w.reshape((self.config.branches, self.config.groups) + w.shape[1:])

  def _output(self, x, y):
    """y: [B, S, G, H_g, d_v], already summed over branches -> [B, S, d]."""
    if self.config.gated:
      y = y * jax.nn.sigmoid(dense(x, self.wg[...], "bsd,dgjv->bsgjv", self.dtype))
    return dense(y, self.wo[...], "bsgjv,gjvd->bsd", self.dtype)

  def _rope_scores(self, q_pe, kv, spec):
    """q_pe . k_pe: the rope key is one vector per token, shared by every block and head."""
    if not self.config.qk_rope_head_dim:
      return 0.0
    return jnp.einsum(spec, q_pe, kv["rope_key"].astype(q_pe.dtype), preferred_element_type=jnp.float32)

  def _blocks_latent(self, latent):
    """Cache layout [B, T, blocks, d_b] -> [B, T, R, G, d_b]."""
    cfg = self.config
    return latent.reshape(latent.shape[:2] + (cfg.branches, cfg.groups, cfg.block_dim))

  # --------------------------------------------------------------- attention
  def _expand(self, kv):
    """Per-head keys [B, G, J, R, T, d_n (+ d_r)] and values [B, G, J, R, T, d_v]
    re-expanded from the latent. Layouts keep (batch, group, head) leading so
    that every contraction is a plain batched matmul on the CPU and GPU alike."""
    latent = self._blocks_latent(kv["kv_latent"])                 # [B, T, R, G, d_b]
    w_uk, w_uv = self._blocks(self.w_uk[...]), self._blocks(self.w_uv[...])
    key = dense(latent, w_uk, "btrgc,rgcjn->bgjrtn", self.dtype)
    value = dense(latent, w_uv, "btrgc,rgcjv->bgjrtv", self.dtype)
    if self.config.qk_rope_head_dim:
      # K = [k_nope | k_pe] with the shared rope key copied to every block and head
      # (as the authors do): its gradient then sums over a key-sized tensor, not
      # over the (much larger) scores.
      k_pe = kv["rope_key"].astype(self.dtype)[:, None, None, None]          # [B, 1, 1, 1, T, e]
      key = jnp.concatenate([key, jnp.broadcast_to(k_pe, key.shape[:-1] + k_pe.shape[-1:])], -1)
    return key, value

  def _heads_major_queries(self, x, positions):
    """[q_nope | q_pe] laid out [B, G, J, S, d_n (+ d_r)], as `_expand`'s keys."""
    q_nope, q_pe = self._queries(x, positions)                    # [B, S, G, J, *]
    q = jnp.concatenate([q_nope, q_pe], -1) if self.config.qk_rope_head_dim else q_nope
    return q.transpose(0, 2, 3, 1, 4)

  def _expanded_attention(self, q, key, value, mask):
    """q [B, G, J, S, *] over `_expand`'s keys and values, mask [B or 1, S, T]
    -> [B, G, J, S, d_v]; the branch sum of MLRA is folded into the probs @
    values contraction (over branch and time at once)."""
    scores = jnp.einsum("bgjsn,bgjrtn->bgjrst", q, key, preferred_element_type=jnp.float32)
    probs = masked_softmax(scores * self.softmax_scale, mask[:, None, None, None]).astype(value.dtype)
    return jnp.einsum("bgjrst,bgjrtv->bgjsv", probs, value)

  def _attend_expanded(self, x, positions, kv, mask):
    """Attention over per-head keys and values re-expanded from the latent (naive decode)."""
    y = self._expanded_attention(self._heads_major_queries(x, positions), *self._expand(kv), mask)
    return self._output(x, y.transpose(0, 3, 1, 2, 4) / math.sqrt(self.config.branches))

  def _causal(self, x, positions, kv):
    """Training and prefill: project (and expand or absorb) once, in heads-major
    layouts, then each query block scores the key prefix it can see."""
    if self.attention_impl == "dpa":
      return self.attend_dpa(x, positions, kv)
    cfg = self.config
    blocks, outs = QueryBlocks(x.shape[1], self.causal_chunks), []
    if self.training_impl() == "naive":
      q, (key, value) = self._heads_major_queries(x, positions), self._expand(kv)
      for q_b, k_b, v_b, mask in zip(blocks.queries(q, 3), blocks.keys(key, 4), blocks.keys(value, 4),
                                     blocks.masks()):
        outs.append(self._expanded_attention(q_b, k_b, v_b, mask))
      y = blocks.join(outs, axis=3).transpose(0, 3, 1, 2, 4)      # [B, S, G, J, v]
    else:
      q_nope, q_pe = self._queries(x, positions)                  # [B, S, G, J, *]
      w_uk, w_uv = self._blocks(self.w_uk[...]), self._blocks(self.w_uv[...])
      q_latent = dense(q_nope, w_uk, "bsgjn,rgcjn->brgjsc", self.dtype)
      latent = self._blocks_latent(kv["kv_latent"]).astype(self.dtype).transpose(0, 2, 3, 1, 4)  # [B, R, G, T, c]
      rope_parts = [None] * len(blocks.bounds)
      if cfg.qk_rope_head_dim:
        rope_parts = zip(blocks.queries(q_pe.transpose(0, 2, 3, 1, 4), 3),
                         blocks.keys(kv["rope_key"].astype(self.dtype), 1))
      for q_b, lat_b, rope_b, mask in zip(blocks.queries(q_latent, 4), blocks.keys(latent, 3), rope_parts,
                                          blocks.masks()):
        scores = jnp.einsum("brgjsc,brgtc->brgjst", q_b, lat_b, preferred_element_type=jnp.float32)
        if rope_b is not None:   # one rope key per token, shared by every block and head
          scores = scores + jnp.einsum("bgjse,bte->bgjst", *rope_b, preferred_element_type=jnp.float32)[:, None]
        probs = masked_softmax(scores * self.softmax_scale, mask[:, None, None, None]).astype(latent.dtype)
        outs.append(jnp.einsum("brgjst,brgtc->brgjsc", probs, lat_b))
      y = dense(blocks.join(outs, axis=4), w_uv, "brgjsc,rgcjv->bsgjv", self.dtype)
    return self._output(x, y / math.sqrt(cfg.branches))

  def _attend_absorbed(self, x, positions, kv, mask):
    """Attend over the latent itself; W_UK folds into the query, W_UV comes after."""
    q_nope, q_pe = self._queries(x, positions)
    latent = self._blocks_latent(kv["kv_latent"]).astype(self.dtype)  # [B, T, R, G, d_b]
    w_uk, w_uv = self._blocks(self.w_uk[...]), self._blocks(self.w_uv[...])
    q_latent = dense(q_nope, w_uk, "bsgjn,rgcjn->bsrgjc", self.dtype)
    scores = jnp.einsum("bsrgjc,btrgc->brgjst", q_latent, latent, preferred_element_type=jnp.float32)
    rope_scores = self._rope_scores(q_pe, kv, "bsgje,bte->bgjst")
    if self.config.qk_rope_head_dim:
      rope_scores = rope_scores[:, None]                          # same for every branch
    scores = (scores + rope_scores) * self.softmax_scale
    probs = masked_softmax(scores, mask[:, None, None, None]).astype(latent.dtype)
    context = jnp.einsum("brgjst,btrgc->bsrgjc", probs, latent)     # z, width d_b
    y = dense(context, w_uv, "bsrgjc,rgcjv->bsgjv", self.dtype) / math.sqrt(self.config.branches)
    return self._output(x, y)

  def attend_dpa(self, x, positions, kv):
    """One jax.nn.dot_product_attention per branch, summed (needs d_n + d_r == d_v)."""
    cfg = self.config
    q_nope, q_pe = self._queries(x, positions)                    # [B, S, G, J, *]
    q = jnp.concatenate([q_nope, q_pe], -1) if cfg.qk_rope_head_dim else q_nope
    q = q.reshape(q.shape[:2] + (cfg.num_heads, q.shape[-1]))       # head = g * J + j
    latent = self._blocks_latent(kv["kv_latent"])                 # [B, T, R, G, d_b]
    w_uk, w_uv = self._blocks(self.w_uk[...]), self._blocks(self.w_uv[...])
    y = 0.0
    for r in range(cfg.branches):
      k = dense(latent[:, :, r], w_uk[r], "btgc,gcjn->btgjn", self.dtype)
      v = dense(latent[:, :, r], w_uv[r], "btgc,gcjv->btgjv", self.dtype)
      if cfg.qk_rope_head_dim:
        k_pe = kv["rope_key"].astype(self.dtype)[:, :, None, None]
        k = jnp.concatenate([k, jnp.broadcast_to(k_pe, k.shape[:-1] + k_pe.shape[-1:])], -1)
      flat = lambda a: a.reshape(a.shape[:2] + (cfg.num_heads, a.shape[-1]))  # noqa: E731
      y = y + causal_dpa(q, flat(k), flat(v))
    y = y / math.sqrt(cfg.branches)
    return self._output(x, y.reshape(y.shape[:2] + (cfg.groups, cfg.num_heads // cfg.groups, -1)))

  def _attend_pallas(self, x, positions, kv, mask):
    """The absorbed decode through the Pallas kernel (interpret mode off GPUs):
    the kernel returns each block's latent context; W_UV and the branch sum
    stay in XLA. Under a mesh it runs per device on that device's blocks."""
    cfg = self.config
    q_nope, q_pe = self._queries(x, positions)                    # [B, 1, G, J, *]
    w_uk, w_uv = self._blocks(self.w_uk[...]), self._blocks(self.w_uv[...])
    cache_dtype = kv["kv_latent"].dtype
    q_latent = dense(q_nope[:, 0], w_uk, "bgjn,rgcjn->brgjc", self.dtype)
    shape = (x.shape[0], cfg.num_blocks, cfg.num_heads // cfg.groups)
    q_latent = q_latent.reshape(shape + (cfg.block_dim,)).astype(cache_dtype)
    q_rope = None
    if cfg.qk_rope_head_dim:
      q_rope = jnp.broadcast_to(q_pe[:, 0][:, None], (x.shape[0], cfg.branches) + q_pe.shape[2:])
      q_rope = q_rope.reshape(shape + (cfg.qk_rope_head_dim,)).astype(cache_dtype)
    kv_len = jnp.sum(mask[:, 0, :], axis=-1).astype(jnp.int32)   # decode masks are prefixes

    def run(q_latent, q_rope, latent, rope, kv_len):
      return kernel.latent_decode(q_latent, q_rope, latent, rope, kv_len, scale=self.softmax_scale,
                                  interpret=not compat.on_gpu())[0]

    q_axes = ("batch", "latent_blocks", "q_per_entry", None)
    context = sharding.per_device(
        run, (q_latent, q_rope, kv["kv_latent"], kv.get("rope_key"), kv_len),
        (q_axes, q_axes, ("cache_batch", "cache_length", "latent_blocks", "latent_dim"),
         ("cache_batch", "cache_length", "rope_dim"), ("batch",)), q_axes)
    context = context.reshape((x.shape[0], cfg.branches, cfg.groups) + context.shape[2:])
    y = dense(context, w_uv, "brgjc,rgcjv->bgjv", self.dtype) / math.sqrt(cfg.branches)
    return self._output(x, y[:, None])

  def kernel_unsupported(self, x) -> str | None:
    if x.shape[1] != 1:
      return "the kernel decodes one token per sequence"
    return kernel.unsupported(self.config.block_dim, self.config.qk_rope_head_dim)

  def training_impl(self):
    # Per query-key pair the expanded form multiplies over d_n + d_r (scores)
    # and d_v (values); the absorbed form over d_b + d_r and d_b. Narrow blocks
    # (MLRA's) make the absorbed form the cheaper one in training too.
    cfg = self.config
    expanded = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.value_dim
    absorbed = 2 * cfg.block_dim + cfg.qk_rope_head_dim
    return "absorbed" if absorbed < expanded else "naive"

  def attend(self, x, positions, kv, mask, impl="naive"):
    if impl in ("pallas", "auto"):
      impl = resolve_impl(impl, self.kernel_unsupported(x))
    if impl == "naive":
      return self._attend_expanded(x, positions, kv, mask)
    if impl == "pallas":
      return self._attend_pallas(x, positions, kv, mask)
    return self._attend_absorbed(x, positions, kv, mask)


@register("mla")
class MLA(LatentAttention):
  Config = MLAConfig


@register("gla2", "gla4")
class GLA(LatentAttention):
  Config = GLAConfig


@register("mlra2", "mlra4")
class MLRA(LatentAttention):
  Config = MLRAConfig
