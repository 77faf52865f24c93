"""A trained MHA/MQA/GQA run turned into a latent one (`--mode=convert_latent`),
and what that costs over a sweep of ranks (`--mode=convert_report`).

    python -m experiments.run --mode=convert_latent --convert_from=runs/gqa --output_dir=runs/gqa_mla \\
        --variant=mla --kv_lora_rank=32 --qk_rope_head_dim=16
    python -m experiments.run --mode=train --output_dir=runs/gqa_mla --steps=100 [--distill_from=runs/gqa]
    python -m experiments.run --flagfile=experiments/configs/convert_report.flags

The conversion (mla_jax/convert_latent.py) calibrates on the first windows of
the data's training split, tokenized with the source run's tokenizer; the
divergence it reports is over the validation windows: mean KL(p_source ||
p_latent) of the next-token distributions (nats per token) and both losses.

The report converts the source into every (variant, kv_lora_rank,
qk_rope_head_dim) of its flags, measures each before fine-tuning, fine-tunes
each for --steps (and again with --distill_from the source when --report_distill),
trains the same variant from scratch for as many steps, and appends a row per
case to `<output_dir>/convert_report.csv` (a case already there is skipped, so
an interrupted report resumes); the source itself, fine-tuned the same way, goes
to `<output_dir>/source_finetuned.csv`; `experiments/convert_page.py` builds the
results page from committed copies of those files.
"""
from __future__ import annotations

import csv
import dataclasses
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import trainer
from mla_jax import convert_latent as CL
from mla_jax import train as T


@nnx.jit
def _scores(source, target, tokens):
  """Summed KL(p_source || p_target), both summed losses, over tokens [B, L + 1]."""
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  p = jax.nn.log_softmax(source(inputs).astype(jnp.float32), -1)
  q = jax.nn.log_softmax(target(inputs).astype(jnp.float32), -1)

  def nll(logp):
    return -jnp.take_along_axis(logp, targets[..., None], -1).sum()
  return (jnp.exp(p) * (p - q)).sum(), nll(p), nll(q)


def divergence(source, target, batches) -> dict:
  kl = loss_s = loss_t = n = 0.0
  for tokens in batches:
    a, b, c = _scores(source, target, jnp.asarray(tokens))
    kl, loss_s, loss_t, n = kl + float(a), loss_s + float(b), loss_t + float(c), n + tokens[:, 1:].size
  return {"kl": kl / n, "source_loss": loss_s / n, "converted_loss": loss_t / n, "tokens": int(n)}


def check_source(source_dir: str, variant: str, kv_lora_rank: int, rope_head_dim: int):
  """The source's config, after every check that needs no weights (one line each)."""
  config = trainer.run_config(source_dir)
  CL.check(config, variant, kv_lora_rank, rope_head_dim)
  return config


def convert_run(source_dir: str, output_dir: str, data_spec, *, variant: str, kv_lora_rank: int,
                rope_head_dim: int, calibration_batches: int, batch_size: int, eval_batches: int) -> dict:
  """Write the converted model as step 0 of `output_dir`; its divergence from the source."""
  check_source(source_dir, variant, kv_lora_rank, rope_head_dim)
  T.refuse_existing_run(output_dir)
  _, source, _, meta, _ = trainer.load_run(source_dir)
  calibration = trainer.validation_batches(data_spec, meta, batch_size, calibration_batches, split="train")
  validation = trainer.validation_batches(data_spec, meta, batch_size, eval_batches)
  converted, info = CL.convert(source, variant, kv_lora_rank, rope_head_dim,
                               np.concatenate([b[:, :-1] for b in calibration]))
  scores = divergence(source, converted, validation)
  carried = {k: meta[k] for k in trainer.CARRIED_META + ("tokenizer", "tokenizer_name", "tokenizer_sha256")
             if k in meta}
  T.save_step0(output_dir, converted, T.TrainConfig(**meta["train_config"]), data="",
               converted_from=os.path.abspath(source_dir), latent_conversion={**info, **scores}, **carried)
  return {"config": converted.config, **info, **scores}


def summary(out: dict, source_dir: str, output_dir: str) -> str:
  a = out["config"].attention
  kept = ", ".join(map(str, out["kept_frequencies"])) or "none"
  return "\n".join([
      f"converted {source_dir} into {a.variant}: kv_lora_rank {a.kv_lora_rank} (full rank {out['full_rank']}), "
      f"rope {a.qk_rope_head_dim} wide",
      f"cache per token per layer: {out['source_cache_per_token']} -> {out['cache_per_token']} elements "
      f"({100 * (1 - out['cache_per_token'] / out['source_cache_per_token']):.1f}% less)",
      f"kept RoPE frequencies (indices into the source heads' ladder): {kept}; they carried "
      f"{100 * out['rope_contribution_kept']:.1f}% of the measured RoPE contribution",
      f"before fine-tuning, over {out['tokens']:,} validation tokens: KL(source || converted) "
      f"{out['kl']:.3g} nats/token; loss {out['source_loss']:.4f} -> {out['converted_loss']:.4f}",
      f"wrote {output_dir}/checkpoints/0; fine-tune with --mode=train --output_dir={output_dir} "
      f"[--distill_from={source_dir}]"])


# ----------------------------------------------------------------------------- the report


COLUMNS = ("variant", "kv_lora_rank", "rope_head_dim", "full_rank", "cache_per_token", "source_cache_per_token",
           "kl_before", "loss_before", "source_loss", "steps", "loss_finetuned", "loss_distilled",
           "loss_scratch", "kept_frequencies")


def read_rows(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return list(csv.DictReader(f))


def append_row(path: str, row: dict) -> None:
  new = not os.path.exists(path)
  with open(path, "a", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    if new:
      writer.writeheader()
    writer.writerow({k: row.get(k, "") for k in COLUMNS})


def cases(variants, ranks, rope_dims) -> list[tuple[str, int, int]]:
  return [(v, int(r), int(p)) for v in variants for r in ranks for p in rope_dims]


def report(source_dir: str, output_dir: str, c, *, variants, ranks, rope_dims, distill: bool,
           calibration_batches: int) -> str:
  """Every case of the sweep into `output_dir`, a CSV row each (see the module doc)."""
  source_config = trainer.run_config(source_dir)
  todo = cases(variants, ranks, rope_dims)
  for v, r, p in todo:                      # every case is checked before any work
    CL.check(source_config, v, r, p)
  csv_path = os.path.join(output_dir, "convert_report.csv")
  os.makedirs(output_dir, exist_ok=True)
  done = {(row["variant"], int(row["kv_lora_rank"]), int(row["rope_head_dim"])) for row in read_rows(csv_path)}
  loop = dataclasses.replace(c.loop, progress=False)

  source_tokenizer = trainer.load_meta(source_dir)["tokenizer"]
  data = dataclasses.replace(c.data, tokenizer=source_tokenizer)       # every run reads the source's token ids

  def train(run_dir, config, distill_from=""):
    out = trainer.train(config, c.train, data, dataclasses.replace(loop, output_dir=run_dir,
                                                                   distill_from=distill_from), c.options)
    return out["eval"]["loss"]

  def fine_tune(cell, converted_dir, name, config, distill_from=""):
    run_dir = os.path.join(cell, name)
    if not os.path.isdir(run_dir):                 # a copy of the converted step 0, trained in place
      shutil.copytree(converted_dir, run_dir)
    return train(run_dir, config, distill_from)

  # the control: the source itself, fine-tuned the same way (its weights at step 0, a fresh optimizer)
  source_csv = os.path.join(output_dir, "source_finetuned.csv")
  if not read_rows(source_csv):
    run_dir = os.path.join(output_dir, "runs", "source_finetuned")
    if trainer.saved_config(run_dir) is None:
      _, model, _, meta, _ = trainer.load_run(source_dir)
      carried = {k: meta[k] for k in trainer.CARRIED_META + ("tokenizer", "tokenizer_name", "tokenizer_sha256")
                 if k in meta}
      T.save_step0(run_dir, model, T.TrainConfig(**meta["train_config"]), data="",
                   converted_from=os.path.abspath(source_dir), **carried)
    print("[convert_report] the source, fine-tuned the same way", flush=True)
    loss = train(run_dir, source_config)
    with open(source_csv, "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=("variant", "steps", "loss_finetuned"))
      writer.writeheader()
      writer.writerow({"variant": source_config.attention.variant, "steps": c.train.steps, "loss_finetuned": loss})

  for k, (v, r, p) in enumerate(todo, 1):
    if (v, r, p) in done:
      continue
    name = f"{v}_r{r}_rope{p}"
    print(f"[convert_report] {k}/{len(todo)} {name}", flush=True)
    cell = os.path.join(output_dir, "runs", name)
    converted_dir = os.path.join(cell, "converted")
    if trainer.saved_config(converted_dir) is None:
      convert_run(source_dir, converted_dir, c.data, variant=v, kv_lora_rank=r, rope_head_dim=p,
                  calibration_batches=calibration_batches, batch_size=c.loop.eval_batch_size,
                  eval_batches=c.loop.eval_batches)
    info, config = trainer.load_meta(converted_dir)["latent_conversion"], trainer.run_config(converted_dir)
    row = {"variant": v, "kv_lora_rank": r, "rope_head_dim": p, "full_rank": info["full_rank"],
           "cache_per_token": info["cache_per_token"], "source_cache_per_token": info["source_cache_per_token"],
           "kl_before": info["kl"], "loss_before": info["converted_loss"], "source_loss": info["source_loss"],
           "steps": c.train.steps, "kept_frequencies": " ".join(map(str, info["kept_frequencies"]))}
    row["loss_finetuned"] = fine_tune(cell, converted_dir, "finetuned", config)
    if distill:
      row["loss_distilled"] = fine_tune(cell, converted_dir, "distilled", config, distill_from=source_dir)
    # the same variant, widths and query, as one trains it: latent norms, variance scales, its own RoPE ladder
    scratch = config.replace(attention=dataclasses.replace(config.attention, latent_norm=True, scales=True,
                                                           rope_inv_freq=()))
    row["loss_scratch"] = train(os.path.join(cell, "scratch"), scratch)
    append_row(csv_path, row)
  return csv_path
