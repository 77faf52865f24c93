"""Compiled cost of one checkout's training step: run by path, with PYTHONPATH=<checkout>.

    PYTHONPATH=/tmp/old python experiments/checkout_cost.py --variant=mla [runner flags]

Runs that checkout's `experiments.run --mode=bench_train` up to its first
step, compiles the step and prints one line: `COST flops=... bytes=... temp=...`
(XLA's cost analysis: flops and bytes accessed; memory analysis: temporary
bytes), then exits without training. Unlike a timing, these numbers do not move
with machine noise, so two checkouts that compile the same program print the
same line. It reaches the jitted step through the closure `make_train_step`
returns, which every checkout since the runner issue has.
"""
from __future__ import annotations

import runpy
import sys

from experiments import trainer  # the checkout's, from PYTHONPATH


def _cell(fn, test):
  return next(c.cell_contents for c in fn.__closure__ if test(c.cell_contents))


def _report_and_exit(make_train_step):
  def make(*args, **kwargs):
    run = make_train_step(*args, **kwargs)

    def first_step(state, tokens):
      from mla_jax import sharding
      jitted = _cell(run, lambda v: hasattr(v, "lower"))
      mesh = _cell(run, lambda v: type(v).__name__ == "Mesh")
      rules = _cell(run, lambda v: isinstance(v, (tuple, dict)))
      # a step that can distil also takes the teacher's params (None without one); older checkouts do not
      teacher = [c.cell_contents for name, c in zip(run.__code__.co_freevars, run.__closure__)
                 if name == "teacher_params"]
      with sharding.use_mesh(mesh, rules):
        compiled = jitted.lower(state, tokens, *teacher).compile()
      cost = compiled.cost_analysis()
      cost = cost[0] if isinstance(cost, list) else cost
      print(f"COST flops={cost.get('flops', 0):.6e} bytes={cost.get('bytes accessed', 0):.6e} "
            f"temp={compiled.memory_analysis().temp_size_in_bytes}", flush=True)
      sys.exit(0)

    return first_step

  return make


if __name__ == "__main__":
  trainer.T.make_train_step = _report_and_exit(trainer.T.make_train_step)
  sys.argv = ["experiments.run", "--mode=bench_train", "--bench_warmup=0", "--bench_steps=1", *sys.argv[1:]]
  runpy.run_module("experiments.run", run_name="__main__")
