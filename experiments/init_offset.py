"""Why does our trainer end ~0.2 nats higher from the MLRA authors' torch-drawn
initial weights than from our JAX-drawn ones, when both are N(0, 0.02) with the
same zero and one tensors? Trains our model only (the runner's recipe, data and
evaluation, as `authors_parity` does) from a mixed init: the parameter groups in
a combination come from the authors' draw (`torch.manual_seed(seed)`, their
model, converted), the rest from ours (`nnx.Rngs(seed)`). Bisection: one group
at a time. Noise test: `none` against `all` over many seeds, with Welch's t.

    .venv/bin/python -m experiments.init_offset --authors_repo=/path/to/MLRA \\
        --combos=none,all,embed,attention,mlp --seeds=0
    .venv/bin/python -m experiments.init_offset --page     # results/init_offset.md from the logs

Groups: `embed` (the tied embedding), `attention` (every attention weight),
`mlp` (every MLP weight); norms are ones on both sides. One JSON per run in
`--logs` (per-step training loss and gradient norm, validation loss at every
`--eval_every` of the recipe); finished runs are skipped, so it resumes.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

from absl import app, flags

from experiments import authors_parity, cli
from experiments.torch_stand_ins import AUTHORS_FILE, require_torch_and_repo

REPO = authors_parity.REPO
LOGS = os.path.join(REPO, "results", "init_offset_logs")
GROUPS = ("embed", "attention", "mlp")
FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("authors_repo", None, "A checkout of github.com/SongtaoLiu0823/MLRA.")
  flags.DEFINE_string("variant", "mha", "The variant (its line of --sweep).")
  flags.DEFINE_string("sweep", os.path.join(REPO, "experiments", "sweeps", "mlra_cpu.sweep"), "The sweep file.")
  flags.DEFINE_list("combos", ["none", "all"], "Init combinations: none, all, or groups joined by '+' "
                    f"({', '.join(GROUPS)}) taken from the authors' draw.")
  flags.DEFINE_list("seeds", ["0"], "Seeds (each seeds both draws and the data order).")
  flags.DEFINE_integer("draw_seed_offset", 0, "Draw the initial weights from seed + this (the data order stays "
                       "seed's): with --combos=none, a fresh JAX draw on the same batches, the control for how "
                       "far any redraw moves the result.")
  flags.DEFINE_string("logs", LOGS, "Where the per-run JSONs go.")
  flags.DEFINE_bool("page", False, "Build results/init_offset.md from --logs instead of training.")


def group_of(path: tuple) -> str:
  """The init group of one of our parameter paths."""
  if path[0] == "embed":
    return "embed"
  if any("norm" in str(part) for part in path):
    return "norm"
  for part in path:
    if part in ("attn", "attention"):
      return "attention"
    if part == "mlp":
      return "mlp"
  raise ValueError(f"no init group for parameter {'/'.join(map(str, path))}")


def combo_groups(combo: str) -> set[str]:
  if combo == "none":
    return set()
  if combo == "all":
    return set(GROUPS)
  groups = set(combo.split("+"))
  if not groups <= set(GROUPS):
    raise ValueError(f"--combos: {combo!r} names {sorted(groups - set(GROUPS))}; use none, all or "
                     f"groups of {', '.join(GROUPS)} joined by '+'")
  return groups


def mix(model, drawn, from_torch: set[str]):
  """`model` with the parameters of the groups in `from_torch` replaced by `drawn`'s
  (another model of the same config: the authors' weights converted)."""
  from flax import nnx
  other = {path: v.get_value() for path, v in nnx.to_flat_state(nnx.state(drawn, nnx.Param))}
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  for path, v in flat:
    if group_of(path) in from_torch:
      if other[path].shape != v.get_value().shape:
        raise ValueError(f"{'/'.join(map(str, path))}: the authors' draw has shape {other[path].shape}, ours "
                         f"{v.get_value().shape}")
      v.set_value(other[path])
  nnx.update(model, nnx.from_flat_state(flat))
  return model


def mixed_params(config, variant: str, seed: int, from_torch: set[str]):
  """Our model: the groups in `from_torch` from the authors' draw, the rest from ours."""
  from flax import nnx

  from mla_jax.model import Transformer
  ours = Transformer(config, rngs=nnx.Rngs(seed))
  if not from_torch:
    return ours
  _, theirs = authors_parity.authors_draw(FLAGS.authors_repo, variant, config, seed)
  return mix(ours, theirs, from_torch)


def log_name(variant: str, combo: str, seed: int, draw_offset: int) -> str:
  return f"{variant}_{combo}{f'_draw+{draw_offset}' if draw_offset else ''}_seed{seed}.json"


def run_one(variant: str, combo: str, seed: int, draw_offset: int = 0) -> dict:
  from experiments import trainer

  cfg = authors_parity.sweep_config(FLAGS.sweep, variant, seed, ["--noprogress"])
  config, tc = cfg.model, cfg.train
  model = mixed_params(config, variant, seed + draw_offset, combo_groups(combo))
  batches, val, mesh, state, step_fn, eval_fn = authors_parity.our_training(cfg, model)
  train, evals, t0 = [], [], time.time()
  for step in range(1, tc.steps + 1):
    state, m = step_fn(state, trainer.global_batch(next(batches)["tokens"], mesh))
    train.append((float(m["loss"]), float(m["grad_norm"])))
    if step % cfg.loop.eval_every == 0 or step == tc.steps:
      evals.append((step, trainer.evaluate(eval_fn, state["params"], val, mesh)["loss"]))
  return dict(variant=variant, combo=combo, seed=seed, draw_offset=draw_offset, steps=tc.steps, val=evals[-1][1], evals=evals,
              train_loss=[x for x, _ in train], grad_norm=[g for _, g in train], seconds=round(time.time() - t0))


def welch(a: list[float], b: list[float]) -> tuple[float, float]:
  """Welch's t and its two-sided p-value."""
  from scipy import stats
  r = stats.ttest_ind(a, b, equal_var=False)
  return float(r.statistic), float(r.pvalue)


def _paired(val: dict, a: tuple, b: tuple) -> list[tuple[int, float]]:
  """(seed, b - a) for the seeds both rows ran."""
  return [(k, val[b][k] - val[a][k]) for k in sorted(set(val.get(a, {})) & set(val.get(b, {})))]


def chart(runs: list[dict], path: str) -> None:
  """Left: each seed's final validation loss per init (a line joins one seed's runs,
  which saw the same batches); right: every run's validation curve."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  label = lambda r: r["combo"] + (f", draw k+{r['draw_offset']}" if r.get("draw_offset") else "")
  inits = sorted({label(r) for r in runs}, key=lambda x: (x != "none", x != "all", x))
  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
  for seed in sorted({r["seed"] for r in runs}):
    mine = sorted((inits.index(label(r)), r["val"]) for r in runs if r["seed"] == seed)
    left.plot([x for x, _ in mine], [v for _, v in mine], "o-", color=f"C{seed % 10}", lw=0.8, label=f"seed {seed}")
  left.set_xticks(range(len(inits)), inits, rotation=20, fontsize=8)
  left.set(ylabel="final validation loss (nats / token)", title="per seed, by initial weights")
  for r in runs:
    i = inits.index(label(r))
    right.plot([s for s, _ in r["evals"]], [v for _, v in r["evals"]], color=f"C{i}", lw=0.8, alpha=0.7,
               label=label(r) if r is next(q for q in runs if label(q) == label(r)) else None)
  right.set(xlabel="step", ylabel="validation loss", title="validation curves, coloured by initial weights",
            ylim=(None, 4.0))
  authors_parity.save_two_panels(fig, left, right, path)


def page(log_dir: str, chart_path: str | None = None) -> str:
  from scipy import stats
  runs = []
  for name in sorted(os.listdir(log_dir)) if os.path.isdir(log_dir) else []:
    if name.endswith(".json"):
      with open(os.path.join(log_dir, name)) as f:
        runs.append(json.load(f))
  val = {}                                   # (variant, combo, draw offset) -> {seed: final val loss}
  for r in runs:
    val.setdefault((r["variant"], r["combo"], r.get("draw_offset", 0)), {})[r["seed"]] = r["val"]
  lines = ["# Init-draw offset: our trainer from the authors' torch draw and from our JAX draw", "",
           "Written by `python -m experiments.init_offset --page` from `results/init_offset_logs/` (one JSON per "
           "run, written by `python -m experiments.init_offset --authors_repo=PATH --combos=... --seeds=...`). "
           "Our model and recipe only (the MLRA sweep's line for the variant, 300 steps); the groups named take "
           "the authors' draw (`torch.manual_seed(seed)`, their model, converted), the rest ours "
           "(`nnx.Rngs(seed)`). Seed k also sets the data order, so seed k of every row sees the same batches; "
           "`--draw_seed_offset=N` draws the weights from seed k+N instead (same batches, another draw).", "",
           "| variant | from the authors' draw | draws seeded | seeds | final val loss (mean ± sd) | per seed |",
           "|---|---|---|---|---|---|"]
  for (variant, combo, off), by_seed in sorted(val.items()):
    vals = [by_seed[k] for k in sorted(by_seed)]
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    lines.append(f"| {variant} | {combo} | {f'k+{off}' if off else 'k'} | {','.join(map(str, sorted(by_seed)))} | "
                 f"{statistics.mean(vals):.4f} ± {sd:.4f} | {', '.join(f'{v:.3f}' for v in vals)} |")
  for variant in sorted({v for v, _, _ in val}):
    ours, theirs = (variant, "none", 0), (variant, "all", 0)
    a, b = list(val.get(ours, {}).values()), list(val.get(theirs, {}).values())
    if len(a) < 2 or len(b) < 2:
      continue
    t, p = welch(a, b)
    enough = min(len(a), len(b)) >= 8
    lines += ["", f"**{variant}**, JAX draw ({len(a)} seeds) against the authors' draw ({len(b)} seeds): "
              f"difference {statistics.mean(b) - statistics.mean(a):+.4f}, Welch's t {t:.2f}, p = {p:.2g}. "
              + (("At 8 or more seeds a side, the authors' draw trains "
                  + ("worse than ours beyond seed noise." if p < 0.05 and t < 0 else
                     "better than ours beyond seed noise." if p < 0.05 else
                     "indistinguishably from ours: the difference is within seed noise (p >= 0.05)."))
                 if enough else "Fewer than 8 seeds a side: not settled.")]
    d = _paired(val, ours, theirs)
    if len(d) >= 2:
      p_rel = float(stats.ttest_rel([val[theirs][k] for k, _ in d], [val[ours][k] for k, _ in d]).pvalue)
      x = [v for _, v in d]
      lines += ["", f"Paired by seed (the same batches), authors' draw minus ours: "
                f"{', '.join(f'{v:+.3f}' for v in x)} (mean {statistics.mean(x):+.3f} ± {statistics.stdev(x):.3f}); "
                f"paired t-test p = {p_rel:.2g}."]
    for _, _, off in sorted(k for k in val if k[:2] == (variant, "none") and k[2]):
      redraw = _paired(val, ours, (variant, "none", off))
      if len(redraw) >= 2:
        lines += ["", f"Control, another JAX draw on the same batches (draws seeded k+{off}) minus ours: "
                  + ", ".join(f"seed {k} {x:+.3f}" for k, x in redraw)
                  + f" (mean |difference| {statistics.mean(abs(x) for _, x in redraw):.3f}), what any redraw does; "
                  "the authors' draw on the same seeds: "
                  + ", ".join(f"{val[theirs][k] - val[ours][k]:+.3f}" for k, _ in redraw if k in val[theirs]) + "."]
  if runs and chart_path:
    lines += ["", f"![final validation loss per seed and validation curves]({os.path.basename(chart_path)})"]
    chart(runs, chart_path)
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  if FLAGS.page:
    text = page(FLAGS.logs, os.path.join(REPO, "results", "init_offset.png"))
    with open(os.path.join(REPO, "results", "init_offset.md"), "w") as f:
      f.write(text)
    print(text)
    return
  require_torch_and_repo(FLAGS.authors_repo)
  try:
    combos = [(c, combo_groups(c)) for c in FLAGS.combos]
    seeds = [int(s) for s in FLAGS.seeds]
  except ValueError as e:
    print(f"error: {e}" if "combos" in str(e) else f"error: --seeds takes integers ({e})", file=sys.stderr)
    sys.exit(2)
  if FLAGS.variant not in AUTHORS_FILE:
    print(f"error: no authors' model for {FLAGS.variant!r}; choose from {', '.join(AUTHORS_FILE)}", file=sys.stderr)
    sys.exit(2)
  os.makedirs(FLAGS.logs, exist_ok=True)
  for seed in seeds:
    for combo, _ in combos:
      path = os.path.join(FLAGS.logs, log_name(FLAGS.variant, combo, seed, FLAGS.draw_seed_offset))
      if os.path.exists(path):
        continue
      r = run_one(FLAGS.variant, combo, seed, FLAGS.draw_seed_offset)
      with open(path + ".tmp", "w") as f:
        json.dump(r, f)
      os.replace(path + ".tmp", path)
      print(f"{FLAGS.variant} seed {seed} (draw seed {seed + FLAGS.draw_seed_offset}), {combo} from the authors' "
            f"draw: val {r['val']:.4f} "
            f"({r['seconds']} s)", flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
