"""The latent kernel on a GPU: correctness, then step time and bandwidth against the roofline.

    PYTHONPATH=. python -m experiments.gpu_check [--grid=small|large] [--out=FILE] [--budget_s=200]

Runs from the working tree with no install (only jax and numpy; nothing from
mla_jax.data). Exits 1 if the kernel disagrees with the fp32 reference on any
configuration (paged, ragged lengths, several query tokens, bf16).

Measured: the device-to-device copy bandwidth (x + 1 over 4 GiB: bytes read +
written per second), then for each configuration x batch x context on a paged
bf16 cache (64-token pages, shuffled): the kernel's step time (the call and its
split merge), the cache bytes it must read (live tokens x bytes per token),
bytes/s, and that as a fraction of the measured copy bandwidth and of the
nominal HBM peak (`--peak_tbs`, H200: 4.8). Beside it: JAX's own paged GQA
kernel (jax.experimental.pallas.ops.gpu.paged_attention) over a cache of about
the same bytes per token, and the XLA absorbed path (an einsum over the same
cache read densely) for MLA.

The default grid (batch 1/16/64 x context 4k/32k/128k) fits the 4-minute
budget of a lent GPU; cells past `--budget_s` are reported as skipped.
`--interpret` runs a tiny grid in Pallas interpret mode (a CPU smoke test).
"""
from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mla_jax.kernels import latent_decode as K

PAGE = 64
# (name, latent blocks NB, rope queries NBr, heads per block, latent width L, rope width R)
CONFIGS = [
    ("MLA 128h 512+64", 1, 1, 128, 512, 64),
    ("MLRA-4 24h 4x128+64", 4, 1, 24, 128, 64),
    ("MLRA-4 TP-4 shard 128+64", 1, 1, 24, 128, 64),
    ("GLA-2 24h 2x256+64", 2, 2, 12, 256, 64),
    ("GLA-2 TP-4 shard 256+64", 1, 1, 6, 256, 64),
]
GRIDS = {"small": ([1, 16, 64], [4096, 32768, 131072]),
         "large": ([1, 4, 16, 32, 64, 128], [4096, 16384, 32768, 65536, 131072])}


def timed(fn, *args, iters: int = 20) -> float:
  """Device seconds per call: `iters` calls chained inside one jitted loop (each
  call's first query element takes a zero from the last output, so none can be
  skipped or hoisted), compiled and run once first; no Python dispatch inside."""
  def chained(first, *rest):
    def body(_, carry):
      out = jax.tree.leaves(fn(carry, *rest))[0]
      return carry + (out.ravel()[0] * 0).astype(carry.dtype)
    return jax.lax.fori_loop(0, iters, body, first)
  loop = jax.jit(chained)
  jax.block_until_ready(loop(*args))
  start = time.perf_counter()
  jax.block_until_ready(loop(*args))
  return (time.perf_counter() - start) / iters


def ceilings(gib: float) -> tuple[float, float, float]:
  """Measured: read bandwidth (a sum over `gib` GiB of bf16), copy bandwidth (x + 1:
  bytes read + written), and the bf16 matrix-product rate (8192^3, fp32 accumulation)."""
  x = jnp.ones((int(gib * 2**30) // 2 // 8192, 8192), jnp.bfloat16)
  read = x.nbytes / timed(lambda a: a.astype(jnp.float32).sum(axis=1), x)     # rows: one block each
  copy = 2 * x.nbytes / timed(lambda a: a + 1, x)
  del x
  a = jnp.ones((8192, 8192), jnp.bfloat16)
  mm = 2 * 8192**3 / timed(lambda m: jnp.dot(m, m, preferred_element_type=jnp.float32).astype(m.dtype), a,
                           iters=10)
  return read, copy, mm


def paged_cache(key, batch, context, blocks, width, rope_dim, dtype):
  """Pools of batch x context tokens in shuffled 64-token pages, and the table."""
  per_seq = -(-context // PAGE)
  num_pages = batch * per_seq + 1
  k1, k2, k3 = jax.random.split(key, 3)
  latent = jax.random.normal(k1, (num_pages, PAGE, blocks, width), dtype)
  rope = jax.random.normal(k2, (num_pages, PAGE, rope_dim), dtype) if rope_dim else None
  table = (jax.random.permutation(k3, num_pages - 1) + 1).reshape(batch, per_seq).astype(jnp.int32)
  return latent, rope, table


def queries(key, batch, blocks, rope_blocks, rows, width, rope_dim, dtype):
  k1, k2 = jax.random.split(key)
  q_lat = (jax.random.normal(k1, (batch, blocks, rows, width), jnp.float32) * width ** -0.5).astype(dtype)
  q_rope = (jax.random.normal(k2, (batch, rope_blocks, rows, rope_dim), jnp.float32) * rope_dim ** -0.5
            ).astype(dtype) if rope_dim else None
  return q_lat, q_rope


def check(interpret: bool, say=print) -> list[str]:
  """The kernel against the fp32 reference, bf16 caches, ragged lengths, s_q 1 and 3.
  Tolerance: 4x the gap between the fp32 reference and one that rounds the
  probabilities to bf16 as the kernel must (what bf16 itself costs)."""
  failures = []
  key = jax.random.key(0)
  for name, nb, nbr, heads, width, rope_dim in CONFIGS:
    for s_q in (1, 3):
      lens = [1 + s_q, 1000, 2049] if not interpret else [s_q, 40, 97]
      context = max(lens) + PAGE
      latent, rope, table = paged_cache(key, len(lens), context, nb, width, rope_dim, jnp.bfloat16)
      q_lat, q_rope = queries(key, len(lens), nb, nbr, s_q * heads, width, rope_dim, jnp.bfloat16)
      kv_len = jnp.asarray(lens, jnp.int32)
      scale = (width + rope_dim) ** -0.5
      try:
        got, lse = K.latent_attention(q_lat, q_rope, latent, rope, kv_len, table, scale=scale, queries=s_q,
                                      interpret=interpret)
      except Exception as e:  # noqa: BLE001 - a kernel that does not compile is a failure to report, not a crash
        say(f"check {name:28s} s_q={s_q}: FAILED: {type(e).__name__}: {str(e).splitlines()[0][:150]}")
        failures.append(f"{name} s_q={s_q}")
        continue
      want, want_lse = K.reference(q_lat, q_rope, latent, rope, kv_len, table, scale=scale, queries=s_q)
      rounded, _ = K.reference(q_lat, q_rope, latent, rope, kv_len, table, scale=scale, queries=s_q,
                               probs_dtype=jnp.bfloat16)
      tol = 4 * float(jnp.abs(rounded - want).max()) + 1e-6
      err = float(jnp.abs(got - want).max())
      lse_err = float(jnp.abs(lse - want_lse).max())
      ok = err <= tol and lse_err <= 1e-3
      say(f"check {name:28s} s_q={s_q}: max |err| {err:.2e} (bf16 tolerance {tol:.2e}), "
          f"lse {lse_err:.1e}  {'ok' if ok else 'FAIL'}")
      if not ok:
        failures.append(f"{name} s_q={s_q}")
  return failures


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--grid", choices=sorted(GRIDS), default="small")
  parser.add_argument("--out", default=None, help="also write the report to this file")
  parser.add_argument("--budget_s", type=float, default=200.0, help="skip cells that start after this")
  parser.add_argument("--peak_tbs", type=float, default=4.8, help="nominal HBM peak, TB/s (H200: 4.8)")
  parser.add_argument("--interpret", action="store_true", help="tiny grid in interpret mode (CPU smoke test)")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  lines = []

  def say(line=""):
    print(line, flush=True)
    lines.append(line)

  device = jax.devices()[0]
  say(f"device: {device.device_kind} ({device.platform}), {K.num_sms()} multiprocessors, jax {jax.__version__}")
  failures = check(args.interpret, say)
  say(f"correctness: {'all configurations agree' if not failures else 'FAILED: ' + ', '.join(failures)}")
  if args.interpret:
    batches, contexts, (read, copy, mm) = [2], [256], (None, None, None)
  else:
    batches, contexts = GRIDS[args.grid]
    read, copy, mm = ceilings(4.0)
    say(f"measured: read {read / 1e12:.2f} TB/s (sum over 4 GiB), copy {copy / 1e12:.2f} TB/s (x + 1, read + "
        f"written), bf16 matrix product {mm / 1e12:.0f} TFLOP/s (8192^3); nominal HBM peak {args.peak_tbs} TB/s")
  peak = args.peak_tbs * 1e12
  say("")
  say("step: device time of one call (kernel + split merge); cache MB: live tokens' bytes, each counted once;")
  say("of read / copy / peak: bytes/s over the measured read and copy bandwidths and the nominal peak;")
  say("of roofline: the")
  say("larger of bytes / measured bandwidth (read or copy, the higher) and FLOPs / matrix-product rate,")
  say("over the step time. Caches hold the longest context; shorter contexts are shorter live lengths.")
  say(f"{'configuration':38s} {'batch':>5s} {'context':>7s} {'plan':>22s} {'step us':>9s} {'cache MB':>9s} "
      f"{'GB/s':>6s} {'of read':>7s} {'of copy':>7s} {'of peak':>7s} {'TFLOP/s':>7s} {'of roofline':>11s}")
  key = jax.random.key(1)

  def row(name, batch, context, plan, seconds, nbytes, flops=0):
    frac = lambda x, ceiling: "" if ceiling is None else f"{x / seconds / ceiling:.1%}"  # noqa: E731
    bound = "" if read is None else f"{max(nbytes / max(read, copy), flops / mm) / seconds:.1%}"
    say(f"{name:38s} {batch:5d} {context:7d} {plan:>22s} {seconds * 1e6:9.1f} {nbytes / 1e6:9.1f} "
        f"{nbytes / seconds / 1e9:6.0f} {frac(nbytes, read):>7s} {frac(nbytes, copy):>7s} {frac(nbytes, peak):>7s} "
        f"{flops / seconds / 1e12:7.1f} {bound:>11s}")

  # One cache per configuration and batch, as large as the longest context; each context is
  # its live length (the kernel walks live tokens only, so one compile serves every context).
  # Beside the default plans, one cell each of the plans they were chosen against (results/gpu/).
  explore = {(16, 32768): [dict(block_k=32), dict(max_rows=32), dict(num_warps=8)]}
  for batch in batches:
    for name, nb, nbr, heads, width, rope_dim in CONFIGS:
      if time.perf_counter() - start > args.budget_s:
        say(f"{name:38s} {batch:5d} skipped: past --budget_s")
        continue
      try:
        latent, rope, table = paged_cache(key, batch, max(contexts), nb, width, rope_dim, jnp.bfloat16)
        q_lat, q_rope = queries(key, batch, nb, nbr, heads, width, rope_dim, jnp.bfloat16)
      except Exception as e:  # noqa: BLE001
        say(f"{name:38s} {batch:5d} FAILED to allocate: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
        failures.append(f"{name} batch {batch}")
        continue
      for context in contexts:
        extra = [] if args.interpret or name != CONFIGS[0][0] else explore.get((batch, context), [])
        for overrides in [{}] + extra:
          label = name + "".join(f" {k}={v}" for k, v in overrides.items())
          kv_len = jnp.full((batch,), context, jnp.int32)
          plan = K.plan(blocks=nb, rows=heads, width=width, rope_dim=rope_dim, itemsize=2, batch=batch,
                        capacity=max(contexts), page_size=PAGE, sms=K.INTERPRET_SMS if args.interpret else None,
                        max_rows=overrides.get("max_rows"))
          plan = K.Plan(**{**vars(plan), **{k: v for k, v in overrides.items() if k != "max_rows"}})
          fn = lambda *a, o=overrides: K.latent_attention(*a, scale=0.1, interpret=args.interpret, **o)  # noqa: E731
          try:
            seconds = timed(fn, q_lat, q_rope, latent, rope, kv_len, table, iters=3 if args.interpret else 10)
          except Exception as e:  # noqa: BLE001 - report and go on: one run must give every number it can
            say(f"{label:38s} {batch:5d} {context:7d} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:150]}")
            if not overrides:
              failures.append(f"{label} batch {batch} context {context}")
            continue
          nbytes = batch * context * (nb * width + rope_dim) * 2
          flops = batch * context * K.flops_per_token(nb, nbr, heads, width, rope_dim)
          row(label, batch, context, f"{plan.rows}x{plan.row_tiles} k{plan.block_k} s{plan.splits} "
              f"w{plan.num_warps}", seconds, nbytes, flops)
          if name == CONFIGS[0][0] and not overrides and not args.interpret:
            try:
              pages = batch * -(-context // PAGE)
              dense_lat = latent[1:pages + 1].reshape(batch, -1, 1, width)
              dense_rope = rope[1:pages + 1].reshape(batch, -1, rope_dim)
              row("  XLA absorbed (dense einsum)", batch, context, "-",
                  timed(xla_absorbed, q_lat, q_rope, dense_lat, dense_rope, iters=10), nbytes, flops)
            except Exception as e:  # noqa: BLE001
              say(f"  XLA absorbed {batch} {context}: failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
      del latent, rope
    if time.perf_counter() - start <= args.budget_s:
      gqa_rows(say, row, key, batch, contexts, args.interpret)
    if time.perf_counter() - start <= args.budget_s:
      failures += eight_bit_rows(say, row, key, batch, contexts, args.interpret)
  say("")
  say(f"total {time.perf_counter() - start:.0f} s")
  if args.out:
    with open(args.out, "w") as f:
      f.write("\n".join(lines) + "\n")
  return 1 if failures else 0


def xla_absorbed(q, q_rope, latent, rope):
  """What XLA does with the same math: two einsums and a softmax over a dense cache."""
  scores = (jnp.einsum("bnml,btnl->bnmt", q, latent, preferred_element_type=jnp.float32)
            + jnp.einsum("bnmr,btr->bnmt", q_rope, rope, preferred_element_type=jnp.float32))
  probs = jax.nn.softmax(scores, axis=-1).astype(latent.dtype)
  return jnp.einsum("bnmt,btnl->bnml", probs, latent, preferred_element_type=jnp.float32)


def gqa_rows(say, row, key, batch, contexts, interpret):
  """JAX's paged GQA kernel, 2 KV heads x 128 (K and V: 1024 bytes per token in
  bf16, MLA's 576 x 2 = 1152), 16 query heads, the same pages and live lengths."""
  from jax.experimental.pallas.ops.gpu import paged_attention as pa
  kv_heads, dim, heads = 2, 128, 16
  per_seq = -(-max(contexts) // PAGE)
  num_pages = batch * per_seq + 1
  k1, k2, k3 = jax.random.split(key, 3)
  k_pages = jax.random.normal(k1, (kv_heads, num_pages, PAGE, dim), jnp.bfloat16)
  v_pages = jax.random.normal(k2, (kv_heads, num_pages, PAGE, dim), jnp.bfloat16)
  table = (jax.random.permutation(k3, num_pages - 1) + 1).reshape(batch, per_seq).astype(jnp.int32)
  q = jax.random.normal(k1, (batch, heads, dim), jnp.bfloat16)
  # 2 pages (128 tokens) per compute block: its default 8 asks an H200 for 276 KB of shared memory
  per_block = min(2, per_seq)
  splits = max(1, min(16, per_seq // per_block))
  fn = lambda *a: pa.paged_attention(*a, k_splits=splits, pages_per_compute_block=per_block,  # noqa: E731
                                     interpret=interpret)
  for context in contexts:
    lengths = jnp.full((batch,), context, jnp.int32)
    try:
      seconds = timed(fn, q, k_pages, v_pages, table, lengths, iters=3 if interpret else 10)
    except Exception as e:  # noqa: BLE001 - a comparator's failure must not hide our own numbers
      say(f"  JAX paged GQA {batch} {context}: failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
      continue
    row("  JAX paged GQA 2x128 kv, 16 q heads", batch, context, f"k_splits {splits}", seconds,
        batch * context * kv_heads * dim * 2 * 2, batch * context * heads * dim * 4)


def eight_bit_rows(say, row, key, batch, contexts, interpret) -> list[str]:
  """The first configuration (MLA) over fp8 and int8 pools (mla_jax/quant.py:
  a scale per token per 128 values, the rope key in bf16), bf16 queries: its
  error against the fp32 reference over the values the pools hold, and its time."""
  from mla_jax import quant
  name, nb, nbr, heads, width, rope_dim = CONFIGS[0]
  latent, rope, table = paged_cache(key, batch, max(contexts), nb, width, rope_dim, jnp.bfloat16)
  q_lat, q_rope = queries(key, batch, nb, nbr, heads, width, rope_dim, jnp.bfloat16)
  failures = []
  for fmt in ("fp8", "int8"):
    values, scales = quant.quantize(latent, quant.FORMATS[fmt], quant.tile_width(width))
    held = quant.dequantize(values, scales, jnp.float32)
    per_token = quant.layout_bytes_per_token(quant.layout(
        {"kv_latent": ((nb, width), (None, None)), "rope_key": ((rope_dim,), (None,))}, quant.FORMATS[fmt]))
    fn = lambda *a: K.latent_attention(*a[:6], a[6], scale=0.1, interpret=interpret)  # noqa: E731
    for context in contexts:
      kv_len = jnp.full((batch,), context, jnp.int32)
      try:
        got, _ = fn(q_lat, q_rope, values, rope, kv_len, table, scales)
        want, _ = K.reference(q_lat.astype(jnp.float32), q_rope.astype(jnp.float32), held, rope, kv_len, table,
                              scale=0.1)
        rounded, _ = K.reference(q_lat, q_rope, held, rope, kv_len, table, scale=0.1, probs_dtype=jnp.bfloat16)
        err, tol = float(jnp.abs(got - want).max()), 4 * float(jnp.abs(rounded - want).max()) + 1e-3
        seconds = timed(fn, q_lat, q_rope, values, rope, kv_len, table, scales, iters=3 if interpret else 10)
      except Exception as e:  # noqa: BLE001 - report and go on
        say(f"  {name} {fmt} {batch} {context}: FAILED: {type(e).__name__}: {str(e).splitlines()[0][:150]}")
        failures.append(f"{name} {fmt} batch {batch} context {context}")
        continue
      if err > tol:
        failures.append(f"{name} {fmt} batch {batch} context {context}: error {err:.2e} > {tol:.2e}")
      row(f"  {name} {fmt} cache (err {err:.0e})", batch, context, "-", seconds, batch * context * per_token,
          batch * context * K.flops_per_token(nb, nbr, heads, width, rope_dim))
  return failures


if __name__ == "__main__":
  sys.exit(main())
