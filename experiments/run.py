"""The experiment runner.

    python -m experiments.run --flagfile=experiments/configs/quickstart.flags
    python -m experiments.run --flagfile=experiments/configs/kv_report_paper.flags
    python -m experiments.run --mode=params

Modes:
  generate   build a model (randomly initialised until the training runner lands)
             and continue a prompt under one jit: prefill + lax decode loop.
  kv_report  for every variant of a model family: parameters, cache per token,
             and the per-device cache at each TP degree measured on arrays
             placed on a simulated mesh. Table, CSV and bar chart.
  params     parameter counts and cache sizes of every named preset.
"""
from __future__ import annotations

import os
import sys
import time

from absl import app, flags, logging

MODES = ("generate", "kv_report", "params")
ALL_VARIANTS = ("mha", "mqa", "gqa", "mla", "gla2", "gla4", "mlra2", "mlra4", "gta", "tpa", "mfa")

flags.DEFINE_enum("mode", "generate", MODES, "What to run.")
flags.DEFINE_string("preset", None, "A named model config (python -m mla_jax.presets lists them); "
                    "overrides the model flags below.")
flags.DEFINE_enum("family", "flags", ["flags", "paper", "study"],
                  "kv_report: which models to compare. paper/study: the presets of the MLRA paper "
                  "or the small-model study; flags: every --variants entry built from the model flags.")
flags.DEFINE_list("variants", list(ALL_VARIANTS), "kv_report with --family=flags: the variants.")
flags.DEFINE_enum("flavour", "llama", ["llama", "gpt2"], "Transformer flavour.")
flags.DEFINE_string("variant", "mla", f"Attention variant ({', '.join(ALL_VARIANTS)}).")
flags.DEFINE_integer("vocab_size", 256, "Vocabulary size (bytes until the tokenizer lands).")
flags.DEFINE_integer("d_model", 128, "Model width.")
flags.DEFINE_integer("num_layers", 2, "Layers.")
flags.DEFINE_integer("mlp_dim", 344, "MLP width.")
flags.DEFINE_integer("num_heads", 4, "Query heads.")
flags.DEFINE_integer("head_dim", 32, "Head width (MHA/MQA/GQA/GTA/TPA) and no-RoPE q/k width (latent family).")
flags.DEFINE_integer("num_kv_heads", 2, "KV heads (gqa, gta).")
flags.DEFINE_integer("q_lora_rank", 64, "Query latent width (latent family; 0 = full rank).")
flags.DEFINE_integer("kv_lora_rank", 64, "KV latent width d_c (latent family).")
flags.DEFINE_integer("rope_head_dim", 16, "Decoupled RoPE width d_r (latent family; 0 = none).")
flags.DEFINE_integer("tpa_q_rank", 6, "TPA query rank R_Q.")
flags.DEFINE_integer("tpa_kv_rank", 2, "TPA key and value rank R_K = R_V.")
flags.DEFINE_integer("mfa_head_dim", None, "MFA head width C (default 2 * head_dim).")
flags.DEFINE_integer("mfa_q_rank", None, "MFA query latent width C_q (default d_model / 2... "
                     "or q_lora_rank when set).")
flags.DEFINE_integer("max_seq_len", 512, "Longest sequence (the GPT-2 position table).")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_string("prompt", "Once upon a time", "Prompt for generate.")
flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate.")
flags.DEFINE_float("temperature", 0.8, "Sampling temperature (0 = greedy).")
flags.DEFINE_integer("top_k", 40, "Top-k filter (0 = off).")
flags.DEFINE_float("top_p", 0.95, "Top-p filter (1 = off).")
flags.DEFINE_enum("decode_impl", "absorbed", ["naive", "absorbed"], "Decode path of the latent family.")
flags.DEFINE_enum("cache_dtype", "float32", ["float32", "bfloat16"], "KV-cache dtype.")
flags.DEFINE_list("tps", ["1", "2", "4", "8"], "kv_report: tensor-parallel degrees.")
flags.DEFINE_integer("batch", 1, "kv_report: batch size for the whole-cache figures.")
flags.DEFINE_integer("context", 2048, "kv_report: context length for the whole-cache figures.")
flags.DEFINE_string("output_dir", "runs", "Where reports, CSVs and plots go.")

FLAGS = flags.FLAGS


def model_config_from_flags(variant: str | None = None):
  """A ModelConfig from the model flags (or --preset), for `variant` (default --variant)."""
  from mla_jax import ModelConfig, attention_config, presets
  if FLAGS.preset and variant is None:
    return presets.get(FLAGS.preset)
  v = variant or FLAGS.variant
  if v in ("mha", "mqa", "gqa"):
    kw = dict(head_dim=FLAGS.head_dim, rope=FLAGS.flavour == "llama")
    if v == "gqa":
      kw["num_kv_heads"] = FLAGS.num_kv_heads
  elif v == "gta":
    kw = dict(head_dim=FLAGS.head_dim, num_kv_heads=FLAGS.num_kv_heads)
  elif v == "tpa":
    kw = dict(head_dim=FLAGS.head_dim, q_rank=FLAGS.tpa_q_rank, k_rank=FLAGS.tpa_kv_rank,
              v_rank=FLAGS.tpa_kv_rank)
  elif v == "mfa":
    kw = dict(head_dim=FLAGS.mfa_head_dim or 2 * FLAGS.head_dim,
              q_lora_rank=FLAGS.mfa_q_rank or FLAGS.q_lora_rank or FLAGS.d_model // 2)
  else:
    kw = dict(q_lora_rank=FLAGS.q_lora_rank, kv_lora_rank=FLAGS.kv_lora_rank,
              qk_nope_head_dim=FLAGS.head_dim, qk_rope_head_dim=FLAGS.rope_head_dim)
  attention = attention_config(v, num_heads=FLAGS.num_heads, **kw)
  return ModelConfig(flavour=FLAGS.flavour, vocab_size=FLAGS.vocab_size, d_model=FLAGS.d_model,
                     num_layers=FLAGS.num_layers, mlp_dim=FLAGS.mlp_dim,
                     max_seq_len=FLAGS.max_seq_len, attention=attention)


def family_configs() -> dict:
  """name -> ModelConfig for every variant the report compares."""
  from mla_jax import presets
  if FLAGS.family == "paper":
    return {v: presets.mlra_paper(v) for v in presets.PAPER_VARIANTS}
  if FLAGS.family == "study":
    return {name[len("study_"):]: make() for name, make in presets.presets().items()
            if name.startswith("study_")}
  unknown = [v for v in FLAGS.variants if v not in ALL_VARIANTS]
  if unknown:
    raise ValueError(f"unknown variant {unknown[0]!r} in --variants; choose from {', '.join(ALL_VARIANTS)}")
  return {v: model_config_from_flags(v) for v in FLAGS.variants}


def run_generate(config) -> None:
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from mla_jax import Transformer, count_params
  from mla_jax.generate import Sampling, generate

  if config.vocab_size < 256:
    raise ValueError(f"generate encodes the prompt as bytes until the tokenizer lands: "
                     f"needs vocab_size >= 256, got {config.vocab_size}")
  sampling = Sampling(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)
  prompt = np.frombuffer(FLAGS.prompt.encode("utf-8"), np.uint8).astype(np.int32)[None]
  print(f"model: {config.flavour}, {config.attention.variant}, "
        f"{count_params(config)['total']:,} parameters (randomly initialised), "
        f"{config.cache_elements_per_token()} cached elements per token per layer")
  model = Transformer(config, rngs=nnx.Rngs(FLAGS.seed))
  kwargs = dict(max_new_tokens=FLAGS.max_new_tokens, rng=FLAGS.seed, sampling=sampling,
                decode_impl=FLAGS.decode_impl, cache_dtype=jnp.dtype(FLAGS.cache_dtype))
  start = time.perf_counter()
  generate(model, prompt, [prompt.shape[1]], **kwargs)      # compile
  compiled = time.perf_counter()
  out = generate(model, prompt, [prompt.shape[1]], **kwargs)
  done = time.perf_counter()
  text = bytes(int(t) % 256 for t in out.tokens[0, :out.lengths[0]]).decode("utf-8", "replace")
  print(f"prompt: {FLAGS.prompt!r}")
  print(f"continuation ({out.lengths[0]} tokens, random weights): {text!r}")
  print(f"compile {compiled - start:.1f}s; generation {1e3 * (done - compiled) / out.lengths[0]:.2f} "
        f"ms/token ({FLAGS.decode_impl} decode, {FLAGS.cache_dtype} cache)")


def run_kv_report(configs, tps) -> None:
  import jax.numpy as jnp

  from mla_jax import cache_report
  cache_report.check_devices(tps)
  first = next(iter(configs.values()))
  report = cache_report.rows(configs, tps=tps, batch=FLAGS.batch, context=FLAGS.context,
                             cache_dtype=jnp.dtype(FLAGS.cache_dtype))
  title = (f"{FLAGS.family}: d_model {first.d_model}, {first.num_layers} layers, "
           f"{first.attention.num_heads} heads; {FLAGS.cache_dtype} cache")
  cache_report.write(report, FLAGS.output_dir, name=f"kv_report_{FLAGS.family}", batch=FLAGS.batch,
                     context=FLAGS.context, layers=first.num_layers, title=title)


def _parse_tps() -> list[int]:
  try:
    tps = [int(t) for t in FLAGS.tps]
  except ValueError:
    raise ValueError(f"--tps takes integers, e.g. --tps=1,2,4,8; got {','.join(FLAGS.tps)}") from None
  if not tps or min(tps) < 1:
    raise ValueError(f"--tps must list degrees >= 1, got {','.join(FLAGS.tps)}")
  return tps


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; flags look like --name=value")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # keep JAX's backend probing out of the output
  try:
    if FLAGS.mode == "params":
      from mla_jax import presets
      presets.main()
    elif FLAGS.mode == "kv_report":
      tps = _parse_tps()
      # The report lays caches out on simulated CPU devices; JAX reads this when it starts.
      if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={max(tps)}").strip()
      run_kv_report(family_configs(), tps)
    else:
      run_generate(model_config_from_flags())
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
