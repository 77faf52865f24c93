"""The training forward's query blocks (`causal_chunks`) change only which score
blocks get computed: losses and every parameter's gradient match one block
(the plain masked form, itself checked against NumPy in test_numpy_reference)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mla_jax import RunOptions
from mla_jax.attention.core import query_blocks
from mla_jax.train import lm_loss
from tests.helpers import SMALL_ATTENTION, random_model, small_config


def test_query_blocks_cover_the_sequence():
  assert query_blocks(9, 4) == [(0, 2), (2, 4), (4, 7), (7, 9)]
  assert query_blocks(3, 8) == [(0, 1), (1, 2), (2, 3)]      # never an empty block
  assert query_blocks(256, 1) == [(0, 256)]
  assert query_blocks(256, 0) == [(0, 64), (64, 128), (128, 192), (192, 256)]  # automatic
  assert query_blocks(100, 0) == [(0, 100)] and len(query_blocks(4096, 0)) == 4


def _loss_and_grads(config, tokens, chunks):
  graphdef, params = nnx.split(random_model(config, seed=3, causal_chunks=chunks), nnx.Param)
  def loss_fn(params):
    return lm_loss(nnx.merge(graphdef, params)(tokens[:, :-1]), tokens[:, 1:])
  return jax.jit(jax.value_and_grad(loss_fn))(params)


# The blocks are the core's (one implementation for every variant): the CI slice
# takes one variant per family and each latent form; -m full takes them all.
CASES = [(v, {}) for v in SMALL_ATTENTION] + [("mlra4", {"kv_lora_rank": 16})]   # the last: absorbed training
CI = {"gqa", "mla", "mlra2", "gta", "tpa", "mfa"}


def _cases(full):
  return [c for c in CASES if (c[0] in CI or bool(c[1])) != full]


@pytest.mark.parametrize("variant,overrides", _cases(full=False))
def test_gradients_match_one_block(variant, overrides):
  check_gradients_match_one_block(variant, overrides)


@pytest.mark.full
@pytest.mark.parametrize("variant,overrides", _cases(full=True))
def test_gradients_match_one_block_full(variant, overrides):
  check_gradients_match_one_block(variant, overrides)


def check_gradients_match_one_block(variant, overrides):
  config = small_config(variant, **overrides)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 12)), jnp.int32)
  loss_1, grads_1 = _loss_and_grads(config, tokens, 1)
  loss_n, grads_n = _loss_and_grads(config, tokens, 3)
  np.testing.assert_allclose(loss_n, loss_1, rtol=1e-6)
  flat_1, flat_n = nnx.to_flat_state(grads_1), nnx.to_flat_state(grads_n)
  for (path, g1), (_, gn) in zip(flat_1, flat_n):
    g1, gn = np.asarray(g1.get_value()), np.asarray(gn.get_value())
    assert np.abs(g1).max() > 0, f"{path}: zero gradient, the comparison would prove nothing"
    np.testing.assert_allclose(gn, g1, rtol=1e-4, atol=1e-6, err_msg=str(path))


def test_bad_causal_chunks_is_one_line_error():
  with pytest.raises(ValueError, match="causal_chunks must be >= 0"):
    RunOptions(causal_chunks=-1)
