"""The runner's flags, derived from the config dataclasses, and the configs built back from them.

Every field of ModelConfig, of each registered variant's attention config (the
fields its name does not pin), RunOptions, TrainConfig, DataSpec, LoopSpec and
Sampling is a flag, with the field's help text and default; a field's
metadata may give it another flag name (`option(flag=...)`, where the field
name alone would mean different things in different variants) and an older
spelling that still works (`legacy=`). A field added to a config is a flag.

What the runner has always done beyond that is in one table, `RUNNER`: its
defaults where they differ from the library's, and the flags whose unset value
derives from others (--mfa_head_dim, --mha_rope=auto).

`define(flag_values)` defines the flags into any absl FlagValues: the runner
uses the global one, the sweep a fresh one per run (`parse(argv)`), so a sweep
builds exactly the configs the runner would, in-process.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable

from absl import flags

from experiments.specs import DataSpec, LoopSpec
from mla_jax import presets, registry
from mla_jax.attention.base import cache_layout
from mla_jax.config import ModelConfig, RunOptions
from mla_jax.generate import Sampling
from mla_jax.train import TrainConfig


@dataclasses.dataclass(frozen=True)
class Rule:
  """How the runner departs from a field's own flag."""
  default: Any = None                                   # the runner's default, where it differs
  derive: Callable[[flags.FlagValues], Any] | None = None   # the value when the flag is not given
  choices: tuple | None = None                          # a flag whose values map onto the field's
  convert: Callable[[Any, flags.FlagValues], Any] | None = None


RUNNER: dict[str, Rule] = {
    "temperature": Rule(default=0.8),
    "top_k": Rule(default=40),
    "top_p": Rule(default=0.95),
    # MFA's head width and query latent followed the shared flags before they had their own
    "mfa_head_dim": Rule(derive=lambda fv: 2 * fv.head_dim),
    "mfa_q_rank": Rule(derive=lambda fv: fv.q_lora_rank or fv.d_model // 2),
    # RoPE on mha/mqa/gqa: auto = on in the Llama flavour, off in the GPT-2 flavour (absolute
    # positions); on in GPT-2 gives both, a control for MLA+RoPE
    "mha_rope": Rule(default="auto", choices=("auto", "on", "off"),
                     convert=lambda v, fv: {"auto": fv.flavour == "llama", "on": True, "off": False}[v]),
}


@dataclasses.dataclass(frozen=True)
class FlagSpec:
  name: str
  kind: str                   # int | float | bool | str | enum
  default: Any
  help: str
  choices: tuple | None = None
  legacy: str | None = None


def _kind(hint) -> str:
  args = [a for a in typing.get_args(hint) if a is not type(None)]
  base = args[0] if args else hint
  return {int: "int", float: "float", bool: "bool", str: "str"}[base]


def field_flags(cls: type, skip: tuple[str, ...] = ()) -> list[tuple[dataclasses.Field, FlagSpec]]:
  hints = typing.get_type_hints(cls)
  out = []
  for f in dataclasses.fields(cls):
    if f.name in skip or not f.metadata.get("cli", True):
      continue
    meta = f.metadata
    name = meta.get("flag") or f.name
    rule = RUNNER.get(name, Rule())
    choices = rule.choices or meta.get("choices")
    default = rule.default if rule.default is not None else f.default
    kind = "enum" if choices else _kind(hints[f.name])
    out.append((f, FlagSpec(name, kind, default, meta.get("help", ""), choices, meta.get("legacy"))))
  return out


def attention_fields() -> dict[type, list[tuple[dataclasses.Field, FlagSpec]]]:
  """Per attention config class, the fields some registered variant leaves free."""
  free: dict[type, set[str]] = {}
  for name in registry.variants():
    free.setdefault(registry.get(name).config, set()).update(f.name for f in registry.free_fields(name))
  return {cls: [(f, spec) for f, spec in field_flags(cls) if f.name in names] for cls, names in free.items()}


SECTIONS = ((ModelConfig, ("attention",)), (RunOptions, ()), (TrainConfig, ()), (DataSpec, ()), (LoopSpec, ()),
            (Sampling, ()))


def all_specs() -> list[FlagSpec]:
  specs = [spec for cls, skip in SECTIONS for _, spec in field_flags(cls, skip)]
  specs += [spec for fields in attention_fields().values() for _, spec in fields]
  return specs


MODES = ("train", "eval", "generate", "serve", "bench_train", "bench_decode", "kv_report", "decode_traffic",
         "convert", "export", "params", "cache_quality", "plan", "convert_latent", "convert_report")


def define(fv: flags.FlagValues) -> None:
  """Every flag of the runner into `fv`: the config flags (and their legacy
  spellings), then each mode's own."""
  define_config_flags(fv)
  define_mode_flags(fv)


def define_config_flags(fv: flags.FlagValues) -> None:
  defined: dict[str, FlagSpec] = {}
  for spec in all_specs():
    if spec.name in defined:        # one flag for one meaning across variants (head_dim, gated, ...)
      seen = defined[spec.name]
      if (seen.kind, seen.default) != (spec.kind, spec.default):
        raise ValueError(f"flag --{spec.name} means two things: give one of the fields its own flag name")
      continue
    defined[spec.name] = spec
    _define(fv, spec)
  for spec in list(defined.values()):
    if spec.legacy and spec.legacy not in defined:
      old = FlagSpec(spec.legacy, spec.kind, spec.default, f"Old spelling of --{spec.name} (used when "
                     f"--{spec.name} is not given).", spec.choices)
      defined[old.name] = old
      _define(fv, old)
  variants = registry.variants()
  flags.DEFINE_enum("variant", "mla" if "mla" in variants else variants[0], variants,
                    "Attention variant: " + "; ".join(f"{n} ({registry.get(n).summary or n})" for n in variants)
                    + ".", flag_values=fv)
  flags.DEFINE_string("preset", None, "A named model config (--mode=params lists them); replaces the model "
                      "flags (--vocab_size then sizes only a trained tokenizer).", flag_values=fv)


def _define(fv, spec: FlagSpec) -> None:
  kw = dict(flag_values=fv)
  if spec.kind == "enum":
    flags.DEFINE_enum(spec.name, spec.default, list(spec.choices), spec.help, **kw)
  elif spec.kind == "bool":
    flags.DEFINE_bool(spec.name, spec.default, spec.help, **kw)
  elif spec.kind == "int":
    flags.DEFINE_integer(spec.name, spec.default, spec.help, **kw)
  elif spec.kind == "float":
    flags.DEFINE_float(spec.name, spec.default, spec.help, **kw)
  else:
    flags.DEFINE_string(spec.name, spec.default, spec.help, **kw)


# ----------------------------------------------------------------------------- configs from flags


def _value(fv: flags.FlagValues, spec: FlagSpec) -> Any:
  rule = RUNNER.get(spec.name, Rule())
  if fv[spec.name].present:
    value = fv[spec.name].value
  elif spec.legacy and fv[spec.legacy].present:
    value = fv[spec.legacy].value
  elif rule.derive is not None:
    value = rule.derive(fv)
  else:
    value = fv[spec.name].value
  return rule.convert(value, fv) if rule.convert else value


def _fields(fv, cls, skip=()) -> dict[str, Any]:
  return {f.name: _value(fv, spec) for f, spec in field_flags(cls, skip)}


def attention_kwargs(fv: flags.FlagValues, variant: str) -> dict[str, Any]:
  v = registry.get(variant)
  free = {f.name for f in registry.free_fields(variant)}
  return {f.name: _value(fv, spec) for f, spec in field_flags(v.config) if f.name in free}


def model_config(fv: flags.FlagValues, variant: str | None = None) -> ModelConfig:
  """The model of the flags (or of --preset, when no other variant is asked for)."""
  if fv.preset and variant is None:
    return presets.get(fv.preset)
  attention = registry.attention_config(variant or fv.variant, **attention_kwargs(fv, variant or fv.variant))
  return ModelConfig(attention=attention, **_fields(fv, ModelConfig, ("attention",)))


def _given(fv: flags.FlagValues, spec: FlagSpec) -> bool:
  return fv[spec.name].present or bool(spec.legacy and fv[spec.legacy].present)


def run_model_config(fv: flags.FlagValues, saved: ModelConfig) -> ModelConfig:
  """A run's own model (`saved`: imported, converted or trained) with the model
  flags the command line gives applied, so training continues a run without
  restating its model; a flag that contradicts it is then named by the resume
  check. --preset or another --variant describe a model of their own."""
  if fv.preset or (fv["variant"].present and fv.variant != saved.attention.variant):
    return model_config(fv)
  variant = saved.attention.variant
  free = {f.name for f in registry.free_fields(variant)}
  attention = {f.name: _value(fv, spec) for f, spec in field_flags(registry.get(variant).config)
               if f.name in free and _given(fv, spec)}
  top = {f.name: _value(fv, spec) for f, spec in field_flags(ModelConfig, ("attention",)) if _given(fv, spec)}
  return dataclasses.replace(saved, attention=dataclasses.replace(saved.attention, **attention), **top)


@dataclasses.dataclass(frozen=True)
class Configs:
  model: ModelConfig
  options: RunOptions
  train: TrainConfig
  data: DataSpec
  loop: LoopSpec
  sampling: Sampling


def run_options(fv) -> RunOptions:
  return RunOptions(**_fields(fv, RunOptions))


def build(fv: flags.FlagValues) -> Configs:
  """Every config the flags describe (one-line ValueErrors for bad values)."""
  model, run = model_config(fv), run_options(fv)
  cache_layout(model.attention, run.cache_format)       # a cache format the variant's rows cannot hold
  return Configs(model=model, options=run, train=TrainConfig(**_fields(fv, TrainConfig)),
                 data=DataSpec(**_fields(fv, DataSpec)), loop=LoopSpec(**_fields(fv, LoopSpec)),
                 sampling=Sampling(**_fields(fv, Sampling)))


def parse(argv: list[str]) -> flags.FlagValues:
  """A fresh FlagValues with every runner flag, parsed from argv (argv[0] is the
  program name; --flagfile works): the runner's command line, in-process."""
  fv = flags.FlagValues()
  define(fv)
  fv(argv)
  return fv


def define_mode_flags(fv: flags.FlagValues) -> None:
  """The flags that belong to a mode, not to a config."""
  def d(kind, *args, **kw):
    getattr(flags, f"DEFINE_{kind}")(*args, flag_values=fv, **kw)

  d("enum", "mode", "train", MODES, "What to run.")
  # multi-process (see launch/README.md)
  d("string", "coordinator_address", None, "host:port of process 0, for multi-process runs.")
  d("integer", "num_processes", None, "Processes in the run (SLURM is detected without flags).")
  d("integer", "process_id", None, "This process's index.")
  d("integer", "local_device_count", None, "CPU devices this process exposes (CPU runs only).")
  d("integer", "distributed_timeout", 120, "Seconds to wait for the other processes.")
  # benchmarks
  d("integer", "bench_warmup", 3, "bench_train, bench_decode: untimed steps.")
  d("integer", "bench_steps", 10, "bench_train, bench_decode: timed steps.")
  d("list", "bench_impls", ["naive", "absorbed", "pallas"], "bench_decode: decode paths to time.")
  d("list", "bench_batches", ["1", "8"], "bench_decode: batch sizes.")
  d("list", "bench_contexts", ["256", "1024"], "bench_decode: context lengths (cache slots).")
  d("list", "bench_cache_dtypes", [], "bench_decode: cache formats to time side by side (default: --cache_dtype).")
  # serve (the decode engine, mla_jax/engine.py)
  d("string", "requests", "-", "serve: JSON-lines requests, a file or - for standard input.")
  d("string", "serve_output", "-", "serve: where the JSON-lines results go, a file or - for standard output.")
  d("integer", "max_seqs", 8, "serve: sequences decoded together (continuous batching).")
  d("integer", "page_size", 0, "serve: tokens per cache page (0: 64 on a GPU, where the latent kernel reads a "
                              "page in tiles of up to 64 tokens; 16 elsewhere).")
  d("integer", "num_pages", 0, "serve: pages in each layer's pool (0: enough for --max_seqs sequences of "
    "--serve_max_len tokens).")
  d("integer", "serve_max_len", 0, "serve: the longest sequence, prompt included (0: the model's max_seq_len).")
  d("integer", "prefill_chunk", 64, "serve: prompt tokens per sequence and step.")
  d("string", "speculative", "", "serve: speculative decoding, e.g. ngram:4 (prompt-lookup drafts of 4 tokens, "
    "verified in one step).")
  # cache_quality (experiments/cache_quality.py)
  d("integer", "quality_tokens", 256, "cache_quality: greedy tokens per prompt compared with the float32 cache's "
    "(fewer where the model's context is shorter).")
  d("integer", "quality_prompts", 8, "cache_quality: prompts (the first 16 tokens of validation windows).")
  # convert
  d("string", "torch_checkpoint", None, "convert: the authors' checkpoint (safetensors, a weights-only torch "
    "pickle, or a folder holding one and its config.json); --nolatent_scales imports their *_no_scale models.")
  d("string", "hf_checkpoint", None, "convert: a Hugging Face checkpoint folder (Llama, Mistral, Qwen2, Qwen3, "
    "dense DeepSeek-V2/V3; safetensors or .bin, one file or shards) to import as --output_dir, with its "
    "tokenizer; --param_dtype, when given, is the stored dtype (default: the checkpoint's).")
  # export
  d("string", "export_dir", None, "export: the folder to write --output_dir's newest checkpoint to, as a Hugging "
    "Face checkpoint (MHA/MQA/GQA: Llama, Qwen2 or Qwen3; MLA: DeepSeek-V3) or, for variants no Hugging Face "
    "format holds, the MLRA authors' layout.")
  d("enum", "export_dtype", "auto", ["auto", "float32", "bfloat16", "float16"], "export: tensor dtype (auto: the "
    "parameters').")
  d("integer", "max_shard_mb", 5000, "export: largest safetensors shard, MB; larger checkpoints are sharded with "
    "an index.")
  d("integer", "convert_num_heads", None, "convert: query heads, when the checkpoint has no config.json and the "
    "variant's shapes do not tell (MHA/MQA/GQA).")
  # convert_latent, convert_report (experiments/convert_latent.py)
  d("string", "convert_from", None, "convert_latent, convert_report: the MHA/MQA/GQA run directory to turn into "
    "--variant (mla, gla2, gla4, mlra2, mlra4) at --kv_lora_rank and --qk_rope_head_dim.")
  d("integer", "calibration_batches", 4, "convert_latent, convert_report: --eval_batch_size windows of the "
    "training split, per batch, that choose the RoPE frequencies and the latent directions.")
  d("list", "report_variants", ["mla", "gla2", "mlra4"], "convert_report: the latent variants to convert into.")
  d("list", "report_ranks", ["32", "64"], "convert_report: kv_lora_rank values.")
  d("list", "report_rope_dims", ["16"], "convert_report: qk_rope_head_dim values.")
  d("bool", "report_distill", True, "convert_report: fine-tune each conversion a second time, distilling from "
    "the source (--distill_weight).")
  # reports
  d("enum", "family", "flags", ["flags", "paper", "study"], "kv_report: which models to compare. paper/study: the "
    "presets of the MLRA paper or the small-model study; flags: every --variants entry built from the model flags.")
  d("list", "variants", registry.variants(), "kv_report with --family=flags: the variants.")
  d("list", "tps", ["1", "2", "4", "8"], "kv_report, decode_traffic: tensor-parallel degrees.")
  d("list", "cps", ["1"], "decode_traffic: context-parallel degrees (the cache split by token); each TP x CP "
    "layout that fits the simulated devices is compiled.")
  d("integer", "batch", 1, "kv_report, decode_traffic, plan: batch size.")
  d("integer", "context", 2048, "kv_report, decode_traffic, plan: context length (cache slots).")
  # plan
  d("string", "plan_run_dir", None, "plan: a run directory whose model to plan (its newest checkpoint's "
    "config), instead of --family's models.")
  d("integer", "plan_devices", 8, "plan: devices in the mesh; every --tps x --cps layout that divides them is "
    "planned, the rest of the devices on `data`.")
  d("float", "device_memory_gb", 80.0, "plan: memory per device, GB (1e9 bytes).")
  d("float", "hbm_gbps", 3350.0, "plan: memory bandwidth per device, GB/s, for the step-time bound (default: "
    "H100 SXM's datasheet 3.35 TB/s).")
  d("float", "link_gbps", 450.0, "plan: collective bandwidth per device, GB/s, for the step-time bound "
    "(default: NVLink 4, 450 GB/s each way).")
