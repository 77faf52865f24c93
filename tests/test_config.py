"""Configs validate themselves with one-line errors that name the fix, and
round-trip through JSON (they are saved with every checkpoint)."""
import pytest

from helpers import GATED, SMALL_ATTENTION, small_config
from mla_jax import ModelConfig, attention_config, presets, variants


@pytest.mark.parametrize("kwargs,msg", [
    (dict(variant="gqa", num_heads=8, num_kv_heads=3, head_dim=8),
     r"num_heads=8 is not divisible by num_kv_heads=3: pick num_kv_heads from \[1, 2, 4, 8\]"),
    (dict(variant="mha", num_heads=8, num_kv_heads=2, head_dim=8), "use variant 'gqa'"),
    (dict(variant="mqa", num_heads=8, num_kv_heads=2, head_dim=8), "mqa has one KV head"),
    (dict(variant="gqa", num_heads=8, head_dim=8), "gqa needs num_kv_heads"),
    (dict(variant="gqa", num_heads=8, num_kv_heads=2, head_dim=7), "even head_dim"),
    (dict(variant="mlra4", num_heads=8, kv_lora_rank=30, qk_nope_head_dim=8),
     "kv_lora_rank=30 must split into 4 equal blocks; use a multiple of 4"),
    (dict(variant="gla4", num_heads=6, kv_lora_rank=32, qk_nope_head_dim=8),
     "num_heads=6 must split into 4 head groups"),
    (dict(variant="mla", num_heads=8, kv_lora_rank=32, qk_nope_head_dim=8, qk_rope_head_dim=3),
     "qk_rope_head_dim must be even"),
    (dict(variant="mlra2", num_heads=8, kv_lora_rank=32, qk_nope_head_dim=8, latent_blocks=3),
     "latent_blocks=3 must be a multiple of 2 branches"),
    (dict(variant="attn9000", num_heads=8), "unknown attention variant 'attn9000'; choose one of"),
])
def test_bad_attention_configs(kwargs, msg):
  with pytest.raises(ValueError, match=msg):
    attention_config(**kwargs)


def test_bad_model_configs():
  attn = attention_config("mha", num_heads=4, head_dim=8)
  with pytest.raises(ValueError, match="unknown flavour 'bert'"):
    ModelConfig(flavour="bert", vocab_size=10, d_model=32, num_layers=1, mlp_dim=64, attention=attn)
  with pytest.raises(ValueError, match="num_layers must be >= 1"):
    ModelConfig(vocab_size=10, d_model=32, num_layers=0, mlp_dim=64, attention=attn)
  with pytest.raises(ValueError, match="dtype 'float8' unknown"):
    ModelConfig(vocab_size=10, d_model=32, num_layers=1, mlp_dim=64, attention=attn, dtype="float8")


def test_configs_are_frozen():
  config = small_config("mla")
  with pytest.raises(Exception):
    config.d_model = 3
  with pytest.raises(Exception):
    config.attention.num_heads = 3


@pytest.mark.parametrize("variant", list(SMALL_ATTENTION))
def test_json_round_trip(variant):
  config = small_config(variant, gated=variant in GATED)
  again = ModelConfig.from_json(config.to_json())
  assert again == config
  assert type(again.attention) is type(config.attention)


def test_from_dict_rejects_unknown_fields():
  d = small_config("mla").to_dict()
  d["attention"]["kv_rank"] = 3
  with pytest.raises(ValueError, match="unknown field 'kv_rank' for attention variant 'mla'"):
    ModelConfig.from_dict(d)
  d = small_config("mla").to_dict()
  d["layers"] = 3
  with pytest.raises(ValueError, match="unknown model config field 'layers'"):
    ModelConfig.from_dict(d)


def test_registry_and_presets():
  assert variants() == ["gla2", "gla4", "gqa", "gta", "mfa", "mha", "mla", "mlra2", "mlra4", "mqa", "tpa"]
  assert presets.get("paper_mlra4_gated").attention.gated
  with pytest.raises(ValueError, match="unknown preset 'paper_xyz'"):
    presets.get("paper_xyz")
  with pytest.raises(ValueError, match="no gated gla4"):
    presets.mlra_paper("gla4", gated=True)
  study = presets.small_study("mla_rope", "d/4")
  assert study.attention.kv_lora_rank == 128 and study.attention.qk_rope_head_dim == 32
  assert study.flavour == "gpt2"
