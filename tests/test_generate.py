"""Generation (the engine under one batch) against a naive loop of full forward
passes (no cache), and the samplers against their definitions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import random_model, small_config
from mla_jax import with_options
from mla_jax.generate import Sampling, generate, sample_logits


_forward = nnx.jit(lambda m, t: m(t))


def naive_greedy(model, prompt, n, width=16):
  """Re-run the whole sequence every step and take the argmax: no cache at all.
  (Zero-padded to a fixed width so it compiles once; causal, so padding after
  the last real token cannot change its logits.)"""
  seq = list(prompt)
  for _ in range(n):
    padded = np.zeros((1, width), np.int32)
    padded[0, :len(seq)] = seq
    logits = _forward(model, jnp.asarray(padded))
    seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
  return seq[len(prompt):]


@pytest.mark.parametrize("variant,flavour", [("gqa", "llama"), ("mla", "gpt2"), ("mlra2", "llama")])
def test_greedy_generation_matches_naive_loop(variant, flavour):
  model = random_model(small_config(variant, flavour=flavour), seed=3)
  rng = np.random.default_rng(0)
  lens = np.array([3, 6, 1])
  prompts = rng.integers(0, model.config.vocab_size, (3, 6)).astype(np.int32)
  out = generate(model, prompts, lens, max_new_tokens=8)
  assert out.tokens.shape == (3, 8)
  np.testing.assert_array_equal(out.lengths, [8, 8, 8])
  for b in range(3):
    assert out.tokens[b].tolist() == naive_greedy(model, prompts[b, :lens[b]], 8), f"sequence {b}"


def test_decode_paths_generate_the_same_tokens():
  model = random_model(small_config("mlra4"), seed=4)
  prompts, lens = np.array([[5, 9, 2, 7]]), np.array([4])
  a = generate(with_options(model, decode_impl="naive"), prompts, lens, max_new_tokens=10)
  b = generate(with_options(model, decode_impl="absorbed"), prompts, lens, max_new_tokens=10)
  np.testing.assert_array_equal(a.tokens, b.tokens)


def test_stop_token_ends_each_sequence_separately():
  model = random_model(small_config("gqa"), seed=5)
  prompts = np.array([[1, 2, 3], [4, 5, 6]])
  lens = np.array([3, 2])
  free = generate(model, prompts, lens, max_new_tokens=10)
  stop = int(free.tokens[0, 2])
  out = generate(model, prompts, lens, max_new_tokens=10, stop_token=stop, pad_token=-1)
  first_stop = [list(row).index(stop) if stop in row else None for row in free.tokens]
  for b in range(2):
    if first_stop[b] is None:
      np.testing.assert_array_equal(out.tokens[b], free.tokens[b])
      assert out.lengths[b] == 10
    else:
      n = first_stop[b] + 1
      np.testing.assert_array_equal(out.tokens[b, :n], free.tokens[b, :n])
      assert (out.tokens[b, n:] == -1).all()
      assert out.lengths[b] == n
  assert out.lengths[0] == first_stop[0] + 1 <= 3


def test_top_k_1_and_tiny_top_p_are_greedy():
  model = random_model(small_config("mla"), seed=6)
  prompts, lens = np.array([[3, 1, 4, 1, 5]]), np.array([5])
  greedy = generate(model, prompts, lens, max_new_tokens=6).tokens
  for sampling in (Sampling(temperature=1.0, top_k=1), Sampling(temperature=1.0, top_p=1e-6)):
    got = generate(model, prompts, lens, max_new_tokens=6, sampling=sampling, rng=7).tokens
    np.testing.assert_array_equal(got, greedy)


def _frequencies(logits, sampling, n=20000):
  keys = jax.random.split(jax.random.key(0), n)
  draws = jax.vmap(lambda k: sample_logits(jnp.asarray(logits)[None], k, sampling)[0])(keys)
  return np.bincount(np.asarray(draws), minlength=len(logits)) / n


LOGITS = np.log(np.array([0.4, 0.3, 0.15, 0.1, 0.05]))


def test_temperature_sampling_follows_the_softmax():
  freq = _frequencies(LOGITS, Sampling(temperature=2.0))
  p = np.exp(LOGITS / 2.0) / np.exp(LOGITS / 2.0).sum()
  np.testing.assert_allclose(freq, p, atol=0.015)


def test_top_k_renormalises_over_the_k_best():
  freq = _frequencies(LOGITS, Sampling(temperature=1.0, top_k=2))
  np.testing.assert_allclose(freq, [0.4 / 0.7, 0.3 / 0.7, 0, 0, 0], atol=0.015)


def test_top_p_keeps_the_smallest_set_reaching_p():
  # 0.4 + 0.3 = 0.7 < 0.8, so the third token is needed; the fourth is not.
  freq = _frequencies(LOGITS, Sampling(temperature=1.0, top_p=0.8))
  np.testing.assert_allclose(freq, [0.4 / 0.85, 0.3 / 0.85, 0.15 / 0.85, 0, 0], atol=0.015)


@pytest.mark.parametrize("kwargs,msg", [
    (dict(prompts=[[1, 2]], prompt_lengths=[3]), r"prompt lengths must lie in \[1, 2\]"),
    (dict(prompts=[[1, 2]], prompt_lengths=[0]), r"prompt lengths must lie in \[1, 2\]"),
    (dict(prompts=[[1, 99]], prompt_lengths=[2]), r"prompt token ids must lie in \[0, 61\)"),
    (dict(prompts=[1, 2], prompt_lengths=[2]), "prompts must be \\[batch, length\\]"),
    (dict(prompts=[[1, 2]], prompt_lengths=[2], max_new_tokens=0), "max_new_tokens must be >= 1"),
])
def test_bad_generation_input(kwargs, msg):
  model = random_model(small_config("mha"))
  kwargs.setdefault("max_new_tokens", 2)
  with pytest.raises(ValueError, match=msg):
    generate(model, **kwargs)


def test_bad_decode_impl():
  with pytest.raises(ValueError, match="unknown decode_impl 'fast'; choose one of naive, absorbed, pallas, auto"):
    with_options(random_model(small_config("mha")), decode_impl="fast")


@pytest.mark.parametrize("kwargs,msg", [(dict(temperature=-1), "temperature must be >= 0"),
                                        (dict(top_k=-2), "top_k must be >= 0"),
                                        (dict(top_p=0.0), r"top_p must be in \(0, 1\]")])
def test_bad_sampling(kwargs, msg):
  with pytest.raises(ValueError, match=msg):
    Sampling(**kwargs)


def test_gpt2_generation_beyond_position_table_is_refused():
  model = random_model(small_config("mha", flavour="gpt2"))  # max_seq_len 64
  with pytest.raises(ValueError, match="exceeds max_seq_len=64"):
    generate(model, [[1, 2, 3]], [3], max_new_tokens=80)
