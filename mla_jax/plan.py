"""Capacity planner: what a model needs per device on a TP x CP x DP mesh.

For one model, one device memory size, one cache format and one layout:

    weights / device      each parameter's shard under the rules table, in the weight dtype
    cache / token         each cache array's shard per token of a sequence (scales included):
                          its per-token axes split by `tensor` as the rules say, its tokens by CP
    fits                  the largest batch x context whose cache fits beside the weights
                          (max_tokens: the whole mesh's; max_batch: at the given context)
    read / step           the weights and the cache of (batch / DP) sequences of `context` tokens
    collectives / step    read from one block's decode step compiled on simulated CPU devices at
                          the same TP x CP (abstract inputs: nothing allocated), times the layers
    step time >=          read / HBM bandwidth + collective bytes / link bandwidth

The memory figures are computed from the same layouts `mla_jax.sharding`
places arrays by (tests/test_plan.py checks them against arrays actually
placed on simulated meshes); the collectives are measured, not modelled.
`experiments.run --mode=plan` prints the table across variants.
"""
from __future__ import annotations

import csv
import dataclasses
import math
import os
from typing import Mapping, Sequence

import jax.numpy as jnp

from mla_jax import cache_report, hlo, sharding
from mla_jax.attention.base import cache_layout
from mla_jax.config import ModelConfig, RunOptions
from mla_jax.model import abstract_params
from mla_jax.rules import RULES, logical_to_spec


@dataclasses.dataclass
class Plan:
  variant: str
  mesh: str                              # data:DP,context:CP,tensor:TP
  weight_bytes: int | None = None        # per device
  cache_bytes_per_token: float | None = None   # per device, all layers, per token of one sequence
  max_tokens: int | None = None          # batch x context the whole mesh holds beside the weights
  max_batch: int | None = None           # at the plan's context
  read_bytes: int | None = None          # per device per decode step, at the plan's batch and context
  collective_bytes: int | None = None    # per device per decode step
  collectives: str = ""                  # per layer, e.g. "all-gather x1, all-reduce x2"
  step_time_s: float | None = None       # lower bound
  note: str = ""                         # why this layout does not work

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def _shard_elements(shape: Sequence[int], axes: Sequence[str | None], sizes: Mapping[str, int]) -> float:
  """Elements of one device's shard of an array: each dimension over its mesh axes."""
  spec = logical_to_spec(axes, shape, mesh_axis_sizes=sizes, rules=RULES, what="plan")
  n = 1.0
  for dim, mesh_axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    ways = 1 if mesh_axes is None else math.prod(
        sizes[a] for a in ((mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes))
    n *= dim / ways
  return n


def weight_bytes(config: ModelConfig, spec: "str | sharding.MeshSpec", dtype=jnp.bfloat16) -> int:
  """Bytes of one device's parameters on `spec`, held in `dtype`."""
  spec = sharding.MeshSpec.parse(spec)
  sizes = sharding.axis_sizes_for(config, spec)
  return round(sum(_shard_elements(shape, axes, sizes) for _, shape, axes in abstract_params(config))
               * jnp.dtype(dtype).itemsize)


def cache_bytes_per_token(config: ModelConfig, spec: "str | sharding.MeshSpec", fmt="bfloat16") -> float:
  """Bytes one device holds per token of one sequence, per layer (1 / CP of the
  tokens, its `tensor` share of the per-token arrays, scales included)."""
  spec = sharding.MeshSpec.parse(spec)
  sizes = dict(sharding.axis_sizes_for(config, spec), data=1, fsdp=1)      # per sequence: the batch split is DP's
  total = 0.0
  for name, stored in cache_layout(config.attention, fmt).items():
    shape = (1, spec.context) + tuple(stored.shape)
    axes = ("cache_batch", "cache_length") + tuple(stored.axes)
    total += _shard_elements(shape, axes, sizes) * jnp.dtype(stored.dtype).itemsize
  return total / spec.context         # the shard above holds one of the CP tokens laid out


def _compiled_collectives(config: ModelConfig, spec: sharding.MeshSpec, batch: int, options: RunOptions, devices):
  """(bytes, kinds) of one block's decode step's collectives per device, at the
  per-replica batch, compiled on TP x CP simulated devices."""
  mesh = sharding.make_mesh(f"context:{spec.context},tensor:{spec.tensor}", config, devices=devices)
  compiled, _ = cache_report.compile_block_decode(config, mesh, batch=batch, context=16 * spec.context,
                                                  options=options)
  colls = hlo.collectives(compiled.as_text())
  return sum(c.bytes for c in colls), hlo.kinds(colls)


def plan(name: str, config: ModelConfig, spec: "str | sharding.MeshSpec", *, device_bytes: float, batch: int,
         context: int, options: RunOptions, hbm_bytes_per_s: float, link_bytes_per_s: float,
         devices=None) -> Plan:
  """One layout of one model (see the module docstring)."""
  spec = sharding.MeshSpec.parse(spec)
  row = Plan(variant=name, mesh=f"data:{spec.data},context:{spec.context},tensor:{spec.tensor}")
  try:
    sharding.check_layout(config, spec)
  except ValueError as e:
    row.note = str(e)
    return row
  fmt = options.cache_format
  row.weight_bytes = weight_bytes(config, spec, options.compute_dtype)
  per_token = cache_bytes_per_token(config, spec, fmt) * config.num_layers
  row.cache_bytes_per_token = per_token
  free = device_bytes - row.weight_bytes
  if free <= 0:
    row.note = f"the weights alone ({row.weight_bytes / 1e9:.1f} GB per device) exceed the device memory"
    return row
  per_device_tokens = int(free // per_token)              # of each sequence on this device's rows
  row.max_tokens = per_device_tokens * spec.data * spec.fsdp
  row.max_batch = row.max_tokens // context
  local_batch = -(-batch // (spec.data * spec.fsdp))
  row.read_bytes = round(row.weight_bytes + per_token * local_batch * context)
  one_layer, row.collectives = _compiled_collectives(config, spec, local_batch, options, devices)
  row.collective_bytes = one_layer * config.num_layers
  row.step_time_s = row.read_bytes / hbm_bytes_per_s + row.collective_bytes / link_bytes_per_s
  return row


def table(plans: Sequence[Plan], *, device_gb: float, batch: int, context: int, fmt: str, hbm_gbps: float,
          link_gbps: float) -> str:
  w = max(len("variant"), *(len(p.variant) for p in plans)) + 1
  head = (f"{'variant':<{w}} {'mesh':<24} {'weights/dev':>11} {'cache/tok/dev':>13} {'max tokens':>12} "
          f"{'max batch':>9} {'read/step':>10} {'coll./step':>10} {'step >=':>9}  collectives per layer")
  lines = [f"Capacity plan: {device_gb:g} GB devices, {fmt} cache, batch {batch} x context {context}; "
           f"step time bound from {hbm_gbps:g} GB/s HBM and {link_gbps:g} GB/s links", head, "-" * len(head)]
  for p in plans:
    if p.note:
      lines.append(f"{p.variant:<{w}} {p.mesh:<24} n/a  ({p.note[:110]})")
      continue
    lines.append(f"{p.variant:<{w}} {p.mesh:<24} {_gb(p.weight_bytes):>11} {p.cache_bytes_per_token:>13,.0f} "
                 f"{p.max_tokens:>12,} {p.max_batch:>9,} {_gb(p.read_bytes):>10} {_mb(p.collective_bytes):>10} "
                 f"{p.step_time_s * 1e3:>7.3f}ms  {p.collectives or 'none'}")
  lines += ["", "cache/tok/dev: bytes one device holds per token of a sequence, all layers (scales included); "
            "max tokens: batch x context the mesh holds beside the weights (max batch at this context); "
            "read/step: weights + cache each device reads per decode step; collectives measured from one "
            "block's compiled decode step on simulated devices."]
  return "\n".join(lines)


def _gb(n: float) -> str:
  return f"{n / 1e9:.2f} GB"


def _mb(n: float) -> str:
  return f"{n / 1e6:.2f} MB"


def write_csv(plans: Sequence[Plan], path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=[f.name for f in dataclasses.fields(Plan)])
    writer.writeheader()
    for p in plans:
      writer.writerow({k: ("" if v is None else v) for k, v in p.as_dict().items()})
  return path
