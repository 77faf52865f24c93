"""Logical-axis rules: the one table that maps the names modules give their axes
(`embed`, `q_heads`, `kv_heads`, `latent_blocks`, ...) to mesh axes, and the
sharding constraint modules call. It imports nothing of mla_jax; meshes,
placement and layout checks live above the model, in `mla_jax.sharding`.

The mesh has five axes: `data`, `fsdp`, `context`, and the tensor-parallel
degree T the user asks for, factored as `tensor` x `tensor_rep` (see
`mla_jax.sharding`): cache-entry axes (KV heads, latent heads or blocks) map to
`tensor`; query heads, MLP and vocab map to (`tensor`, `tensor_rep`), i.e. all
T devices. `context` splits decode caches by token (context parallelism: each
device attends over its own tokens, `mla_jax.attention.core.over_keys`);
nothing else maps to it, so parameters and activations are replicated over it.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Mapping, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "context", "tensor", "tensor_rep")
TP = ("tensor", "tensor_rep")  # all tensor-parallel devices

# Logical axis name -> mesh axes. Names not listed are replicated.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations and caches
    ("batch", ("data", "fsdp")),
    ("cache_batch", ("data", "fsdp")),
    ("length", None),
    ("cache_length", "context"),   # a dense cache's tokens, a page pool's slots within each page
    ("act_embed", None),
    ("act_heads", TP),
    ("act_mlp", TP),
    ("act_vocab", TP),
    # parameters
    ("embed", "fsdp"),
    ("vocab", TP),
    ("mlp", TP),
    ("q_heads", TP),               # query heads, flat, grouped under their cache entry
    # the cache-entry axes (and parameters that follow them)
    ("kv_heads", "tensor"),
    ("latent_heads", "tensor"),
    ("latent_blocks", "tensor"),
    # query heads that read one cache entry split over the replicas of that entry
    ("q_per_entry", "tensor_rep"),
)

Rules = Sequence[tuple[str, Any]]

# Named variations of the table (the runner's --rules flag).
RULE_PRESETS: dict[str, Rules] = {
    "default": RULES,
    # Keep the vocabulary whole on every device: any vocabulary size works with
    # any TP degree (GPT-2's 50257, say), at the cost of replicated embeddings.
    "vocab_replicated": tuple((name, None if name in ("vocab", "act_vocab") else axes)
                              for name, axes in RULES),
}


def rules_preset(name: str) -> Rules:
  if name not in RULE_PRESETS:
    raise ValueError(f"unknown rules preset {name!r}; choose one of {', '.join(RULE_PRESETS)}")
  return RULE_PRESETS[name]


def axis_sizes(mesh: jax.sharding.Mesh) -> dict[str, int]:
  return dict(zip(mesh.axis_names, mesh.devices.shape))


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int] | None = None, *,
                    mesh_axis_sizes: Mapping[str, int] | None = None, rules: Rules = RULES,
                    strict: bool = True, what: str = "array") -> PartitionSpec:
  """PartitionSpec for logical `axes`. With `shape`, every sharded dimension must
  divide evenly (strict) or falls back to replicated (strict=False)."""
  table = dict(rules)
  used: set[str] = set()
  out = []
  for i, name in enumerate(axes):
    mesh_axes = table.get(name) if name is not None else None
    if mesh_axes is None:
      out.append(None)
      continue
    mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    if mesh_axis_sizes is not None:
      mesh_axes = tuple(a for a in mesh_axes if a in mesh_axis_sizes)
    mesh_axes = tuple(a for a in mesh_axes if a not in used)  # a mesh axis shards one dim only
    if mesh_axes and shape is not None and mesh_axis_sizes is not None:
      ways = math.prod(mesh_axis_sizes[a] for a in mesh_axes)
      if shape[i] % ways:
        if strict:
          raise ValueError(
              f"{what}: dimension {i} ({name!r}, size {shape[i]}) does not split over the "
              f"{ways} devices of mesh axes {'x'.join(mesh_axes)}")
        mesh_axes = ()
    used.update(mesh_axes)
    out.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
  return PartitionSpec(*out)


def named_sharding(mesh: jax.sharding.Mesh, axes: Sequence[str | None],
                   shape: Sequence[int] | None = None, *, rules: Rules = RULES,
                   strict: bool = True, what: str = "array") -> NamedSharding:
  spec = logical_to_spec(axes, shape, mesh_axis_sizes=axis_sizes(mesh), rules=rules,
                         strict=strict, what=what)
  return NamedSharding(mesh, spec)


# ----------------------------------------------------------------------------- the active mesh

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("mla_jax_mesh", default=None)


@contextlib.contextmanager
def activate(mesh: jax.sharding.Mesh, rules: Rules = RULES):
  """Make `constrain` pin activations to `rules` on `mesh` (`mla_jax.sharding.use_mesh`
  also makes the mesh JAX's ambient one)."""
  token = _ACTIVE.set((mesh, tuple(rules)))
  try:
    yield mesh
  finally:
    _ACTIVE.reset(token)


def active() -> tuple[jax.sharding.Mesh, Rules] | None:
  """(mesh, rules) while tracing under a mesh, else None."""
  return _ACTIVE.get()


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names; a no-op outside a mesh. Dimensions
  that do not divide their mesh axes stay replicated (a hint, never an error)."""
  current = _ACTIVE.get()
  if current is None:
    return x
  mesh, rules = current
  return jax.lax.with_sharding_constraint(x, named_sharding(mesh, axes, x.shape, rules=rules, strict=False))


def mesh_axis_size(name: str) -> int:
  """The size of mesh axis `name` while tracing under a mesh (1 without one)."""
  current = _ACTIVE.get()
  return 1 if current is None else axis_sizes(current[0]).get(name, 1)


def pin(x: jax.Array, dim: int, mesh_axis: str | None) -> jax.Array:
  """Shard dimension `dim` of `x` over `mesh_axis` (None: replicate it), leaving
  the other dimensions' layout to XLA; a no-op outside a mesh."""
  current = _ACTIVE.get()
  if current is None:
    return x
  spec = [PartitionSpec.UNCONSTRAINED] * x.ndim
  spec[dim % x.ndim] = mesh_axis
  return jax.lax.with_sharding_constraint(x, NamedSharding(current[0], PartitionSpec(*spec)))
