"""Decode context parallelism: caches split by token over the mesh's `context` axis.

References are independent of the code under test: the model's own training
forward over whole sequences (no cache) for the paged and dense steps
(tests/test_paged_step.py's harness, whose lengths 13, 6, 21 start at 0, so
early steps leave some devices holding none of a sequence), and the same model
decoding unsharded on one device for the 8-bit caches and the compiled
program's collectives. Every parameter is random.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_model, small_config
from mla_jax import hlo, sharding
from test_paged_step import check_paged_steps
from test_sharding import _decode, _prefill

VARIANTS = ["mha", "mqa", "gqa", "mla", "gla2", "gla4", "mlra2", "mlra4", "gta", "tpa", "mfa"]
# CP 2 / 4 / 8 and TP x CP 2x2, 2x4, 4x2 (with data), within the 8 simulated devices
MESHES = ["context:2", "context:4", "context:8", "context:2,tensor:2", "context:4,tensor:2",
          "context:2,tensor:4", "data:2,context:2,tensor:2"]
# XLA decode at CP 2 and TP 2 x CP 2 (paged, multi-token steps), and the latent kernel; the rest -m full
CI_CASES = [("gqa", "context:2", 4, "absorbed"), ("mlra4", "context:2,tensor:2", 4, "absorbed"),
            ("tpa", "context:2,tensor:2", 4, "absorbed"), ("mla", "context:2", 32, "pallas")]
FULL_CASES = ([(v, m, 8, "absorbed") for v in VARIANTS for m in MESHES] +
              [(v, "context:2,tensor:2", 8, "naive") for v in ("mla", "gla2", "gla4", "mlra2", "mlra4", "tpa")] +
              [(v, m, 64, "pallas") for v in ("mla", "gla2", "mlra2", "mlra4", "gqa", "mqa")
               for m in ("context:4", "context:2,tensor:2")])


@pytest.mark.parametrize("variant,mesh,page_size,decode_impl", CI_CASES)
def test_context_parallel_steps_match_the_forward(variant, mesh, page_size, decode_impl):
  check_paged_steps(variant, page_size, decode_impl, mesh=mesh, vocab=64)    # 64: splits over any TP degree


@pytest.mark.full
@pytest.mark.parametrize("variant,mesh,page_size,decode_impl", [c for c in FULL_CASES if c not in CI_CASES])
def test_context_parallel_steps_match_the_forward_full(variant, mesh, page_size, decode_impl):
  check_paged_steps(variant, page_size, decode_impl, mesh=mesh, vocab=64)    # 64: splits over any TP degree


# ------------------------------------------------------------------ against unsharded decode


PROMPT_LENS = np.array([1, 9, 3, 12])


def _decode_run(model, tokens, max_len, steps=3):
  logits, cache = _prefill(model, tokens[:, :int(PROMPT_LENS.max())], max_len)
  lengths = jnp.asarray(PROMPT_LENS, jnp.int32)
  out = []
  for _ in range(steps):
    step_logits, cache = _decode(model, tokens[jnp.arange(tokens.shape[0]), lengths], cache, lengths)
    out.append(np.asarray(step_logits))
    lengths = lengths + 1
  return out, cache, lengths


def _sharded(config, mesh_spec, **options):
  mesh = sharding.make_mesh(mesh_spec, config)
  return mesh, sharding.shard_module(random_model(config, **options), mesh)


def _tokens(config, seq=16):
  return jnp.asarray(np.random.default_rng(1).integers(0, config.vocab_size, (4, seq)), jnp.int32)


@pytest.mark.parametrize("variant,decode_impl,cache_dtype", [
    ("mlra2", "naive", "int8"), pytest.param("mla", "absorbed", "fp8", marks=pytest.mark.full)])
def test_an_8bit_cache_split_over_context_matches_unsharded(variant, decode_impl, cache_dtype):
  """MLRA's naive form keeps a softmax per branch: the shares merge branch by branch."""
  config = small_config(variant, vocab=64, num_heads=8)
  tokens = _tokens(config, seq=1088)          # > 2 x KEY_CHUNK: each device reads its share in chunks
  options = dict(decode_impl=decode_impl, cache_dtype=cache_dtype)
  want, _, _ = _decode_run(random_model(config, **options), tokens, 1088)
  mesh, model = _sharded(config, "context:2", **options)
  with sharding.use_mesh(mesh):
    got, cache, _ = _decode_run(model, tokens, 1088)
  for i, (g, w) in enumerate(zip(got, want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4, err_msg=f"decode step {i}")


def _attention_collectives(model, mesh, tokens):
  with sharding.use_mesh(mesh):
    _, cache, lengths = _decode_run(model, tokens, 16, steps=1)
    text = _decode.lower(model, tokens[:, 0], cache, lengths).compile().as_text()
  return [c.op for c in hlo.collectives(text)], cache


@pytest.mark.parametrize("variant,tensor", [("mla", 1), pytest.param("mlra4", 2, marks=pytest.mark.full)])
def test_one_collective_per_layer_and_each_device_holds_its_share(variant, tensor):
  """Against the same mesh without `context`: CP adds one all-gather per layer and
  nothing else, and each device holds 1 / CP of what it held (MLA: 1 / CP of the
  whole cache; MLRA-4 at TP 2: half the latent blocks and all the rope key, of
  1 / CP of the tokens)."""
  config = small_config(variant, vocab=64, num_heads=8)
  tokens = _tokens(config)
  base = f"tensor:{tensor}"
  ops_base, cache_base = _attention_collectives(*reversed(_sharded(config, base)), tokens)
  for ways in (2, 4) if tensor == 1 else (2,):
    ops, cache = _attention_collectives(*reversed(_sharded(config, f"context:{ways},{base}")), tokens)
    extra = sorted(set(ops) | set(ops_base))
    assert {op: ops.count(op) - ops_base.count(op) for op in extra} == {
        op: config.num_layers if op == "all-gather" else 0 for op in extra}, (ops, ops_base)
    for name, x in cache[0].items():
      shard, whole = x.addressable_shards[0].data.shape, x.shape
      before = cache_base[0][name].addressable_shards[0].data.shape
      assert shard == (before[0], before[1] // ways) + before[2:], (name, shard, before)
      if tensor == 1:
        assert shard == (whole[0], whole[1] // ways) + whole[2:]
      elif name == "kv_latent":
        assert np.prod(shard) * ways * tensor == np.prod(whole)


def test_a_cache_that_does_not_split_over_context_is_one_line():
  config = small_config("mla", vocab=64)
  mesh, model = _sharded(config, "context:4")
  with sharding.use_mesh(mesh), pytest.raises(ValueError, match="does not split over context:4; use a cache length"):
    _decode_run(model, _tokens(config), 18, steps=1)
