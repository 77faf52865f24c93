"""MHA/MQA/GQA -> MLA, GLA, MLRA (mla_jax.convert_latent), against the source model.

Where the construction is exact the converted model must give the source's
logits and greedy continuations over a ragged batch (its latent decode path
included): a GPT-2-flavour MHA model (no RoPE) into every latent variant at
full rank, and a one-KV-head model with (llama3-scaled) RoPE keeping every
frequency. Elsewhere the KL must fall as the rank grows, and the RoPE
frequencies kept must be the ones that carry the scores.
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import random_model, small_config
from runner_helpers import story_file  # noqa: F401  (a fixture)

from mla_jax import convert_latent as CL
from mla_jax.generate import Sampling, generate
from mla_jax.model import from_per_layer_params, per_layer_params


def calibration(config, seed=0, batch=8, length=32):
  return np.random.default_rng(seed).integers(0, config.vocab_size, (batch, length))


forward = nnx.jit(lambda model, ids: model(ids))


def kl(source, target, ids):
  p = jax.nn.log_softmax(forward(source, ids), -1)
  q = jax.nn.log_softmax(forward(target, ids), -1)
  return float((jnp.exp(p) * (p - q)).sum(-1).mean())


def check_same_model(source, target):
  ids = jnp.asarray(np.random.default_rng(5).integers(0, source.config.vocab_size, (2, 24)))
  np.testing.assert_allclose(np.asarray(forward(target, ids)), np.asarray(forward(source, ids)), rtol=1e-4, atol=1e-4)
  rng = np.random.default_rng(6)
  lengths = np.array([3, 11, 7])
  prompts = rng.integers(0, source.config.vocab_size, (3, int(lengths.max())))
  want = generate(source, prompts, lengths, max_new_tokens=6, sampling=Sampling())
  got = generate(target, prompts, lengths, max_new_tokens=6, sampling=Sampling())
  np.testing.assert_array_equal(got.tokens, want.tokens)


@pytest.mark.parametrize("variant", [pytest.param(v, marks=pytest.mark.full) if v not in ("mla", "mlra2") else v
                                     for v in CL.TARGETS])
def test_without_rope_at_full_rank_the_source_model(variant):
  source = random_model(small_config("mha", flavour="gpt2", d_model=32), seed=1)
  full = CL.full_rank(source.config, variant)
  target, info = CL.convert(source, variant, full, 0, calibration(source.config))
  a = target.config.attention
  assert (a.variant, a.kv_lora_rank, a.qk_rope_head_dim, a.latent_norm, a.q_lora_rank) == (variant, full, 0, False, 0)
  assert info["kept_frequencies"] == [] and not hasattr(target.layers[0].attn, "kv_norm")
  check_same_model(source, target)


@pytest.mark.parametrize("variant", ["mla", pytest.param("gla2", marks=pytest.mark.full),
                                     pytest.param("mlra4", marks=pytest.mark.full)])
def test_one_kv_head_keeping_every_frequency_the_source_model(variant):
  """With one KV head the mixing is the identity and nothing is left unrotated:
  the converted rope key rotates the source's (llama3-scaled) frequencies."""
  config = small_config("mqa", d_model=32, head_dim=8, rope_scaling="llama3", rope_factor=8.0,
                        rope_original_max_len=8)
  source = random_model(config, seed=2)
  target, info = CL.convert(source, variant, CL.full_rank(config, variant), 8, calibration(config))
  from mla_jax.layers import rope_frequencies
  want = np.asarray(rope_frequencies(8, config.attention.rope_theta, config.attention)[0])
  np.testing.assert_array_equal(np.asarray(target.config.attention.rope_inv_freq, np.float32), want)
  assert info["kept_frequencies"] == [0, 1, 2, 3]
  check_same_model(source, target)


def test_the_divergence_falls_as_the_rank_grows():
  source = random_model(small_config("mha", flavour="gpt2", d_model=32), seed=3)
  ids = jnp.asarray(calibration(source.config, seed=9, batch=4))
  kls = [kl(source, CL.convert(source, "mla", r, 0, calibration(source.config))[0], ids) for r in (4, 8, 16, 24, 32)]
  assert all(a > b for a, b in zip(kls, kls[1:])), kls
  assert kls[0] > 0.05 and abs(kls[-1]) < 1e-6, kls
  # with RoPE and two KV heads the rope key is one mix of both: not exact, and keeping every
  # frequency is closer than keeping none
  gqa = random_model(small_config("gqa", d_model=32), seed=4)
  rope = [kl(gqa, CL.convert(gqa, "mla", CL.full_rank(gqa.config, "mla"), p, calibration(gqa.config))[0], ids)
          for p in (0, 8)]
  assert rope[0] > rope[1] > 1e-3, rope


def test_the_frequencies_kept_are_those_that_carry_the_scores():
  """Zero the query and key columns of every frequency pair but two: those two are kept."""
  source = random_model(small_config("gqa", d_model=32), seed=5)     # head_dim 8: pairs (f, f + 4)
  live = (1, 3)
  values = per_layer_params(source)
  for path in values:
    if path[-1] in ("wq", "wk"):
      dead = [c for f in range(4) if f not in live for c in (f, f + 4)]
      values[path] = np.asarray(values[path]).copy()
      values[path][..., dead] = 0.0
  source = from_per_layer_params(source.config, values)
  _, info = CL.convert(source, "mla", 16, 4, calibration(source.config))
  assert info["kept_frequencies"] == list(live)
  assert info["rope_contribution_kept"] == pytest.approx(1.0)


@pytest.mark.full
def test_a_scanned_source_converts_into_a_scanned_model():
  config = small_config("mha", flavour="gpt2", d_model=32).replace(scan_layers=True)
  source = random_model(config, seed=6)
  target, _ = CL.convert(source, "mla", CL.full_rank(config, "mla"), 0, calibration(config))
  assert target.config.scan_layers
  ids = jnp.asarray(calibration(config, seed=8, batch=2))
  np.testing.assert_allclose(np.asarray(forward(target, ids)), np.asarray(forward(source, ids)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("source, args, words", [
    ("mla", ("mla", 16, 0), "the source is a mla model"),
    ("mha", ("gta", 16, 0), "cannot convert into 'gta'"),
    ("mha", ("mla", 64, 0), "is larger than the full rank 32"),
    ("mha", ("mlra4", 30, 0), "does not split into mlra4's 4 equal blocks"),
    ("mha_rope", ("mla", 16, 10), "is wider than the source's heads \\(8\\)"),
    ("mha_rope", ("mla", 16, 3), "must be even"),
    ("mha", ("mla", 16, 4), "the source has no RoPE"),
])
def test_bad_conversions_are_one_line_before_any_work(source, args, words):
  config = small_config("mha", flavour="gpt2", d_model=32) if source == "mha" else \
      small_config("mha", d_model=32) if source == "mha_rope" else small_config(source, d_model=32)
  with pytest.raises(CL.ConvertLatentError, match=words) as e:
    CL.check(config, *args)
  assert "\n" not in str(e.value)


def test_qwen_style_sources_are_refused():
  for extra in (dict(qkv_bias=True), dict(qk_norm=True)):
    with pytest.raises(CL.ConvertLatentError, match="biases or q/k norms"):
      CL.check(small_config("gqa", **extra), "mla", 16, 4)


def test_a_converted_model_has_no_export_format():
  from mla_jax import hf
  source = random_model(small_config("mha", d_model=32), seed=7)
  target, _ = CL.convert(source, "mla", 16, 4, calibration(source.config))
  with pytest.raises(hf.HFError, match="latent_norm=False"):
    hf.export(target, "/nonexistent/never-written")


def test_distillation_loss_is_the_weighted_sum_numpy_computes():
  """One train step with a teacher: its cross-entropy, KL(teacher || model) and
  their mix, against NumPy on the two models' logits before the step."""
  from mla_jax import sharding
  from mla_jax import train as T
  config = small_config("mla", d_model=32)
  teacher = random_model(small_config("gqa", d_model=32), seed=8)
  tc = T.TrainConfig(steps=2, batch_size=2, seq_len=16, warmup_steps=0, distill_weight=0.3)
  mesh = sharding.make_mesh("", config)
  graphdef, state, shardings = T.create_state(config, tc, mesh)
  student = from_per_layer_params(config, {p: np.asarray(v) for p, v in per_layer_params(
      random_model(config, seed=9)).items()})
  state = {**state, "params": nnx.state(student, nnx.Param)}
  t_graphdef, t_params = nnx.split(teacher, nnx.Param)
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 17)).astype(np.int32)
  s_logits = np.asarray(forward(student, jnp.asarray(tokens[:, :-1])), np.float64)
  t_logits = np.asarray(forward(teacher, jnp.asarray(tokens[:, :-1])), np.float64)

  def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))
  ls, lt = log_softmax(s_logits), log_softmax(t_logits)
  ce = -np.take_along_axis(ls, tokens[:, 1:, None], -1).mean()
  kl_np = (np.exp(lt) * (lt - ls)).sum(-1).mean()
  step = T.make_train_step(graphdef, tc, shardings, mesh, teacher=(t_graphdef, t_params))
  _, m = step(state, jnp.asarray(tokens))
  np.testing.assert_allclose(float(m["cross_entropy"]), ce, rtol=1e-5)
  np.testing.assert_allclose(float(m["distill_kl"]), kl_np, rtol=1e-5)
  np.testing.assert_allclose(float(m["loss"]), 0.7 * ce + 0.3 * kl_np, rtol=1e-5)


def test_runner_converts_a_trained_run_and_fine_tunes_it_with_distillation(tmp_path, story_file):
  """Through the runner: train a GPT-2-flavour MHA run, --mode=convert_latent it
  into MLA at full rank (the same model: KL 0, the same loss), then fine-tune
  the converted run with --distill_from the source: the first step's KL to the
  teacher is 0, since the student starts as the teacher's exact copy."""
  import json

  from runner_helpers import run_cmd
  runner = [sys.executable, "-m", "experiments.run"]
  data = ["--data=tinystories", f"--tinystories_train={story_file / 'train.txt'}", f"--data_dir={tmp_path / 'cache'}",
          "--batch_size=2", "--seq_len=16", "--eval_batches=1", "--eval_batch_size=2", "--max_new_tokens=4",
          "--noprogress"]
  source, latent = tmp_path / "mha", tmp_path / "mla"
  trained = run_cmd(runner + ["--mode=train", f"--output_dir={source}", "--flavour=gpt2", "--variant=mha",
                              "--mha_rope=off", "--vocab_size=300", "--d_model=32", "--num_heads=2", "--head_dim=8",
                              "--mlp_dim=64", "--steps=3", "--warmup_steps=1", "--max_seq_len=64", *data])
  assert trained.returncode == 0, trained.stderr
  converted = run_cmd(runner + ["--mode=convert_latent", f"--convert_from={source}", f"--output_dir={latent}",
                                "--variant=mla", "--kv_lora_rank=32", "--qk_rope_head_dim=0", *data])
  assert converted.returncode == 0, converted.stderr
  line = next(s for s in converted.stdout.splitlines() if "KL(source || converted)" in s)
  kl_value = float(line.split("KL(source || converted) ")[1].split(" ")[0])
  before, after = line.split("loss ")[1].split(" -> ")
  assert abs(kl_value) < 1e-5 and abs(float(before) - float(after)) < 1e-4, line
  assert "cache per token per layer: 32 -> 32 elements" in converted.stdout
  tuned = run_cmd(runner + ["--mode=train", f"--output_dir={latent}", f"--distill_from={source}", "--steps=2",
                            "--warmup_steps=0", *data])
  assert tuned.returncode == 0, tuned.stderr
  with open(latent / "metrics.jsonl") as f:
    first = next(r for r in map(json.loads, f) if r["kind"] == "train")
  assert first["step"] == 1 and abs(first["distill_kl"]) < 1e-5, first
  assert first["loss"] == pytest.approx(0.5 * first["cross_entropy"] + 0.5 * first["distill_kl"], rel=1e-5)
