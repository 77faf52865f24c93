"""Meshes, placement and layout checks, above the model. The rules table that
maps logical axis names to mesh axes is `mla_jax.rules` (re-exported here).

The mesh has five axes: `data`, `fsdp`, `context` (decode caches split by
token, see `mla_jax.rules`), and the tensor-parallel degree T the user asks
for, factored as `tensor` x `tensor_rep`:

* Every variant has one axis of n *cache entries* that tensor parallelism
  splits: KV heads (MHA/MQA/GQA, GTA), latent blocks (MLRA), latent heads
  (GLA), heads (TPA's A factors), or a single latent (MLA, MFA: n = 1).
* The replication rule: if T divides n, `tensor` = T and `tensor_rep` = 1 (each
  device holds n / T entries). If n divides T, `tensor` = n and `tensor_rep` =
  T / n: each entry is replicated on T / n devices, and the query heads that
  read one entry split across those devices. Otherwise no clean layout exists
  and `make_mesh` raises a ValueError naming the TP degrees that work.
* Cache-entry axes map to `tensor`; query heads, MLP and vocab map to
  (`tensor`, `tensor_rep`), i.e. all T devices.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mla_jax import compat
from mla_jax.attention.base import cache_axes, init_cache
from mla_jax.model import abstract_params
from mla_jax.rules import (MESH_AXES, RULE_PRESETS, RULES, TP, Rules, activate, axis_sizes,  # noqa: F401
                           constrain, logical_to_spec, named_sharding, rules_preset)


# ----------------------------------------------------------------------------- mesh


@dataclasses.dataclass(frozen=True)
class MeshSpec:
  """What the user asks for: `data:2,fsdp:1,tensor:4` (`context:2` too, for decoding)."""
  data: int = 1
  fsdp: int = 1
  tensor: int = 1
  context: int = 1

  @classmethod
  def parse(cls, spec: "str | MeshSpec | Mapping[str, int] | None") -> "MeshSpec":
    if spec is None or spec == "":
      return cls()
    if isinstance(spec, MeshSpec):
      return spec
    if isinstance(spec, Mapping):
      items = dict(spec)
    else:
      items = {}
      for part in str(spec).split(","):
        part = part.strip()
        if not part:
          continue
        name, sep, size = part.partition(":")
        if not sep or not size.strip().isdigit():
          raise ValueError(f"bad mesh entry {part!r} in {spec!r}: write axis:size pairs, "
                           "e.g. --mesh=data:2,fsdp:1,tensor:4")
        if name.strip() in items:
          raise ValueError(f"mesh axis {name.strip()!r} given twice in {spec!r}")
        items[name.strip()] = int(size)
    unknown = sorted(set(items) - {"data", "fsdp", "tensor", "context"})
    if unknown:
      raise ValueError(f"unknown mesh axis {unknown[0]!r} in {spec!r}: the axes are data, fsdp, "
                       "tensor and context, e.g. --mesh=data:2,tensor:4")
    for name, size in items.items():
      if size < 1:
        raise ValueError(f"mesh axis {name} has size {size}; sizes must be >= 1")
    return cls(**items)

  @property
  def size(self) -> int:
    return self.data * self.fsdp * self.context * self.tensor

  def __str__(self) -> str:
    context = f",context:{self.context}" if self.context > 1 else ""
    return f"data:{self.data},fsdp:{self.fsdp}{context},tensor:{self.tensor}"


def factor_tensor(tp: int, entries: int, what: str = "cache entries") -> tuple[int, int]:
  """(tensor, tensor_rep) for TP degree `tp` over `entries` cache entries."""
  if entries % tp == 0:
    return tp, 1
  if tp % entries == 0:
    return entries, tp // entries
  raise ValueError(f"{entries} {what} cannot be laid out on tensor:{tp}: the TP degree must "
                   f"divide {entries} or be a multiple of it")


def _entry_degrees(entries: int, limit: int = 64) -> list[int]:
  return [t for t in range(1, limit + 1) if entries % t == 0 or t % entries == 0]


def _fmt_degrees(degrees: Iterable[int]) -> str:
  return ", ".join(str(d) for d in degrees)


def make_mesh(spec: "str | MeshSpec | Mapping[str, int] | None" = None, config=None,
              devices: Sequence[jax.Device] | None = None, rules: Rules = RULES) -> jax.sharding.Mesh:
  """Build the 4-axis mesh for `spec`, factoring `tensor` for `config`'s attention.

  With a model config the layout is validated first (every parameter and cache
  axis must divide evenly), so a bad layout fails here, before any compile.
  """
  spec = MeshSpec.parse(spec)
  all_devices = list(jax.devices()) if devices is None else list(devices)
  if spec.size > len(all_devices):
    raise ValueError(f"mesh {spec} needs {spec.size} devices but only {len(all_devices)} are "
                     f"available: shrink the mesh (its sizes multiply to the device count), or on "
                     f"a CPU set XLA_FLAGS=--xla_force_host_platform_device_count={spec.size}")
  if devices is None and jax.process_count() > 1 and spec.size != len(all_devices):
    raise ValueError(f"mesh {spec} uses {spec.size} devices but the {jax.process_count()} processes "
                     f"have {len(all_devices)}: in a multi-process run the mesh sizes must multiply "
                     f"to {len(all_devices)}")
  tensor, rep = spec.tensor, 1
  if config is not None:
    check_layout(config, spec, rules)
    tensor, rep = factor_tensor(spec.tensor, config.attention.partition_entries(),
                                config.attention.partition_entries_name())
  shape = (spec.data, spec.fsdp, spec.context, tensor, rep)
  return compat.make_mesh(shape, MESH_AXES, devices=all_devices[: spec.size])


@contextlib.contextmanager
def use_mesh(mesh: jax.sharding.Mesh, rules: Rules = RULES):
  """Trace under `mesh`: `constrain` then pins activations to the rules' layout,
  and the mesh is JAX's ambient one."""
  with activate(mesh, rules), compat.set_mesh(mesh):
    yield mesh


# ----------------------------------------------------------------------------- placement


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def state_shardings(state, mesh: jax.sharding.Mesh, rules: Rules = RULES):
  """NamedShardings for an nnx.State (model or optimizer): each variable by its
  logical axis names; variables without names (counters, rng) are replicated."""

  def one(path, leaf):
    value = leaf.get_value() if hasattr(leaf, "get_value") else leaf.value
    axes = compat.variable_axes(leaf)
    shape = getattr(value, "shape", ())
    if axes is None or len(axes) != len(shape):
      return leaf.replace(NamedSharding(mesh, PartitionSpec()))
    return leaf.replace(named_sharding(mesh, axes, shape, rules=rules,
                                       what=f"parameter {_path_str(path)}"))

  return jax.tree_util.tree_map_with_path(one, state, is_leaf=_is_var)


def place_state(state, mesh: jax.sharding.Mesh, rules: Rules = RULES):
  """device_put an nnx.State onto `mesh` by its logical axes."""
  shardings = state_shardings(state, mesh, rules)
  return jax.device_put(state, shardings)


def shard_module(module: nnx.Module, mesh: jax.sharding.Mesh, rules: Rules = RULES) -> nnx.Module:
  """Place every array of an NNX module (a model, an nnx.Optimizer) on `mesh`, in place."""
  state = nnx.state(module)
  nnx.update(module, place_state(state, mesh, rules))
  return module


# ----------------------------------------------------------------------------- validation


def _abstract_arrays(config):
  """(path, shape, axes) for every parameter and per-token cache array of `config`."""
  out = list(abstract_params(config))
  for name, (shape, axes) in config.attention.cache_spec().items():
    # batch and length are laid out by their own axes; per-token dims carry the cache-entry axis
    out.append((f"cache/{name}", tuple(shape), tuple(axes)))
  return out


def axis_sizes_for(config, spec: "str | MeshSpec") -> dict[str, int]:
  """Mesh axis sizes `make_mesh` gives `config` on `spec` (the TP degree factored)."""
  spec = MeshSpec.parse(spec)
  attn = config.attention
  tensor, rep = factor_tensor(spec.tensor, attn.partition_entries(), attn.partition_entries_name())
  return {"data": spec.data, "fsdp": spec.fsdp, "context": spec.context, "tensor": tensor, "tensor_rep": rep}


def check_layout(config, spec: "str | MeshSpec", rules: Rules = RULES) -> None:
  """Raise a one-line ValueError if `config` cannot be laid out on `spec`."""
  spec = MeshSpec.parse(spec)
  try:
    sizes = axis_sizes_for(config, spec)
    for path, shape, axes in _abstract_arrays(config):
      logical_to_spec(axes, shape, mesh_axis_sizes=sizes, rules=rules, what=path)
  except ValueError as e:
    works = valid_tp_degrees(config, spec, rules=rules)
    raise ValueError(f"{config.attention.variant} cannot shard on mesh {spec}: {e}; "
                     f"TP degrees that work for this model (with data:{spec.data},"
                     f"fsdp:{spec.fsdp},context:{spec.context}): {_fmt_degrees(works) or 'none'}") from None


def valid_tp_degrees(config, spec: "str | MeshSpec | None" = None, limit: int = 64,
                     rules: Rules = RULES) -> list[int]:
  spec = MeshSpec.parse(spec)
  arrays = _abstract_arrays(config)
  entries = config.attention.partition_entries()
  good = []
  for tp in _entry_degrees(entries, limit):
    sizes = axis_sizes_for(config, dataclasses.replace(spec, tensor=tp))
    try:
      for path, shape, axes in arrays:
        logical_to_spec(axes, shape, mesh_axis_sizes=sizes, rules=rules, what=path)
    except ValueError:
      continue
    good.append(tp)
  return good


def place_cache(config, mesh: jax.sharding.Mesh, batch: int, max_len: int, fmt="float32"):
  """Allocate one layer's cache for `config` (a ModelConfig) in the cache format
  `fmt` directly on `mesh`, each array sharded by its logical axes (no weights needed)."""
  attn = config.attention
  abstract = jax.eval_shape(lambda: init_cache(attn, batch, max_len, fmt))
  shardings = {name: named_sharding(mesh, axes, abstract[name].shape, what=f"cache/{name}")
               for name, axes in cache_axes(attn, fmt).items()}
  return jax.jit(lambda: init_cache(attn, batch, max_len, fmt), out_shardings=shardings)()


def per_device_cache_elements(cache: Mapping[str, jax.Array]) -> dict[str, float]:
  """Elements per token of each cache array held on one device, measured from
  its buffers: the shard's size over (its batch rows x the whole length), so a
  cache split by token over `context` counts 1 / CP of each token."""
  out = {}
  for name, x in cache.items():
    shard = x.addressable_shards[0].data
    n = int(np.prod(shard.shape[1:])) / x.shape[1]
    out[name] = int(n) if n == int(n) else n
  return out


def per_device_cache_bytes(cache: Mapping[str, jax.Array]) -> float:
  """Bytes per token of one device's share of `cache` (every array, scales included)."""
  return sum(n * cache[name].dtype.itemsize for name, n in per_device_cache_elements(cache).items())
