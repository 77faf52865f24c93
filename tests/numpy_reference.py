"""Independent NumPy implementations of each attention variant, written from the
equations in ../shared/reference/attention_variants.md: float64, one head and
one block at a time, flat head indices, no Flax and no mla_jax helpers.

Weights come in a flat, torch-like layout (heads concatenated along a matrix's
last axis, head i at columns [i * w, (i + 1) * w)); `tests/test_numpy_reference.py`
flattens the module's parameters into it.
"""
from __future__ import annotations

import numpy as np


def rms_norm(x, weight, eps=1e-6):
  return weight * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def rope(x, positions, theta=10000.0):
  """Half-split RoPE on the last axis; x [S, w], positions [S]."""
  w = x.shape[-1]
  if w == 0:
    return x
  half = w // 2
  freq = theta ** (-np.arange(half) * 2.0 / w)
  ang = positions[:, None] * freq[None, :]
  x1, x2 = x[:, :half], x[:, half:]
  return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x1 * np.sin(ang) + x2 * np.cos(ang)], -1)


def softmax_causal(scores):
  """scores [S, S] -> causal softmax over the last axis."""
  s = scores.copy()
  s[np.triu(np.ones_like(s, dtype=bool), 1)] = -np.inf
  s = s - s.max(-1, keepdims=True)
  p = np.exp(s)
  return p / p.sum(-1, keepdims=True)


def sigmoid(x):
  return 1 / (1 + np.exp(-x))


def gqa(x, positions, W, *, h, h_kv, d_h, use_rope=True, gated=False, theta=10000.0):
  """x [S, d] -> [S, d]. W: wq [d, h*d_h], wk/wv [d, h_kv*d_h], wo [h*d_h, d], wg [d, h*d_h]."""
  out_heads = []
  group = h // h_kv
  for i in range(h):
    j = i // group                                   # contiguous groups
    q = x @ W["wq"][:, i * d_h:(i + 1) * d_h]
    k = x @ W["wk"][:, j * d_h:(j + 1) * d_h]
    v = x @ W["wv"][:, j * d_h:(j + 1) * d_h]
    if use_rope:
      q, k = rope(q, positions, theta), rope(k, positions, theta)
    p = softmax_causal(q @ k.T / np.sqrt(d_h))
    out_heads.append(p @ v)
  y = np.concatenate(out_heads, -1)
  if gated:
    y = y * sigmoid(x @ W["wg"])
  return y @ W["wo"]


def _query(x, positions, W, *, h, d_n, d_r, q_lora, scales, d, theta):
  """Per-head (q_nope [S, d_n], rotated q_pe [S, d_r])."""
  if q_lora:
    c_q = rms_norm(x @ W["wq_a"], W["q_norm"])
    if scales:
      c_q = c_q * np.sqrt(d / q_lora)
    q = c_q @ W["wq_b"]
  else:
    q = x @ W["wq"]
  w = d_n + d_r
  heads = []
  for i in range(h):
    qi = q[:, i * w:(i + 1) * w]
    heads.append((qi[:, :d_n], rope(qi[:, d_n:], positions, theta)))
  return heads


def mla(x, positions, W, *, h, d_c, d_n, d_r, d_v, q_lora, scales=True, gated=False, theta=10000.0):
  """DeepSeek-V2 MLA. W: w_dkv [d, d_c], kv_norm [d_c], w_kr [d, d_r],
  w_uk [d_c, h*d_n], w_uv [d_c, h*d_v], wo [h*d_v, d] (+ query weights, wg)."""
  d = x.shape[1]
  queries = _query(x, positions, W, h=h, d_n=d_n, d_r=d_r, q_lora=q_lora, scales=scales, d=d, theta=theta)
  c_kv = rms_norm(x @ W["w_dkv"], W["kv_norm"]) * (np.sqrt(d / d_c) if scales else 1.0)
  k_pe = rope(x @ W["w_kr"], positions, theta) if d_r else np.zeros((x.shape[0], 0))
  out = []
  for i, (q_nope, q_pe) in enumerate(queries):
    k_nope = c_kv @ W["w_uk"][:, i * d_n:(i + 1) * d_n]
    v = c_kv @ W["w_uv"][:, i * d_v:(i + 1) * d_v]
    p = softmax_causal((q_nope @ k_nope.T + q_pe @ k_pe.T) / np.sqrt(d_n + d_r))
    out.append(p @ v)
  y = np.concatenate(out, -1)
  if gated:
    y = y * sigmoid(x @ W["wg"])
  return y @ W["wo"]


def gla(x, positions, W, *, h, n_latent, d_c, d_n, d_r, d_v, q_lora, scales=True, gated=False,
        theta=10000.0):
  """Grouped latent attention: latent head g (columns [g*d_l, (g+1)*d_l) of the
  latent, its own RMSNorm) serves query heads [g*h/n, (g+1)*h/n) in one softmax.
  W: w_uk[g] [d_l, (h/n)*d_n], w_uv[g] [d_l, (h/n)*d_v], kv_norm[g] [d_l]."""
  d = x.shape[1]
  d_l = d_c // n_latent
  per = h // n_latent
  queries = _query(x, positions, W, h=h, d_n=d_n, d_r=d_r, q_lora=q_lora, scales=scales, d=d, theta=theta)
  latent = x @ W["w_dkv"]
  k_pe = rope(x @ W["w_kr"], positions, theta) if d_r else np.zeros((x.shape[0], 0))
  out = []
  for i, (q_nope, q_pe) in enumerate(queries):
    g, j = i // per, i % per
    c = rms_norm(latent[:, g * d_l:(g + 1) * d_l], W["kv_norm"][g]) * (np.sqrt(d / d_l) if scales else 1.0)
    k_nope = c @ W["w_uk"][g][:, j * d_n:(j + 1) * d_n]
    v = c @ W["w_uv"][g][:, j * d_v:(j + 1) * d_v]
    p = softmax_causal((q_nope @ k_nope.T + q_pe @ k_pe.T) / np.sqrt(d_n + d_r))
    out.append(p @ v)
  y = np.concatenate(out, -1)
  if gated:
    y = y * sigmoid(x @ W["wg"])
  return y @ W["wo"]


def mlra(x, positions, W, *, h, branches, d_c, d_n, d_r, d_v, q_lora, n_blocks=4, scales=True,
         gated=False, theta=10000.0):
  """Multi-head low-rank attention (seed 002), written as the paper states it.

  MLRA-4 (branches 4): every head attends to each of the 4 blocks with a
  separate softmax; y_i = 1/sqrt(4) sum_b softmax(...) V_bi.
  MLRA-2 (branches 2): block 0 serves heads 0..h/2-1 and block 1 heads h/2..h-1
  (branch A); blocks 2 and 3 likewise (branch B); y = (y_A + y_B) / sqrt(2).
  scales=False (the authors' *_no_scale models): no variance scales and no
  1/sqrt(branches) on the sum.
  W: w_uk[b] [d_b, (heads of block b)*d_n], w_uv[b] likewise, kv_norm[b] [d_b].
  """
  d = x.shape[1]
  d_b = d_c // n_blocks
  per_branch = n_blocks // branches            # blocks per branch
  heads_per_block = h // per_branch
  queries = _query(x, positions, W, h=h, d_n=d_n, d_r=d_r, q_lora=q_lora, scales=scales, d=d, theta=theta)
  latent = x @ W["w_dkv"]
  k_pe = rope(x @ W["w_kr"], positions, theta) if d_r else np.zeros((x.shape[0], 0))
  y = np.zeros((x.shape[0], h * d_v))
  for b in range(n_blocks):
    c = rms_norm(latent[:, b * d_b:(b + 1) * d_b], W["kv_norm"][b]) * (np.sqrt(d / d_b) if scales else 1.0)
    first_head = (b % per_branch) * heads_per_block
    for j in range(heads_per_block):
      i = first_head + j
      q_nope, q_pe = queries[i]
      k_nope = c @ W["w_uk"][b][:, j * d_n:(j + 1) * d_n]
      v = c @ W["w_uv"][b][:, j * d_v:(j + 1) * d_v]
      p = softmax_causal((q_nope @ k_nope.T + q_pe @ k_pe.T) / np.sqrt(d_n + d_r))
      y[:, i * d_v:(i + 1) * d_v] += (p @ v) / (np.sqrt(branches) if scales else 1.0)
  if gated:
    y = y * sigmoid(x @ W["wg"])
  return y @ W["wo"]


def gta(x, positions, W, *, h, h_kv, d_h, d_r, theta=10000.0):
  """Grouped-tied attention. W: wq [d, h*d_h], w_kv [d, h_kv*d_h], w_kr [d, d_r],
  wo [h*d_h, d]. K_j = [s_j[:d_h-d_r] | RoPE(x W_KR)], V_j = s_j; the query's
  last d_r columns are rotated."""
  n = d_h - d_r
  k_rope = rope(x @ W["w_kr"], positions, theta)
  out = []
  for i in range(h):
    j = i // (h // h_kv)
    q = x @ W["wq"][:, i * d_h:(i + 1) * d_h]
    q = np.concatenate([q[:, :n], rope(q[:, n:], positions, theta)], -1)
    s = x @ W["w_kv"][:, j * d_h:(j + 1) * d_h]
    k = np.concatenate([s[:, :n], k_rope], -1)
    out.append(softmax_causal(q @ k.T / np.sqrt(d_h)) @ s)
  return np.concatenate(out, -1) @ W["wo"]


def tpa(x, positions, W, *, h, d_h, r_q, r_k, r_v, theta=10000.0):
  """Tensor product attention. W: wa_q [d, h*r_q] (head i, rank r at column
  i*r_q + r), wb_q [d, r_q*d_h] (rank r at columns r*d_h..), likewise k and v."""
  S = x.shape[0]

  def factor(name, rank, rotate):
    a = (x @ W["wa_" + name]).reshape(S, h, rank)
    b = (x @ W["wb_" + name]).reshape(S, rank, d_h)
    if rotate:
      b = np.stack([rope(b[:, r], positions, theta) for r in range(rank)], 1)
    # per head: sum_r a[:, i, r] b[:, r, :] / rank
    return [sum(a[:, i, r:r + 1] * b[:, r] for r in range(rank)) / rank for i in range(h)]

  qs, ks, vs = factor("q", r_q, True), factor("k", r_k, True), factor("v", r_v, False)
  out = [softmax_causal(qs[i] @ ks[i].T / np.sqrt(d_h)) @ vs[i] for i in range(h)]
  return np.concatenate(out, -1) @ W["wo"]


def mfa(x, positions, W, *, h, c, theta=10000.0):
  """MFA. W: wq_a [d, C_q], q_norm [C_q], wq_b [C_q, h*C], wk/wv [d, C], wo [h*C, d]."""
  c_q = rms_norm(x @ W["wq_a"], W["q_norm"])
  q = c_q @ W["wq_b"]
  k = rope(x @ W["wk"], positions, theta)
  v = x @ W["wv"]
  out = []
  for i in range(h):
    qi = rope(q[:, i * c:(i + 1) * c], positions, theta)
    out.append(softmax_causal(qi @ k.T / np.sqrt(c)) @ v)
  return np.concatenate(out, -1) @ W["wo"]
