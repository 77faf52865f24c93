"""The experiment runner: `python -m experiments.run --flagfile=experiments/configs/X.flags`.

Modes:
  train        build (or reuse) the dataset and tokenizer, train, evaluate, save
               checkpoints; rerunning the same command resumes.
  eval         validation loss / perplexity, cache size and a sample story from
               the latest checkpoint of --output_dir.
  generate     continue --prompt with the model in --output_dir (one jit: prefill
               + lax decode loop).
  bench_train  median train-step time and tokens/s after warm-up.
  bench_decode decode-step latency and tokens/s per decode path over batch sizes
               and contexts, the cache bytes each step must read beside XLA's
               bytes accessed, and on a GPU the fraction of peak bandwidth.
  kv_report    for every variant of a model family: parameters, cache per token,
               and the per-device cache at each TP degree measured on arrays
               placed on a simulated mesh. Table, CSV and bar chart.
  decode_traffic  the same rows plus, from one block's compiled sharded decode
               step at each TP degree: the cache and weight bytes each device
               takes in, XLA's bytes accessed, and the collectives in the HLO.
  convert      import a checkpoint of the MLRA authors' PyTorch code (--torch_checkpoint,
               --variant) as a run directory (--output_dir) that eval, generate
               and train read.
  params       parameter counts and cache sizes of every named preset.
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags, logging

MODES = ("train", "eval", "generate", "bench_train", "bench_decode", "kv_report", "decode_traffic",
         "convert", "params")
ALL_VARIANTS = ("mha", "mqa", "gqa", "mla", "gla2", "gla4", "mlra2", "mlra4", "gta", "tpa", "mfa")

# ---- what to run
flags.DEFINE_enum("mode", "train", MODES, "What to run.")
flags.DEFINE_string("output_dir", "runs/default", "The run directory (checkpoints, metrics, plots), "
                    "or where reports go.")
flags.DEFINE_string("mesh", "", "Device mesh, e.g. data:2,fsdp:1,tensor:4 (empty: every device on "
                    "the data axis in a multi-process run, one device otherwise).")
flags.DEFINE_enum("rules", "default", ["default", "vocab_replicated"],
                  "Logical-axis rules preset (mla_jax.sharding.RULE_PRESETS).")

# ---- multi-process (see launch/README.md)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process runs.")
flags.DEFINE_integer("num_processes", None, "Processes in the run (SLURM is detected without flags).")
flags.DEFINE_integer("process_id", None, "This process's index.")
flags.DEFINE_integer("local_device_count", None, "CPU devices this process exposes (CPU runs only).")
flags.DEFINE_integer("distributed_timeout", 120, "Seconds to wait for the other processes.")
flags.DEFINE_integer("seed", 0, "Random seed (initialisation, data order, sampling).")

# ---- model
flags.DEFINE_string("preset", None, "A named model config (python -m mla_jax.presets lists them); "
                    "overrides the model flags below.")
flags.DEFINE_enum("flavour", "llama", ["llama", "gpt2"], "Transformer flavour.")
flags.DEFINE_string("variant", "mla", f"Attention variant ({', '.join(ALL_VARIANTS)}).")
flags.DEFINE_integer("vocab_size", 4096, "The model's vocabulary and the trained tokenizer's size "
                     "(with --preset, only the tokenizer's: the preset keeps its rows).")
flags.DEFINE_integer("d_model", 128, "Model width.")
flags.DEFINE_integer("num_layers", 2, "Layers.")
flags.DEFINE_integer("mlp_dim", 344, "MLP width.")
flags.DEFINE_integer("num_heads", 4, "Query heads.")
flags.DEFINE_integer("head_dim", 32, "Head width (MHA/MQA/GQA/GTA/TPA) and no-RoPE q/k width (latent family).")
flags.DEFINE_integer("num_kv_heads", 2, "KV heads (gqa, gta).")
flags.DEFINE_integer("q_lora_rank", 64, "Query latent width (latent family; 0 = full rank).")
flags.DEFINE_integer("kv_lora_rank", 64, "KV latent width d_c (latent family).")
flags.DEFINE_integer("rope_head_dim", 16, "Decoupled RoPE width d_r (latent family; 0 = none).")
flags.DEFINE_bool("latent_scales", True, "The MLRA code base's q/kv variance scales (latent family).")
flags.DEFINE_enum("mha_rope", "auto", ["auto", "on", "off"],
                  "RoPE on the queries and keys of mha/mqa/gqa: auto = on in the Llama flavour, off in the "
                  "GPT-2 flavour (absolute positions); on in GPT-2 gives both, a control for MLA+RoPE.")
flags.DEFINE_bool("gated", False, "Output gate sigmoid(x W_g) (gqa and the latent family).")
flags.DEFINE_integer("tpa_q_rank", 6, "TPA query rank R_Q.")
flags.DEFINE_integer("tpa_kv_rank", 2, "TPA key and value rank R_K = R_V.")
flags.DEFINE_integer("mfa_head_dim", None, "MFA head width C (default 2 * head_dim).")
flags.DEFINE_integer("mfa_q_rank", None, "MFA query latent width C_q (default q_lora_rank, or d_model / 2).")
flags.DEFINE_integer("max_seq_len", 2048, "Longest sequence (the GPT-2 position table).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype (parameters stay fp32).")
flags.DEFINE_bool("scan_layers", False, "Stack the layers and lax.scan over them (compile time flat in depth).")
flags.DEFINE_enum("remat", "none", ["none", "full", "dots", "dots_no_batch"],
                  "Recompute activations in the backward pass (jax.checkpoint policy).")
flags.DEFINE_enum("attention_impl", "einsum", ["einsum", "dpa"],
                  "Training attention: our einsums, or jax.nn.dot_product_attention (cuDNN on GPUs) "
                  "where the variant's shapes allow.")
flags.DEFINE_integer("causal_chunks", 0, "einsum attention in training: split the queries into this "
                     "many blocks, each scored only against the keys it can see (0 = one per 64 "
                     "queries, at most 4; 1 = one block).")

# ---- data
flags.DEFINE_enum("data", "synthetic_stories", ["synthetic_stories", "tinystories"], "Dataset.")
flags.DEFINE_string("data_dir", "~/.cache/mla_jax", "Where datasets and tokenizers are built and cached.")
flags.DEFINE_integer("num_train_stories", 100_000, "synthetic_stories: training stories.")
flags.DEFINE_integer("num_valid_stories", 2_000, "synthetic_stories: validation stories.")
flags.DEFINE_integer("data_seed", 0, "synthetic_stories: generator seed.")
flags.DEFINE_string("tinystories_train", "", "tinystories: TinyStoriesV2 .txt, JSON shards, a folder or a glob.")
flags.DEFINE_string("tinystories_valid", "", "tinystories: validation file(s); empty holds out 1% of train.")
flags.DEFINE_string("tokenizer", "", "A SentencePiece .model or a Hugging Face tokenizer.json; "
                    "empty trains a SentencePiece model of --vocab_size on the training split.")
flags.DEFINE_integer("tokenizer_docs", 20_000, "Training documents used to fit the tokenizer.")

# ---- training
flags.DEFINE_integer("steps", 1000, "Training steps.")
flags.DEFINE_integer("batch_size", 16, "Global batch size in sequences.")
flags.DEFINE_integer("seq_len", 256, "Tokens per training sequence.")
flags.DEFINE_float("learning_rate", 3e-3, "Peak learning rate.")
flags.DEFINE_integer("warmup_steps", 100, "Linear warm-up steps.")
flags.DEFINE_float("min_lr_ratio", 0.1, "Cosine decay floor, as a fraction of the peak.")
flags.DEFINE_float("weight_decay", 0.1, "AdamW weight decay (matrices only).")
flags.DEFINE_float("beta1", 0.9, "AdamW beta1.")
flags.DEFINE_float("beta2", 0.95, "AdamW beta2.")
flags.DEFINE_float("grad_clip", 1.0, "Global-norm gradient clipping (0 = off).")
flags.DEFINE_integer("grad_accum", 1, "Micro-batches per step (gradient accumulation).")
flags.DEFINE_integer("log_every", 10, "Steps between tokens/s measurements on the progress bar.")
flags.DEFINE_integer("eval_every", 200, "Steps between validation passes.")
flags.DEFINE_integer("eval_batches", 8, "Validation batches per pass (the same ones every time).")
flags.DEFINE_integer("eval_batch_size", 16, "Validation batch size.")
flags.DEFINE_integer("ckpt_every", 200, "Steps between checkpoints (one is always written at the end).")
flags.DEFINE_integer("keep_checkpoints", 3, "Checkpoints kept.")
flags.DEFINE_bool("async_checkpoints", True, "Save checkpoints in the background.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.DEFINE_integer("bench_warmup", 3, "bench_train: untimed steps.")
flags.DEFINE_integer("bench_steps", 10, "bench_train: timed steps.")

# ---- generation
flags.DEFINE_string("prompt", "Once upon a time", "Prompt for generate and for the samples.")
flags.DEFINE_integer("max_new_tokens", 120, "Tokens to generate.")
flags.DEFINE_float("temperature", 0.8, "Sampling temperature (0 = greedy).")
flags.DEFINE_integer("top_k", 40, "Top-k filter (0 = off).")
flags.DEFINE_float("top_p", 0.95, "Top-p filter (1 = off).")
flags.DEFINE_enum("decode_impl", "auto", ["naive", "absorbed", "pallas", "auto"],
                  "Decode path: naive (re-expand K/V), absorbed (XLA, latent-only), pallas (the GPU "
                  "kernels; interpret mode elsewhere), auto (pallas on GPUs where shapes allow).")
flags.DEFINE_list("bench_impls", ["naive", "absorbed", "pallas"], "bench_decode: decode paths to time.")
flags.DEFINE_list("bench_batches", ["1", "8"], "bench_decode: batch sizes.")
flags.DEFINE_list("bench_contexts", ["256", "1024"], "bench_decode: context lengths (cache slots).")
flags.DEFINE_enum("cache_dtype", "float32", ["float32", "bfloat16"], "KV-cache dtype.")

# ---- convert
flags.DEFINE_string("torch_checkpoint", None, "convert: the authors' checkpoint (safetensors, a weights-only "
                    "torch pickle, or a folder holding one and its config.json).")
flags.DEFINE_integer("convert_num_heads", None, "convert: query heads, when the checkpoint has no config.json "
                     "and the variant's shapes do not tell (MHA/MQA/GQA).")

# ---- reports
flags.DEFINE_enum("family", "flags", ["flags", "paper", "study"],
                  "kv_report: which models to compare. paper/study: the presets of the MLRA paper "
                  "or the small-model study; flags: every --variants entry built from the model flags.")
flags.DEFINE_list("variants", list(ALL_VARIANTS), "kv_report with --family=flags: the variants.")
flags.DEFINE_list("tps", ["1", "2", "4", "8"], "kv_report, decode_traffic: tensor-parallel degrees.")
flags.DEFINE_integer("batch", 1, "kv_report, decode_traffic: batch size.")
flags.DEFINE_integer("context", 2048, "kv_report, decode_traffic: context length (cache slots).")

FLAGS = flags.FLAGS


def model_config_from_flags(variant: str | None = None):
  """A ModelConfig from the model flags (or --preset), for `variant` (default --variant)."""
  from mla_jax import ModelConfig, attention_config, presets
  runtime = dict(dtype=FLAGS.dtype, scan_layers=FLAGS.scan_layers, remat=FLAGS.remat,
                 attention_impl=FLAGS.attention_impl, causal_chunks=FLAGS.causal_chunks)
  if FLAGS.preset and variant is None:
    return presets.get(FLAGS.preset).replace(**runtime)
  v = variant or FLAGS.variant
  if v not in ALL_VARIANTS:
    raise ValueError(f"unknown --variant={v!r}; choose one of {', '.join(ALL_VARIANTS)}")
  if v in ("mha", "mqa", "gqa"):
    use_rope = {"auto": FLAGS.flavour == "llama", "on": True, "off": False}[FLAGS.mha_rope]
    kw = dict(head_dim=FLAGS.head_dim, rope=use_rope, gated=FLAGS.gated)
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
              qk_nope_head_dim=FLAGS.head_dim, qk_rope_head_dim=FLAGS.rope_head_dim,
              scales=FLAGS.latent_scales, gated=FLAGS.gated)
  attention = attention_config(v, num_heads=FLAGS.num_heads, **kw)
  return ModelConfig(flavour=FLAGS.flavour, vocab_size=FLAGS.vocab_size, d_model=FLAGS.d_model,
                     num_layers=FLAGS.num_layers, mlp_dim=FLAGS.mlp_dim, max_seq_len=FLAGS.max_seq_len,
                     attention=attention, **runtime)


def train_config_from_flags():
  from mla_jax.train import TrainConfig
  return TrainConfig(steps=FLAGS.steps, batch_size=FLAGS.batch_size, seq_len=FLAGS.seq_len,
                     learning_rate=FLAGS.learning_rate, warmup_steps=FLAGS.warmup_steps,
                     min_lr_ratio=FLAGS.min_lr_ratio, weight_decay=FLAGS.weight_decay,
                     b1=FLAGS.beta1, b2=FLAGS.beta2, grad_clip=FLAGS.grad_clip,
                     grad_accum=FLAGS.grad_accum, seed=FLAGS.seed)


def data_spec_from_flags():
  from experiments.trainer import DataSpec
  return DataSpec(kind=FLAGS.data, data_dir=FLAGS.data_dir, num_train=FLAGS.num_train_stories,
                  num_validation=FLAGS.num_valid_stories, seed=FLAGS.data_seed,
                  tinystories_train=FLAGS.tinystories_train, tinystories_valid=FLAGS.tinystories_valid,
                  tokenizer=FLAGS.tokenizer, vocab_size=FLAGS.vocab_size,
                  tokenizer_docs=FLAGS.tokenizer_docs)


def family_configs() -> dict:
  """name -> ModelConfig for every variant the KV report compares."""
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


def _sampling():
  from mla_jax.generate import Sampling
  return Sampling(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)


# ----------------------------------------------------------------------------- modes


def run_train() -> None:
  from experiments import trainer
  from mla_jax import count_params
  config, tc = model_config_from_flags(), train_config_from_flags()
  loop = trainer.LoopSpec(output_dir=FLAGS.output_dir, mesh=FLAGS.mesh, rules=FLAGS.rules,
                          log_every=FLAGS.log_every,
                          eval_every=FLAGS.eval_every, eval_batches=FLAGS.eval_batches,
                          eval_batch_size=FLAGS.eval_batch_size, ckpt_every=FLAGS.ckpt_every,
                          keep_checkpoints=FLAGS.keep_checkpoints,
                          async_checkpoints=FLAGS.async_checkpoints, prompt=FLAGS.prompt,
                          sample_tokens=FLAGS.max_new_tokens, progress=FLAGS.progress)
  counts = count_params(config)
  print(f"model: {config.flavour} / {config.attention.variant}, {counts['total']:,} parameters "
        f"({counts['non_embedding']:,} non-embedding), {config.cache_elements_per_token()} cached "
        f"elements per token per layer; {tc.steps} steps of {tc.batch_size} x {tc.seq_len} tokens")
  summary = trainer.train(config, tc, data_spec_from_flags(), loop)
  if summary.get("resumed_from") is not None:
    print(f"resumed from step {summary['resumed_from']}")
  if "eval" in summary:
    print(f"validation loss {summary['eval']['loss']:.4f}, perplexity {summary['eval']['perplexity']:.2f}")
  if summary.get("loss_curve"):          # process 0 prints for the run
    print(f"sample: {summary['sample']}")
    print(f"loss curve: {summary['loss_curve']}")


def run_eval() -> None:
  from experiments import trainer
  out = trainer.run_eval(FLAGS.output_dir, data_spec_from_flags(), mesh=FLAGS.mesh,
                         eval_batches=FLAGS.eval_batches, eval_batch_size=FLAGS.eval_batch_size,
                         prompt=FLAGS.prompt, sample_tokens=FLAGS.max_new_tokens, seed=FLAGS.seed,
                         rules=FLAGS.rules)
  sample = out.pop("sample")
  print(json.dumps(out, indent=2))
  print(f"sample: {sample}")


def run_generate() -> None:
  import jax.numpy as jnp
  from experiments import trainer
  from mla_jax.generate import generate
  import numpy as np
  config, model, tokenizer, meta, _ = trainer.load_run(FLAGS.output_dir, FLAGS.mesh, FLAGS.rules)
  ids = tokenizer.encode(FLAGS.prompt)
  if not ids:
    raise ValueError("the prompt encodes to no tokens; give a non-empty --prompt")
  kwargs = dict(max_new_tokens=FLAGS.max_new_tokens, rng=FLAGS.seed, sampling=_sampling(),
                stop_token=tokenizer.eos_id, pad_token=tokenizer.eos_id,
                decode_impl=FLAGS.decode_impl, cache_dtype=jnp.dtype(FLAGS.cache_dtype))
  start = time.perf_counter()
  out = generate(model, np.asarray([ids]), [len(ids)], **kwargs)
  first = time.perf_counter() - start
  start = time.perf_counter()
  out = generate(model, np.asarray([ids]), [len(ids)], **kwargs)
  again = time.perf_counter() - start
  new = [int(t) for t in out.tokens[0, :out.lengths[0]] if int(t) != tokenizer.eos_id]
  print(f"model: step {meta['step']} of {FLAGS.output_dir} ({config.attention.variant})")
  print(FLAGS.prompt + tokenizer.decode(new))
  print(f"({out.lengths[0]} tokens; first call with compile {first:.1f}s, then "
        f"{1e3 * again / out.lengths[0]:.2f} ms/token, {FLAGS.decode_impl} decode)")


def run_bench_train() -> None:
  from experiments import trainer
  config, tc = model_config_from_flags(), train_config_from_flags()
  out = trainer.bench_train(config, tc, mesh=FLAGS.mesh, warmup=FLAGS.bench_warmup,
                            steps=FLAGS.bench_steps, rules=FLAGS.rules)
  print(f"{config.attention.variant}: median step {1e3 * out['median_step_s']:.1f} ms, "
        f"{out['tokens_per_s']:,.0f} tokens/s ({tc.batch_size} x {tc.seq_len}, {out['steps_timed']} "
        f"timed steps after {FLAGS.bench_warmup} warm-up)")


def run_bench_decode() -> None:
  import jax.numpy as jnp
  from experiments import bench_decode
  config = model_config_from_flags()
  try:
    batches, contexts = [int(b) for b in FLAGS.bench_batches], [int(c) for c in FLAGS.bench_contexts]
  except ValueError:
    raise ValueError("--bench_batches and --bench_contexts take integers, e.g. --bench_contexts=256,1024") from None
  for impl in FLAGS.bench_impls:
    if impl not in ("naive", "absorbed", "pallas", "auto"):
      raise ValueError(f"unknown decode path {impl!r} in --bench_impls; choose naive, absorbed, pallas, auto")
  cells = bench_decode.bench(config, impls=FLAGS.bench_impls, batches=batches, contexts=contexts,
                             steps=FLAGS.bench_steps, warmup=FLAGS.bench_warmup,
                             cache_dtype=jnp.dtype(FLAGS.cache_dtype), mesh_spec=FLAGS.mesh, seed=FLAGS.seed)
  print(bench_decode.table(cells, config))


def run_convert() -> None:
  from mla_jax import convert, count_params
  if not FLAGS.torch_checkpoint:
    raise ValueError("--mode=convert needs --torch_checkpoint=PATH")
  out = convert.convert(FLAGS.torch_checkpoint, FLAGS.variant, FLAGS.output_dir,
                        num_heads=FLAGS.convert_num_heads, tokenizer=FLAGS.tokenizer)
  c = out["config"]
  gated = "gated " if getattr(c.attention, "gated", False) else ""
  print(f"converted {out['tensors']} tensors: {gated}{c.attention.variant}, {c.num_layers} layers, "
        f"d {c.d_model}, {c.attention.num_heads} query heads, {count_params(c)['total']:,} parameters")
  print(f"wrote {FLAGS.output_dir}/checkpoints/0; evaluate, decode or continue training with "
        f"--output_dir={FLAGS.output_dir}" + ("" if FLAGS.tokenizer else " (pass --tokenizer=... to convert "
                                               "to give it the tokenizer its text needs)"))


def run_kv_report(tps, compiled: bool) -> None:
  import jax.numpy as jnp
  from mla_jax import cache_report
  configs = family_configs()
  cache_report.check_devices(tps)
  first = next(iter(configs.values()))
  report = cache_report.rows(configs, tps=tps, batch=FLAGS.batch, context=FLAGS.context,
                             cache_dtype=jnp.dtype(FLAGS.cache_dtype), compiled=compiled,
                             decode_impl=FLAGS.decode_impl)
  title = (f"{FLAGS.family}: d_model {first.d_model}, {first.num_layers} layers, "
           f"{first.attention.num_heads} heads; {FLAGS.cache_dtype} cache")
  if compiled:
    cache_report.write_traffic(report, FLAGS.output_dir, name=f"decode_traffic_{FLAGS.family}",
                               batch=FLAGS.batch, context=FLAGS.context, decode_impl=FLAGS.decode_impl,
                               title=title + f", {FLAGS.decode_impl} decode")
  else:
    cache_report.write(report, FLAGS.output_dir, name=f"kv_report_{FLAGS.family}", batch=FLAGS.batch,
                       context=FLAGS.context, layers=first.num_layers, title=title)


def start_distributed():
  """Join a multi-process run when the flags or the environment say so."""
  from mla_jax import distributed
  topo = distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                                local_device_count=FLAGS.local_device_count,
                                timeout_s=FLAGS.distributed_timeout)
  if topo.process_count > 1 and not FLAGS.mesh:
    FLAGS.mesh = f"data:{topo.global_devices}"
  return topo


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
  from mla_jax.host_memory import reuse_freed_memory
  reuse_freed_memory()  # before JAX allocates anything: CPU steps stop page-faulting
  try:
    if FLAGS.mode == "params":
      from mla_jax import presets
      presets.main()
    elif FLAGS.mode in ("kv_report", "decode_traffic"):
      tps = _parse_tps()
      # The report lays caches out on simulated CPU devices; JAX reads this when it starts.
      if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={max(tps)}").strip()
      run_kv_report(tps, compiled=FLAGS.mode == "decode_traffic")
    elif FLAGS.mode == "train":
      start_distributed()
      run_train()
    elif FLAGS.mode == "eval":
      start_distributed()
      run_eval()
    elif FLAGS.mode == "generate":
      start_distributed()
      run_generate()
    elif FLAGS.mode == "bench_train":
      start_distributed()
      run_bench_train()
    elif FLAGS.mode == "bench_decode":
      start_distributed()
      run_bench_decode()
    elif FLAGS.mode == "convert":
      run_convert()
  except ValueError as e:   # bad input: one line, non-zero exit, nothing lost
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv):
  """absl's parser, but a bad flag is one line on stderr and exit status 2."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}; see --helpshort for the flags", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
