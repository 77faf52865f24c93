"""Every call whose spelling depends on the JAX / Flax version lives here.

Only jax 0.10.2 + flax 0.12.8 can be tested on the development machines (Python
3.11); GPU clusters may run newer releases. Keeping the version-sensitive calls
in one small module means a new release breaks one file, not the library.
"""
from __future__ import annotations

import contextlib
from typing import Any, Sequence

import jax
from flax import nnx

# Flax renamed the variable metadata that carries logical axis names several
# times ('sharding' -> 'sharding_names' -> 'out_sharding'). We write the current
# name and read any of them; placement itself is ours (mla_jax.sharding), so an
# older Flax that does not know the key still works.
_AXES_KEY = "out_sharding"
_AXES_KEYS = ("out_sharding", "sharding_names", "sharding")


def param(value: jax.Array, axes: Sequence[str | None]) -> nnx.Param:
  """An nnx.Param carrying logical axis names, placed lazily (never eagerly).

  Eager sharding (Flax 0.12's default) would demand a mesh at construction;
  we construct unsharded and place with `mla_jax.sharding`, so the same model
  code runs with or without a mesh.
  """
  axes = tuple(axes)
  if len(axes) != value.ndim:
    raise ValueError(f"param of shape {value.shape} given {len(axes)} axis names {axes}")
  return nnx.Param(value, **{_AXES_KEY: axes}, eager_sharding=False)


def variable_axes(variable: Any) -> tuple[str | None, ...] | None:
  """Logical axis names stored on an NNX variable (None when it has none)."""
  if not isinstance(variable, nnx.Variable):
    return None
  for key in _AXES_KEYS:
    try:
      axes = variable.get_metadata(key, None)
    except (AttributeError, TypeError):
      axes = getattr(variable, key, None)
    if axes is not None:
      return tuple(axes)
  return None


def make_mesh(shape: Sequence[int], names: Sequence[str], devices=None) -> jax.sharding.Mesh:
  """A mesh with Auto axis types (jax >= 0.7 defaults to Explicit)."""
  kwargs = {}
  axis_type = getattr(jax.sharding, "AxisType", None)
  if axis_type is not None:
    kwargs["axis_types"] = (axis_type.Auto,) * len(names)
  if devices is not None:
    kwargs["devices"] = devices
  return jax.make_mesh(tuple(shape), tuple(names), **kwargs)


@contextlib.contextmanager
def set_mesh(mesh: jax.sharding.Mesh):
  """Make `mesh` the ambient mesh for tracing (bare PartitionSpecs resolve to it)."""
  if hasattr(jax, "set_mesh"):
    with jax.set_mesh(mesh):
      yield
  elif hasattr(jax.sharding, "use_mesh"):
    with jax.sharding.use_mesh(mesh):
      yield
  else:  # pragma: no cover - very old jax
    with mesh:
      yield


def cost_analysis(compiled) -> dict:
  """`compiled.cost_analysis()` returned a list of dicts in older jax."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return dict(cost or {})


def barrier(name: str, timeout_s: float) -> None:
  """Every process waits here until all have arrived (no-op for one process).

  Uses the jax.distributed coordination service directly: unlike a collective,
  it has an explicit timeout (long work on process 0, e.g. building a dataset,
  would otherwise trip the collectives' 30-second setup deadline)."""
  import jax
  if jax.process_count() == 1:
    return
  from jax._src import distributed as _dist
  _dist.global_state.client.wait_at_barrier(name, int(timeout_s * 1000))


def pallas_gpu():
  """The Pallas GPU (Triton) helpers module: `load`, `dot`, `CompilerParams`.

  jax 0.4.3x called it `jax.experimental.pallas.gpu`; later `.triton`. JAX 0.11
  deprecates the Triton ops in favour of tokamax, so every kernel here keeps an
  XLA path beside it."""
  try:
    from jax.experimental.pallas import triton as plgpu
  except ImportError:  # pragma: no cover - older jax
    from jax.experimental.pallas import gpu as plgpu
  return plgpu


def pallas_gpu_params(**kwargs):
  plgpu = pallas_gpu()
  cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
  return cls(**kwargs)


def shard_map(f, *, mesh, in_specs, out_specs):
  """Per-device code over `mesh` (jax.shard_map; jax.experimental.shard_map before 0.7).
  Replication checks are off: Pallas calls carry no replication rules."""
  import jax
  if hasattr(jax, "shard_map"):
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
  from jax.experimental.shard_map import shard_map as _shard_map  # pragma: no cover
  return _shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def on_gpu() -> bool:
  import jax
  return jax.default_backend() == "gpu"


# XLA:CPU runs simulated devices as threads of one process and aborts the process
# when a collective's threads have not all arrived within 40 s (its default). On a
# few busy cores (a test suite on two, a laptop doing two things) that is no hang,
# so simulated meshes wait up to ten minutes. An unknown XLA flag is fatal: these
# are the names of jaxlib 0.10.
_PATIENT_COLLECTIVES = ("--xla_cpu_collective_call_terminate_timeout_seconds=600 "
                        "--xla_cpu_collective_timeout_seconds=600")
# jaxlib 0.10's YNNPACK fusions crash (a segfault in their transpose) on some of
# the small per-device shapes of a cache split 8 ways over `context` (GLA's
# 4-token steps, tests/test_context_parallel.py): simulated meshes run without them.
_NO_YNN_FUSIONS = "--xla_cpu_experimental_ynn_fusion_type="


def simulated_cpu_devices(count: int, flags: str = "") -> str:
  """XLA_FLAGS for `count` simulated CPU devices (added to `flags`); set before JAX starts."""
  import jaxlib
  workaround = _NO_YNN_FUSIONS if jaxlib.__version__.startswith("0.10.") else ""
  return f"{flags} --xla_force_host_platform_device_count={count} {_PATIENT_COLLECTIVES} {workaround}".strip()
