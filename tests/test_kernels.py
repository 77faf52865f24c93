"""The Pallas decode kernels, in interpret mode on the CPU, against NumPy and the
XLA paths; the bytes the latent kernel loads, counted at run time; and the
lowering for CUDA (the Triton lowering runs here and rejects shapes the GPU
would reject). On a GPU: experiments/gpu_check.py."""
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from helpers import random_model, small_config
from mla_jax import quant, sharding, with_options
from mla_jax.generate import generate
from mla_jax.kernels import jax_decode
from mla_jax.kernels import latent_decode as K

PAGE = 16
LENGTHS = [1, 16, 17, 77]      # one key, a page exactly, one past a page boundary, a ragged tail

# The latent family as the kernel sees it: (latent blocks NB, rope queries NBr, heads per block)
# for h heads, and the block width for a total latent width d_c.
FAMILY = {"mla": lambda h: (1, 1, h), "gla2": lambda h: (2, 2, h // 2), "gla4": lambda h: (4, 4, h // 4),
          "mlra2": lambda h: (4, 2, h // 2), "mlra4": lambda h: (4, 1, h)}
BLOCKS = {"mla": 1, "gla2": 2, "gla4": 4, "mlra2": 4, "mlra4": 4}


def _full(cases, ci):
  """`cases`, those not in `ci` marked full."""
  return [c if c in ci else pytest.param(*(c if isinstance(c, tuple) else (c,)), marks=pytest.mark.full)
          for c in cases]


def _inputs(variant, heads, latent_dim, rope_dim, queries, dtype, paged, seed=0):
  """Random queries and a cache holding LENGTHS tokens (+ `queries` new ones at
  the end of each): dense [B, T, NB, L], or pools of PAGE-token pages handed out
  in shuffled order, with a spare null page 0 and a table padded with it."""
  nb, nbr, per_block = FAMILY[variant](heads)
  width = latent_dim // BLOCKS[variant]
  rng = np.random.default_rng(seed)
  b = len(LENGTHS)
  lens = np.array(LENGTHS) + queries - 1                            # tokens cached, the new ones included
  seq = int(lens.max()) + 5
  rows = queries * per_block
  q_lat = rng.normal(size=(b, nb, rows, width)) * width ** -0.5
  q_rope = rng.normal(size=(b, nbr, rows, rope_dim)) * 0.3 if rope_dim else None
  latent = rng.normal(size=(b, seq, nb, width))
  rope = rng.normal(size=(b, seq, rope_dim)) if rope_dim else None
  cast = lambda a: None if a is None else jnp.asarray(a, dtype)  # noqa: E731
  dense = tuple(np.asarray(cast(a), np.float64) if a is not None else None for a in (q_lat, q_rope, latent, rope))
  if not paged:
    return (cast(q_lat), cast(q_rope), cast(latent), cast(rope), jnp.asarray(lens, jnp.int32), None), dense
  width_pages = -(-seq // PAGE) + 1                                # one spare column: the null page
  order = rng.permutation(np.arange(1, b * (width_pages - 1) + 1))
  table = np.zeros((b, width_pages), np.int32)
  table[:, :-1] = order.reshape(b, width_pages - 1)
  pool = np.full((b * (width_pages - 1) + 1, PAGE, nb, width), 1e3)  # garbage everywhere no live token is
  rope_pool = np.full((pool.shape[0], PAGE, rope_dim), -1e3) if rope_dim else None
  for i in range(b):
    for t in range(seq):
      pool[table[i, t // PAGE], t % PAGE] = latent[i, t]
      if rope_dim:
        rope_pool[table[i, t // PAGE], t % PAGE] = rope[i, t]
  return (cast(q_lat), cast(q_rope), cast(pool), cast(rope_pool), jnp.asarray(lens, jnp.int32),
          jnp.asarray(table)), dense


def _numpy_attention(q_lat, q_rope, latent, rope, lens, queries, scale, probs_dtype=None):
  """Per sequence and block: scores against the latent and the (shared) rope key,
  query s of S seeing keys t <= len - S + s, softmax, the latent as the value.
  `probs_dtype`: round the probabilities to it before the value sum, as a
  kernel computing in that dtype must."""
  b, nb, rows, _ = q_lat.shape
  per_block = rows // queries
  out = np.zeros(q_lat.shape)
  lse = np.zeros(q_lat.shape[:3])
  for i in range(b):
    for j in range(nb):
      n = lens[i]
      s = q_lat[i, j] @ latent[i, :n, j].T
      if q_rope is not None:
        s = s + q_rope[i, j % q_rope.shape[1]] @ rope[i, :n].T
      s = s * scale
      last_seen = n - queries + np.arange(rows) // per_block
      s = np.where(np.arange(n)[None, :] <= last_seen[:, None], s, -np.inf)
      m = s.max(-1, keepdims=True)
      p = np.exp(s - m)
      lse[i, j] = np.log(p.sum(-1)) + m[:, 0]
      p = p / p.sum(-1, keepdims=True)
      if probs_dtype is not None:
        p = p.astype(probs_dtype).astype(np.float64)
      out[i, j] = p @ latent[i, :n, j]
  return out, lse


def check_kernel(variant, heads, latent_dim, rope_dim, queries, dtype, paged, seed=0):
  args, dense = _inputs(variant, heads, latent_dim, rope_dim, queries, dtype, paged, seed)
  scale = (128 + rope_dim) ** -0.5
  got, lse = K.latent_attention(*args, scale=scale, queries=queries, interpret=True)
  lens = np.asarray(args[4])
  want, want_lse = _numpy_attention(*dense, lens, queries, scale)
  assert got.shape == want.shape and lse.shape == want_lse.shape
  if dtype == jnp.float32:
    tol = 2e-5
  else:                   # what bf16 costs: the gap to a reference that rounds its probabilities to bf16
    rounded, _ = _numpy_attention(*dense, lens, queries, scale, probs_dtype=ml_dtypes.bfloat16)
    tol = 4 * np.abs(rounded - want).max()
    assert 1e-4 < tol < 5e-2
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=tol)
  np.testing.assert_allclose(np.asarray(lse), want_lse, rtol=0, atol=1e-4)


# CI: one case per family (one head count and width each, ragged lengths, paged and dense, one s_q > 1)
CI_KERNEL = [("mla", 16, 128, 64, 1, jnp.float32, True), ("gla2", 24, 128, 64, 3, jnp.bfloat16, False),
             ("mlra4", 24, 128, 64, 2, jnp.float32, True)]


@pytest.mark.parametrize("variant,heads,latent_dim,rope_dim,queries,dtype,paged", CI_KERNEL)
def test_kernel_matches_numpy(variant, heads, latent_dim, rope_dim, queries, dtype, paged):
  check_kernel(variant, heads, latent_dim, rope_dim, queries, dtype, paged)


# -m full: every family at 16, 24 and 128 heads, widths 512+64, 128+64 and a small 64+16,
# s_q 1-4 and paged / dense cycling through the cases, fp32 and bf16
FULL_KERNEL = [(v, h, d, r, 1 + i % 4, dt, i % 2 == 0)
               for i, (v, h, (d, r)) in enumerate((v, h, w) for v in FAMILY for h in (16, 24, 128)
                                                  for w in ((512, 64), (128, 64), (64, 16)))
               for dt in (jnp.float32, jnp.bfloat16)]


@pytest.mark.full
@pytest.mark.parametrize("variant,heads,latent_dim,rope_dim,queries,dtype,paged",
                         [c for c in FULL_KERNEL if c not in CI_KERNEL])
def test_kernel_matches_numpy_full(variant, heads, latent_dim, rope_dim, queries, dtype, paged):
  check_kernel(variant, heads, latent_dim, rope_dim, queries, dtype, paged)


def test_split_partials_each_cover_their_own_live_keys():
  """Splits cut each sequence's live tokens (not the cache's capacity) into
  disjoint stretches of whole tiles: every split's (o, m, l) is attention over
  its own stretch, and they recombine to attention over all."""
  args, dense = _inputs("mla", 16, 64, 16, 1, jnp.float32, paged=False, seed=1)
  scale, splits, block_k = 0.1, 3, 16
  context, lse, (o, m, l), plan = K.latent_attention_fn(*args, scale=scale, splits=splits, block_k=block_k,
                                                        interpret=True, return_partials=True)
  assert (plan.splits, plan.block_k) == (splits, block_k)
  q_lat, q_rope, latent, rope = dense
  for b, n in enumerate(np.asarray(args[4])):
    tiles = -(-n // block_k)
    per = -(-tiles // splits)
    covered = np.zeros(latent.shape[1], int)
    for s in range(splits):
      lo, hi = s * per * block_k, min((s + 1) * per * block_k, n)
      if hi <= lo:
        assert float(l[s, b].max()) == 0.0           # a split past the live tokens loads nothing
        continue
      covered[lo:hi] += 1
      scores = (q_lat[b, 0] @ latent[b, lo:hi, 0].T + q_rope[b, 0] @ rope[b, lo:hi].T) * scale
      p = np.exp(scores - scores.max(-1, keepdims=True))
      np.testing.assert_allclose(np.asarray(m[s, b, 0]), scores.max(-1), rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(np.asarray(l[s, b, 0]), p.sum(-1), rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(np.asarray(o[s, b, 0]), p @ latent[b, lo:hi, 0], rtol=1e-4, atol=1e-4)
    assert (covered[:n] == 1).all() and (covered[n:] == 0).all()
    if n <= block_k * (splits - 1):                   # a short sequence: its work is not piled on one split
      assert sum(float(l[s, b].max()) > 0 for s in range(splits)) == min(splits, tiles)


# ------------------------------------------------------------------ 8-bit caches


def _stored_8bit(args, fmt, rope_too):
  """`_inputs`' cache as an 8-bit cache stores it (mla_jax.quant: tiles of at most
  128, the rope key in bf16 unless `rope_too`): the kernel's arguments, and the
  values it holds as a dense float64 cache for the NumPy reference."""
  q_lat, q_rope, latent, rope, lens, table = args
  latent, latent_scales = quant.quantize(latent, quant.FORMATS[fmt], quant.tile_width(latent.shape[-1]))
  rope_scales = None
  if rope is not None:
    if rope_too:
      rope, rope_scales = quant.quantize(rope, quant.FORMATS[fmt], rope.shape[-1])
    else:
      rope = rope.astype(jnp.bfloat16)
  held = [np.asarray(quant.dequantized(a if s is None else quant.Quantized(a, s, a.shape[-1] // s.shape[-1]),
                                       jnp.float32), np.float64) if a is not None else None
          for a, s in ((latent, latent_scales), (rope, rope_scales))]
  if table is not None:                         # pools -> each sequence's tokens, as the table orders them
    held = [None if a is None else a[np.asarray(table)].reshape((table.shape[0], -1) + a.shape[2:]) for a in held]
  return (q_lat, q_rope, latent, rope, lens, table, latent_scales, rope_scales), held


def check_kernel_8bit(variant, heads, latent_dim, rope_dim, queries, fmt, paged, rope_too=False):
  args, dense = _inputs(variant, heads, latent_dim, rope_dim, queries, jnp.float32, paged)
  args, (latent, rope) = _stored_8bit(args, fmt, rope_too)
  scale = (128 + rope_dim) ** -0.5
  got, lse = K.latent_attention(*args, scale=scale, queries=queries, interpret=True)
  want, want_lse = _numpy_attention(dense[0], dense[1], latent, rope, np.asarray(args[4]), queries, scale)
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-5)
  np.testing.assert_allclose(np.asarray(lse), want_lse, rtol=0, atol=1e-4)


# CI: a latent of two scale tiles (256) paged, MLRA-4's blocks, a quantized rope key, several queries
CI_8BIT = [("mla", 16, 256, 64, 1, "fp8", True, False), ("mlra4", 24, 128, 64, 2, "int8", False, False),
           ("gla2", 16, 128, 32, 1, "int8", True, True)]
FULL_8BIT = [(v, h, d, r, 1 + i % 3, fmt, i % 2 == 0, i % 3 == 0)
             for i, (v, h, (d, r)) in enumerate((v, h, w) for v in FAMILY for h in (16, 24)
                                                for w in ((512, 64), (128, 64), (64, 16)))
             for fmt in ("fp8", "int8")]


@pytest.mark.parametrize("variant,heads,latent_dim,rope_dim,queries,fmt,paged,rope_too",
                         _full(CI_8BIT + [c for c in FULL_8BIT if c not in CI_8BIT], CI_8BIT))
def test_kernel_over_an_8bit_cache_matches_numpy_over_its_values(variant, heads, latent_dim, rope_dim, queries,
                                                                 fmt, paged, rope_too):
  """Dequantized per tile where it is loaded, in the queries' fp32: the kernel
  adds no error beyond the values the cache holds."""
  check_kernel_8bit(variant, heads, latent_dim, rope_dim, queries, fmt, paged, rope_too)


@pytest.mark.parametrize("variant,heads,latent_dim,rope_dim,paged,fmt", _full(
    [("mla", 128, 512, 64, True, "fp8"), ("mlra4", 24, 512, 64, False, "int8"), ("mla", 128, 512, 64, True, "int8"),
     ("mlra4", 24, 512, 64, False, "fp8")], [("mla", 128, 512, 64, True, "fp8"), ("mlra4", 24, 512, 64, False, "int8")]))
def test_kernel_over_an_8bit_cache_lowers_for_cuda(variant, heads, latent_dim, rope_dim, paged, fmt):
  """bf16 queries over fp8/int8 tiles with fp32 scales (FlashMLA's layout at DeepSeek's shape)."""
  args, _ = _inputs(variant, heads, latent_dim, rope_dim, 1, jnp.bfloat16, paged)
  args, _ = _stored_8bit(tuple(a if a is None or i in (0, 1, 4, 5) else a.astype(jnp.float32)
                               for i, a in enumerate(args)), fmt, rope_too=False)
  shapes = [None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
  fn = functools.partial(K.latent_attention_fn, scale=0.1, queries=1)
  assert "__gpu$xla.gpu.triton" in _cuda_lowering(fn, *shapes)


# ------------------------------------------------------------------ bytes loaded


def _loads(variant, heads, latent_dim, rope_dim, dtype, paged, **kw):
  args, _ = _inputs(variant, heads, latent_dim, rope_dim, 1, dtype, paged, seed=3)
  with K.counting_loads() as tally:
    out = K.latent_attention_fn(*args, scale=0.1, interpret=True, return_partials=True, **kw)
    jax.block_until_ready(out)
    jax.effects_barrier()
  nb, nbr, per_block = FAMILY[variant](heads)
  width = latent_dim // BLOCKS[variant]
  live = int(np.asarray(args[4]).sum())
  cache_bytes = live * (nb * width + rope_dim) * jnp.dtype(dtype).itemsize
  plan = out[3]
  padded = plan.rows * plan.row_tiles
  query_bytes = len(LENGTHS) * (nb * width + nbr * rope_dim) * padded * jnp.dtype(dtype).itemsize
  return tally, cache_bytes, query_bytes, plan


@pytest.mark.parametrize("variant,heads,latent_dim,paged", [("mla", 24, 128, True), ("mla", 128, 128, False),
                                                             ("mlra4", 24, 512, True)])
def test_each_live_cache_byte_is_loaded_once(variant, heads, latent_dim, paged):
  """Counted at run time (every load's touched bytes, masked-off elements not
  read): the kernel loads the live tokens' cache bytes exactly once per step,
  and its queries once per program (one program per sequence here)."""
  tally, cache_bytes, query_bytes, plan = _loads(variant, heads, latent_dim, 64, jnp.float32, paged, splits=1)
  assert plan.row_tiles == 1
  assert tally["cache"] == cache_bytes
  assert tally["query"] == query_bytes
  # with splits the cache is still loaded once; each split loads the queries again
  tally, cache_bytes, query_bytes, plan = _loads(variant, heads, latent_dim, 64, jnp.float32, paged, splits=3)
  assert tally["cache"] == cache_bytes and tally["query"] == 3 * query_bytes


def test_head_tiles_load_the_cache_once_per_tile():
  """The count is sensitive: 16-row head tiles (the first kernel's layout) load
  MLA's latent twice at 24 heads; and MLA at 128 heads x 512 in bf16 takes two
  64-row tiles, since an H200 refused 128 rows (262,144 bytes of shared memory
  for the accumulator; results/gpu/), so its cache is loaded twice there."""
  tally, cache_bytes, _, plan = _loads("mla", 24, 128, 64, jnp.float32, True, splits=1, max_rows=16)
  assert plan.row_tiles == 2 and tally["cache"] == 2 * cache_bytes
  p = K.plan(blocks=1, rows=128, width=512, rope_dim=64, itemsize=2, batch=1, capacity=4096, page_size=64, sms=132)
  assert (p.rows, p.row_tiles) == (64, 2)
  assert K.smem_bytes(1, 128, 512, 64, 2, 16) >= 262_144 > K.SMEM_LIMIT


# ------------------------------------------------------------------ CUDA lowering and budgets


def _cuda_lowering(fn, *args):
  exported = jax.export.export(
      jax.jit(fn), platforms=("cuda",),
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
  return exported.mlir_module()


LOWERING = [("mla", 128, 512, 64), ("mla", 24, 512, 64), ("mlra4", 24, 512, 64), ("gla2", 24, 512, 64),
            ("mlra2", 16, 128, 64), ("gla4", 128, 128, 64), ("mla", 16, 128, 0)]


@pytest.mark.parametrize("paged,queries", [(True, 1), (False, 3)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("variant,heads,latent_dim,rope_dim", LOWERING)
def test_kernel_lowers_for_cuda(variant, heads, latent_dim, rope_dim, dtype, paged, queries):
  args, _ = _inputs(variant, heads, latent_dim, rope_dim, queries, dtype, paged)
  shapes = [None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
  fn = functools.partial(K.latent_attention_fn, scale=0.1, queries=queries)
  assert "__gpu$xla.gpu.triton" in _cuda_lowering(fn, *shapes)


def test_triton_lowering_rejects_non_power_of_two_tiles():
  """The check above is real: a 24-row tile is refused by the Triton lowering."""
  args, _ = _inputs("mla", 24, 128, 64, 1, jnp.bfloat16, False)
  shapes = [None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
  plan = K.plan(blocks=1, rows=24, width=128, rope_dim=64, itemsize=2, batch=4, capacity=100)
  with pytest.raises(Exception, match="power of 2"):
    # smuggle a 24-row tile past the plan
    orig = K.plan
    K.plan = lambda **kw: K.Plan(**{**vars(plan), "rows": 24})
    try:
      _cuda_lowering(functools.partial(K.latent_attention_fn, scale=0.1), *shapes)
    finally:
      K.plan = orig
  with pytest.raises(ValueError, match="latent block width 96 is not a power of 2"):
    K.latent_attention(*_inputs("mla", 16, 96, 64, 1, jnp.float32, False)[0], scale=0.1, interpret=True)
  with pytest.raises(ValueError, match="page size 8 is not a power of 2 >= 16"):
    q_lat, q_rope, latent, rope, lens, _ = _inputs("mla", 16, 64, 16, 1, jnp.float32, False)[0]
    K.latent_attention(q_lat, q_rope, latent.reshape(-1, 8, 1, 64)[:20], rope.reshape(-1, 8, 16)[:20], lens,
                       jnp.zeros((4, 3), jnp.int32), scale=0.1, interpret=True)


@pytest.mark.parametrize("variant,heads,latent_dim,rope_dim", LOWERING)
@pytest.mark.parametrize("itemsize", [2, 4])
def test_plans_stay_within_the_shared_memory_and_register_budgets(variant, heads, latent_dim, rope_dim, itemsize):
  nb, _, per_block = FAMILY[variant](heads)
  width = latent_dim // BLOCKS[variant]
  for queries in (1, 4):
    p = K.plan(blocks=nb, rows=queries * per_block, width=width, rope_dim=rope_dim, itemsize=itemsize, batch=8,
               capacity=8192, page_size=64, sms=132)
    assert K.smem_bytes(nb, p.rows, width, rope_dim, itemsize, p.block_k) <= K.SMEM_BUDGET < K.SMEM_LIMIT
    assert nb * p.rows * width <= K.ACC_BUDGET or p.rows == 16
    assert p.rows * p.row_tiles >= queries * per_block and 64 % p.block_k == 0
    # splits: enough programs for 132 multiprocessors, never more than 64 or than capacity allows
    assert 1 <= p.splits <= 64 and (8 * p.row_tiles * p.splits <= 132 or p.splits == 1)


# ------------------------------------------------------------------ through the model


def _kernel_config(variant, **kw):
  # power-of-2 widths of 16 or more, as the Triton kernels need
  if variant in ("mla", "gla2", "mlra2", "mlra4"):
    return small_config(variant, kv_lora_rank=64, qk_nope_head_dim=16, qk_rope_head_dim=16, **kw)
  if variant == "mfa":
    return small_config(variant, head_dim=16, **kw)
  return small_config(variant, head_dim=16, **kw)


# CI: one latent (MLA), one MLRA, one JAX-op (GQA) family; the rest behind -m full
@pytest.mark.parametrize("variant", _full(["mla", "gla2", "mlra2", "mlra4", "gqa", "mqa", "mfa"],
                                          ["mla", "mlra4", "gqa"]))
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


@pytest.mark.parametrize("variant,mesh_spec", _full([("mlra4", "tensor:4"), ("mlra4", "data:2,tensor:4"),
                                                     ("mla", "tensor:4"), ("gla2", "tensor:4"), ("gqa", "tensor:2")],
                                                    [("mlra4", "tensor:4"), ("gqa", "tensor:2")]))
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
                        "--bench_batches=2", "--bench_contexts=64", "--bench_steps=2", "--bench_warmup=1",
                        "--bench_cache_dtypes=float32,int8"],
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  lines = {tuple(line.split()[:2]): line for line in out.stdout.splitlines() if line.split()[:1] in
           (["naive"], ["absorbed"], ["pallas"])}
  # 2 layers x 2 sequences x 64 slots x 80 elements x 4 bytes (fp32) = 80 KiB of cache per step; in int8
  # 64 latent values, a scale and the 16-wide rope key in bf16 per token: 100 bytes, 25 KiB
  assert "80.0 KiB" in lines[("absorbed", "float32")] and "80.0 KiB" in lines[("naive", "float32")]
  assert "25.0 KiB" in lines[("absorbed", "int8")] and "25.0 KiB" in lines[("naive", "int8")]
  lines = {impl: line for (impl, cache), line in lines.items() if cache == "int8"}
  assert "skipped: no GPU" in lines["pallas"]


@pytest.mark.full
def test_gpu_check_script_runs_in_interpret_mode(tmp_path):
  """The prepared GPU check runs from the working tree (PYTHONPATH=., nothing from
  mla_jax.data) and exits 0 with its report; on a CPU in interpret mode."""
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-m", "experiments.gpu_check", "--interpret", f"--out={tmp_path / 'r.txt'}"],
                       cwd=root, env={**os.environ, "PYTHONPATH": "."}, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
  report = (tmp_path / "r.txt").read_text()
  assert "correctness: all configurations agree" in report
  assert "GLA-2 TP-4 shard 256+64" in report and "JAX paged GQA" in report


def test_gpu_check_imports_nothing_the_gpu_machine_lacks():
  """The GPU machine has jax, flax and optax but no grain or tfds: the check
  must not import mla_jax.data."""
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  code = ("import sys, experiments.gpu_check; bad = [m for m in sys.modules if m.startswith(('mla_jax.data', "
          "'grain', 'tensorflow_datasets', 'sentencepiece', 'orbax'))]; print(bad); sys.exit(bool(bad))")
  out = subprocess.run([sys.executable, "-c", code], cwd=root, env={**os.environ, "PYTHONPATH": "."},
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stdout + out.stderr
