"""The decode engine's benchmarks (issue 15), side by side in one process.

    .venv/bin/python -m experiments.bench_engine                  # all three parts
    .venv/bin/python -m experiments.bench_engine --parts=step --capacity=4096

step:       one paged decode step of MLA, MLRA-4 and GQA against the live context,
            at a fixed capacity (pool and page table sized for --capacity tokens per
            sequence): median ms, the ratio to a step over the full capacity (what
            the dense cache always paid), and the cache bytes the step must read per
            second against this machine's measured memory read bandwidth.
throughput: a mixed workload (--requests requests, prompts 16-512 tokens, outputs
            16-256) through the engine and through the dense `generate` of the commit
            before it (tests/reference_generate.py, frozen): requested tokens per
            second, compile excluded (each runs the workload twice; the second is timed).
memory:     the engine's cache at its high-water mark against the dense cache the
            same workload needs (batch x (longest prompt + longest output)).

The model: Llama flavour, d 512, 2 layers, SwiGLU 1024, vocab 1024; MLA/MLRA-4
with a 512 latent and a 64 rope key (576 cached values per token and layer, as
DeepSeek), 8 heads of 64; GQA 8 heads of 128 over 2 KV heads (512 values).
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import cli
from flax import nnx

from mla_jax import ModelConfig, RunOptions, Transformer, attention_config
from mla_jax.engine import Engine, Request
from mla_jax.paging import PagePool

flags.DEFINE_list("parts", ["step", "throughput", "memory"], "Which benchmarks to run.")
flags.DEFINE_list("variants", ["mla", "mlra4", "gqa"], "step: variants to time.")
flags.DEFINE_integer("capacity", 4096, "step: tokens per sequence the pool and table are sized for.")
flags.DEFINE_integer("batch", 8, "step: sequences per step.")
flags.DEFINE_integer("page_size", 16, "Tokens per page.")
flags.DEFINE_integer("steps", 20, "step: timed steps per cell (after 3 untimed).")
flags.DEFINE_integer("requests", 64, "throughput, memory: requests in the mixed workload.")
flags.DEFINE_integer("max_seqs", 16, "throughput, memory: the engine's sequences in flight.")
flags.DEFINE_string("workload_variant", "mla", "throughput, memory: the model's variant.")
FLAGS = flags.FLAGS

ATTENTION = {
    "mla": dict(num_heads=8, q_lora_rank=256, kv_lora_rank=512, qk_nope_head_dim=64, qk_rope_head_dim=64),
    "mlra4": dict(num_heads=8, q_lora_rank=256, kv_lora_rank=512, qk_nope_head_dim=64, qk_rope_head_dim=64),
    "gqa": dict(num_heads=8, num_kv_heads=2, head_dim=128),
}


def bench_config(variant: str, max_seq_len: int) -> ModelConfig:
  return ModelConfig(flavour="llama", vocab_size=1024, d_model=512, num_layers=2, mlp_dim=1024,
                     max_seq_len=max_seq_len, attention=attention_config(variant, **ATTENTION[variant]))


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return f"{names[0]} x {len(names)}" if names else platform.processor()
  except OSError:
    return platform.processor() or "unknown CPU"


def read_bandwidth(gib: float = 1.0, rounds: int = 5) -> float:
  """Bytes/s of a jitted sum over a `gib` GiB fp32 array (best of `rounds`): the
  memory read bandwidth this process can reach."""
  x = jnp.ones((int(gib * 2**30) // 4,), jnp.float32)
  total = jax.jit(jnp.sum)
  total(x).block_until_ready()
  best = min(_timed(lambda: total(x).block_until_ready()) for _ in range(rounds))
  return x.nbytes / best


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


# ----------------------------------------------------------------------------- step


def time_step(model, batch: int, context: int, capacity: int, page_size: int, steps: int) -> float:
  """Median seconds of one paged decode step, every sequence at `context` tokens,
  the page table as wide as the engine makes it (a power of two of pages)."""
  per_seq = -(-capacity // page_size)
  pool = PagePool(batch * per_seq + 1, page_size)
  for b in range(batch):
    pool.reserve(b, context)
  width = min(per_seq, 1 << (pool.pages_for(context) - 1).bit_length())
  table = jnp.asarray(pool.table(range(batch), width))
  graphdef, state = nnx.split(model)

  def step(state, pools, tokens, lengths, table):
    return nnx.merge(graphdef, state).step(tokens, pools, lengths, table)

  pools = jax.jit(lambda: model.init_pages(pool.num_pages, page_size))()
  tokens = jnp.zeros((batch, 1), jnp.int32)
  lengths = jnp.full((batch,), context - 1, jnp.int32)
  fn = jax.jit(step, donate_argnums=(1,))
  times = []
  for i in range(3 + steps):
    start = time.perf_counter()
    logits, pools = fn(state, pools, tokens, lengths, table)
    logits.block_until_ready()
    if i >= 3:
      times.append(time.perf_counter() - start)
  return statistics.median(times)


def part_step(bandwidth: float) -> None:
  cap, batch, ps = FLAGS.capacity, FLAGS.batch, FLAGS.page_size
  contexts = [cap // 8, cap // 4, cap // 2, cap]
  print(f"\n## Decode step against live context (capacity {cap} tokens per sequence, batch {batch}, "
        f"page size {ps}, fp32 cache)\n")
  print("| variant | context | step ms | / full-capacity step | cache MB read | cache GB/s | "
        "of read bandwidth |")
  print("|---|---:|---:|---:|---:|---:|---:|")
  for variant in FLAGS.variants:
    config = bench_config(variant, cap)
    model = Transformer(config, rngs=nnx.Rngs(0), options=RunOptions(decode_impl="auto"))
    per_token = 4 * config.cache_elements_per_token() * config.num_layers
    rows = {c: time_step(model, batch, c, cap, ps, FLAGS.steps) for c in contexts}
    for c, t in rows.items():
      read = batch * c * per_token
      print(f"| {variant} | {c} | {1e3 * t:.2f} | {t / rows[cap]:.2f} | {read / 1e6:.1f} | {read / t / 1e9:.2f} | "
            f"{read / t / bandwidth:.0%} |")


# ----------------------------------------------------------------------------- workload


def workload(n: int, vocab: int, seed: int = 0) -> list[Request]:
  rng = np.random.default_rng(seed)
  return [Request(tuple(int(t) for t in rng.integers(0, vocab, int(rng.integers(16, 513)))),
                  int(rng.integers(16, 257)), id=i) for i in range(n)]


def _tests_on_path():
  # the frozen dense generate of the commit before the engine, and the tests' weight
  # randomiser (zero output projections would hide attention), live with the tests
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))


def run_dense(model, requests):
  _tests_on_path()
  from reference_generate import generate
  width = max(len(r.prompt) for r in requests)
  prompts = np.zeros((len(requests), width), np.int32)
  for b, r in enumerate(requests):
    prompts[b, :len(r.prompt)] = r.prompt
  out = generate(model, prompts, [len(r.prompt) for r in requests],
                 max_new_tokens=max(r.max_new_tokens for r in requests))
  return {r.id: out.tokens[b, :r.max_new_tokens].tolist() for b, r in enumerate(requests)}


def run_engine(model, requests, max_len):
  engine = Engine(model, max_seqs=FLAGS.max_seqs, page_size=FLAGS.page_size, max_len=max_len, prefill_chunk=128)
  done = {f.id: f.tokens for f in engine.run(requests)}
  return done, engine


def part_workload(parts) -> None:
  config = bench_config(FLAGS.workload_variant, 1024)
  model = Transformer(config, rngs=nnx.Rngs(0), options=RunOptions(decode_impl="auto"))
  _tests_on_path()
  from helpers import randomize
  randomize(model, std=0.05)
  requests = workload(FLAGS.requests, config.vocab_size)
  wanted = sum(r.max_new_tokens for r in requests)
  max_len = max(len(r.prompt) for r in requests) + max(r.max_new_tokens for r in requests)
  print(f"\n## Mixed workload: {len(requests)} requests, prompts {min(len(r.prompt) for r in requests)}-"
        f"{max(len(r.prompt) for r in requests)} tokens, outputs {min(r.max_new_tokens for r in requests)}-"
        f"{max(r.max_new_tokens for r in requests)} ({wanted} requested tokens); {FLAGS.workload_variant}, "
        f"engine: {FLAGS.max_seqs} sequences in flight, pages of {FLAGS.page_size}\n")
  results = {}
  for name, fn in (("dense generate (previous commit)", lambda: run_dense(model, requests)),
                   ("engine", lambda: run_engine(model, requests, max_len))):
    fn()                                                       # compile
    start = time.perf_counter()
    out = fn()
    results[name] = (time.perf_counter() - start, out)
  dense_s, dense_tokens = results["dense generate (previous commit)"]
  engine_s, (engine_tokens, engine) = results["engine"]
  same = sum(dense_tokens[i] == engine_tokens[i] for i in dense_tokens)
  if "throughput" in parts:
    print("| decoder | seconds | requested tokens/s | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| dense generate (previous commit) | {dense_s:.1f} | {wanted / dense_s:.0f} | 1.00 |")
    print(f"| engine | {engine_s:.1f} | {wanted / engine_s:.0f} | {dense_s / engine_s:.2f} |")
    print(f"\n(greedy outputs identical for {same} of {len(requests)} requests)")
  if "memory" in parts:
    per_token = engine.cache_bytes_per_page() // FLAGS.page_size
    dense_bytes = len(requests) * max_len * per_token
    high = engine.pool.high_water * engine.cache_bytes_per_page()
    print("\n| cache | MB | ratio |")
    print("|---|---:|---:|")
    print(f"| dense, batch {len(requests)} x {max_len} slots | {dense_bytes / 1e6:.1f} | 1.00 |")
    print(f"| engine pool allocated ({engine.pool.num_pages - 1} pages) | "
          f"{(engine.pool.num_pages - 1) * engine.cache_bytes_per_page() / 1e6:.1f} | "
          f"{(engine.pool.num_pages - 1) * engine.cache_bytes_per_page() / dense_bytes:.2f} |")
    print(f"| engine high-water ({engine.pool.high_water} pages) | {high / 1e6:.1f} | {high / dense_bytes:.2f} |")


def main(argv):
  del argv
  print(f"# Engine benchmarks on {cpu_model()}, JAX {jax.__version__}, {jax.device_count()} device(s)")
  bandwidth = read_bandwidth()
  print(f"\nmeasured memory read bandwidth (jitted sum over 1 GiB, best of 5): {bandwidth / 1e9:.1f} GB/s")
  parts = set(FLAGS.parts)
  if "step" in parts:
    part_step(bandwidth)
  if parts & {"throughput", "memory"}:
    part_workload(parts)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
