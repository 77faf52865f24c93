"""Configs: frozen dataclasses that validate themselves, saved as JSON with every checkpoint.

* `ModelConfig`: the architecture, i.e. what a checkpoint holds (its attention is
  an `AttentionConfig` subclass, one per variant file in `mla_jax/attention/`).
* `RunOptions`: how a run executes (compute dtype, rematerialisation, attention
  kernels, cache dtype); the same weights run under any of them.

Every field carries its help text (`option(default, help)`): `experiments/options.py`
turns the fields into the runner's flags, so a field added here is a flag with no
second definition. Defaults describe the runner's small model. This module imports
nothing of mla_jax but the cache formats (`mla_jax.quant`, which imports nothing):
the variant registry (`mla_jax.registry`) sits above it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax.numpy as jnp

from mla_jax import quant

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
CONFIG_VERSION = 4   # of ModelConfig.to_dict(); mla_jax.registry.migrate reads older ones
ROPE_SCALINGS = ("none", "linear", "llama3", "yarn")


def check(cond: bool, msg: str) -> None:
  """Raise the one-line ValueError every bad config gets."""
  if not cond:
    raise ValueError(msg)


def option(default: Any = dataclasses.MISSING, help: str = "", *, flag: str | None = None,  # noqa: A002
           legacy: str | None = None, choices: tuple | None = None, cli: bool = True) -> Any:
  """A dataclass field with its help text and how the runner spells its flag:
  `flag` (default: the field's name) when the name alone would be ambiguous
  across variants, `legacy` an older flag whose value stands in when the new
  one is not given, `choices` for an enumerated value; `cli=False` for a field
  no flag sets (what a conversion derives, saved with the config)."""
  metadata = {"help": help, "flag": flag, "legacy": legacy, "choices": choices, "cli": cli}
  return dataclasses.field(default=default, metadata=metadata)


# ----------------------------------------------------------------------------- attention


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionConfig:
  """Fields every variant has. Subclasses add their own and extend `validate`."""
  variant: str = option(help="The registered variant name (mla_jax.registry).")
  num_heads: int = option(4, "Query heads.")
  rope_theta: float = option(10000.0, "RoPE base frequency.")
  # Context-extended RoPE, as Hugging Face configs' `rope_scaling` describes it
  # (formulas in mla_jax.layers.rope_frequencies).
  rope_scaling: str = option("none", "RoPE frequency scaling: linear (positions / factor), llama3 (Llama-3.1's "
                             "per-band interpolation) or yarn (YaRN, DeepSeek-V2/V3).", choices=ROPE_SCALINGS)
  rope_factor: float = option(1.0, "RoPE scaling: the context extension factor.")
  rope_original_max_len: int = option(0, "RoPE scaling (llama3, yarn): the pretraining context length.")
  rope_low_freq_factor: float = option(1.0, "llama3 RoPE scaling: wavelengths above original_max_len / this "
                                       "are interpolated fully.")
  rope_high_freq_factor: float = option(4.0, "llama3 RoPE scaling: wavelengths below original_max_len / this "
                                        "are kept.")
  rope_beta_fast: float = option(32.0, "yarn RoPE scaling: rotations above which a frequency is kept.")
  rope_beta_slow: float = option(1.0, "yarn RoPE scaling: rotations below which a frequency is interpolated.")
  rope_mscale: float = option(0.0, "yarn RoPE scaling: mscale (0 = unset).")
  rope_mscale_all_dim: float = option(0.0, "yarn RoPE scaling: mscale_all_dim (0 = unset); the latent "
                                      "family also multiplies its softmax scale by its square, as DeepSeek does.")
  rope_attention_factor: float = option(0.0, "yarn RoPE scaling: the factor on cos and sin (0 = derived from "
                                        "factor, mscale and mscale_all_dim).")
  # A latent model converted from a RoPE model (mla_jax.convert_latent) rotates the
  # frequencies of the source heads it kept, not a ladder of its own.
  rope_inv_freq: tuple[float, ...] = option((), "RoPE's inverse frequencies, one per rotated pair, in place of "
                                                "the ladder rope_theta and rope_scaling give (empty: that ladder).",
                                            cli=False)

  def __post_init__(self):
    object.__setattr__(self, "rope_inv_freq", tuple(float(f) for f in self.rope_inv_freq))    # JSON gives a list
    self.validate()

  def validate(self, d_model: int | None = None) -> None:
    check(self.num_heads >= 1, f"num_heads must be >= 1, got {self.num_heads}")
    check(self.rope_scaling in ROPE_SCALINGS,
          f"unknown rope_scaling {self.rope_scaling!r}; choose one of {', '.join(ROPE_SCALINGS)}")
    if self.rope_scaling != "none":
      check(self.rope_factor > 0, f"rope_factor must be > 0, got {self.rope_factor}")
    if self.rope_scaling in ("llama3", "yarn"):
      check(self.rope_original_max_len >= 1,
            f"{self.rope_scaling} RoPE scaling needs rope_original_max_len (the pretraining context length)")
    if self.rope_scaling == "llama3":
      check(self.rope_high_freq_factor > self.rope_low_freq_factor,
            f"llama3 RoPE scaling needs rope_high_freq_factor > rope_low_freq_factor, got "
            f"{self.rope_high_freq_factor} and {self.rope_low_freq_factor}")

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
    return dataclasses.asdict(self) | {"rope_inv_freq": list(self.rope_inv_freq)}     # as JSON reads back


# ----------------------------------------------------------------------------- model


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """A decoder-only Transformer LM in one of two flavours.

  llama: pre-RMSNorm, SwiGLU MLP (width `mlp_dim`), RoPE inside attention, tied
    embeddings, no biases; output projections start at zero (the MLRA paper's model).
  gpt2: pre-LayerNorm, GELU MLP (width `mlp_dim`, 4 d in nanoGPT), learned
    absolute position embeddings, tied embeddings, no biases in linears; output
    projections start at N(0, 0.02 / sqrt(2 L)) as in nanoGPT (the small-model study).
  """
  flavour: str = option("llama", "Transformer flavour.", choices=("llama", "gpt2"))
  vocab_size: int = option(4096, "Embedding rows (and, unless --tokenizer_vocab_size says otherwise, "
                                 "the size of the tokenizer trained for the run).")
  d_model: int = option(128, "Model width.")
  num_layers: int = option(2, "Layers.")
  mlp_dim: int = option(344, "MLP width.")
  attention: AttentionConfig
  max_seq_len: int = option(2048, "Longest sequence (the GPT-2 position table).")
  norm_eps: float | None = option(None, "Norm epsilon (default 1e-6 for RMSNorm, 1e-5 for LayerNorm).")
  init_std: float = option(0.02, "Standard deviation of the initial weights.")
  param_dtype: str = option("float32", "Parameter storage dtype.", choices=tuple(DTYPES))
  tie_embeddings: bool = option(True, "Share the token embedding with the output projection (False: a "
                                      "separate lm_head, as most Hugging Face checkpoints have).")
  scan_layers: bool = option(False, "Stack the layers' weights and lax.scan over them (compile time "
                                    "flat in depth); changes how a checkpoint stores the layers.")

  FLAVOURS: ClassVar[tuple[str, ...]] = ("llama", "gpt2")

  def __post_init__(self):
    check(self.flavour in self.FLAVOURS, f"unknown flavour {self.flavour!r}; choose one of {self.FLAVOURS}")
    for name in ("vocab_size", "d_model", "num_layers", "mlp_dim", "max_seq_len"):
      check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
    check(self.param_dtype in DTYPES,
          f"param_dtype {self.param_dtype!r} unknown; choose one of {list(DTYPES)}")
    check(isinstance(self.attention, AttentionConfig),
          f"attention must be an AttentionConfig, got {type(self.attention).__name__}")
    self.attention.validate(self.d_model)

  @property
  def eps(self) -> float:
    if self.norm_eps is not None:
      return self.norm_eps
    return 1e-6 if self.flavour == "llama" else 1e-5

  @property
  def weight_dtype(self):
    return DTYPES[self.param_dtype]

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def cache_elements_per_token(self) -> int:
    """Per token per layer."""
    return self.attention.cache_elements_per_token()

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready; `mla_jax.registry.config_from_dict` reads it back (and older formats)."""
    d = dataclasses.asdict(self)
    d["attention"] = self.attention.to_dict()
    return {"config_version": CONFIG_VERSION, **d}


# ----------------------------------------------------------------------------- run options


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunOptions:
  """How a model executes. Validated here, once; `mla_jax.attention.core` turns
  the kernel choices into a backend, once per module."""
  dtype: str = option("float32", "Compute dtype (parameters keep param_dtype).", choices=tuple(DTYPES))
  remat: str = option("none", "Recompute activations in the backward pass (jax.checkpoint policy).",
                      choices=("none", "full", "dots", "dots_no_batch"))
  attention_impl: str = option("einsum", "Training attention: our einsums, or jax.nn.dot_product_attention "
                               "(cuDNN on GPUs) where the variant's shapes allow.", choices=("einsum", "dpa"))
  causal_chunks: int = option(0, "einsum attention in training: split the queries into this many blocks, "
                              "each scored only against the keys it can see (0 = one per 64 queries, at "
                              "most 4; 1 = one block).")
  decode_impl: str = option("auto", "Decode path: naive (re-expand K/V), absorbed (XLA, latent-only), pallas "
                            "(the GPU kernels; interpret mode elsewhere), auto (pallas on GPUs where shapes "
                            "allow, absorbed elsewhere).", choices=("naive", "absorbed", "pallas", "auto"))
  cache_dtype: str = option("auto", "KV-cache format: float32, bfloat16, or 8 bits with a float32 scale per "
                            "token and tile of at most 128 values (fp8 = e4m3, int8), the rope key then in "
                            "bfloat16 (see --quantize_rope_key); auto: bfloat16 on GPUs, float32 elsewhere. "
                            "Also spelt fp32, bf16, e4m3.",
                            choices=("auto", "float32", "bfloat16", "fp8", "int8") + tuple(quant.ALIASES))
  quantize_rope_key: bool = option(False, "With an 8-bit --cache_dtype, quantize the rope key too (default: "
                                   "it stays in bfloat16).")

  def __post_init__(self):
    for name in ("dtype", "remat", "attention_impl", "decode_impl", "cache_dtype"):
      choices = choices_of(type(self), name)
      check(getattr(self, name) in choices,
            f"unknown {name} {getattr(self, name)!r}; choose one of {', '.join(choices)}")
    check(self.causal_chunks >= 0,
          f"causal_chunks must be >= 0 (0 = automatic, 1 = one block), got {self.causal_chunks}")
    object.__setattr__(self, "cache_dtype", quant.ALIASES.get(self.cache_dtype, self.cache_dtype))

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def cache_format(self) -> quant.Format:
    """What the KV cache stores (mla_jax.quant)."""
    name = self.cache_dtype
    if name == "auto":                # ask jax for the backend itself (this module imports no device code)
      import jax
      name = "bfloat16" if jax.default_backend() == "gpu" else "float32"
    fmt = quant.FORMATS[name]
    return dataclasses.replace(fmt, rope_key=True) if self.quantize_rope_key and fmt.scaled else fmt

  def replace(self, **changes) -> "RunOptions":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def choices_of(cls: type, name: str) -> tuple:
  """The allowed values of an enumerated field."""
  return next(f.metadata["choices"] for f in dataclasses.fields(cls) if f.name == name)
