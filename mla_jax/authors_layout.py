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
