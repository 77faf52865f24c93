"""Steps of S >= 1 tokens over paged caches == one full causal forward.

Three sequences of different lengths are fed in chunks of varying width S (a
prefill in chunks, then single-token and multi-token steps), through page
tables whose pages come from a shuffled pool. A row with fewer than S tokens
left is padded with garbage tokens that are written past its length (or into
the null page) and must never leak, as must a rejected speculative draft
(written, then rolled back by length); every parameter is random. The reference
is the model's own training forward over each whole sequence (no cache).
"""
import contextlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import random_model, small_config
from mla_jax import sharding
from mla_jax.paging import PagePool

LENGTHS = (13, 6, 21)


@nnx.jit
def _forward(model, tokens):
  return model(tokens)


@nnx.jit
def _step(model, tokens, pools, lengths, pages):
  return model.step(tokens, pools, lengths, pages)


@nnx.jit
def _dense_step(model, tokens, cache, lengths):
  return model.step(tokens, cache, lengths)


def kernel_config(variant, **kw):
  """Widths the Triton kernels take (powers of 2 >= 16): ours for the latent family, JAX's for GQA / MQA."""
  if variant in ("mha", "mqa", "gqa", "mfa"):
    return small_config(variant, head_dim=16, **kw)
  return small_config(variant, kv_lora_rank=64, qk_nope_head_dim=16, qk_rope_head_dim=16, **kw)


def check_paged_steps(variant, page_size, decode_impl="auto", *, scan_layers=False, seed=0, mesh=None,
                      **config_kw):
  """`mesh`: the steps run sharded on it (the reference stays one device's forward)."""
  config = (kernel_config(variant, **config_kw) if decode_impl == "pallas" else
            small_config(variant, **config_kw)).replace(scan_layers=scan_layers)
  model = random_model(config, seed, decode_impl=decode_impl)
  with contextlib.ExitStack() as stack:
    want = np.asarray(_forward(model, jnp.asarray(_tokens(config, seed))))
    if mesh is not None:
      mesh = sharding.make_mesh(mesh, config)
      model = sharding.shard_module(model, mesh)
      stack.enter_context(sharding.use_mesh(mesh))
    _check_steps(model, config, page_size, seed, want)


def _tokens(config, seed):
  return np.random.default_rng(seed).integers(0, config.vocab_size, (len(LENGTHS), max(LENGTHS))).astype(np.int32)


def _check_steps(model, config, page_size, seed, want):
  variant = config.attention.variant
  rng = np.random.default_rng(seed)
  seq = max(LENGTHS)
  tokens = rng.integers(0, config.vocab_size, (len(LENGTHS), seq)).astype(np.int32)
  assert (tokens == _tokens(config, seed)).all()
  width = -(-seq // page_size) + 1                     # one spare column: it stays the null page
  pool = PagePool(len(LENGTHS) * (width - 1) + 1, page_size,
                  order=rng.permutation(np.arange(1, len(LENGTHS) * (width - 1) + 1)).tolist())
  pools = model.init_pages(pool.num_pages, page_size, jnp.float32)
  # 32 slots split over context:8; JAX's GQA/MQA kernels take 16-slot tiles per device, so 64 for them
  dense = model.init_cache(len(LENGTHS), 64 if model.options.decode_impl == "pallas" else 32, jnp.float32)
  lengths = np.zeros(len(LENGTHS), np.int32)
  widths = [4, 1, 3, 1, 1, 4, 3, 1, 1, 4, 1, 1, 3, 1, 1, 1, 1, 1]     # few distinct widths: few compiles
  for i, s in enumerate(widths):
    if i == 5:                                         # a rejected 3-token draft: written, then rolled back
      for b in range(len(LENGTHS)):
        pool.reserve(b, int(lengths[b] + 3))
      draft = jnp.asarray(rng.integers(0, config.vocab_size, (len(LENGTHS), 3)).astype(np.int32))
      _, pools = _step(model, draft, pools, jnp.asarray(lengths), jnp.asarray(pool.table(range(len(LENGTHS)), width)))
      _, dense = _dense_step(model, draft, dense, jnp.asarray(lengths))
      for b in range(len(LENGTHS)):
        pool.truncate(b, int(lengths[b]))
    n = np.minimum(s, np.array(LENGTHS) - lengths)     # real tokens per row this step
    if not n.any():
      break
    for b in range(len(LENGTHS)):
      pool.reserve(b, int(lengths[b] + n[b]))
    step_tokens = rng.integers(0, config.vocab_size, (len(LENGTHS), s)).astype(np.int32)   # garbage padding
    for b in range(len(LENGTHS)):
      step_tokens[b, :n[b]] = tokens[b, lengths[b]:lengths[b] + n[b]]
    table = pool.table(range(len(LENGTHS)), width)
    logits, pools = _step(model, jnp.asarray(step_tokens), pools, jnp.asarray(lengths), jnp.asarray(table))
    dense_logits, dense = _dense_step(model, jnp.asarray(step_tokens), dense, jnp.asarray(lengths))
    for b in range(len(LENGTHS)):
      expected = want[b, lengths[b]:lengths[b] + n[b]]
      np.testing.assert_allclose(np.asarray(logits)[b, :n[b]], expected, rtol=2e-4, atol=2e-4,
                                 err_msg=f"{variant} page_size={page_size} step width {s} row {b}")
      np.testing.assert_allclose(np.asarray(dense_logits)[b, :n[b]], expected, rtol=2e-4, atol=2e-4,
                                 err_msg=f"{variant} dense step width {s} row {b}")
    lengths = lengths + n.astype(np.int32)
  assert (lengths == np.array(LENGTHS)).all()
  assert np.abs(want).max() > 0.1


# CI: the latent family's absorbed form and TPA's factored decode (tests/test_engine.py runs one
# variant per family end to end); the rest behind -m full
# and the latent kernel reading the page pools in place (interpret mode here)
CI_CASES = [("mlra4", 4, "absorbed"), ("tpa", 4, "absorbed"), ("gla2", 16, "pallas")]


@pytest.mark.parametrize("variant, page_size, decode_impl", CI_CASES)
def test_paged_steps_match_the_forward(variant, page_size, decode_impl):
  check_paged_steps(variant, page_size, decode_impl)


FULL = [(v, p, d) for v in ("mha", "mqa", "gqa", "gta", "mfa") for p in (1, 16, 64) for d in ("auto",)] + \
       [(v, p, d) for v in ("mla", "gla2", "gla4", "mlra2", "mlra4") for p in (1, 16, 64)
        for d in ("naive", "absorbed")] + \
       [(v, p, "pallas") for v in ("mla", "gla2", "gla4", "mlra2", "mlra4") for p in (16, 32)] + [("tpa", p, d) for p in (1, 16, 64) for d in ("naive", "absorbed")]


@pytest.mark.full
@pytest.mark.parametrize("variant, page_size, decode_impl", [c for c in FULL if c not in CI_CASES])
def test_paged_steps_match_the_forward_full(variant, page_size, decode_impl):
  check_paged_steps(variant, page_size, decode_impl)


def test_scanned_layers_share_one_page_table():
  check_paged_steps("mla", 3, "absorbed", scan_layers=True)
