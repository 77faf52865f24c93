"""The results page of `--mode=convert_report`: results/convert_latent.md and its chart,
built from the committed CSV alone.

    python -m experiments.convert_page --csv=results/convert_latent_logs/convert_report.csv
"""
from __future__ import annotations

import os
import sys

from absl import app, flags

from experiments import cli

from experiments.convert_latent import read_rows

flags.DEFINE_string("csv", "results/convert_latent_logs/convert_report.csv", "convert_report's CSV.")
flags.DEFINE_string("page", "results/convert_latent.md", "The page to write (its chart beside it, .png).")
flags.DEFINE_string("notes", "experiments/sweeps/convert_latent.notes.md", "Text appended to the page.")
FLAGS = flags.FLAGS


def _f(row, key):
  return float(row[key]) if row.get(key) not in ("", None) else float("nan")


def table(rows: list[dict]) -> str:
  head = ("| variant | kv_lora_rank | d_r | cache / token (source) | KL before | loss before | fine-tuned | "
          "fine-tuned + distilled | from scratch |\n|---|---|---|---|---|---|---|---|---|\n")
  lines = []
  for r in rows:
    lines.append(f"| {r['variant']} | {r['kv_lora_rank']} | {r['rope_head_dim']} | {r['cache_per_token']} "
                 f"({r['source_cache_per_token']}) | {_f(r, 'kl_before'):.3g} | {_f(r, 'loss_before'):.3f} | "
                 f"{_f(r, 'loss_finetuned'):.3f} | {_f(r, 'loss_distilled'):.3f} | {_f(r, 'loss_scratch'):.3f} |")
  return head + "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str, source_tuned: dict | None = None) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax_kl, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2))
  for variant in dict.fromkeys(r["variant"] for r in rows):
    mine = sorted((r for r in rows if r["variant"] == variant), key=lambda r: int(r["cache_per_token"]))
    cache = [int(r["cache_per_token"]) for r in mine]
    line, = ax_kl.plot(cache, [_f(r, "kl_before") for r in mine], "o-", label=variant)
    for key, style, what in (("loss_finetuned", "o-", "fine-tuned"), ("loss_distilled", "s:", "+ distilled")):
      ax_loss.plot(cache, [_f(r, key) for r in mine], style, color=line.get_color(), label=f"{variant} {what}")
  source = _f(rows[0], "source_loss")
  ax_loss.axhline(source, color="black", lw=1, label=f"source ({rows[0]['source_cache_per_token']} / token)")
  if source_tuned:
    ax_loss.axhline(_f(source_tuned, "loss_finetuned"), color="black", lw=1, ls="--",
                    label="source, fine-tuned the same way")
  ax_kl.set(xlabel="cache elements per token per layer", ylabel="KL(source || converted), nats/token",
            title="before fine-tuning", yscale="log")
  scratch = [_f(r, "loss_scratch") for r in rows]
  ax_loss.set(xlabel="cache elements per token per layer", ylabel="validation loss (nats/token)",
              title=f"after {rows[0]['steps']} steps (from scratch: {min(scratch):.2f}-{max(scratch):.2f}, "
                    "off the chart)")
  ax_kl.legend(fontsize=8)
  ax_loss.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def page(rows: list[dict], path: str, notes: str = "", source_tuned: dict | None = None) -> None:
  source = _f(rows[0], "source_loss")
  best = min(rows, key=lambda r: _f(r, "loss_finetuned"))
  body = ("# Converting a trained GQA model into latent attention\n\n"
          "Built by `python -m experiments.convert_page` from `results/convert_latent_logs/convert_report.csv`, "
          "which `python -m experiments.run --flagfile=experiments/configs/convert_report.flags` writes "
          "(the source: `experiments/configs/convert_source.flags`). Losses are validation cross-entropy "
          "(nats/token) on the source run's validation windows; KL is KL(p_source || p_converted) over the "
          f"same tokens. The source model's validation loss: **{source:.3f}**" +
          (f"; fine-tuned the same way ({source_tuned['steps']} steps, a fresh optimizer, "
           f"`source_finetuned.csv`): **{_f(source_tuned, 'loss_finetuned'):.3f}**, the bar a conversion "
           "is measured against" if source_tuned else "") + ".\n\n")
  body += (f"Closest after fine-tuning: {best['variant']} at kv_lora_rank {best['kv_lora_rank']} "
           f"({best['cache_per_token']} cached elements per token against the source's "
           f"{best['source_cache_per_token']}), {_f(best, 'loss_finetuned'):.3f}.\n\n")
  if source_tuned:
    bar = _f(source_tuned, "loss_finetuned")
    gaps = "; ".join(
        f"{v} " + ", ".join(f"{_f(r, 'loss_finetuned') - bar:+.3f} at rank {r['kv_lora_rank']}"
                            for r in rows if r["variant"] == v)
        for v in dict.fromkeys(r["variant"] for r in rows))
    body += f"Fine-tuned, against the source fine-tuned the same way: {gaps}.\n"
  distilled = [_f(r, "loss_distilled") - _f(r, "loss_finetuned") for r in rows if r.get("loss_distilled")]
  if distilled:
    body += (f"Distillation from the source changed the fine-tuned loss by {min(distilled):+.3f} to "
             f"{max(distilled):+.3f}. From scratch, {rows[0]['steps']} steps reach "
             f"{min(_f(r, 'loss_scratch') for r in rows):.3f} to {max(_f(r, 'loss_scratch') for r in rows):.3f}.\n\n")
  body += table(rows) + f"\n![KL before and loss after fine-tuning]({os.path.splitext(os.path.basename(path))[0]}.png)\n"
  if notes:
    body += "\n" + notes
  with open(path, "w") as f:
    f.write(body)
  plot(rows, os.path.splitext(path)[0] + ".png", source_tuned)


def main(argv):
  del argv
  rows = read_rows(FLAGS.csv)
  if not rows:
    print(f"error: no rows in {FLAGS.csv}; run --mode=convert_report first", file=sys.stderr)
    sys.exit(2)
  notes = open(FLAGS.notes).read() if os.path.exists(FLAGS.notes) else ""
  tuned = read_rows(os.path.join(os.path.dirname(FLAGS.csv), "source_finetuned.csv"))
  page(rows, FLAGS.page, notes, tuned[0] if tuned else None)
  print(f"wrote {FLAGS.page}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
