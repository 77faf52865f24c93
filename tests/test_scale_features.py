"""GPU-scale switches, exercised small on the CPU: scanned layers, rematerialisation
and jax.nn.dot_product_attention. Each is checked against the plain model."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from helpers import random_model, small_config
from mla_jax import ModelConfig, RunOptions, Transformer, attention_config, sharding
from mla_jax.generate import generate

VARIANTS = ["mha", "gqa", "mla", "gla2", "mlra2", "mlra4", "gta", "tpa", "mfa"]


def scanned_copy(model: Transformer) -> Transformer:
  """The same weights, stacked: layer i's arrays become slice i of a scanned model."""
  config = model.config.replace(scan_layers=True)
  scanned = Transformer(config, rngs=nnx.Rngs(0))
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  for path, var in nnx.to_flat_state(nnx.state(scanned, nnx.Param)):
    if path[0] == "layers":
      rest = path[1:]
      var.set_value(jnp.stack([flat[("layers", i) + rest].get_value() for i in range(config.num_layers)]))
    else:
      var.set_value(flat[path].get_value())
  return scanned


def _tokens(config, shape=(3, 10)):
  return jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, shape), jnp.int32)


def _loss_and_grads(model, tokens):
  def loss(m):
    return optax.softmax_cross_entropy_with_integer_labels(m(tokens[:, :-1]), tokens[:, 1:]).mean()
  return nnx.jit(nnx.value_and_grad(loss))(model)


def _flat_grads(grads, scanned):
  """Gradients keyed like the unscanned model's (scanned ones unstacked)."""
  out = {}
  for path, v in nnx.to_flat_state(grads):
    value = np.asarray(v.get_value())
    if scanned and path[0] == "layers":
      for i in range(value.shape[0]):
        out[("layers", i) + path[1:]] = value[i]
    else:
      out[path] = value
  return out


# the scan wraps whole layers: one GQA-family and one latent-family variant in CI, the rest behind -m full
SCAN_CI, SCAN_FULL = ["mha", "mlra4"], ["mla", "tpa"]


@pytest.mark.parametrize("variant", SCAN_CI + [pytest.param(v, marks=pytest.mark.full) for v in SCAN_FULL])
def test_scanned_layers_equal_the_loop(variant):
  model = random_model(small_config(variant, layers=3))
  scanned = scanned_copy(model)
  tokens = _tokens(model.config)
  (l1, g1), (l2, g2) = _loss_and_grads(model, tokens), _loss_and_grads(scanned, tokens)
  assert float(l1) == pytest.approx(float(l2), rel=1e-6)
  a, b = _flat_grads(g1, False), _flat_grads(g2, True)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6, err_msg=str(k))
  # cached decoding goes through the same scan, with a stacked cache
  prompts, lens = np.asarray(tokens[:, :6]), np.array([6, 3, 5])
  np.testing.assert_array_equal(generate(model, prompts, lens, max_new_tokens=6).tokens,
                                generate(scanned, prompts, lens, max_new_tokens=6).tokens)
  cache = scanned.init_cache(2, 8)
  assert all(x.shape[:3] == (3, 2, 8) for x in cache.values())


REMAT_CASES = [(p, s) for p in ("full", "dots", "dots_no_batch") for s in (False, True)]
REMAT_CI = [("full", True), ("dots", False)]        # both layer layouts; every policy behind -m full


@pytest.mark.parametrize("policy,scan", REMAT_CI)
def test_remat_changes_nothing_but_memory(policy, scan):
  check_remat(policy, scan)


@pytest.mark.full
@pytest.mark.parametrize("policy,scan", [c for c in REMAT_CASES if c not in REMAT_CI])
def test_remat_changes_nothing_but_memory_full(policy, scan):
  check_remat(policy, scan)


def check_remat(policy, scan):
  base = random_model(small_config("mlra2", layers=2))
  if scan:
    base = scanned_copy(base)
  remat = Transformer(base.config, rngs=nnx.Rngs(0), options=RunOptions(remat=policy))
  nnx.update(remat, nnx.state(base))
  tokens = _tokens(base.config)
  (l1, g1), (l2, g2) = _loss_and_grads(base, tokens), _loss_and_grads(remat, tokens)
  assert float(l1) == pytest.approx(float(l2), rel=1e-6)
  for (p, a), (_, b) in zip(nnx.to_flat_state(g1), nnx.to_flat_state(g2)):
    np.testing.assert_allclose(np.asarray(a.get_value()), np.asarray(b.get_value()), rtol=1e-4,
                               atol=1e-6, err_msg=str(p))


def _dpa_config(variant):
  kw = {}
  if variant in ("mla", "gla2", "mlra2", "mlra4"):
    kw["v_head_dim"] = 12                 # = qk_nope 8 + rope 4: the shapes dot_product_attention needs
  return small_config(variant, **kw)


DPA_CI = ["mha", "mlra4", "gta", "tpa", "mfa"]     # one per attention family; the rest behind -m full


@pytest.mark.parametrize("variant", DPA_CI)
def test_dot_product_attention_matches_einsum(variant):
  check_dot_product_attention(variant)


@pytest.mark.full
@pytest.mark.parametrize("variant", [v for v in VARIANTS if v not in DPA_CI])
def test_dot_product_attention_matches_einsum_full(variant):
  check_dot_product_attention(variant)


def check_dot_product_attention(variant):
  einsum = random_model(_dpa_config(variant))
  dpa = Transformer(einsum.config, rngs=nnx.Rngs(0), options=RunOptions(attention_impl="dpa"))
  nnx.update(dpa, nnx.state(einsum))
  tokens = _tokens(einsum.config)
  (l1, g1), (l2, g2) = _loss_and_grads(einsum, tokens), _loss_and_grads(dpa, tokens)
  assert float(l1) == pytest.approx(float(l2), rel=1e-5)
  for (p, a), (_, b) in zip(nnx.to_flat_state(g1), nnx.to_flat_state(g2)):
    np.testing.assert_allclose(np.asarray(a.get_value()), np.asarray(b.get_value()), rtol=2e-4,
                               atol=1e-6, err_msg=str(p))
  # prefill goes through it too; decode stays on the cached paths
  prompts, lens = np.asarray(tokens[:, :6]), np.array([6, 3, 5])
  np.testing.assert_array_equal(generate(einsum, prompts, lens, max_new_tokens=5).tokens,
                                generate(dpa, prompts, lens, max_new_tokens=5).tokens)


def test_dot_product_attention_refuses_mismatched_widths():
  attn = attention_config("mla", num_heads=4, kv_lora_rank=32, qk_nope_head_dim=8, qk_rope_head_dim=4)
  config = ModelConfig(vocab_size=10, d_model=32, num_layers=1, mlp_dim=64, attention=attn)
  with pytest.raises(ValueError, match="attention_impl='dpa' cannot run mla: its query/key heads are "
                                       "12 wide and its value heads 8"):
    Transformer(config, rngs=nnx.Rngs(0), options=RunOptions(attention_impl="dpa"))
  with pytest.raises(ValueError, match="unknown remat 'some'; choose one of none, full, dots, dots_no_batch"):
    RunOptions(remat="some")


def test_scanned_model_shards_like_the_loop():
  config = small_config("mlra4", vocab=64, num_heads=8, layers=2).replace(scan_layers=True)
  mesh = sharding.make_mesh("data:2,tensor:4", config)
  model = sharding.shard_module(random_model(config), mesh)
  w_uk = model.layers.attn.w_uk[...]
  assert w_uk.shape[0] == 2                                       # the stacked layers axis
  assert w_uk.addressable_shards[0].data.shape == (2, 1) + w_uk.shape[2:]   # one block per device
  ref = random_model(config)
  tokens = _tokens(config, (8, 10))
  with sharding.use_mesh(mesh):
    got = _loss_and_grads(model, tokens)[0]
  assert float(got) == pytest.approx(float(_loss_and_grads(ref, tokens)[0]), rel=1e-5)
