"""The latent family: MLA, GLA-2/-4 and MLRA-2/-4, as one piece of math.

Notation: d model width, h query heads, d_n no-RoPE q/k width, d_r decoupled
RoPE width, d_v value width, d_c KV latent width.

Query (all variants, DeepSeek-V2 style):
    c_q = RMSNorm(x W_DQ) * sqrt(d / q_lora_rank)     (q_lora_rank 0: q = x W_Q)
    [q_nope | q_pe] = c_q W_UQ   per head; q_pe rotated (half-split RoPE)

Keys and values: the latent is cut into B = R * G *blocks* of width d_b = d_c / B
(R `branches` of G `groups` each, config fields); each block has its own RMSNorm:
    [c_1 .. c_B | k_pe] = x W_DKV
    c_b  = RMSNorm_b(c_b) * sqrt(d / d_b)             (cached; `latent_norm=False`: c_b as is)
    k_pe = RoPE(k_pe), ONE rope key shared by all heads (cached)
Block b = (branch r, group g) serves the H_g = h / G query heads of group g:
    k_nope_bi = c_b W_UK,b,i     v_bi = c_b W_UV,b,i  (head i of group g)
    y_i = R^-1/2 sum_r softmax_t((q_nope_i . k_nope_(r,g),i + q_pe_i . k_pe) / sqrt(d_n + d_r)) V_(r,g),i

which gives the variants (the registry pins R and G per name):
    MLA    R = 1, G = 1  one latent, one softmax per head
    GLA-G  R = 1, G = 2|4 latent heads, each serving a contiguous group of heads
    MLRA-4 R = 4, G = 1  every head attends to every block with a separate softmax
    MLRA-2 R = 2, G = 2  two GLA-2 branches, summed
MLA puts the block sum inside one softmax; MLRA moves it outside. Cache per
token: d_c + d_r for all of them (576 at the MLRA paper's config).
`scales=False` is the authors' *_no_scale ablation: no sqrt(d / .) variance
scales and no R^-1/2 on the branch sum.

Two forms of the same attention (`attend`), both through `mla_jax.attention.core`:
  naive (expanded): per-head keys [k_nope | k_pe] and values re-expanded from
    the latent, one `core.expanded` per branch;
  absorbed: fold W_UK into the query, attend over the latent itself
    (`core.absorbed`, MQA over a d_b + d_r "head" per block), apply W_UV after:
    q~_bi = W_UK,b,i^T q_nope_i;  z_bi = softmax((q~_bi . c_b + q_pe_i . k_pe) / sqrt(d_n + d_r)) c_b
    y_i = R^-1/2 sum_r W_UV,(r,g),i^T z_(r,g),i
Decode uses the form --decode_impl names; training and prefill the one with
fewer FLOPs per query-key pair.

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
import numpy as np

from mla_jax import quant
from mla_jax.attention import core
from mla_jax.attention.base import Attention
from mla_jax.authors_layout import Layout, Param, linear
from mla_jax.config import AttentionConfig, check, option
from mla_jax.layers import RMSNorm, dense, param, rope, yarn_softmax_factor
from mla_jax.rules import constrain


@dataclasses.dataclass(frozen=True, kw_only=True)
class LatentConfig(AttentionConfig):
  q_lora_rank: int = option(64, "Query latent width (0 = full-rank query projection).")
  kv_lora_rank: int = option(64, "KV latent width d_c, all blocks together.")
  qk_nope_head_dim: int = option(32, "No-RoPE query/key width d_n.", legacy="head_dim")
  qk_rope_head_dim: int = option(16, "Decoupled RoPE width d_r (0 = none: MLA without RoPE).",
                                 legacy="rope_head_dim")
  v_head_dim: int | None = option(None, "Value width d_v (default d_n).")
  scales: bool = option(True, "The MLRA code base's variance scales (False: the authors' *_no_scale "
                              "ablation, which also drops the 1/sqrt(branches) of the branch sum).",
                        flag="latent_scales")
  gated: bool = option(False, "Output gate sigmoid(x W_g) before the output projection.")
  branches: int = option(1, "R: separate softmaxes summed per head (MLRA).")
  groups: int = option(1, "G: latent blocks per branch, each serving num_heads / G query heads (GLA).")
  latent_norm: bool = option(True, "RMSNorm each latent block (False: the latent is x W_DKV itself, as a "
                                   "model converted from MHA/GQA by mla_jax.convert_latent holds it).")

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
    check(self.branches >= 1 and self.groups >= 1,
          f"branches and groups must be >= 1, got {self.branches} and {self.groups}")
    check(self.kv_lora_rank >= 1, f"kv_lora_rank must be >= 1, got {self.kv_lora_rank}")
    check(self.q_lora_rank >= 0, f"q_lora_rank must be >= 0, got {self.q_lora_rank}")
    check(self.qk_nope_head_dim >= 1, f"qk_nope_head_dim must be >= 1, got {self.qk_nope_head_dim}")
    check(self.qk_rope_head_dim >= 0 and self.qk_rope_head_dim % 2 == 0,
          f"qk_rope_head_dim must be even and >= 0, got {self.qk_rope_head_dim}")
    check(self.value_dim >= 1, f"v_head_dim must be >= 1, got {self.v_head_dim}")
    check(self.kv_lora_rank % self.num_blocks == 0,
          f"{self.variant}: kv_lora_rank={self.kv_lora_rank} must split into {self.num_blocks} "
          f"equal blocks; use a multiple of {self.num_blocks}")
    check(self.num_heads % self.groups == 0,
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

  def partition_entries_name(self):
    if self.num_blocks == 1:
      return "latent (one, replicated on every device)"
    return "latent heads" if self.branches == 1 else "latent blocks"

  def training_form(self) -> str:
    """Per query-key pair the expanded form multiplies over d_n + d_r (scores)
    and d_v (values); the absorbed form over d_b + d_r and d_b. Narrow blocks
    (MLRA's) make the absorbed form the cheaper one in training too."""
    expanded = self.qk_nope_head_dim + self.qk_rope_head_dim + self.value_dim
    absorbed = 2 * self.block_dim + self.qk_rope_head_dim
    return "absorbed" if absorbed < expanded else "naive"


class LatentAttention(Attention):
  Config = LatentConfig

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
      self.q_norm = RMSNorm(config.q_lora_rank, ("q_lora",), eps=self.norm_eps, param_dtype=self.param_dtype)
      self.wq_b = param(rngs, (config.q_lora_rank, groups, per_group, dn + dr),
                        ("q_lora",) + self.head_axes + ("qk_dim",), **p)
    else:
      self.wq = param(rngs, (d, groups, per_group, dn + dr), ("embed",) + self.head_axes + ("qk_dim",), **p)
    self.w_dkv = param(rngs, (d, nb, db), ("embed", "latent_blocks", "latent_dim"), **p)
    if config.latent_norm:
      self.kv_norm = RMSNorm((nb, db), ("latent_blocks", "latent_dim"), eps=self.norm_eps,
                             param_dtype=self.param_dtype)
    if dr:
      self.w_kr = param(rngs, (d, dr), ("embed", "rope_dim"), **p)
    self.w_uk = param(rngs, (nb, db, per_group, dn), ("latent_blocks", "latent_dim", "q_per_entry", "qk_nope"), **p)
    self.w_uv = param(rngs, (nb, db, per_group, dv), ("latent_blocks", "latent_dim", "q_per_entry", "v_dim"), **p)
    self.wo = param(rngs, (groups, per_group, dv, d), self.head_axes + ("v_dim", "embed"),
                    std=self.out_std, dtype=self.param_dtype)
    if config.gated:
      self.wg = param(rngs, (d, groups, per_group, dv), ("embed",) + self.head_axes + ("v_dim",), **p)
    self.q_scale = math.sqrt(d / config.q_lora_rank) if (config.scales and config.q_lora_rank) else 1.0
    self.kv_scale = math.sqrt(d / db) if (config.scales and config.latent_norm) else 1.0
    self.softmax_scale = yarn_softmax_factor(config) / math.sqrt(dn + dr)

  def cache_entries(self, x, positions):
    latent = dense(x, self.w_dkv[...], "bsd,dnc->bsnc", self.dtype)
    if self.config.latent_norm:
      latent = self.kv_norm(latent) * self.kv_scale
    out = {"kv_latent": constrain(latent, ("batch", "length", "latent_blocks", "latent_dim"))}
    if self.config.qk_rope_head_dim:
      out["rope_key"] = rope(dense(x, self.w_kr[...], "bsd,dr->bsr", self.dtype), positions, self.config)
    return out

  def _queries(self, x, positions):
    """q_nope [B, S, G, J, d_n] and rotated q_pe [B, S, G, J, d_r]."""
    cfg = self.config
    if cfg.q_lora_rank:
      c_q = self.q_norm(dense(x, self.wq_a[...], "bsd,dr->bsr", self.dtype)) * self.q_scale
      q = dense(c_q, self.wq_b[...], "bsr,rgjk->bsgjk", self.dtype)
    else:
      q = dense(x, self.wq[...], "bsd,dgjk->bsgjk", self.dtype)
    q = constrain(q, ("batch", "length") + self.head_axes + ("qk_dim",))
    return q[..., :cfg.qk_nope_head_dim], rope(q[..., cfg.qk_nope_head_dim:], positions, cfg)

  def _blocks(self, w):
    """[B_blocks, ...] -> [R, G, ...]: block b = branch r * G + group g."""
    return w.reshape((self.config.branches, self.config.groups) + w.shape[1:])

  def reads_pages(self) -> bool:
    """Decoding through the latent kernel, which reads page pools in place."""
    return self.backend.decode_kernel != "none" and self.backend.decode_form == "absorbed"

  def _form(self, kv_len) -> str:
    if kv_len is not None:                        # over a cache: the form the run options name
      return self.backend.decode_form
    if self.backend.training == "dpa":            # dot_product_attention needs per-head keys
      return "naive"
    return self.config.training_form()

  def attend(self, x, positions, kv, kv_len):
    cfg = self.config
    q_nope, q_pe = self._queries(x, positions)                          # [B, S, G, J, *]
    rope_key = kv.get("rope_key")                                       # [B, T, d_r], shared by all heads
    w_uk, w_uv = self._blocks(self.w_uk[...]), self._blocks(self.w_uv[...])   # [R, G, d_b, J, *]
    if self._form(kv_len) == "absorbed":
      q_latent = dense(q_nope, w_uk, "bsgjn,rgcjn->brgjsc", self.dtype)
      # the cache as stored, [B, T, R x G, d_b] (or its pages): the core reads blocks off q_latent's axes
      z, _ = core.absorbed(q_latent, kv["kv_latent"], scale=self.softmax_scale, kv_len=kv_len,
                           q_rope=core.heads_major(q_pe) if cfg.qk_rope_head_dim else None, rope_key=rope_key,
                           backend=self.backend)                        # [B, R, G, J, S, d_b]
      y = dense(z, w_uv, "brgjsc,rgcjv->bsgjv", self.dtype)             # sums the branches
    else:
      # the reference form re-expands every key anyway: an 8-bit latent is dequantized whole here
      latent = quant.dequantized(kv["kv_latent"], self.dtype)
      cache = latent.reshape(latent.shape[:2] + (cfg.branches, cfg.groups, cfg.block_dim))
      q = core.heads_major(jnp.concatenate([q_nope, q_pe], -1) if cfg.qk_rope_head_dim else q_nope)
      # per-head keys and values, the branches as the core's branch axis: [B, G, J, R, T, *]
      key = dense(cache, w_uk, "btrgc,rgcjn->bgjrtn", self.dtype)
      value = dense(cache, w_uv, "btrgc,rgcjv->bgjrtv", self.dtype)
      if cfg.qk_rope_head_dim:
        # K = [k_nope | k_pe] with the shared rope key copied to every head (as
        # the authors do): its gradient then sums over a key-sized tensor, not
        # over the (much larger) scores.
        k_pe = rope_key.astype(self.dtype)[:, None, None, None]
        key = jnp.concatenate([key, jnp.broadcast_to(k_pe, key.shape[:-1] + k_pe.shape[-1:])], -1)
      out, _ = core.expanded(q, key, value, scale=self.softmax_scale, kv_len=kv_len, branched=True,
                             backend=self.backend)                      # summed over the branches
      y = core.token_major(out)                                         # [B, S, G, J, d_v]
    if cfg.scales:
      y = y / math.sqrt(cfg.branches)
    if cfg.gated:
      y = y * jax.nn.sigmoid(dense(x, self.wg[...], "bsd,dgjv->bsgjv", self.dtype))
    return dense(y, self.wo[...], "bsgjv,gjvd->bsd", self.dtype)

  @staticmethod
  def _refuse_converted(cfg: LatentConfig, where: str) -> None:
    if not cfg.latent_norm:
      raise ValueError(f"{where} has an RMSNorm on every latent, and this model (latent_norm=False) none")
    if cfg.rope_inv_freq:
      raise ValueError(f"{where} rotates a ladder of RoPE frequencies, and this model the source heads' "
                       "frequencies it kept (rope_inv_freq)")

  # ---- the MLRA authors' checkpoints (their model/mla.py, gla_2.py, gla_4.py, mlra_2.py,
  # mlra_4.py, the *_gated and *_no_scale forms; always a low-rank query, d_v = d_n)
  @staticmethod
  def authors_config(shape, config_json, num_heads):
    d_c = config_json.get("kv_lora_rank") or sum(shape(n)[-1] for n in shape.names if n.startswith("kv_a_layernorm"))
    q_rows, out_cols = shape("q_b_proj.weight")[0], shape("c_proj.weight")[1]     # h (d_n + d_r), h d_n
    d_r = config_json.get("qk_rope_head_dim", shape("kv_a_proj_with_mqa.weight")[0] - d_c)
    heads = config_json.get("n_head", num_heads)
    if heads is None:
      if d_r == 0:
        raise ValueError("no config.json and no rope key: pass --convert_num_heads")
      heads = (q_rows - out_cols) // d_r
    return dict(num_heads=heads, q_lora_rank=shape("q_a_proj.weight")[0], kv_lora_rank=d_c,
                qk_nope_head_dim=config_json.get("qk_nope_head_dim", out_cols // heads), qk_rope_head_dim=d_r,
                gated=shape.has("gated_proj"))

  @staticmethod
  def authors_layout(cfg: LatentConfig, d: int) -> Layout:
    h, dn, dr, dc, rq = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank, cfg.q_lora_rank
    nb, groups, per = cfg.num_blocks, cfg.groups, cfg.num_heads // cfg.groups
    if not rq or cfg.value_dim != dn:
      raise ValueError("the authors' latent models have a low-rank query and d_v = d_n")
    LatentAttention._refuse_converted(cfg, "the authors' layout")
    tensors = {"q_a_proj.weight": (rq, d), "q_a_layernorm.weight": (rq,), "q_b_proj.weight": (h * (dn + dr), rq),
               "kv_a_proj_with_mqa.weight": (dc + dr, d), "c_proj.weight": (d, h * dn)}
    params = [linear("wq_a", "q_a_proj.weight", d, rq),
              Param(("q_norm", "weight"), ("q_a_layernorm.weight",), lambda w: w),
              linear("wq_b", "q_b_proj.weight", rq, groups, per, dn + dr),           # head = g * per + j
              Param(("w_dkv",), ("kv_a_proj_with_mqa.weight",), lambda w: w.T[:, :dc].reshape(d, nb, dc // nb)),
              linear("wo", "c_proj.weight", groups, per, dn, d)]
    if dr:
      params.append(Param(("w_kr",), ("kv_a_proj_with_mqa.weight",), lambda w: w.T[:, dc:]))
    # Their up-projection per block: [k_nope | v] for each head the block serves.
    if nb == 1:                     # mla.py: one latent
      norms, ups = ("kv_a_layernorm.weight",), ("kv_b_proj.weight",)
      tensors.update({norms[0]: (dc,), ups[0]: (h * 2 * dn, dc)})
      up = lambda w: w.T.reshape(1, dc, h, 2 * dn)                                       # noqa: E731
    elif nb == 2:                   # gla_2.py: one Linear per latent head
      norms = tuple(f"kv_a_layernorm_{k}.weight" for k in (1, 2))
      ups = tuple(f"kv_b_proj_{k}.weight" for k in (1, 2))
      tensors.update({n: (dc // 2,) for n in norms} | {u: (per * 2 * dn, dc // 2) for u in ups})
      up = lambda *ws: np.stack([w.T.reshape(dc // 2, per, 2 * dn) for w in ws])         # noqa: E731
    else:                           # gla_4.py, mlra_*.py: one parameter [blocks, in, out] for all blocks
      norms, ups = tuple(f"kv_a_layernorms.{b}.weight" for b in range(nb)), ("kv_b_proj",)
      tensors.update({n: (dc // nb,) for n in norms} | {ups[0]: (nb, dc // nb, per * 2 * dn)})
      up = lambda w: w.reshape(nb, dc // nb, per, 2 * dn)                                 # noqa: E731
    params += [Param(("kv_norm", "weight"), norms, lambda *ws: np.stack(ws)),
               Param(("w_uk",), ups, lambda *ws: up(*ws)[..., :dn]),
               Param(("w_uv",), ups, lambda *ws: up(*ws)[..., dn:])]
    if cfg.gated:
      tensors["gated_proj.weight"] = (h * dn, d)
      params.append(linear("wg", "gated_proj.weight", d, groups, per, dn))
    return Layout(tensors, tuple(params))

  # ---- Hugging Face checkpoints: DeepSeek-V2/V3 MLA (`model.layers.{i}.self_attn.*`), whose
  # layout is the authors' one-latent layout with [k_nope | v] per head, d_v free, no
  # variance scales, and RoPE on interleaved pairs (V2 always, V3 unless rope_interleave
  # is false): the rope columns are de-interleaved here, which turns their pairwise
  # rotation into our half-split one (q_pe . k_pe is the same sum, reordered).
  @staticmethod
  def hf_config(hf):
    return dict(num_heads=hf["num_attention_heads"], q_lora_rank=hf.get("q_lora_rank") or 0,
                kv_lora_rank=hf["kv_lora_rank"], qk_nope_head_dim=hf["qk_nope_head_dim"],
                qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf.get("v_head_dim"), scales=False)

  @staticmethod
  def hf_layout(cfg: LatentConfig, d: int, hf: dict) -> Layout:
    if cfg.num_blocks != 1 or cfg.gated:
      raise ValueError("the DeepSeek format holds one latent per layer and no output gate (MLA); "
                       "export GLA/MLRA to the MLRA authors' layout")
    LatentAttention._refuse_converted(cfg, "the DeepSeek format")
    h, dn, dr, dv, dc, rq = (cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.value_dim,
                             cfg.kv_lora_rank, cfg.q_lora_rank)
    interleaved = hf.get("model_type") == "deepseek_v2" or hf.get("rope_interleave", True)
    rope_order = np.r_[0:dr:2, 1:dr:2] if interleaved else np.arange(dr)

    def queries(w):                 # their [h (d_n + d_r), in] -> our [in, 1, h, d_n + d_r]
      w = w.T.reshape(w.shape[1], h, dn + dr)
      return np.concatenate([w[..., :dn], w[..., dn:][..., rope_order]], -1)[:, None]

    tensors = {"kv_a_proj_with_mqa.weight": (dc + dr, d), "kv_a_layernorm.weight": (dc,),
               "kv_b_proj.weight": (h * (dn + dv), dc), "o_proj.weight": (d, h * dv)}
    if rq:
      tensors |= {"q_a_proj.weight": (rq, d), "q_a_layernorm.weight": (rq,), "q_b_proj.weight": (h * (dn + dr), rq)}
      params = [linear("wq_a", "q_a_proj.weight", d, rq),
                Param(("q_norm", "weight"), ("q_a_layernorm.weight",), lambda w: w),
                Param(("wq_b",), ("q_b_proj.weight",), queries)]
    else:
      tensors["q_proj.weight"] = (h * (dn + dr), d)
      params = [Param(("wq",), ("q_proj.weight",), queries)]
    params += [Param(("w_dkv",), ("kv_a_proj_with_mqa.weight",), lambda w: w.T[:, :dc].reshape(d, 1, dc)),
               Param(("kv_norm", "weight"), ("kv_a_layernorm.weight",), lambda w: w.reshape(1, dc)),
               Param(("w_uk",), ("kv_b_proj.weight",), lambda w: w.T.reshape(1, dc, h, dn + dv)[..., :dn]),
               Param(("w_uv",), ("kv_b_proj.weight",), lambda w: w.T.reshape(1, dc, h, dn + dv)[..., dn:]),
               linear("wo", "o_proj.weight", 1, h, dv, d)]
    if dr:
      params.append(Param(("w_kr",), ("kv_a_proj_with_mqa.weight",), lambda w: w.T[:, dc:][:, rope_order]))
    return Layout(tensors, tuple(params))
