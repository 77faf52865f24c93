"""Training parity with the MLRA authors' code: their PyTorch model (imported from
a checkout of github.com/SongtaoLiu0823/MLRA at run time; nothing of theirs is
copied here) and ours, from the same initial weights (theirs, drawn by their
code and converted into ours), trained on the same batches of our pipeline with
the same recipe: AdamW (betas, eps 1e-8, decoupled decay), our warm-up + cosine
schedule (their `get_lr` is the same formula), global-norm clipping, and one
weight-decay mask on both sides. Prints both per-step losses, their largest
difference and both final validation losses; writes a CSV per run.

    .venv/bin/pip install -e '.[torch]'
    .venv/bin/python -m experiments.authors_parity --authors_repo=/path/to/MLRA \\
        --variants=mha,mla,mlra4
    .venv/bin/python -m experiments.authors_parity --page     # results/authors_parity.md from the CSVs

Model, data and recipe come from the variant's line of `--sweep` (its flagfile,
SwiGLU width and extra flags), as the sweep itself runs it, plus `--seed` and any
`--runner_flags`. `--decay=norms_excluded` (ours, and nanoGPT's rank >= 2 rule
on their layout, where every norm weight is a vector) or `--decay=all` on the
torch side only (what their train_*.py do: every parameter goes to AdamW with
weight_decay=0.1); `all` is not parity, it shows what their own scripts add.
"""
from __future__ import annotations

import csv
import json
import math
import os
import shlex
import sys
import time

from absl import app, flags

from experiments import cli, options
from experiments.torch_stand_ins import AUTHORS_FILE, load_authors_module, require_torch_and_repo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOGS = os.path.join(REPO, "results", "authors_parity_logs")

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The tool's flags (defined when it runs, so that tests import its functions)."""
  flags.DEFINE_string("authors_repo", None, "A checkout of github.com/SongtaoLiu0823/MLRA.")
  flags.DEFINE_list("variants", ["mha", "mla", "mlra4"], "Variants to train on both sides.")
  flags.DEFINE_string("sweep", os.path.join(REPO, "experiments", "sweeps", "mlra_cpu.sweep"),
                      "The sweep whose per-variant lines (flagfile, SwiGLU width, extra flags) are run.")
  flags.DEFINE_enum("decay", "norms_excluded", ["norms_excluded", "all"],
                    "Which parameters decay on the torch side (ours: norm weights and biases never do).")
  flags.DEFINE_integer("seed", 0, "The run's seed (their initial weights: torch.manual_seed; our data order).")
  flags.DEFINE_string("runner_flags", "", "More runner flags, e.g. '--steps=20' for a short check.")
  flags.DEFINE_string("parity_logs", LOGS, "Where the per-run CSVs go.")
  flags.DEFINE_bool("page", False, "Build results/authors_parity.md from the CSVs in --parity_logs instead of "
                                   "training.")


def sweep_flags(sweep: str, variant: str) -> list[str]:
  """The runner flags of the variant's line in the sweep file: its flagfile, then its own."""
  with open(sweep) as f:
    for line in f:
      words = shlex.split(line, comments=True)
      if words and words[0] == variant:
        return [f"--flagfile={os.path.join(REPO, words[1])}"] + [w for w in words[2:] if w.startswith("--")]
  raise ValueError(f"{variant!r} has no line in {sweep}")


def sweep_config(sweep: str, variant: str, seed: int, extra: list[str] = ()):
  """The runner's full config for the variant's sweep line at `seed` (plus `extra` runner flags)."""
  return options.build(options.parse([sys.argv[0]] + sweep_flags(sweep, variant) + [f"--seed={seed}", *extra]))


def authors_draw(repo: str, variant: str, config, seed: int, scales: bool = True):
  """The authors' model as their code draws it (`torch.manual_seed(seed)`), and
  the same weights converted into ours: (theirs, ours)."""
  import torch

  from mla_jax import convert
  torch.manual_seed(seed)
  module = load_authors_module(repo, AUTHORS_FILE[variant] + ("" if scales else "_no_scale"))
  theirs = module.GPT(module.GPTConfig(**authors_kwargs(config)))
  tensors = {k: v.detach().numpy().copy() for k, v in theirs.state_dict().items()}
  return theirs, convert.to_model(variant, tensors, config_json=authors_kwargs(config), scales=scales)


def authors_kwargs(config) -> dict:
  """Their GPTConfig for our config (their keys as in their config/train_*.py)."""
  a = config.attention
  out = dict(vocab_size=config.vocab_size, n_layer=config.num_layers, n_embd=config.d_model, n_head=a.num_heads,
             intermediate_size=config.mlp_dim, block_size=config.max_seq_len)
  if a.variant in ("mha", "mqa", "gqa", "gta"):
    out["head_dim"] = a.head_dim
    if a.variant != "mha":
      out["group_size"] = a.num_heads // a.num_kv_heads
  elif a.variant == "tpa":
    out.update(head_dim=a.head_dim, rank=a.k_rank, q_rank=a.q_rank)
  elif a.variant == "mfa":
    out.update(head_dim=a.head_dim, share_q_dim=a.q_lora_rank)
  else:
    out.update(q_lora_rank=a.q_lora_rank, kv_lora_rank=a.kv_lora_rank, qk_nope_head_dim=a.qk_nope_head_dim,
               qk_rope_head_dim=a.qk_rope_head_dim)
  return out


def warmup_cosine(step: int, tc) -> float:
  """Their get_lr (train_*.py) at iteration `step`, with our config's values."""
  floor = tc.learning_rate * tc.min_lr_ratio
  if step < tc.warmup_steps:
    return tc.learning_rate * step / tc.warmup_steps
  ratio = min(step - tc.warmup_steps, tc.steps - tc.warmup_steps) / max(tc.steps - tc.warmup_steps, 1)
  return floor + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (tc.learning_rate - floor)


def our_training(cfg, model):
  """The runner's batches, validation set, train and eval steps for `model` (our
  model with given weights): (batches, val, mesh, state, step_fn, eval_fn)."""
  import jax

  from experiments import trainer
  from mla_jax import sharding
  from mla_jax import train as T
  from mla_jax.data import pipeline
  tc = cfg.train
  data = trainer.prepare_data(cfg.data)
  batches = pipeline.PackedBatches(data.sources["train"], data.tokenizer, seq_len=tc.seq_len,
                                   batch_size=tc.batch_size, seed=tc.seed)
  val = pipeline.fixed_batches(data.sources["validation"], data.tokenizer, seq_len=tc.seq_len,
                               batch_size=cfg.loop.eval_batch_size, num_batches=cfg.loop.eval_batches)
  mesh = sharding.make_mesh("", cfg.model)
  graphdef, params = T.split_model(model)
  state = T.init_state(params, T.make_optimizer(tc))
  shardings = T.state_shardings(state, mesh)
  state = jax.device_put(state, shardings)
  return (batches, val, mesh, state, T.make_train_step(graphdef, tc, shardings, mesh),
          T.make_eval_step(graphdef, mesh))


def run_variant(variant: str) -> dict:
  import numpy as np
  import torch

  from experiments import trainer
  from mla_jax.model import Transformer

  cfg = sweep_config(FLAGS.sweep, variant, FLAGS.seed, shlex.split(FLAGS.runner_flags))
  config, tc = cfg.model, cfg.train
  scales = getattr(config.attention, "scales", True)
  if not scales and variant not in ("mla", "gla2", "mlra2"):    # their scale ablation's own files
    raise ValueError(f"the authors' code has no {variant} without variance scales (only mla, gla2, mlra2); "
                     "drop --nolatent_scales")
  theirs, ours = authors_draw(FLAGS.authors_repo, variant, config, tc.seed, scales)
  # the converted model must be the sweep's model, parameter for parameter
  from flax import nnx
  want = {p: v.shape for p, v in nnx.to_flat_state(nnx.state(
      nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))), nnx.Param))}
  got = {p: v.get_value().shape for p, v in nnx.to_flat_state(nnx.state(ours, nnx.Param))}
  if want != got:
    raise ValueError(f"{variant}: their model at {authors_kwargs(config)} is not the sweep's model "
                     f"({sorted(set(want.items()) ^ set(got.items()), key=str)[:3]})")

  batches, val, mesh, state, step_fn, eval_fn = our_training(cfg, ours)

  named = dict(theirs.named_parameters())        # the tied embedding once
  decays = (lambda n, p: True) if FLAGS.decay == "all" else (lambda n, p: p.ndim >= 2)
  groups = [{"params": [p for n, p in named.items() if decays(n, p)], "weight_decay": tc.weight_decay},
            {"params": [p for n, p in named.items() if not decays(n, p)], "weight_decay": 0.0}]
  opt = torch.optim.AdamW(groups, lr=tc.learning_rate, betas=(tc.b1, tc.b2), eps=1e-8)
  theirs.train()

  os.makedirs(FLAGS.parity_logs, exist_ok=True)
  name = _name(dict(variant=variant, seed=tc.seed, decay=FLAGS.decay))
  path = os.path.join(FLAGS.parity_logs, f"{name}.csv")
  rows, t0 = [], time.time()
  from tqdm import tqdm
  for step in tqdm(range(tc.steps), desc=variant, unit="step", file=sys.stderr, disable=not cfg.loop.progress):
    tokens = next(batches)["tokens"]
    state, m = step_fn(state, trainer.global_batch(tokens, mesh))
    for g in opt.param_groups:
      g["lr"] = warmup_cosine(step, tc)
    x = torch.as_tensor(tokens[:, :-1].astype(np.int64))
    y = torch.as_tensor(tokens[:, 1:].astype(np.int64))
    _, loss = theirs(x, targets=y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(theirs.parameters(), tc.grad_clip)) if tc.grad_clip else 0.0
    opt.step()
    rows.append(dict(step=step + 1, lr=warmup_cosine(step, tc), ours=float(m["loss"]), theirs=float(loss.detach()),
                     ours_grad_norm=float(m["grad_norm"]), theirs_grad_norm=grad_norm))
  ours_val = trainer.evaluate(eval_fn, state["params"], val, mesh)["loss"]
  theirs.eval()
  with torch.no_grad():
    theirs_val = float(np.mean([float(theirs(torch.as_tensor(b[:, :-1].astype(np.int64)),
                                             targets=torch.as_tensor(b[:, 1:].astype(np.int64)))[1]) for b in val]))
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  diffs = [abs(r["ours"] - r["theirs"]) / r["theirs"] for r in rows]
  first_apart = next((r["step"] for r, d in zip(rows, diffs) if d > 1e-4), None)
  summary = dict(variant=variant, seed=tc.seed, decay=FLAGS.decay, steps=tc.steps, ours_val=ours_val,
                 theirs_val=theirs_val, largest_relative_difference=max(diffs), first_step_apart_1e4=first_apart,
                 ours_final=rows[-1]["ours"], theirs_final=rows[-1]["theirs"], seconds=round(time.time() - t0),
                 torch=torch.__version__, config=authors_kwargs(config))
  with open(os.path.join(FLAGS.parity_logs, f"{name}.json"), "w") as f:
    json.dump(summary, f, indent=1)
  return summary


def page(log_dir: str, chart_path: str | None = None) -> str:
  """The results page's markdown for the runs in `log_dir` (and its chart at `chart_path`)."""
  runs = []
  for name in sorted(os.listdir(log_dir)):
    if name.endswith(".json"):
      with open(os.path.join(log_dir, name)) as f:
        runs.append(json.load(f))
  lines = ["# Training parity with the MLRA authors' code", "",
           "Built by `python -m experiments.authors_parity --page` from `results/authors_parity_logs/` "
           "(one CSV of per-step losses and one JSON summary per run), which "
           "`python -m experiments.authors_parity --authors_repo=PATH --variants=...` writes (the "
           "sweep's config of `experiments/sweeps/mlra_cpu.sweep`). Both sides start "
           "from the authors' initial weights (drawn by their code, converted into ours) and see the same "
           "batches of our pipeline with the same recipe; validation loss is on the sweep's validation "
           "batches (nats per token).", "",
           "| variant | seed | decay (torch side) | steps | val loss ours | val loss theirs | "
           "largest per-step difference | last step within 1e-6 | first apart by 1e-4 | "
           "largest gradient norm (step), ours | theirs |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in runs:
    rows = _rows(log_dir, r)
    close = [int(x["step"]) for x in rows if abs(float(x["ours"]) - float(x["theirs"])) <= 1e-6 * float(x["theirs"])]
    within = next((t - 1 for s, t in zip(close, range(1, len(rows) + 1)) if s != t), len(close))
    spike = {side: max(rows, key=lambda x: float(x[f"{side}_grad_norm"])) for side in ("ours", "theirs")}
    lines.append(f"| {r['variant']} | {r['seed']} | {r['decay']} | {r['steps']} | {r['ours_val']:.4f} | "
                 f"{r['theirs_val']:.4f} | {r['largest_relative_difference']:.1e} | {within} | "
                 f"{r['first_step_apart_1e4'] or 'never'} | "
                 + " | ".join(f"{float(spike[s][f'{s}_grad_norm']):.1f} ({spike[s]['step']})" for s in ("ours", "theirs"))
                 + " |")
  if runs and chart_path:
    lines += ["", f"![per-step losses and their relative difference]({os.path.basename(chart_path)})"]
    chart(log_dir, runs, chart_path)
  return "\n".join(lines) + "\n"


def _name(run: dict) -> str:
  return f"{run['variant']}_seed{run['seed']}" + ("_decay_all" if run["decay"] == "all" else "")


def _rows(log_dir: str, run: dict) -> list[dict]:
  with open(os.path.join(log_dir, f"{_name(run)}.csv")) as f:
    return list(csv.DictReader(f))


def chart(log_dir: str, runs: list[dict], path: str) -> None:
  """Left: both sides' per-step training losses; right: |ours - theirs| / theirs per step."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
  for i, r in enumerate(runs):
    name, rows = _name(r), _rows(log_dir, r)
    steps = [int(x["step"]) for x in rows]
    ours, theirs = [float(x["ours"]) for x in rows], [float(x["theirs"]) for x in rows]
    color = f"C{i}"
    left.plot(steps, ours, color=color, lw=1.2, label=f"{name} ours")
    left.plot(steps, theirs, color=color, lw=1.2, ls="--", label=f"{name} theirs")
    right.semilogy(steps, [max(abs(a - b) / b, 1e-9) for a, b in zip(ours, theirs)], color=color, label=name)
  left.set(xlabel="step", ylabel="training loss (nats / token)", title="ours (solid) and the authors' code (dashed)")
  right.set(xlabel="step", ylabel="|ours - theirs| / theirs", title="per-step relative difference")
  save_two_panels(fig, left, right, path)


def save_two_panels(fig, left, right, path: str) -> None:
  """The tools' two-panel charts: grids, legends, saved at 120 dpi and closed."""
  import matplotlib.pyplot as plt
  for ax in (left, right):
    ax.grid(alpha=0.3)
  left.legend(fontsize=7, ncol=2)
  right.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  if FLAGS.page:
    text = page(FLAGS.parity_logs, os.path.join(REPO, "results", "authors_parity.png"))
    with open(os.path.join(REPO, "results", "authors_parity.md"), "w") as f:
      f.write(text)
    print(text)
    return
  require_torch_and_repo(FLAGS.authors_repo)
  if not os.path.isfile(FLAGS.sweep):
    print(f"error: --sweep={FLAGS.sweep} does not exist; pass a sweep file such as "
          "experiments/sweeps/mlra_cpu.sweep", file=sys.stderr)
    sys.exit(2)
  unknown = [v for v in FLAGS.variants if v not in AUTHORS_FILE]
  if unknown:
    print(f"error: no authors' model for {unknown[0]!r}; choose from {', '.join(AUTHORS_FILE)}", file=sys.stderr)
    sys.exit(2)
  try:
    for variant in FLAGS.variants:
      s = run_variant(variant)
      print(f"{variant:6s} seed {s['seed']}: final train loss ours {s['ours_final']:.4f} theirs "
            f"{s['theirs_final']:.4f}; val ours {s['ours_val']:.4f} theirs {s['theirs_val']:.4f}; largest "
            f"per-step difference {s['largest_relative_difference']:.1e} (first apart by 1e-4 at step "
            f"{s['first_step_apart_1e4']}); {s['seconds']} s", flush=True)
  except (ValueError, flags.Error) as e:           # a bad value, or a --runner_flags flag the runner lacks
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
