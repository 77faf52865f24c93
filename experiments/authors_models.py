"""The MLRA authors' PyTorch models, imported from a checkout of their repository
(github.com/SongtaoLiu0823/MLRA) at run time; nothing of theirs is copied here.

    # the tensor manifest the conversion tests use (tests/data/mlra_manifest.json)
    .venv/bin/python -m experiments.authors_models --authors_repo=/path/to/MLRA --write_manifest
    # build their model, convert its weights, compare logits with ours
    .venv/bin/python -m experiments.authors_models --authors_repo=/path/to/MLRA --variants=mla,mlra4

Their code imports flash-attn (a GPU kernel) and transformers; on a CPU the
stand-ins of `experiments.torch_stand_ins` replace them (torch's causal
scaled_dot_product_attention, and the two base classes).
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags

from experiments import cli

from experiments.torch_stand_ins import load_authors_module, require_torch_and_repo

# our variant name -> (their model file, their config keys)
SMALL = dict(vocab_size=128, n_layer=2, n_embd=64, n_head=4, intermediate_size=96, block_size=64)
LATENT = dict(q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8)
VARIANTS = {
    "mha": ("mha", dict(head_dim=16)),
    "mqa": ("gqa", dict(head_dim=16, group_size=4)),
    "gqa": ("gqa", dict(head_dim=16, group_size=2)),
    "gqa_gated": ("gqa_gated", dict(head_dim=16, group_size=2)),
    "mla": ("mla", LATENT),
    "mla_gated": ("mla_gated", LATENT),
    "gla2": ("gla_2", LATENT),
    "gla2_gated": ("gla_2_gated", LATENT),
    "gla4": ("gla_4", LATENT),
    "mlra2": ("mlra_2", LATENT),
    "mlra2_gated": ("mlra_2_gated", LATENT),
    "mlra4": ("mlra_4", LATENT),
    "mlra4_gated": ("mlra_4_gated", LATENT),
    "gta": ("gta", dict(head_dim=16, group_size=2)),
    "tpa": ("tpa", dict(head_dim=16, rank=2, q_rank=3)),
    "mfa": ("mfa", dict(head_dim=32, share_q_dim=32)),
    # their scale ablation: the same tensors, no q / kv / branch scales (imported with scales=False)
    "mla_no_scale": ("mla_no_scale", LATENT),
    "gla2_no_scale": ("gla_2_no_scale", LATENT),
    "mlra2_no_scale": ("mlra_2_no_scale", LATENT),
}
NO_SCALE = "_no_scale"

flags.DEFINE_string("authors_repo", None, "A checkout of github.com/SongtaoLiu0823/MLRA.")
flags.DEFINE_list("variants", list(VARIANTS), "Variants to check.")
flags.DEFINE_bool("write_manifest", False, "Write tests/data/mlra_manifest.json instead of comparing.")
flags.DEFINE_string("manifest", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                             "tests", "data", "mlra_manifest.json"), "Manifest path.")
FLAGS = flags.FLAGS


def build(repo: str, variant: str, seed: int = 0):
  """Their GPT at the small config, every parameter random (their output
  projections start at zero, which would hide attention)."""
  import torch
  file, extra = VARIANTS[variant]
  module = load_authors_module(repo, file)
  config = {**SMALL, **extra}
  model = module.GPT(module.GPTConfig(**config))
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layernorm" in name:
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
      else:
        p.copy_(0.2 * torch.randn(p.shape, generator=gen))
  return model.eval(), config


def manifest(repo: str) -> dict:
  out = {}
  for variant in (v for v in VARIANTS if not v.endswith(NO_SCALE)):   # same tensors as the scaled files
    model, config = build(repo, variant)
    out[variant] = {"authors_file": f"model/{VARIANTS[variant][0]}.py", "config": config,
                    "tensors": {k: list(v.shape) for k, v in model.state_dict().items()}}
  return out


def compare(repo: str, variant: str) -> float:
  """Max |logits ours - logits theirs| after converting their random weights."""
  import numpy as np
  import torch

  from mla_jax import convert
  model, config = build(repo, variant)
  tensors = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  name = variant[: -len(NO_SCALE)] if variant.endswith(NO_SCALE) else variant
  ours = convert.to_model(convert.base_variant(name), tensors, config_json=config,
                          scales=not variant.endswith(NO_SCALE))
  tokens = np.random.default_rng(0).integers(0, config["vocab_size"], (2, 24))
  with torch.no_grad():
    theirs, _ = model(torch.as_tensor(tokens), output_all_seq=True)
  return float(np.abs(np.asarray(ours(tokens)) - theirs.float().numpy()).max())


def main(argv):
  del argv
  require_torch_and_repo(FLAGS.authors_repo)
  try:
    if FLAGS.write_manifest:
      os.makedirs(os.path.dirname(FLAGS.manifest), exist_ok=True)
      with open(FLAGS.manifest, "w") as f:
        json.dump(manifest(FLAGS.authors_repo), f, indent=1, sort_keys=True)
      print(f"wrote {FLAGS.manifest}")
      return
    worst = 0.0
    for variant in FLAGS.variants:
      if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
      diff = compare(FLAGS.authors_repo, variant)
      worst = max(worst, diff)
      print(f"{variant:15s} max |logits ours - theirs| = {diff:.2e}", flush=True)
    print("converted weights give the authors' logits" if worst < 1e-3 else "MISMATCH")
    sys.exit(0 if worst < 1e-3 else 1)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
