"""Hugging Face checkpoints in and out.

In: a checkpoint folder (config.json; one or sharded safetensors, or sharded
weights-only `.bin` with their index; float32, bfloat16 or float16) of
`LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`,
`Qwen3ForCausalLM` (our MHA/MQA/GQA, with Qwen2's q/k/v biases and Qwen3's q/k
norms) or a dense `DeepseekV2ForCausalLM` / `DeepseekV3ForCausalLM` (our MLA
with `scales=False`, d_v free, a full-rank query when q_lora_rank is null)
becomes a run directory (step 0) that eval, generate, serve and train read,
with its tokenizer and stop tokens.

Out: the reverse, for the models those formats hold (`export`); other variants
go to the MLRA authors' layout where their module describes one
(`mla_jax.convert`), else a one-line refusal.

The names: `model.embed_tokens`, `model.norm`, `lm_head` (absent when tied),
`model.layers.{i}.{input_layernorm, post_attention_layernorm}`,
`model.layers.{i}.mlp.{gate, up, down}_proj` (SwiGLU), and under
`model.layers.{i}.self_attn.` what the variant's module says (`hf_layout`, as
data: `mla_jax.authors_layout`). torch Linear weights are [out, in].

Loading streams: one shard at a time, each tensor read from a memory map, cast
and placed (on the mesh's shardings when given) as soon as the parameters it
feeds are complete, so host memory holds the placed model plus at most a shard.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np

from mla_jax import registry
from mla_jax.authors_layout import Layout, Param, invert
from mla_jax.config import DTYPES, ModelConfig
from mla_jax.tensor_files import NUMPY_DTYPES, CheckpointFileError, TensorFiles

# architecture -> model_type, as transformers names them
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                 "Qwen3ForCausalLM": "qwen3", "DeepseekV2ForCausalLM": "deepseek_v2",
                 "DeepseekV3ForCausalLM": "deepseek_v3"}
LATENT_TYPES = ("deepseek_v2", "deepseek_v3")
TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json")


class HFError(ValueError):
  pass


def _identity(w):
  return w


def _transpose(w):
  return w.T


# ----------------------------------------------------------------------------- config


def read_config(path: str) -> dict:
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isdir(path):
    raise HFError(f"{path!r} is not a folder; pass the checkpoint folder (config.json and its weights)")
  if not os.path.exists(cfg_path):
    raise HFError(f"{path} holds no config.json; a Hugging Face checkpoint folder has one beside its weights")
  try:
    with open(cfg_path) as f:
      hf = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise HFError(f"{cfg_path} is not valid JSON ({e}); re-download it") from None
  if not isinstance(hf, dict):
    raise HFError(f"{cfg_path} holds a JSON {type(hf).__name__}, not a model config")
  return hf


def model_type(hf: dict) -> str:
  archs = hf.get("architectures") or []
  arch = archs[0] if archs else None
  if arch is None and hf.get("model_type") in ARCHITECTURES.values():    # a bare config: its model_type
    return hf["model_type"]
  if arch not in ARCHITECTURES:
    raise HFError(f"architecture {arch or hf.get('model_type')!r} is not supported; mla_jax imports "
                  f"{', '.join(ARCHITECTURES)}")
  return ARCHITECTURES[arch]


def _rope_fields(hf: dict) -> dict:
  """Our RoPE fields from `rope_parameters` (transformers 5) or `rope_scaling` + `rope_theta` (4.x)."""
  params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
  theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
  kind = params.get("rope_type", params.get("type", "default"))
  if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
    raise HFError("partial_rotary_factor != 1 (RoPE on part of each head) is not supported")
  out = {"rope_theta": theta}
  if kind == "default":
    return out
  if kind not in ("linear", "llama3", "yarn"):
    raise HFError(f"RoPE scaling {kind!r} is not supported; mla_jax reads linear, llama3 and yarn")
  original = params.get("original_max_position_embeddings") or 0
  factor = params.get("factor") or (hf["max_position_embeddings"] / original if original else 1.0)
  out |= {"rope_scaling": kind, "rope_factor": float(factor), "rope_original_max_len": int(original)}
  if kind == "llama3":
    out |= {"rope_low_freq_factor": float(params["low_freq_factor"]),
            "rope_high_freq_factor": float(params["high_freq_factor"])}
  if kind == "yarn":
    if params.get("truncate", True) is False:
      raise HFError("yarn RoPE with truncate=false is not supported")
    out |= {"rope_beta_fast": float(params.get("beta_fast") or 32), "rope_beta_slow": float(params.get("beta_slow") or 1),
            "rope_mscale": float(params.get("mscale") or 0), "rope_mscale_all_dim": float(params.get("mscale_all_dim") or 0),
            "rope_attention_factor": float(params.get("attention_factor") or 0)}
  return out


def _refuse_unsupported(hf: dict, kind: str) -> None:
  layers = hf["num_hidden_layers"]
  if hf.get("hidden_act", "silu") != "silu":
    raise HFError(f"hidden_act {hf['hidden_act']!r}: mla_jax's MLP is SwiGLU (silu)")
  if kind in LATENT_TYPES:
    dense_layers = hf.get("first_k_dense_replace", 0)
    if dense_layers < layers:
      raise HFError(f"this DeepSeek checkpoint has MoE layers ({layers - dense_layers} of {layers}, from "
                    f"first_k_dense_replace={dense_layers}); MoE FFNs are not supported, only dense ones "
                    "(first_k_dense_replace = num_hidden_layers)")
  if hf.get("attention_bias") and kind != "qwen2":
    raise HFError("attention_bias=true (biases on every attention projection) is not supported")
  if hf.get("mlp_bias"):
    raise HFError("mlp_bias=true is not supported")
  window = hf.get("sliding_window")
  if kind in ("qwen2", "qwen3"):
    sliding = "sliding_attention" in (hf.get("layer_types") or []) or (
        hf.get("use_sliding_window") and window and hf.get("max_window_layers", layers) < layers)
  else:
    sliding = kind == "mistral" and window is not None and window < hf.get("max_position_embeddings", 0)
  if sliding:
    raise HFError(f"sliding-window attention (window {window}) is not supported; only a config whose layers "
                  "all attend to the whole context imports")


def model_config(hf: dict, param_dtype: str = "auto") -> ModelConfig:
  """Our ModelConfig for a Hugging Face config.json (one line for what we cannot hold)."""
  kind = model_type(hf)
  try:
    _refuse_unsupported(hf, kind)
    if kind in LATENT_TYPES:
      variant = "mla"
    else:
      heads, kv = hf["num_attention_heads"], hf.get("num_key_value_heads") or hf["num_attention_heads"]
      variant = "mha" if kv == heads else "mqa" if kv == 1 else "gqa"
    fields = registry.get(variant).module.hf_config(hf) | _rope_fields(hf)
    for pinned in registry.get(variant).pinned:
      fields.pop(pinned, None)
    if param_dtype == "auto":
      param_dtype = TORCH_DTYPES.get(str(hf.get("dtype") or hf.get("torch_dtype") or "float32"), "float32")
    return ModelConfig(flavour="llama", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
                       num_layers=hf["num_hidden_layers"], mlp_dim=hf["intermediate_size"],
                       max_seq_len=hf.get("max_position_embeddings", 2048), norm_eps=hf.get("rms_norm_eps", 1e-6),
                       tie_embeddings=bool(hf.get("tie_word_embeddings", False)), param_dtype=param_dtype,
                       attention=registry.attention_config(variant, **fields))
  except KeyError as e:
    raise HFError(f"config.json lacks {e.args[0]!r}, which a {kind} config has; re-download it") from None


# ----------------------------------------------------------------------------- layout


def layout(config: ModelConfig, hf: dict) -> Layout:
  """Every tensor of the Hugging Face model of `config` and how each of our parameters is built from them."""
  d, f, v = config.d_model, config.mlp_dim, config.vocab_size
  if config.flavour != "llama":
    raise HFError("the GPT-2 flavour (LayerNorm, learned positions, GELU MLP) has no Llama/DeepSeek "
                  "counterpart; train a llama-flavour model to export it")
  try:
    attn = registry.get(config.attention.variant).module.hf_layout(config.attention, d, hf)
  except (AttributeError, ValueError) as e:
    why = f": {e}" if isinstance(e, ValueError) else ""
    raise HFError(f"no Hugging Face format holds a {config.attention.variant} model{why}") from None
  tensors = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
  params = [Param(("embed",), ("model.embed_tokens.weight",), _identity),
            Param(("final_norm", "weight"), ("model.norm.weight",), _identity)]
  if not config.tie_embeddings:
    tensors["lm_head.weight"] = (v, d)
    params.append(Param(("lm_head",), ("lm_head.weight",), _identity))
  for i in range(config.num_layers):
    p, layer = f"model.layers.{i}.", ("layers", i)
    tensors |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d), p + "mlp.down_proj.weight": (d, f)}
    params += [Param(layer + ("attn_norm", "weight"), (p + "input_layernorm.weight",), _identity),
               Param(layer + ("mlp_norm", "weight"), (p + "post_attention_layernorm.weight",), _identity),
               Param(layer + ("mlp", "w_gate"), (p + "mlp.gate_proj.weight",), _transpose),
               Param(layer + ("mlp", "w_up"), (p + "mlp.up_proj.weight",), _transpose),
               Param(layer + ("mlp", "w_down"), (p + "mlp.down_proj.weight",), _transpose)]
    tensors |= {p + "self_attn." + name: shape for name, shape in attn.tensors.items()}
    params += [Param(layer + ("attn",) + a.path, tuple(p + "self_attn." + s for s in a.sources), a.build)
               for a in attn.params]
  return Layout(tensors, tuple(params))


def _ignorable(name: str, config: ModelConfig) -> bool:
  """Tensors a checkpoint may hold that carry nothing we need."""
  return name.endswith("rotary_emb.inv_freq") or (config.tie_embeddings and name == "lm_head.weight")


def check_tensors(files: TensorFiles, lay: Layout, config: ModelConfig) -> None:
  have = files.shapes()
  missing = [n for n in lay.tensors if n not in have]
  if missing:
    raise HFError(f"missing tensor {missing[0]!r} ({len(missing)} missing in all): the checkpoint is incomplete "
                  "or config.json describes another model")
  extra = sorted(n for n in have if n not in lay.tensors and not _ignorable(n, config))
  if extra:
    raise HFError(f"unexpected tensor {extra[0]!r} ({len(extra)} unexpected in all): config.json describes "
                  "another model than the shards hold")
  for name, shape in lay.tensors.items():
    if tuple(have[name]) != tuple(shape):
      file = os.path.basename(files.entries[name][0])
      raise HFError(f"tensor {name!r} in {file} has shape {tuple(have[name])}, but config.json implies {shape}: "
                    "the shards and config.json disagree")


# ----------------------------------------------------------------------------- import


def load(path: str, *, param_dtype: str = "auto", mesh=None, progress: bool = False):
  """(our Transformer holding the checkpoint's weights, the Hugging Face config):
  one shard at a time, each parameter placed (on `mesh`'s shardings when given)
  as soon as the tensors it is built from have been read."""
  import jax
  from flax import nnx
  from tqdm import tqdm

  from mla_jax import sharding
  from mla_jax.model import abstract_model
  hf = read_config(path)
  config = model_config(hf, param_dtype)
  try:
    files = TensorFiles(path)
  except CheckpointFileError as e:
    raise HFError(str(e)) from None
  lay = layout(config, hf)
  check_tensors(files, lay, config)

  model = abstract_model(config)
  variables = {tuple(p): var for p, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  unmapped = set(variables) ^ {p.path for p in lay.params}
  if unmapped:
    raise HFError(f"internal: unmapped parameters {sorted(unmapped, key=str)[:3]}")
  shardings = {}
  if mesh is not None:
    placed = sharding.state_shardings(nnx.state(model, nnx.Param), mesh)
    shardings = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(placed)}
  users: dict[str, list[Param]] = {}
  for param in lay.params:
    for source in param.sources:
      users.setdefault(source, []).append(param)
  left = {name: len(ps) for name, ps in users.items()}
  read: dict[str, np.ndarray] = {}
  bar = tqdm(total=sum(files.nbytes(f) for f in files.files), unit="B", unit_scale=True, desc="import",
             disable=not progress)
  for file in files.files:
    for name, array in files.tensors(file):
      bar.update(array.nbytes)
      if name not in users:
        continue
      read[name] = array
      for param in users[name]:
        if not all(s in read for s in param.sources):
          continue
        var = variables[param.path]
        # builds only move elements: they run on the stored dtype, and one copy casts to ours
        value = np.asarray(param.build(*(read[s] for s in param.sources))).astype(var.get_value().dtype, copy=False)
        if not np.isfinite(value).all():
          raise HFError(f"tensor {param.sources[0]!r} holds NaN or infinite values; the checkpoint is damaged")
        # one copy in flight: an asynchronous copy could keep `value` alive while the next tensors
        # are read (once, under load, the peak held one more embedding-sized tensor)
        var.set_value(jax.block_until_ready(jax.device_put(value, shardings.get(param.path))))
        for s in param.sources:
          left[s] -= 1
          if left[s] == 0:
            del read[s]
  bar.close()
  return model, hf


def _special_tokens(path: str, tokenizer_path: str | None) -> dict:
  """BOS (tokenizer_config.json) and every EOS id (generation_config.json, else config.json)."""
  def read(name):
    p = os.path.join(path, name)
    if not os.path.exists(p):
      return {}
    with open(p) as f:
      return json.load(f)
  gen, cfg, tok_cfg = read("generation_config.json"), read("config.json"), read("tokenizer_config.json")
  eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
  eos = [] if eos is None else [int(e) for e in (eos if isinstance(eos, list) else [eos])]
  bos = gen.get("bos_token_id", cfg.get("bos_token_id"))
  add_bos = tok_cfg.get("add_bos_token")
  bos_token = tok_cfg.get("bos_token")
  if isinstance(bos_token, dict):
    bos_token = bos_token.get("content")
  if bos_token and tokenizer_path:
    from tokenizers import Tokenizer
    found = Tokenizer.from_file(tokenizer_path).token_to_id(bos_token)
    bos = found if found is not None else bos
  return {"eos_ids": eos, "bos_id": None if bos is None else int(bos),
          "add_bos": bool(add_bos) if add_bos is not None else bos is not None}


def import_checkpoint(path: str, output_dir: str, *, param_dtype: str = "auto", progress: bool = True) -> dict:
  """Write a Hugging Face checkpoint folder as a run directory (step 0) of ours,
  its tokenizer files copied beside the checkpoints."""
  from mla_jax import train as T
  from mla_jax.data import tokenizer as tok
  try:
    T.refuse_existing_run(output_dir)
  except ValueError as e:
    raise HFError(str(e)) from None
  model, hf = load(path, param_dtype=param_dtype, progress=progress)
  os.makedirs(output_dir, exist_ok=True)
  copied = []
  for name in TOKENIZER_FILES:
    if os.path.exists(os.path.join(path, name)):
      shutil.copyfile(os.path.join(path, name), os.path.join(output_dir, name))
      copied.append(name)
  tokenizer = os.path.abspath(os.path.join(output_dir, "tokenizer.json")) if "tokenizer.json" in copied else ""
  special = _special_tokens(path, tokenizer or None)
  T.save_step0(output_dir, model, tokenizer=tokenizer,
               tokenizer_name=f"huggingface:{os.path.basename(os.path.abspath(path))}" if tokenizer else "",
               tokenizer_sha256=tok.fingerprint(tokenizer) if tokenizer else "", data="",
               converted_from=os.path.abspath(path), hf_model_type=model_type(hf), **special)
  return {"config": model.config, "tensors": len(TensorFiles(path).entries), "tokenizer": tokenizer, **special}


# ----------------------------------------------------------------------------- export


def hf_config(config: ModelConfig, *, dtype: str = "float32", special: dict | None = None) -> dict:
  """The config.json of the Hugging Face model that holds `config` (Llama, Qwen2,
  Qwen3 or DeepSeek-V3, by what the attention needs)."""
  a = config.attention
  special = special or {}
  common = {"vocab_size": config.vocab_size, "hidden_size": config.d_model, "intermediate_size": config.mlp_dim,
            "num_hidden_layers": config.num_layers, "num_attention_heads": a.num_heads,
            "max_position_embeddings": config.max_seq_len, "rms_norm_eps": config.eps, "hidden_act": "silu",
            "tie_word_embeddings": config.tie_embeddings, "dtype": dtype, "attention_dropout": 0.0,
            "rope_parameters": _rope_parameters(a), "bos_token_id": special.get("bos_id"),
            "eos_token_id": (special.get("eos_ids") or [None])[0] if len(special.get("eos_ids") or []) <= 1
            else special["eos_ids"]}
  if a.variant in ("mha", "mqa", "gqa"):
    kind = "qwen2" if a.qkv_bias else "qwen3" if a.qk_norm else "llama"
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[kind]
    if a.qkv_bias and a.qk_norm:
      raise HFError("q/k/v biases and q/k norms together have no Hugging Face format (Qwen2 has the one, "
                    "Qwen3 the other)")
    out = common | {"num_key_value_heads": a.num_kv_heads, "head_dim": a.head_dim, "attention_bias": False,
                    "mlp_bias": False, "use_sliding_window": False, "sliding_window": None}
    return {"architectures": [arch], "model_type": kind} | out
  if not hasattr(a, "kv_lora_rank"):
    raise HFError(f"no Hugging Face format holds a {a.variant} model")
  return {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3"} | common | {
      "num_key_value_heads": a.num_heads, "q_lora_rank": a.q_lora_rank or None, "kv_lora_rank": a.kv_lora_rank,
      "qk_nope_head_dim": a.qk_nope_head_dim, "qk_rope_head_dim": a.qk_rope_head_dim,
      "v_head_dim": a.value_dim, "head_dim": a.qk_rope_head_dim, "rope_interleave": False,
      "first_k_dense_replace": config.num_layers, "n_routed_experts": 1, "n_shared_experts": 1,
      "num_experts_per_tok": 1, "moe_intermediate_size": config.mlp_dim, "n_group": 1, "topk_group": 1,
      "attention_bias": False}


def _rope_parameters(a) -> dict:
  out = {"rope_type": "default" if a.rope_scaling == "none" else a.rope_scaling, "rope_theta": a.rope_theta}
  if a.rope_scaling != "none":
    out["factor"] = a.rope_factor
  if a.rope_scaling in ("llama3", "yarn"):
    out["original_max_position_embeddings"] = a.rope_original_max_len
  if a.rope_scaling == "llama3":
    out |= {"low_freq_factor": a.rope_low_freq_factor, "high_freq_factor": a.rope_high_freq_factor}
  if a.rope_scaling == "yarn":
    out |= {"beta_fast": a.rope_beta_fast, "beta_slow": a.rope_beta_slow}
    out |= {k: v for k, v in (("mscale", a.rope_mscale), ("mscale_all_dim", a.rope_mscale_all_dim),
                              ("attention_factor", a.rope_attention_factor)) if v}
  return out


def tensors_of(model, hf: dict) -> dict[str, np.ndarray]:
  """The Hugging Face tensors holding `model`'s weights (each as stored: our parameter dtype).

  MLA's variance scales (the MLRA code base's sqrt(d / rank) after each latent
  norm) fold into the norm weights, which DeepSeek's format then holds: the same
  function, read back as a scales=False model."""
  from mla_jax.model import per_layer_params
  config = model.config
  lay = layout(config, hf)                   # a model no format holds is refused before any weight is read
  values = {path: np.asarray(v) for path, v in per_layer_params(model).items()}
  if getattr(config.attention, "scales", False):
    attn = model.layers.attn if config.scan_layers else model.layers[0].attn
    for i in range(config.num_layers):
      for norm, scale in (("q_norm", attn.q_scale), ("kv_norm", attn.kv_scale)):
        key = ("layers", i, "attn", norm, "weight")
        if key in values:
          values[key] = (values[key].astype(np.float32) * np.float32(scale)).astype(values[key].dtype)
  return invert(lay, values)


def export(model, output_dir: str, *, dtype: str | None = None, max_shard_bytes: int = 5 << 30,
           special: dict | None = None, tokenizer_dir: str | None = None) -> dict:
  """Write `model` as a Hugging Face checkpoint folder: config.json and
  safetensors (sharded with an index past `max_shard_bytes`) in `dtype`
  (default: the parameters' own)."""
  from safetensors.numpy import save_file
  config = model.config
  dtype = dtype or config.param_dtype
  if dtype not in DTYPES:
    raise HFError(f"unknown export dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
  if os.path.exists(os.path.join(output_dir, "config.json")):
    raise HFError(f"{output_dir} already holds a config.json; give a new export folder")
  hf = hf_config(config, dtype=dtype, special=special)
  tensors = {k: np.ascontiguousarray(v.astype(NUMPY_DTYPES[dtype])) for k, v in tensors_of(model, hf).items()}
  os.makedirs(output_dir, exist_ok=True)
  shards, current, size = [], {}, 0
  for name, t in tensors.items():
    if current and size + t.nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name], size = t, size + t.nbytes
  shards.append(current)
  if len(shards) == 1:
    save_file(shards[0], os.path.join(output_dir, "model.safetensors"), metadata={"format": "pt"})
  else:
    weight_map = {}
    for k, shard in enumerate(shards, 1):
      file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
      save_file(shard, os.path.join(output_dir, file), metadata={"format": "pt"})
      weight_map |= {name: file for name in shard}
    with open(os.path.join(output_dir, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map},
                f, indent=2)
  if tokenizer_dir:
    for name in TOKENIZER_FILES:
      if os.path.exists(os.path.join(tokenizer_dir, name)):
        shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(output_dir, name))
  with open(os.path.join(output_dir, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)
  return {"architecture": hf["architectures"][0], "shards": len(shards), "tensors": len(tensors),
          "bytes": sum(t.nbytes for t in tensors.values())}

