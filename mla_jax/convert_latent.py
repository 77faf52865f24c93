"""An MHA/MQA/GQA model turned into MLA, GLA-2/-4 or MLRA-2/-4 (MHA2MLA-style).

Source head i (of h) reads KV head j(i) (of h_kv), all d_h wide, RoPE on the
half-split pairs f = (f, f + d_h / 2), f < d_h / 2, inverse frequency w_f:
    score_i = q_i . k_j(i) / sqrt(d_h)    (both rotated by position)

1. One rope key for all heads (TransMLA's idea, MHA2MLA's selection). At each
   frequency f, mixing the KV heads with a unit vector u_f commutes with the
   rotation (every head's pair f turns by the same angle), so
       k_j,f = u_f,j k'_f + r_j,f      k'_f = sum_j u_f,j k_j,f
   with u_f the top eigenvector of the heads' key covariance at f (calibration
   batch): k'_f holds as much of the keys at f as one pair can. The rope key
   keeps k'_f at the d_r / 2 frequencies of largest contribution
       c_f = sum_i mean_t |u_f,j(i) q_i,f| * mean_t |k'_f|
   (MHA2MLA's 2-norm rule, after the mixing), each layer's c normalised to sum
   1 and summed over layers (the frequencies are the model's, `rope_inv_freq`);
   head i's rope query at f is u_f,j(i) q_i,f. Everything else loses its
   rotation: the residuals r_j,f at kept f, the whole pair elsewhere, so the
   no-RoPE key of KV head j is k_j with r_j,f in place of k_j,f at kept f, and
   the no-RoPE query is q_i itself:
       score_i = (q_i . k~_j(i) + q_pe,i . k_pe) / sqrt(d_h)
   exact where the source has no RoPE, or one KV head and every frequency kept.
2. Keys and values into latents, per block b = (branch r, group g): the
   no-RoPE keys of the KV heads group g's query heads read, beside their values
   (MLRA: the r-th of R slices of each value, since each branch attends with its
   own softmax and needs the whole score), M_b = [K~_g | V_g,r] (d x m). The
   block's d_b directions are the top right singular vectors V_b of X M_b on
   the calibration batch (X the layer's attention inputs):
       W_DKV,b = M_b V_b      [W_UK,b | W_UV,b] = V_b^T
   exact when d_b >= rank(X M_b), i.e. at kv_lora_rank = B min(d, m) (`full_rank`).
3. The query is full rank (q_lora_rank 0), scaled by sqrt((d_h + d_r) / d_h)
   for the latent model's softmax scale; no latent norm (`latent_norm=False`:
   an RMSNorm has no identity weights), no variance scales (`scales=False`);
   W_O, the gate, embeddings, norms and MLPs carry over.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from mla_jax import registry
from mla_jax.config import ModelConfig

SOURCES = ("mha", "mqa", "gqa")
TARGETS = ("mla", "gla2", "gla4", "mlra2", "mlra4")


class ConvertLatentError(ValueError):
  pass


def _structure(variant: str) -> tuple[int, int]:
  pins = registry.get(variant).pinned
  return pins["branches"], pins["groups"]


def _groups_kv_heads(h: int, h_kv: int, groups: int) -> list[list[int]]:
  """The KV heads each group of h / G contiguous query heads reads."""
  per_group, per_kv = h // groups, h // h_kv
  return [sorted({i // per_kv for i in range(g * per_group, (g + 1) * per_group)}) for g in range(groups)]


def block_width(source: ModelConfig, variant: str) -> int:
  """m: what one block of `variant` factors (its keys and its share of the values)."""
  a = source.attention
  branches, groups = _structure(variant)
  kv_heads = len(_groups_kv_heads(a.num_heads, a.num_kv_heads, groups)[0])
  return kv_heads * a.head_dim + kv_heads * a.head_dim // branches


def full_rank(source: ModelConfig, variant: str) -> int:
  """The kv_lora_rank from which the latents hold the no-RoPE keys and values exactly."""
  branches, groups = _structure(variant)
  return branches * groups * min(source.d_model, block_width(source, variant))


def check(source: ModelConfig, variant: str, kv_lora_rank: int, rope_head_dim: int) -> None:
  """One line for what cannot be converted, before any work."""
  a = source.attention
  if a.variant not in SOURCES:
    raise ConvertLatentError(f"the source is a {a.variant} model; convert_latent turns MHA, MQA or GQA "
                             "models into latent ones (convert the model it came from)")
  if variant not in TARGETS:
    raise ConvertLatentError(f"cannot convert into {variant!r}; choose one of {', '.join(TARGETS)}")
  if a.qkv_bias or a.qk_norm:
    raise ConvertLatentError("the source has q/k/v biases or q/k norms (Qwen2, Qwen3), which the latent "
                             "models have no place for")
  if a.rope_scaling == "yarn":
    raise ConvertLatentError("the source uses yarn RoPE scaling, whose factor on cos and sin the "
                             "conversion does not carry; convert a model with plain, linear or llama3 RoPE")
  branches, groups = _structure(variant)
  if a.num_heads % groups:
    raise ConvertLatentError(f"{variant} splits the heads into {groups} groups, and the source has "
                             f"{a.num_heads}")
  if a.head_dim % branches:
    raise ConvertLatentError(f"{variant} splits each value into {branches} slices, and the source's heads "
                             f"are {a.head_dim} wide")
  blocks, full = branches * groups, full_rank(source, variant)
  if kv_lora_rank < blocks or kv_lora_rank % blocks:
    raise ConvertLatentError(f"--kv_lora_rank={kv_lora_rank} does not split into {variant}'s {blocks} "
                             f"equal blocks; use a multiple of {blocks} (at most {full})")
  if kv_lora_rank > full:
    raise ConvertLatentError(f"--kv_lora_rank={kv_lora_rank} is larger than the full rank {full} of this "
                             f"source as {variant} ({blocks} x min(d_model {source.d_model}, "
                             f"{block_width(source, variant)})); use at most {full}")
  if rope_head_dim < 0 or rope_head_dim % 2:
    raise ConvertLatentError(f"--qk_rope_head_dim={rope_head_dim} must be even and >= 0")
  if rope_head_dim > a.head_dim:
    raise ConvertLatentError(f"--qk_rope_head_dim={rope_head_dim} is wider than the source's heads "
                             f"({a.head_dim}); use at most {a.head_dim}")
  if rope_head_dim and not a.rope:
    raise ConvertLatentError("the source has no RoPE (the GPT-2 flavour's positions): use "
                             "--qk_rope_head_dim=0")


def target_config(source: ModelConfig, variant: str, kv_lora_rank: int, rope_head_dim: int,
                  rope_inv_freq: tuple[float, ...] = ()) -> ModelConfig:
  check(source, variant, kv_lora_rank, rope_head_dim)
  a = source.attention
  rope = {f.name: getattr(a, f.name) for f in dataclasses.fields(a) if f.name.startswith("rope_")}
  rope |= {"rope_scaling": "none", "rope_inv_freq": tuple(rope_inv_freq)}     # the kept frequencies say it all
  attention = registry.attention_config(
      variant, num_heads=a.num_heads, q_lora_rank=0, kv_lora_rank=kv_lora_rank, qk_nope_head_dim=a.head_dim,
      qk_rope_head_dim=rope_head_dim, scales=False, latent_norm=False, gated=a.gated, **rope)
  return source.replace(attention=attention)


# ----------------------------------------------------------------------------- the math, per layer


def _pairs(d_h: int) -> tuple[np.ndarray, np.ndarray]:
  return np.arange(d_h // 2), np.arange(d_h // 2) + d_h // 2


def mix_and_score(x: np.ndarray, w: dict, cfg) -> tuple[np.ndarray, np.ndarray]:
  """Per frequency: the KV-head mixing u [d_h/2, h_kv] and the contribution c [d_h/2] (summing to 1)."""
  h, h_kv, d_h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  re, im = _pairs(d_h)
  k = np.einsum("nd,djk->njk", x, w["wk"])                     # [N, h_kv, d_h], before RoPE:
  q = np.einsum("nd,dik->nik", x, w["wq"])                     # a pair's norm and the heads' covariance
  u = np.zeros((d_h // 2, h_kv))                               # at f do not depend on the rotation
  c = np.zeros(d_h // 2)
  kv_of = np.arange(h) // (h // h_kv)
  for f in range(d_h // 2):
    pair = k[:, :, [re[f], im[f]]]                             # [N, h_kv, 2]
    cov = np.einsum("njc,nlc->jl", pair, pair)
    vec = np.linalg.eigh(cov)[1][:, -1]
    vec = vec * np.sign(vec[np.argmax(np.abs(vec))])           # a fixed sign: the same result every run
    u[f] = vec
    mixed_key = np.linalg.norm(np.einsum("j,njc->nc", vec, pair), axis=-1).mean()
    query = np.linalg.norm(q[:, :, [re[f], im[f]]], axis=-1).mean(0)       # [h]
    c[f] = (np.abs(vec[kv_of]) * query).sum() * mixed_key
  return u, c / max(c.sum(), 1e-30)


def convert_attention(x: np.ndarray, w: dict, source, target, kept: np.ndarray, u: np.ndarray) -> dict:
  """The latent attention's parameters (our names and shapes) for one layer.

  x [N, d]: the layer's attention inputs on the calibration batch; w: the source
  attention's parameters; kept: the source frequencies the rope key keeps (in
  the target's rope order); u: their KV-head mixing [d_h/2, h_kv]."""
  h, h_kv, d_h = source.num_heads, source.num_kv_heads, source.head_dim
  d, d_r = w["wq"].shape[0], target.qk_rope_head_dim
  branches, groups = target.branches, target.groups
  per_group, nb, d_b = h // groups, target.num_blocks, target.block_dim
  re, im = _pairs(d_h)
  kv_of = np.arange(h) // (h // h_kv)
  scale = math.sqrt((d_h + d_r) / d_h)           # the latent model divides scores by sqrt(d_n + d_r)
  wq, wk, wv = (w[n].astype(np.float64) for n in ("wq", "wk", "wv"))

  rope_cols = np.concatenate([re[kept], im[kept]])               # source columns of the rope pairs, target order
  u_kept = np.concatenate([u[kept], u[kept]])                    # [d_r, h_kv]
  w_kr = np.einsum("djr,rj->dr", wk[:, :, rope_cols], u_kept)    # k'_f
  q_pe = wq[:, :, rope_cols] * u_kept[:, kv_of].T[None]          # u_f,j(i) q_i,f: [d, h, d_r]
  k_nope = wk.copy()                                             # the residuals r_j,f at kept f
  k_nope[:, :, rope_cols] -= w_kr[:, None, :] * u_kept.T[None]

  out = {"wq": (np.concatenate([wq, q_pe], -1) * scale).reshape(d, groups, per_group, d_h + d_r)}
  if d_r:
    out["w_kr"] = w_kr
  w_dkv = np.zeros((d, nb, d_b))
  w_uk = np.zeros((nb, d_b, per_group, d_h))
  w_uv = np.zeros((nb, d_b, per_group, d_h))
  xs = x.astype(np.float64)
  value_slice = d_h // branches
  for g, kv_heads in enumerate(_groups_kv_heads(h, h_kv, groups)):
    for r in range(branches):
      b = r * groups + g                                         # block order: branch-major
      cols = slice(r * value_slice, (r + 1) * value_slice)
      m_b = np.concatenate([k_nope[:, kv_heads].reshape(d, -1), wv[:, kv_heads, cols].reshape(d, -1)], -1)
      directions = np.linalg.svd(xs @ m_b, full_matrices=False)[2][:d_b].T      # [m, <= d_b]
      w_dkv[:, b, :directions.shape[1]] = m_b @ directions
      up = np.zeros((d_b, m_b.shape[1]))
      up[:directions.shape[1]] = directions.T
      keys, values = up[:, :len(kv_heads) * d_h], up[:, len(kv_heads) * d_h:]
      for jj in range(per_group):
        slot = kv_heads.index(kv_of[g * per_group + jj])
        w_uk[b, :, jj] = keys[:, slot * d_h:(slot + 1) * d_h]
        w_uv[b, :, jj, cols] = values[:, slot * value_slice:(slot + 1) * value_slice]
  out |= {"w_dkv": w_dkv, "w_uk": w_uk, "w_uv": w_uv,
          "wo": w["wo"].reshape(groups, per_group, d_h, -1)}
  if source.gated:
    out["wg"] = w["wg"].reshape(d, groups, per_group, d_h)
  return out


# ----------------------------------------------------------------------------- the model


def attention_inputs(model, tokens) -> list[np.ndarray]:
  """Each layer's attention input (after its norm) over `tokens` [B, S], as [B S, d]."""
  import jax.numpy as jnp
  from flax import nnx

  from mla_jax.model import from_per_layer_params, per_layer_params
  if model.config.scan_layers:                                  # walk the layers one by one
    model = from_per_layer_params(model.config.replace(scan_layers=False), per_layer_params(model),
                                  model.options)

  @nnx.jit
  def inputs(model, tokens):
    positions = model._positions(tokens)
    x, out = model._embed(tokens, positions), []
    for layer in model.layers:
      out.append(layer.attn_norm(x))
      x = layer(x, positions)
    return out
  return [np.asarray(x, np.float64).reshape(-1, x.shape[-1]) for x in inputs(model, jnp.asarray(tokens))]


def convert(model, variant: str, kv_lora_rank: int, rope_head_dim: int, calibration_tokens) -> tuple:
  """(the latent model, what the conversion chose): `model` an MHA/MQA/GQA
  Transformer, `calibration_tokens` [B, S] token ids of its kind of text."""
  from mla_jax.layers import rope_frequencies
  from mla_jax.model import from_per_layer_params, per_layer_params
  source = model.config
  check(source, variant, kv_lora_rank, rope_head_dim)
  a = source.attention
  tokens = np.asarray(calibration_tokens)
  needed = block_width(source, variant)
  if tokens.size < needed:
    raise ConvertLatentError(f"the calibration batch holds {tokens.size} tokens; the SVD needs at least "
                             f"{needed}: give more calibration batches")
  values = {path: np.asarray(v, np.float64) for path, v in per_layer_params(model).items()}
  inputs = attention_inputs(model, tokens)

  def attn(i):
    prefix = ("layers", i, "attn")
    return {path[3]: v for path, v in values.items() if path[:3] == prefix}

  mixes, scores = zip(*(mix_and_score(x, attn(i), a) for i, x in enumerate(inputs)))
  kept = np.sort(np.argsort(-np.sum(scores, 0), kind="stable")[:rope_head_dim // 2])
  inv_freq = np.asarray(rope_frequencies(a.head_dim, a.rope_theta, a)[0]) if a.rope else np.zeros(0)
  target = target_config(source, variant, kv_lora_rank, rope_head_dim, tuple(inv_freq[kept]))
  out = {path: v for path, v in values.items() if path[2:3] != ("attn",)}
  for i, x in enumerate(inputs):
    layer = convert_attention(x, attn(i), a, target.attention, kept, mixes[i])
    out |= {("layers", i, "attn", name): v for name, v in layer.items()}
  converted = from_per_layer_params(target, out, model.options)
  captured = float(np.mean([s[kept].sum() for s in scores])) if rope_head_dim else 0.0
  return converted, {"kept_frequencies": kept.tolist(), "rope_contribution_kept": captured,
                     "cache_per_token": target.cache_elements_per_token(),
                     "source_cache_per_token": source.cache_elements_per_token(), "full_rank": full_rank(source, variant)}
