"""Training parity with the MLRA authors' recipe: their model and optimizer in
torch (`torch_authors`: their layout and formulas, torch's AdamW, LambdaLR and
clipping, float64) and ours (the authors' initial weights converted, our
`make_train_step`, float32) trained on identical batches give the same per-step
losses; a scale, the decay mask or the schedule changed on purpose on the torch
side breaks the agreement, so the test can fail."""
import json
import os

import jax
import numpy as np
import pytest

import torch_authors
from mla_jax import convert, sharding
from mla_jax import train as T

MANIFEST = json.load(open(os.path.join(os.path.dirname(__file__), "data", "mlra_manifest.json")))

STEPS, WARMUP, BATCH, SEQ = 20, 5, 8, 16
TC = T.TrainConfig(steps=STEPS, warmup_steps=WARMUP, batch_size=BATCH, seq_len=SEQ, learning_rate=3e-3,
                   min_lr_ratio=0.1, weight_decay=0.5, b1=0.9, b2=0.95, grad_clip=1.0)
# fp32 against float64: a forward's rounding is ~1e-7 of the loss, and Adam carries
# it along (it divides by sqrt(v), so a near-zero gradient's rounding moves its
# parameter by up to ~lr * 1e-3). Measured here over the 20 steps: at most 4.6e-7
# relative for all 11 variants; each change on purpose below moves some step's loss
# by 8.6e-4 (every norm decaying) to 1.3e-2 (no variance scales).
RTOL = 1e-5


def initial_tensors(variant, seed=0):
  """Every tensor random (no zero output projection hiding attention), norms near one."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in MANIFEST[variant]["tensors"].items():
    noise = rng.normal(size=shape)
    out[name] = (1.0 + 0.1 * noise if "layernorm" in name else 0.05 * noise).astype(np.float32)
  out["lm_head.weight"] = out["transformer.wte.weight"]                  # tied
  return out


def batches(vocab, seed=1):
  """Periodic sequences (a random motif of 3 to 6 tokens repeated): the model can
  only lower the loss past the unigram rate by attending."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(STEPS):
    rows = []
    for _ in range(BATCH):
      motif = rng.integers(0, vocab, rng.integers(3, 7))
      rows.append(np.resize(motif, SEQ + 1))
    out.append(np.stack(rows).astype(np.int32))
  return out


_ours = {}


def our_losses(variant):
  if variant not in _ours:
    config = MANIFEST[variant]["config"]
    model = convert.to_model(convert.base_variant(variant), initial_tensors(variant), config_json=config)
    graphdef, params = T.split_model(model)
    state = T.init_state(params, T.make_optimizer(TC))
    mesh = sharding.make_mesh("", model.config)
    shardings = T.state_shardings(state, mesh)
    state = jax.device_put(state, shardings)
    step = T.make_train_step(graphdef, TC, shardings, mesh)
    losses = []
    for tokens in batches(config["vocab_size"]):
      state, m = step(state, tokens)
      losses.append(float(m["loss"]))
    _ours[variant] = np.array(losses)
  return _ours[variant]


def authors_losses(variant, **changes):
  config = MANIFEST[variant]["config"]
  recipe = dict(lr=TC.learning_rate, warmup=TC.warmup_steps, steps=TC.steps, min_lr_ratio=TC.min_lr_ratio,
                weight_decay=TC.weight_decay, b1=TC.b1, b2=TC.b2, grad_clip=TC.grad_clip)
  recipe.update(changes)
  return np.array(torch_authors.train(variant, initial_tensors(variant), config, batches(config["vocab_size"]),
                                      **recipe))


def largest_relative_difference(a, b):
  return float(np.max(np.abs(a - b) / np.abs(b)))


def _check(variant):
  ours, theirs = our_losses(variant), authors_losses(variant)
  assert theirs[-1] < theirs[0] - 0.1, f"{variant}: the torch run hardly trained ({theirs[0]:.3f} -> {theirs[-1]:.3f})"
  diff = largest_relative_difference(ours, theirs)
  print(f"{variant}: loss {theirs[0]:.4f} -> {theirs[-1]:.4f}, largest relative difference {diff:.2e}")
  assert diff < RTOL, f"{variant}: per-step losses differ by {diff:.2e} (ours {ours}, theirs {theirs})"


@pytest.mark.parametrize("variant", ["mha", "mla", "mlra4"])
def test_training_follows_the_authors_recipe(variant):
  _check(variant)


@pytest.mark.full
@pytest.mark.parametrize("variant", ["gqa", "mqa", "gla2", "gla4", "mlra2", "gta", "tpa", "mfa"])
def test_training_follows_the_authors_recipe_full(variant):
  _check(variant)


@pytest.mark.parametrize("change", [
    dict(decays=lambda name, p: True),                # every norm weight decays too
    dict(scales=False),                               # their *_no_scale model: no variance scales
    dict(warmup=WARMUP + 1),                          # one more warm-up step
    dict(min_lr_ratio=0.0),                           # a cosine to zero, not to 10% of the peak
    dict(grad_clip=0.0),                              # no clipping (it acts: the gradient norms pass 1)
], ids=["decay_norms", "no_scales", "warmup", "lr_floor", "no_clipping"])
def test_a_change_on_purpose_breaks_parity(change):
  diff = largest_relative_difference(our_losses("mla"), authors_losses("mla", **change))
  print(f"{sorted(change)}: largest relative difference {diff:.2e}")
  assert diff > 3 * RTOL, f"{sorted(change)}: losses still agree to {diff:.2e}; the parity test could not see it"
