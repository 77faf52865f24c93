"""The variant registry: name -> (config class, module class, the fields the name pins).

A variant is one file in `mla_jax/attention/` plus one line here. The runner's
`--variant`, the presets listing, the KV report, decode traffic, the converter,
the sweep and the tests all iterate over `VARIANTS`; `register` adds one at run
time (a user's own, or a test's).

This module also reads saved configs back (`config_from_dict`), migrating the
formats earlier versions wrote (see `migrate`), so run directories keep loading.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from mla_jax.attention.base import Attention
from mla_jax.attention.gqa import GQAAttention, GQAConfig
from mla_jax.attention.gta import GTA, GTAConfig
from mla_jax.attention.latent import LatentAttention, LatentConfig
from mla_jax.attention.mfa import MFA, MFAConfig
from mla_jax.attention.tpa import TPA, TPAConfig
from mla_jax.config import CONFIG_VERSION, AttentionConfig, ModelConfig, RunOptions, check


@dataclasses.dataclass(frozen=True)
class Variant:
  config: type[AttentionConfig]
  module: type[Attention]
  pinned: Mapping[str, Any] = dataclasses.field(default_factory=dict)   # structure the name fixes
  summary: str = ""


VARIANTS: dict[str, Variant] = {
    "mha": Variant(GQAConfig, GQAAttention, {"num_kv_heads": None}, "multi-head attention"),
    "mqa": Variant(GQAConfig, GQAAttention, {"num_kv_heads": 1}, "multi-query attention: one KV head"),
    "gqa": Variant(GQAConfig, GQAAttention, {}, "grouped-query attention"),
    "mla": Variant(LatentConfig, LatentAttention, {"branches": 1, "groups": 1}, "multi-head latent attention"),
    "gla2": Variant(LatentConfig, LatentAttention, {"branches": 1, "groups": 2}, "grouped latent attention, 2 latent heads"),
    "gla4": Variant(LatentConfig, LatentAttention, {"branches": 1, "groups": 4}, "grouped latent attention, 4 latent heads"),
    "mlra2": Variant(LatentConfig, LatentAttention, {"branches": 2, "groups": 2}, "multi-head low-rank attention, 2 branches"),
    "mlra4": Variant(LatentConfig, LatentAttention, {"branches": 4, "groups": 1}, "multi-head low-rank attention, 4 branches"),
    "gta": Variant(GTAConfig, GTA, {}, "grouped-tied attention"),
    "tpa": Variant(TPAConfig, TPA, {}, "tensor product attention"),
    "mfa": Variant(MFAConfig, MFA, {}, "multi-matrix factorization attention"),
}


def register(name: str, config: type[AttentionConfig], module: type[Attention], *,
             pinned: Mapping[str, Any] | None = None, summary: str = "") -> None:
  """Add a variant: everything that iterates over the registry sees it."""
  check(name not in VARIANTS, f"variant {name!r} is already registered")
  VARIANTS[name] = Variant(config, module, dict(pinned or {}), summary)


def variants() -> list[str]:
  """Registered names, in registration order (families together, as reports list them)."""
  return list(VARIANTS)


def get(name: str) -> Variant:
  check(name in VARIANTS, f"unknown attention variant {name!r}; choose one of {', '.join(variants())}")
  return VARIANTS[name]


def free_fields(name: str) -> list[dataclasses.Field]:
  """The config fields a user sets for this variant (not the name, not what it pins)."""
  v = get(name)
  return [f for f in dataclasses.fields(v.config) if f.name != "variant" and f.name not in v.pinned]


def attention_config(variant: str, **kwargs) -> AttentionConfig:
  """The config of `variant` with the structure its name pins (gla2: groups=2, ...)."""
  v = get(variant)
  known = {f.name for f in dataclasses.fields(v.config)}
  unknown = sorted(set(kwargs) - known)
  if unknown:
    raise ValueError(f"unknown field {unknown[0]!r} for attention variant {variant!r}")
  config = v.config(variant=variant, **{**kwargs, **v.pinned})
  for key in v.pinned:            # a pinned field may be given only as the value the pin resolves to
    if key in kwargs and kwargs[key] != getattr(config, key):
      raise ValueError(f"{variant} has {key}={getattr(config, key)!r}, got {kwargs[key]!r}; "
                       f"{_alternatives(variant, key, kwargs[key])}")
  return config


def _alternatives(variant: str, key: str, value) -> str:
  """Which registered variants of the same family allow `key=value`."""
  cls = VARIANTS[variant].config
  names = [n for n, v in VARIANTS.items() if v.config is cls and n != variant and v.pinned.get(key, value) == value]
  return f"use variant {' or '.join(repr(n) for n in names)}" if names else "register a variant with it"


def _check_pins(config: AttentionConfig) -> None:
  """A saved or built config must have the structure its name pins (mha: one KV
  head per query head): rebuilding it from its free fields gives it back."""
  v = get(config.variant)
  check(isinstance(config, v.config), f"{config.variant} takes a {v.config.__name__}, "
        f"got a {type(config).__name__}")
  free = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
          if f.name != "variant" and f.name not in v.pinned}
  rebuilt = v.config(variant=config.variant, **free, **v.pinned)
  diff = [f.name for f in dataclasses.fields(config) if getattr(config, f.name) != getattr(rebuilt, f.name)]
  if diff:
    raise ValueError(f"{config.variant} has {diff[0]}={getattr(rebuilt, diff[0])!r}, got "
                     f"{getattr(config, diff[0])!r}; {_alternatives(config.variant, diff[0], getattr(config, diff[0]))}")


# ----------------------------------------------------------------------------- saved configs

# Format 2 (CONFIG_VERSION): run options (dtype, remat, attention_impl,
# causal_chunks) left the model config; the latent family's structure became
# fields (branches, groups) instead of being read off the name (and MLRA's
# latent_blocks).
_RUNTIME_V1 = ("dtype", "remat", "attention_impl", "causal_chunks")


def migrate(d: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """A saved model config of any version -> (the current format, the run
  options it carried). Pure: the input is not changed."""
  d = {k: v for k, v in d.items()}
  version = d.pop("config_version", 1)
  check(version <= CONFIG_VERSION, f"this model config was written by a newer mla_jax (format {version}; "
        f"this one reads up to {CONFIG_VERSION}): upgrade mla_jax")
  options = {}
  if version == 1:
    options = {k: d.pop(k) for k in _RUNTIME_V1 if k in d}
    attn = dict(d["attention"])
    variant = attn.get("variant")
    if "kv_lora_rank" in attn:      # the latent family: its structure was the name's
      pins = get(variant).pinned
      blocks = attn.pop("latent_blocks", None)
      check(blocks is None or blocks == pins["branches"] * pins["groups"],
            f"this {variant} config has latent_blocks={blocks}; the registered {variant} has "
            f"{pins['branches'] * pins['groups']}: register a variant with that structure")
      attn.update(pins)
      check(attn.get("scales", True) or pins["branches"] == 1,
            f"this {variant} checkpoint was trained with scales=False as mla_jax read it before "
            "config format 2 (keeping the 1/sqrt(branches) output scale); scales=False now means the "
            "authors' *_no_scale model without it. Load it with mla_jax 0.1.0 (commit a36d22d)")
    d["attention"] = attn
  # 2 -> 3 only added fields (tie_embeddings, qkv_bias, qk_norm, rope_scaling and its
  # parameters) whose defaults are what format 2 did: a format-2 config reads unchanged.
  # 3 -> 4 likewise (latent_norm, rope_inv_freq: what convert_latent writes).
  return d, options


def config_from_dict(d: Mapping[str, Any]) -> ModelConfig:
  """A ModelConfig from `ModelConfig.to_dict()` output, of this or an older format."""
  d, _ = migrate(d)
  attn = dict(d.pop("attention"))
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  extra = sorted(set(d) - known)
  if extra:
    raise ValueError(f"unknown model config field {extra[0]!r}")
  variant = attn.pop("variant", None)
  v = get(variant)
  known_attn = {f.name for f in dataclasses.fields(v.config)}
  extra = sorted(set(attn) - known_attn)
  if extra:
    raise ValueError(f"unknown field {extra[0]!r} for attention variant {variant!r}")
  config = v.config(variant=variant, **attn)
  _check_pins(config)
  return ModelConfig(attention=config, **d)


def run_options_from_dict(d: Mapping[str, Any]) -> RunOptions:
  known = {f.name for f in dataclasses.fields(RunOptions)}
  extra = sorted(set(d) - known)
  if extra:
    raise ValueError(f"unknown run option {extra[0]!r}")
  return RunOptions(**d)


def module_class(config: AttentionConfig) -> type[Attention]:
  return get(config.variant).module

