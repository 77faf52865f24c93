"""The Pallas decode kernels, in interpret mode on the CPU, against the XLA paths;
and their lowering for CUDA (the Triton lowering runs here and rejects shapes
the GPU would reject)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import random_model, small_config
from mla_jax import sharding, with_options
from mla_jax.generate import generate
from mla_jax.kernels import jax_decode
from mla_jax.kernels import latent_decode as K

SEQ = 160                     # not a multiple of the 64-token tile: the tail is a masked load
LENGTHS = [1, 77, SEQ]        # one key, a non-multiple of the tile, the whole cache

# (name, blocks NB, heads per block HB, latent width L, rope width R)
SHAPES = [("mla-16h", 1, 16, 512, 64), ("mla-24h", 1, 24, 512, 64), ("mla-64h", 1, 64, 512, 64),
          ("mla-128h", 1, 128, 512, 64), ("mlra-4x128", 4, 24, 128, 64), ("gla-2x256", 2, 12, 256, 64),
          ("no-rope", 1, 16, 128, 0)]


def _inputs(nb, hb, width, rope_dim, dtype, seed=0):
  rng = np.random.default_rng(seed)
  b = len(LENGTHS)
  arr = lambda shape, s=1.0: jnp.asarray(rng.normal(size=shape) * s, dtype)  # noqa: E731
  q_lat, latent = arr((b, nb, hb, width), 0.05), arr((b, SEQ, nb, width))
  q_rope = arr((b, nb, hb, rope_dim), 0.2) if rope_dim else None
  rope = arr((b, SEQ, rope_dim)) if rope_dim else None
  return q_lat, q_rope, latent, rope, jnp.asarray(LENGTHS, jnp.int32)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("name,nb,hb,width,rope_dim", SHAPES)
def test_kernel_matches_reference(name, nb, hb, width, rope_dim, dtype, tol):
  args = _inputs(nb, hb, width, rope_dim, dtype)
  scale = 1.0 / np.sqrt(128 + rope_dim)
  got, lse = K.latent_decode(*args, scale=scale, k_splits=3, interpret=True)
  want, want_lse = K.reference(*args, scale=scale)
  assert got.shape == (len(LENGTHS), nb, hb, width)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=tol, atol=tol)
  np.testing.assert_allclose(np.asarray(lse), np.asarray(want_lse), rtol=tol, atol=tol)


def test_split_k_partials_each_cover_their_own_keys():
  """Every split attends exactly its own stretch of the cache; the stretches tile
  [0, kv_len) without overlap, and their log-sum-exps recombine to the whole."""
  args = _inputs(1, 16, 128, 64, jnp.float32, seed=1)
  scale, splits, block_k = 0.1, 4, 16
  context, lse, (o, m, l) = K.latent_decode(*args, scale=scale, k_splits=splits, block_k=block_k,
                                            interpret=True, return_partials=True)
  one, one_lse = K.latent_decode(*args, scale=scale, k_splits=1, interpret=True)
  np.testing.assert_allclose(np.asarray(context), np.asarray(one), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(lse), np.asarray(one_lse), rtol=1e-5, atol=1e-6)
  split_len = -(-(-(-SEQ // splits)) // block_k) * block_k
  q_lat, q_rope, latent, rope, kv_len = args
  for b, n in enumerate(LENGTHS):
    covered = np.zeros(SEQ, int)
    for s in range(splits):
      lo, hi = s * split_len, min((s + 1) * split_len, n)
      if hi <= lo:
        assert float(l[s, b].max()) == 0.0           # a split past the end loads nothing
        continue
      covered[lo:hi] += 1
      sl = slice(lo, hi)
      scores = (np.einsum("hl,tl->ht", q_lat[b, 0], latent[b, sl, 0]) +
                np.einsum("hr,tr->ht", q_rope[b, 0], rope[b, sl])) * scale
      m_ref = scores.max(-1)
      p = np.exp(scores - m_ref[:, None])
      np.testing.assert_allclose(np.asarray(m[s, b, 0]), m_ref, rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(np.asarray(l[s, b, 0]), p.sum(-1), rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(np.asarray(o[s, b, 0]), p @ np.asarray(latent[b, sl, 0]), rtol=1e-4, atol=1e-4)
    assert (covered[:n] == 1).all() and (covered[n:] == 0).all()


def _cuda_lowering(fn, *args):
  exported = jax.export.export(
      jax.jit(fn), platforms=("cuda",),
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
  return exported.mlir_module()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name,nb,hb,width,rope_dim", SHAPES)
def test_kernel_lowers_for_cuda(name, nb, hb, width, rope_dim, dtype):
  args = [jax.ShapeDtypeStruct(a.shape, a.dtype) if a is not None else None
          for a in _inputs(nb, hb, width, rope_dim, dtype)]
  fn = functools.partial(K.latent_decode, scale=0.1, k_splits=3)
  assert "__gpu$xla.gpu.triton" in _cuda_lowering(fn, *args)


def test_triton_lowering_rejects_non_power_of_two_tiles():
  """The check above is real: a 24-row tile is refused by the Triton lowering."""
  args = [jax.ShapeDtypeStruct(a.shape, a.dtype) if a is not None else None
          for a in _inputs(1, 24, 512, 64, jnp.bfloat16)]
  with pytest.raises(Exception, match="power of 2"):
    _cuda_lowering(functools.partial(K.latent_decode, scale=0.1, block_h=24), *args)
  with pytest.raises(ValueError, match="latent block width 96 is not a power of 2"):
    K.latent_decode(*_inputs(1, 16, 96, 64, jnp.float32), scale=0.1, interpret=True)


def test_shared_memory_budget_picks_the_tile():
  assert K.choose_block_k(512, 64, 2, 16) == 64              # bf16 MLA: 2 x 64 x 576 x 2 B fits
  assert K.choose_block_k(512, 64, 4, 16) == 32              # fp32 halves the tile
  for itemsize in (2, 4):
    bk = K.choose_block_k(512, 64, itemsize, 16)
    assert K.NUM_STAGES * bk * 576 * itemsize + 16 * 576 * itemsize <= K.SMEM_BUDGET < 228 * 1024


# ------------------------------------------------------------------ through the model


def _kernel_config(variant, **kw):
  # power-of-2 widths of 16 or more, as the Triton kernels need
  if variant in ("mla", "gla2", "mlra2", "mlra4"):
    return small_config(variant, kv_lora_rank=64, qk_nope_head_dim=16, qk_rope_head_dim=16, **kw)
  if variant == "mfa":
    return small_config(variant, head_dim=16, **kw)
  return small_config(variant, head_dim=16, **kw)


@pytest.mark.parametrize("variant", ["mla", "gla2", "mlra2", "mlra4", "gqa", "mqa", "mfa"])
def test_pallas_decode_generates_like_xla(variant):
  model = random_model(_kernel_config(variant), seed=2)
  rng = np.random.default_rng(0)
  prompts = rng.integers(0, model.config.vocab_size, (3, 8)).astype(np.int32)
  lens = np.array([8, 1, 5])
  # cache of 8 + 24 = 32 slots: JAX's GQA/MQA ops need multiples of 16
  a = generate(with_options(model, decode_impl="absorbed"), prompts, lens, max_new_tokens=24)
  b = generate(with_options(model, decode_impl="pallas"), prompts, lens, max_new_tokens=24)
  np.testing.assert_array_equal(a.tokens, b.tokens)


@pytest.mark.parametrize("variant", ["mla", "mlra4", "gqa"])
def test_pallas_decode_step_matches_forward(variant):
  from test_decode import check_decode_matches_forward
  import test_decode
  old = test_decode.SEQ
  test_decode.SEQ = 16                                   # 16 cache slots for JAX's GQA op
  try:
    check_decode_matches_forward(_kernel_config(variant), "pallas")
  finally:
    test_decode.SEQ = old


@pytest.mark.parametrize("variant,mesh_spec", [("mlra4", "tensor:4"), ("mlra4", "data:2,tensor:4"),
                                               ("mla", "tensor:4"), ("gla2", "tensor:4"),
                                               ("gqa", "tensor:2")])
def test_pallas_decode_runs_per_device_under_a_mesh(variant, mesh_spec):
  """Under TP the kernel runs through shard_map on each device's own blocks / heads."""
  config = _kernel_config(variant, vocab=64, num_heads=8)
  model = random_model(config, seed=3)
  rng = np.random.default_rng(1)
  prompts, lens = rng.integers(0, 64, (8, 8)).astype(np.int32), rng.integers(1, 9, 8)
  want = generate(with_options(model, decode_impl="absorbed"), prompts, lens, max_new_tokens=8)
  mesh = sharding.make_mesh(mesh_spec, config)
  sharded = sharding.shard_module(random_model(config, seed=3), mesh)
  with sharding.use_mesh(mesh):
    got = generate(with_options(sharded, decode_impl="pallas"), prompts, lens, max_new_tokens=8)
  np.testing.assert_array_equal(got.tokens, want.tokens)


def test_auto_and_unsupported():
  gta = random_model(small_config("gta"))
  with pytest.raises(ValueError, match="decode_impl='pallas' cannot run here: .*no Pallas decode kernel for it"):
    generate(with_options(gta, decode_impl="pallas"), [[1, 2, 3]], [3], max_new_tokens=2)
  tpa = random_model(small_config("tpa"))
  with pytest.raises(ValueError, match="decode_impl='pallas' cannot run here: tpa decodes from its cached factors"):
    generate(with_options(tpa, decode_impl="pallas"), [[1, 2, 3]], [3], max_new_tokens=2)
  # 'auto' on a CPU is the XLA absorbed path
  model = random_model(small_config("mla"))
  a = generate(with_options(model, decode_impl="auto"), [[1, 2, 3]], [3], max_new_tokens=5)
  b = generate(with_options(model, decode_impl="absorbed"), [[1, 2, 3]], [3], max_new_tokens=5)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert jax_decode.plan(100, 64)[1] == "a cache of 100 slots does not split into 16-token tiles (use a multiple of 16)"
  assert jax_decode.plan(128, 64)[0] == (8, 16)


def test_bench_decode_command():
  import subprocess
  import sys
  out = subprocess.run([sys.executable, "-m", "experiments.run", "--mode=bench_decode", "--variant=mla",
                        "--d_model=64", "--num_heads=4", "--head_dim=16", "--q_lora_rank=32",
                        "--kv_lora_rank=64", "--rope_head_dim=16", "--mlp_dim=128", "--vocab_size=256",
                        "--bench_batches=2", "--bench_contexts=64", "--bench_steps=2", "--bench_warmup=1"],
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  lines = {line.split()[0]: line for line in out.stdout.splitlines() if line.split()[:1] in
           (["naive"], ["absorbed"], ["pallas"])}
  # 2 layers x 2 sequences x 64 slots x 80 elements x 4 bytes (fp32) = 80 KiB of cache per step
  assert "80.0 KiB" in lines["absorbed"] and "80.0 KiB" in lines["naive"]
  assert "skipped: no GPU" in lines["pallas"]
