"""Importing the MLRA authors' checkpoints. The committed manifest
(tests/data/mlra_manifest.json, written by `experiments.authors_models
--write_manifest` from their model definitions) lists every tensor name and
shape of their models at a small config; random tensors in that layout are
converted and our logits compared with a NumPy forward written on their layout."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import numpy_authors
from mla_jax import convert

MANIFEST = json.load(open(os.path.join(os.path.dirname(__file__), "data", "mlra_manifest.json")))


def random_tensors(variant, seed=0):
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in MANIFEST[variant]["tensors"].items():
    if "layernorm" in name:
      out[name] = (1.0 + 0.2 * rng.normal(size=shape)).astype(np.float32)
    else:
      out[name] = (0.2 * rng.normal(size=shape)).astype(np.float32)
  out["lm_head.weight"] = out["transformer.wte.weight"]                  # tied
  return out


def _logits(model, tokens):
  return np.asarray(model(np.asarray(tokens)[None]))[0]


@pytest.mark.parametrize("variant", sorted(MANIFEST))
def test_converted_logits_match_the_authors_layout(variant):
  tensors, config = random_tensors(variant), MANIFEST[variant]["config"]
  model = convert.to_model(convert.base_variant(variant), tensors, config_json=config)
  assert model.config.attention.variant == convert.base_variant(variant)
  assert getattr(model.config.attention, "gated", False) == variant.endswith("_gated")
  tokens = np.random.default_rng(1).integers(0, config["vocab_size"], 20)
  want = numpy_authors.forward(variant, tensors, config, tokens)
  np.testing.assert_allclose(_logits(model, tokens), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", ["mla", "gla2", "gla4", "mlra2", "mlra4_gated", "gta", "tpa", "mfa"])
def test_config_inferred_from_shapes_alone(variant):
  """Without config.json the same model comes out of the tensor shapes (only the
  context length, which no tensor records, falls back to 2048)."""
  tensors, config = random_tensors(variant), MANIFEST[variant]["config"]
  a = convert.infer_config(convert.base_variant(variant), tensors, config)
  b = convert.infer_config(convert.base_variant(variant), tensors, None)
  assert a.replace(max_seq_len=2048) == b


def test_gqa_family_without_config_needs_the_head_count():
  tensors = random_tensors("gqa")
  with pytest.raises(ValueError, match="pass --convert_num_heads"):
    convert.infer_config("gqa", tensors, None)
  assert convert.infer_config("gqa", tensors, None, num_heads=4).attention.num_kv_heads == 2


def test_missing_extra_and_misshapen_tensors():
  config = MANIFEST["mla"]["config"]
  t = random_tensors("mla")
  del t["transformer.h.1.attn.kv_b_proj.weight"]
  with pytest.raises(ValueError, match=r"missing tensor 'transformer\.h\.1\.attn\.kv_b_proj\.weight'"):
    convert.to_model("mla", t, config_json=config)
  t = random_tensors("mla")
  t["transformer.h.0.attn.extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError, match=r"unexpected tensor 'transformer\.h\.0\.attn\.extra\.weight'.*wrong --variant"):
    convert.to_model("mla", t, config_json=config)
  t = random_tensors("mla")
  t["transformer.h.0.attn.q_b_proj.weight"] = np.zeros((95, 32), np.float32)
  with pytest.raises(ValueError, match=r"tensor 'transformer\.h\.0\.attn\.q_b_proj\.weight' has shape \(95, 32\), "
                                       r"expected \(96, 32\)"):
    convert.to_model("mla", t, config_json=config)
  with pytest.raises(ValueError, match="does not hold a mlra4 model: it lacks .*kv_a_layernorms.0.*wrong --variant"):
    convert.to_model("mlra4", random_tensors("mla"), config_json=config)
  with pytest.raises(ValueError, match="unknown variant 'mla9'"):
    convert.base_variant("mla9")


def test_safetensors_file_to_a_run_directory(tmp_path):
  from safetensors.numpy import save_file
  tensors, config = random_tensors("mlra4"), MANIFEST["mlra4"]["config"]
  save_file({k: v for k, v in tensors.items() if k != "lm_head.weight"}, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps(config))
  out = convert.convert(str(tmp_path), "mlra4", str(tmp_path / "run"))
  assert out["config"].attention.variant == "mlra4"
  # the run directory loads back (eval / generate / continue training read it the same way)
  from experiments import trainer
  ckpt_model = trainer.restore_converted_params(str(tmp_path / "run"))
  tokens = np.arange(12) % config["vocab_size"]
  np.testing.assert_allclose(_logits(ckpt_model, tokens),
                             numpy_authors.forward("mlra4", tensors, config, tokens), rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="already holds checkpoints"):
    convert.convert(str(tmp_path), "mlra4", str(tmp_path / "run"))


@pytest.mark.parametrize("variant", ["mla", "gla2", "mlra2"])
def test_no_scale_checkpoints_match_the_authors_no_scale_models(variant):
  """The authors' *_no_scale files (same tensors, no q / kv / branch scales) import
  with scales=False, which nothing in the tensors can tell."""
  tensors, config = random_tensors(variant), MANIFEST[variant]["config"]
  model = convert.to_model(variant, tensors, config_json=config, scales=False)
  assert model.config.attention.scales is False
  tokens = np.random.default_rng(2).integers(0, config["vocab_size"], 20)
  want = numpy_authors.forward(variant, tensors, config, tokens, scales=False)
  np.testing.assert_allclose(_logits(model, tokens), want, rtol=1e-4, atol=1e-4)
  scaled = numpy_authors.forward(variant, tensors, config, tokens)
  assert np.abs(want - scaled).max() > 1e-2, "the scales must matter for the comparison to mean anything"
  with pytest.raises(ValueError, match="gqa has no variance scales to switch off"):
    convert.to_model("gqa", random_tensors("gqa"), config_json=MANIFEST["gqa"]["config"], scales=False)


def test_torch_pickle_is_read_weights_only(tmp_path):
  torch = pytest.importorskip("torch")
  tensors, config = random_tensors("gqa"), MANIFEST["gqa"]["config"]
  torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, tmp_path / "pytorch_model.bin")
  (tmp_path / "config.json").write_text(json.dumps(config))
  read, cfg = convert.read_checkpoint(str(tmp_path))
  assert cfg == config and set(read) == set(tensors)
  np.testing.assert_array_equal(read["transformer.h.1.attn.c_q.weight"], tensors["transformer.h.1.attn.c_q.weight"])


class _Payload:                   # unpickling it would run a shell command
  def __reduce__(self):
    return (os.system, ("echo pwned > /tmp/mla_jax_pwned",))


def test_pickle_with_code_is_refused(tmp_path):
  torch = pytest.importorskip("torch")
  if os.path.exists("/tmp/mla_jax_pwned"):
    os.remove("/tmp/mla_jax_pwned")
  torch.save({"transformer.wte.weight": torch.zeros(2, 2), "evil": _Payload()}, tmp_path / "model.pt")
  with pytest.raises(ValueError, match="refused to load .*model.pt: it holds more than tensors"):
    convert.read_checkpoint(str(tmp_path / "model.pt"))
  assert not os.path.exists("/tmp/mla_jax_pwned")


def test_convert_command(tmp_path):
  from safetensors.numpy import save_file
  tensors = random_tensors("mla_gated")
  save_file({k: v for k, v in tensors.items() if k != "lm_head.weight"}, str(tmp_path / "model.safetensors"))
  out = subprocess.run([sys.executable, "-m", "experiments.run", "--mode=convert",
                        f"--torch_checkpoint={tmp_path / 'model.safetensors'}", "--variant=mla",
                        f"--output_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  assert "gated mla" in out.stdout and "8 heads" not in out.stdout
  bad = subprocess.run([sys.executable, "-m", "experiments.run", "--mode=convert",
                        f"--torch_checkpoint={tmp_path / 'nope.bin'}", "--variant=mla",
                        f"--output_dir={tmp_path / 'run2'}"], capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and "does not exist" in bad.stderr


@pytest.mark.parametrize("variant", ["mlra4", "gla2", "mla_gated", "tpa", "mfa", "gta"])
def test_export_to_the_authors_layout_gives_their_tensors_back(variant, tmp_path):
  """Their tensors -> our model -> export_authors: the same tensors, bit for bit
  (lm_head is tied to wte and not written), and a config.json convert reads back."""
  from safetensors.numpy import load_file
  tensors, config = random_tensors(variant), MANIFEST[variant]["config"]
  model = convert.to_model(convert.base_variant(variant), tensors, config_json=config)
  assert convert.export_format(model.config) == "authors"          # no Hugging Face format holds these
  out = convert.export_authors(model, str(tmp_path / "out"))
  written = load_file(str(tmp_path / "out" / "model.safetensors"))
  assert out["tensors"] == len(written) == len(tensors) - 1
  for name, value in written.items():
    assert np.array_equal(value, tensors[name]), name
  again = convert.to_model(convert.base_variant(variant), *convert.read_checkpoint(str(tmp_path / "out")))
  assert again.config == model.config


def test_sharded_bin_release_with_an_index(tmp_path):
  """Their released 2.9B weights: `pytorch_model-0000k-of-N.bin` shards and an
  index (as save_pretrained writes them), read weights-only, one shard at a time."""
  torch = pytest.importorskip("torch")
  tensors, config = random_tensors("mlra4"), MANIFEST["mlra4"]["config"]
  names = sorted(tensors)
  weight_map = {}
  for k, part in enumerate((names[:10], names[10:25], names[25:]), 1):
    file = f"pytorch_model-{k:05d}-of-00003.bin"
    torch.save({n: torch.from_numpy(tensors[n].copy()) for n in part}, tmp_path / file)
    weight_map |= {n: file for n in part}
  (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
  (tmp_path / "config.json").write_text(json.dumps(config))
  read, config_json = convert.read_checkpoint(str(tmp_path))
  assert config_json == config and sorted(read) == names
  assert all(np.array_equal(read[n], tensors[n]) for n in names)
  os.remove(tmp_path / "pytorch_model-00002-of-00003.bin")
  with pytest.raises(convert.ConvertError, match="shard pytorch_model-00002-of-00003.bin listed in "
                                                 r"pytorch_model.bin.index.json is missing \(1 of 3 missing\)"):
    convert.read_checkpoint(str(tmp_path))
