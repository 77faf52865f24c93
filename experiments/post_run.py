"""What the sweep measures after a training run, and its side-by-side decode timing.

`post_run(run_dir)`: sampled continuations of fixed prompts with judge-free
metrics (distinct-n, repeated 4-grams: no LLM judge can be reached here), the
sampling loop's tokens/s, and one decode step's time over a full cache.
`bench_side_by_side(configs)`: every configuration's decode step timed in one
process, in interleaved rounds, so that all see the same machine state.
"""
from __future__ import annotations

import statistics
import time

import numpy as np
from flax import nnx

from experiments import trainer
from experiments.bench_decode import DecodeStep, bench
from mla_jax.config import ModelConfig, RunOptions
from mla_jax.generate import Sampling, generate
from mla_jax.model import Transformer, count_params

PROMPTS = ["Once upon a time", "One day, a little girl named", "The dog was", "Tom and his mom went to",
           "It was a rainy day.", "Lily found a", "The little bird wanted to", "At the park,",
           "Ben was sad because", "In the forest, there was"]
# The decode path the sweep pages time: the XLA absorbed step over an fp32 cache.
DECODE = RunOptions(decode_impl="absorbed", cache_dtype="float32")


def sample_metrics(texts: list[str]) -> dict:
  """distinct-n (unique n-grams / n-grams, over all samples) and the share of
  repeated 4-grams within a sample: judge-free signs of fluent, varied text."""
  words = [t.lower().split() for t in texts]
  out = {}
  for n in (1, 2, 3):
    grams = [tuple(w[i:i + n]) for w in words for i in range(len(w) - n + 1)]
    out[f"distinct_{n}"] = len(set(grams)) / max(1, len(grams))
  reps = []
  for w in words:
    grams = [tuple(w[i:i + 4]) for i in range(len(w) - 3)]
    if grams:
      reps.append(1 - len(set(grams)) / len(grams))
  out["repetition_4gram"] = statistics.mean(reps) if reps else 0.0
  return out


def decode_context(config: ModelConfig, context: int) -> int:
  """The GPT-2 flavour cannot decode past its position table."""
  return min(context, config.max_seq_len) if config.flavour == "gpt2" else context


def post_run(run_dir: str, *, num_prompts: int = 8, bench_batch: int = 16, bench_context: int = 1024,
             new_tokens: int = 96) -> dict:
  """Samples, their metrics and decode speed of the finished run in `run_dir`."""
  config, model, tok, _, _ = trainer.load_run(run_dir, options=DECODE)
  ids = [tok.encode(p) for p in PROMPTS[:num_prompts]]
  batch = np.zeros((len(ids), max(len(i) for i in ids)), np.int32)
  for b, i in enumerate(ids):
    batch[b, :len(i)] = i
  lens = np.array([len(i) for i in ids])
  kw = dict(max_new_tokens=new_tokens, rng=0, sampling=Sampling(0.8, 40, 0.95), stop_token=tok.eos_id,
            pad_token=tok.eos_id)
  generate(model, batch, lens, **kw)                                   # compile
  t0 = time.perf_counter()
  out = generate(model, batch, lens, **kw)
  seconds = time.perf_counter() - t0
  gen = [[int(t) for t in row[:n] if int(t) != tok.eos_id] for row, n in zip(out.tokens, out.lengths)]
  texts = [tok.decode(g) for g in gen]
  # one decode step over a full cache: where the cache size shows in the step time
  cell = bench(config, impls=["absorbed"], batches=[bench_batch], contexts=[decode_context(config, bench_context)],
               steps=20, options=DECODE)[0]
  return {"texts": texts, "samples": [tok.decode(list(i) + g) for i, g in zip(ids, gen)],
          "decode_tokens_per_s": float(out.lengths.sum() / seconds), "decode_step_ms": cell.step_ms,
          "decode_batch": cell.batch, "decode_context": cell.context, "params": count_params(config),
          "cache_per_token": config.cache_elements_per_token(), "layers": config.num_layers,
          **sample_metrics(texts)}


def bench_side_by_side(configs: dict[str, ModelConfig], *, batch: int, context: int, rounds: int,
                       steps_per_round: int = 10) -> dict[str, dict]:
  """name -> median decode-step ms of each configuration (random weights), timed
  in interleaved rounds so that every configuration sees the same machine state.
  Names with one model (runs that differ only in training flags, such as a
  learning-rate control) are timed once and share the figure."""
  models: dict[ModelConfig, list[str]] = {}                        # configs are frozen, so hashable
  for name, config in configs.items():
    models.setdefault(config, []).append(name)
  steps = [DecodeStep(Transformer(config, rngs=nnx.Rngs(0), options=DECODE), batch, decode_context(config, context))
           for config in models]
  for step in steps:
    step()                                                          # warm up
  times: list[list[float]] = [[] for _ in steps]
  for _ in range(rounds):
    for step, t in zip(steps, times):
      t.append(statistics.median(step() for _ in range(steps_per_round)))
  out = {name: dict(step_ms=1e3 * statistics.median(t), batch=batch, context=decode_context(config, context),
                    rounds=rounds) for (config, names), t in zip(models.items(), times) for name in names}
  return {name: out[name] for name in configs}
