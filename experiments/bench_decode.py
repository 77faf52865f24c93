"""Decode speed: one jitted decode step of the whole model, per decode path, over
a grid of batch sizes and context lengths.

For every cell it prints the step latency, tokens/s, the bytes of KV cache the
step must read (cache bytes per token, scales included, x layers x batch x context)
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

from mla_jax import compat, quant, sharding
from mla_jax.attention.base import cache_layout
from mla_jax.config import ModelConfig, RunOptions
from mla_jax.model import Transformer, with_options

# HBM bandwidth by device kind (bytes/s), for the fraction-of-peak column.
PEAK_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12, "H800": 3.35e12, "L4": 0.3e12}


@dataclasses.dataclass
class Cell:
  impl: str
  batch: int
  context: int
  cache: str = ""                 # the cache format
  step_ms: float | None = None
  tokens_per_s: float | None = None
  cache_bytes: int = 0            # what the step must read: the whole cache
  xla_bytes: int | None = None    # XLA's cost analysis of the compiled step
  bandwidth_fraction: float | None = None
  skipped: str = ""


def peak_bandwidth() -> float | None:
  kind = jax.devices()[0].device_kind
  return next((v for k, v in PEAK_BANDWIDTH.items() if k in kind), None)


class DecodeStep:
  """One jitted decode step of `model` over a full cache of `context` slots, the
  cache donated and fed back as generation does."""

  def __init__(self, model: Transformer, batch: int, context: int):
    graphdef, self.state = nnx.split(model)

    def step(state, tokens, cache, lengths):
      return nnx.merge(graphdef, state).decode_step(tokens, cache, lengths)

    self.cache = jax.jit(lambda: model.init_cache(batch, context))()
    self.tokens = jnp.zeros((batch,), jnp.int32)
    self.lengths = jnp.full((batch,), context - 1, jnp.int32)       # attend over the whole cache
    self.compiled = jax.jit(step, donate_argnums=(2,)).lower(self.state, self.tokens, self.cache,
                                                             self.lengths).compile()

  def __call__(self) -> float:
    """Run one step; its wall time in seconds."""
    t0 = time.perf_counter()
    logits, self.cache = self.compiled(self.state, self.tokens, self.cache, self.lengths)
    jax.block_until_ready(logits)
    return time.perf_counter() - t0


def bench(config: ModelConfig, *, impls, batches, contexts, steps: int = 10, warmup: int = 2,
          options: RunOptions = RunOptions(cache_dtype="bfloat16"), mesh_spec: str = "",
          seed: int = 0, formats=None) -> list[Cell]:
  """One cell per (cache format, decode path, batch, context): the median of
  `steps` timed decode steps over a full cache (`formats`: cache formats to
  compare, in one process; default the options' --cache_dtype; `impls` the paths)."""
  mesh = sharding.make_mesh(mesh_spec, config)
  base = sharding.shard_module(Transformer(config, rngs=nnx.Rngs(seed), options=options), mesh)
  peak = peak_bandwidth() if compat.on_gpu() else None
  cells = []
  for fmt in formats or [options.cache_format.name]:
    per_token = quant.layout_bytes_per_token(cache_layout(config.attention, fmt))
    for impl, batch, context in ((i, b, c) for i in impls for b in batches for c in contexts):
      cell = Cell(impl, batch, context, quant.cache_format(fmt).name,
                  cache_bytes=per_token * config.num_layers * batch * context)
      cells.append(cell)
      if impl == "pallas" and not compat.on_gpu():
        cell.skipped = "no GPU: the Pallas kernels would run in interpret mode"
        continue
      with sharding.use_mesh(mesh):
        try:
          step = DecodeStep(with_options(base, decode_impl=impl, cache_dtype=fmt), batch, context)
        except ValueError as e:                                      # e.g. no kernel for this shape
          cell.skipped = str(e).split(";")[0]
          continue
        cell.xla_bytes = int(compat.cost_analysis(step.compiled).get("bytes accessed", 0))
        times = [step() for _ in range(warmup + steps)][warmup:]
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
           f"{'impl':<9} {'cache':>8} {'batch':>5} {'context':>7} {'step ms':>8} {'tokens/s':>10} {'cache read':>11} "
           f"{'XLA bytes':>10} {'of peak BW':>10}"]
  for c in cells:
    if c.skipped:
      lines.append(f"{c.impl:<9} {c.cache:>8} {c.batch:>5} {c.context:>7}  skipped: {c.skipped}")
      continue
    frac = f"{100 * c.bandwidth_fraction:.0f}%" if c.bandwidth_fraction is not None else "-"
    lines.append(f"{c.impl:<9} {c.cache:>8} {c.batch:>5} {c.context:>7} {c.step_ms:>8.2f} {c.tokens_per_s:>10,.0f} "
                 f"{_fmt_bytes(c.cache_bytes):>11} {_fmt_bytes(c.xla_bytes):>10} {frac:>10}")
  if not compat.on_gpu():
    lines.append("no GPU here: bandwidth fractions and the Pallas kernels need one (on the CPU XLA's "
                 "bytes also count weights and unfused intermediates)")
  return "\n".join(lines)


