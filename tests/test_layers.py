"""Shared layers against plain NumPy written from the formulas."""
import jax.numpy as jnp
import numpy as np
import pytest

from mla_jax.layers import LayerNorm, rms_norm, rope


def numpy_rope(x, positions, theta=10000.0):
  """Half-split RoPE, one position and frequency at a time."""
  x = np.asarray(x, np.float64)
  out = np.empty_like(x)
  half = x.shape[-1] // 2
  for b in range(x.shape[0]):
    for s in range(x.shape[1]):
      for i in range(half):
        angle = positions[b, s] / theta ** (2 * i / x.shape[-1])
        c, sn = np.cos(angle), np.sin(angle)
        x1, x2 = x[b, s, ..., i], x[b, s, ..., i + half]
        out[b, s, ..., i] = x1 * c - x2 * sn
        out[b, s, ..., i + half] = x1 * sn + x2 * c
  return out


@pytest.mark.parametrize("shape", [(2, 5, 8), (2, 5, 3, 8)])
def test_rope_matches_numpy(shape):
  rng = np.random.default_rng(0)
  x = rng.normal(size=shape).astype(np.float32)
  positions = rng.integers(0, 1000, shape[:2])
  np.testing.assert_allclose(rope(jnp.asarray(x), jnp.asarray(positions)), numpy_rope(x, positions),
                             rtol=1e-4, atol=1e-4)


def test_rope_scores_depend_only_on_relative_position():
  rng = np.random.default_rng(1)
  q, k = rng.normal(size=(2, 1, 1, 16)).astype(np.float32)
  def score(pq, pk):
    rq = rope(jnp.asarray(q), jnp.array([[pq]]))
    rk = rope(jnp.asarray(k), jnp.array([[pk]]))
    return float(jnp.sum(rq * rk))
  assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-4)
  assert score(7, 3) != pytest.approx(score(7, 4), rel=1e-3)


def test_rms_norm_matches_numpy():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(3, 4, 16)).astype(np.float32) * 5
  w = rng.normal(size=(16,)).astype(np.float32)
  expected = w * x / np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(rms_norm(jnp.asarray(x), jnp.asarray(w)), expected, rtol=1e-5)
  # bf16 inputs are normalised in fp32 and returned in bf16
  out = rms_norm(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w))
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), expected, rtol=2e-2, atol=2e-2)


def test_layer_norm_matches_numpy():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 3, 8)).astype(np.float32) + 3
  ln = LayerNorm(8)
  ln.scale.set_value(jnp.asarray(rng.normal(size=8), jnp.float32))
  ln.bias.set_value(jnp.asarray(rng.normal(size=8), jnp.float32))
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  expected = (x - mu) / np.sqrt(var + 1e-5) * np.asarray(ln.scale[...]) + np.asarray(ln.bias[...])
  np.testing.assert_allclose(ln(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec,shapes", [
    ("bsd,df->bsf", [(2, 5, 6), (6, 7)]),                  # a projection
    ("bsgjv,gjvd->bsd", [(2, 5, 2, 3, 4), (2, 3, 4, 6)]),  # an output projection over heads
    ("btrgc,rgcjn->bgjrtn", [(2, 5, 2, 1, 4), (2, 1, 4, 3, 6)]),  # latent -> per-head keys
    ("bsgjn,bgjrtn->bgjsrt", [(2, 4, 1, 3, 6), (2, 1, 3, 2, 5, 6)]),  # scores, batch axes shared
])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_einsum_gradients_match_jax_autodiff(spec, shapes, dtype):
  """layers.einsum writes its own backward; JAX's autodiff of jnp.einsum is the reference."""
  import jax
  from mla_jax.layers import einsum
  rng = np.random.default_rng(0)
  a, b = (jnp.asarray(rng.normal(size=s), dtype) for s in shapes)
  out_shape = jnp.einsum(spec, a, b).shape
  cot = jnp.asarray(rng.normal(size=out_shape), dtype)
  ours = jax.grad(lambda a, b: jnp.vdot(einsum(spec, a, b).astype(jnp.float32), cot), argnums=(0, 1))(a, b)
  want = jax.grad(lambda a, b: jnp.vdot(jnp.einsum(spec, a, b).astype(jnp.float32), cot), argnums=(0, 1))(a, b)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  for got, ref in zip(ours, want):
    assert got.dtype == ref.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32), rtol=tol, atol=tol)
  np.testing.assert_array_equal(np.asarray(einsum(spec, a, b), np.float32),
                                np.asarray(jnp.einsum(spec, a, b), np.float32))
