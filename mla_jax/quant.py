"""8-bit cache formats: values in fp8 (e4m3) or int8 with one float32 scale per
token per tile of consecutive elements.

    scale[t, j] = max_i |x[t, j*T + i]| / Q        Q = 448 (e4m3's largest), 127 (int8)
    q[t, i]     = cast(x[t, i] / scale[t, i // T])  fp8: round to nearest; int8: round, clip to +-127
    x'[t, i]    = q[t, i] * scale[t, i // T]

Why per token: a token is written once and never rescaled, so its scale is
known at write time (no running statistics, no rewrite when a later token is
larger). Why per tile: one outlier coarsens only its own tile. The tile is a
whole latent block or KV head where that is at most 128 wide, otherwise 128
(FlashMLA's choice: MLA at DeepSeek's shape stores 512 fp8 values, 4 scales and
the 64-wide rope key in bf16, 656 bytes against 1152), so a tile never crosses
a latent block and a block's scales travel with it to its tensor-parallel shard.

Error bounds per element, in units of its tile's scale s (tests/test_quant.py):
int8 rounds to the nearest of 255 levels, |x' - x| <= s / 2; fp8 e4m3 keeps 3
mantissa bits, |x' - x| <= 2^-4 |x| for |x| / s >= 2^-6 (normal numbers) and
<= 2^-10 s below (subnormals, step 2^-9).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

TILE = 128


@dataclasses.dataclass(frozen=True)
class Format:
  name: str
  storage: jnp.dtype        # what the cache holds per element
  qmax: float               # the largest stored magnitude (0: stored as is, no scales)

  @property
  def scaled(self) -> bool:
    return self.qmax > 0

  @property
  def element_bytes(self) -> int:
    return jnp.dtype(self.storage).itemsize


FORMATS = {
    "float32": Format("float32", jnp.float32, 0.0),
    "bfloat16": Format("bfloat16", jnp.bfloat16, 0.0),
    "fp8": Format("fp8", jnp.float8_e4m3fn, 448.0),
    "int8": Format("int8", jnp.int8, 127.0),
}
SCALE_DTYPE = jnp.float32


def tile_width(width: int) -> int:
  """Elements per scale for a block (latent block, KV head) `width` wide."""
  if width <= TILE:
    return width
  if width % TILE:
    raise ValueError(f"a block {width} wide splits into no whole tiles of {TILE}: use a multiple of {TILE}")
  return TILE


def quantize(x: jnp.ndarray, fmt: Format, tile: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """x [..., n] -> (values [..., n] in fmt.storage, scales [..., n // tile] float32)."""
  n = x.shape[-1]
  if n % tile:
    raise ValueError(f"the last axis ({n}) is not a whole number of tiles of {tile}")
  tiles = x.astype(jnp.float32).reshape(x.shape[:-1] + (n // tile, tile))
  scale = jnp.max(jnp.abs(tiles), axis=-1) / fmt.qmax
  y = tiles / jnp.where(scale == 0, 1.0, scale)[..., None]          # an all-zero tile stays zero
  if jnp.issubdtype(fmt.storage, jnp.integer):
    y = jnp.round(y)
  y = jnp.clip(y, -fmt.qmax, fmt.qmax)                                 # float rounding may pass qmax by an ulp
  return y.astype(fmt.storage).reshape(x.shape), scale.astype(SCALE_DTYPE)


def dequantize(values: jnp.ndarray, scales: jnp.ndarray, dtype=jnp.float32) -> jnp.ndarray:
  """The inverse of `quantize` (up to its rounding), in `dtype`."""
  n, tiles = values.shape[-1], scales.shape[-1]
  tiled = values.astype(dtype).reshape(values.shape[:-1] + (tiles, n // tiles))
  return (tiled * scales.astype(dtype)[..., None]).reshape(values.shape)


def bytes_per_token(elements: int, fmt: Format, tile: int) -> int:
  """Cache bytes of `elements` values of one token, scales included."""
  scales = elements // tile if fmt.scaled else 0
  return elements * fmt.element_bytes + scales * jnp.dtype(SCALE_DTYPE).itemsize
