"""The Transformer LM: Llama-3 style or GPT-2 style, any attention variant.

    llama: x = x + Attn(RMSNorm(x)); x = x + SwiGLU(RMSNorm(x)); RoPE inside attention
    gpt2:  x = tok_emb + pos_emb; x = x + Attn(LN(x)); x = x + GELU-MLP(LN(x))
    logits = FinalNorm(x) E^T          (tied input / output embeddings; untied: a separate lm_head)

Three entry points share the layers: `__call__` (training forward), `prefill`
(forward over a prompt batch that fills a preallocated cache) and `decode_step`
(one token per sequence, per-sequence lengths, fixed shapes: jit once, loop).
The model holds its `RunOptions` (compute dtype, remat, kernels, cache dtype);
`with_options` gives the same weights under other ones.

With `scan_layers` the layers' weights are stacked on a leading `layers` axis
and every entry point runs one `lax.scan` over them (the cache is stacked the
same way): compile time stops growing with depth. `remat` recomputes each
layer's activations in the backward pass under a `jax.checkpoint` policy.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from mla_jax import compat, registry
from mla_jax.attention.base import POOL_AXES, cache_axes, init_cache, init_pages
from mla_jax.config import ModelConfig, RunOptions
from mla_jax.layers import GeluMLP, LayerNorm, RMSNorm, SwiGLU, param
from mla_jax.rules import constrain

ACT = ("batch", "length", "act_embed")


def _norm(config: ModelConfig):
  if config.flavour == "llama":
    return RMSNorm(config.d_model, ("norm",), eps=config.eps, param_dtype=config.weight_dtype)
  return LayerNorm(config.d_model, eps=config.eps, param_dtype=config.weight_dtype)


class Block(nnx.Module):
  def __init__(self, config: ModelConfig, options: RunOptions, *, rngs: nnx.Rngs):
    # Llama (the MLRA code base) starts output projections at zero; nanoGPT scales them.
    out_std = 0.0 if config.flavour == "llama" else config.init_std / math.sqrt(2 * config.num_layers)
    common = dict(rngs=rngs, param_dtype=config.weight_dtype, init_std=config.init_std, out_std=out_std)
    self.attn_norm = _norm(config)
    # attention's own RMSNorms take the Llama flavour's epsilon (DeepSeek's, Qwen3's); 1e-6 in GPT-2's
    norm_eps = config.eps if config.flavour == "llama" else 1e-6
    self.attn = registry.get(config.attention.variant).module(config.attention, d_model=config.d_model,
                                                              options=options, norm_eps=norm_eps, **common)
    self.mlp_norm = _norm(config)
    mlp_cls = SwiGLU if config.flavour == "llama" else GeluMLP
    self.mlp = mlp_cls(config.d_model, config.mlp_dim, dtype=options.compute_dtype, **common)

  def __call__(self, x, positions):
    x = x + self.attn(self.attn_norm(x), positions)
    return constrain(x + self.mlp(self.mlp_norm(x)), ACT)

  def prefill(self, x, positions, cache):
    y, cache = self.attn.prefill(self.attn_norm(x), positions, cache)
    x = x + y
    return constrain(x + self.mlp(self.mlp_norm(x)), ACT), cache

  def step(self, x, cache, lengths, pages=None):
    y, cache = self.attn.step(self.attn_norm(x), cache, lengths, pages)
    x = x + y
    return constrain(x + self.mlp(self.mlp_norm(x)), ACT), cache


REMAT_POLICIES = {
    "full": None,                                                   # save nothing
    "dots": jax.checkpoint_policies.dots_saveable,                  # keep matmul outputs
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nnx.Module):
  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, options: RunOptions = RunOptions()):
    self.config = config
    self.options = options
    wdt = config.weight_dtype
    self.embed = param(rngs, (config.vocab_size, config.d_model), ("vocab", "embed"),
                       std=config.init_std, dtype=wdt)
    if not config.tie_embeddings:
      self.lm_head = param(rngs, (config.vocab_size, config.d_model), ("vocab", "embed"),
                           std=config.init_std, dtype=wdt)
    if config.flavour == "gpt2":
      self.pos_embed = param(rngs, (config.max_seq_len, config.d_model), ("positions", "embed"),
                             std=config.init_std, dtype=wdt)
    if config.scan_layers:
      @nnx.split_rngs(splits=config.num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def stacked(rngs):
        return Block(config, options, rngs=rngs)
      self.layers = stacked(rngs)
    else:
      self.layers = nnx.List([Block(config, options, rngs=rngs) for _ in range(config.num_layers)])
    self.final_norm = _norm(config)

  def _layer_fn(self, positions):
    """One layer's training forward, rematerialised if the config asks."""
    def fn(block, x):
      return block(x, positions)
    if self.options.remat != "none":
      fn = nnx.remat(fn, policy=REMAT_POLICIES[self.options.remat], prevent_cse=not self.config.scan_layers)
    return fn

  # ------------------------------------------------------------------ pieces
  def _embed(self, tokens, positions):
    x = jnp.take(self.embed[...], tokens, axis=0).astype(self.options.compute_dtype)
    if self.config.flavour == "gpt2":
      x = x + jnp.take(self.pos_embed[...], positions, axis=0).astype(x.dtype)
    return constrain(x, ACT)

  def _logits(self, x):
    x = self.final_norm(x)
    head = self.embed if self.config.tie_embeddings else self.lm_head
    logits = jnp.einsum("bsd,vd->bsv", x, head[...].astype(x.dtype),
                        preferred_element_type=jnp.float32)
    return constrain(logits, ("batch", "length", "act_vocab"))

  @staticmethod
  def _positions(tokens):
    return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)

  # ------------------------------------------------------------------ entry points
  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
    """tokens [B, S] -> fp32 logits [B, S, V] (causal)."""
    positions = self._positions(tokens) if positions is None else positions
    x = self._embed(tokens, positions)
    fn = self._layer_fn(positions)
    if self.config.scan_layers:
      x = nnx.scan(lambda x, block: fn(block, x), in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(x, self.layers)
    else:
      for layer in self.layers:
        x = fn(layer, x)
    return self._logits(x)

  def init_cache(self, batch: int, max_len: int, fmt=None):
    """Zero caches of fixed shape [batch, max_len, ...] in the cache format `fmt`
    (a name, dtype or `quant.Format`; default: the options' --cache_dtype): one
    dict per layer, or with scan_layers one dict of arrays stacked [layers,
    batch, max_len, ...]."""
    fmt = self.options.cache_format if fmt is None else fmt
    if self.config.flavour == "gpt2" and max_len > self.config.max_seq_len:
      raise ValueError(f"cache length {max_len} exceeds max_seq_len={self.config.max_seq_len} "
                       "(the GPT-2 flavour's position table); generate fewer tokens or "
                       "raise max_seq_len")
    one = lambda: init_cache(self.config.attention, batch, max_len, fmt)  # noqa: E731
    if self.config.scan_layers:
      axes = self.cache_axes(fmt)
      return {k: constrain(jnp.broadcast_to(v, (self.config.num_layers,) + v.shape), axes[k])
              for k, v in one().items()}
    return [one() for _ in range(self.config.num_layers)]

  def cache_axes(self, fmt=None):
    axes = cache_axes(self.config.attention, self.options.cache_format if fmt is None else fmt)
    if self.config.scan_layers:
      return {k: ("layers",) + v for k, v in axes.items()}
    return [axes for _ in range(self.config.num_layers)]

  def _run_cached(self, x, cache, fn):
    """Thread x and each layer's cache through `fn(block, x, cache) -> (x, cache)`."""
    if self.config.scan_layers:
      return nnx.scan(fn, in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0))(self.layers, x, cache)
    new_cache = []
    for layer, layer_cache in zip(self.layers, cache):
      x, layer_cache = fn(layer, x, layer_cache)
      new_cache.append(layer_cache)
    return x, new_cache

  def prefill(self, tokens: jax.Array, cache):
    """Forward over right-padded prompts [B, S], writing cache slots [0, S)."""
    positions = self._positions(tokens)
    x = self._embed(tokens, positions)
    x, cache = self._run_cached(x, cache, lambda block, x, c: block.prefill(x, positions, c))
    return self._logits(x), cache

  def decode_step(self, tokens: jax.Array, cache, lengths: jax.Array) -> tuple[jax.Array, Any]:
    """tokens [B] at positions `lengths` [B] -> logits [B, V] and the updated cache
    (through the decode path the options name)."""
    logits, cache = self.step(tokens[:, None], cache, lengths)
    return logits[:, 0], cache

  def step(self, tokens: jax.Array, cache, lengths: jax.Array, pages: jax.Array | None = None):
    """tokens [B, S] at positions lengths[b] + [0, S), causal among themselves
    -> logits [B, S, V] and the updated cache: a dense cache, or page pools
    (`init_pages`) read through the page table `pages` [B, width]."""
    positions = lengths[:, None].astype(jnp.int32) + jnp.arange(tokens.shape[1], dtype=jnp.int32)
    x = self._embed(tokens, positions)
    x, cache = self._run_cached(x, cache, lambda block, x, c: block.step(x, c, lengths, pages))
    return self._logits(x), cache

  def init_pages(self, num_pages: int, page_size: int, fmt=None):
    """Zero page pools [num_pages, page_size, ...] per cache array in the cache
    format `fmt` (default: the options' --cache_dtype), laid out per layer like `init_cache`."""
    fmt = self.options.cache_format if fmt is None else fmt
    one = lambda: init_pages(self.config.attention, num_pages, page_size, fmt)  # noqa: E731
    pool_axes = self.cache_axes(fmt)
    if self.config.scan_layers:
      return {k: constrain(jnp.broadcast_to(v, (self.config.num_layers,) + v.shape),
                           ("layers",) + POOL_AXES + pool_axes[k][3:]) for k, v in one().items()}
    return [{k: constrain(v, POOL_AXES + axes[k][2:]) for k, v in one().items()} for axes in pool_axes]


def with_options(model: Transformer, **changes) -> Transformer:
  """The same weights (shared, not copied) under other run options, e.g.
  `with_options(model, decode_impl="naive")`."""
  options = dataclasses.replace(model.options, **changes)
  built = {}

  def build():                      # traced abstractly: nothing is initialised or placed
    built["graphdef"], state = nnx.split(Transformer(model.config, rngs=nnx.Rngs(0), options=options))
    return state

  jax.eval_shape(build)
  return nnx.merge(built["graphdef"], nnx.state(model))


# ---------------------------------------------------------------------- abstract views


def abstract_model(config: ModelConfig, options: RunOptions = RunOptions()) -> Transformer:
  """The model with ShapeDtypeStructs instead of arrays: no memory, no compute."""
  return nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0), options=options))


def _variables(model) -> Iterator[tuple[str, nnx.Variable]]:
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    yield "/".join(str(p) for p in path), var


def abstract_params(config: ModelConfig) -> Iterator[tuple[str, tuple[int, ...], tuple]]:
  """(path, shape, logical axes) of every parameter."""
  for path, var in _variables(abstract_model(config)):
    value = var.get_value() if hasattr(var, "get_value") else var.value
    yield path, tuple(value.shape), compat.variable_axes(var)


def count_params(config: ModelConfig) -> dict[str, int]:
  """Parameter counts from abstract shapes. `non_embedding` leaves out the
  token embedding (and an untied lm_head) and the position table."""
  total = embedding = attention = 0
  for path, shape, _ in abstract_params(config):
    n = math.prod(shape)
    total += n
    embedding += n if path in ("embed", "pos_embed", "lm_head") else 0
    attention += n if "/attn/" in f"/{path}/" else 0
  return {"total": total, "non_embedding": total - embedding, "attention": attention}


def per_layer_params(model: Transformer) -> dict[tuple, Any]:
  """path -> array of every parameter, a scanned model's stacked [layers, ...]
  weights split into one entry per layer (("layers", i, ...)), as unscanned
  models and checkpoint formats name them."""
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = var.get_value()
    if model.config.scan_layers and path[0] == "layers":
      out |= {("layers", i) + tuple(path[1:]): value[i] for i in range(model.config.num_layers)}
    else:
      out[tuple(path)] = value
  return out


def from_per_layer_params(config: ModelConfig, values: dict[tuple, Any], options: RunOptions = RunOptions()):
  """The model of `config` holding `values` (per_layer_params' view: one entry per
  layer, stacked here where the config scans its layers), in its parameter dtype."""
  import numpy as np
  model = abstract_model(config, options)
  variables = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))

  def stacked(path):
    return config.scan_layers and path[0] == "layers"
  wanted = {("layers", i) + tuple(p[1:]) for p in variables if stacked(p) for i in range(config.num_layers)}
  wanted |= {tuple(p) for p in variables if not stacked(p)}
  for odd in sorted(set(values) ^ wanted, key=str)[:1]:
    why = "missing" if odd in wanted else "not a parameter of this model"
    raise ValueError(f"parameter {'/'.join(map(str, odd))} is {why}")
  for path, var in variables.items():
    want = var.get_value()
    if stacked(path):
      value = np.stack([np.asarray(values[("layers", i) + tuple(path[1:])]) for i in range(config.num_layers)])
    else:
      value = np.asarray(values[tuple(path)])
    if value.shape != want.shape:
      raise ValueError(f"parameter {'/'.join(map(str, path))} has shape {value.shape}; the model has {want.shape}")
    var.set_value(jnp.asarray(value, want.dtype))
  return model
