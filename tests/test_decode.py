"""Cached decoding == one full forward pass, for every variant and decode path.

The reference is the model's own full causal forward over the whole sequence
(no cache involved). Prompts of different lengths share one batch, the prompt
padding is filled with garbage tokens that must not leak, and every parameter
is randomised (zero output projections would make attention invisible).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import GATED, SMALL_ATTENTION, random_model, small_config

PROMPT_LENS = np.array([2, 7, 4])
SEQ = 12


@nnx.jit
def _forward(model, tokens):
  return model(tokens)


@nnx.jit(static_argnames=("max_len", "dtype"))
def _prefill(model, tokens, max_len, dtype):
  cache = model.init_cache(tokens.shape[0], max_len, dtype)
  return model.prefill(tokens, cache)


@nnx.jit
def _decode(model, tokens, cache, lengths):
  return model.decode_step(tokens, cache, lengths)


def check_decode_matches_forward(config, decode_impl, *, seed=0, cache_dtype=jnp.float32,
                                 rtol=2e-5, atol=2e-5):
  model = random_model(config, seed, decode_impl=decode_impl)
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, config.vocab_size, (len(PROMPT_LENS), SEQ)).astype(np.int32)
  full = np.asarray(_forward(model, jnp.asarray(tokens)))

  # Right-padded prompts whose padding is garbage: it must never be attended to.
  width = PROMPT_LENS.max()
  garbage = rng.integers(0, config.vocab_size, (len(PROMPT_LENS), width)).astype(np.int32)
  prompts = np.where(np.arange(width) < PROMPT_LENS[:, None], tokens[:, :width], garbage)
  logits, cache = _prefill(model, jnp.asarray(prompts), SEQ, jnp.dtype(cache_dtype))
  for b, n in enumerate(PROMPT_LENS):
    np.testing.assert_allclose(np.asarray(logits)[b, :n], full[b, :n], rtol=rtol, atol=atol,
                               err_msg=f"prefill, sequence {b}")

  lengths = PROMPT_LENS.copy()
  rows = np.arange(len(lengths))
  for step in range(SEQ - PROMPT_LENS.max()):
    step_logits, cache = _decode(model, jnp.asarray(tokens[rows, lengths]), cache,
                                 jnp.asarray(lengths, jnp.int32))
    np.testing.assert_allclose(np.asarray(step_logits), full[rows, lengths], rtol=rtol, atol=atol,
                               err_msg=f"decode step {step} ({decode_impl}), positions {lengths}")
    lengths = lengths + 1
  return full


CASES = [(v, "llama", False) for v in SMALL_ATTENTION] + [(v, "llama", True) for v in GATED] + [
    ("mha", "gpt2", False), ("gqa", "gpt2", False), ("mla", "gpt2", False)]


@pytest.mark.parametrize("decode_impl", ["naive", "absorbed"])
@pytest.mark.parametrize("variant,flavour,gated", CASES)
def test_decode_matches_full_forward(variant, flavour, gated, decode_impl):
  config = small_config(variant, flavour=flavour, gated=gated)
  full = check_decode_matches_forward(config, decode_impl)
  # The test would prove nothing if attention were flat: make sure positions matter.
  assert np.abs(full[:, 1:] - full[:, :1]).max() > 1e-2


@pytest.mark.parametrize("decode_impl", ["naive", "absorbed"])
def test_gpt2_mha_with_rope(decode_impl):
  """The study's control: absolute positions AND RoPE on q/k (--mha_rope=on)."""
  with_rope = small_config("mha", flavour="gpt2", rope=True)
  full = check_decode_matches_forward(with_rope, decode_impl)
  without = check_decode_matches_forward(small_config("mha", flavour="gpt2"), decode_impl)
  assert np.abs(full - without).max() > 1e-3      # the rotation is really applied


@pytest.mark.parametrize("variant", ["mla", "mlra4"])
def test_study_mla_without_rope(variant):
  """d_r = 0: no rope key at all (the small-model study's "MLA"), GPT-2 positions."""
  config = small_config(variant, flavour="gpt2", qk_rope_head_dim=0)
  assert set(config.attention.cache_spec()) == {"kv_latent"}
  for impl in ("naive", "absorbed"):
    check_decode_matches_forward(config, impl)


@pytest.mark.parametrize("variant", ["gqa", "mla", "mlra2"])
def test_bf16_cache_close_to_fp32(variant):
  """A bf16 cache stores each entry rounded once; decode stays close to fp32."""
  config = small_config(variant)
  check_decode_matches_forward(config, "absorbed", cache_dtype=jnp.bfloat16, rtol=5e-2, atol=5e-2)
