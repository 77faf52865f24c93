"""A NumPy forward pass written directly on the MLRA authors' tensor layout
(names and torch [out, in] weights as in their model/<variant>.py), for the
conversion tests. It shares nothing with mla_jax: float64, one sequence,
their formulas step by step."""
from __future__ import annotations

import numpy as np


def rms(x, w, eps=1e-6):
  return w * (x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps))


def rope(x):
  """x [T, ..., D]: half-split rotation at positions 0..T-1, base 10000."""
  T, D = x.shape[0], x.shape[-1]
  inv = 1.0 / 10000 ** (np.arange(0, D, 2) / D)
  ang = np.outer(np.arange(T), inv).reshape((T,) + (1,) * (x.ndim - 2) + (D // 2,))
  x1, x2 = x[..., : D // 2], x[..., D // 2:]
  return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x1 * np.sin(ang) + x2 * np.cos(ang)], -1)


def attention(q, k, v):
  """q [T, H, D], k [T, H, D], v [T, H, Dv]: causal, scale 1/sqrt(D) (flash-attn's default)."""
  T = q.shape[0]
  s = np.einsum("shd,thd->hst", q, k) / np.sqrt(q.shape[-1])
  s = np.where(np.tril(np.ones((T, T), bool))[None], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("hst,thd->shd", p, v)


def sigmoid(x):
  return 1 / (1 + np.exp(-x))


def _attn(variant, W, x, c, scales=True):
  T, d, H = x.shape[0], c["n_embd"], c["n_head"]
  lin = lambda name, inp: inp @ W[name].T                               # noqa: E731
  if variant in ("mha", "mqa", "gqa", "gqa_gated"):
    hd = c["head_dim"]
    group = c.get("group_size", 1) if variant != "mha" else 1
    q = rope(lin("c_q.weight", x).reshape(T, H, hd))
    k = rope(lin("c_k.weight", x).reshape(T, H // group, hd))
    v = lin("c_v.weight", x).reshape(T, H // group, hd)
    y = attention(q, np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)).reshape(T, -1)
    if variant == "gqa_gated":
      y = y * sigmoid(lin("c_gated.weight", x))
    return lin("c_proj.weight", y)
  if variant == "gta":
    hd, group = c["head_dim"], c["group_size"]
    dr = hd // 2
    q = lin("c_q.weight", x).reshape(T, H, hd)
    q = np.concatenate([q[..., : hd - dr], rope(q[..., hd - dr:])], -1)
    kvs = np.repeat(lin("kv_proj.weight", x).reshape(T, H // group, hd), group, axis=1)
    k_rope = np.broadcast_to(rope(lin("W_rope_k.weight", x)[:, None, :]), (T, H, dr))
    k = np.concatenate([kvs[..., : hd - dr], k_rope], -1)
    return lin("c_proj.weight", attention(q, k, kvs).reshape(T, -1))
  if variant == "tpa":
    hd, r, rq = c["head_dim"], c["rank"], c["q_rank"]

    def factor(name, rank, rotate):
      a = lin(f"c_qkv.W_A_{name}.weight", x).reshape(T, H, rank)
      b = lin(f"c_qkv.W_B_{name}.weight", x).reshape(T, rank, hd)
      return np.einsum("thr,trd->thd", a, rope(b) if rotate else b) / rank

    q, k, v = factor("q", rq, True), factor("k", r, True), factor("v", r, False)
    return lin("c_proj.weight", attention(q, k, v).reshape(T, -1))
  if variant == "mfa":
    C = c["head_dim"]
    q = rope((rms(lin("c_q.weight", x), W["q_layernorm.weight"]) @ W["w_q.weight"].T).reshape(T, H, C))
    k = rope(lin("c_k.weight", x)[:, None, :])
    v = lin("c_v.weight", x)[:, None, :]
    y = attention(q, np.repeat(k, H, axis=1), np.repeat(v, H, axis=1))
    return lin("c_proj.weight", y.reshape(T, -1))
  # the latent family
  dn, dr, dc, rq = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["kv_lora_rank"], c["q_lora_rank"]
  base = variant.replace("_gated", "")
  # their *_no_scale files (mla, gla_2, mlra_2) drop every scale: q, kv, and MLRA's 1/sqrt(branches)
  scale = (lambda v: v) if scales else (lambda v: 1.0)                  # noqa: E731
  cq = rms(lin("q_a_proj.weight", x), W["q_a_layernorm.weight"]) * scale(np.sqrt(d / rq))
  q = (cq @ W["q_b_proj.weight"].T).reshape(T, H, dn + dr)
  q = np.concatenate([q[..., :dn], rope(q[..., dn:])], -1)
  kv_a = lin("kv_a_proj_with_mqa.weight", x)
  ckv, k_pe = kv_a[:, :dc], rope(kv_a[:, None, dc:])                    # one rope key per token

  def with_rope(k_nope):
    return np.concatenate([k_nope, np.broadcast_to(k_pe, k_nope.shape[:2] + (dr,))], -1)

  if base == "mla":
    kv = (rms(ckv, W["kv_a_layernorm.weight"]) * scale(np.sqrt(d / dc)) @ W["kv_b_proj.weight"].T).reshape(T, H, 2 * dn)
    y = attention(q, with_rope(kv[..., :dn]), kv[..., dn:])
  elif base == "gla2":
    half = dc // 2
    parts = []
    for i in (1, 2):
      lat = rms(ckv[:, (i - 1) * half: i * half], W[f"kv_a_layernorm_{i}.weight"]) * scale(np.sqrt(d / half))
      parts.append((lat @ W[f"kv_b_proj_{i}.weight"].T).reshape(T, H // 2, 2 * dn))
    kv = np.concatenate(parts, axis=1)
    y = attention(q, with_rope(kv[..., :dn]), kv[..., dn:])
  else:
    nb = 4
    width = dc // nb
    lats = np.stack([rms(ckv[:, b * width:(b + 1) * width], W[f"kv_a_layernorms.{b}.weight"]) * scale(np.sqrt(d / width))
                     for b in range(nb)], 1)                              # [T, 4, width]
    kv = np.einsum("tld,ldo->tlo", lats, W["kv_b_proj"])
    if base == "gla4":
      kv = kv.reshape(T, H, 2 * dn)
      y = attention(q, with_rope(kv[..., :dn]), kv[..., dn:])
    elif base == "mlra4":
      kv = kv.reshape(T, nb, H, 2 * dn)
      y = sum(attention(q, with_rope(kv[:, i, :, :dn]), kv[:, i, :, dn:]) for i in range(nb)) * scale(1 / np.sqrt(nb))
    else:                                                                 # mlra2: blocks 0,1 and 2,3
      kv = kv.reshape(T, nb, H // 2, 2 * dn)
      branches = [kv[:, :2].reshape(T, H, 2 * dn), kv[:, 2:].reshape(T, H, 2 * dn)]
      y = sum(attention(q, with_rope(b[..., :dn]), b[..., dn:]) for b in branches) * scale(1 / np.sqrt(2))
  y = y.reshape(T, -1)
  if variant.endswith("_gated"):
    y = y * sigmoid(lin("gated_proj.weight", x))
  return lin("c_proj.weight", y)


def forward(variant: str, tensors: dict, config: dict, tokens, scales: bool = True) -> np.ndarray:
  """Logits [T, vocab] of the authors' model for one token sequence (scales=False:
  their *_no_scale model of the variant)."""
  W = {k: np.asarray(v, np.float64) for k, v in tensors.items()}
  x = W["transformer.wte.weight"][np.asarray(tokens)]
  for i in range(config["n_layer"]):
    p = f"transformer.h.{i}."
    attn = {k[len(p) + 5:]: v for k, v in W.items() if k.startswith(p + "attn.")}
    x = x + _attn(variant, attn, rms(x, W[p + "input_layernorm.weight"]), config, scales)
    h = rms(x, W[p + "post_attention_layernorm.weight"])
    g = h @ W[p + "mlp.c_fc1.weight"].T
    x = x + ((g * sigmoid(g)) * (h @ W[p + "mlp.c_fc2.weight"].T)) @ W[p + "mlp.c_proj.weight"].T
  return rms(x, W["layernorm.weight"]) @ W["transformer.wte.weight"].T
