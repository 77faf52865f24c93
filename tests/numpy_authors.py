"""A forward pass written directly on the MLRA authors' tensor layout (names and
torch [out, in] weights as in their model/<variant>.py), for the conversion tests
(in NumPy) and the training-parity test (the same formulas in torch, for autograd:
`tests/torch_authors.py`). It shares nothing with mla_jax: float64, one sequence,
their formulas step by step. `xp` is the array library: NumPy's functions, or the
same names over torch."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np

NUMPY = SimpleNamespace(
    sqrt=np.sqrt, exp=np.exp, cos=np.cos, sin=np.sin, einsum=np.einsum, where=np.where, stack=np.stack,
    concatenate=np.concatenate, broadcast_to=np.broadcast_to, outer=np.outer,
    mean=lambda x, axis: np.mean(x, axis, keepdims=True), amax=lambda x, axis: x.max(axis, keepdims=True),
    sum=lambda x, axis: x.sum(axis, keepdims=True), repeat=lambda x, n, axis: np.repeat(x, n, axis=axis),
    arange=lambda n: np.arange(n, dtype=np.float64), causal=lambda T: np.tril(np.ones((T, T), bool)))


def rms(x, w, eps=1e-6, xp=NUMPY):
  return w * (x / xp.sqrt(xp.mean(x * x, -1) + eps))


def rope(x, xp=NUMPY):
  """x [T, ..., D]: half-split rotation at positions 0..T-1, base 10000."""
  T, D = x.shape[0], x.shape[-1]
  inv = 1.0 / 10000 ** (xp.arange(D // 2) * 2 / D)
  ang = xp.outer(xp.arange(T), inv).reshape((T,) + (1,) * (x.ndim - 2) + (D // 2,))
  x1, x2 = x[..., : D // 2], x[..., D // 2:]
  return xp.concatenate([x1 * xp.cos(ang) - x2 * xp.sin(ang), x1 * xp.sin(ang) + x2 * xp.cos(ang)], -1)


def attention(q, k, v, xp=NUMPY):
  """q [T, H, D], k [T, H, D], v [T, H, Dv]: causal, scale 1/sqrt(D) (flash-attn's default)."""
  T = q.shape[0]
  s = xp.einsum("shd,thd->hst", q, k) / math.sqrt(q.shape[-1])
  s = xp.where(xp.causal(T)[None], s, -np.inf)
  p = xp.exp(s - xp.amax(s, -1))
  p = p / xp.sum(p, -1)
  return xp.einsum("hst,thd->shd", p, v)


def sigmoid(x, xp=NUMPY):
  return 1 / (1 + xp.exp(-x))


def _attn(variant, W, x, c, scales=True, xp=NUMPY):
  T, d, H = x.shape[0], c["n_embd"], c["n_head"]
  lin = lambda name, inp: inp @ W[name].T                               # noqa: E731
  if variant in ("mha", "mqa", "gqa", "gqa_gated"):
    hd = c["head_dim"]
    group = c.get("group_size", 1) if variant != "mha" else 1
    q = rope(lin("c_q.weight", x).reshape(T, H, hd), xp)
    k = rope(lin("c_k.weight", x).reshape(T, H // group, hd), xp)
    v = lin("c_v.weight", x).reshape(T, H // group, hd)
    y = attention(q, xp.repeat(k, group, 1), xp.repeat(v, group, 1), xp).reshape(T, -1)
    if variant == "gqa_gated":
      y = y * sigmoid(lin("c_gated.weight", x), xp)
    return lin("c_proj.weight", y)
  if variant == "gta":
    hd, group = c["head_dim"], c["group_size"]
    dr = hd // 2
    q = lin("c_q.weight", x).reshape(T, H, hd)
    q = xp.concatenate([q[..., : hd - dr], rope(q[..., hd - dr:], xp)], -1)
    kvs = xp.repeat(lin("kv_proj.weight", x).reshape(T, H // group, hd), group, 1)
    k_rope = xp.broadcast_to(rope(lin("W_rope_k.weight", x)[:, None, :], xp), (T, H, dr))
    k = xp.concatenate([kvs[..., : hd - dr], k_rope], -1)
    return lin("c_proj.weight", attention(q, k, kvs, xp).reshape(T, -1))
  if variant == "tpa":
    hd, r, rq = c["head_dim"], c["rank"], c["q_rank"]

    def factor(name, rank, rotate):
      a = lin(f"c_qkv.W_A_{name}.weight", x).reshape(T, H, rank)
      b = lin(f"c_qkv.W_B_{name}.weight", x).reshape(T, rank, hd)
      return xp.einsum("thr,trd->thd", a, rope(b, xp) if rotate else b) / rank

    q, k, v = factor("q", rq, True), factor("k", r, True), factor("v", r, False)
    return lin("c_proj.weight", attention(q, k, v, xp).reshape(T, -1))
  if variant == "mfa":
    C = c["head_dim"]
    q = rope((rms(lin("c_q.weight", x), W["q_layernorm.weight"], xp=xp) @ W["w_q.weight"].T).reshape(T, H, C), xp)
    k = rope(lin("c_k.weight", x)[:, None, :], xp)
    v = lin("c_v.weight", x)[:, None, :]
    y = attention(q, xp.repeat(k, H, 1), xp.repeat(v, H, 1), xp)
    return lin("c_proj.weight", y.reshape(T, -1))
  # the latent family
  dn, dr, dc, rq = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["kv_lora_rank"], c["q_lora_rank"]
  base = variant.replace("_gated", "")
  # their *_no_scale files (mla, gla_2, mlra_2) drop every scale: q, kv, and MLRA's 1/sqrt(branches)
  scale = (lambda v: v) if scales else (lambda v: 1.0)                  # noqa: E731
  cq = rms(lin("q_a_proj.weight", x), W["q_a_layernorm.weight"], xp=xp) * scale(math.sqrt(d / rq))
  q = (cq @ W["q_b_proj.weight"].T).reshape(T, H, dn + dr)
  q = xp.concatenate([q[..., :dn], rope(q[..., dn:], xp)], -1)
  kv_a = lin("kv_a_proj_with_mqa.weight", x)
  ckv, k_pe = kv_a[:, :dc], rope(kv_a[:, None, dc:], xp)                    # one rope key per token

  def with_rope(k_nope):
    return xp.concatenate([k_nope, xp.broadcast_to(k_pe, k_nope.shape[:2] + (dr,))], -1)

  if base == "mla":
    kv = (rms(ckv, W["kv_a_layernorm.weight"], xp=xp) * scale(math.sqrt(d / dc)) @ W["kv_b_proj.weight"].T).reshape(T, H, 2 * dn)
    y = attention(q, with_rope(kv[..., :dn]), kv[..., dn:], xp)
  elif base == "gla2":
    half = dc // 2
    parts = []
    for i in (1, 2):
      lat = rms(ckv[:, (i - 1) * half: i * half], W[f"kv_a_layernorm_{i}.weight"], xp=xp) * scale(math.sqrt(d / half))
      parts.append((lat @ W[f"kv_b_proj_{i}.weight"].T).reshape(T, H // 2, 2 * dn))
    kv = xp.concatenate(parts, 1)
    y = attention(q, with_rope(kv[..., :dn]), kv[..., dn:], xp)
  else:
    nb = 4
    width = dc // nb
    lats = xp.stack([rms(ckv[:, b * width:(b + 1) * width], W[f"kv_a_layernorms.{b}.weight"], xp=xp) * scale(math.sqrt(d / width))
                     for b in range(nb)], 1)                              # [T, 4, width]
    kv = xp.einsum("tld,ldo->tlo", lats, W["kv_b_proj"])
    if base == "gla4":
      kv = kv.reshape(T, H, 2 * dn)
      y = attention(q, with_rope(kv[..., :dn]), kv[..., dn:], xp)
    elif base == "mlra4":
      kv = kv.reshape(T, nb, H, 2 * dn)
      y = sum(attention(q, with_rope(kv[:, i, :, :dn]), kv[:, i, :, dn:], xp) for i in range(nb)) * scale(1 / math.sqrt(nb))
    else:                                                                 # mlra2: blocks 0,1 and 2,3
      kv = kv.reshape(T, nb, H // 2, 2 * dn)
      branches = [kv[:, :2].reshape(T, H, 2 * dn), kv[:, 2:].reshape(T, H, 2 * dn)]
      y = sum(attention(q, with_rope(b[..., :dn]), b[..., dn:], xp) for b in branches) * scale(1 / math.sqrt(2))
  y = y.reshape(T, -1)
  if variant.endswith("_gated"):
    y = y * sigmoid(lin("gated_proj.weight", x), xp)
  return lin("c_proj.weight", y)


def forward(variant: str, tensors: dict, config: dict, tokens, scales: bool = True, xp=NUMPY):
  """Logits [T, vocab] of the authors' model for one token sequence (scales=False:
  their *_no_scale model of the variant). With xp=NUMPY the tensors are read as
  float64 arrays; with another xp they are used as given (torch: autograd flows)."""
  W = {k: np.asarray(v, np.float64) for k, v in tensors.items()} if xp is NUMPY else tensors
  x = W["transformer.wte.weight"][np.asarray(tokens) if xp is NUMPY else tokens]
  for i in range(config["n_layer"]):
    p = f"transformer.h.{i}."
    attn = {k[len(p) + 5:]: v for k, v in W.items() if k.startswith(p + "attn.")}
    x = x + _attn(variant, attn, rms(x, W[p + "input_layernorm.weight"], xp=xp), config, scales, xp)
    h = rms(x, W[p + "post_attention_layernorm.weight"], xp=xp)
    g = h @ W[p + "mlp.c_fc1.weight"].T
    x = x + ((g * sigmoid(g, xp)) * (h @ W[p + "mlp.c_fc2.weight"].T)) @ W[p + "mlp.c_proj.weight"].T
  return rms(x, W["layernorm.weight"], xp=xp) @ W["transformer.wte.weight"].T
