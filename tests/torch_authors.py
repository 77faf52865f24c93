"""The MLRA authors' training recipe in torch, for the training-parity test: their
model is `numpy_authors`' forward (their layout and formulas) run on torch
tensors for autograd, trained by torch's own AdamW, LambdaLR and gradient
clipping, with nanoGPT's weight-decay rule (parameters of rank >= 2 decay; on
their layout every norm weight is a vector), which is ours. Their own train_*.py
give every parameter to AdamW with weight_decay=0.1, norms included:
experiments/authors_parity.py --decay=all runs that. Nothing here imports mla_jax."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import torch

import numpy_authors

TORCH = SimpleNamespace(
    sqrt=torch.sqrt, exp=torch.exp, cos=torch.cos, sin=torch.sin, einsum=torch.einsum, where=torch.where,
    stack=torch.stack, concatenate=torch.cat, broadcast_to=torch.broadcast_to, outer=torch.outer,
    mean=lambda x, axis: x.mean(axis, keepdim=True), amax=lambda x, axis: x.amax(axis, keepdim=True),
    sum=lambda x, axis: x.sum(axis, keepdim=True), repeat=lambda x, n, axis: torch.repeat_interleave(x, n, axis),
    arange=lambda n: torch.arange(n, dtype=torch.float64), causal=lambda T: torch.tril(torch.ones(T, T, dtype=torch.bool)))


def warmup_cosine(step: int, peak: float, warmup: int, total: int, floor: float) -> float:
  """The learning rate of update `step` (0-based): linear from 0 over `warmup`
  updates, then half a cosine from `peak` down to `floor * peak` at `total`."""
  if step < warmup:
    return peak * step / warmup
  t = min(step - warmup, total - warmup) / max(total - warmup, 1)
  return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def train(variant: str, tensors: dict, config: dict, batches, *, lr: float, warmup: int, steps: int,
          min_lr_ratio: float, weight_decay: float, b1: float, b2: float, grad_clip: float,
          decays=lambda name, p: p.ndim >= 2, scales: bool = True) -> list[float]:
  """Per-step training losses (mean next-token cross-entropy over the batch) of
  the authors' model from `tensors`, in float64. `decays(name, tensor)` picks the
  parameters weight decay applies to (the default is nanoGPT's rule); scales=False
  trains their *_no_scale model."""
  params = {k: torch.tensor(np.asarray(v, np.float64), requires_grad=True)
            for k, v in tensors.items() if k != "lm_head.weight"}          # tied to the embedding
  groups = [{"params": [p for k, p in params.items() if decays(k, p)], "weight_decay": weight_decay},
            {"params": [p for k, p in params.items() if not decays(k, p)], "weight_decay": 0.0}]
  opt = torch.optim.AdamW(groups, lr=lr, betas=(b1, b2), eps=1e-8)
  schedule = torch.optim.lr_scheduler.LambdaLR(
      opt, lambda s: warmup_cosine(s, 1.0, warmup, steps, min_lr_ratio))
  losses = []
  for tokens in batches:
    tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    loss = torch.stack([
        torch.nn.functional.cross_entropy(
            numpy_authors.forward(variant, params, config, seq[:-1], scales, xp=TORCH), seq[1:])
        for seq in tokens]).mean()
    opt.zero_grad()
    loss.backward()
    if grad_clip:
      torch.nn.utils.clip_grad_norm_(list(params.values()), grad_clip)
    opt.step()
    schedule.step()
    losses.append(float(loss.detach()))
  return losses
