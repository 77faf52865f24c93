"""`generate`: one batch of prompts through the decode engine (mla_jax/engine.py).

A thin use of the engine, so that there is one decode path: each prompt is a
request, the pool is sized for the batch, and the results come back as arrays.
The decode path and the cache dtype are the model's run options
(`mla_jax.with_options(model, decode_impl=...)` changes them).
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from mla_jax.engine import Engine, Request, Sampling, default_page_size, sample_logits  # noqa: F401  (re-exported)


@dataclasses.dataclass
class Generated:
  tokens: np.ndarray    # [B, max_new_tokens], pad after a sequence stops
  lengths: np.ndarray   # [B] tokens generated, the stop token included


def generate(model: nnx.Module, prompts, prompt_lengths, *, max_new_tokens: int,
             rng: jax.Array | int = 0, sampling: Sampling = Sampling(), stop_token=None,
             pad_token: int = 0, page_size: int | None = None, prefill_chunk: int = 64, drafter=None) -> Generated:
  """Continue each prompt. prompts: [B, S] right-padded; prompt_lengths: [B] (1..S).
  Sequence b samples with seed rng + b (its tokens do not depend on the others).
  `stop_token`: an id or several (any of them ends a sequence), or None."""
  prompts = np.asarray(prompts, np.int32)
  prompt_lengths = np.asarray(prompt_lengths, np.int32)
  if prompts.ndim != 2:
    raise ValueError(f"prompts must be [batch, length], got shape {prompts.shape}")
  if prompt_lengths.shape != (prompts.shape[0],):
    raise ValueError(f"prompt_lengths must be [batch]={prompts.shape[0]}, got {prompt_lengths.shape}")
  if prompt_lengths.min() < 1 or prompt_lengths.max() > prompts.shape[1]:
    raise ValueError(f"prompt lengths must lie in [1, {prompts.shape[1]}], got "
                     f"{prompt_lengths.min()}..{prompt_lengths.max()}")
  vocab = model.config.vocab_size
  if prompts.min() < 0 or prompts.max() >= vocab:
    raise ValueError(f"prompt token ids must lie in [0, {vocab}), got {prompts.min()}..{prompts.max()}")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  config = model.config
  max_len = int(prompt_lengths.max()) + max_new_tokens
  if config.flavour == "gpt2" and max_len > config.max_seq_len:
    raise ValueError(f"prompt length {prompt_lengths.max()} + max_new_tokens {max_new_tokens} exceeds "
                     f"max_seq_len={config.max_seq_len} (the GPT-2 flavour's position table); "
                     "generate fewer tokens")
  if not isinstance(rng, (int, np.integer)):
    rng = int(jax.random.randint(rng, (), 0, 2**30))
  batch = len(prompts)
  # One batch, known up front: one row count and one table width, so two compiles (prefill, decode).
  page_size = default_page_size() if page_size is None else page_size
  engine = Engine(model, max_seqs=batch, page_size=page_size, max_len=max_len, drafter=drafter,
                  prefill_chunk=min(prefill_chunk, 1 << (int(prompt_lengths.max()) - 1).bit_length()),
                  row_buckets=(batch,), width_buckets=(-(-max_len // page_size),))
  stop = () if stop_token is None else tuple(int(t) for t in np.atleast_1d(stop_token))
  for b in range(batch):
    engine.submit(Request(tuple(int(t) for t in prompts[b, :prompt_lengths[b]]), max_new_tokens, sampling,
                          stop, seed=int(rng) + b, id=b))
  tokens = np.full((batch, max_new_tokens), pad_token, np.int32)
  lengths = np.zeros(batch, np.int32)
  for done in engine.run():
    tokens[done.id, :len(done.tokens)] = done.tokens
    lengths[done.id] = len(done.tokens)
  return Generated(tokens, lengths)
