"""Import checkpoints saved by the MLRA authors' PyTorch code (and their released
weights, which use the same layout).

Their layout is nanoGPT's: `transformer.wte.weight` (tied with
`lm_head.weight`), `transformer.h.{i}.{input_layernorm, post_attention_layernorm}`,
`transformer.h.{i}.attn.*` (each variant's module describes its own, as data:
`authors_layout` and `authors_config`, see `mla_jax.authors_layout`),
`transformer.h.{i}.mlp.{c_fc1, c_fc2, c_proj}` (SwiGLU: silu(c_fc1 x) * c_fc2 x)
and `layernorm.weight`; torch Linear weights are [out, in]. The model config
comes from the checkpoint's `config.json` when there is one, otherwise from
tensor shapes. Whether a latent model was trained without the variance scales
(the authors' *_no_scale files) cannot be read off the tensors: pass
`scales=False` (the runner's --nolatent_scales).

Files are read by `mla_jax.tensor_files` (one file or an index's shards), which
never runs arbitrary code.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re

import numpy as np

from mla_jax import registry
from mla_jax.authors_layout import Layout, Param, ShapeOf, invert
from mla_jax.config import ModelConfig


class ConvertError(ValueError):
  pass


def importable() -> list[str]:
  """The registered variants whose module describes the authors' layout."""
  return [n for n in registry.variants() if hasattr(registry.get(n).module, "authors_layout")]


def base_variant(name: str) -> str:
  """'mlra4_gated' -> 'mlra4' (the gate is read off the tensors)."""
  base = name[: -len("_gated")] if name.endswith("_gated") else name
  if base not in importable():
    raise ConvertError(f"unknown variant {name!r}; choose one of {', '.join(importable())} "
                       "(gated forms are detected from the checkpoint)")
  return base


# ----------------------------------------------------------------------------- reading


def read_checkpoint(path: str) -> tuple[dict[str, np.ndarray], dict | None]:
  """(tensor name -> float32 array, the authors' config.json or None): one file,
  or the shards an index lists (their released weights: `pytorch_model-0000k-of-N.bin`)."""
  from mla_jax.tensor_files import CheckpointFileError, TensorFiles
  try:
    tensors = TensorFiles(path).read_all()
  except CheckpointFileError as e:
    raise ConvertError(str(e)) from None
  folder = path if os.path.isdir(path) else os.path.dirname(path)
  cfg_path = os.path.join(folder, "config.json")
  cfg_path = cfg_path if os.path.exists(cfg_path) else None
  tensors = {k: np.asarray(v, np.float32) for k, v in tensors.items()}
  for name, value in tensors.items():
    bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
    if bad:
      raise ConvertError(f"{path}: tensor {name!r} holds {bad} NaN or infinite values; the checkpoint is "
                         "damaged or diverged: re-download it, or convert an earlier one")
  config = None
  if cfg_path:
    try:
      with open(cfg_path) as f:
        config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ConvertError(f"{cfg_path} is not valid JSON ({e}); repair it, or move it away to read the "
                         "config off the tensor shapes") from None
    if not isinstance(config, dict):
      raise ConvertError(f"{cfg_path} holds a JSON {type(config).__name__}, not the model's config object; "
                         "repair it, or move it away to read the config off the tensor shapes")
  return tensors, config


# ----------------------------------------------------------------------------- config

ATTN = "transformer.h.{}.attn."


def _shape(tensors, name):
  if name not in tensors:
    raise ConvertError(f"missing tensor {name!r}, which the shapes of this variant depend on")
  return tensors[name].shape


def infer_config(variant: str, tensors: dict, config_json: dict | None = None,
                 num_heads: int | None = None, scales: bool = True) -> ModelConfig:
  """Our ModelConfig for the authors' tensors (config.json first, shapes otherwise)."""
  variant = base_variant(variant)
  c = dict(config_json or {})
  vocab, d = _shape(tensors, "transformer.wte.weight")
  layers = 1 + max(int(m.group(1)) for k in tensors for m in [re.match(r"transformer\.h\.(\d+)\.", k)] if m)
  mlp = _shape(tensors, "transformer.h.0.mlp.c_fc1.weight")[0]
  for key, held in (("n_layer", layers), ("n_embd", d), ("vocab_size", vocab), ("intermediate_size", mlp)):
    if key in c and c[key] != held:
      raise ConvertError(f"config.json says {key}={c[key]} but the tensors hold {held}: it describes another "
                         "model; put the checkpoint's own config.json beside it (or none)")
  module = registry.get(variant).module
  try:
    kwargs = module.authors_config(ShapeOf(tensors, ATTN.format(0)), c, num_heads)
    if not scales:
      if "scales" not in {f.name for f in dataclasses.fields(registry.get(variant).config)}:
        raise ValueError(f"{variant} has no variance scales to switch off")
      kwargs["scales"] = False
    attention = registry.attention_config(variant, **kwargs)
    return ModelConfig(flavour="llama", vocab_size=vocab, d_model=d, num_layers=layers, mlp_dim=mlp,
                       max_seq_len=c.get("block_size", 2048), attention=attention)
  except (ValueError, TypeError, ZeroDivisionError) as e:
    raise ConvertError(f"the checkpoint's shapes do not make a {variant} model ({e})") from None


# ----------------------------------------------------------------------------- layouts


def _attention_layout(config: ModelConfig) -> Layout:
  if config.attention.variant not in importable():
    raise ConvertError(f"the authors' code has no {config.attention.variant} model")
  try:
    return registry.get(config.attention.variant).module.authors_layout(config.attention, config.d_model)
  except ValueError as e:
    raise ConvertError(f"this {config.attention.variant} config has no counterpart in the authors' code: {e}") from None


def authors_layout(config: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every tensor name and shape the authors' model of this config holds."""
  d, f = config.d_model, config.mlp_dim
  attn = _attention_layout(config)
  out = {"transformer.wte.weight": (config.vocab_size, d), "lm_head.weight": (config.vocab_size, d),
         "layernorm.weight": (d,)}
  for i in range(config.num_layers):
    p = f"transformer.h.{i}."
    out.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                p + "mlp.c_fc1.weight": (f, d), p + "mlp.c_fc2.weight": (f, d), p + "mlp.c_proj.weight": (d, f)})
    out.update({ATTN.format(i) + name: shape for name, shape in attn.tensors.items()})
  return out


def check_tensors(tensors: dict, config: ModelConfig) -> None:
  """One-line errors for a missing, an unexpected or a misshapen tensor."""
  want = authors_layout(config)
  optional = {"lm_head.weight"}           # tied with wte: a checkpoint may hold either or both
  missing = [k for k in want if k not in tensors and k not in optional]
  if "transformer.wte.weight" not in tensors and "lm_head.weight" in tensors:
    missing = [k for k in missing if k != "transformer.wte.weight"]
  extra = sorted(k for k in tensors if k not in want and not k.endswith("rotary.inv_freq"))
  if missing and extra:
    raise ConvertError(f"the checkpoint does not hold a {config.attention.variant} model: it lacks "
                       f"{missing[0]!r} and has {extra[0]!r}: wrong --variant?")
  if missing:
    raise ConvertError(f"missing tensor {missing[0]!r} for a {config.attention.variant} model "
                       f"({len(missing)} missing in all)")
  if extra:
    raise ConvertError(f"unexpected tensor {extra[0]!r} for a {config.attention.variant} model "
                       f"({len(extra)} unexpected in all): wrong --variant?")
  for k, shape in want.items():
    if k in tensors and tuple(tensors[k].shape) != shape:
      raise ConvertError(f"tensor {k!r} has shape {tuple(tensors[k].shape)}, expected {shape} for the "
                         "config read from the checkpoint")
  if "transformer.wte.weight" in tensors and "lm_head.weight" in tensors:
    if not np.array_equal(tensors["transformer.wte.weight"], tensors["lm_head.weight"]):
      raise ConvertError("lm_head.weight differs from transformer.wte.weight; this model ties them")


# ----------------------------------------------------------------------------- mapping


def model_layout(config: ModelConfig) -> Layout:
  """Every tensor of the authors' model of `config`, and how each of our parameters is built from them."""
  attn = _attention_layout(config)
  identity = lambda w: w                                               # noqa: E731
  transpose = lambda w: w.T                                            # noqa: E731
  params = [Param(("embed",), ("transformer.wte.weight",), identity),
            Param(("final_norm", "weight"), ("layernorm.weight",), identity)]
  for i in range(config.num_layers):
    p, a, layer = f"transformer.h.{i}.", ATTN.format(i), ("layers", i)
    params += [Param(layer + ("attn_norm", "weight"), (p + "input_layernorm.weight",), identity),
               Param(layer + ("mlp_norm", "weight"), (p + "post_attention_layernorm.weight",), identity),
               Param(layer + ("mlp", "w_gate"), (p + "mlp.c_fc1.weight",), transpose),
               Param(layer + ("mlp", "w_up"), (p + "mlp.c_fc2.weight",), transpose),
               Param(layer + ("mlp", "w_down"), (p + "mlp.c_proj.weight",), transpose)]
    params += [Param(layer + ("attn",) + x.path, tuple(a + s for s in x.sources), x.build) for x in attn.params]
  tensors = {k: v for k, v in authors_layout(config).items() if k != "lm_head.weight"}   # tied: wte holds it
  return Layout(tensors, tuple(params))


def _params(config: ModelConfig, t: dict) -> dict[tuple, np.ndarray]:
  """Our parameter paths -> arrays, from the authors' tensors (checked first)."""
  if "transformer.wte.weight" not in t:
    t = {**t, "transformer.wte.weight": t["lm_head.weight"]}
  return {p.path: p.build(*(t[s] for s in p.sources)) for p in model_layout(config).params}


def export_format(config: ModelConfig) -> str:
  """'hf' where a Hugging Face format holds the model, 'authors' where only the
  MLRA authors' layout does; one line where neither does."""
  from mla_jax import hf
  try:
    hf.layout(config, hf.hf_config(config))
    return "hf"
  except hf.HFError as hf_why:
    if config.flavour != "llama" or not config.tie_embeddings or config.attention.rope_scaling != "none":
      raise ConvertError(f"{hf_why}; nor does the MLRA authors' layout (Llama flavour, tied embeddings, "
                         "plain RoPE) hold it") from None
    try:
      _attention_layout(config)
    except ConvertError as e:
      raise ConvertError(f"{hf_why}; nor does the MLRA authors' layout: {e}") from None
    return "authors"


def export_authors(model, output_dir: str, *, dtype: str | None = None) -> dict:
  """Write `model` in the MLRA authors' layout (model.safetensors and their config.json keys)."""
  from safetensors.numpy import save_file

  from mla_jax.model import per_layer_params
  from mla_jax.tensor_files import NUMPY_DTYPES
  config = model.config
  if export_format(config) != "authors":
    raise ConvertError(f"a {config.attention.variant} model exports to a Hugging Face format (mla_jax.hf.export)")
  values = {path: np.asarray(v, np.float32) for path, v in per_layer_params(model).items()}
  tensors = invert(model_layout(config), values)
  tensors = {k: np.ascontiguousarray(v if dtype is None else v.astype(NUMPY_DTYPES[dtype])) for k, v in tensors.items()}
  os.makedirs(output_dir, exist_ok=True)
  save_file(tensors, os.path.join(output_dir, "model.safetensors"))
  a = config.attention
  their_config = {"n_layer": config.num_layers, "n_embd": config.d_model, "n_head": a.num_heads,
                  "vocab_size": config.vocab_size, "intermediate_size": config.mlp_dim,
                  "block_size": config.max_seq_len, "variant": a.variant}
  their_config |= {k: getattr(a, k) for k in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "head_dim")
                   if hasattr(a, k)}
  with open(os.path.join(output_dir, "config.json"), "w") as f:
    json.dump(their_config, f, indent=2)
  return {"tensors": len(tensors), "shards": 1, "bytes": sum(t.nbytes for t in tensors.values())}


def to_model(variant: str, tensors: dict, config_json: dict | None = None, num_heads: int | None = None,
             scales: bool = True):
  """An mla_jax Transformer holding the authors' weights."""
  from flax import nnx

  from mla_jax.model import Transformer
  config = infer_config(variant, tensors, config_json, num_heads, scales)
  check_tensors(tensors, config)
  model = Transformer(config, rngs=nnx.Rngs(0))
  params = _params(config, tensors)
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  ours = {tuple(p): var for p, var in flat}
  unmapped = set(ours) ^ set(params)
  if unmapped:
    raise ConvertError(f"internal: unmapped parameters {sorted(unmapped, key=str)[:3]}")
  for path, var in ours.items():
    value = params[path]
    if tuple(value.shape) != tuple(var.get_value().shape):
      raise ConvertError(f"internal: {path} got {value.shape}, model has {var.get_value().shape}")
    var.set_value(np.ascontiguousarray(value, np.float32))
  return model


def convert(path: str, variant: str, output_dir: str, *, num_heads: int | None = None,
            tokenizer: str = "", scales: bool = True) -> dict:
  """Write the authors' checkpoint as a run directory of ours (step 0): evaluate,
  decode or continue training it with `experiments.run --output_dir=...`."""
  from mla_jax import train as T
  tensors, config_json = read_checkpoint(path)
  model = to_model(variant, tensors, config_json, num_heads, scales)
  try:
    T.save_step0(output_dir, model, tokenizer=os.path.abspath(tokenizer) if tokenizer else "", tokenizer_name="",
                 data="", converted_from=os.path.abspath(path))
  except ValueError as e:
    raise ConvertError(str(e)) from None
  return {"config": model.config, "tensors": len(tensors), "output_dir": output_dir}
