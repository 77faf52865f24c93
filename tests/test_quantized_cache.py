"""8-bit KV caches (fp8 e4m3, int8) in every variant's decode path.

The property each test checks: attention over a quantized cache adds no error
beyond the values it stores. The reference is the fp32 XLA path (the one every
other decode test checks against a full forward) over an fp32 cache holding
the same dequantized values; every parameter is random and rows are ragged.
Round-trip bounds per format are tests/test_quant.py's.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import random_model, small_config
from mla_jax import quant, sharding, with_options
from mla_jax.attention import core
from mla_jax.attention.base import as_read, init_cache, stored
from mla_jax.paging import PagePool
from test_paged_step import _dense_step, kernel_config
from test_paged_step import _step as _paged_step
from test_sharding import _decode, _prefill

# One variant per family (the latent family twice: one latent, and MLRA-4's blocks).
FAMILIES = ("mla", "mlra4", "gqa", "gta", "tpa", "mfa")
EIGHT_BIT = ("fp8", "int8")
OTHERS = ("mha", "mqa", "gla2", "gla4", "mlra2")


def _layer(variant, fmt, seed=0, **options):
  model = random_model(small_config(variant, layers=1), seed, cache_dtype=fmt, **options)
  return model.layers[0].attn


def _filled(attn, batch, length, fmt, seed=0):
  """A cache whose every slot holds random entries of mixed magnitudes (1e-2 .. 10
  per token), stored as `fmt` stores them."""
  rng = np.random.default_rng(seed)
  entries = {}
  for name, (shape, _) in attn.config.cache_spec().items():
    magnitude = 10.0 ** rng.uniform(-2, 1, (batch, length) + (1,) * len(shape))
    entries[name] = jnp.asarray(rng.standard_normal((batch, length) + tuple(shape)) * magnitude, jnp.float32)
  return stored(entries, init_cache(attn.config, batch, length, fmt))


def _dequantized(cache):
  """The fp32 cache holding the values `cache` stores."""
  return {name: quant.dequantized(a, jnp.float32) for name, a in as_read(cache).items()}


@nnx.jit
def _step(attn, x, cache, lengths):
  return attn.step(x, cache, lengths)


@nnx.jit
def _attend(attn, x, positions, kv, kv_len):
  return attn.attend(x, positions, kv, kv_len)


def check_against_fp32_values(variant, fmt, queries, decode_impl="absorbed"):
  attn = _layer(variant, fmt, decode_impl=decode_impl)
  length = 2 * core.KEY_CHUNK + 76          # the XLA loop: two whole chunks of keys and a remainder
  lengths = jnp.asarray([0, 700, length - queries], jnp.int32)     # ragged; 700 crosses a chunk boundary
  cache = _filled(attn, 3, length, fmt)
  layout = {name: a.dtype for name, a in cache.items()}
  x = jax.random.normal(jax.random.key(1), (3, queries, attn.d_model), jnp.float32)
  y, new = _step(attn, x, cache, lengths)
  assert {name: a.dtype for name, a in new.items()} == layout
  positions = lengths[:, None] + jnp.arange(queries)
  want = _attend(attn, x, positions, _dequantized(new), lengths + queries)
  # two fp32 forms of one attention (absorbed step, naive attend) over entries up to 10: their
  # rounding scales with the outputs' size, not with each element's
  want = np.asarray(want)
  np.testing.assert_allclose(np.asarray(y), want, rtol=2e-5, atol=2e-5 * max(1.0, np.abs(want).max()),
                             err_msg=f"{variant} {fmt}")
  # the new tokens were written where they belong, within the format's step (one row's largest over 127
  # for int8, 2^-4 relative for fp8; a stored value may round the other way than an un-jitted recompute)
  exact = attn.cache_entries(x, positions)
  written = _dequantized(new)
  rows = jnp.arange(3)[:, None]
  for name, a in exact.items():
    a = np.asarray(a, np.float32)
    bound = 2.0 ** -4 * np.abs(a) + np.abs(a).max(-1, keepdims=True) / 127 + 1e-6
    assert np.all(np.abs(np.asarray(written[name][rows, positions]) - a) <= bound), name


@pytest.mark.parametrize("fmt", EIGHT_BIT)
@pytest.mark.parametrize("variant", FAMILIES)
def test_decode_over_a_quantized_cache_equals_fp32_attention_over_its_values(variant, fmt):
  check_against_fp32_values(variant, fmt, queries=1)


@pytest.mark.parametrize("variant,fmt", [("mla", "int8"), pytest.param("gqa", "fp8", marks=pytest.mark.full)])
def test_several_query_tokens_over_a_quantized_cache(variant, fmt):
  check_against_fp32_values(variant, fmt, queries=3)


@pytest.mark.full
@pytest.mark.parametrize("queries", [1, 4])
@pytest.mark.parametrize("fmt", EIGHT_BIT)
@pytest.mark.parametrize("variant", FAMILIES + OTHERS)
def test_every_variant_format_and_width_against_fp32_values(variant, fmt, queries):
  check_against_fp32_values(variant, fmt, queries)


@pytest.mark.full
@pytest.mark.parametrize("fmt", EIGHT_BIT)
@pytest.mark.parametrize("variant", ["mla", "mlra4", "tpa"])
def test_the_naive_form_over_a_quantized_cache(variant, fmt):
  check_against_fp32_values(variant, fmt, queries=1, decode_impl="naive")


def _temp_bytes(attn, cache, batch):
  x = jax.ShapeDtypeStruct((batch, 1, attn.d_model), jnp.float32)
  lengths = jax.ShapeDtypeStruct((batch,), jnp.int32)
  graphdef, state = nnx.split(attn)
  step = jax.jit(lambda state, x, cache, lengths: nnx.merge(graphdef, state).step(x, cache, lengths),
                 donate_argnums=(2,))
  return step.lower(state, x, cache, lengths).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("variant", ["mla", "tpa", pytest.param("gqa", marks=pytest.mark.full)])
def test_a_compiled_decode_step_holds_no_dequantized_copy_of_the_cache(variant, monkeypatch):
  batch, length = 4, 8 * core.KEY_CHUNK
  attn = _layer(variant, "int8")
  cache = jax.eval_shape(lambda: init_cache(attn.config, batch, length, "int8"))
  dequantized = sum(a.size * 4 for name, a in cache.items() if not name.endswith(quant.SCALE))
  chunked = _temp_bytes(attn, cache, batch)       # at most a (transposed) copy of the 8-bit cache, and a chunk
  assert chunked < dequantized, (chunked, dequantized)
  # the bound means something: read in one piece, XLA materialises the float copy
  monkeypatch.setattr(core, "KEY_CHUNK", length)
  whole = _temp_bytes(attn, cache, batch)
  assert whole >= dequantized and chunked < whole / 1.5, (chunked, whole, dequantized)


def check_paged_matches_dense(variant, fmt, decode_impl="absorbed", page_size=4):
  """Steps of 3, 1 and 2 tokens over shuffled pages == the same steps over a
  dense cache through the XLA absorbed path (with decode_impl='pallas': the
  latent kernel reads the pages, in interpret mode)."""
  # one layer: a second layer's entries come from the first's output, and a last-bit difference there
  # can round an fp8 value a whole step the other way (2^-4 relative), which no fp32 tolerance covers
  config = (kernel_config if decode_impl == "pallas" else small_config)(variant, layers=1)
  model = random_model(config, 0, decode_impl=decode_impl, cache_dtype=fmt)
  xla = with_options(model, decode_impl="absorbed")
  rng = np.random.default_rng(0)
  lengths = np.asarray([5, 0, 9], np.int32)
  width = 6
  pool = PagePool(3 * width + 1, page_size, order=rng.permutation(np.arange(1, 3 * width + 1)).tolist())
  pools, dense = model.init_pages(pool.num_pages, page_size), model.init_cache(3, width * page_size)
  for b, n in enumerate(lengths):          # the first tokens of each row: written densely and paged alike
    pool.reserve(b, int(n))
  for s in (3, 1, 2):
    for b in range(3):
      pool.reserve(b, int(lengths[b] + s))
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (3, s)), jnp.int32)
    got, pools = _paged_step(model, tokens, pools, jnp.asarray(lengths), jnp.asarray(pool.table(range(3), width)))
    want, dense = _dense_step(xla, tokens, dense, jnp.asarray(lengths))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5,
                               err_msg=f"{variant} {fmt} step of {s}")
    lengths = lengths + s


@pytest.mark.parametrize("variant,fmt", [("gqa", "fp8")])     # the latent kernel's test below reads MLA's int8 pages
def test_paged_quantized_cache_matches_dense(variant, fmt):
  check_paged_matches_dense(variant, fmt)


@pytest.mark.full
@pytest.mark.parametrize("fmt", EIGHT_BIT)
@pytest.mark.parametrize("variant", FAMILIES + OTHERS)
def test_paged_quantized_cache_matches_dense_every_variant(variant, fmt):
  check_paged_matches_dense(variant, fmt)


@pytest.mark.parametrize("fmt,variant,page_size", [("int8", "mla", 16), pytest.param("fp8", "mlra4", 32,
                                                                                      marks=pytest.mark.full)])
def test_the_latent_kernel_over_quantized_pages_matches_xla(variant, fmt, page_size):
  check_paged_matches_dense(variant, fmt, "pallas", page_size)


@pytest.mark.full
@pytest.mark.parametrize("fmt", EIGHT_BIT)
@pytest.mark.parametrize("variant", ["mla", "gla2", "gla4", "mlra2", "mlra4"])
def test_the_latent_kernel_over_quantized_pages_matches_xla_every_variant(variant, fmt):
  check_paged_matches_dense(variant, fmt, "pallas", 16)


def _generate_logits(model, tokens, prompt_lens):
  logits, cache = _prefill(model, tokens[:, :int(prompt_lens.max())], tokens.shape[1])
  lengths, out = jnp.asarray(prompt_lens, jnp.int32), [logits]
  for _ in range(3):
    step, cache = _decode(model, tokens[jnp.arange(tokens.shape[0]), lengths], cache, lengths)
    out.append(step)
    lengths = lengths + 1
  return out


def check_sharded_matches_unsharded(variant, fmt, mesh_spec="tensor:4", decode_impl="absorbed"):
  heads = dict(num_heads=8, num_kv_heads=4) if variant in ("gqa", "gta") else dict(num_heads=8)
  config = (kernel_config if decode_impl == "pallas" else small_config)(variant, vocab=64, layers=1, **heads)
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(0, config.vocab_size, (4, 12)), jnp.int32)
  prompt_lens = rng.integers(2, 8, 4)
  want = _generate_logits(random_model(config, decode_impl="absorbed", cache_dtype=fmt), tokens, prompt_lens)
  mesh = sharding.make_mesh(mesh_spec, config)
  model = sharding.shard_module(random_model(config, decode_impl=decode_impl, cache_dtype=fmt), mesh)
  with sharding.use_mesh(mesh):
    got = _generate_logits(model, tokens, prompt_lens)
  for i, (g, w) in enumerate(zip(got, want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-4,
                               err_msg=f"{variant} {fmt} on {mesh_spec}: {'prefill' if i == 0 else f'step {i}'}")


@pytest.mark.parametrize("fmt", [pytest.param("fp8", marks=pytest.mark.full), "int8"])
def test_tensor_parallel_quantized_cache_matches_unsharded(fmt):
  check_sharded_matches_unsharded("mlra4", fmt)


@pytest.mark.parametrize("fmt", [pytest.param("fp8", marks=pytest.mark.full), "int8"])
def test_the_latent_kernel_per_device_over_a_quantized_cache_matches_unsharded_xla(fmt):
  """tensor:4: each device's kernel reads its own MLRA-4 blocks and their scales."""
  check_sharded_matches_unsharded("mlra4", fmt, decode_impl="pallas")


@pytest.mark.full
@pytest.mark.parametrize("fmt", EIGHT_BIT)
@pytest.mark.parametrize("variant", FAMILIES)
def test_tensor_parallel_quantized_cache_matches_unsharded_every_family(variant, fmt):
  check_sharded_matches_unsharded(variant, fmt)


# ------------------------------------------------------------------ formats, flags, devices


def test_format_spellings_and_the_rope_key_flag():
  from mla_jax import RunOptions
  assert [RunOptions(cache_dtype=n).cache_dtype for n in ("bf16", "fp32", "e4m3", "int8")] == \
      ["bfloat16", "float32", "fp8", "int8"]
  assert RunOptions(cache_dtype="fp8").cache_format == quant.FORMATS["fp8"]
  assert RunOptions(cache_dtype="int8", quantize_rope_key=True).cache_format.rope_key
  assert not RunOptions(cache_dtype="bfloat16", quantize_rope_key=True).cache_format.scaled
  with pytest.raises(ValueError, match="unknown cache_dtype 'int4'; choose one of auto, float32, bfloat16, fp8, int8"):
    RunOptions(cache_dtype="int4")
  config = small_config("mla", kv_lora_rank=64, qk_rope_head_dim=16)
  plain = init_cache(config.attention, 1, 4, "int8")
  both = init_cache(config.attention, 1, 4, RunOptions(cache_dtype="int8", quantize_rope_key=True).cache_format)
  assert (plain["rope_key"].dtype, both["rope_key"].dtype) == (jnp.bfloat16, jnp.int8)
  assert set(both) - set(plain) == {"rope_key" + quant.SCALE}


class _Device:
  platform = "gpu"

  def __init__(self, kind, capability):
    self.device_kind, self.compute_capability = kind, capability


def test_fp8_where_the_gpu_lacks_it_is_refused_naming_the_formats_that_work(monkeypatch):
  from mla_jax.kernels import latent_decode as K
  a100, h200 = _Device("NVIDIA A100", "8.0"), _Device("NVIDIA H200", "9.0")
  assert K.storage_unsupported(jnp.float8_e4m3fn, a100) == (
      "an fp8 cache needs compute capability >= 8.9 in the Triton kernel, and NVIDIA A100 has 8.0; "
      "cache formats that work here: float32, bfloat16, int8")
  assert K.storage_unsupported(jnp.float8_e4m3fn, h200) is None
  assert K.storage_unsupported(jnp.int8, a100) is None
  # wired into the decode path: 'pallas' refuses in one line, 'auto' would fall back to XLA
  real = K.storage_unsupported
  monkeypatch.setattr(K, "storage_unsupported", lambda dtype, device=None: real(dtype, a100))
  model = random_model(kernel_config("mla", layers=1), decode_impl="pallas", cache_dtype="fp8")
  with pytest.raises(ValueError, match="decode_impl='pallas' cannot run here: an fp8 cache needs compute "
                                       "capability >= 8.9 .* formats that work here: float32, bfloat16, int8"):
    model.decode_step(jnp.zeros((1,), jnp.int32), model.init_cache(1, 16), jnp.zeros((1,), jnp.int32))
