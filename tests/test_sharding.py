"""Sharded == unsharded, and arrays sit where the rules say.

The reference for every sharded run is the same model run unsharded on one
device: loss, every gradient, prefill logits and decode logits (both decode
paths). CI runs a slice of the variant x mesh x decode-path matrix in which
every variant, every mesh and both decode paths appear; `-m full` runs it all.
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from helpers import random_model, small_config
from mla_jax import sharding
from mla_jax.attention.base import init_cache

VARIANTS = ["mha", "mqa", "gqa", "mla", "gla2", "gla4", "mlra2", "mlra4", "gta", "tpa", "mfa"]
MESHES = ["data:8", "data:2,tensor:4", "fsdp:2,tensor:4", "tensor:4", "tensor:8"]
DECODE = ["naive", "absorbed"]


def config_for(variant):
  # 8 heads so that every variant splits over tensor:8 (GLA-2 at TP 8 puts 4
  # replicas on each latent head, each with 8 / 2 / 4 = 1 query head).
  return small_config(variant, vocab=64, num_heads=8)


LATENT = ["mla", "gla2", "gla4", "mlra2", "mlra4"]
TENSOR_MESHES = [m for m in MESHES if "tensor" in m]


def _slice():
  """Every variant once, meshes rotating through: the latent family's absorbed
  decode under tensor parallelism, the others' decode paths alternating; plus
  the latent family's naive form once and MLRA-4 at TP 4 (one latent block per device)."""
  cases, others = [], [v for v in VARIANTS if v not in LATENT]
  for i, variant in enumerate(LATENT):
    cases.append((variant, TENSOR_MESHES[i % len(TENSOR_MESHES)], "absorbed"))
  for i, variant in enumerate(others):
    cases.append((variant, MESHES[i % len(MESHES)], DECODE[i % 2]))
  return cases + [("mla", "data:2,tensor:4", "naive"), ("mlra4", "tensor:4", "absorbed")]


CI_CASES = list(dict.fromkeys(_slice()))
FULL_CASES = [c for c in itertools.product(VARIANTS, MESHES, DECODE) if c not in CI_CASES]


def test_the_ci_slice_covers_every_variant_path_and_mesh():
  assert {v for v, _, _ in CI_CASES} == set(VARIANTS) and {m for _, m, _ in CI_CASES} == set(MESHES)
  assert {d for v, _, d in CI_CASES if v in LATENT} == set(DECODE)
  assert {d for v, _, d in CI_CASES if v not in LATENT} == set(DECODE)
  for variant in LATENT:           # an absorbed decode under tensor parallelism, for each latent variant
    assert any(v == variant and d == "absorbed" and "tensor" in m for v, m, d in CI_CASES), variant


def _loss(model, tokens):
  logits = model(tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


@nnx.jit
def _loss_and_grads(model, tokens):
  return nnx.value_and_grad(_loss)(model, tokens)


@nnx.jit(static_argnames=("max_len",))
def _prefill(model, tokens, max_len):
  return model.prefill(tokens, model.init_cache(tokens.shape[0], max_len))


@nnx.jit
def _decode(model, tokens, cache, lengths):
  return model.decode_step(tokens, cache, lengths)


def _run(model, tokens, prompt_lens):
  loss, grads = _loss_and_grads(model, tokens)
  width = int(prompt_lens.max())
  logits, cache = _prefill(model, tokens[:, :width], tokens.shape[1])
  lengths = jnp.asarray(prompt_lens, jnp.int32)
  steps = []
  for _ in range(3):
    step_logits, cache = _decode(model, tokens[jnp.arange(tokens.shape[0]), lengths], cache, lengths)
    steps.append(step_logits)
    lengths = lengths + 1
  return loss, grads, logits, steps, cache


def check_sharded_matches_unsharded(variant, mesh_spec, decode_impl):
  config = config_for(variant)
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(0, config.vocab_size, (8, 10)), jnp.int32)
  prompt_lens = rng.integers(2, 6, 8)

  ref = _run(random_model(config, decode_impl=decode_impl), tokens, prompt_lens)

  mesh = sharding.make_mesh(mesh_spec, config)
  model = sharding.shard_module(random_model(config, decode_impl=decode_impl), mesh)
  with sharding.use_mesh(mesh):
    batch = sharding.named_sharding(mesh, ("batch", "length"), tokens.shape)
    got = _run(model, jax.device_put(tokens, batch), prompt_lens)

  np.testing.assert_allclose(got[0], ref[0], rtol=1e-5, err_msg="loss")
  for (path, g), (_, r) in zip(nnx.to_flat_state(got[1]), nnx.to_flat_state(ref[1])):
    np.testing.assert_allclose(g.get_value(), r.get_value(), rtol=1e-4, atol=1e-6,
                               err_msg=f"gradient of {path}")
  np.testing.assert_allclose(got[2], ref[2], rtol=1e-4, atol=1e-5, err_msg="prefill logits")
  for i, (g, r) in enumerate(zip(got[3], ref[3])):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5, err_msg=f"decode step {i}")
  return mesh, model, got[4]


@pytest.mark.parametrize("variant,mesh_spec,decode_impl", CI_CASES)
def test_sharded_matches_unsharded(variant, mesh_spec, decode_impl):
  check_sharded_matches_unsharded(variant, mesh_spec, decode_impl)


@pytest.mark.full
@pytest.mark.parametrize("variant,mesh_spec,decode_impl", FULL_CASES)
def test_sharded_matches_unsharded_full(variant, mesh_spec, decode_impl):
  check_sharded_matches_unsharded(variant, mesh_spec, decode_impl)


def _shard_shape(x):
  return tuple(x.addressable_shards[0].data.shape)


# (variant, mesh) -> expected (tensor, tensor_rep) factorisation and per-device shapes.
# 8 query heads of 8, d_model 32, vocab 64, mlp 64; GQA has 2 KV heads.
@pytest.mark.parametrize("variant,mesh_spec,factors,wq,wk,cache", [
    # GQA, 2 KV heads on 4 devices: each KV head replicated twice, query heads split 4 ways
    ("gqa", "data:2,tensor:4", (2, 2), (32, 2, 8), (32, 1, 8), (4, 10, 1, 8)),
    ("gqa", "fsdp:2,tensor:4", (2, 2), (16, 2, 8), (16, 1, 8), (4, 10, 1, 8)),
    ("mha", "tensor:4", (4, 1), (32, 2, 8), (32, 2, 8), (8, 10, 2, 8)),
    ("mqa", "tensor:4", (1, 4), (32, 2, 8), (32, 1, 8), (8, 10, 1, 8)),
    ("gqa", "data:8", (1, 1), (32, 8, 8), (32, 2, 8), (1, 10, 2, 8)),
])
def test_gqa_parameters_and_cache_sit_where_rules_say(variant, mesh_spec, factors, wq, wk, cache):
  config = small_config(variant, vocab=64, num_heads=8, **({"num_kv_heads": 2} if variant == "gqa" else {}))
  mesh = sharding.make_mesh(mesh_spec, config)
  sizes = sharding.axis_sizes(mesh)
  assert (sizes["tensor"], sizes["tensor_rep"]) == factors
  model = sharding.shard_module(random_model(config), mesh)
  attn = model.layers[0].attn
  assert _shard_shape(attn.wq[...]) == wq
  assert _shard_shape(attn.wk[...]) == wk
  assert _shard_shape(attn.wo[...])[0] == wq[1]          # output projection follows the query heads
  assert _shard_shape(model.embed[...]) == (64 // (factors[0] * factors[1]), 32 // sizes["fsdp"])
  with sharding.use_mesh(mesh):
    kv = jax.jit(lambda: init_cache(config.attention, 8, 10))()
  assert _shard_shape(kv["key"]) == cache


def test_optimizer_state_follows_parameters():
  config = config_for("mlra4")
  mesh = sharding.make_mesh("fsdp:2,tensor:4", config)
  model = sharding.shard_module(random_model(config), mesh)
  opt = sharding.shard_module(nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param), mesh)
  params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  checked = 0
  for path, var in nnx.to_flat_state(nnx.state(opt)):
    if "mu" in path:
      param_path = path[path.index("mu") + 1:]
      assert var.get_value().sharding.is_equivalent_to(
          params[param_path].get_value().sharding, var.get_value().ndim), path
      checked += 1
  assert checked == len(params)


# ------------------------------------------------------------------ bad layouts


def test_kv_heads_that_neither_divide_nor_are_divided_by_tp():
  # Everything else divides by 1, 2, 3, 6 and 12: the KV heads alone decide.
  config = small_config("gqa", vocab=60, d_model=48, num_heads=12, num_kv_heads=6)
  with pytest.raises(ValueError, match=r"6 KV heads cannot be laid out on tensor:4.*"
                                       r"TP degrees that work for this model.*: 1, 2, 3, 6, 12$"):
    sharding.make_mesh("tensor:4", config)
  assert sharding.make_mesh("tensor:3", config).shape["tensor"] == 3
  with pytest.raises(ValueError, match="cannot be laid out on tensor:8"):
    sharding.make_mesh("tensor:8", config)


def test_mesh_larger_than_devices():
  with pytest.raises(ValueError, match="needs 16 devices but only 8"):
    sharding.make_mesh("data:4,tensor:4")


@pytest.mark.parametrize("spec,msg", [("data:2,pipeline:2", "unknown mesh axis 'pipeline'"),
                                      ("data=2", "bad mesh entry"), ("data:0", "sizes must be >= 1"),
                                      ("data:2,data:2", "given twice")])
def test_bad_mesh_specs(spec, msg):
  with pytest.raises(ValueError, match=msg):
    sharding.MeshSpec.parse(spec)


def test_dimension_that_does_not_split():
  config = small_config("mha", vocab=61, num_heads=8)   # vocab 61 over 4 devices
  with pytest.raises(ValueError, match=r"mesh data:1,fsdp:1,tensor:4: embed: dimension 0 "
                                       r"\('vocab', size 61\) does not split"):
    sharding.make_mesh("tensor:4", config)


# ------------------------------------------------------------------ what a sharded decode step moves


@pytest.mark.parametrize("variant,mesh_spec", [("mlra4", "tensor:4"), ("mlra4", "tensor:8"),
                                               ("mlra2", "tensor:4"), ("gla2", "tensor:4"),
                                               ("mla", "tensor:4"), ("gqa", "data:2,tensor:4")])
def test_sharded_decode_never_gathers_the_cache(variant, mesh_spec):
  """Each device reads only its own cache shard: the step's collectives move
  activations (partial outputs summed across devices), not cache."""
  from mla_jax import hlo
  config = small_config(variant, vocab=64, num_heads=8, layers=1,
                        **({"num_kv_heads": 2} if variant == "gqa" else {}))
  mesh = sharding.make_mesh(mesh_spec, config)
  model = sharding.shard_module(random_model(config), mesh)
  batch, max_len = 8, 512
  with sharding.use_mesh(mesh):
    cache = [sharding.place_cache(config, mesh, batch, max_len)]
    graphdef, state = nnx.split(model)

    def step(state, tokens, cache, lengths):
      return nnx.merge(graphdef, state).decode_step(tokens, cache, lengths)

    compiled = jax.jit(step).lower(state, jnp.zeros((batch,), jnp.int32), cache,
                                   jnp.full((batch,), 7, jnp.int32)).compile()
  cache_bytes = sum(x.addressable_shards[0].data.nbytes for x in cache[0].values())
  colls = hlo.collectives(compiled.as_text())
  moved = sum(c.bytes for c in colls)
  assert moved < cache_bytes / 20, (moved, cache_bytes, colls)
  if sharding.MeshSpec.parse(mesh_spec).tensor > 1:
    # the per-device partial outputs are summed across devices
    assert any(c.op == "all-reduce" for c in colls)
