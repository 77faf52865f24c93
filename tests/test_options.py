"""The runner's flags come from the config dataclasses, and every flagfile and
sweep line builds the configs the previous version built from it."""
import dataclasses
import json
import os

import pytest
from absl import flags

from experiments import options
from experiments.specs import DataSpec, LoopSpec
from mla_jax import ModelConfig, RunOptions, config_from_dict, registry
from mla_jax.generate import Sampling
from mla_jax.train import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAVED = os.path.join(REPO, "tests", "data", "v1", "flag_configs.json")


@pytest.fixture
def in_repo(monkeypatch):
  monkeypatch.chdir(REPO)             # flagfiles name each other relative to the repository


def test_every_config_field_is_a_flag():
  fv = flags.FlagValues()
  options.define(fv)
  for cls, skip in options.SECTIONS:
    for f in dataclasses.fields(cls):
      if f.name in skip:
        continue
      name = f.metadata.get("flag") or f.name
      assert name in fv, f"{cls.__name__}.{f.name} has no --{name}"
      assert f.metadata["help"] in fv[name].help, name
  for variant in registry.variants():
    for f in registry.free_fields(variant):
      if f.metadata["cli"]:
        assert (f.metadata.get("flag") or f.name) in fv, (variant, f.name)
  # what a name pins is not a flag, nor what only a conversion sets
  assert "branches" not in fv and "groups" not in fv and "rope_inv_freq" not in fv


@pytest.mark.parametrize("name", sorted(json.load(open(SAVED))))
def test_flagfiles_build_what_the_previous_version_built(name, in_repo):
  """tests/data/v1/flag_configs.json: the model, training and data configs commit
  a36d22d built from every committed flagfile, every sweep line and a few
  command lines (legacy spellings, derived defaults)."""
  saved = json.load(open(SAVED))[name]
  fv = options.parse(["run", *saved["argv"]])
  c = options.build(fv)
  assert c.model == config_from_dict(saved["model"])
  _, run_options = registry.migrate(saved["model"])
  assert c.options == RunOptions(**run_options, decode_impl=fv.decode_impl, cache_dtype=fv.cache_dtype)
  for built, was in ((c.train, saved["train"]), (c.data, saved["data"])):
    now = dataclasses.asdict(built)
    assert {k: now[k] for k in was} == was
    # fields added since (--allow_data_change, --distill_weight) keep their defaults
    assert {k: v for k, v in now.items() if k not in was} == \
           {f.name: f.default for f in dataclasses.fields(built) if f.name not in was}


def test_new_spellings_and_old_ones(in_repo):
  latent = options.model_config(options.parse(["run", "--variant=mla", "--qk_nope_head_dim=24", "--head_dim=8",
                                               "--qk_rope_head_dim=8", "--rope_head_dim=4"])).attention
  assert (latent.qk_nope_head_dim, latent.qk_rope_head_dim) == (24, 8)       # the new flag wins
  old = options.model_config(options.parse(["run", "--variant=mla", "--head_dim=8", "--rope_head_dim=4"])).attention
  assert (old.qk_nope_head_dim, old.qk_rope_head_dim) == (8, 4)
  tpa = options.model_config(options.parse(["run", "--variant=tpa", "--tpa_kv_rank=3", "--tpa_v_rank=5"])).attention
  assert (tpa.k_rank, tpa.v_rank) == (3, 5)
  # GTA's own rope width does not follow the latent family's --rope_head_dim
  gta = options.model_config(options.parse(["run", "--variant=gta", "--rope_head_dim=4"])).attention
  assert gta.rope_dim == 16
  # under --preset, --vocab_size sizes the tokenizer only; --tokenizer_vocab_size says so directly
  c = options.build(options.parse(["run", "--preset=study_mha", "--vocab_size=300"]))
  assert (c.model.vocab_size, c.data.vocab_size) == (8192, 300)
  c = options.build(options.parse(["run", "--vocab_size=512", "--tokenizer_vocab_size=300"]))
  assert (c.model.vocab_size, c.data.vocab_size) == (512, 300)


@pytest.mark.parametrize("argv,msg", [
    (["--variant=mla9"], "--variant=mla9: value should be one of"),
    (["--decode_impl=fast"], "--decode_impl=fast: value should be one of"),
    (["--num_heads=x"], "--num_heads=x"),
])
def test_bad_flags(argv, msg):
  with pytest.raises(flags.Error, match=msg):
    options.parse(["run", *argv])


def test_bad_values_are_one_line_errors():
  with pytest.raises(ValueError, match="num_heads=6 is not divisible by num_kv_heads=4"):
    options.build(options.parse(["run", "--variant=gqa", "--num_heads=6", "--num_kv_heads=4"]))
  with pytest.raises(ValueError, match="causal_chunks must be >= 0"):
    options.build(options.parse(["run", "--causal_chunks=-2"]))


def test_sections_cover_the_runners_configs():
  assert [cls for cls, _ in options.SECTIONS] == [ModelConfig, RunOptions, TrainConfig, DataSpec, LoopSpec,
                                                  Sampling]
