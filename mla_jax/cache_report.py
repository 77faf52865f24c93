"""KV-cache report and decode-traffic report, one code path.

`rows()` measures, per variant, TP degree and context-parallel degree CP:
parameters, cache per token, and the per-device cache measured from arrays
actually placed on a (simulated) mesh. With `compiled=True` it also compiles one Transformer block's sharded
decode step and reads, from the compiled program: the cache and weight bytes
each device takes in (its input shardings applied to the global shapes), XLA's
total bytes accessed, and every collective in the HLO. `write()` prints the
table and writes the CSV and the chart. `experiments.run --mode=kv_report` and
`--mode=decode_traffic` drive it.

On the CPU, XLA's "bytes accessed" counts every unfused intermediate (scores,
softmax passes, the cache write) as well as the inputs, so it is several times
the cache; the cache bytes themselves come from the input shardings.
"""
from __future__ import annotations

import csv
import dataclasses
import os
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flax import nnx

from mla_jax import compat, hlo, quant, sharding
from mla_jax.attention.base import cache_axes, cache_layout, init_cache
from mla_jax.config import ModelConfig, RunOptions
from mla_jax.model import Block, count_params

# The reports' defaults: a bf16 cache read by the XLA absorbed path.
REPORT_OPTIONS = RunOptions(cache_dtype="bfloat16", decode_impl="absorbed")


@dataclasses.dataclass
class Row:
  variant: str
  tp: int
  params: int
  non_embedding_params: int
  cache_elements_per_token: int          # per layer, whole model (all devices together)
  cache_bytes_per_token: int             # per layer, in the options' cache format (scales included)
  cache_bytes_total: int                 # all layers, the given batch and context
  cp: int = 1                            # context-parallel degree (the cache split by token)
  mesh: str = ""                         # tensor x tensor_rep actually used
  per_device_elements_per_token: float | None = None  # per layer per token of a sequence, measured on the
  #                                                      device buffers (a device holds 1 / CP of the tokens)
  per_device_dh: float | None = None     # the same in units of d_h = d_model / num_heads
  per_device_bytes_total: int | None = None           # all layers, the given batch and context
  note: str = ""                         # why there is no layout at this TP degree
  # ---- from the compiled decode step of one block (decode_traffic), per device
  step_cache_bytes: int | None = None    # KV cache the step takes in
  step_cache_dh: float | None = None     # the same per token, in units of d_h
  step_weight_bytes: int | None = None   # the block's weights the step takes in
  step_bytes_accessed: int | None = None  # XLA's cost analysis (counts intermediates too)
  step_collective_bytes: int | None = None
  step_collective_dh: float | None = None  # collective elements per token, in units of d_h
  step_collectives: str = ""             # e.g. "all-reduce x2"
  # ---- per layer per token in each cache format, scales included (None: the variant cannot hold it)
  bytes_per_token_float32: int | None = None
  bytes_per_token_bfloat16: int | None = None
  bytes_per_token_fp8: int | None = None
  bytes_per_token_int8: int | None = None

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def head_unit(config: ModelConfig) -> int:
  """d_h, the unit the MLRA paper counts cache in (128 at its config)."""
  return config.d_model // config.attention.num_heads


def rows(configs: Mapping[str, ModelConfig], *, tps: Sequence[int] = (1, 2, 4, 8), cps: Sequence[int] = (1,),
         batch: int = 1, context: int = 2048, options: RunOptions = REPORT_OPTIONS, devices=None,
         compiled: bool = False) -> list[Row]:
  """One row per (variant, TP degree, CP degree). Per-device figures come from
  one layer's cache allocated on a `context:CP,tensor:TP` mesh of `devices`
  (default: the CPU devices); with `compiled`, also from one block's compiled
  decode step at `batch` x `context`."""
  devices = list(jax.devices("cpu") if devices is None else devices)
  fmt = options.cache_format
  out = []
  for name, config in configs.items():
    counts = count_params(config)
    per_token = quant.layout_bytes_per_token(cache_layout(config.attention, fmt))
    base = dict(variant=name, params=counts["total"], non_embedding_params=counts["non_embedding"],
                cache_elements_per_token=config.cache_elements_per_token(), cache_bytes_per_token=per_token,
                cache_bytes_total=per_token * config.num_layers * batch * context)
    for f in quant.FORMATS:
      try:
        base[f"bytes_per_token_{f}"] = quant.layout_bytes_per_token(cache_layout(config.attention, f))
      except ValueError:
        pass
    for tp, cp in [(tp, cp) for tp in tps for cp in cps]:
      row = Row(tp=tp, cp=cp, **base)
      if tp * cp > len(devices):
        row.note = f"needs {tp * cp} devices, {len(devices)} available"
        out.append(row)
        continue
      try:
        mesh = sharding.make_mesh(f"context:{cp},tensor:{tp}", config, devices=devices)
      except ValueError as e:
        row.note = str(e)
        out.append(row)
        continue
      sizes = sharding.axis_sizes(mesh)
      row.mesh = f"{sizes['tensor']}x{sizes['tensor_rep']}"
      # A small cache is enough: the layout per token does not depend on length.
      cache = sharding.place_cache(config, mesh, batch=1, max_len=8 * cp, fmt=fmt)
      elements = sum(n for k, n in sharding.per_device_cache_elements(cache).items() if not k.endswith(quant.SCALE))
      row.per_device_elements_per_token = elements
      row.per_device_dh = elements / head_unit(config)
      row.per_device_bytes_total = round(sharding.per_device_cache_bytes(cache) * config.num_layers * batch
                                         * context)
      if compiled:
        _add_compiled(row, config, mesh, batch=batch, context=context, options=options)
      out.append(row)
  return out


def _shard_bytes(abstract, shardings, itemsize: bool = True) -> int:
  """Bytes (or with itemsize=False elements) of one device's shards of `abstract`."""
  total = 0
  for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    shape = s.shard_shape(x.shape)
    total += int(np.prod(shape)) * (jnp.dtype(x.dtype).itemsize if itemsize else 1)
  return total


def compile_block_decode(config: ModelConfig, mesh, *, batch: int, context: int,
                         options: RunOptions = REPORT_OPTIONS):
  """Lower and compile one Transformer block's decode step on `mesh` from
  abstract, sharded inputs (nothing is allocated: paper-size layers fit).
  Returns (compiled, abstract inputs)."""
  block = nnx.eval_shape(lambda: Block(config, options, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(block)
  state_sh = sharding.state_shardings(state, mesh)
  params = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), state, state_sh)
  cache_shapes = jax.eval_shape(lambda: init_cache(config.attention, batch, context, options.cache_format))
  axes = cache_axes(config.attention, options.cache_format)
  cache = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.named_sharding(
      mesh, axes[k], v.shape, what=f"cache/{k}")) for k, v in cache_shapes.items()}
  x = jax.ShapeDtypeStruct((batch, 1, config.d_model), options.compute_dtype,
                           sharding=sharding.named_sharding(mesh, ("batch", "length", "act_embed"),
                                                            (batch, 1, config.d_model), strict=False))
  lengths = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sharding.named_sharding(
      mesh, ("batch",), (batch,), strict=False))

  def step(state, x, cache, lengths):
    return nnx.merge(graphdef, state).step(x, cache, lengths)

  with sharding.use_mesh(mesh):
    compiled = jax.jit(step, donate_argnums=(2,)).lower(params, x, cache, lengths).compile()
  return compiled, (params, x, cache, lengths)


def _add_compiled(row: Row, config: ModelConfig, mesh, *, batch, context, options):
  compiled, (params, x, cache, lengths) = compile_block_decode(config, mesh, batch=batch, context=context,
                                                               options=options)
  in_sh = compiled.input_shardings[0]          # as compiled: (state, x, cache, lengths)
  unit = head_unit(config)
  local_batch = batch // sharding.axis_sizes(mesh)["data"] // sharding.axis_sizes(mesh)["fsdp"] or 1
  row.step_cache_bytes = _shard_bytes(cache, in_sh[2])
  values = [k for k in cache if not k.endswith(quant.SCALE)]                     # elements: the scales aside
  elements = _shard_bytes([cache[k] for k in values], [in_sh[2][k] for k in values], itemsize=False)
  row.step_cache_dh = elements / (local_batch * context) / unit
  row.step_weight_bytes = _shard_bytes(params, in_sh[0])
  row.step_bytes_accessed = int(compat.cost_analysis(compiled).get("bytes accessed", 0))
  colls = hlo.collectives(compiled.as_text())
  row.step_collective_bytes = sum(c.bytes for c in colls)
  elements = sum(c.bytes // max(1, hlo.dtype_bytes(c)) for c in colls)
  row.step_collective_dh = elements / local_batch / unit
  row.step_collectives = hlo.kinds(colls)


def _fmt_bytes(n: int | None) -> str:
  if n is None:
    return "-"
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if n < 1024 or unit == "TiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return str(n)


def table(report: Sequence[Row], *, batch: int, context: int, layers: int) -> str:
  report = [r for r in report if r.cp == 1]          # the KV report compares TP degrees
  tps = sorted({r.tp for r in report})
  variants = list(dict.fromkeys(r.variant for r in report))
  by = {(r.variant, r.tp): r for r in report}
  w = max(len("variant"), *(len(v) for v in variants)) + 1
  head = (f"{'variant':<{w}} {'params':>15} {'cache/tok/layer':>15} {'cache (all)':>12} "
          + " ".join(f"{'TP' + str(t) + ' d_h':>9}" for t in tps)
          + " " + " ".join(f"{'TP' + str(t) + '/dev':>10}" for t in tps))
  lines = [f"KV cache: batch {batch}, context {context}, {layers} layers; per device measured "
           "on the placed arrays (d_h units per token per layer, and bytes for the whole model)",
           head, "-" * len(head)]
  notes = []
  for v in variants:
    first = by[(v, tps[0])]
    cells = []
    for t in tps:
      r = by[(v, t)]
      cells.append(f"{r.per_device_dh:>9.4g}" if r.per_device_dh is not None else f"{'n/a':>9}")
      if r.note:
        notes.append(f"{v} at TP {t}: {r.note}")
    bytes_cells = [f"{_fmt_bytes(by[(v, t)].per_device_bytes_total):>10}" for t in tps]
    lines.append(f"{v:<{w}} {first.params:>15,} {first.cache_elements_per_token:>15,} "
                 f"{_fmt_bytes(first.cache_bytes_total):>12} " + " ".join(cells) + " " + " ".join(bytes_cells))
  if notes:
    lines += ["", "n/a:"] + [f"  {n}" for n in notes]
  lines += ["", "bytes per token per layer in each cache format (8-bit: scales included, the rope key in bf16)",
            f"{'variant':<{w}} " + " ".join(f"{f:>9}" for f in quant.FORMATS)]
  for v in variants:
    first = by[(v, tps[0])]
    lines.append(f"{v:<{w}} " + " ".join(f"{_or_na(getattr(first, 'bytes_per_token_' + f)):>9}"
                                        for f in quant.FORMATS))
  return "\n".join(lines)


def _or_na(n: int | None) -> str:
  return "n/a" if n is None else f"{n:,}"


def traffic_table(report: Sequence[Row], *, batch: int, context: int, decode_impl: str) -> str:
  """One line per (variant, TP, CP): what one block's compiled decode step moves, per device."""
  w = max(len("variant"), *(len(r.variant) for r in report)) + 1
  head = (f"{'variant':<{w}} {'TP':>3} {'CP':>3} {'mesh':>5} {'cache d_h/tok':>13} {'cache/dev':>10} "
          f"{'weights/dev':>11} {'XLA bytes':>10} {'coll. d_h/tok':>13} {'coll./dev':>10}  collectives")
  lines = [f"Decode traffic of one Transformer block, per device per decode step ({decode_impl} decode, "
           f"batch {batch}, context {context}), read from the compiled programs", head, "-" * len(head)]
  for r in report:
    if r.step_cache_bytes is None:
      lines.append(f"{r.variant:<{w}} {r.tp:>3} {r.cp:>3} {'-':>5} {'n/a':>13}  "
                   f"({r.note.split(': ', 1)[-1][:90]})")
      continue
    lines.append(f"{r.variant:<{w}} {r.tp:>3} {r.cp:>3} {r.mesh:>5} {r.step_cache_dh:>13.4g} "
                 f"{_fmt_bytes(r.step_cache_bytes):>10} {_fmt_bytes(r.step_weight_bytes):>11} "
                 f"{_fmt_bytes(r.step_bytes_accessed):>10} {r.step_collective_dh:>13.4g} "
                 f"{_fmt_bytes(r.step_collective_bytes):>10}  {r.step_collectives or 'none'}")
  lines += ["", "cache d_h/tok: KV-cache elements each device reads per token of a sequence, from the compiled step's "
            "input shardings; coll. d_h/tok: elements all collectives move per token. XLA bytes: the "
            "CPU cost analysis, which also counts unfused intermediates (scores, softmax passes, the "
            "cache update), so it exceeds cache + weights."]
  return "\n".join(lines)


def plot_traffic(report: Sequence[Row], path: str, *, title: str = "") -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  layouts = sorted({(r.tp, r.cp) for r in report})
  variants = list(dict.fromkeys(r.variant for r in report))
  by = {(r.variant, r.tp, r.cp): r for r in report}
  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(15, 4.8))
  width = 0.8 / len(layouts)
  for j, (t, c) in enumerate(layouts):
    label = f"TP {t}" + (f" x CP {c}" if c > 1 else "")
    for ax, field in ((ax0, "step_cache_dh"), (ax1, "step_collective_dh")):
      xs, ys = [], []
      for i, v in enumerate(variants):
        val = getattr(by[(v, t, c)], field)
        x = i + (j - (len(layouts) - 1) / 2) * width
        if val is None:
          ax.text(x, 1.05 if ax is ax0 else 0, "x", ha="center", va="bottom", color="tab:red", fontsize=9)
        else:
          xs.append(x)
          ys.append(val)
      ax.bar(xs, ys, width=width, label=label, color=f"C{j % 10}")
  for ax, label in ((ax0, "KV cache read per token, units of d_h"),
                    (ax1, "collectives per token, units of d_h")):
    ax.set_xticks(range(len(variants)), variants, rotation=45, ha="right")
    ax.set_ylabel(label)
    ax.grid(axis="y", alpha=0.3)
  ax0.set_yscale("log")
  top = max((r.step_cache_dh for r in report if r.step_cache_dh), default=1.0)
  ax0.set_ylim(1.0, top * 2)
  ax0.set_title("cache each device reads (compiled decode step; x = no layout)")
  ax1.set_title("what the devices exchange (HLO collectives)")
  ax0.legend(ncols=min(len(layouts), 5), fontsize=7)
  _save(fig, path, title)


def write_traffic(report: Sequence[Row], output_dir: str, *, name: str, batch: int, context: int,
                  decode_impl: str, title: str = "") -> dict[str, str]:
  os.makedirs(output_dir, exist_ok=True)
  paths = {"csv": os.path.join(output_dir, f"{name}.csv"), "png": os.path.join(output_dir, f"{name}.png")}
  write_csv(report, paths["csv"])
  plot_traffic(report, paths["png"], title=title)
  print(traffic_table(report, batch=batch, context=context, decode_impl=decode_impl))
  print(f"\nwrote {paths['csv']} and {paths['png']}")
  return paths


def write_csv(report: Sequence[Row], path: str) -> None:
  fields = [f.name for f in dataclasses.fields(Row)]
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    for r in report:
      writer.writerow({k: ("" if v is None else v) for k, v in r.as_dict().items()})


def plot(report: Sequence[Row], path: str, *, title: str = "") -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  tps = sorted({r.tp for r in report})
  variants = list(dict.fromkeys(r.variant for r in report))
  by = {(r.variant, r.tp): r for r in report}
  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(14, 4.8), gridspec_kw={"width_ratios": [1, 2]})
  whole = [by[(v, tps[0])].cache_elements_per_token for v in variants]
  ax0.bar(range(len(variants)), whole, color="tab:gray")
  ax0.set_xticks(range(len(variants)), variants, rotation=45, ha="right")
  ax0.set_ylabel("elements per token per layer")
  ax0.set_yscale("log")
  ax0.set_title("whole cache")
  for i, w in enumerate(whole):
    ax0.text(i, w, f"{w}", ha="center", va="bottom", fontsize=7)
  width = 0.8 / len(tps)
  for j, t in enumerate(tps):
    xs, ys = [], []
    for i, v in enumerate(variants):
      r = by[(v, t)]
      x = i + (j - (len(tps) - 1) / 2) * width
      if r.per_device_dh is None:
        ax1.text(x, 1.05, "x", ha="center", va="bottom", color="tab:red", fontsize=9)
      else:
        xs.append(x)
        ys.append(r.per_device_dh)
        ax1.text(x, r.per_device_dh, f"{r.per_device_dh:.3g}", ha="center", va="bottom",
                 fontsize=6, rotation=90)
    ax1.bar(xs, ys, width=width, label=f"TP {t}")
  ax1.set_yscale("log")
  top = max((r.per_device_dh for r in report if r.per_device_dh is not None), default=1.0)
  ax1.set_ylim(1.0, top * 2.0)
  ax1.set_xticks(range(len(variants)), variants, rotation=45, ha="right")
  ax1.set_ylabel("per device, units of d_h per token per layer")
  ax1.set_title("per device (measured on placed arrays; x = no layout at that TP)")
  ax1.legend(ncols=len(tps), fontsize=8)
  _save(fig, path, title)


def _save(fig, path: str, title: str) -> None:
  import matplotlib.pyplot as plt
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write(report: Sequence[Row], output_dir: str, *, name: str = "kv_report", batch: int,
          context: int, layers: int, title: str = "") -> dict[str, str]:
  os.makedirs(output_dir, exist_ok=True)
  paths = {"csv": os.path.join(output_dir, f"{name}.csv"), "png": os.path.join(output_dir, f"{name}.png")}
  write_csv(report, paths["csv"])
  plot(report, paths["png"], title=title)
  print(table(report, batch=batch, context=context, layers=layers))
  print(f"\nwrote {paths['csv']} and {paths['png']}")
  return paths


def check_devices(tps: Sequence[int]) -> None:
  have = len(jax.devices("cpu"))
  if max(tps) > have:
    raise ValueError(f"TP {max(tps)} needs {max(tps)} CPU devices, {have} available: set "
                     f"XLA_FLAGS=--xla_force_host_platform_device_count={max(tps)} before JAX starts")

