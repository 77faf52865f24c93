"""What each KV-cache format costs a trained model: `--mode=cache_quality`, and
the results page over a sweep's models.

Per cache format (float32, bfloat16, fp8, int8; mla_jax/quant.py), against the
float32 cache:

  val_loss, perplexity  teacher-forced through the cache: each validation window
                        is written into an empty cache of the format by one
                        `Transformer.step` and attended as stored, every key
                        quantized as decoding would see it
  kl_vs_fp32            mean KL(p_fp32 || p_format) of the next-token distributions
                        at those positions (nats)
  greedy_agreement      the share of greedy tokens equal to the float32 cache's,
                        position by position, over up to 256 new tokens from
                        fixed prompts (the validation windows' first tokens;
                        fewer new tokens where the model's context is shorter)
  first_divergence      mean new tokens before the first disagreement
  bytes_per_token       per layer (scales included) and for the whole model

    python -m experiments.run --mode=cache_quality --output_dir=RUN_DIR
    python -m experiments.cache_quality --sweep=experiments/sweeps/mlra_cpu.sweep --seeds=0
    python -m experiments.cache_quality --sweep=experiments/sweeps/mlra_cpu.sweep --seeds=0 --report_only

The second trains each run of the sweep that has no finished checkpoint (in
the sweep's own run directories, so a finished sweep is only measured), writes
`results/cache_quality_logs/<run>.csv`, and the page `results/cache_quality.md`
with its chart, rebuilt from those files by --report_only.
"""
from __future__ import annotations

import csv
import glob
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import cli
from flax import nnx

from mla_jax import quant, with_options
from mla_jax.attention.base import cache_layout
from mla_jax.engine import Sampling
from mla_jax.generate import generate

FORMATS = tuple(quant.FORMATS)
COLUMNS = ("variant", "format", "bytes_per_token_layer", "bytes_per_token_model", "val_loss", "perplexity",
           "val_loss_increase", "kl_vs_fp32", "greedy_agreement", "first_divergence", "new_tokens", "prompts",
           "tokens_scored")


@nnx.jit(static_argnames=("fmt",))
def _log_probs(model, tokens, fmt):
  """Teacher-forced next-token log-probabilities of tokens [B, T] through an empty cache in `fmt`."""
  cache = model.init_cache(tokens.shape[0], tokens.shape[1], fmt)
  logits, _ = model.step(tokens, cache, jnp.zeros((tokens.shape[0],), jnp.int32))
  return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


@jax.jit
def _scores(ref, logp, targets):
  """Summed negative log-likelihood of `targets` under logp, and summed KL(ref || logp)."""
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1).sum()
  kl = (jnp.exp(ref) * (ref - logp)).sum()
  return nll, kl


def measure(model, batches, *, prompt_len: int = 16, num_prompts: int = 8, new_tokens: int = 256,
            formats=FORMATS, progress=print) -> list[dict]:
  """One row per cache format (see the module docstring); `batches` are
  validation windows [B, seq_len + 1]; prompts are the first `prompt_len`
  tokens of the first `num_prompts` windows."""
  config = model.config
  layouts = {}
  for fmt in formats:
    try:
      layouts[fmt] = cache_layout(config.attention, fmt)
    except ValueError as e:               # a format this variant's rows cannot hold
      progress(f"  {fmt}: skipped ({e})")
  formats = [f for f in formats if f in layouts]
  nll, kl = {f: 0.0 for f in formats}, {f: 0.0 for f in formats}
  count = 0
  for i, batch in enumerate(batches):
    tokens, targets = jnp.asarray(batch[:, :-1]), jnp.asarray(batch[:, 1:])
    ref = _log_probs(model, tokens, "float32")
    for fmt in formats:
      logp = ref if fmt == "float32" else _log_probs(model, tokens, fmt)
      n, k = _scores(ref, logp, targets)
      nll[fmt] += float(n)
      kl[fmt] += float(k)
    count += targets.size
    progress(f"  teacher-forced batch {i + 1}/{len(batches)}")
  windows = np.concatenate([np.asarray(b) for b in batches])[:num_prompts]
  prompts = windows[:, :prompt_len]
  new_tokens = max(1, min(new_tokens, config.max_seq_len - prompt_len))
  greedy = {}
  for fmt in formats:
    out = generate(with_options(model, cache_dtype=fmt), prompts, [prompt_len] * len(prompts),
                   max_new_tokens=new_tokens, sampling=Sampling())
    greedy[fmt] = np.asarray(out.tokens)[:, :new_tokens]
    progress(f"  greedy decoding, {fmt} cache: {len(prompts)} x {new_tokens} tokens")
  rows = []
  base_loss = nll["float32"] / count if "float32" in nll else None
  for fmt in formats:
    same = greedy[fmt] == greedy.get("float32", greedy[fmt])
    first = [int(np.argmin(r)) if not r.all() else len(r) for r in same]
    per_layer = quant.layout_bytes_per_token(layouts[fmt])
    loss = nll[fmt] / count
    rows.append(dict(variant=config.attention.variant, format=fmt, bytes_per_token_layer=per_layer,
                     bytes_per_token_model=per_layer * config.num_layers, val_loss=loss,
                     perplexity=float(np.exp(loss)),
                     val_loss_increase=None if base_loss is None else loss - base_loss,
                     kl_vs_fp32=kl[fmt] / count, greedy_agreement=float(same.mean()),
                     first_divergence=float(np.mean(first)), new_tokens=new_tokens, prompts=len(prompts),
                     tokens_scored=count))
  return rows


# ----------------------------------------------------------------------------- tables and charts


def write_csv(rows: list[dict], path: str) -> None:
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()
    for r in rows:
      writer.writerow({k: "" if r.get(k) is None else r[k] for k in COLUMNS})


def read_csv(path: str) -> list[dict]:
  out = []
  with open(path) as f:
    for r in csv.DictReader(f):
      out.append({k: (v if k in ("variant", "format") else (float(v) if v else None)) for k, v in r.items()})
  return out


def table(rows: list[dict]) -> str:
  head = ("| variant | cache | bytes / token / layer | val loss | increase | perplexity | KL vs fp32 (nats) | "
          "greedy agreement | first divergence (tokens) |")
  lines = [head, "|---" * (head.count("|") - 1) + "|"]
  for r in rows:
    inc = "" if r["val_loss_increase"] is None else f"{r['val_loss_increase']:+.4f}"
    lines.append(f"| {r['variant']} | {r['format']} | {int(r['bytes_per_token_layer']):,} | {r['val_loss']:.4f} | "
                 f"{inc} | {r['perplexity']:.3f} | {r['kl_vs_fp32']:.2e} | {100 * r['greedy_agreement']:.1f}% | "
                 f"{r['first_divergence']:.1f} of {int(r['new_tokens'])} |")
  return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str = "") -> None:
  """Quality cost (KL vs fp32, greedy disagreement) against cache bytes per token, one line per variant."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  variants = list(dict.fromkeys(r["variant"] for r in rows))
  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 4.8))
  markers = {"float32": "o", "bfloat16": "s", "fp8": "^", "int8": "v"}
  for i, v in enumerate(variants):
    mine = [r for r in rows if r["variant"] == v and r["format"] != "float32"]
    xs = [r["bytes_per_token_layer"] for r in mine]
    ax0.plot(xs, [r["kl_vs_fp32"] for r in mine], "-", color=f"C{i % 10}", alpha=0.5)
    ax1.plot(xs, [100 * (1 - r["greedy_agreement"]) for r in mine], "-", color=f"C{i % 10}", alpha=0.5)
    for r in mine:
      ax0.plot(r["bytes_per_token_layer"], r["kl_vs_fp32"], markers[r["format"]], color=f"C{i % 10}",
               label=v if r is mine[0] else None)
      ax1.plot(r["bytes_per_token_layer"], 100 * (1 - r["greedy_agreement"]), markers[r["format"]],
               color=f"C{i % 10}")
  ax0.set_yscale("log")
  ax0.set_ylabel("mean KL(fp32 cache || this cache), nats per token")
  ax1.set_ylabel("greedy tokens that differ from the fp32 cache's (%)")
  for ax in (ax0, ax1):
    ax.set_xlabel("cache bytes per token per layer (scales included)")
    ax.grid(alpha=0.3)
  ax0.legend(fontsize=8, ncols=2, title="variant (markers: ■ bf16, ▲ fp8, ▼ int8)", title_fontsize=8)
  ax0.set_title("next-token distributions")
  ax1.set_title("greedy continuations")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write(rows: list[dict], output_dir: str, name: str = "cache_quality", title: str = "") -> dict[str, str]:
  os.makedirs(output_dir, exist_ok=True)
  paths = {ext: os.path.join(output_dir, f"{name}.{ext}") for ext in ("md", "csv", "png")}
  write_csv(rows, paths["csv"])
  with open(paths["md"], "w") as f:
    f.write((f"# {title}\n\n" if title else "") + table(rows) + "\n")
  plot(rows, paths["png"], title)
  return paths


# ----------------------------------------------------------------------------- the runner's mode


def run(run_dir: str, data_spec, *, mesh: str, rules: str, options, eval_batches: int, eval_batch_size: int,
        new_tokens: int, num_prompts: int, prompt_len: int = 16) -> list[dict]:
  """--mode=cache_quality: measure the newest checkpoint of `run_dir` and write
  cache_quality.{md,csv,png} into it."""
  from experiments import trainer
  from mla_jax import sharding
  batches = []

  def read_batches(meta):               # before anything compiles: bad sizes are one-line errors
    batches[:] = trainer.validation_batches(data_spec, meta, eval_batch_size, eval_batches)
    if meta["train_config"]["seq_len"] <= prompt_len:
      raise ValueError(f"the run's windows ({meta['train_config']['seq_len']} tokens) leave nothing after a "
                       f"{prompt_len}-token prompt")
    if len(batches) * eval_batch_size < num_prompts:
      raise ValueError(f"--quality_prompts={num_prompts} is more than the {len(batches) * eval_batch_size} "
                       "validation windows; pass fewer")

  config, model, _, meta, (_, _, mesh_obj, _) = trainer.load_run(
      run_dir, mesh, rules, options=options.replace(decode_impl="absorbed"), tokenizer=data_spec.tokenizer,
      before_compile=read_batches)
  print(f"cache quality of step {meta['step']} of {run_dir} ({config.attention.variant}): "
        f"{len(batches)} validation batches, {num_prompts} greedy prompts")
  with sharding.use_mesh(mesh_obj):
    rows = measure(model, batches, prompt_len=prompt_len, num_prompts=num_prompts, new_tokens=new_tokens)
  paths = write(rows, run_dir, title=f"Cache formats: {config.attention.variant}, step {meta['step']}")
  print(table(rows))
  print(f"\nwrote {paths['md']}, {paths['csv']} and {paths['png']}")
  return rows


# ----------------------------------------------------------------------------- the results page over a sweep

PAGE_INTRO = """# What an 8-bit KV cache costs, per variant

Written by `python -m experiments.cache_quality --sweep={sweep} --seeds={seed}`; `--report_only` rebuilds
it from `cache_quality_logs/*.csv`, which `--mode=cache_quality` wrote for each run. Models: the
CPU sweep configurations of [`{sweep_name}.md`]({sweep_name}.md), seed {seed} ({steps} steps each, the
same flags as that page's runs). Formats (`mla_jax/quant.py`): float32; bfloat16; fp8 (e4m3) and int8
with one float32 scale per token per tile of at most 128 values (a whole latent block or KV head at
these widths), the rope key kept in bfloat16. Every row is measured against the same model with a
float32 cache: teacher-forced validation loss through the cache ({tokens:,} tokens), the mean KL
divergence of the next-token distributions, and greedy decoding from {prompts} fixed prompts
(the first 16 tokens of validation windows) for {new} new tokens.

![quality cost against cache bytes](cache_quality.png)
"""


def page(rows: list[dict], *, sweep: str, seed: int, steps: int, path: str) -> None:
  sweep_name = os.path.splitext(os.path.basename(sweep))[0]
  first = rows[0]
  body = PAGE_INTRO.format(sweep=sweep, seed=seed, sweep_name=sweep_name, steps=steps,
                           tokens=int(first["tokens_scored"]), prompts=int(first["prompts"]),
                           new=int(first["new_tokens"]))
  worst = {f: max((r for r in rows if r["format"] == f), key=lambda r: r["kl_vs_fp32"]) for f in ("fp8", "int8")}
  agree = {f: min(r["greedy_agreement"] for r in rows if r["format"] == f) for f in ("bfloat16", "fp8", "int8")}
  body += ("\n**Summary.** Across the variants, the largest KL against the float32 cache is "
           f"{worst['int8']['kl_vs_fp32']:.1e} nats for int8 ({worst['int8']['variant']}) and "
           f"{worst['fp8']['kl_vs_fp32']:.1e} for fp8 ({worst['fp8']['variant']}); the lowest greedy agreement "
           f"is {100 * agree['bfloat16']:.1f}% for bfloat16, {100 * agree['fp8']:.1f}% for fp8 and "
           f"{100 * agree['int8']:.1f}% for int8.\n\n")
  body += table(rows) + "\n"
  if os.path.exists(NOTES):
    body += "\n" + open(NOTES).read()
  with open(path, "w") as f:
    f.write(body)
  plot(rows, os.path.splitext(path)[0] + ".png", "KV-cache formats: quality cost against bytes per token")


FLAGS = flags.FLAGS
NOTES = "experiments/sweeps/cache_quality.notes.md"       # what the page shows and cannot, in words


def main(argv):
  del argv
  from absl import logging

  from experiments import options, sweep as sw, trainer
  from mla_jax.host_memory import reuse_freed_memory
  logging.set_verbosity(logging.WARNING)
  reuse_freed_memory()
  if not FLAGS.sweep or not os.path.isfile(FLAGS.sweep):
    print("error: pass --sweep=FILE, one of experiments/sweeps/*.sweep", file=sys.stderr)
    sys.exit(2)
  seed = int(FLAGS.seeds[0]) if FLAGS.seeds else 0
  runs = [r for r in sw.parse(FLAGS.sweep) if r.seed == seed and (not FLAGS.only or r.name in FLAGS.only)]
  if not runs:
    print(f"error: the sweep has no run with seed {seed}", file=sys.stderr)
    sys.exit(2)
  name = os.path.splitext(os.path.basename(FLAGS.sweep))[0]
  logs = os.path.join(FLAGS.results_dir, "cache_quality_logs")
  steps = sw.run_flags(runs[0]).steps
  if not FLAGS.report_only:
    os.makedirs(logs, exist_ok=True)
    for i, run in enumerate(runs, 1):
      d = run.directory(name)
      extra = [f"--seed={run.seed}", f"--output_dir={d}", f"--data_dir={FLAGS.data_dir}", "--noprogress"]
      c = options.build(sw.run_flags(run, *extra))
      print(f"[cache_quality] {i}/{len(runs)} {run.name}: training to step {c.train.steps} in {d} "
            "(resumes; nothing to do when finished)", flush=True)
      trainer.train(c.model, c.train, c.data, c.loop, c.options)
      rows = run_quality(d, c)
      write_csv(rows, os.path.join(logs, f"{run.name}.csv"))
  order = {r.name: i for i, r in enumerate(runs)}
  rows = []
  for path in sorted(glob.glob(os.path.join(logs, "*.csv")),
                     key=lambda p: order.get(os.path.splitext(os.path.basename(p))[0], len(order))):
    rows += read_csv(path)
  if not rows:
    print(f"error: no measurements in {logs}; run without --report_only first", file=sys.stderr)
    sys.exit(2)
  out = os.path.join(FLAGS.results_dir, "cache_quality.md")
  page(rows, sweep=FLAGS.sweep, seed=seed, steps=steps, path=out)
  print(f"[cache_quality] wrote {out}")


def run_quality(run_dir: str, c) -> list[dict]:
  return run(run_dir, c.data, mesh=c.loop.mesh, rules=c.loop.rules, options=c.options,
             eval_batches=c.loop.eval_batches, eval_batch_size=c.loop.eval_batch_size,
             new_tokens=256, num_prompts=8)


if __name__ == "__main__":
  # the sweep driver's flags (--sweep, --seeds, --only, --runs_dir, --results_dir, --data_dir,
  # --report_only) are this script's; the runner imports this module without them
  from experiments import sweep as _defines_flags  # noqa: F401
  app.run(main, flags_parser=cli.parse_flags)
