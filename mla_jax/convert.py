"""Import checkpoints saved by the MLRA authors' PyTorch code (and their released
weights, which use the same layout).

Their layout is nanoGPT's: `transformer.wte.weight` (tied with
`lm_head.weight`), `transformer.h.{i}.{input_layernorm, post_attention_layernorm}`,
`transformer.h.{i}.attn.*` (per variant, below), `transformer.h.{i}.mlp.{c_fc1,
c_fc2, c_proj}` (SwiGLU: silu(c_fc1 x) * c_fc2 x) and `layernorm.weight`;
torch Linear weights are [out, in]. The model config comes from the
checkpoint's `config.json` when there is one, otherwise from tensor shapes.

Loading never runs arbitrary code: safetensors, or torch.load(weights_only=True)
(torch is the optional `[torch]` extra); a pickle holding anything but tensors
is refused.
"""
from __future__ import annotations

import json
import math
import os
import re

import numpy as np

from mla_jax.config import ModelConfig, attention_config

VARIANTS = ("mha", "mqa", "gqa", "mla", "gla2", "gla4", "mlra2", "mlra4", "gta", "tpa", "mfa")
LATENT = ("mla", "gla2", "gla4", "mlra2", "mlra4")


class ConvertError(ValueError):
  pass


def base_variant(name: str) -> str:
  """'mlra4_gated' -> 'mlra4' (the gate is read off the tensors)."""
  base = name[: -len("_gated")] if name.endswith("_gated") else name
  if base not in VARIANTS:
    raise ConvertError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)} "
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
  config = None
  if cfg_path:
    with open(cfg_path) as f:
      config = json.load(f)
  return tensors, config


# ----------------------------------------------------------------------------- config


def _shape(tensors, name):
  if name not in tensors:
    raise ConvertError(f"missing tensor {name!r}, which the shapes of this variant depend on")
  return tensors[name].shape


def infer_config(variant: str, tensors: dict, config_json: dict | None = None,
                 num_heads: int | None = None) -> ModelConfig:
  """Our ModelConfig for the authors' tensors (config.json first, shapes otherwise)."""
  variant = base_variant(variant)
  c = dict(config_json or {})
  vocab, d = _shape(tensors, "transformer.wte.weight")
  layers = 1 + max(int(m.group(1)) for k in tensors for m in [re.match(r"transformer\.h\.(\d+)\.", k)] if m)
  mlp = _shape(tensors, "transformer.h.0.mlp.c_fc1.weight")[0]
  a = "transformer.h.0.attn."
  gated = any(k.startswith(a) and ("gated_proj" in k or "c_gated" in k) for k in tensors)
  heads = c.get("n_head", num_heads)
  if variant in ("mha", "mqa", "gqa"):
    q_rows, k_rows = _shape(tensors, a + "c_q.weight")[0], _shape(tensors, a + "c_k.weight")[0]
    if heads is None:
      raise ConvertError("no config.json beside the checkpoint: pass --num_heads (the query heads "
                         "cannot be read off c_q's shape)")
    hd = c.get("head_dim", q_rows // heads)
    kw = dict(head_dim=hd, gated=gated)
    if variant == "gqa":
      kw["num_kv_heads"] = k_rows // hd
  elif variant == "gta":
    dr = _shape(tensors, a + "W_rope_k.weight")[0]
    hd = c.get("head_dim", 2 * dr)                     # their rope width is head_dim / 2
    heads = heads or _shape(tensors, a + "c_q.weight")[0] // hd
    kw = dict(head_dim=hd, num_kv_heads=_shape(tensors, a + "kv_proj.weight")[0] // hd, rope_head_dim=dr)
  elif variant == "tpa":
    aq, bq = _shape(tensors, a + "c_qkv.W_A_q.weight")[0], _shape(tensors, a + "c_qkv.W_B_q.weight")[0]
    ak = _shape(tensors, a + "c_qkv.W_A_k.weight")[0]
    proj = _shape(tensors, a + "c_proj.weight")[1]     # heads x head_dim
    rq = c.get("q_rank", round(math.sqrt(aq * bq / proj)))
    heads = heads or aq // rq
    kw = dict(head_dim=bq // rq, q_rank=rq, k_rank=ak // heads, v_rank=ak // heads, xavier_init=False)
  elif variant == "mfa":
    cdim = _shape(tensors, a + "c_k.weight")[0]
    heads = heads or _shape(tensors, a + "w_q.weight")[0] // cdim
    kw = dict(head_dim=cdim, q_lora_rank=_shape(tensors, a + "c_q.weight")[0])
  else:                                                # the latent family
    r_q = _shape(tensors, a + "q_a_proj.weight")[0]
    rows = _shape(tensors, a + "kv_a_proj_with_mqa.weight")[0]        # d_c + d_r
    qk_rows = _shape(tensors, a + "q_b_proj.weight")[0]               # h (d_n + d_r)
    out_cols = _shape(tensors, a + "c_proj.weight")[1]                # h d_n
    d_c = c.get("kv_lora_rank") or sum(v.shape[-1] for k, v in tensors.items()
                                       if k.startswith(a + "kv_a_layernorm"))
    d_r = c.get("qk_rope_head_dim", rows - d_c)
    if heads is None:
      if d_r == 0:
        raise ConvertError("no config.json and no rope key: pass --num_heads")
      heads = (qk_rows - out_cols) // d_r
    kw = dict(q_lora_rank=r_q, kv_lora_rank=d_c, qk_nope_head_dim=c.get("qk_nope_head_dim", out_cols // heads),
              qk_rope_head_dim=d_r, gated=gated)
  try:
    attention = attention_config(variant, num_heads=heads, **kw)
    return ModelConfig(flavour="llama", vocab_size=vocab, d_model=d, num_layers=layers, mlp_dim=mlp,
                       max_seq_len=c.get("block_size", 2048), attention=attention)
  except (ValueError, TypeError) as e:
    raise ConvertError(f"the checkpoint's shapes do not make a {variant} model ({e})") from None


# ----------------------------------------------------------------------------- layouts


def authors_layout(config: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every tensor name and shape the authors' model of this config holds."""
  at, d, f = config.attention, config.d_model, config.mlp_dim
  out = {"transformer.wte.weight": (config.vocab_size, d), "lm_head.weight": (config.vocab_size, d),
         "layernorm.weight": (d,)}
  h = at.num_heads
  for i in range(config.num_layers):
    p = f"transformer.h.{i}."
    out.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                p + "mlp.c_fc1.weight": (f, d), p + "mlp.c_fc2.weight": (f, d), p + "mlp.c_proj.weight": (d, f)})
    a = p + "attn."
    v = at.variant
    if v in ("mha", "mqa", "gqa"):
      hd, kv = at.head_dim, at.num_kv_heads
      out.update({a + "c_q.weight": (h * hd, d), a + "c_k.weight": (kv * hd, d), a + "c_v.weight": (kv * hd, d),
                  a + "c_proj.weight": (d, h * hd)})
      if at.gated:
        out[a + "c_gated.weight"] = (h * hd, d)
    elif v == "gta":
      hd = at.head_dim
      out.update({a + "c_q.weight": (h * hd, d), a + "kv_proj.weight": (at.num_kv_heads * hd, d),
                  a + "W_rope_k.weight": (at.rope_dim, d), a + "c_proj.weight": (d, h * hd)})
    elif v == "tpa":
      hd = at.head_dim
      for name, rank in (("q", at.q_rank), ("k", at.k_rank), ("v", at.v_rank)):
        out[a + f"c_qkv.W_A_{name}.weight"] = (h * rank, d)
        out[a + f"c_qkv.W_B_{name}.weight"] = (rank * hd, d)
      out[a + "c_proj.weight"] = (d, h * hd)
    elif v == "mfa":
      cd, cq = at.head_dim, at.q_lora_rank
      out.update({a + "c_q.weight": (cq, d), a + "q_layernorm.weight": (cq,), a + "w_q.weight": (h * cd, cq),
                  a + "c_k.weight": (cd, d), a + "c_v.weight": (cd, d), a + "c_proj.weight": (d, h * cd)})
    else:
      dn, dr, dc, rq = at.qk_nope_head_dim, at.qk_rope_head_dim, at.kv_lora_rank, at.q_lora_rank
      out.update({a + "q_a_proj.weight": (rq, d), a + "q_a_layernorm.weight": (rq,),
                  a + "q_b_proj.weight": (h * (dn + dr), rq), a + "kv_a_proj_with_mqa.weight": (dc + dr, d),
                  a + "c_proj.weight": (d, h * dn)})
      if v == "mla":
        out.update({a + "kv_a_layernorm.weight": (dc,), a + "kv_b_proj.weight": (h * 2 * dn, dc)})
      elif v == "gla2":
        for k in (1, 2):
          out.update({a + f"kv_a_layernorm_{k}.weight": (dc // 2,),
                      a + f"kv_b_proj_{k}.weight": (h // 2 * 2 * dn, dc // 2)})
      else:                                            # gla4, mlra2, mlra4: one parameter for all blocks
        nb = at.num_blocks
        for b in range(nb):
          out[a + f"kv_a_layernorms.{b}.weight"] = (dc // nb,)
        out[a + "kv_b_proj"] = (nb, dc // nb, (h // at.groups) * 2 * dn)
      if at.gated:
        out[a + "gated_proj.weight"] = (h * dn, d)
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
  at, d = config.attention, config.d_model
  emb = t.get("transformer.wte.weight", t.get("lm_head.weight"))
  out = {("embed",): emb, ("final_norm", "weight"): t["layernorm.weight"]}
  h = at.num_heads
  for i in range(config.num_layers):
    p, a, L = f"transformer.h.{i}.", f"transformer.h.{i}.attn.", ("layers", i)
    W = lambda name: t[a + name]                                             # noqa: E731
    out[L + ("attn_norm", "weight")] = t[p + "input_layernorm.weight"]
    out[L + ("mlp_norm", "weight")] = t[p + "post_attention_layernorm.weight"]
    out[L + ("mlp", "w_gate")] = t[p + "mlp.c_fc1.weight"].T
    out[L + ("mlp", "w_up")] = t[p + "mlp.c_fc2.weight"].T
    out[L + ("mlp", "w_down")] = t[p + "mlp.c_proj.weight"].T
    A = L + ("attn",)
    v = at.variant
    if v in ("mha", "mqa", "gqa"):
      hd, kv = at.head_dim, at.num_kv_heads
      out[A + ("wq",)] = W("c_q.weight").T.reshape(d, h, hd)
      out[A + ("wk",)] = W("c_k.weight").T.reshape(d, kv, hd)
      out[A + ("wv",)] = W("c_v.weight").T.reshape(d, kv, hd)
      out[A + ("wo",)] = W("c_proj.weight").T.reshape(h, hd, d)
      if at.gated:
        out[A + ("wg",)] = W("c_gated.weight").T.reshape(d, h, hd)
    elif v == "gta":
      hd = at.head_dim
      out[A + ("wq",)] = W("c_q.weight").T.reshape(d, h, hd)
      out[A + ("w_kv",)] = W("kv_proj.weight").T.reshape(d, at.num_kv_heads, hd)
      out[A + ("w_kr",)] = W("W_rope_k.weight").T
      out[A + ("wo",)] = W("c_proj.weight").T.reshape(h, hd, d)
    elif v == "tpa":
      hd = at.head_dim
      for name, rank in (("q", at.q_rank), ("k", at.k_rank), ("v", at.v_rank)):
        out[A + (f"wa_{name}",)] = W(f"c_qkv.W_A_{name}.weight").T.reshape(d, h, rank)   # head-major
        out[A + (f"wb_{name}",)] = W(f"c_qkv.W_B_{name}.weight").T.reshape(d, rank, hd)
      out[A + ("wo",)] = W("c_proj.weight").T.reshape(h, hd, d)
    elif v == "mfa":
      cd = at.head_dim
      out[A + ("wq_a",)] = W("c_q.weight").T
      out[A + ("q_norm", "weight")] = W("q_layernorm.weight")
      out[A + ("wq_b",)] = W("w_q.weight").T.reshape(at.q_lora_rank, h, cd)
      out[A + ("wk",)] = W("c_k.weight").T
      out[A + ("wv",)] = W("c_v.weight").T
      out[A + ("wo",)] = W("c_proj.weight").T.reshape(h, cd, d)
    else:
      dn, dr, dc, rq = at.qk_nope_head_dim, at.qk_rope_head_dim, at.kv_lora_rank, at.q_lora_rank
      nb, groups = at.num_blocks, at.groups
      per = h // groups
      out[A + ("wq_a",)] = W("q_a_proj.weight").T
      out[A + ("q_norm", "weight")] = W("q_a_layernorm.weight")
      out[A + ("wq_b",)] = W("q_b_proj.weight").T.reshape(rq, groups, per, dn + dr)   # head = g * per + j
      kv_a = W("kv_a_proj_with_mqa.weight").T                                        # [d, d_c + d_r]
      out[A + ("w_dkv",)] = kv_a[:, :dc].reshape(d, nb, dc // nb)                    # block-major columns
      if dr:
        out[A + ("w_kr",)] = kv_a[:, dc:]
      if v == "mla":
        norms = W("kv_a_layernorm.weight")[None]
        kv_b = W("kv_b_proj.weight").T.reshape(1, dc, h, 2 * dn)                    # per head [k | v]
      elif v == "gla2":
        norms = np.stack([W(f"kv_a_layernorm_{k}.weight") for k in (1, 2)])
        kv_b = np.stack([W(f"kv_b_proj_{k}.weight").T.reshape(dc // 2, per, 2 * dn) for k in (1, 2)])
      else:
        norms = np.stack([W(f"kv_a_layernorms.{b}.weight") for b in range(nb)])
        kv_b = W("kv_b_proj").reshape(nb, dc // nb, per, 2 * dn)                    # already [in, out]
      out[A + ("kv_norm", "weight")] = norms
      out[A + ("w_uk",)] = kv_b[..., :dn]
      out[A + ("w_uv",)] = kv_b[..., dn:]
      out[A + ("wo",)] = W("c_proj.weight").T.reshape(groups, per, dn, d)
      if at.gated:
        out[A + ("wg",)] = W("gated_proj.weight").T.reshape(d, groups, per, dn)
  return out


def to_model(variant: str, tensors: dict, config_json: dict | None = None, num_heads: int | None = None):
  """An mla_jax Transformer holding the authors' weights."""
  from flax import nnx

  from mla_jax.model import Transformer
  config = infer_config(variant, tensors, config_json, num_heads)
  check_tensors(tensors, config)
  model = Transformer(config, rngs=nnx.Rngs(0))
  params = _params(config, tensors)
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  ours = {tuple(p): var for p, var in flat}
  for path, var in ours.items():
    value = params[path]
    if tuple(value.shape) != tuple(var.get_value().shape):
      raise ConvertError(f"internal: {path} got {value.shape}, model has {var.get_value().shape}")
    var.set_value(np.ascontiguousarray(value, np.float32))
  missing = set(ours) ^ set(params)
  if missing:
    raise ConvertError(f"internal: unmapped parameters {sorted(missing)[:3]}")
  return model


def convert(path: str, variant: str, output_dir: str, *, num_heads: int | None = None,
            tokenizer: str = "") -> dict:
  """Write the authors' checkpoint as a run directory of ours (step 0): evaluate,
  decode or continue training it with `experiments.run --output_dir=...`."""
  import dataclasses

  from flax import nnx

  from mla_jax import train as T
  tensors, config_json = read_checkpoint(path)
  model = to_model(variant, tensors, config_json, num_heads)
  ckpt_dir = os.path.join(output_dir, "checkpoints")
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    raise ConvertError(f"{ckpt_dir} already holds checkpoints; give a new --output_dir")
  _, params = nnx.split(model, nnx.Param)
  import jax.numpy as jnp
  state = {"params": params, "step": jnp.zeros((), jnp.int32)}
  ckpt = T.Checkpoints(ckpt_dir, async_save=False)
  meta = {"model_config": model.config.to_dict(), "train_config": dataclasses.asdict(T.TrainConfig()),
          "tokenizer": os.path.abspath(tokenizer) if tokenizer else "", "tokenizer_name": "",
          "data": "", "step": 0, "converted_from": os.path.abspath(path)}
  ckpt.save(0, state, {"iterator": None}, meta)
  ckpt.close()
  return {"config": model.config, "tensors": len(tensors), "output_dir": output_dir}
