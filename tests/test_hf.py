"""Hugging Face checkpoints in and out (mla_jax.hf), against transformers itself.

Each architecture: a tiny model made with transformers' own config and model
classes, every parameter randomised (norm weights included), saved with
`save_pretrained` in small shards; imported, its logits must equal
transformers' forward (float32) and its greedy continuations (our decode
engine; absorbed for DeepSeek) transformers' `generate`, over a ragged batch.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from runner_helpers import story_file  # noqa: E402,F401  (a fixture)

from mla_jax import hf  # noqa: E402
from mla_jax.generate import Sampling, generate  # noqa: E402

VOCAB = 96
RUNNER = [sys.executable, "-m", "experiments.run"]
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=256)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
YARN_ROPE = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
             "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 1.0}
DEEPSEEK = dict(num_key_value_heads=4, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
                first_k_dense_replace=2, n_routed_experts=4)

# name -> (config class, model class, config fields)
MODELS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2, rope_parameters=LLAMA3_ROPE)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=1, sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=4, head_dim=24, tie_word_embeddings=True)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(DEEPSEEK, q_lora_rank=32, v_head_dim=12, rope_parameters=YARN_ROPE)),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(DEEPSEEK, q_lora_rank=None, v_head_dim=16)),
}
CI_MODELS = ("llama", "qwen2", "qwen3", "deepseek_v3", "deepseek_v2")


def hf_model(name: str, seed: int = 0, **overrides):
  config_cls, model_cls, fields = MODELS[name]
  config = getattr(transformers, config_cls)(**{**SMALL, **fields, **overrides})
  torch.manual_seed(seed)
  model = getattr(transformers, model_cls)(config)
  with torch.no_grad():
    for p in model.parameters():          # every one: zero or unit ones would hide a mapping
      p.normal_(0.0, 0.3)
  return model.eval()


def save(model, path, dtype=torch.float32, shard="24KB"):
  model.to(dtype).save_pretrained(path, max_shard_size=shard)
  model.to(torch.float32)
  return str(path)


def torch_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.float().numpy()


def torch_greedy(model, prompt, n):
  with torch.no_grad():
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
  return out[0, len(prompt):].tolist()


def ragged_prompts(seed=0):
  rng = np.random.RandomState(seed)
  lengths = [5, 17, 11]
  return [rng.randint(0, VOCAB, n).tolist() for n in lengths]


def check_matches(ours, theirs, new_tokens=8):
  ids = np.random.RandomState(1).randint(0, VOCAB, (2, 40))
  np.testing.assert_allclose(np.asarray(ours(jnp.asarray(ids))), torch_logits(theirs, ids), rtol=2e-5, atol=2e-5)
  prompts = ragged_prompts()
  lengths = np.array([len(p) for p in prompts])
  padded = np.zeros((len(prompts), lengths.max()), np.int32)
  for b, p in enumerate(prompts):
    padded[b, :len(p)] = p
  out = generate(ours, padded, lengths, max_new_tokens=new_tokens, sampling=Sampling())
  for b, p in enumerate(prompts):
    assert out.tokens[b].tolist() == torch_greedy(theirs, p, new_tokens), b


@pytest.mark.parametrize("name", CI_MODELS)
def test_import_matches_transformers(name, tmp_path):
  theirs = hf_model(name)
  path = save(theirs, tmp_path / name)
  assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))      # sharded
  ours, _ = hf.load(path, param_dtype="float32")
  check_matches(ours, theirs)


@pytest.mark.full
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_import_of_half_precision_checkpoints_full(name, dtype, tmp_path):
  theirs = hf_model(name)
  path = save(theirs, tmp_path / name, dtype=getattr(torch, dtype))
  reloaded = getattr(transformers, MODELS[name][1]).from_pretrained(path, dtype=torch.float32).eval()
  ours, _ = hf.load(path, param_dtype="float32")
  check_matches(ours, reloaded)
  native, _ = hf.load(path)                                # auto: the checkpoint's own dtype
  assert native.config.param_dtype == dtype


def test_import_of_bf16_checkpoint_and_naive_decode(tmp_path):
  """A bfloat16 checkpoint read in float32 equals transformers reading it in
  float32; DeepSeek's naive (re-expanded) decode equals it too."""
  from mla_jax import with_options
  theirs = hf_model("deepseek_v3")
  path = save(theirs, tmp_path / "ds", dtype=torch.bfloat16)
  reloaded = transformers.DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  ours, _ = hf.load(path, param_dtype="float32")
  check_matches(with_options(ours, decode_impl="naive"), reloaded, new_tokens=4)


def test_rope_scalings_match_transformers():
  """Our RoPE frequencies and cos/sin factor, beside transformers' own functions."""
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

  from mla_jax.layers import rope_frequencies
  for name, params in (("llama", LLAMA3_ROPE), ("deepseek_v3", YARN_ROPE),
                       ("llama", {"rope_type": "linear", "rope_theta": 500.0, "factor": 3.0})):
    theirs_config = hf_model(name).config
    inv, factor = ROPE_INIT_FUNCTIONS[params["rope_type"]](type(theirs_config)(**{**SMALL, **MODELS[name][2],
                                                                                   "rope_parameters": params}))
    ours = hf.model_config(hf_config_dict(name, rope_parameters=params))
    dim = ours.attention.qk_rope_head_dim if name.startswith("deepseek") else ours.attention.head_dim
    mine, my_factor = rope_frequencies(dim, ours.attention.rope_theta, ours.attention)
    np.testing.assert_allclose(np.asarray(mine), inv.numpy(), rtol=1e-6)
    assert my_factor == pytest.approx(factor, rel=1e-6)


def hf_config_dict(name, **overrides):
  config_cls, model_cls, fields = MODELS[name]
  return getattr(transformers, config_cls)(**{**SMALL, **fields, **overrides}).to_dict() | {"architectures": [model_cls]}


# ----------------------------------------------------------------------------- out


@pytest.mark.parametrize("variant", [pytest.param("gqa", marks=pytest.mark.full), "mla"])
def test_export_round_trip(variant, tmp_path):
  """Our model (every parameter random, MLA with its variance scales) ->
  export -> transformers loads it and gives our logits; -> import gives the
  parameters back bit for bit (MLA: with the scales folded into the norms)."""
  from helpers import randomize, small_config
  config = small_config(variant, d_model=64, vocab=VOCAB, **({"qk_norm": True} if variant == "gqa" else {}))
  config = config.replace(tie_embeddings=False)
  ours = randomize(__import__("mla_jax").Transformer(config, rngs=nnx.Rngs(0)), seed=3)
  out = hf.export(ours, str(tmp_path / "out"), max_shard_bytes=40_000)
  assert out["shards"] > 1 and out["architecture"] == ("Qwen3ForCausalLM" if variant == "gqa" else "DeepseekV3ForCausalLM")
  theirs, info = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32,
                                                                    output_loading_info=True)
  assert not any(info.values()), info                  # nothing missing, unexpected or mismatched
  theirs.eval()
  ids = np.random.RandomState(2).randint(0, VOCAB, (2, 24))
  np.testing.assert_allclose(torch_logits(theirs, ids), np.asarray(ours(jnp.asarray(ids))), rtol=2e-5, atol=2e-5)
  back, _ = hf.load(str(tmp_path / "out"))
  mine = dict(nnx.to_flat_state(nnx.state(ours, nnx.Param)))
  for path, var in nnx.to_flat_state(nnx.state(back, nnx.Param)):
    if variant == "mla" and path[-2:-1] in (("q_norm",), ("kv_norm",)):
      continue                                   # holds the folded scale: the function, not the bits
    assert np.array_equal(np.asarray(var.get_value()), np.asarray(mine[path].get_value())), path
  again = hf.export(back, str(tmp_path / "again"), max_shard_bytes=40_000)
  assert again["tensors"] == out["tensors"]
  for name in ("model.layers.0.self_attn.kv_a_layernorm.weight", "model.layers.1.mlp.up_proj.weight"):
    if variant == "mla" or "layernorm" not in name:
      a = hf.TensorFiles(str(tmp_path / "out")).read_all()[name]
      b = hf.TensorFiles(str(tmp_path / "again")).read_all()[name]
      assert np.array_equal(a, b), name


def test_export_refusals(tmp_path):
  from helpers import small_config

  from mla_jax.model import abstract_model
  for config, words in ((small_config("mlra4"), "no Hugging Face format holds a mlra4 model"),
                        (small_config("mha", flavour="gpt2"), "the GPT-2 flavour"),
                        (small_config("mla", gated=True), "no output gate")):
    with pytest.raises(hf.HFError, match=words):
      hf.export(abstract_model(config), str(tmp_path / "x"))
    assert not os.path.exists(tmp_path / "x")


# ----------------------------------------------------------------------------- bad input


def test_bad_checkpoints_are_refused_with_one_line(tmp_path):
  path = save(hf_model("llama"), tmp_path / "llama")
  cases = {}
  moe = tmp_path / "moe"
  save(hf_model("deepseek_v3", first_k_dense_replace=1), moe)
  cases["moe"] = (str(moe), "has MoE layers (1 of 2, from first_k_dense_replace=1); MoE FFNs are not supported")
  gone = tmp_path / "gone"
  save(hf_model("llama"), gone)
  os.remove(gone / "model-00003-of-00014.safetensors")
  cases["missing shard"] = (str(gone), "shard model-00003-of-00014.safetensors listed in "
                                       "model.safetensors.index.json is missing")
  wrong = tmp_path / "wrong"
  save(hf_model("llama"), wrong)
  cfg = json.loads((wrong / "config.json").read_text())
  (wrong / "config.json").write_text(json.dumps(cfg | {"intermediate_size": 128}))
  cases["shapes"] = (str(wrong), "has shape (96, 64), but config.json implies (128, 64): the shards and "
                                 "config.json disagree")
  other = tmp_path / "other"
  save(hf_model("llama"), other)
  (other / "config.json").write_text(json.dumps(cfg | {"architectures": ["GPTNeoXForCausalLM"]}))
  cases["arch"] = (str(other), "architecture 'GPTNeoXForCausalLM' is not supported; mla_jax imports")
  window = tmp_path / "window"
  save(hf_model("mistral", sliding_window=16), window)
  cases["window"] = (str(window), "sliding-window attention (window 16) is not supported")
  for what, (src, words) in cases.items():
    with pytest.raises(hf.HFError, match=words.replace("(", r"\(").replace(")", r"\)")):
      hf.import_checkpoint(src, str(tmp_path / f"run_{what.replace(' ', '_')}"), progress=False)
    assert not os.path.exists(tmp_path / f"run_{what.replace(' ', '_')}"), what
  assert os.path.exists(path)


def test_sharded_bin_checkpoints_load_weights_only(tmp_path):
  """Sharded `pytorch_model-0000k-of-N.bin` with an index (what transformers 4
  and the MLRA authors' release wrote), written here with torch.save."""
  theirs = hf_model("qwen2")
  state = {k: v.clone() for k, v in theirs.state_dict().items()}
  names = sorted(state)
  folder = tmp_path / "bin"
  folder.mkdir()
  weight_map = {}
  for k, part in enumerate((names[: len(names) // 2], names[len(names) // 2:]), 1):
    file = f"pytorch_model-{k:05d}-of-00002.bin"
    torch.save({n: state[n] for n in part}, folder / file)
    weight_map |= {n: file for n in part}
  (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
  theirs.config.save_pretrained(folder)
  ours, _ = hf.load(str(folder), param_dtype="float32")
  ids = np.random.RandomState(1).randint(0, VOCAB, (2, 16))
  np.testing.assert_allclose(np.asarray(ours(jnp.asarray(ids))), torch_logits(theirs, ids), rtol=2e-5, atol=2e-5)


def test_the_library_does_not_import_transformers():
  code = ("import sys, mla_jax, mla_jax.hf, mla_jax.convert, mla_jax.tensor_files; "
          "assert 'transformers' not in sys.modules and 'torch' not in sys.modules, 'imported'")
  subprocess.run([sys.executable, "-c", code], check=True)


STORY_WORDS = ("Tom Lily Sam Mia Ben ball kite cat dog cake box had a One day the was lost looked for and found "
               "it .").split()           # every word of runner_helpers' story file


def test_runner_imports_generates_fine_tunes_and_exports(tmp_path, story_file):
  """Through the runner: --mode=convert --hf_checkpoint (with a tokenizer.json and
  Llama-3-style stop tokens), generate from the run, fine-tune it with --mode=train
  and no model flags (its own model, tokenizer and stop tokens), --mode=export
  back out (transformers loads it); bad input: one line, exit status 2, nothing
  written."""
  from runner_helpers import run_cmd
  from tokenizers import Tokenizer, models, pre_tokenizers

  from mla_jax import train as T
  theirs = hf_model("llama")
  path = tmp_path / "llama"
  save(theirs, path)
  words = [f"w{i}" for i in range(VOCAB - 3)]
  words[60:60 + len(STORY_WORDS)] = STORY_WORDS
  vocab = {w: i for i, w in enumerate(words)} | {"<|begin_of_text|>": VOCAB - 3, "<|end_of_text|>": VOCAB - 2,
                                                 "<|eot_id|>": VOCAB - 1}
  tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
  tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  tokenizer.save(str(path / "tokenizer.json"))
  (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>", "add_bos_token": True}))
  (path / "generation_config.json").write_text(json.dumps({"bos_token_id": VOCAB - 3,
                                                           "eos_token_id": [VOCAB - 2, VOCAB - 1]}))
  run = tmp_path / "run"
  out = run_cmd(RUNNER + ["--mode=convert", f"--hf_checkpoint={path}", f"--output_dir={run}"])
  assert out.returncode == 0, out.stderr
  assert f"stop tokens [{VOCAB - 2}, {VOCAB - 1}], begin token {VOCAB - 3}" in out.stdout
  gen = run_cmd(RUNNER + ["--mode=generate", f"--output_dir={run}", "--prompt=w5 w7 w9", "--max_new_tokens=6",
                 "--temperature=0"])
  assert gen.returncode == 0, gen.stderr
  ids = [VOCAB - 3, 5, 7, 9]                       # the begin token first, as the model was trained
  expected = torch_greedy(theirs, ids, 6)
  stop = next((k for k, t in enumerate(expected) if t in (VOCAB - 2, VOCAB - 1)), len(expected))
  text = " ".join(words[t] for t in expected[:stop])
  assert stop >= 2 and ("w5 w7 w9" + text) in gen.stdout.splitlines(), (expected, gen.stdout)

  bad = run_cmd(RUNNER + ["--mode=convert", f"--hf_checkpoint={tmp_path / 'nowhere'}", f"--output_dir={tmp_path / 'r2'}"])
  assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "is not a folder" in bad.stderr
  assert not (tmp_path / "r2").exists()

  exported = run_cmd(RUNNER + ["--mode=export", f"--output_dir={run}", f"--export_dir={tmp_path / 'out'}",
                      "--export_dtype=bfloat16"])
  assert exported.returncode == 0, exported.stderr
  assert "as LlamaForCausalLM" in exported.stdout and (tmp_path / "out" / "tokenizer.json").exists()
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
  assert back.generation_config.eos_token_id == [VOCAB - 2, VOCAB - 1]
  ref = transformers.LlamaForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).to(torch.float32).eval()
  ids = np.random.RandomState(4).randint(0, VOCAB, (1, 12))
  np.testing.assert_array_equal(torch_logits(back, ids), torch_logits(ref, ids))      # the same bf16 weights
  again = run_cmd(RUNNER + ["--mode=export", f"--output_dir={run}", f"--export_dir={tmp_path / 'out'}"])
  assert again.returncode == 2 and "exists and is not an empty folder" in again.stderr

  lr = 1e-3
  tuned = run_cmd(RUNNER + ["--mode=train", "--data=tinystories", f"--tinystories_train={story_file / 'train.txt'}",
                            f"--data_dir={tmp_path / 'cache'}", f"--output_dir={run}", "--steps=2",
                            "--batch_size=2", "--seq_len=16", f"--learning_rate={lr}", "--warmup_steps=0",
                            "--eval_batches=1", "--eval_batch_size=2", "--max_new_tokens=4", "--noprogress"])
  assert tuned.returncode == 0, tuned.stderr
  assert "resumed from step 0" in tuned.stdout
  ckpt = T.Checkpoints(str(run / "checkpoints"), async_save=False)
  meta = ckpt.read_meta(2)
  imported = ckpt.restore_as_saved(0)["params"]
  trained = ckpt.restore_as_saved(2)["params"]
  ckpt.close()
  assert meta["tokenizer"].endswith("tokenizer.json") and meta["eos_ids"] == [VOCAB - 2, VOCAB - 1]
  assert meta["bos_id"] == VOCAB - 3 and "converted_from" not in meta     # a later resume restores its optimizer
  moved = [float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max()) for a, b in
           zip(jax.tree.leaves(imported), jax.tree.leaves(trained))]
  assert 0 < max(moved) <= 3 * lr, max(moved)      # two AdamW steps from the imported weights, not a fresh init


def test_load_places_each_parameter_on_the_mesh(tmp_path):
  """Loading onto a mesh puts every parameter on its sharding as it is read; the
  sharded model gives the unsharded one's logits."""
  from mla_jax import sharding
  theirs = hf_model("deepseek_v3")
  path = save(theirs, tmp_path / "ds")
  mesh = sharding.make_mesh("data:2,tensor:2", hf.model_config(hf.read_config(path)))
  ours, _ = hf.load(path, param_dtype="float32", mesh=mesh)
  w = ours.layers[0].mlp.w_gate.get_value()
  assert len({str(s.index) for s in w.addressable_shards}) == 2          # split in two, not replicated
  ids = np.random.RandomState(1).randint(0, VOCAB, (2, 12))
  with sharding.use_mesh(mesh):
    logits = jax.jit(lambda m, t: m(t))(ours, jnp.asarray(ids))
  np.testing.assert_allclose(np.asarray(logits), torch_logits(theirs, ids), rtol=2e-5, atol=2e-5)


def test_import_memory_stays_under_model_plus_largest_shard():
  """experiments/import_memory.py on a ~250 MB synthetic checkpoint: the
  streaming import's peak host memory growth is at most the model plus its
  largest shard (reading every shard first is not)."""
  from experiments import import_memory
  sizes, rows = import_memory.main(["--gb=0.25", "--shard_mb=64", "--d_model=1024", "--naive"])
  bound = sizes["model_bytes"] + sizes["largest_shard_bytes"]
  (_, streaming), (_, naive) = rows
  assert sizes["shards"] >= 3 and streaming <= bound < naive, (streaming, bound, naive)


def test_a_tokenizer_finds_its_end_token_in_tokenizer_config(tmp_path):
  """DeepSeek's end token is none of the usual spellings: the tokenizer_config.json
  beside tokenizer.json names it."""
  from tokenizers import Tokenizer, models

  from mla_jax.data import tokenizer as tok
  vocab = {"a": 0, "b": 1, "<｜end▁of▁sentence｜>": 2}
  Tokenizer(models.WordLevel(vocab, unk_token="a")).save(str(tmp_path / "tokenizer.json"))
  with pytest.raises(ValueError, match="no end-of-text token"):
    tok.load(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<｜end▁of▁sentence｜>"}}))
  assert tok.load(str(tmp_path / "tokenizer.json")).eos_id == 2
