"""Generation under one `jax.jit`: prefill, then a `lax.while_loop` of decode steps.

Fixed shapes throughout (a cache of prompt_len + max_new_tokens slots, per-
sequence lengths), so the whole loop compiles once; no Python loop per token.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mla_jax.attention.base import check_decode_impl


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")


def sample_logits(logits: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
  """logits [B, V] -> token ids [B]."""
  logits = logits.astype(jnp.float32)
  if sampling.temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / sampling.temperature
  neg = jnp.finfo(jnp.float32).min
  if sampling.top_k:
    kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if sampling.top_p < 1.0:
    # Keep the smallest set of most likely tokens whose mass reaches top_p.
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < sampling.top_p             # the top token always stays
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, neg, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass
class Generated:
  tokens: np.ndarray    # [B, max_new_tokens], pad after a sequence stops
  lengths: np.ndarray   # [B] tokens generated, the stop token included


def generate(model: nnx.Module, prompts, prompt_lengths, *, max_new_tokens: int,
             rng: jax.Array | int = 0, sampling: Sampling = Sampling(), stop_token: int | None = None,
             pad_token: int = 0, decode_impl: str = "absorbed", cache_dtype=jnp.float32) -> Generated:
  """Continue each prompt. prompts: [B, S] right-padded; prompt_lengths: [B] (1..S)."""
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
  check_decode_impl(decode_impl)
  config = model.config
  if config.flavour == "gpt2" and prompts.shape[1] + max_new_tokens > config.max_seq_len:
    raise ValueError(f"prompt width {prompts.shape[1]} + max_new_tokens {max_new_tokens} exceeds "
                     f"max_seq_len={config.max_seq_len} (the GPT-2 flavour's position table); "
                     "generate fewer tokens")
  if isinstance(rng, int):
    rng = jax.random.key(rng)
  graphdef, state = nnx.split(model)
  tokens, lengths = _generate(graphdef, state, jnp.asarray(prompts), jnp.asarray(prompt_lengths),
                              rng, max_new_tokens=max_new_tokens, sampling=sampling,
                              stop_token=stop_token, pad_token=pad_token,
                              decode_impl=decode_impl, cache_dtype=jnp.dtype(cache_dtype))
  return Generated(np.asarray(tokens), np.asarray(lengths))


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=(
    "max_new_tokens", "sampling", "stop_token", "pad_token", "decode_impl", "cache_dtype"))
def _generate(graphdef, state, prompts, prompt_lengths, rng, *, max_new_tokens, sampling,
              stop_token, pad_token, decode_impl, cache_dtype):
  model = nnx.merge(graphdef, state)
  batch, prompt_len = prompts.shape
  cache = model.init_cache(batch, prompt_len + max_new_tokens, cache_dtype)
  logits, cache = model.prefill(prompts, cache)
  rows = jnp.arange(batch)
  rng, sub = jax.random.split(rng)
  first = sample_logits(logits[rows, prompt_lengths - 1], sub, sampling)
  stop = -1 if stop_token is None else stop_token
  out = jnp.full((batch, max_new_tokens), pad_token, jnp.int32).at[:, 0].set(first)
  done = first == stop
  n_out = jnp.ones((batch,), jnp.int32)

  def cond(carry):
    step, _, _, _, done, _, _, _, _ = carry
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    step, token, cache, lengths, done, out, n_out, rng, params = carry
    # `lengths` = tokens already cached = the position of `token`. The weights
    # ride in the carry (loop-invariant, no copies) so the module is rebuilt from
    # this trace level's values: NNX transforms (scanned layers) require it.
    logits, cache = nnx.merge(graphdef, params).decode_step(token, cache, lengths, decode_impl)
    rng, sub = jax.random.split(rng)
    nxt = jnp.where(done, pad_token, sample_logits(logits, sub, sampling))
    out = out.at[:, step].set(nxt)
    n_out = n_out + (~done).astype(jnp.int32)
    done = done | (nxt == stop)
    return step + 1, nxt, cache, lengths + 1, done, out, n_out, rng, params

  carry = (jnp.int32(1), first, cache, prompt_lengths, done, out, n_out, rng, state)
  _, _, _, _, _, out, n_out, _, _ = jax.lax.while_loop(cond, body, carry)
  return out, n_out
