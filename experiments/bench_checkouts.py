"""Training speed of two checkouts of this repository, alternated run by run.

    git worktree add /tmp/old <commit>
    .venv/bin/python -m experiments.bench_checkouts --old=/tmp/old --rounds=3

Each round runs `python -m experiments.run --mode=bench_train` once per variant
in each checkout (old, then new, then the next variant), so both see the same
machine noise; it prints every run's tokens/s and, per variant, the medians
and the new / old ratio of the medians. The config is the runner issue's
(Llama flavour, 4 layers, d 256, 4 heads of 64, SwiGLU 688, vocab 4096,
latent 128, rope 32, query latent 128, batch 8 x 256, fp32), the one
`experiments.bench_torch` uses.

With --cost it times nothing: per variant it compiles each checkout's step
(`experiments/checkout_cost.py`) and prints XLA's flops, bytes accessed and
temporary bytes side by side, numbers machine noise does not move:

    .venv/bin/python -m experiments.bench_checkouts --old=/tmp/old --cost \
        --variants=mha,gqa,mla,gla2,mlra4,gta,tpa,mfa
"""
from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys

from absl import app, flags

from experiments import cli

flags.DEFINE_string("old", None, "A checkout of the commit to compare against.")
flags.DEFINE_string("new", ".", "The checkout under test.")
flags.DEFINE_list("variants", ["mha", "mla", "mlra4"], "Variants to time.")
flags.DEFINE_integer("rounds", 3, "Rounds (each times every variant in both checkouts).")
flags.DEFINE_integer("steps", 10, "Timed steps per run (after 3 untimed).")
flags.DEFINE_bool("cost", False, "Compare the compiled step's cost analysis instead of timing it.")
FLAGS = flags.FLAGS

CONFIG = ["--flavour=llama", "--num_layers=4", "--d_model=256", "--num_heads=4", "--head_dim=64",
          "--mlp_dim=688", "--vocab_size=4096", "--kv_lora_rank=128", "--rope_head_dim=32", "--q_lora_rank=128",
          "--batch_size=8", "--seq_len=256", "--bench_warmup=3"]


def tokens_per_s(checkout: str, variant: str) -> float:
  cmd = [sys.executable, "-m", "experiments.run", "--mode=bench_train", f"--variant={variant}",
         f"--bench_steps={FLAGS.steps}", *CONFIG]
  out = subprocess.run(cmd, cwd=checkout, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": checkout})
  found = re.search(r"([\d,]+) tokens/s", out.stdout)
  if out.returncode or not found:
    raise RuntimeError(f"{checkout}: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.stdout}")
  return float(found.group(1).replace(",", ""))


COST_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkout_cost.py")


def compiled_cost(checkout: str, variant: str) -> dict[str, float]:
  cmd = [sys.executable, COST_SCRIPT, f"--variant={variant}", *CONFIG]
  out = subprocess.run(cmd, cwd=checkout, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": checkout})
  found = re.search(r"COST flops=(\S+) bytes=(\S+) temp=(\S+)", out.stdout)
  if out.returncode or not found:
    raise RuntimeError(f"{checkout}: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.stdout}")
  return dict(zip(("flops", "bytes", "temp"), map(float, found.groups())))


def compare_costs():
  print(f"{'variant':<8} {'flops old':>12} {'new/old':>8} {'bytes old':>12} {'new/old':>8} "
        f"{'temp old':>12} {'new/old':>8}")
  for variant in FLAGS.variants:
    old, new = (compiled_cost(os.path.abspath(p), variant) for p in (FLAGS.old, FLAGS.new))
    cells = "".join(f" {old[k]:>12.4e} {new[k] / old[k]:>8.4f}" for k in ("flops", "bytes", "temp"))
    print(f"{variant:<8}{cells}", flush=True)


def main(argv):
  del argv
  if not FLAGS.old:
    print("error: pass --old=PATH (a checkout of the commit to compare against)", file=sys.stderr)
    sys.exit(2)
  if FLAGS.cost:
    compare_costs()
    return
  runs: dict[tuple[str, str], list[float]] = {}
  for r in range(FLAGS.rounds):
    for variant in FLAGS.variants:
      for side, path in (("old", FLAGS.old), ("new", FLAGS.new)):
        runs.setdefault((variant, side), []).append(tokens_per_s(os.path.abspath(path), variant))
      print(f"round {r + 1} {variant:6s} old {runs[(variant, 'old')][-1]:>8,.0f}  new "
            f"{runs[(variant, 'new')][-1]:>8,.0f} tokens/s", flush=True)
  print(f"\n{'variant':<8} {'old (median)':>13} {'new (median)':>13} {'new / old':>10}")
  for variant in FLAGS.variants:
    old, new = statistics.median(runs[(variant, "old")]), statistics.median(runs[(variant, "new")])
    print(f"{variant:<8} {old:>13,.0f} {new:>13,.0f} {new / old:>9.3f}x")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
