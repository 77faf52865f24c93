"""Training speed side by side: this library's jitted train step against the MLRA
authors' PyTorch model in eager mode, same machine, same config, one run.

    .venv/bin/pip install -e '.[torch]'      # torch==2.13.0, the CPU wheel
    git clone https://github.com/SongtaoLiu0823/MLRA /path/to/MLRA
    .venv/bin/python -m experiments.bench_torch --authors_repo=/path/to/MLRA

The authors' model files are imported from the checkout at run time (nothing of
theirs is copied here). Two of their imports cannot run on a CPU-only machine
and are replaced: flash-attn's `flash_attn_func` by torch's causal
`scaled_dot_product_attention` (same math), and `transformers` (used only for
their save / load plumbing) by a minimal stand-in.

Config (the runner issue's): Llama-3 flavour, 4 layers, d 256, 4 heads of 64,
SwiGLU 688, vocab 4096, latent 128, rope 32 (query latent 128), batch 8 x 256,
AdamW with clipping, fp32, both sides single-process on all CPU cores, in one
process with the same allocator settings (`mla_jax.host_memory`, which the
runner uses too: freed memory is reused rather than mapped afresh each step).
"""
from __future__ import annotations

import statistics
import sys
import time

from absl import app, flags

from experiments import cli

from experiments.torch_stand_ins import AUTHORS_FILE, load_authors_module, require_torch_and_repo

flags.DEFINE_string("authors_repo", None, "Path to a checkout of github.com/SongtaoLiu0823/MLRA.")
flags.DEFINE_list("variants", ["mha", "mla", "mlra4"], "Variants to compare (mha, mla, mlra4).")
flags.DEFINE_integer("batch_size", 8, "Sequences per step.")
flags.DEFINE_integer("seq_len", 256, "Tokens per sequence.")
flags.DEFINE_integer("warmup", 3, "Untimed steps on each side.")
flags.DEFINE_integer("steps", 10, "Timed steps on each side.")
FLAGS = flags.FLAGS

BENCHED = ("mha", "mla", "mlra4", "mlra2", "gla2")       # the variants our_config builds
CONFIG = dict(vocab_size=4096, n_layer=4, n_embd=256, n_head=4, head_dim=64, intermediate_size=688,
              q_lora_rank=128, kv_lora_rank=128, qk_rope_head_dim=32, qk_nope_head_dim=64)


def load_authors_model(repo: str, variant: str):
  module = load_authors_module(repo, AUTHORS_FILE[variant])
  config = module.GPTConfig(block_size=FLAGS.seq_len, **CONFIG)
  return module.GPT(config)


def torch_step_fn(model):
  """Their training step: forward, loss, backward, clip, AdamW (as in their train_*.py)."""
  import torch
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
  gen = torch.Generator().manual_seed(0)
  tokens = torch.randint(0, CONFIG["vocab_size"], (FLAGS.batch_size, FLAGS.seq_len + 1), generator=gen)
  x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

  def step():
    _, loss = model(x, targets=y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
  return step


def jax_step_fn(config):
  import jax
  import numpy as np
  from experiments.trainer import global_batch
  from mla_jax import sharding
  from mla_jax import train as T
  tc = T.TrainConfig(steps=100, batch_size=FLAGS.batch_size, seq_len=FLAGS.seq_len, learning_rate=1e-3,
                     warmup_steps=0, grad_clip=1.0, weight_decay=0.1)
  mesh = sharding.make_mesh("", config)
  graphdef, state, shardings = T.create_state(config, tc, mesh)
  run = T.make_train_step(graphdef, tc, shardings, mesh)
  rng = np.random.default_rng(0)
  tokens = global_batch(rng.integers(0, config.vocab_size, (tc.batch_size, tc.seq_len + 1)).astype(np.int32), mesh)
  box = [state]

  def step():
    box[0], m = run(box[0], tokens)
    jax.block_until_ready(m["loss"])
  return step


def interleaved(steps_a, steps_b) -> tuple[float, float, float]:
  """Alternate one step of each, so both see the same machine noise; returns
  (median seconds a, median seconds b, median of the per-round ratios b / a)."""
  for _ in range(FLAGS.warmup):
    steps_a()
    steps_b()
  ta, tb = [], []
  for _ in range(FLAGS.steps):
    t0 = time.perf_counter()
    steps_a()
    t1 = time.perf_counter()
    steps_b()
    t2 = time.perf_counter()
    ta.append(t1 - t0)
    tb.append(t2 - t1)
  return statistics.median(ta), statistics.median(tb), statistics.median(b / a for a, b in zip(ta, tb))


def our_config(variant: str):
  from mla_jax import ModelConfig, attention_config
  c = CONFIG
  if variant == "mha":
    attn = attention_config("mha", num_heads=c["n_head"], head_dim=c["head_dim"])
  else:
    attn = attention_config(variant, num_heads=c["n_head"], q_lora_rank=c["q_lora_rank"],
                            kv_lora_rank=c["kv_lora_rank"], qk_nope_head_dim=c["qk_nope_head_dim"],
                            qk_rope_head_dim=c["qk_rope_head_dim"])
  return ModelConfig(flavour="llama", vocab_size=c["vocab_size"], d_model=c["n_embd"],
                     num_layers=c["n_layer"], mlp_dim=c["intermediate_size"],
                     max_seq_len=FLAGS.seq_len, attention=attn)


def main(argv):
  del argv
  require_torch_and_repo(FLAGS.authors_repo)
  from mla_jax.host_memory import reuse_freed_memory
  # One process runs both sides, so both get the same allocator settings.
  reused = reuse_freed_memory()
  import torch
  unknown = [v for v in FLAGS.variants if v not in BENCHED]
  if unknown:
    print(f"error: no authors' model for {unknown[0]!r}; choose from {', '.join(BENCHED)}", file=sys.stderr)
    sys.exit(2)
  from mla_jax.model import count_params

  torch.manual_seed(0)
  tokens = FLAGS.batch_size * FLAGS.seq_len
  print(f"{FLAGS.batch_size} x {FLAGS.seq_len} tokens per step, fp32, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads) eager vs jax (jit); steps alternate between the two, "
        f"medians of {FLAGS.steps} after {FLAGS.warmup} warm-up; freed memory "
        f"{'reused (mla_jax.host_memory)' if reused else 'returned to the OS'} on both sides")
  print(f"{'variant':<8} {'params (ours)':>14} {'params (theirs)':>16} {'ours tok/s':>11} "
        f"{'theirs tok/s':>13} {'speed-up':>9}")
  for variant in FLAGS.variants:
    try:
      theirs = load_authors_model(FLAGS.authors_repo, variant)
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    config = our_config(variant)
    t_ours, t_theirs, ratio = interleaved(jax_step_fn(config), torch_step_fn(theirs))
    print(f"{variant:<8} {count_params(config)['total']:>14,} {sum(p.numel() for p in theirs.parameters()):>16,} "
          f"{tokens / t_ours:>11,.0f} {tokens / t_theirs:>13,.0f} {ratio:>8.2f}x", flush=True)
    del theirs


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
