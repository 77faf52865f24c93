"""The words each variant uses to describe the MLRA authors' checkpoint layout.

Their code (github.com/SongtaoLiu0823/MLRA, nanoGPT-style) stores torch Linear
weights as [out, in]. Each attention module class says, as data, which of
their tensors a layer's attention holds and how each of our parameters is
built from them (`authors_layout`), and how a config is read off their tensor
shapes (`authors_config`); `mla_jax.convert` is one loop over those.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import numpy as np


@dataclasses.dataclass(frozen=True)
class Param:
  """One of our parameters (its path under the layer's attention module), built
  from their tensors (names under `transformer.h.{i}.attn.`)."""
  path: tuple[str, ...]
  sources: tuple[str, ...]
  build: Callable[..., np.ndarray]


@dataclasses.dataclass(frozen=True)
class Layout:
  tensors: Mapping[str, tuple[int, ...]]     # their tensor names and shapes
  params: tuple[Param, ...]


def linear(path: str, name: str, *shape: int) -> Param:
  """Their [out, in] Linear weight as our [in, *out] parameter (out reshaped to `shape`)."""
  return Param((path,), (name,), lambda w: w.T.reshape(shape))


class ShapeOf:
  """Their layer-0 attention tensors, for reading a config off the shapes."""

  def __init__(self, tensors: Mapping[str, np.ndarray], prefix: str):
    self.names = {k[len(prefix):]: v.shape for k, v in tensors.items() if k.startswith(prefix)}

  def __call__(self, name: str) -> tuple[int, ...]:
    if name not in self.names:
      raise ValueError(f"missing tensor {name!r}, which the shapes of this variant depend on")
    return self.names[name]

  def has(self, fragment: str) -> bool:
    return any(fragment in name for name in self.names)


def invert(layout: Layout, values: Mapping[tuple[str, ...], np.ndarray]) -> dict[str, np.ndarray]:
  """Their tensors from our parameters (`values`: path -> array), for export.

  A build only moves elements (reshape, transpose, slice, reorder, stack), so
  it is run once on element numbers to learn which of their elements each of
  ours came from, and the values are put back there: one inverse for every
  layout, with no second description to keep in step. Every element of every
  tensor must be reached."""
  offsets, total = {}, 0
  for name, shape in layout.tensors.items():
    offsets[name], total = total, total + int(np.prod(shape))
  dtype = np.result_type(*(np.asarray(v).dtype for v in values.values()))
  flat, reached = np.zeros(total, dtype), np.zeros(total, bool)
  for param in layout.params:
    numbers = [np.arange(offsets[s], offsets[s] + int(np.prod(layout.tensors[s]))).reshape(layout.tensors[s])
               for s in param.sources]
    index = np.asarray(param.build(*numbers)).ravel()
    flat[index] = np.asarray(values[param.path]).ravel()
    reached[index] = True
  if not reached.all():
    missed = next(n for n, o in offsets.items() if not reached[o:o + int(np.prod(layout.tensors[n]))].all())
    raise ValueError(f"internal: no parameter fills all of {missed!r}")
  return {n: flat[o:o + int(np.prod(s))].reshape(s) for (n, s), o in zip(layout.tensors.items(), offsets.values())}
