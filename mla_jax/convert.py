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

Loading never runs arbitrary code: safetensors, or torch.load(weights_only=True)
(torch is the optional `[torch]` extra); a pickle holding anything but tensors
is refused.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re

import numpy as np

from mla_jax import registry
from mla_jax.authors_layout import Layout, ShapeOf
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


def _find(path: str) -> tuple[str, str | None]:
  if os.path.isdir(path):
    for name in ("model.safetensors", "pytorch_model.bin", "model.pt", "model.bin"):
      if os.path.exists(os.path.join(path, name)):
        cfg = os.path.join(path, "config.json")
        return os.path.join(path, name), cfg if os.path.exists(cfg) else None
    raise ConvertError(f"{path} holds no model.safetensors or pytorch_model.bin")
  if not os.path.exists(path):
    raise ConvertError(f"checkpoint {path!r} does not exist")
  cfg = os.path.join(os.path.dirname(path), "config.json")
  return path, cfg if os.path.exists(cfg) else None


def read_checkpoint(path: str) -> tuple[dict[str, np.ndarray], dict | None]:
  """(tensor name -> float32 array, the authors' config.json or None)."""
  file, cfg_path = _find(path)
  if file.endswith(".safetensors"):
    from safetensors.numpy import load_file
    try:
      tensors = load_file(file)
    except Exception as e:
      raise ConvertError(f"{file} is not a readable safetensors file ({e})") from None
  else:
    with open(file, "rb") as f:
      head = f.read(2)
    if head != b"PK" and head[:1] != b"\x80":     # torch.save writes a zip archive (a pickle before torch 1.6)
      raise ConvertError(f"{file} is not a PyTorch checkpoint (neither the zip archive nor the pickle "
                         "torch.save writes); pass a .bin/.pt saved by torch.save or a .safetensors file")
    try:
      import torch
    except ImportError:
      raise ConvertError(f"{file} is a PyTorch pickle: install the optional extra "
                         "(.venv/bin/pip install -e '.[torch]') or convert it to safetensors") from None
    try:
      state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
      raise ConvertError(f"refused to load {file}: it holds more than tensors, and only "
                         f"weights-only checkpoints are read ({type(e).__name__})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
      state = state["model"]
    if not isinstance(state, dict):
      raise ConvertError(f"{file} holds a {type(state).__name__}, not a state dict of tensors")
    tensors = {k: v.detach().float().numpy() for k, v in state.items() if hasattr(v, "detach")}
  tensors = {k: np.asarray(v, np.float32) for k, v in tensors.items()}
  for name, value in tensors.items():
    bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
    if bad:
      raise ConvertError(f"{file}: tensor {name!r} holds {bad} NaN or infinite values; the checkpoint is "
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


def _params(config: ModelConfig, t: dict) -> dict[tuple, np.ndarray]:
  """Our parameter paths -> arrays, from the authors' tensors (checked first)."""
  attn = _attention_layout(config)
  out = {("embed",): t.get("transformer.wte.weight", t.get("lm_head.weight")),
         ("final_norm", "weight"): t["layernorm.weight"]}
  for i in range(config.num_layers):
    p, a, layer = f"transformer.h.{i}.", ATTN.format(i), ("layers", i)
    out[layer + ("attn_norm", "weight")] = t[p + "input_layernorm.weight"]
    out[layer + ("mlp_norm", "weight")] = t[p + "post_attention_layernorm.weight"]
    out[layer + ("mlp", "w_gate")] = t[p + "mlp.c_fc1.weight"].T
    out[layer + ("mlp", "w_up")] = t[p + "mlp.c_fc2.weight"].T
    out[layer + ("mlp", "w_down")] = t[p + "mlp.c_proj.weight"].T
    for param in attn.params:
      out[layer + ("attn",) + param.path] = param.build(*(t[a + name] for name in param.sources))
  return out


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
  import jax.numpy as jnp
  from flax import nnx

  from mla_jax import train as T
  from mla_jax.config import RunOptions
  tensors, config_json = read_checkpoint(path)
  model = to_model(variant, tensors, config_json, num_heads, scales)
  ckpt_dir = os.path.join(output_dir, "checkpoints")
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    raise ConvertError(f"{ckpt_dir} already holds checkpoints; give a new --output_dir")
  _, params = nnx.split(model, nnx.Param)
  state = {"params": params, "step": jnp.zeros((), jnp.int32)}
  ckpt = T.Checkpoints(ckpt_dir, async_save=False)
  meta = T.run_meta(model.config, RunOptions(), T.TrainConfig(),
                    tokenizer=os.path.abspath(tokenizer) if tokenizer else "", tokenizer_name="", data="",
                    step=0, converted_from=os.path.abspath(path))
  ckpt.save(0, state, {"iterator": None}, meta)
  ckpt.close()
  return {"config": model.config, "tensors": len(tensors), "output_dir": output_dir}
