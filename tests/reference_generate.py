"""FROZEN TEST REFERENCE: the dense `generate` of commit 2aa8fd5, before the
decode engine (mla_jax/engine.py) took its place. Tests compare the engine's
greedy tokens with this one's; do not change it to follow the library.

Generation under one `jax.jit`: prefill, then a `lax.while_loop` of decode steps.

Fixed shapes throughout (a cache of prompt_len + max_new_tokens slots, per-
sequence lengths), so the whole loop compiles once; no Python loop per token.
The decode path and the cache dtype are the model's run options
(`mla_jax.with_options(model, decode_impl=...)` changes them).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax import struct

from mla_jax.config import option


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""
  temperature: float = option(0.0, "Sampling temperature (0 = greedy).")
  top_k: int = option(0, "Top-k filter (0 = off).")
  top_p: float = option(1.0, "Top-p filter (1 = off).")

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


@struct.dataclass
class DecodeState:
  """The generation loop's carry."""
  step: jax.Array        # tokens generated so far (the next one goes to out[:, step])
  token: jax.Array       # [B] the last token, to feed next
  cache: object          # the model's KV cache
  lengths: jax.Array     # [B] tokens cached = the position of `token`
  done: jax.Array        # [B] sequences that emitted the stop token
  out: jax.Array         # [B, max_new_tokens]
  n_out: jax.Array       # [B] tokens generated, the stop token included
  rng: jax.Array
  params: object         # the weights (see the loop body)


def generate(model: nnx.Module, prompts, prompt_lengths, *, max_new_tokens: int,
             rng: jax.Array | int = 0, sampling: Sampling = Sampling(), stop_token: int | None = None,
             pad_token: int = 0) -> Generated:
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
                              stop_token=stop_token, pad_token=pad_token)
  return Generated(np.asarray(tokens), np.asarray(lengths))


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=(
    "max_new_tokens", "sampling", "stop_token", "pad_token"))
def _generate(graphdef, state, prompts, prompt_lengths, rng, *, max_new_tokens, sampling,
              stop_token, pad_token):
  model = nnx.merge(graphdef, state)
  batch, prompt_len = prompts.shape
  cache = model.init_cache(batch, prompt_len + max_new_tokens)
  logits, cache = model.prefill(prompts, cache)
  rows = jnp.arange(batch)
  rng, sub = jax.random.split(rng)
  first = sample_logits(logits[rows, prompt_lengths - 1], sub, sampling)
  stop = -1 if stop_token is None else stop_token
  out = jnp.full((batch, max_new_tokens), pad_token, jnp.int32).at[:, 0].set(first)

  def cond(s: DecodeState):
    return (s.step < max_new_tokens) & ~jnp.all(s.done)

  def body(s: DecodeState) -> DecodeState:
    # The weights ride in the carry (loop-invariant, no copies) so the module is
    # rebuilt from this trace level's values: NNX transforms (scanned layers) require it.
    logits, cache = nnx.merge(graphdef, s.params).decode_step(s.token, s.cache, s.lengths)
    rng, sub = jax.random.split(s.rng)
    nxt = jnp.where(s.done, pad_token, sample_logits(logits, sub, sampling))
    return DecodeState(step=s.step + 1, token=nxt, cache=cache, lengths=s.lengths + 1,
                       done=s.done | (nxt == stop), out=s.out.at[:, s.step].set(nxt),
                       n_out=s.n_out + (~s.done).astype(jnp.int32), rng=rng, params=s.params)

  start = DecodeState(step=jnp.int32(1), token=first, cache=cache, lengths=prompt_lengths, done=first == stop,
                      out=out, n_out=jnp.ones((batch,), jnp.int32), rng=rng, params=state)
  end = jax.lax.while_loop(cond, body, start)
  return end.out, end.n_out
