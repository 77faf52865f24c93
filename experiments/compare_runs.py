"""How far two runs' logged losses are apart, step by step (e.g. the same flagfile
trained by two commits: `git worktree add /tmp/old <commit>`, run the flagfile in
each checkout with its own --output_dir, then compare).

    .venv/bin/python -m experiments.compare_runs /tmp/run_old /tmp/run_new --first=50

Prints the largest relative difference of the training losses over the first
`--first` steps and over all common steps, and every validation loss side by side.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags

from experiments import cli

from experiments.trainer import read_metrics

flags.DEFINE_integer("first", 50, "Also report the largest difference over the first N steps.")
FLAGS = flags.FLAGS


def losses(run_dir: str, kind: str) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r.get("kind") == kind}


def largest_relative(a: dict[int, float], b: dict[int, float], steps) -> tuple[float, int]:
  """(the largest |a - b| / |a| over `steps`, the first step where it occurs)."""
  diffs = {s: abs(a[s] - b[s]) / abs(a[s]) for s in steps}
  at = max(diffs, key=lambda s: (diffs[s], -s))
  return diffs[at], at


def main(argv):
  if len(argv) != 3 or not all(os.path.isdir(d) for d in argv[1:]):
    print("error: give two run directories, e.g. python -m experiments.compare_runs runs/a runs/b", file=sys.stderr)
    sys.exit(2)
  a, b = argv[1], argv[2]
  train_a, train_b = losses(a, "train"), losses(b, "train")
  common = sorted(set(train_a) & set(train_b))
  if not common:
    print("error: the two runs share no logged training step", file=sys.stderr)
    sys.exit(2)
  first = [s for s in common if s <= FLAGS.first]
  for what, steps in ((f"first {len(first)} steps", first), (f"all {len(common)} common steps", common)):
    worst, at = largest_relative(train_a, train_b, steps)
    print(f"training loss, {what}: largest relative difference {worst:.3g} (step {at})")
  eval_a, eval_b = losses(a, "eval"), losses(b, "eval")
  for s in sorted(set(eval_a) & set(eval_b)):
    print(f"validation loss at step {s}: {eval_a[s]:.6f} vs {eval_b[s]:.6f} (difference {abs(eval_a[s] - eval_b[s]):.3g})")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
