"""Configs validate themselves with one-line errors that name the fix, round-trip
through JSON (they are saved with every checkpoint), and load what earlier
versions saved; the registry pins each variant's structure."""
import json
import os

import pytest

from helpers import GATED, SMALL_ATTENTION, small_config
from mla_jax import ModelConfig, RunOptions, attention_config, config_from_dict, presets, registry, variants
from mla_jax.config import CONFIG_VERSION

DATA = os.path.join(os.path.dirname(__file__), "data")


@pytest.mark.parametrize("kwargs,msg", [
    (dict(variant="gqa", num_heads=8, num_kv_heads=3, head_dim=8),
     r"num_heads=8 is not divisible by num_kv_heads=3: pick num_kv_heads from \[1, 2, 4, 8\]"),
    (dict(variant="mha", num_heads=8, num_kv_heads=2, head_dim=8),
     "mha has num_kv_heads=8, got 2; use variant 'gqa'"),
    (dict(variant="mqa", num_heads=8, num_kv_heads=2, head_dim=8), "mqa has num_kv_heads=1, got 2; use variant 'gqa'"),
    (dict(variant="gqa", num_heads=8, num_kv_heads=2, head_dim=7), "even head_dim"),
    (dict(variant="mlra4", num_heads=8, kv_lora_rank=30, qk_nope_head_dim=8),
     "kv_lora_rank=30 must split into 4 equal blocks; use a multiple of 4"),
    (dict(variant="gla4", num_heads=6, kv_lora_rank=32, qk_nope_head_dim=8),
     "num_heads=6 must split into 4 head groups"),
    (dict(variant="mla", num_heads=8, kv_lora_rank=32, qk_nope_head_dim=8, qk_rope_head_dim=3),
     "qk_rope_head_dim must be even"),
    (dict(variant="gla2", num_heads=8, groups=4), "gla2 has groups=2, got 4; use variant 'gla4'"),
    (dict(variant="mlra2", num_heads=8, branches=4), "mlra2 has branches=2, got 4; use variant 'mlra4'"),
    (dict(variant="mla", num_heads=8, head_dim=8), "unknown field 'head_dim' for attention variant 'mla'"),
    (dict(variant="attn9000", num_heads=8), "unknown attention variant 'attn9000'; choose one of"),
])
def test_bad_attention_configs(kwargs, msg):
  with pytest.raises(ValueError, match=msg):
    attention_config(**kwargs)


def test_structure_is_config_fields_pinned_by_the_registry():
  for name, (branches, groups) in {"mla": (1, 1), "gla2": (1, 2), "gla4": (1, 4), "mlra2": (2, 2),
                                   "mlra4": (4, 1)}.items():
    c = attention_config(name)
    assert (c.branches, c.groups, c.num_blocks) == (branches, groups, branches * groups)
    assert registry.get(name).pinned == {"branches": branches, "groups": groups}
  assert attention_config("mha", num_heads=6).num_kv_heads == 6
  assert attention_config("mqa", num_heads=6).num_kv_heads == 1


def test_bad_model_configs():
  attn = attention_config("mha", num_heads=4, head_dim=8)
  with pytest.raises(ValueError, match="unknown flavour 'bert'"):
    ModelConfig(flavour="bert", vocab_size=10, d_model=32, num_layers=1, mlp_dim=64, attention=attn)
  with pytest.raises(ValueError, match="num_layers must be >= 1"):
    ModelConfig(vocab_size=10, d_model=32, num_layers=0, mlp_dim=64, attention=attn)
  with pytest.raises(ValueError, match="param_dtype 'float8' unknown"):
    ModelConfig(vocab_size=10, d_model=32, num_layers=1, mlp_dim=64, attention=attn, param_dtype="float8")


@pytest.mark.parametrize("kwargs,msg", [(dict(dtype="float8"), "unknown dtype 'float8'"),
                                        (dict(decode_impl="fast"), "unknown decode_impl 'fast'"),
                                        (dict(cache_dtype="int4"), "unknown cache_dtype 'int4'"),
                                        (dict(attention_impl="flash"), "unknown attention_impl 'flash'")])
def test_bad_run_options(kwargs, msg):
  with pytest.raises(ValueError, match=msg):
    RunOptions(**kwargs)


def test_configs_are_frozen():
  config = small_config("mla")
  with pytest.raises(Exception):
    config.d_model = 3
  with pytest.raises(Exception):
    config.attention.num_heads = 3


@pytest.mark.parametrize("variant", list(SMALL_ATTENTION))
def test_json_round_trip(variant):
  config = small_config(variant, gated=variant in GATED)
  again = config_from_dict(json.loads(json.dumps(config.to_dict())))
  assert again == config
  assert type(again.attention) is type(config.attention)


def test_from_dict_rejects_unknown_fields():
  d = small_config("mla").to_dict()
  d["attention"]["kv_rank"] = 3
  with pytest.raises(ValueError, match="unknown field 'kv_rank' for attention variant 'mla'"):
    config_from_dict(d)
  d = small_config("mla").to_dict()
  d["layers"] = 3
  with pytest.raises(ValueError, match="unknown model config field 'layers'"):
    config_from_dict(d)
  d = small_config("gla2").to_dict()
  d["attention"]["groups"] = 4
  with pytest.raises(ValueError, match="gla2 has groups=2, got 4; use variant 'gla4'"):
    config_from_dict(d)
  d["config_version"] = 99
  with pytest.raises(ValueError, match="written by a newer mla_jax"):
    config_from_dict(d)


def test_configs_saved_by_the_previous_version_load():
  """tests/data/v1/configs.json: every variant's config as commit a36d22d wrote it
  (format 1: run options inside, MLRA's latent_blocks, structure in the name)."""
  with open(os.path.join(DATA, "v1", "configs.json")) as f:
    saved = json.load(f)
  for name, d in saved.items():
    assert "config_version" not in d and "dtype" in d
    config = config_from_dict(d)
    model_dict, options = registry.migrate(d)
    assert options == {k: d[k] for k in ("dtype", "remat", "attention_impl", "causal_chunks")}
    RunOptions(**options)
    a = d["attention"]
    # the same architecture, field by field, as the previous version meant it
    for field in ("flavour", "vocab_size", "d_model", "num_layers", "mlp_dim", "max_seq_len", "scan_layers"):
      assert getattr(config, field) == d[field], (name, field)
    for field, value in a.items():
      if field != "latent_blocks":
        assert getattr(config.attention, field) == value, (name, field)
    if a["variant"] in ("mla", "gla2", "gla4", "mlra2", "mlra4"):
      blocks = {"mla": 1, "gla2": 2, "gla4": 4}.get(a["variant"], a.get("latent_blocks"))
      assert config.attention.num_blocks == blocks
      assert config.attention.branches == {"mlra2": 2, "mlra4": 4}.get(a["variant"], 1)
    assert config_from_dict(config.to_dict()) == config
  assert {d["attention"]["variant"] for d in saved.values()} == set(variants())


def test_old_mlra_without_scales_is_refused_not_reinterpreted():
  with open(os.path.join(DATA, "v1", "configs.json")) as f:
    d = json.load(f)["mlra2"]
  d["attention"]["scales"] = False
  with pytest.raises(ValueError, match="trained with scales=False as mla_jax read it before config format 2"):
    config_from_dict(d)


def test_registry_and_presets():
  assert variants() == ["mha", "mqa", "gqa", "mla", "gla2", "gla4", "mlra2", "mlra4", "gta", "tpa", "mfa"]
  assert presets.get("paper_mlra4_gated").attention.gated
  with pytest.raises(ValueError, match="unknown preset 'paper_xyz'"):
    presets.get("paper_xyz")
  with pytest.raises(ValueError, match="no gated gla4"):
    presets.mlra_paper("gla4", gated=True)
  study = presets.small_study("mla_rope", "d/4")
  assert study.attention.kv_lora_rank == 128 and study.attention.qk_rope_head_dim == 32
  assert study.flavour == "gpt2"
  assert {f"small_{v}" for v in variants()} <= set(presets.presets())


def test_configs_saved_by_format_2_load_unchanged():
  """tests/data/v2/configs.json: every variant's config as commit 625c33b wrote
  it (format 2, before untied embeddings, q/k/v biases, q/k norms and RoPE
  scaling): each reads back as the same architecture, the new fields at the
  values that reproduce format 2's model."""
  with open(os.path.join(DATA, "v2", "configs.json")) as f:
    saved = json.load(f)
  for name, d in saved.items():
    assert d["config_version"] == 2
    config = config_from_dict(d)
    assert config.tie_embeddings and config.attention.rope_scaling == "none"
    assert getattr(config.attention, "qkv_bias", False) is False and getattr(config.attention, "qk_norm", False) is False
    now = config.to_dict()
    assert now["config_version"] == CONFIG_VERSION
    for key, value in d.items():
      if key == "attention":
        assert {k: now["attention"][k] for k in value} == value, name
      elif key != "config_version":
        assert now[key] == value, (name, key)


def test_configs_saved_by_format_3_load_unchanged():
  """tests/data/v3/configs.json: every variant's config (and untied, qk-norm, llama3
  and yarn ones) as commit 047df42 wrote it (format 3, before `latent_norm` and
  `rope_inv_freq`): each reads back unchanged, the latent norm on and the RoPE
  ladder its own."""
  with open(os.path.join(DATA, "v3", "configs.json")) as f:
    saved = json.load(f)
  assert len(saved) >= 12
  for name, d in saved.items():
    assert d["config_version"] == 3
    config = config_from_dict(d)
    assert config.attention.rope_inv_freq == () and getattr(config.attention, "latent_norm", True) is True
    now = config.to_dict()
    assert now["config_version"] == CONFIG_VERSION
    for key, value in d.items():
      if key == "attention":
        assert {k: now["attention"][k] for k in value} == value, name
        assert set(now["attention"]) - set(value) <= {"rope_inv_freq", "latent_norm"}, name
      elif key != "config_version":
        assert now[key] == value, (name, key)
