"""Decode speed: one jitted decode step of the whole model, per decode path, over
a grid of batch sizes and context lengths.

For every cell it prints the step latency, tokens/s, the bytes of KV cache the
step must read (cache elements per token x layers x batch x context x bytes)
beside XLA's "bytes accessed" for the same compiled step, and on a GPU the
achieved cache bandwidth as a fraction of the device's peak. On a CPU the
Pallas kernels would run in interpret mode, which times Python, not the kernel:
those cells are skipped and the table says so.
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from mla_jax import compat, sharding
from mla_jax.config import ModelConfig
from mla_jax.model import Transformer

# HBM bandwidth by device kind (bytes/s), for the fraction-of-peak column.
PEAK_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12, "H800": 3.35e12, "L4": 0.3e12}


@dataclasses.dataclass
class Cell:
  impl: str
  batch: int
  context: int
  step_ms: float | None = None
  tokens_per_s: float | None = None
  cache_bytes: int = 0            # what the step must read: the whole cache
  xla_bytes: int | None = None    # XLA's cost analysis of the compiled step
  bandwidth_fraction: float | None = None
  skipped: str = ""


def peak_bandwidth() -> float | None:
  kind = jax.devices()[0].device_kind
  return next((v for k, v in PEAK_BANDWIDTH.items() if k in kind), None)


def bench(config: ModelConfig, *, impls, batches, contexts, steps: int = 10, warmup: int = 2,
          cache_dtype=jnp.bfloat16, mesh_spec: str = "", seed: int = 0) -> list[Cell]:
  mesh = sharding.make_mesh(mesh_spec, config)
  model = sharding.shard_module(Transformer(config, rngs=nnx.Rngs(seed)), mesh)
  graphdef, state = nnx.split(model)
  itemsize = jnp.dtype(cache_dtype).itemsize
  peak = peak_bandwidth() if compat.on_gpu() else None
  cells = []
  for impl in impls:
    for batch in batches:
      for context in contexts:
        cell = Cell(impl, batch, context,
                    cache_bytes=config.cache_elements_per_token() * config.num_layers * batch * context * itemsize)
        cells.append(cell)
        if impl == "pallas" and not compat.on_gpu():
          cell.skipped = "no GPU: the Pallas kernels would run in interpret mode"
          continue

        def step(state, tokens, cache, lengths, impl=impl):
          return nnx.merge(graphdef, state).decode_step(tokens, cache, lengths, impl)

        with sharding.use_mesh(mesh):
          cache = jax.jit(lambda: model.init_cache(batch, context, cache_dtype))()
          tokens = jnp.zeros((batch,), jnp.int32)
          lengths = jnp.full((batch,), context - 1, jnp.int32)      # attend over the whole cache
          try:
            compiled = jax.jit(step, donate_argnums=(2,)).lower(state, tokens, cache, lengths).compile()
          except ValueError as e:                                      # e.g. no kernel for this shape
            cell.skipped = str(e).split(";")[0]
            continue
          cell.xla_bytes = int(compat.cost_analysis(compiled).get("bytes accessed", 0))
          times = []
          for i in range(warmup + steps):
            t0 = time.perf_counter()
            logits, cache = compiled(state, tokens, cache, lengths)
            jax.block_until_ready(logits)
            if i >= warmup:
              times.append(time.perf_counter() - t0)
        cell.step_ms = 1e3 * statistics.median(times)
        cell.tokens_per_s = batch / (cell.step_ms / 1e3)
        if peak:
          cell.bandwidth_fraction = cell.cache_bytes / (cell.step_ms / 1e3) / peak
  return cells


def _fmt_bytes(n):
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024


def table(cells: list[Cell], config: ModelConfig) -> str:
  dev = jax.devices()[0]
  lines = [f"decode step of {config.attention.variant} ({config.num_layers} layers, d {config.d_model}) on "
           f"{dev.platform}:{dev.device_kind}; cache read = every cached element once",
           f"{'impl':<9} {'batch':>5} {'context':>7} {'step ms':>8} {'tokens/s':>10} {'cache read':>11} "
           f"{'XLA bytes':>10} {'of peak BW':>10}"]
  for c in cells:
    if c.skipped:
      lines.append(f"{c.impl:<9} {c.batch:>5} {c.context:>7}  skipped: {c.skipped}")
      continue
    frac = f"{100 * c.bandwidth_fraction:.0f}%" if c.bandwidth_fraction is not None else "-"
    lines.append(f"{c.impl:<9} {c.batch:>5} {c.context:>7} {c.step_ms:>8.2f} {c.tokens_per_s:>10,.0f} "
                 f"{_fmt_bytes(c.cache_bytes):>11} {_fmt_bytes(c.xla_bytes):>10} {frac:>10}")
  if not compat.on_gpu():
    lines.append("no GPU here: bandwidth fractions and the Pallas kernels need one (on the CPU XLA's "
                 "bytes also count weights and unfused intermediates)")
  return "\n".join(lines)


