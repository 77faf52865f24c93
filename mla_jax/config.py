"""Frozen, self-validating configs, saved as JSON with every checkpoint.

`ModelConfig` describes the Transformer; `AttentionConfig` subclasses (one per
variant file in `mla_jax/attention/`) describe the attention. Each variant
registers itself by name, so `attention_config("mlra4", ...)` and
`ModelConfig.from_dict(...)` find it.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, ClassVar

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# variant name -> (config class, module class); filled by mla_jax/attention/*.py
REGISTRY: dict[str, tuple[type, type]] = {}


def register(*names: str):
  """Class decorator for an Attention module; its `Config` attribute is the config class."""

  def wrap(module_cls):
    for name in names:
      REGISTRY[name] = (module_cls.Config, module_cls)
    return module_cls

  return wrap


def _registry() -> dict[str, tuple[type, type]]:
  import mla_jax.attention  # noqa: F401  (importing registers every variant)
  return REGISTRY


def variants() -> list[str]:
  return sorted(_registry())


def _check(cond: bool, msg: str):
  if not cond:
    raise ValueError(msg)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionConfig:
  """Fields every variant has. Subclasses add their own and extend `validate`."""
  variant: str
  num_heads: int
  rope_theta: float = 10000.0

  VARIANTS: ClassVar[tuple[str, ...]] = ()

  def __post_init__(self):
    self.validate()

  def validate(self, d_model: int | None = None) -> None:
    _check(self.variant in self.VARIANTS,
           f"{type(self).__name__} serves variants {self.VARIANTS}, not {self.variant!r}")
    _check(self.num_heads >= 1, f"num_heads must be >= 1, got {self.num_heads}")

  # ---- what every variant must say about its cache
  def cache_spec(self) -> dict[str, tuple[tuple[int, ...], tuple[str | None, ...]]]:
    """name -> (per-token shape, logical axes of those dims) of each cache array."""
    raise NotImplementedError

  def cache_elements_per_token(self) -> int:
    """Elements cached per token per layer (sum over the cache arrays)."""
    return sum(math.prod(shape) for shape, _ in self.cache_spec().values())

  def partition_entries(self) -> int:
    """Size of the axis tensor parallelism splits (see mla_jax.sharding)."""
    raise NotImplementedError

  def partition_entries_name(self) -> str:
    return "cache entries"

  def dpa_unsupported(self) -> str | None:
    """Why jax.nn.dot_product_attention cannot run this variant's training
    attention (None when it can)."""
    return None

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def attention_config(variant: str, **kwargs) -> AttentionConfig:
  reg = _registry()
  if variant not in reg:
    raise ValueError(f"unknown attention variant {variant!r}; choose one of {', '.join(sorted(reg))}")
  cls = reg[variant][0]
  return cls(variant=variant, **kwargs)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """A decoder-only Transformer LM in one of two flavours.

  llama: pre-RMSNorm, SwiGLU MLP (width `mlp_dim`), RoPE inside attention, tied
    embeddings, no biases; output projections start at zero (the MLRA paper's model).
  gpt2: pre-LayerNorm, GELU MLP (width `mlp_dim`, 4 d in nanoGPT), learned
    absolute position embeddings, tied embeddings, no biases in linears; output
    projections start at N(0, 0.02 / sqrt(2 L)) as in nanoGPT (the small-model study).
  """
  flavour: str = "llama"
  vocab_size: int
  d_model: int
  num_layers: int
  mlp_dim: int
  attention: AttentionConfig
  max_seq_len: int = 2048
  norm_eps: float | None = None  # default: 1e-6 (RMSNorm) / 1e-5 (LayerNorm)
  init_std: float = 0.02
  dtype: str = "float32"        # compute dtype
  param_dtype: str = "float32"
  scan_layers: bool = False      # stack the layers' weights and lax.scan over them (fast compiles)
  remat: str = "none"            # recompute in the backward pass: none | full | dots | dots_no_batch
  attention_impl: str = "einsum"  # training attention: einsum | dpa (jax.nn.dot_product_attention)
  causal_chunks: int = 0         # einsum attention: query blocks, each scoring only the keys it can see;
                                 # 0 = one per 64 queries, at most 4

  FLAVOURS: ClassVar[tuple[str, ...]] = ("llama", "gpt2")
  REMAT: ClassVar[tuple[str, ...]] = ("none", "full", "dots", "dots_no_batch")
  ATTENTION_IMPLS: ClassVar[tuple[str, ...]] = ("einsum", "dpa")
  # How a run executes, not what the model is: may change when a run resumes.
  RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = ("dtype", "remat", "attention_impl", "causal_chunks")

  def __post_init__(self):
    _check(self.flavour in self.FLAVOURS,
           f"unknown flavour {self.flavour!r}; choose one of {self.FLAVOURS}")
    for name in ("vocab_size", "d_model", "num_layers", "mlp_dim", "max_seq_len"):
      _check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
    _check(self.dtype in DTYPES, f"dtype {self.dtype!r} unknown; choose one of {list(DTYPES)}")
    _check(self.param_dtype in DTYPES,
           f"param_dtype {self.param_dtype!r} unknown; choose one of {list(DTYPES)}")
    _check(isinstance(self.attention, AttentionConfig),
           f"attention must be an AttentionConfig, got {type(self.attention).__name__}")
    _check(self.remat in self.REMAT, f"unknown remat policy {self.remat!r}; choose one of {self.REMAT}")
    _check(self.attention_impl in self.ATTENTION_IMPLS,
           f"unknown attention_impl {self.attention_impl!r}; choose one of {self.ATTENTION_IMPLS}")
    _check(self.causal_chunks >= 0, f"causal_chunks must be >= 0 (0 = automatic, 1 = one block), "
           f"got {self.causal_chunks}")
    self.attention.validate(self.d_model)
    if self.attention_impl == "dpa":
      why = self.attention.dpa_unsupported()
      _check(why is None, f"attention_impl='dpa' cannot run {self.attention.variant}: {why}; "
             "use attention_impl='einsum'")

  @property
  def eps(self) -> float:
    if self.norm_eps is not None:
      return self.norm_eps
    return 1e-6 if self.flavour == "llama" else 1e-5

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def weight_dtype(self):
    return DTYPES[self.param_dtype]

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def cache_elements_per_token(self) -> int:
    """Per token per layer."""
    return self.attention.cache_elements_per_token()

  # ---- serialisation
  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["attention"] = self.attention.to_dict()
    return d

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    d = dict(d)
    attn = dict(d.pop("attention"))
    known = {f.name for f in dataclasses.fields(cls)}
    extra = sorted(set(d) - known)
    if extra:
      raise ValueError(f"unknown model config field {extra[0]!r}")
    reg = _registry()
    variant = attn.get("variant")
    _check(variant in reg, f"unknown attention variant {variant!r}; choose one of "
           f"{', '.join(sorted(reg))}")
    acls = reg[variant][0]
    aknown = {f.name for f in dataclasses.fields(acls)}
    aextra = sorted(set(attn) - aknown)
    if aextra:
      raise ValueError(f"unknown field {aextra[0]!r} for attention variant {variant!r}")
    return cls(attention=acls(**attn), **d)

  @classmethod
  def from_json(cls, text: str) -> "ModelConfig":
    return cls.from_dict(json.loads(text))
