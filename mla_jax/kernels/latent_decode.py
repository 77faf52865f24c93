"""Flash decoding over a latent cache, each cache byte read once: a Pallas GPU (Triton) kernel.

One kernel serves the whole latent family. The cache holds, per token, NB
latent blocks of width L and one rope key of width R; each block is attended
by its own query rows with one softmax per (block, row):

    s_t = (q_lat . c_t + q_rope . r_t) * scale      context = sum_t softmax(s)_t c_t

MLA is NB = 1 (L = 512 at DeepSeek's size), GLA-G is NB = G latent heads with
their head groups, MLRA is NB = R x G blocks (the caller sums branches outside
the softmax). The value is the latent itself: the kernel returns the
[B, NB, M, L] context and the log-sum-exp of every row.

Rows are query tokens x heads, query-major (row r is new token r // heads):
decode is one token per sequence, a prefill chunk or a speculative draft
several, causal among themselves (token s sees keys t <= kv_len - S + s).

Read once. A program owns one sequence, one tile of rows and one split of the
sequence, and walks that split in tiles of `block_k` tokens: per tile it loads
the rope key once and each of the NB latent blocks once, and scores every row
of every block against them (rope scores once per distinct rope query: MLRA's
branches share theirs). With one row tile and splits that partition the live
tokens, every cache byte of a live token is loaded once per step and no byte
past it is loaded (masked loads); `tests/test_kernels.py` counts this at run
time. One row tile holds every head count whose accumulators and shared memory
fit a program (`plan`); MLA's 128 heads x 512 in bf16 do not on Hopper (see
SMEM_BUDGET) and take two tiles, each loading the latent.

Splits are chosen from the device's multiprocessor count and the batch
(`plan`), and cut over each sequence's *live* length inside the kernel, so a
short sequence has no empty splits doing its work serially and batch 1 at long
context fills the GPU. Partials (unnormalised context, running max and sum, in
fp32) are merged exactly through their log-sum-exps (`_combine`).

Paged caches: pools [num_pages, page_size, ...] and a page table [B, width];
token t lives at pool[table[b, t // page_size], t % page_size]. A tile never
crosses a page (block_k divides page_size).

Triton wants power-of-2 shapes for everything it loads, which 576 = 512 + 64
and 24 heads are not: latent and rope key are separate operands (two dots,
never a 576-wide tile) and rows are padded to a power of 2 >= 16.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from mla_jax import compat

# Shared memory per program (bytes). An H200 gives a block at most 232,448
# (227 KB; Triton's error names the number). Two uses, not live at once:
#   the walk:  queries   NB x rows x (L + R) x itemsize            (loaded once, held throughout)
#              tiles     stages x block_k x (NB x L + R) x itemsize  (pipelined cache tiles)
#              probs     rows x block_k x itemsize                  (the P operand of P . latent)
#   the end:   rows x L x 4, the fp32 accumulator of one block converted out of the MMA layout
# Measured on an H200: MLA at 128 rows asked for 262,144 = 128 x 512 x 4 and failed, so 128
# heads of MLA take two 64-row tiles (results/gpu/). SMEM_BUDGET keeps 3 KB of margin.
SMEM_LIMIT = 232_448
SMEM_BUDGET = SMEM_LIMIT - 3 * 1024
# fp32 accumulators per program, NB x rows x L: 32,768 is 128 registers per thread at 8 warps.
ACC_BUDGET = 32 * 1024
NUM_STAGES = 2
MAX_SPLITS = 64
INTERPRET_SMS = 4          # "multiprocessors" assumed in interpret mode: a few splits, still fast on a CPU


def _pow2_at_least(n: int, floor: int = 16) -> int:
  p = floor
  while p < n:
    p *= 2
  return p


def _is_pow2(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def unsupported(latent_dim: int, rope_dim: int, page_size: int | None = None) -> str | None:
  """Why the kernel cannot take these widths or pages (None when it can)."""
  if not _is_pow2(latent_dim) or latent_dim < 16:
    return f"latent block width {latent_dim} is not a power of 2 >= 16"
  if rope_dim and (not _is_pow2(rope_dim) or rope_dim < 16):
    return f"rope width {rope_dim} is not a power of 2 >= 16"
  if page_size is not None and (not _is_pow2(page_size) or page_size < 16):
    return f"page size {page_size} is not a power of 2 >= 16 (tiles of 16 tokens must not cross pages)"
  return None


def storage_unsupported(dtype, device=None) -> str | None:
  """Why this GPU's Triton cannot load a cache of `dtype` (None when it can):
  fp8 (e4m3) needs compute capability 8.9 or newer (Ada, Hopper)."""
  if jnp.dtype(dtype) != jnp.dtype(jnp.float8_e4m3fn):
    return None
  device = device or jax.devices()[0]
  if device.platform != "gpu":
    return None                     # interpret mode reads any dtype
  capability = str(getattr(device, "compute_capability", "0.0"))
  major, _, minor = capability.partition(".")
  if (int(major), int(minor or 0)) < (8, 9):
    return (f"an fp8 cache needs compute capability >= 8.9 in the Triton kernel, and {device.device_kind} has "
            f"{capability}; cache formats that work here: float32, bfloat16, int8")
  return None


@dataclasses.dataclass(frozen=True)
class Plan:
  rows: int          # query rows per program (power of 2 >= 16)
  row_tiles: int     # programs per sequence and split along the rows (1: the cache is loaded once)
  block_k: int       # tokens per tile
  splits: int        # sequence chunks per sequence
  num_warps: int
  num_stages: int = NUM_STAGES


def smem_bytes(blocks: int, rows: int, width: int, rope_dim: int, itemsize: int, block_k: int,
               stages: int = NUM_STAGES) -> int:
  """The shared-memory claim of one program (see SMEM_BUDGET)."""
  queries = blocks * rows * (width + rope_dim) * itemsize
  tiles = stages * block_k * (blocks * width + rope_dim) * itemsize
  walk = queries + tiles + rows * block_k * itemsize
  return max(walk, rows * width * 4)


def num_sms() -> int:
  """Multiprocessors of the first device (INTERPRET_SMS off a GPU)."""
  device = jax.devices()[0]
  if device.platform != "gpu":
    return INTERPRET_SMS
  return getattr(device, "core_count", None) or 132


def plan(*, blocks: int, rows: int, width: int, rope_dim: int, itemsize: int, batch: int, capacity: int,
         page_size: int | None = None, sms: int | None = None, max_rows: int | None = None) -> Plan:
  """Tiles for one call. Rows: all of them in one program when the accumulators
  (ACC_BUDGET) and shared memory (SMEM_BUDGET) allow, else the largest power of
  2 that fits (the cache is then loaded once per row tile). Tokens per tile: the
  largest of 64/32/16 that fits beside them (and divides the page). Splits:
  enough programs for every multiprocessor, at least 4 tiles each."""
  padded = _pow2_at_least(rows)
  tile_rows = min(padded, max_rows or padded)
  while tile_rows > 16 and blocks * tile_rows * width > ACC_BUDGET:
    tile_rows //= 2
  tokens = [k for k in (64, 32, 16) if page_size is None or page_size % k == 0]
  while True:
    fits = [k for k in tokens if smem_bytes(blocks, tile_rows, width, rope_dim, itemsize, k) <= SMEM_BUDGET]
    if fits or tile_rows == 16:
      block_k = fits[0] if fits else 16
      break
    tile_rows //= 2
  row_tiles = padded // tile_rows
  programs = batch * row_tiles
  capacity_tiles = max(1, -(-capacity // block_k))
  splits = max(1, min((sms or num_sms()) // programs, MAX_SPLITS, capacity_tiles // 4 or 1))
  acc = blocks * tile_rows * width
  num_warps = 4 if acc <= 16384 else 8      # H200: MLRA-4's 4 x 32 x 128 faster at 4 warps, MLA's 64 x 512 needs 8
  return Plan(rows=tile_rows, row_tiles=row_tiles, block_k=block_k, splits=splits, num_warps=num_warps)


def flops_per_token(blocks: int, rope_blocks: int, rows: int, width: int, rope_dim: int) -> int:
  """Multiply-adds x 2 per cached token of one sequence: scores and context per
  block and row, rope scores once per rope query."""
  return 2 * rows * (blocks * 2 * width + rope_blocks * rope_dim)


# ----------------------------------------------------------------------------- loads

_count = None          # set by `counting_loads`: called with (what, loaded array, mask) at trace time


def _load(ref, mask=None, *, what: str):
  """Every read the kernel makes of its operands goes through here."""
  # masked-off elements read as zero (an fp8 zero: Triton casts no integer constant to fp8)
  other = None if mask is None else jnp.zeros((), ref.dtype)
  x = compat.pallas_gpu().load(ref, mask=mask, other=other)
  if _count is not None:
    _count(what, x, mask)
  return x


class counting_loads:
  """Tally, at run time, the bytes every load of the kernel touches (masked-off
  elements are not read): `with counting_loads() as tally: ...`, then
  tally["cache"], tally["query"]. Interpret mode only; call the un-jitted
  `latent_attention_fn` inside it so the kernel is traced with the counter."""

  def __enter__(self):
    global _count
    self.tally = {"cache": 0, "query": 0}

    def add(what, n):
      self.tally[what] += int(n)

    def count(what, x, mask):
      touched = x.size if mask is None else jnp.sum(jnp.broadcast_to(mask, x.shape))
      jax.debug.callback(functools.partial(add, what), touched * x.dtype.itemsize, ordered=False)

    _count = count
    return self.tally

  def __exit__(self, *exc):
    global _count
    _count = None


# ----------------------------------------------------------------------------- the kernel


def _i(j: int):
  """A static index as an int32 scalar (Pallas's interpret mode takes no Python ints inside an indexer)."""
  return jnp.int32(j)


def _kernel(len_ref, table_ref, ql_ref, qr_ref, lat_ref, rope_ref, lat_scale_ref, rope_scale_ref, o_ref, m_ref,
            l_ref, *, scale: float, block_k: int, splits: int, queries: int, heads: int, page_size: int | None,
            tile: int, allow_tf32: bool | None, run: int, ways: int):
  """One program: one sequence, one tile of rows (all NB blocks), one split of its live tokens.

  Under context parallelism (`ways` > 1) the cache here is this device's share:
  runs of `run` slots, run i holding tokens [first + i x run x ways, + run)
  (a dense cache: one run; a pool: each page's share). len_ref holds the
  sequence's token count n and `first`."""
  gpu = compat.pallas_gpu()
  row_tile, split = pl.program_id(0), pl.program_id(2)
  blocks, rows, width = ql_ref.shape
  tiles = width // tile                                      # 8-bit caches: one scale per token per tile
  rope_queries = 0 if qr_ref is None else qr_ref.shape[0]    # 1: shared by all blocks (MLRA's branches)
  n, first = len_ref[0], len_ref[1]
  stride = run * ways
  live_n = (n // stride) * run + jnp.clip(n % stride - first, 0, run)      # slots here holding tokens < n

  def token(pos):                   # the token a slot here holds
    return pos + first + (pos // run) * (stride - run)

  num_tiles = pl.cdiv(live_n, block_k)
  per_split = pl.cdiv(num_tiles, splits)
  first_tile = split * per_split
  count = jnp.clip(num_tiles - first_tile, 0, per_split)

  def lanes(k):                     # the elements of scale tile k in a latent row
    return () if tiles == 1 else (pl.ds(k * tile, tile),)

  q_lat = [[_load(ql_ref.at[(_i(j), slice(None)) + lanes(k)], what="query") for k in range(tiles)]
           for j in range(blocks)]
  q_rope = [_load(qr_ref.at[_i(j)], what="query") for j in range(rope_queries)]
  row = row_tile * rows + jnp.arange(rows)
  # row r is new token r // heads, at position n - queries + r // heads; it sees keys up to there
  last_seen = n - queries + jnp.minimum(row // heads, queries - 1)
  offsets = jnp.arange(block_k)

  def tile_of(ref, tile_index, *rest):
    first = tile_index * block_k
    if table_ref is None:
      return ref.at[(pl.ds(first, block_k),) + rest]
    page = table_ref[first // page_size]
    return ref.at[(page, pl.ds(first % page_size, block_k)) + rest]

  def cache_tile(ref, scale_ref, tile_index, live, *rest, scale_index=()):
    """[block_k, width] of the cache in the queries' dtype: dequantized when it is
    scaled (an 8-bit cache's bf16 rope key: cast)."""
    x = _load(tile_of(ref, tile_index, *rest), mask=live[:, None], what="cache")
    if scale_ref is None:
      return x if x.dtype == ql_ref.dtype else x.astype(ql_ref.dtype)
    s = _load(tile_of(scale_ref, tile_index, *scale_index), mask=live, what="cache")
    return (x.astype(jnp.float32) * s[:, None]).astype(ql_ref.dtype)

  def dot(a, b, trans_b=False):
    return gpu.dot(a, b, trans_b=trans_b, allow_tf32=allow_tf32)

  def body(i, carry):
    tile_index = first_tile + i
    pos = tile_index * block_k + offsets
    live = pos < live_n
    visible = token(pos)[None, :] <= last_seen[:, None]                # [rows, block_k]
    rope_scores = []
    if rope_queries:                                                   # once per tile, for every block
      rope_key = cache_tile(rope_ref, rope_scale_ref, tile_index, live, scale_index=(_i(0),))
      rope_scores = [dot(q, rope_key, trans_b=True) for q in q_rope]
    out = []
    for j in range(blocks):
      acc, m_prev, l_prev = carry[j]
      # [block_k, tile] pieces of the latent: key and value
      latent = [cache_tile(lat_ref, lat_scale_ref, tile_index, live, _i(j), *lanes(k), scale_index=(_i(j), _i(k)))
                for k in range(tiles)]
      scores = dot(q_lat[j][0], latent[0], trans_b=True)
      for k in range(1, tiles):
        scores += dot(q_lat[j][k], latent[k], trans_b=True)
      if rope_queries:
        scores += rope_scores[j % rope_queries]
      scores = jnp.where(visible, scores.astype(jnp.float32) * scale, -jnp.inf)
      m_next = jnp.maximum(m_prev, scores.max(axis=-1))
      # a row that has seen only masked keys keeps m = -inf; exp(-inf - -inf) must not be NaN
      safe_m = jnp.where(m_next == -jnp.inf, 0.0, m_next)
      correction = jnp.exp(m_prev - safe_m)
      p = jnp.exp(scores - safe_m[:, None])
      l_next = correction * l_prev + p.sum(axis=-1)
      acc = tuple(correction[:, None] * a + dot(p.astype(c.dtype), c) for a, c in zip(acc, latent))
      out.append((acc, m_next, l_next))
    return tuple(out)

  init = tuple((tuple(jnp.zeros((rows, tile), jnp.float32) for _ in range(tiles)),
                jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32)) for _ in range(blocks))
  state = lax.fori_loop(0, count, body, init)
  for j, (acc, m, l) in enumerate(state):
    for k, a in enumerate(acc):
      o_ref[(_i(j), slice(None)) + lanes(k)] = a
    m_ref[_i(j)] = m
    l_ref[_i(j)] = l


def _combine(o, m, l):
  """Merge split partials exactly: o [S, ...rows, L] unnormalised, m and l [S, ...rows]."""
  m_all = m.max(axis=0)
  safe = jnp.where(m_all == -jnp.inf, 0.0, m_all)
  weight = jnp.exp(m - safe[None])                       # 0 for splits that saw no key
  denom = (weight * l).sum(axis=0)
  context = (weight[..., None] * o).sum(axis=0) / jnp.maximum(denom, 1e-30)[..., None]
  # rows that saw no key (a context-parallel shard holding none of the sequence): lse -inf, weight 0 in a merge
  lse = jnp.where(denom > 0, safe + jnp.log(jnp.maximum(denom, 1e-30)), -jnp.inf)
  return context, lse


def latent_attention_fn(q_latent, q_rope, latent, rope, kv_len, pages=None, latent_scales=None, rope_scales=None,
                        *, scale: float, queries: int = 1, splits: int | None = None, max_rows: int | None = None, block_k: int | None = None,
                        num_warps: int | None = None, num_stages: int | None = None, interpret: bool = False,
                        return_partials: bool = False, ways: int = 1, first=0):
  """Attention of `queries` new tokens per sequence over a latent cache.

  q_latent [B, NB, M, L] with M = queries x heads rows (query-major),
  q_rope [B, NBr, M, R] or None, NBr = NB or a divisor of it (block j uses rope
  query j % NBr: MLRA's branches share one); latent [B, T, NB, L] and rope
  [B, T, R] (dense), or pools [P, page_size, NB, L] and [P, page_size, R] with
  `pages` [B, W] (paged); kv_len [B]: tokens cached, the new ones included.
  8-bit caches (mla_jax.quant): `latent_scales` [B, T, NB, L / tile] (or
  pools) scale the latent per token and tile of at most 128 values;
  `rope_scales` [B, T, 1] the rope key, when it is quantized too. Each tile is
  dequantized where it is loaded, into the queries' dtype (the dots run in it).
  Returns context [B, NB, M, L] (float32) and lse [B, NB, M]; with
  `return_partials`, also the per-split (o, m, l) and the plan.

  Context parallelism: the cache is one device's share of `ways` (a dense
  cache's contiguous block of tokens from `first` on; a pool's run of each
  page's slots, the run starting at slot `first` of the whole page), kv_len the
  whole sequence's: lse is over this share's keys (-inf where it holds none).
  """
  batch, blocks, rows, width = q_latent.shape
  if rows % queries:
    raise ValueError(f"{rows} query rows are not {queries} tokens x heads")
  rope_dim = 0 if rope is None else rope.shape[-1]
  page_size = None if pages is None else latent.shape[1]
  why = unsupported(width, rope_dim, page_size)
  if why:
    raise ValueError(f"the Pallas latent kernel cannot run this shape: {why}; use the XLA absorbed path "
                     "(decode_impl='absorbed')")
  capacity = latent.shape[1] if pages is None else pages.shape[1] * page_size
  quantized = latent_scales is not None
  compute = q_latent.dtype if quantized else latent.dtype        # what the dots multiply in
  tile = width // latent_scales.shape[-1] if quantized else width
  p = plan(blocks=blocks, rows=rows, width=width, rope_dim=rope_dim, itemsize=jnp.dtype(compute).itemsize,
           batch=batch, capacity=capacity, page_size=page_size,
           sms=INTERPRET_SMS if interpret else None, max_rows=max_rows)
  p = dataclasses.replace(p, **{k: v for k, v in dict(splits=splits, block_k=block_k, num_warps=num_warps,
                                                      num_stages=num_stages).items() if v is not None})
  padded = p.rows * p.row_tiles
  pad = [(0, 0), (0, 0), (0, padded - rows), (0, 0)]
  q_latent = jnp.pad(q_latent.astype(compute), pad)
  if q_rope is not None:
    q_rope = jnp.pad(q_rope.astype(compute), pad)
  grid = (p.row_tiles, batch, p.splits)    # row tiles fastest: those that load the same tiles run together
  whole = lambda shape: pl.BlockSpec(shape, lambda r, b, s: (0,) * len(shape))  # noqa: E731
  per_seq = lambda shape: pl.BlockSpec((None,) + shape[1:], lambda r, b, s: (b,) + (0,) * (len(shape) - 1))  # noqa: E731
  cache_spec = per_seq if pages is None else whole
  in_specs = [
      pl.BlockSpec((None, 2), lambda r, b, s: (b, 0)),                              # kv_len, first
      None if pages is None else per_seq(pages.shape),                              # this sequence's page table
      pl.BlockSpec((None, blocks, p.rows, width), lambda r, b, s: (b, 0, r, 0)),
      None if q_rope is None else pl.BlockSpec((None, q_rope.shape[1], p.rows, rope_dim),
                                               lambda r, b, s: (b, 0, r, 0)),
      cache_spec(latent.shape),
      None if rope is None else cache_spec(rope.shape),
      None if latent_scales is None else cache_spec(latent_scales.shape),
      None if rope_scales is None else cache_spec(rope_scales.shape),
  ]
  part = (p.splits, batch, blocks, padded)
  out_specs = [pl.BlockSpec((None, None, blocks, p.rows, width), lambda r, b, s: (s, b, 0, r, 0)),
               pl.BlockSpec((None, None, blocks, p.rows), lambda r, b, s: (s, b, 0, r)),
               pl.BlockSpec((None, None, blocks, p.rows), lambda r, b, s: (s, b, 0, r))]
  out_shape = [jax.ShapeDtypeStruct(part + (width,), jnp.float32),
               jax.ShapeDtypeStruct(part, jnp.float32), jax.ShapeDtypeStruct(part, jnp.float32)]
  kernel = functools.partial(_kernel, scale=scale, block_k=p.block_k, splits=p.splits, queries=queries,
                             heads=rows // queries, page_size=page_size, tile=tile,
                             allow_tf32=False if compute == jnp.float32 else None,
                             run=capacity if pages is None else page_size, ways=ways)
  kv_len = jnp.stack([kv_len.astype(jnp.int32), jnp.broadcast_to(jnp.asarray(first, jnp.int32), kv_len.shape)], -1)
  o, m, l = pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=compat.pallas_gpu_params(num_warps=p.num_warps, num_stages=p.num_stages),
      interpret=interpret, name="latent_attention",
  )(kv_len, None if pages is None else pages.astype(jnp.int32), q_latent, q_rope, latent, rope,
    latent_scales, rope_scales)
  o, m, l = o[..., :rows, :], m[..., :rows], l[..., :rows]
  context, lse = _combine(o, m, l)
  if return_partials:
    return context, lse, (o, m, l), p
  return context, lse


latent_attention = jax.jit(latent_attention_fn, static_argnames=(
    "scale", "queries", "splits", "max_rows", "block_k", "num_warps", "num_stages", "interpret", "return_partials",
    "ways"))


def reference(q_latent, q_rope, latent, rope, kv_len, pages=None, *, scale: float, queries: int = 1,
              probs_dtype=jnp.float32):
  """The same attention in plain jnp, in fp32 (the tests' oracle; it gathers
  pages into a dense cache). `probs_dtype=bfloat16` rounds the probabilities as
  a bf16 kernel must before its second dot: the gap between the two references
  is the error bf16 itself costs, which sizes the bf16 tolerance."""
  if pages is not None:
    latent = latent[pages].reshape((pages.shape[0], -1) + latent.shape[2:])
    rope = None if rope is None else rope[pages].reshape((pages.shape[0], -1) + rope.shape[2:])
  f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
  blocks, rows = q_latent.shape[1], q_latent.shape[2]
  s = jnp.einsum("bnml,btnl->bnmt", f32(q_latent), f32(latent), precision="highest")
  if rope is not None:
    q_rope = jnp.tile(f32(q_rope), (1, blocks // q_rope.shape[1], 1, 1))      # block j uses rope query j % NBr
    s += jnp.einsum("bnmr,btr->bnmt", q_rope, f32(rope), precision="highest")
  s = s * scale
  token = jnp.arange(rows) // (rows // queries)
  last_seen = kv_len[:, None] - queries + token[None, :]                        # [B, M]
  visible = jnp.arange(latent.shape[1])[None, None, :] <= last_seen[:, :, None]
  s = jnp.where(visible[:, None], s, -jnp.inf)
  lse = jax.nn.logsumexp(s, axis=-1)
  p = jnp.exp(s - lse[..., None]).astype(probs_dtype).astype(jnp.float32)
  return jnp.einsum("bnmt,btnl->bnml", p, f32(latent), precision="highest"), lse
