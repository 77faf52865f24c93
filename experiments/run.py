"""The experiment runner: `python -m experiments.run --flagfile=experiments/configs/X.flags`.

Modes:
  train        build (or reuse) the dataset and tokenizer, train, evaluate, save
               checkpoints; rerunning the same command resumes.
  eval         validation loss / perplexity, cache size and a sample story from
               the latest checkpoint of --output_dir.
  generate     continue --prompt with the model in --output_dir (the decode engine,
               one request).
  serve        continuous batching over paged caches: JSON-lines requests from
               --requests (a file, or - for standard input), one JSON line per
               finished request to --serve_output, then a summary (requests/s,
               tokens/s, time to first token, pages at the high-water mark).
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
  convert      import a Hugging Face checkpoint (--hf_checkpoint: Llama, Mistral, Qwen2,
               Qwen3, dense DeepSeek-V2/V3) or one of the MLRA authors' PyTorch code
               (--torch_checkpoint, --variant) as a run directory (--output_dir)
               that eval, generate, serve and train read.
  export       write --output_dir's newest checkpoint to --export_dir as a Hugging
               Face checkpoint (or in the MLRA authors' layout, for the variants
               no Hugging Face format holds).
  params       parameter counts and cache sizes of every named preset.
  convert_latent  turn the MHA/MQA/GQA run --convert_from into --variant (MLA, GLA,
               MLRA) at --kv_lora_rank and --qk_rope_head_dim, as step 0 of --output_dir
               (fine-tune it with --mode=train, optionally --distill_from the source).
  convert_report  that over --report_variants x --report_ranks x --report_rope_dims:
               KL before, loss after --steps of fine-tuning (with and without
               distillation) beside the same variant trained from scratch; a CSV row each.
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags, logging

from experiments import cli, options
from mla_jax import compat, presets, registry

# Every flag: the config dataclasses' fields and each mode's own (experiments/options.py).
options.define(flags.FLAGS)
FLAGS = flags.FLAGS


def family_configs() -> dict:
  """name -> ModelConfig for every variant the KV report compares."""
  if FLAGS.family == "paper":
    return {v: presets.mlra_paper(v) for v in presets.PAPER_VARIANTS}
  if FLAGS.family == "study":
    return {name[len("study_"):]: make() for name, make in presets.presets().items()
            if name.startswith("study_")}
  unknown = [v for v in FLAGS.variants if v not in registry.VARIANTS]
  if unknown:
    raise ValueError(f"unknown variant {unknown[0]!r} in --variants; choose from {', '.join(registry.variants())}")
  return {v: options.model_config(FLAGS, v) for v in FLAGS.variants}


# ----------------------------------------------------------------------------- modes


def run_train() -> None:
  from experiments import trainer
  from mla_jax import count_params
  c = options.build(FLAGS)
  config, tc = c.model, c.train
  saved = trainer.saved_config(c.loop.output_dir)
  if saved is not None:                 # continue the run's own model (an imported one too)
    config = options.run_model_config(FLAGS, saved)
  counts = count_params(config)
  print(f"model: {config.flavour} / {config.attention.variant}, {counts['total']:,} parameters "
        f"({counts['non_embedding']:,} non-embedding), {config.cache_elements_per_token()} cached "
        f"elements per token per layer; {tc.steps} steps of {tc.batch_size} x {tc.seq_len} tokens")
  summary = trainer.train(config, tc, c.data, c.loop, c.options)
  if summary.get("resumed_from") is not None:
    print(f"resumed from step {summary['resumed_from']}")
  if "eval" in summary:
    print(f"validation loss {summary['eval']['loss']:.4f}, perplexity {summary['eval']['perplexity']:.2f}")
  if summary.get("loss_curve"):          # process 0 prints for the run
    print(f"sample: {summary['sample']}")
    print(f"loss curve: {summary['loss_curve']}")


def run_eval() -> None:
  from experiments import trainer
  c = options.build(FLAGS)
  out = trainer.run_eval(c.loop.output_dir, c.data, mesh=c.loop.mesh, eval_batches=c.loop.eval_batches,
                         eval_batch_size=c.loop.eval_batch_size, prompt=c.loop.prompt,
                         sample_tokens=c.loop.sample_tokens, seed=c.train.seed, rules=c.loop.rules,
                         options=c.options, sampling=c.sampling)
  sample = out.pop("sample")
  print(json.dumps(out, indent=2))
  print(f"sample: {sample}")


def run_generate() -> None:
  import numpy as np

  from experiments import trainer
  from mla_jax.generate import generate
  from mla_jax.engine import check_pool_fits, default_page_size, smallest_pool
  c = options.build(FLAGS)

  def cache_fits(meta):              # one prompt token at least: the smallest cache this can need
    config, page = registry.config_from_dict(meta["model_config"]), default_page_size()
    tokens = c.loop.sample_tokens + 1
    check_pool_fits(config, c.options, smallest_pool(tokens, page), page, max_seqs=1, max_len=tokens)

  config, model, tokenizer, meta, _ = trainer.load_run(c.loop.output_dir, c.loop.mesh, c.loop.rules,
                                                       options=c.options, tokenizer=c.data.tokenizer,
                                                       before_compile=cache_fits)
  from mla_jax.data.tokenizer import prompt_ids
  ids = prompt_ids(tokenizer, c.loop.prompt)
  if not ids:
    raise ValueError("the prompt encodes to no tokens; give a non-empty --prompt")
  kwargs = dict(max_new_tokens=c.loop.sample_tokens, rng=c.train.seed, sampling=c.sampling,
                stop_token=tokenizer.stop_ids, pad_token=tokenizer.eos_id)
  start = time.perf_counter()
  out = generate(model, np.asarray([ids]), [len(ids)], **kwargs)
  first = time.perf_counter() - start
  start = time.perf_counter()
  out = generate(model, np.asarray([ids]), [len(ids)], **kwargs)
  again = time.perf_counter() - start
  new = [int(t) for t in out.tokens[0, :out.lengths[0]] if int(t) not in tokenizer.stop_ids]
  print(f"model: step {meta['step']} of {c.loop.output_dir} ({config.attention.variant})")
  print(c.loop.prompt + tokenizer.decode(new))
  print(f"({out.lengths[0]} tokens; first call with compile {first:.1f}s, then "
        f"{1e3 * again / out.lengths[0]:.2f} ms/token, {c.options.decode_impl} decode)")


def run_serve() -> None:
  from experiments import serve, trainer
  from mla_jax.engine import check_pool_fits, default_page_size, default_pool, parse_speculative, smallest_pool
  c = options.build(FLAGS)
  for name in ("max_seqs", "prefill_chunk"):
    if FLAGS[name].value < 1:
      raise ValueError(f"--{name} must be >= 1, got {FLAGS[name].value}")
  if FLAGS.page_size < 0:
    raise ValueError(f"--page_size must be >= 1 (or 0: {default_page_size()} on this machine), got {FLAGS.page_size}")
  page_size = FLAGS.page_size or default_page_size()
  parse_speculative(FLAGS.speculative)                         # bad spellings fail before any loading
  if c.loop.sample_tokens < 1:
    raise ValueError(f"--max_new_tokens (the default per request) must be >= 1, got {c.loop.sample_tokens}")
  config = trainer.run_config(c.loop.output_dir)
  max_len = FLAGS.serve_max_len or config.max_seq_len
  if config.flavour == "gpt2" and max_len > config.max_seq_len:
    raise ValueError(f"--serve_max_len={max_len} exceeds the model's position table ({config.max_seq_len}); lower it")
  if FLAGS.num_pages and FLAGS.num_pages < smallest_pool(max_len, page_size):
    raise ValueError(f"--num_pages={FLAGS.num_pages} cannot hold one sequence of {max_len} tokens in pages of "
                     f"{page_size}; use --num_pages >= {smallest_pool(max_len, page_size)} "
                     "(or lower --serve_max_len)")
  pages = FLAGS.num_pages or default_pool(FLAGS.max_seqs, max_len, page_size)
  check_pool_fits(config, c.options, pages, page_size, max_seqs=FLAGS.max_seqs, max_len=max_len)
  _, model, tokenizer, meta, (_, _, mesh, rules) = trainer.load_run(
      c.loop.output_dir, c.loop.mesh, c.loop.rules, options=c.options, tokenizer=c.data.tokenizer)
  from mla_jax import sharding
  source = sys.stdin if FLAGS.requests == "-" else open(FLAGS.requests)
  sink = sys.stdout if FLAGS.serve_output == "-" else open(FLAGS.serve_output, "w")
  defaults = serve.Defaults(c.loop.sample_tokens, c.sampling, c.train.seed)
  with source, sharding.use_mesh(mesh, rules):
    summary = serve.serve(model, tokenizer, requests_in=source, out=sink, defaults=defaults,
                          max_seqs=FLAGS.max_seqs, page_size=page_size, num_pages=FLAGS.num_pages or None,
                          max_len=max_len, prefill_chunk=FLAGS.prefill_chunk, speculative=FLAGS.speculative,
                          progress=c.loop.progress)
  if sink is not sys.stdout:
    sink.close()
  print(f"served {summary['requests']} requests from step {meta['step']} of {c.loop.output_dir} "
        f"({config.attention.variant}): " + json.dumps(summary), file=sys.stderr)
  if summary["refused"]:
    sys.exit(2)


def run_bench_train() -> None:
  from experiments import trainer
  c = options.build(FLAGS)
  out = trainer.bench_train(c.model, c.train, mesh=c.loop.mesh, warmup=FLAGS.bench_warmup,
                            steps=FLAGS.bench_steps, rules=c.loop.rules, options=c.options)
  print(f"{c.model.attention.variant}: median step {1e3 * out['median_step_s']:.1f} ms, "
        f"{out['tokens_per_s']:,.0f} tokens/s ({c.train.batch_size} x {c.train.seq_len}, {out['steps_timed']} "
        f"timed steps after {FLAGS.bench_warmup} warm-up)")


def run_bench_decode() -> None:
  from experiments import bench_decode
  from mla_jax.attention.base import cache_layout
  c = options.build(FLAGS)
  try:
    batches, contexts = [int(b) for b in FLAGS.bench_batches], [int(x) for x in FLAGS.bench_contexts]
  except ValueError:
    raise ValueError("--bench_batches and --bench_contexts take integers, e.g. --bench_contexts=256,1024") from None
  impls = [c.options.replace(decode_impl=impl) for impl in FLAGS.bench_impls]   # validates each
  formats = [c.options.replace(cache_dtype=f).cache_dtype for f in FLAGS.bench_cache_dtypes]   # and each format
  for fmt in formats:
    cache_layout(c.model.attention, fmt)
  cells = bench_decode.bench(c.model, impls=[o.decode_impl for o in impls], batches=batches, contexts=contexts,
                             steps=FLAGS.bench_steps, warmup=FLAGS.bench_warmup, options=c.options,
                             mesh_spec=c.loop.mesh, seed=c.train.seed, formats=formats)
  print(bench_decode.table(cells, c.model))


def run_convert() -> None:
  from mla_jax import convert, count_params, hf
  if FLAGS.hf_checkpoint and FLAGS.torch_checkpoint:
    raise ValueError("--mode=convert takes one of --hf_checkpoint and --torch_checkpoint, not both")
  if FLAGS.hf_checkpoint:
    dtype = FLAGS.param_dtype if FLAGS["param_dtype"].present else "auto"
    out = hf.import_checkpoint(FLAGS.hf_checkpoint, FLAGS.output_dir, param_dtype=dtype)
    c = out["config"]
    print(f"imported {out['tensors']} tensors: {c.attention.variant}, {c.num_layers} layers, d {c.d_model}, "
          f"{c.attention.num_heads} query heads, {count_params(c)['total']:,} parameters ({c.param_dtype})")
    print(f"tokenizer: {out['tokenizer'] or 'none in the checkpoint folder (pass --tokenizer=... to generate)'}; "
          f"stop tokens {out['eos_ids']}, begin token {out['bos_id'] if out['add_bos'] else 'none'}")
    print(f"wrote {FLAGS.output_dir}/checkpoints/0; evaluate, generate, serve or fine-tune with "
          f"--output_dir={FLAGS.output_dir}")
    return
  if not FLAGS.torch_checkpoint:
    raise ValueError("--mode=convert needs --torch_checkpoint=PATH (the MLRA authors' code) or "
                     "--hf_checkpoint=DIR (a Hugging Face checkpoint)")
  out = convert.convert(FLAGS.torch_checkpoint, FLAGS.variant, FLAGS.output_dir,
                        num_heads=FLAGS.convert_num_heads, tokenizer=FLAGS.tokenizer, scales=FLAGS.latent_scales)
  c = out["config"]
  gated = "gated " if getattr(c.attention, "gated", False) else ""
  print(f"converted {out['tensors']} tensors: {gated}{c.attention.variant}, {c.num_layers} layers, "
        f"d {c.d_model}, {c.attention.num_heads} query heads, {count_params(c)['total']:,} parameters")
  print(f"wrote {FLAGS.output_dir}/checkpoints/0; evaluate, decode or continue training with "
        f"--output_dir={FLAGS.output_dir}" + ("" if FLAGS.tokenizer else " (pass --tokenizer=... to convert "
                                               "to give it the tokenizer its text needs)"))


def _latent_target() -> tuple[str, int, int]:
  if not FLAGS.convert_from:
    raise ValueError(f"--mode={FLAGS.mode} needs --convert_from=RUN_DIR (an MHA/MQA/GQA run)")
  from mla_jax.convert_latent import TARGETS
  if FLAGS.mode == "convert_latent" and FLAGS.variant not in TARGETS:
    raise ValueError(f"--variant={FLAGS.variant}: convert_latent converts into {', '.join(TARGETS)}")
  widths = options.attention_kwargs(FLAGS, "mla")            # with the legacy --rope_head_dim spelling
  return FLAGS.variant, widths["kv_lora_rank"], widths["qk_rope_head_dim"]


def run_convert_latent() -> None:
  from experiments import convert_latent
  variant, rank, rope_dim = _latent_target()
  c = options.build(FLAGS)
  if FLAGS.calibration_batches < 1:
    raise ValueError(f"--calibration_batches must be >= 1, got {FLAGS.calibration_batches}")
  out = convert_latent.convert_run(FLAGS.convert_from, c.loop.output_dir, c.data, variant=variant,
                                   kv_lora_rank=rank, rope_head_dim=rope_dim,
                                   calibration_batches=FLAGS.calibration_batches,
                                   batch_size=c.loop.eval_batch_size, eval_batches=c.loop.eval_batches)
  print(convert_latent.summary(out, FLAGS.convert_from, c.loop.output_dir))


def run_convert_report() -> None:
  from experiments import convert_latent
  _latent_target()
  c = options.build(FLAGS)
  try:
    ranks, rope_dims = [int(r) for r in FLAGS.report_ranks], [int(p) for p in FLAGS.report_rope_dims]
  except ValueError:
    raise ValueError("--report_ranks and --report_rope_dims take integers, e.g. --report_ranks=32,64") from None
  path = convert_latent.report(FLAGS.convert_from, c.loop.output_dir, c, variants=FLAGS.report_variants,
                               ranks=ranks, rope_dims=rope_dims, distill=FLAGS.report_distill,
                               calibration_batches=FLAGS.calibration_batches)
  print(f"wrote {path}; build the page with python -m experiments.convert_page --csv={path}")


def run_export() -> None:
  from experiments import trainer
  from mla_jax import convert, hf
  if not FLAGS.export_dir:
    raise ValueError("--mode=export needs --export_dir=DIR (a new folder)")
  config = trainer.run_config(FLAGS.output_dir)
  dtype = None if FLAGS.export_dtype == "auto" else FLAGS.export_dtype
  fmt = convert.export_format(config)                     # refused here, before any weight is read
  if os.path.exists(FLAGS.export_dir) and not (os.path.isdir(FLAGS.export_dir) and not os.listdir(FLAGS.export_dir)):
    raise ValueError(f"{FLAGS.export_dir} exists and is not an empty folder; give a new --export_dir")
  _, model, _, meta, _ = trainer.load_run(FLAGS.output_dir, need_tokenizer=False)
  tokenizer = meta.get("tokenizer") or ""
  tokenizer_dir = os.path.dirname(tokenizer) if tokenizer.endswith("tokenizer.json") else None
  if fmt == "hf":
    out = hf.export(model, FLAGS.export_dir, dtype=dtype, max_shard_bytes=FLAGS.max_shard_mb << 20,
                    special=meta, tokenizer_dir=tokenizer_dir)
    what = out["architecture"]
  else:
    out = convert.export_authors(model, FLAGS.export_dir, dtype=dtype)
    what = "the MLRA authors' layout"
  print(f"wrote {out['tensors']} tensors ({out['bytes'] / 1e6:.1f} MB, {out['shards']} file(s)) to "
        f"{FLAGS.export_dir} as {what}" + ("" if tokenizer_dir or fmt != "hf" else
                                            "; the run's tokenizer is not a tokenizer.json, so none was copied"))


def run_cache_quality() -> None:
  from experiments import cache_quality
  c = options.build(FLAGS)
  for name in ("quality_tokens", "quality_prompts"):
    if FLAGS[name].value < 1:
      raise ValueError(f"--{name} must be >= 1, got {FLAGS[name].value}")
  cache_quality.run(c.loop.output_dir, c.data, mesh=c.loop.mesh, rules=c.loop.rules, options=c.options,
                    eval_batches=c.loop.eval_batches, eval_batch_size=c.loop.eval_batch_size,
                    new_tokens=FLAGS.quality_tokens, num_prompts=FLAGS.quality_prompts)


def run_kv_report(tps, cps, compiled: bool) -> None:
  from mla_jax import cache_report
  configs = family_configs()
  cache_report.check_devices(tps)
  first = next(iter(configs.values()))
  report = cache_report.rows(configs, tps=tps, cps=cps, batch=FLAGS.batch, context=FLAGS.context,
                             options=options.run_options(FLAGS), compiled=compiled)
  title = (f"{FLAGS.family}: d_model {first.d_model}, {first.num_layers} layers, "
           f"{first.attention.num_heads} heads; {options.run_options(FLAGS).cache_format.name} cache")
  if compiled:
    cache_report.write_traffic(report, FLAGS.output_dir, name=f"decode_traffic_{FLAGS.family}",
                               batch=FLAGS.batch, context=FLAGS.context, decode_impl=FLAGS.decode_impl,
                               title=title + f", {FLAGS.decode_impl} decode")
  else:
    cache_report.write(report, FLAGS.output_dir, name=f"kv_report_{FLAGS.family}", batch=FLAGS.batch,
                       context=FLAGS.context, layers=first.num_layers, title=title)


def run_plan(tps, cps) -> None:
  from mla_jax import plan
  if FLAGS.device_memory_gb <= 0 or FLAGS.hbm_gbps <= 0 or FLAGS.link_gbps <= 0:
    raise ValueError("--device_memory_gb, --hbm_gbps and --link_gbps must be > 0")
  if FLAGS.batch < 1 or FLAGS.context < 1:
    raise ValueError(f"--batch and --context must be >= 1, got {FLAGS.batch} and {FLAGS.context}")
  layouts = [(tp, cp) for tp in tps for cp in cps if FLAGS.plan_devices % (tp * cp) == 0]
  if not layouts:
    raise ValueError(f"no --tps x --cps layout divides --plan_devices={FLAGS.plan_devices}: use degrees whose "
                     f"products divide it, e.g. --tps=1,2,4,8 --cps=1,2")
  from tqdm import tqdm
  run_options = options.run_options(FLAGS)
  if FLAGS.plan_run_dir:
    from experiments import trainer
    if not os.path.isdir(FLAGS.plan_run_dir):
      raise ValueError(f"--plan_run_dir {FLAGS.plan_run_dir!r} is not a directory: give a run directory "
                       "(the --output_dir a training run wrote)")
    config = trainer.run_config(FLAGS.plan_run_dir)
    models = {config.attention.variant: config}
  else:
    models = family_configs()
  todo = [(name, config, f"data:{FLAGS.plan_devices // (tp * cp)},context:{cp},tensor:{tp}")
          for name, config in models.items() for tp, cp in layouts]
  plans = [plan.plan(name, config, mesh, device_bytes=FLAGS.device_memory_gb * 1e9, batch=FLAGS.batch,
                     context=FLAGS.context, options=run_options, hbm_bytes_per_s=FLAGS.hbm_gbps * 1e9,
                     link_bytes_per_s=FLAGS.link_gbps * 1e9)
           for name, config, mesh in tqdm(todo, desc="plan (one block compiled per layout)", unit="layout",
                                          file=sys.stderr, dynamic_ncols=True)]
  print(plan.table(plans, device_gb=FLAGS.device_memory_gb, batch=FLAGS.batch, context=FLAGS.context,
                   fmt=run_options.cache_format.name, hbm_gbps=FLAGS.hbm_gbps, link_gbps=FLAGS.link_gbps))
  if FLAGS.output_dir:
    name = "run" if FLAGS.plan_run_dir else FLAGS.family
    path = plan.write_csv(plans, os.path.join(FLAGS.output_dir, f"plan_{name}.csv"))
    print(f"\nwrote {path}")


def start_distributed():
  """Join a multi-process run when the flags or the environment say so."""
  from mla_jax import distributed
  topo = distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                                local_device_count=FLAGS.local_device_count,
                                timeout_s=FLAGS.distributed_timeout)
  if topo.process_count > 1 and not FLAGS.mesh:
    FLAGS.mesh = f"data:{topo.global_devices}"
  return topo


def _parse_degrees(name: str) -> list[int]:
  given = FLAGS[name].value
  try:
    degrees = [int(t) for t in given]
  except ValueError:
    raise ValueError(f"--{name} takes integers, e.g. --{name}=1,2,4,8; got {','.join(given)}") from None
  if not degrees or min(degrees) < 1:
    raise ValueError(f"--{name} must list degrees >= 1, got {','.join(given)}")
  return degrees


def main(argv):
  if len(argv) > 1:         # one line, not absl's usage dump (a junk line in a flagfile lands here too)
    print(f"error: unexpected arguments {' '.join(argv[1:])!r}; flags look like --name=value", file=sys.stderr)
    sys.exit(2)
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # keep JAX's backend probing out of the output
    # orbax logs a failed background save's tracebacks from its threads; the trainer
    # reports the failure itself, as one line (experiments/trainer.py, _save_failed)
    logging.get_absl_handler().addFilter(
        lambda record: not (record.levelno >= logging.converter.STANDARD_ERROR and "/orbax/" in record.pathname))
  from mla_jax.host_memory import reuse_freed_memory
  reuse_freed_memory()  # before JAX allocates anything: CPU steps stop page-faulting
  try:
    if FLAGS.mode == "params":
      print(presets.listing())
    elif FLAGS.mode == "plan":
      tps, cps = _parse_degrees("tps"), _parse_degrees("cps")
      if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        # one block's decode step is compiled per layout on TP x CP simulated devices
        os.environ["XLA_FLAGS"] = compat.simulated_cpu_devices(FLAGS.plan_devices, os.environ.get("XLA_FLAGS", ""))
      run_plan(tps, cps)
    elif FLAGS.mode in ("kv_report", "decode_traffic"):
      tps, cps = _parse_degrees("tps"), _parse_degrees("cps")
      # The report lays caches out on simulated CPU devices; JAX reads this when it starts.
      if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        # the widest single degree, or 8 for TP x CP grids (layouts beyond that get a note: see --mode=plan)
        devices = max(*tps, *cps, 8 if max(cps) > 1 else 1)
        os.environ["XLA_FLAGS"] = compat.simulated_cpu_devices(devices, os.environ.get("XLA_FLAGS", ""))
      run_kv_report(tps, cps, compiled=FLAGS.mode == "decode_traffic")
    elif FLAGS.mode == "convert":
      run_convert()
    elif FLAGS.mode == "export":
      run_export()
    elif FLAGS.mode == "convert_latent":
      run_convert_latent()
    elif FLAGS.mode == "convert_report":
      run_convert_report()
    else:                   # the modes that may span several processes
      start_distributed()
      {"train": run_train, "eval": run_eval, "generate": run_generate, "bench_train": run_bench_train,
       "bench_decode": run_bench_decode, "serve": run_serve, "cache_quality": run_cache_quality}[FLAGS.mode]()
  except ValueError as e:   # bad input: one line, non-zero exit, nothing lost
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


parse_flags = cli.parse_flags   # tests and scripts call run.main(run.parse_flags(argv))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
