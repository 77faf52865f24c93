"""Run a sweep of training runs from flagfiles, resumably, and write its results page.

    .venv/bin/python -m experiments.sweep --sweep=experiments/sweeps/study_cpu.sweep
    .venv/bin/python -m experiments.sweep --sweep=... --report_only     # just regenerate the page

A sweep file lists one run per line: a name, a flagfile, and extra flags;
`seeds=0,1,2` repeats a run per seed, `paper="..."` puts the paper's figure
beside ours, `table=NAME` puts the row in a table of its own on the page (each
table is compared within itself: against its first row, and its loss ordering
against the paper's by Kendall's tau), `match=GROUP` asks that every run of GROUP have non-embedding
parameters within 2% of the group's first run (checked before any training).
Runs go seed by seed (every configuration's seed 0 first), finished runs are
skipped, a killed run resumes from its last checkpoint, so a sweep can span
several sittings. Several workers can share a sweep (e.g. one per core:
`taskset -c 0 ... &  taskset -c 1 ...`): each claims a run with a lock file
before starting it, and the data is built once under a lock. Each run's
configs come from the runner's own flag mapping (`experiments.options.parse`
of its flagfile and flags) and it trains in this process; after training,
`experiments.post_run` measures decode speed and judge-free sample metrics on
fixed prompts (distinct-n and repetition rate: no LLM judge can be reached
here). The results page (markdown + PNGs) is rebuilt from what the runs wrote:
every number on it comes from a run directory's files.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import shutil
import statistics
import sys
import time

from absl import app, flags

from experiments import cli, options, post_run, trainer
from mla_jax.host_memory import reuse_freed_memory
from mla_jax.model import count_params

flags.DEFINE_string("sweep", None, "The sweep file.")
flags.DEFINE_string("runs_dir", "runs/sweeps", "Where the runs' directories go.")
flags.DEFINE_string("results_dir", "results", "Where the results page and its figures go.")
flags.DEFINE_bool("report_only", False, "Only rebuild the results page from finished runs.")
flags.DEFINE_list("only", [], "Run only these run names.")
flags.DEFINE_string("data_dir", "~/.cache/mla_jax", "Shared data and tokenizer cache for every run.")
flags.DEFINE_integer("sample_prompts", 8, "Prompts for the judge-free sample metrics.")
flags.DEFINE_integer("bench_batch", 16, "Batch of the post-run decode-step timing.")
flags.DEFINE_integer("bench_context", 1024, "Cache slots of the post-run decode-step timing (GPT-2 flavour: "
                     "the model's max_seq_len).")
flags.DEFINE_bool("bench_decode", False, "Time every configuration's decode step side by side in one process "
                  "(interleaved rounds, random weights) and put it on the results page; run it on a quiet machine.")
flags.DEFINE_integer("bench_rounds", 5, "--bench_decode: interleaved rounds (each times every configuration).")
flags.DEFINE_list("seeds", [], "Run only these seeds (default: every seed the sweep file lists).")
flags.DEFINE_float("match_tolerance", 0.02, "Allowed relative gap in non-embedding parameters in a match group.")
FLAGS = flags.FLAGS
# What a run's summary.json holds; a summary of another version is written again
# (the run resumes from its last checkpoint with no steps left, only the post-run).
SUMMARY_VERSION = 2
PROMPTS = post_run.PROMPTS


@dataclasses.dataclass
class Run:
  name: str
  flagfile: str
  extra: list[str]
  seed: int
  group: str             # the table row: runs that differ only by seed
  paper: str = ""        # the paper's figure for this row, as text
  match: str = ""        # parameter-matching group
  table: str = ""        # the page's table the row sits in ("" the first)

  def directory(self, sweep: str) -> str:
    return os.path.join(FLAGS.runs_dir, sweep, self.name, f"seed{self.seed}")


def parse(path: str) -> list[Run]:
  runs = []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      line = line.split("#", 1)[0].strip()
      if not line:
        continue
      parts = shlex.split(line)
      if len(parts) < 2:
        raise ValueError(f"{path}:{n}: write 'name flagfile [--flag=value ...] [seeds=0,1,2]'")
      name, flagfile, rest = parts[0], parts[1], parts[2:]
      seeds, extra, paper, match, table = [0], [], "", "", ""
      for item in rest:
        if item.startswith("seeds="):
          try:
            seeds = [int(s) for s in item[len("seeds="):].split(",")]
          except ValueError:
            raise ValueError(f"{path}:{n}: write seeds as seeds=0,1,2, not {item!r}") from None
        elif item.startswith("paper="):
          paper = item[len("paper="):]
        elif item.startswith("match="):
          match = item[len("match="):]
        elif item.startswith("table="):
          table = item[len("table="):]
        elif item.startswith("--"):
          extra.append(item)
        else:
          raise ValueError(f"{path}:{n}: {item!r} is neither a --flag nor seeds=/paper=/match=/table=")
      if not os.path.exists(flagfile):
        raise ValueError(f"{path}:{n}: flagfile {flagfile!r} does not exist")
      runs += [Run(name, flagfile, extra, s, name, paper, match, table) for s in seeds]
  names = [(r.name, r.seed) for r in runs]
  if len(set(names)) != len(names):
    raise ValueError(f"{path}: a run name appears twice")
  if not runs:
    raise ValueError(f"{path}: no runs in the sweep file")
  # seed-major: every configuration's first seed before any second seed
  seed_rank = {(r.name, r.seed): sorted(x.seed for x in runs if x.name == r.name).index(r.seed) for r in runs}
  order = {r.name: i for i, r in reversed(list(enumerate(runs)))}
  return sorted(runs, key=lambda r: (seed_rank[(r.name, r.seed)], order[r.name]))


def run_flags(run: Run, *extra: str):
  """The runner's flags of `run` (its flagfile, then its own flags, then `extra`), parsed in-process."""
  try:
    return options.parse(["run", f"--flagfile={run.flagfile}", *run.extra, *extra])
  except flags.Error as e:
    raise ValueError(f"run {run.name}: {e}") from None


def configs(runs: list[Run]) -> dict:
  """name -> ModelConfig of each configuration (seeds aside)."""
  out = {}
  for r in runs:
    if r.name not in out:
      try:
        out[r.name] = options.model_config(run_flags(r))
      except ValueError as e:
        raise ValueError(f"run {r.name}: {e}") from None
  return out


def describe(runs: list[Run]) -> dict[str, dict]:
  """name -> parameter counts and cache per token of each configuration (nothing is compiled)."""
  return {name: dict(params=count_params(c), cache_per_token=c.cache_elements_per_token(), layers=c.num_layers,
                     variant=c.attention.variant,
                     rope=bool(getattr(c.attention, "rope", False) or getattr(c.attention, "qk_rope_head_dim", 0)))
          for name, c in configs(runs).items()}


def check_matches(runs: list[Run], info: dict[str, dict], tolerance: float) -> None:
  groups: dict[str, list[str]] = {}
  for r in runs:
    if r.match and r.name not in groups.get(r.match, []):
      groups.setdefault(r.match, []).append(r.name)
  for group, names in groups.items():
    ref = info[names[0]]["params"]["non_embedding"]
    for name in names[1:]:
      n = info[name]["params"]["non_embedding"]
      if abs(n / ref - 1) > tolerance:
        raise ValueError(f"match={group}: {name} has {n:,} non-embedding parameters, {100 * (n / ref - 1):+.1f}% "
                         f"from {names[0]}'s {ref:,} (allowed {100 * tolerance:.0f}%); adjust its --mlp_dim")


def _metrics(run_dir: str) -> list[dict]:
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _steps_wanted(run: Run) -> int:
  # the run's own flags come after the flagfile on the command line, so they win
  with open(run.flagfile) as f:
    flagfile = [line.split("#", 1)[0].strip() for line in f]
  for arg in reversed(flagfile + run.extra):
    if arg.startswith("--steps="):
      return int(arg.split("=", 1)[1])
  return 1000


def log_directory(run: Run, sweep: str) -> str:
  """The run's logs as the results page reads them (metrics.jsonl, summary.json):
  small, committed beside the page, so the page can be rebuilt without the
  run directories (checkpoints) from a fresh clone with --report_only."""
  return os.path.join(FLAGS.results_dir, f"{sweep}_logs", run.name, f"seed{run.seed}")


def finished(run: Run, sweep: str) -> bool:
  d = log_directory(run, sweep)
  evals = [r for r in _metrics(d) if r.get("kind") == "eval"]
  if not (evals and evals[-1]["step"] >= _steps_wanted(run)):
    return False
  try:
    with open(os.path.join(d, "summary.json")) as f:
      return json.load(f).get("version") == SUMMARY_VERSION
  except (OSError, ValueError):
    return False


def claim(run: Run, sweep: str) -> bool:
  """Take the run for this worker: a lock file holding our pid. A lock left by
  a dead worker (killed sweep) is taken over, so its run resumes."""
  d = run.directory(sweep)
  os.makedirs(d, exist_ok=True)
  lock = os.path.join(d, ".sweep.lock")
  for _ in range(2):
    try:
      fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
      try:
        pid = int(open(lock).read().strip() or 0)
        os.kill(pid, 0)
        return False             # another live worker has it
      except (ProcessLookupError, ValueError):
        os.remove(lock)          # stale
        continue
      except PermissionError:
        return False
    with os.fdopen(fd, "w") as f:
      f.write(str(os.getpid()))
    return True
  return False


def release(run: Run, sweep: str) -> None:
  lock = os.path.join(run.directory(sweep), ".sweep.lock")
  if os.path.exists(lock):
    os.remove(lock)


def train(run: Run, sweep: str, progress: str = "") -> None:
  d = run.directory(sweep)
  extra = [f"--seed={run.seed}", f"--output_dir={d}", f"--data_dir={FLAGS.data_dir}", "--noprogress"]
  print(f"[sweep] {progress} {run.name} seed {run.seed}: training {' '.join([run.flagfile, *run.extra, *extra])}",
        flush=True)
  t0 = time.time()
  try:
    c = options.build(run_flags(run, *extra))
    result = trainer.train(c.model, c.train, c.data, c.loop, c.options)
  except ValueError as e:
    raise RuntimeError(f"run {run.name} seed {run.seed} failed: {e}") from None
  previous = 0.0     # wall time of earlier sittings that finished (a post-run redone after an update)
  if os.path.exists(os.path.join(d, "summary.json")):
    with open(os.path.join(d, "summary.json")) as f:
      previous = json.load(f).get("wall_s", 0.0)
  summary = {"version": SUMMARY_VERSION, "wall_s": previous + time.time() - t0,
             "eval": result.get("eval"), "resumed_from": result.get("resumed_from")}
  summary.update(post_run.post_run(d, num_prompts=FLAGS.sample_prompts, bench_batch=FLAGS.bench_batch,
                                   bench_context=FLAGS.bench_context))
  with open(os.path.join(d, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  logs = log_directory(run, sweep)
  os.makedirs(logs, exist_ok=True)
  for name in ("metrics.jsonl", "summary.json"):
    shutil.copyfile(os.path.join(d, name), os.path.join(logs, name))


# ----------------------------------------------------------------------------- results page


def collect(runs: list[Run], sweep: str) -> dict[str, list[dict]]:
  groups: dict[str, list[dict]] = {}
  for run in runs:
    d = log_directory(run, sweep)
    if not finished(run, sweep):
      continue
    with open(os.path.join(d, "summary.json")) as f:
      summary = json.load(f)
    metrics = _metrics(d)
    last_eval = [r for r in metrics if r["kind"] == "eval"][-1]
    groups.setdefault(run.group, []).append({"seed": run.seed, "dir": d, "eval": last_eval,
                                             "metrics": metrics, **summary})
  return groups


def _ordering(rows, first) -> str:
  """Our loss ranking beside the paper's, over the rows that have a paper figure
  (at least 2: a control table may hold only two), with Kendall's tau between them."""
  ours, paper = {}, {}
  for name, rs in rows:
    try:
      paper[name] = float(first[name].paper.split()[0])
    except (ValueError, IndexError):
      continue
    ours[name] = statistics.mean(r["eval"]["loss"] for r in rs)
  if len(ours) < 2:
    return ""
  names = list(ours)
  pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
  agree = sum((ours[a] - ours[b]) * (paper[a] - paper[b]) > 0 for a, b in pairs)
  disagree = sum((ours[a] - ours[b]) * (paper[a] - paper[b]) < 0 for a, b in pairs)
  tau = (agree - disagree) / len(pairs)
  rank = lambda d: " < ".join(sorted(d, key=d.get))  # noqa: E731
  left_out = [name for name, _ in rows if name not in ours]
  return (f"Ordering, best first. Ours (mean val loss): {rank(ours)}. Paper: {rank(paper)}. "
          f"Kendall's tau between the two: {tau:+.2f} ({agree} of {len(pairs)} pair{'s' * (len(pairs) > 1)} agree)"
          + (f"; rows without a paper figure left out: {', '.join(left_out)}." if left_out else "."))


def _mean_sd(xs):
  return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


SPIKE_JUMP, SPIKE_WINDOW, QUIET_GRAD_NORM = 0.3, 10, 5.0


def largest_rise(losses: list[float], window: int = SPIKE_WINDOW) -> float:
  """The largest rise of a step's loss above the lowest of the `window` steps before it."""
  return max((losses[i] - min(losses[max(0, i - window):i]) for i in range(1, len(losses))), default=0.0)


def loss_spikes(losses: list[float], jump: float = SPIKE_JUMP, window: int = SPIKE_WINDOW) -> list[int]:
  """1-based steps whose loss exceeds the lowest of the `window` steps before it by more than `jump`."""
  return [i + 1 for i in range(1, len(losses)) if losses[i] - min(losses[max(0, i - window):i]) > jump]


def _table(lines: list[str], rows, first, info, side_by_side) -> list:
  """One table of the page (its first row the baseline), then its ordering against the paper's."""
  base_loss = statistics.mean(r["eval"]["loss"] for r in rows[0][1])
  base_cache = info[rows[0][0]]["cache_per_token"]
  lines += ["| run | seeds | non-emb. params | val loss (mean ± sd) | vs first row | val ppl | spikes | "
            "max grad norm | KV cache / token / layer | cache vs first row | decode step ms (batch x context) "
            "| decode tok/s | distinct-2 | rep. 4-gram | paper |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  summary = []
  for name, rs in rows:
    losses = [r["eval"]["loss"] for r in rs]
    loss_m, loss_s = _mean_sd(losses)
    cache = info[name]["cache_per_token"]
    if name in side_by_side:          # one process, interleaved: the figures to compare
      step_ms, batch, context = (side_by_side[name][k] for k in ("step_ms", "batch", "context"))
    else:                             # each run's own post-run timing, mean over seeds
      steps_ms = [r["decode_step_ms"] for r in rs if r.get("decode_step_ms")]
      step_ms = statistics.mean(steps_ms) if steps_ms else None
      batch, context = rs[0].get("decode_batch"), rs[0].get("decode_context")
    step_cell = f"{step_ms:.2f} ({batch}x{context})" if step_ms else "-"
    tps = f"{1e3 * batch / step_ms:,.0f}" if step_ms else "-"
    d2 = statistics.mean(r["distinct_2"] for r in rs)
    rep = statistics.mean(r["repetition_4gram"] for r in rs)
    train = [[m for m in r["metrics"] if m["kind"] == "train"] for r in rs]
    spikes = "/".join(str(len(loss_spikes([m["loss"] for m in t]))) for t in train)
    grad = "/".join(f"{max(m['grad_norm'] for m in t):.1f}" for t in train)
    summary.append((name, rs, loss_m, loss_s, cache))
    lines.append(f"| {name} | {','.join(str(r['seed']) for r in rs)} | {info[name]['params']['non_embedding']:,} "
                 f"| {loss_m:.4f} ± {loss_s:.4f} | {100 * (loss_m / base_loss - 1):+.2f}% | {math.exp(loss_m):.3f} "
                 f"| {spikes} | {grad} | {cache} | {100 * (cache / base_cache - 1):+.0f}% | {step_cell} | {tps} "
                 f"| {d2:.3f} | {rep:.3f} | {first[name].paper or '-'} |")
  ordering = _ordering(rows, first)
  if ordering:
    lines += ["", ordering]
  lines.append("")
  return summary


SETTING_FLAGS = ("--learning_rate=", "--warmup_steps=")    # what the control tables vary


def settings_table(tables: dict[str, list], first: dict[str, Run]) -> list[str]:
  """Rows of different tables that are one configuration apart from the learning
  rate and warm-up (the control tables): each one's mean final validation loss
  and spikes, over the seeds all of its settings ran, and the best setting."""
  configs: dict[tuple, list] = {}
  for table, rows in tables.items():
    for name, rs in rows:
      r = first[name]
      key = (r.flagfile, tuple(x for x in r.extra if not x.startswith(SETTING_FLAGS)))
      configs.setdefault(key, []).append((table, name, rs))
  configs = {k: v for k, v in configs.items() if len({t for t, _, _ in v}) > 1}
  if not configs:
    return []
  names = list(tables)
  lines = ["### Best setting per configuration", "",
           "Each configuration that appears in more than one table: mean final validation loss over the seeds "
           "all of its settings ran, and the spikes of those runs (summed over seeds).", "",
           "| configuration | seeds | " + " | ".join(t or "main comparison" for t in names) + " | best |",
           "|---|---|" + "---|" * (len(names) + 1)]
  for entries in configs.values():
    seeds = sorted(set.intersection(*({r["seed"] for r in rs} for _, _, rs in entries)))
    if not seeds:
      continue
    cells, best = {}, None
    for table, _, rs in entries:
      picked = [r for r in rs if r["seed"] in seeds]
      loss = statistics.mean(r["eval"]["loss"] for r in picked)
      spikes = sum(len(loss_spikes([m["loss"] for m in r["metrics"] if m["kind"] == "train"])) for r in picked)
      cells[table] = f"{loss:.4f} ({spikes} spike{'s' * (spikes != 1)})"
      best = min(best or (loss, table), (loss, table))
    label = next((n for t, n, _ in entries if t == ""), entries[0][1])
    lines.append(f"| {label} | {','.join(map(str, seeds))} | "
                 + " | ".join(cells.get(t, "-") for t in names) + f" | {best[1] or 'main comparison'} |")
  return lines + [""]


def write_page(runs: list[Run], sweep: str, info: dict[str, dict], title: str, paper_notes: str = "") -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  groups = collect(runs, sweep)
  os.makedirs(FLAGS.results_dir, exist_ok=True)
  first = {}
  for r in runs:
    first.setdefault(r.name, r)
  names = list(first)                                   # sweep-file order
  rows = [(n, groups[n]) for n in names if n in groups]
  lines = [f"# {title}", "",
           f"Written by `python -m experiments.sweep --sweep={FLAGS.sweep}`: every number in the tables is read "
           f"from the logs the runs wrote, `{sweep}_logs/<run>/seed<k>/metrics.jsonl` and `summary.json` "
           "(the paper column is the paper's figure, from `../shared/reference/`). "
           f"`--report_only` rebuilds this page from those logs.", ""]
  bench_path = os.path.join(FLAGS.results_dir, f"{sweep}_logs", "decode_bench.json")
  side_by_side = {}
  if os.path.exists(bench_path):
    with open(bench_path) as f:
      side_by_side = json.load(f)
  tables: dict[str, list] = {}
  for name, rs in rows:
    tables.setdefault(first[name].table, []).append((name, rs))
  quiet_jump = max([largest_rise([m["loss"] for m in r["metrics"] if m["kind"] == "train"])
                    for _, rs in rows for r in rs
                    if max(m["grad_norm"] for m in r["metrics"] if m["kind"] == "train") < QUIET_GRAD_NORM],
                   default=float("nan"))
  summary = []
  for table, table_rows in tables.items():
    if len(tables) > 1:
      lines += [f"### {table or 'Main comparison'}", ""]
    summary += _table(lines, table_rows, first, info, side_by_side)
  lines += settings_table(tables, first)
  lines += ["", "Columns: validation loss after the last step (mean and sample standard deviation over seeds; "
            "sd 0 with one seed); vs first row: against the first row of the same table; spikes: per seed, "
            f"the training steps whose loss is more than {SPIKE_JUMP} nats above the lowest loss of the "
            f"{SPIKE_WINDOW} steps before it (in the runs on this page whose gradient norm never passes "
            f"{QUIET_GRAD_NORM}, the largest such rise is {quiet_jump:.2f} nats: hard batches lift every run "
            "of a seed at the same steps); max grad norm: the largest gradient norm "
            "before clipping, per seed; decode step ms: one jitted decode step of the whole model (absorbed path) "
            "over a full fp32 cache at random weights, "
            + (f"timed side by side in one process (`--bench_decode`: {next(iter(side_by_side.values()))['rounds']} "
               "interleaved rounds of 10 steps, median; rows with one model, such as a control row and its "
               "main row, are timed once), on the machine the page was written on; "
               if side_by_side else
               "median of 20 after warm-up, mean over seeds, timed after each run while other work shared the "
               "machine (noisy; `--bench_decode` times them side by side); ")
            + "decode tok/s: "
            "batch / step time; distinct-2 and rep. 4-gram: judge-free sample metrics over "
            f"{FLAGS.sample_prompts} sampled continuations of fixed prompts (unique bigrams over all samples, "
            "share of repeated 4-grams within a sample; the study's LLM judge cannot be reached here)."]
  missing = [n for n in names if n not in groups]
  partial = [f"{n} ({len(groups[n])} of {sum(r.name == n for r in runs)} seeds)" for n in names
             if n in groups and len(groups[n]) < sum(r.name == n for r in runs)]
  if missing or partial:
    lines += ["", "Not finished yet: " + ", ".join(missing + partial) + ". Rerun the sweep command to go on."]
  lines += ["", "Per-seed final validation loss:", "", "| run | " + " | ".join(
      f"seed {s}" for s in sorted({r.seed for r in runs})) + " | wall time per run (s, mean) |", "|---|" + "---|" * (
      len({r.seed for r in runs}) + 1)]
  for name, rs in rows:
    by_seed = {r["seed"]: r["eval"]["loss"] for r in rs}
    lines.append(f"| {name} | " + " | ".join(f"{by_seed[s]:.4f}" if s in by_seed else "-"
                                           for s in sorted({r.seed for r in runs}))
                 + f" | {statistics.mean(r['wall_s'] for r in rs):.0f} |")
  lines += ["", "Runs (flagfile, then the run's own flags):", ""]
  for name in names:
    r = first[name]
    lines.append(f"- `{name}`: `{r.flagfile}` `{' '.join(r.extra)}`")
  if paper_notes:
    lines += ["", paper_notes.strip()]
  # loss curves: one line per seed, one colour per configuration; training loss
  # as a 25-step running mean (every step is logged), validation at each eval
  fig, (ax_train, ax) = plt.subplots(1, 2, figsize=(12, 4.8))
  for i, (name, rs, *_) in enumerate(summary):
    for j, r in enumerate(rs):
      colour, label = f"C{i % 10}", name if j == 0 else None
      tr = [(m["step"], m["loss"]) for m in r["metrics"] if m["kind"] == "train"]
      if len(tr) >= 25:
        steps, losses = zip(*tr)
        smooth = [statistics.mean(losses[k - 25:k]) for k in range(25, len(losses) + 1)]
        ax_train.plot(steps[24:], smooth, lw=1, alpha=0.8, color=colour, label=label)
      ev = [(m["step"], m["loss"]) for m in r["metrics"] if m["kind"] == "eval"]
      if ev:
        ax.plot(*zip(*ev), "o-", ms=2.5, lw=1, alpha=0.8, color=colour, label=label)
  ax_train.set_ylabel("training loss (25-step running mean, every seed)")
  ax.set_ylabel("validation loss (every seed)")
  for a in (ax_train, ax):
    a.set_xlabel("step")
    a.grid(alpha=0.3)
  if summary:
    ax.legend(fontsize=7, ncols=2)
  fig.tight_layout()
  curves = os.path.join(FLAGS.results_dir, f"{sweep}_loss_curves.png")
  fig.savefig(curves, dpi=120)
  plt.close(fig)
  # final loss against cache size
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  for i, (name, rs, loss_m, loss_s, cache) in enumerate(summary):
    ax.errorbar([cache], [loss_m], yerr=[loss_s], fmt="o", color=f"C{i % 10}", capsize=3)
    ax.annotate(name, (cache, loss_m), fontsize=7, xytext=(4, 4), textcoords="offset points")
  ax.set_xscale("log")
  ax.set_xlabel("KV cache elements per token per layer")
  ax.set_ylabel("final validation loss (mean ± sd over seeds)")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  scatter = os.path.join(FLAGS.results_dir, f"{sweep}_loss_vs_cache.png")
  fig.savefig(scatter, dpi=120)
  plt.close(fig)
  lines += ["", f"![validation loss]({os.path.basename(curves)})", "",
            f"![loss vs cache]({os.path.basename(scatter)})", "",
            f"## A sample per run (lowest seed, prompt {PROMPTS[0]!r}, temperature 0.8, top-k 40, top-p 0.95)", ""]
  for name, rs, *_ in summary:
    text = " ".join(rs[0]["samples"][0].split())
    lines += [f"**{name}**: {text}", ""]
  page = os.path.join(FLAGS.results_dir, f"{sweep}.md")
  with open(page, "w") as f:
    f.write("\n".join(lines) + "\n")
  return page


def main(argv):
  del argv
  reuse_freed_memory()  # before JAX allocates anything (see mla_jax/host_memory.py)
  if not FLAGS.sweep:
    print("error: pass --sweep=FILE (see experiments/sweeps/)", file=sys.stderr)
    sys.exit(2)
  try:
    if not os.path.isfile(FLAGS.sweep):
      raise ValueError(f"no sweep file {FLAGS.sweep!r}; the committed ones are in experiments/sweeps/")
    runs = parse(FLAGS.sweep)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  sweep = os.path.splitext(os.path.basename(FLAGS.sweep))[0]
  try:
    info = describe(runs)
    check_matches(runs, info, FLAGS.match_tolerance)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  unknown = sorted(set(FLAGS.only) - {r.name for r in runs})
  if unknown:
    print(f"error: --only names {', '.join(unknown)}, which the sweep does not have", file=sys.stderr)
    sys.exit(2)
  if not FLAGS.report_only:
    todo = [r for r in runs if (not FLAGS.only or r.name in FLAGS.only)
            and (not FLAGS.seeds or str(r.seed) in FLAGS.seeds)]
    for i, run in enumerate(todo, 1):
      if finished(run, sweep):
        print(f"[sweep] {i}/{len(todo)} {run.name} seed {run.seed}: finished, skipped", flush=True)
        continue
      if not claim(run, sweep):
        print(f"[sweep] {i}/{len(todo)} {run.name} seed {run.seed}: another worker has it, skipped", flush=True)
        continue
      try:
        train(run, sweep, f"{i}/{len(todo)}")
      except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
      finally:
        release(run, sweep)
  bench_path = os.path.join(FLAGS.results_dir, f"{sweep}_logs", "decode_bench.json")
  if FLAGS.bench_decode:
    print(f"[sweep] timing every configuration's decode step side by side ({FLAGS.bench_rounds} rounds)", flush=True)
    timings = post_run.bench_side_by_side(configs(runs), batch=FLAGS.bench_batch, context=FLAGS.bench_context,
                                          rounds=FLAGS.bench_rounds)
    os.makedirs(os.path.dirname(bench_path), exist_ok=True)
    with open(bench_path, "w") as f:
      json.dump(timings, f, indent=1)
  notes_path = os.path.splitext(FLAGS.sweep)[0] + ".notes.md"
  notes = open(notes_path).read() if os.path.exists(notes_path) else ""
  page = write_page(runs, sweep, info, title=f"Sweep {sweep}", paper_notes=notes)
  print(f"[sweep] wrote {page}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
