"""KV-cache accounting: formulas written out here, the paper's numbers, and the
buffers that actually sit on each device of a mesh."""
import jax.numpy as jnp
import pytest
from flax import nnx

from helpers import SMALL_ATTENTION, small_config
from mla_jax import Transformer, count_params, presets, sharding


def expected_per_token(attn) -> int:
  """The cache formulas of ../shared/reference/attention_variants.md, by hand."""
  if attn.variant in ("mha", "mqa", "gqa"):
    return 2 * attn.num_kv_heads * attn.head_dim
  if attn.variant == "gta":                          # tied K/V state + a half-width rope key
    return attn.num_kv_heads * attn.head_dim + attn.head_dim // 2
  if attn.variant == "tpa":                          # the K and V factors
    return (attn.k_rank + attn.v_rank) * (attn.num_heads + attn.head_dim)
  if attn.variant == "mfa":                          # one K and one V head of width C
    return 2 * attn.head_dim
  return attn.kv_lora_rank + attn.qk_rope_head_dim   # every latent variant: d_c + d_r


@pytest.mark.parametrize("variant", list(SMALL_ATTENTION))
def test_allocated_cache_holds_exactly_the_accounted_elements(variant):
  config = small_config(variant, layers=3)
  model = Transformer(config, rngs=nnx.Rngs(0))
  batch, max_len = 5, 7
  cache = model.init_cache(batch, max_len, jnp.bfloat16)
  total = sum(x.size for layer in cache for x in layer.values())
  per_token = expected_per_token(config.attention)
  assert config.cache_elements_per_token() == per_token
  assert total == per_token * config.num_layers * batch * max_len
  assert all(x.dtype == jnp.bfloat16 for layer in cache for x in layer.values())


# The MLRA paper's Table: elements cached per token per layer.
PAPER_CACHE = {"mha": 6144, "mqa": 256, "gqa": 1536, "mla": 576, "gla2": 576, "gla4": 576,
               "mlra2": 576, "mlra4": 576, "gta": 832, "tpa": 608, "mfa": 512}


@pytest.mark.parametrize("variant", list(PAPER_CACHE))
def test_paper_config_cache_per_token(variant):
  config = presets.mlra_paper(variant)
  assert config.cache_elements_per_token() == PAPER_CACHE[variant]
  assert expected_per_token(config.attention) == PAPER_CACHE[variant]


def test_paper_configs_are_parameter_matched():
  """~2.87B parameters each, within 2% of each other (the paper's table)."""
  counts = {name: count_params(make())["total"]
            for name, make in presets.presets().items() if name.startswith("paper_")}
  lo, hi = min(counts.values()), max(counts.values())
  assert 2.85e9 < lo and hi < 2.90e9, counts
  assert hi / lo < 1.02


# Per device, in elements per token per layer, on the paper config (one layer's
# cache, batch 2, 16 slots). MLRA-4: one 128-wide block + the 64-wide rope key.
@pytest.mark.parametrize("variant,mesh_spec,per_device", [
    ("mla", "tensor:4", 576),
    ("mla", "tensor:8", 576),
    ("mlra4", "tensor:2", 256 + 64),
    ("mlra4", "tensor:4", 128 + 64),
    ("mlra4", "data:2,tensor:4", 128 + 64),
    ("mlra4", "tensor:8", 128 + 64),
    ("gla2", "tensor:4", 256 + 64),
    ("mha", "tensor:4", 6144 // 4),
    ("mqa", "tensor:8", 256),
    ("gqa", "tensor:2", 1536 // 2),
    ("gta", "tensor:2", 3 * 128 + 64),               # 3 of 6 KV states + the rope key
    ("tpa", "tensor:4", (2 + 2) * (24 // 4 + 128)),  # A factors split by heads, B replicated
    ("tpa", "tensor:8", (2 + 2) * (24 // 8 + 128)),
    ("mfa", "tensor:8", 512),
])
def test_per_device_cache_buffers_at_paper_config(variant, mesh_spec, per_device):
  config = presets.mlra_paper(variant)
  mesh = sharding.make_mesh(mesh_spec, config)
  cache = sharding.place_cache(config, mesh, batch=2, max_len=16)
  measured = sharding.per_device_cache_elements(cache)
  assert sum(measured.values()) == per_device, measured
  # Every device holds the same amount: nothing lopsided.
  for x in cache.values():
    sizes = {s.data.size for s in x.addressable_shards}
    assert len(sizes) == 1
  batch_shards = sharding.MeshSpec.parse(mesh_spec).data
  for x in cache.values():
    assert x.addressable_shards[0].data.shape[:2] == (2 // batch_shards, 16)


def test_mlra4_blocks_are_distinct_per_device_at_tp4():
  """Each of the 4 devices owns a different latent block (not 4 copies of one)."""
  config = presets.mlra_paper("mlra4")
  mesh = sharding.make_mesh("tensor:4", config)
  cache = sharding.place_cache(config, mesh, batch=1, max_len=4)
  blocks = sorted(s.index[2].start for s in cache["kv_latent"].addressable_shards)
  assert blocks == [0, 1, 2, 3]
  # The rope key is replicated: every device has all 64 columns.
  assert {s.data.shape[2] for s in cache["rope_key"].addressable_shards} == {64}
