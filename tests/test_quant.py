"""8-bit cache formats: a NumPy oracle (ml_dtypes' fp8 cast), and round-trip error
bounds derived from the formats themselves: int8 half a step of scale/127, fp8
e4m3 2^-4 relative for normal numbers and 2^-10 of the scale for subnormals."""
import dataclasses

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from mla_jax import quant


def _tokens(seed=0, shape=(3, 7, 4, 32)):
  """Tokens [batch, seq, blocks, width] whose magnitudes span 1e-4 .. 1e4 token by token."""
  rng = np.random.default_rng(seed)
  magnitude = 10.0 ** rng.uniform(-4, 4, size=shape[:2] + (1, 1))
  return (rng.standard_normal(shape) * magnitude).astype(np.float32)


def _numpy_quantize(x, name, tile, scale=None):
  """(values, scales); with `scale` given, the values for those scales (XLA may
  divide by a constant through its reciprocal: scales may differ by an ulp)."""
  tiles = x.reshape(x.shape[:-1] + (x.shape[-1] // tile, tile))
  qmax = {"fp8": 448.0, "int8": 127.0}[name]
  if scale is None:
    scale = (np.abs(tiles).max(-1) / np.float32(qmax)).astype(np.float32)
  y = tiles / np.where(scale == 0, np.float32(1), scale)[..., None]
  if name == "int8":
    return np.clip(np.round(y), -127, 127).astype(np.int8).reshape(x.shape), scale
  return np.clip(y, -448, 448).astype(ml_dtypes.float8_e4m3fn).reshape(x.shape), scale


def _bound(x, scale_per_element, name):
  """The largest error the format allows for each element."""
  s = scale_per_element
  if name == "int8":
    return 0.5 * s * (1 + 1e-6) + 1e-30
  normal = np.abs(x) >= s * 2.0 ** -6
  return np.where(normal, 2.0 ** -4 * np.abs(x), 2.0 ** -10 * s) * (1 + 1e-6) + 1e-30


@pytest.mark.parametrize("name", ["fp8", "int8"])
def test_quantize_matches_numpy_and_stays_within_the_format_bound(name):
  x = _tokens()
  fmt, tile = quant.FORMATS[name], 16
  values, scales = quant.quantize(x, fmt, tile)
  _, want_scales = _numpy_quantize(x, name, tile)
  np.testing.assert_allclose(np.asarray(scales), want_scales, rtol=2.5e-7, atol=0)
  want_values, _ = _numpy_quantize(x, name, tile, np.asarray(scales))
  np.testing.assert_array_equal(np.asarray(values).view(np.uint8), want_values.view(np.uint8))
  back = np.asarray(quant.dequantize(values, scales))
  per_element = np.repeat(np.asarray(scales), tile, axis=-1)
  assert np.all(np.abs(back - x) <= _bound(x, per_element, name))
  # the bound is tight enough to mean something: the error is not zero
  assert np.abs(back - x).max() > 0


@pytest.mark.parametrize("name", ["fp8", "int8"])
def test_outliers_coarsen_only_their_own_tile(name):
  x = _tokens(1, shape=(2, 5, 2, 64))
  x[0, 3, 1, 7] = 1e4 * np.abs(x[0, 3]).max()              # one outlier in one tile of one token
  fmt, tile = quant.FORMATS[name], 32
  values, scales = quant.quantize(x, fmt, tile)
  back = np.asarray(quant.dequantize(values, scales))
  per_element = np.repeat(np.asarray(scales), tile, axis=-1)
  assert np.all(np.abs(back - x) <= _bound(x, per_element, name))
  clean = _tokens(1, shape=(2, 5, 2, 64))
  clean_back = np.asarray(quant.dequantize(*quant.quantize(clean, fmt, tile)))
  # every other tile of that token (and every other token) quantizes as if the outlier were absent
  mask = np.ones(x.shape, bool)
  mask[0, 3, 1, :32] = False
  np.testing.assert_array_equal(back[mask], clean_back[mask])


@pytest.mark.parametrize("name", ["fp8", "int8"])
def test_all_zero_tokens_and_mixed_magnitudes(name):
  fmt = quant.FORMATS[name]
  x = np.zeros((1, 3, 1, 64), np.float32)
  x[0, 1] = 1e4 * np.random.default_rng(2).standard_normal((1, 64))
  x[0, 2] = 1e-4 * np.random.default_rng(3).standard_normal((1, 64))
  values, scales = quant.quantize(x, fmt, 64)
  back = np.asarray(quant.dequantize(values, scales))
  assert np.all(np.isfinite(back)) and np.all(back[0, 0] == 0) and np.all(np.asarray(scales)[0, 0] == 0)
  for t in (1, 2):            # a token's error follows its own magnitude, not its neighbours'
    rel = np.abs(back[0, t] - x[0, t]).max() / np.abs(x[0, t]).max()
    assert rel <= (1 / 254 if name == "int8" else 2.0 ** -4) * (1 + 1e-6)


def test_tiles_and_bytes_per_token():
  assert [quant.tile_width(w) for w in (32, 64, 128, 256, 512)] == [32, 64, 128, 128, 128]
  with pytest.raises(ValueError, match="a block 192 wide splits into no whole tiles of 128"):
    quant.tile_width(192)
  # MLA at DeepSeek's shape: a 512-wide latent and a 64-wide rope key per token
  mla = {"kv_latent": ((1, 512), ("latent_blocks", "latent_dim")), "rope_key": ((64,), ("rope_dim",))}
  per_token = {name: quant.layout_bytes_per_token(quant.layout(mla, quant.FORMATS[name])) for name in quant.FORMATS}
  assert (per_token["bfloat16"], per_token["fp8"]) == (1152, 656)            # FlashMLA's two layouts
  assert per_token == {"float32": 2304, "bfloat16": 1152, "fp8": 656, "int8": 656}
  rope_too = dataclasses.replace(quant.FORMATS["int8"], rope_key=True)
  assert quant.layout_bytes_per_token(quant.layout(mla, rope_too)) == 512 + 4 * 4 + 64 + 4
  # TPA's A factors (2 values per head) would cost more with a scale than in bf16
  tpa = {"key_a": ((4, 2), ("kv_heads", "tpa_rank")), "key_b": ((2, 32), ("tpa_rank", "head_dim"))}
  stored = quant.layout(tpa, quant.FORMATS["fp8"])
  assert (stored["key_a"].dtype, stored["key_b"].tile, stored["key_b_scale"].shape) == (jnp.bfloat16, 32, (2, 1))
  with pytest.raises(ValueError, match="cache_dtype=int8 cannot hold MLA's kv_latent: a block 192 wide .*"
                                       "formats that work for it: float32, bfloat16"):
    quant.layout({"kv_latent": ((1, 192), (None, None))}, quant.FORMATS["int8"], "MLA")
  with pytest.raises(ValueError, match="not a whole number of tiles"):
    quant.quantize(np.ones((2, 48), np.float32), quant.FORMATS["int8"], 32)
