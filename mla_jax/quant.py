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

Which arrays of a variant's cache take the 8-bit format (`layout`): every one
whose rows a scale pays for, i.e. where `w` 8-bit values and `w / tile` fp32
scales take fewer bytes than `w` bf16 values (TPA's A factors, a few values per
head, stay in bf16), except the rope key, kept in bf16 unless the format says
otherwise (`Format.rope_key`): it carries the position and is small (64 of
576 at DeepSeek's shape).

Error bounds per element, in units of its tile's scale s (tests/test_quant.py):
int8 rounds to the nearest of 255 levels, |x' - x| <= s / 2; fp8 e4m3 keeps 3
mantissa bits, |x' - x| <= 2^-4 |x| for |x| / s >= 2^-6 (normal numbers) and
<= 2^-10 s below (subnormals, step 2^-9).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

TILE = 128
SCALE = "_scale"            # the scales of cache array NAME are cache array NAME + SCALE


@dataclasses.dataclass(frozen=True)
class Format:
  name: str
  storage: jnp.dtype        # what the cache holds per element
  qmax: float               # the largest stored magnitude (0: stored as is, no scales)
  rope_key: bool = False    # scaled formats: quantize the rope key too (default: bf16)

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
UNSCALED = jnp.bfloat16     # what a scaled format stores the arrays it does not quantize in
# Other spellings --cache_dtype accepts.
ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "e4m3": "fp8", "fp8_e4m3": "fp8",
           "float8_e4m3fn": "fp8"}


def cache_format(spec: "Format | str | jnp.dtype") -> Format:
  """A format from itself, its name (or an alias) or a float dtype."""
  if isinstance(spec, Format):
    return spec
  if isinstance(spec, str):
    name = ALIASES.get(spec, spec)
    if name not in FORMATS:
      raise ValueError(f"unknown cache format {spec!r}; choose one of {', '.join(FORMATS)}")
    return FORMATS[name]
  for fmt in FORMATS.values():
    if jnp.dtype(spec) == jnp.dtype(fmt.storage):
      return fmt
  raise ValueError(f"no cache format stores {jnp.dtype(spec).name}; choose one of {', '.join(FORMATS)}")


def tile_width(width: int) -> int:
  """Elements per scale for a block (latent block, KV head) `width` wide."""
  if width <= TILE:
    return width
  if width % TILE:
    raise ValueError(f"a block {width} wide splits into no whole tiles of {TILE}: use a multiple of {TILE}")
  return TILE


@dataclasses.dataclass(frozen=True)
class Stored:
  """One cache array: per-token shape, logical axes, dtype, and the tile its
  scales cover (0: not scaled, or the scales themselves)."""
  shape: tuple[int, ...]
  axes: tuple[str | None, ...]
  dtype: jnp.dtype
  tile: int = 0


def layout(spec: dict, fmt: Format, variant: str = "this variant") -> dict[str, Stored]:
  """A variant's cache arrays (`AttentionConfig.cache_spec()`: name -> (shape,
  axes)) as stored in `fmt`, the scale arrays included: NAME + SCALE holds one
  scale per token per tile of NAME's last axis. Raises a one-line ValueError
  when a row cannot be tiled (a width over TILE that is no multiple of it)."""
  out = {}
  for name, (shape, axes) in spec.items():
    shape, axes, width = tuple(shape), tuple(axes), shape[-1]
    if not fmt.scaled:
      out[name] = Stored(shape, axes, fmt.storage)
      continue
    pays = width * fmt.element_bytes + jnp.dtype(SCALE_DTYPE).itemsize < width * jnp.dtype(UNSCALED).itemsize
    if (name == "rope_key" and not fmt.rope_key) or not pays:
      out[name] = Stored(shape, axes, UNSCALED)
      continue
    try:
      tile = tile_width(width)
    except ValueError as e:
      raise ValueError(f"cache_dtype={fmt.name} cannot hold {variant}'s {name}: {e}; formats that work for it: "
                       "float32, bfloat16") from None
    out[name] = Stored(shape, axes, fmt.storage, tile)
    out[name + SCALE] = Stored(shape[:-1] + (width // tile,), scale_axes(axes), SCALE_DTYPE)
  return out


def scale_axes(axes: tuple) -> tuple:
  """Logical axes of an array's scales: its own, the tile axis unsharded."""
  return tuple(axes[:-1]) + (None,)


def layout_bytes_per_token(stored: dict[str, Stored]) -> int:
  """Cache bytes per token of one layer, scales included."""
  return sum(math.prod(s.shape) * jnp.dtype(s.dtype).itemsize for s in stored.values())


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


def dequantize(values: jnp.ndarray, scales: jnp.ndarray, dtype=jnp.float32, tile: int | None = None) -> jnp.ndarray:
  """The inverse of `quantize` (up to its rounding), in `dtype`. `tile` (default:
  the whole tiles the shapes imply) lets `values` be a prefix of the tiled row."""
  n = values.shape[-1]
  tile = n // scales.shape[-1] if tile is None else tile
  return values.astype(dtype) * jnp.repeat(scales.astype(dtype), tile, axis=-1)[..., :n]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Quantized:
  """A cache array as the attention core reads it: `values` in the format's
  storage dtype and `scales` [..., tiles] (each an array, or a paged pool the
  kernels read through a table); element i of a row is values[i] * scales[i // tile]."""
  values: object
  scales: object
  tile: int = dataclasses.field(metadata=dict(static=True))

  @property
  def shape(self) -> tuple[int, ...]:
    return self.values.shape

  @property
  def ndim(self) -> int:
    return self.values.ndim

  def map(self, fn) -> "Quantized":
    """`fn` applied to values and scales alike: it may move, split or merge the
    leading axes, never the last (the row)."""
    return Quantized(fn(self.values), fn(self.scales), self.tile)

  def prefix(self, n: int) -> "Quantized":
    """The first n elements of every row (with the scales of the tiles they touch)."""
    return Quantized(self.values[..., :n], self.scales[..., :-(-n // self.tile)], self.tile)

  def dequantize(self, dtype=jnp.float32) -> jnp.ndarray:
    return dequantize(self.values, self.scales, dtype, self.tile)


def map_rows(fn, a):
  """`fn` on an array, or on a `Quantized` array's values and scales."""
  return a.map(fn) if isinstance(a, Quantized) else fn(a)


def prefix(a, n: int):
  """The first n elements of the last axis of an array or a `Quantized` one."""
  return a.prefix(n) if isinstance(a, Quantized) else a[..., :n]


def dequantized(a, dtype):
  """An array as `dtype`: a `Quantized` one dequantized, any other cast."""
  return a.dequantize(dtype) if isinstance(a, Quantized) else a.astype(dtype)
