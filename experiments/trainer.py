"""The training, evaluation and benchmarking loops behind `experiments.run`.

A run directory holds everything a run writes:
    checkpoints/       orbax steps: train state, data-iterator state, configs
    metrics.jsonl      one line per train step (loss, grad norm, lr, tokens/s) and per eval
    tb/                TensorBoard event files
    loss_curve.png     written when the run ends
Rerunning the same command resumes from the latest checkpoint.
"""
from __future__ import annotations

import dataclasses
import fcntl
import functools
import json
import math
import os
import statistics
import sys
import threading
import time
from typing import Any

import jax
import numpy as np

from experiments.specs import DataSpec, LoopSpec
from mla_jax import compat, registry, sharding
from mla_jax import train as T
from mla_jax.config import ModelConfig, RunOptions
from mla_jax.data import builders, pipeline
from mla_jax.data import tokenizer as tok
from mla_jax.generate import Sampling, generate


class RunError(ValueError):
  """A problem with the user's input, reported as one line."""


@dataclasses.dataclass
class Data:
  sources: dict
  tokenizer: Any
  key: str
  directory: str = ""          # where the built dataset lies

  def damaged(self, error: Exception, what: str) -> RunError:
    """A read of the built dataset failed (array_record checks every chunk's hash)."""
    return RunError(f"reading {what} failed ({T.error_summary(error)}): the cached dataset in "
                    f"{self.directory} is damaged; delete that folder and rerun this command to rebuild it")

  @functools.cached_property
  def tokenizer_sha256(self) -> str:         # read once: every checkpoint records it
    path = getattr(self.tokenizer, "path", "")
    return tok.fingerprint(path) if path else ""


def prepare_data(spec: DataSpec, barrier_timeout_s: float = 3600) -> Data:
  """Build (or reuse) the dataset and the tokenizer under `spec.data_dir`.

  In a multi-process run process 0 builds them first and the others wait, then
  reuse them (a shared --data_dir) or build their own identical copy."""
  if jax.process_count() > 1:
    if jax.process_index() == 0:
      data = _prepare_data(spec)
    compat.barrier("mla_jax_data_ready", barrier_timeout_s)
    if jax.process_index() != 0:
      data = _prepare_data(spec)
    return data
  return _prepare_data(spec)


def _prepare_data(spec: DataSpec) -> Data:
  # Several local runs sharing one --data_dir (a sweep's workers) build it once:
  # the first takes the lock and builds, the others wait and then reuse.
  os.makedirs(spec.root, exist_ok=True)
  with open(os.path.join(spec.root, ".build.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      return _prepare_data_locked(spec)
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def _builder(spec: DataSpec):
  """The TFDS builder of `spec` (cheap: nothing is read or built yet)."""
  if spec.kind == "synthetic_stories":
    return builders.synthetic_builder(spec.root, spec.num_train, spec.num_validation, spec.seed)
  if spec.kind == "tinystories":
    if not spec.tinystories_train:
      raise RunError("--data=tinystories needs --tinystories_train=PATH (TinyStoriesV2 text or the JSON shards)")
    return builders.tinystories_builder(spec.root, spec.tinystories_train, spec.tinystories_valid or None)
  raise RunError(f"unknown --data={spec.kind!r}; choose synthetic_stories or tinystories")


def data_key(spec: DataSpec) -> str:
  """The dataset identity a checkpoint records (meta["data"])."""
  builder = _builder(spec)
  return f"{builder.name}/{builder.builder_config.name}"


def _prepare_data_locked(spec: DataSpec) -> Data:
  builder = _builder(spec)
  reused = builders.is_prepared(builder)
  t0 = time.perf_counter()
  sources = builders.prepare(builder)
  key = f"{builder.name}/{builder.builder_config.name}"
  log(f"data: {'reused' if reused else 'built'} {key} ({len(sources['train']):,} train / "
      f"{len(sources['validation']):,} validation documents) at {builder.data_dir}"
      + ("" if reused else f" in {time.perf_counter() - t0:.1f}s"))
  if spec.tokenizer:
    tokenizer = tok.load(spec.tokenizer)
    log(f"tokenizer: {tokenizer.name} ({tokenizer.vocab_size} tokens)")
  else:
    train = sources["train"]
    n = min(len(train), spec.tokenizer_docs)
    texts = lambda: (builders.text_of(train[i]) for i in range(n))  # noqa: E731
    t0 = time.perf_counter()
    path = tok.sentencepiece_path(spec.root, key, spec.vocab_size)
    existed = os.path.exists(path)
    tokenizer = tok.cached_sentencepiece(texts, spec.root, key, spec.vocab_size)
    log(f"tokenizer: {'reused' if existed else 'trained'} SentencePiece, {tokenizer.vocab_size} tokens, "
        f"at {path}" + ("" if existed else f" in {time.perf_counter() - t0:.1f}s"))
  return Data(sources, tokenizer, key, builder.data_dir)


def log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


# ----------------------------------------------------------------------------- run directory


class Metrics:
  """metrics.jsonl plus TensorBoard. On resume, lines past the restored step are
  dropped, so the file reads as if the run had never stopped."""

  def __init__(self, run_dir: str, resume_step: int):
    self.path = os.path.join(run_dir, "metrics.jsonl")
    self.active = jax.process_index() == 0     # one writer in a multi-process run
    if not self.active:
      return
    if os.path.exists(self.path):
      kept = [r for r in _records(self.path) if r.get("step", 0) <= resume_step]
      with open(self.path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    self._file = open(self.path, "a")
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(run_dir, "tb"))
    except ImportError:  # pragma: no cover - tensorboardX is a dependency
      self._tb = None

  def write(self, record: dict) -> None:
    if not self.active:
      return
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in record.items():
        if k not in ("step", "kind") and isinstance(v, (int, float)) and math.isfinite(v):
          self._tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, record["step"])

  def close(self) -> None:
    if not self.active:
      return
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def _records(path: str) -> list[dict]:
  """The JSON lines of a metrics file. A torn last line (power loss, a full disk
  mid-write) is dropped with a warning; a bad line before it is an error that
  names the file and the line."""
  with open(path) as f:
    lines = [(i + 1, line) for i, line in enumerate(f) if line.strip()]
  records = []
  for k, (number, line) in enumerate(lines):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if k == len(lines) - 1:
        log(f"warning: dropped a torn last line ({number}) of {path}: {line.strip()[:60]!r}")
        break
      raise RunError(f"{path} line {number} is not JSON ({line.strip()[:60]!r}); repair or delete that line "
                     "(the checkpoints hold the run, this file only its log)") from None
  return records


def read_metrics(run_dir: str) -> list[dict]:
  path = os.path.join(run_dir, "metrics.jsonl")
  return _records(path) if os.path.exists(path) else []


def loss_curve_png(run_dir: str, title: str = "") -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  records = read_metrics(run_dir)
  train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
  evals = [(r["step"], r["loss"]) for r in records if r.get("kind") == "eval"]
  fig, ax = plt.subplots(figsize=(7, 4.2))
  if train:
    steps, losses = zip(*train)
    ax.plot(steps, losses, color="tab:blue", alpha=0.25, lw=0.8, label="train (per step)")
    ema, out = 0.0, []
    for k, x in enumerate(losses, 1):
      ema = 0.95 * ema + 0.05 * x
      out.append(ema / (1 - 0.95 ** k))        # bias-corrected, so it starts on the data
    ax.plot(steps, out, color="tab:blue", lw=1.6, label="train (EMA 0.95)")
  if evals:
    steps, losses = zip(*evals)
    ax.plot(steps, losses, "o-", color="tab:orange", label="validation")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats / token)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  path = os.path.join(run_dir, "loss_curve.png")
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


# ----------------------------------------------------------------------------- helpers


def global_batch(tokens: np.ndarray, mesh, rules=sharding.RULES) -> jax.Array:
  """This process's rows -> one global array sharded over the batch axes."""
  spec = sharding.named_sharding(mesh, ("batch", "length"), rules=rules, strict=False)
  return jax.make_array_from_process_local_data(spec, tokens)


def evaluate(eval_step, params, batches, mesh, rules=sharding.RULES) -> dict:
  total = count = 0.0
  for tokens in batches:
    s, n = eval_step(params, global_batch(tokens, mesh, rules))
    total += float(s)
    count += float(n)
  loss = total / count
  return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def sample(model, tokenizer, prompt: str, *, max_new_tokens: int, seed: int = 0,
           sampling: Sampling = Sampling(temperature=0.8, top_k=40, top_p=0.95)) -> str:
  ids = tok.prompt_ids(tokenizer, prompt)
  if not ids:
    raise RunError("the prompt encodes to no tokens; give a non-empty --prompt")
  if model.config.flavour == "gpt2":
    max_new_tokens = min(max_new_tokens, model.config.max_seq_len - len(ids))
  out = generate(model, np.asarray([ids]), [len(ids)], max_new_tokens=max_new_tokens, rng=seed,
                 sampling=sampling, stop_token=tokenizer.stop_ids, pad_token=tokenizer.eos_id)
  new = [int(t) for t in out.tokens[0, :out.lengths[0]] if int(t) not in tokenizer.stop_ids]
  return prompt + tokenizer.decode(new)


# What an imported checkpoint says of its model that training does not change:
# its stop and begin tokens and where it came from, kept by every later checkpoint.
CARRIED_META = ("eos_ids", "bos_id", "add_bos", "hf_model_type")


def _meta(config: ModelConfig, options: RunOptions, tc: T.TrainConfig, data: Data, step: int,
          carried: dict) -> dict:
  return T.run_meta(config, options, tc, tokenizer=getattr(data.tokenizer, "path", ""),
                    tokenizer_name=data.tokenizer.name, tokenizer_sha256=data.tokenizer_sha256,
                    data=data.key, step=step, **carried)


def _same_tokenizer(path: str, meta: dict) -> bool:
  """Whether the tokenizer file `path` is the one the checkpoint recorded
  (by content where the checkpoint or its file allows, else by name)."""
  recorded = meta.get("tokenizer") or ""
  if meta.get("tokenizer_sha256"):
    return tok.fingerprint(path) == meta["tokenizer_sha256"]
  if os.path.exists(recorded):
    return tok.fingerprint(path) == tok.fingerprint(recorded)
  return True          # nothing to compare against: the stand-in for a lost tokenizer


def resume_data(meta: dict, spec: DataSpec, tc: T.TrainConfig, run_dir: str) -> tuple[DataSpec, bool]:
  """(the data spec to build, whether the iterator resumes where it stopped).

  A resumed run keeps the tokenizer its checkpoint records and reads on from its
  data position. A change of dataset, tokenizer, or of what the position means
  (--seq_len, --batch_size, --seed) would silently train the weights on other token
  ids or other documents: refused (one line naming both sides) unless
  --allow_data_change, which keeps the weights and optimizer and starts a fresh data
  order. An imported step-0 run has no data of its own: any data goes."""
  if "converted_from" in meta:
    if not spec.tokenizer and os.path.exists(meta.get("tokenizer") or ""):
      spec = dataclasses.replace(spec, tokenizer=meta["tokenizer"])     # the imported model's own tokenizer
    return spec, False
  key, recorded = data_key(spec), meta.get("tokenizer") or ""
  changes = []
  if meta.get("data") and meta["data"] != key:
    changes.append(f"dataset {meta['data']} -> {key}")
  if spec.tokenizer:
    if not _same_tokenizer(spec.tokenizer, meta):
      changes.append(f"tokenizer {recorded or meta.get('tokenizer_name')} -> {spec.tokenizer}")
  else:
    wanted = tok.sentencepiece_path(spec.root, key, spec.vocab_size)
    if os.path.basename(wanted) != os.path.basename(recorded):
      changes.append(f"tokenizer {recorded or meta.get('tokenizer_name')} -> {wanted}")
  for name in ("seq_len", "batch_size", "seed"):
    before = meta["train_config"].get(name)
    if before is not None and before != getattr(tc, name):
      changes.append(f"--{name} {before} -> {getattr(tc, name)}")
  if changes and not spec.allow_change:
    raise RunError(f"{run_dir} was trained on other data than these flags give ({'; '.join(changes)}), which "
                   "would change its token ids or data order; resume with the run's own flags, or pass "
                   "--allow_data_change to continue its weights on the new data from a fresh data order")
  if changes:
    log(f"warning: --allow_data_change: {'; '.join(changes)}; the weights and optimizer carry over, the data "
        "order starts afresh")
  elif not spec.tokenizer and os.path.exists(recorded) and recorded != wanted:
    spec = dataclasses.replace(spec, tokenizer=recorded)      # the very file the checkpoint recorded
  return spec, not changes


def _damaged(ckpt: T.Checkpoints, step: int, error: Exception) -> None:
  why = ckpt.damage(step, error)
  moved = ckpt.set_aside(step)
  log(f"warning: checkpoint step {step} in {ckpt.directory} is damaged ({why}); moved to {moved}, falling back "
      "to the newest intact step")
  if ckpt.latest_step() is None:
    raise RunError(f"no intact checkpoint left in {ckpt.directory} (the damaged ones are kept as damaged-STEP); "
                   "restore them from a backup, or train afresh in a new --output_dir")


def _save_failed(ckpt: T.Checkpoints, step: int, error: Exception) -> RunError:
  """A failed save stops the run at once; the steps saved before it stay intact."""
  ckpt.save_error(block=True)
  # the failed save's other writes still run in orbax's threads; exiting under them
  # prints their tracebacks at interpreter shutdown
  for thread in threading.enumerate():
    if type(thread).__module__.startswith("orbax."):
      thread.join(timeout=30)
  ckpt.manager.reload()
  intact = ckpt.latest_step()
  kept = f"step {intact} is intact and the run resumes from it" if intact is not None else "no step was saved"
  return RunError(f"saving checkpoint step {step} in {ckpt.directory} failed ({T.error_summary(error)}); "
                  f"{kept}: free disk space (or fix the folder) and rerun this command")


def _teacher_meta(run_dir: str, config: ModelConfig, output_dir: str) -> dict:
  """A --distill_from run's meta, after the checks that need no weights (one line each)."""
  if os.path.abspath(run_dir) == os.path.abspath(output_dir):
    raise RunError("--distill_from names the run being trained; give the teacher's own run directory")
  teacher = run_config(run_dir)
  if teacher.vocab_size != config.vocab_size:
    raise RunError(f"--distill_from={run_dir} has {teacher.vocab_size} vocabulary rows and this model "
                   f"{config.vocab_size}; a teacher must share the vocabulary")
  return load_meta(run_dir)


def check_run_dir(ckpt: T.Checkpoints, config: ModelConfig) -> tuple[int | None, dict]:
  """(the step to resume from, its meta), after checking the saved model matches
  this one (how the run executes, its RunOptions, may change on resume)."""
  while True:
    step = ckpt.latest_step()
    if step is None:
      return None, {}
    try:
      meta = ckpt.read_meta(step)
      break
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: set aside, fall back
      _damaged(ckpt, step, e)
  # compared in the current format: fields a newer format added read as their defaults
  diff = T.config_mismatch(registry.config_from_dict(meta["model_config"]).to_dict(), config.to_dict())
  if diff:
    raise RunError(f"{ckpt.directory} holds checkpoints of a different model ({diff}); "
                   "pass matching model flags to resume it, or a new --output_dir")
  return step, meta


# ----------------------------------------------------------------------------- train


def train(config: ModelConfig, tc: T.TrainConfig, data_spec: DataSpec, loop: LoopSpec,
          options: RunOptions = RunOptions()) -> dict:
  """Train (resuming when the run directory has checkpoints). Returns a summary."""
  # Checks that need nothing on disk come first: a refused command leaves no run folder behind.
  rules = sharding.rules_preset(loop.rules)
  mesh = sharding.make_mesh(loop.mesh, config, rules=rules)
  processes, rank = jax.process_count(), jax.process_index()
  if tc.batch_size % processes:
    raise RunError(f"--batch_size={tc.batch_size} does not split over {processes} processes")
  data_ways = sharding.axis_sizes(mesh)["data"] * sharding.axis_sizes(mesh)["fsdp"]
  if tc.batch_size % data_ways:
    raise RunError(f"--batch_size={tc.batch_size} does not split over the mesh's "
                   f"{data_ways} data x fsdp devices")
  if config.flavour == "gpt2" and tc.seq_len > config.max_seq_len:
    raise RunError(f"--seq_len={tc.seq_len} exceeds max_seq_len={config.max_seq_len}")
  if data_spec.tokenizer:
    tok.load(data_spec.tokenizer)                    # a bad --tokenizer is refused before any data is built
  data_key(data_spec)                                # so is a missing, binary or too short stories file
  teacher_meta = _teacher_meta(loop.distill_from, config, loop.output_dir) if loop.distill_from else None
  os.makedirs(loop.output_dir, exist_ok=True)
  ckpt = T.Checkpoints(os.path.join(loop.output_dir, "checkpoints"), keep=loop.keep_checkpoints,
                       async_save=loop.async_checkpoints)
  resume, meta = check_run_dir(ckpt, config)         # before any data build or compile
  keep_position, position = False, None
  if resume is not None:
    data_spec, keep_position = resume_data(meta, data_spec, tc, loop.output_dir)
  carried = {k: meta[k] for k in CARRIED_META if k in meta}
  data = prepare_data(data_spec)
  tok.use_special_tokens(data.tokenizer, carried)      # an imported model's begin token leads each document
  if keep_position and meta.get("tokenizer_sha256") and data.tokenizer_sha256 != meta["tokenizer_sha256"]:
    raise RunError(f"the tokenizer rebuilt at {data.tokenizer.path} differs from the one {loop.output_dir} "
                   f"recorded ({meta['tokenizer']}, now missing); restore that file and pass "
                   "--tokenizer=PATH, or pass --allow_data_change to continue on the new token ids")
  if teacher_meta is not None and teacher_meta.get("tokenizer_sha256") not in ("", None, data.tokenizer_sha256):
    raise RunError(f"--distill_from={loop.distill_from} was trained with another tokenizer "
                   f"({teacher_meta.get('tokenizer')}) than this run's ({data.tokenizer.path}); a teacher must "
                   "read the same token ids")
  if data.tokenizer.vocab_size > config.vocab_size:
    raise RunError(f"the tokenizer has {data.tokenizer.vocab_size} tokens but the model only "
                   f"{config.vocab_size} embedding rows; raise the model's vocab_size")

  graphdef, state, shardings = T.create_state(config, tc, mesh, rules, options)
  iterator = pipeline.PackedBatches(data.sources["train"], data.tokenizer, seq_len=tc.seq_len,
                                    batch_size=tc.batch_size, seed=tc.seed,
                                    rows=pipeline.process_rows(tc.batch_size, rank, processes))
  while resume is not None:
    try:
      if "converted_from" in meta:
        # an imported checkpoint: its weights, a fresh optimizer and data order
        state = {**state, "params": _restore_params(ckpt, resume, state, shardings)}
      else:
        abstract = T.abstract_with_shardings(jax.eval_shape(lambda: state), shardings)
        state, data_state, _ = ckpt.restore(abstract, resume)
        if keep_position:
          position = data_state["iterator"]
      break
    except RunError:
      raise
    except Exception as e:  # noqa: BLE001 - a truncated or missing file: set the step aside, fall back
      _damaged(ckpt, resume, e)
      resume, meta = check_run_dir(ckpt, config)
  if position is not None:     # outside the fallback: a position this process cannot take is not damage
    iterator.set_state(position)
  start = resume or 0
  try:
    eval_batches = pipeline.fixed_batches(
        data.sources["validation"], data.tokenizer, seq_len=tc.seq_len, batch_size=loop.eval_batch_size,
        num_batches=loop.eval_batches, rows=pipeline.process_rows(loop.eval_batch_size, rank, processes))
  except ValueError:
    raise
  except Exception as e:  # noqa: BLE001 - a damaged array_record file
    raise data.damaged(e, "the validation split") from None
  teacher = None
  if loop.distill_from:
    _, _, _, _, (t_graphdef, t_state, _, _) = load_run(loop.distill_from, loop.mesh, loop.rules,
                                                       need_tokenizer=False, options=options)
    teacher = (t_graphdef, t_state["params"])
  step_fn = T.make_train_step(graphdef, tc, shardings, mesh, rules, teacher=teacher)
  eval_fn = T.make_eval_step(graphdef, mesh, rules)
  metrics = Metrics(loop.output_dir, start)
  last_good = resume

  from tqdm import tqdm
  bar = tqdm(total=tc.steps, initial=start, disable=not loop.progress or rank != 0,
             desc=f"{config.attention.variant}", unit="step", dynamic_ncols=True, file=sys.stderr)
  tokens_per_step = tc.tokens_per_step
  t_last, s_last = time.perf_counter(), start
  summary: dict = {"resumed_from": resume}
  try:
    for step in range(start + 1, tc.steps + 1):
      error = ckpt.save_error()
      if error is not None:
        raise _save_failed(ckpt, last_good, error)
      try:
        tokens = next(iterator)["tokens"]
      except Exception as e:  # noqa: BLE001 - found mid-run: the opening check reads only the ends
        ckpt.save_error(block=True)
        error = data.damaged(e, f"the training data for step {step}")
        if last_good is not None:
          error = RunError(f"{error} (the run then resumes from step {last_good})")
        raise error from None
      state, m = step_fn(state, global_batch(tokens, mesh, rules))
      loss, param_norm = float(m["loss"]), float(m["param_norm"])
      if not (math.isfinite(loss) and math.isfinite(param_norm)):
        ckpt.save_error(block=True)
        where = (f"the last good checkpoint (step {last_good}) is kept in {ckpt.directory}"
                 if last_good is not None else "no checkpoint had been saved yet")
        what = f"loss became {loss}" if not math.isfinite(loss) else "parameters became non-finite"
        raise RunError(f"{what} at step {step}; stopped. {where}. Lower --learning_rate or "
                       "raise --warmup_steps")
      record = {"kind": "train", "step": step, "loss": loss, "grad_norm": float(m["grad_norm"]),
                "lr": float(m["lr"])} | {k: float(m[k]) for k in ("cross_entropy", "distill_kl") if k in m}
      if step % loop.log_every == 0 or step == tc.steps:
        now = time.perf_counter()
        record["tokens_per_s"] = (step - s_last) * tokens_per_step / max(now - t_last, 1e-9)
        t_last, s_last = now, step
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}")
      metrics.write(record)
      bar.update(1)
      if step % loop.eval_every == 0 or step == tc.steps:
        ev = evaluate(eval_fn, state["params"], eval_batches, mesh, rules)
        metrics.write({"kind": "eval", "step": step, **ev})
        bar.write(f"step {step}: validation loss {ev['loss']:.4f}, perplexity {ev['perplexity']:.2f}")
        summary["eval"] = ev
      if step % loop.ckpt_every == 0 or step == tc.steps:
        error = ckpt.save_error(block=True)        # orbax waits for the previous save anyway
        if error is not None:
          raise _save_failed(ckpt, last_good, error)
        try:
          ckpt.save(step, state, {"iterator": iterator.get_state()}, _meta(config, options, tc, data, step, carried))
        except Exception as e:  # noqa: BLE001 - the save's own folder could not be written
          raise _save_failed(ckpt, step, e) from None
        last_good = step
    error = ckpt.save_error(block=True)
    if error is not None:
      raise _save_failed(ckpt, last_good, error)
  finally:
    bar.close()
    metrics.close()
  if "eval" not in summary:            # resumed a finished run: report where it stands
    summary["eval"] = evaluate(eval_fn, state["params"], eval_batches, mesh, rules)
  model = T.model_from_state(graphdef, state)
  summary["sample"] = sample(model, data.tokenizer, loop.prompt, max_new_tokens=loop.sample_tokens,
                             seed=tc.seed)
  if jax.process_index() == 0:
    summary["loss_curve"] = loss_curve_png(loop.output_dir, f"{config.attention.variant}: "
                                           f"{config.num_layers} layers, d {config.d_model}")
  summary["cache_elements_per_token"] = config.cache_elements_per_token()
  summary["steps"] = tc.steps
  ckpt.close()
  return summary


# ----------------------------------------------------------------------------- eval / load


def _restore_params(ckpt, step, state, shardings):
  """Only the parameters (what an imported checkpoint holds), onto `shardings`."""
  abstract = T.abstract_with_shardings(
      jax.eval_shape(lambda: {"params": state["params"], "step": state["step"]}),
      {"params": shardings["params"], "step": shardings["step"]})
  return ckpt.restore_params(abstract["params"], abstract["step"], step)


def restore_converted_params(run_dir: str):
  """The model of a run directory written by `mla_jax.convert` (one device)."""
  return load_run(run_dir, need_tokenizer=False)[1]


def saved_config(run_dir: str) -> ModelConfig | None:
  """The model config of a run's newest checkpoint whose metadata reads, or None
  (quietly: training's own checks then set damaged steps aside)."""
  ckpt_dir = os.path.join(run_dir, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    return None
  ckpt = T.Checkpoints(ckpt_dir, async_save=False)
  try:
    for step in ckpt.steps():
      try:
        return registry.config_from_dict(ckpt.read_meta(step)["model_config"])
      except Exception:  # noqa: BLE001 - damaged: the step before
        continue
    return None
  finally:
    ckpt.close()


def _open_run(run_dir: str) -> T.Checkpoints:
  ckpt_dir = os.path.join(run_dir, "checkpoints")
  ckpt = T.Checkpoints(ckpt_dir, async_save=False) if os.path.isdir(ckpt_dir) else None
  if ckpt is None or not ckpt.steps():
    raise RunError(f"no finished checkpoint in {run_dir}: train first (--mode=train --output_dir={run_dir})")
  return ckpt


def _skip_damaged(ckpt: T.Checkpoints, step: int, error: Exception, steps: list[int]) -> None:
  """Reading a run (eval, generate, serve) never moves anything: say which step is
  damaged and go on to the one before, or stop with one line."""
  why = ckpt.damage(step, error)
  older = [s for s in steps if s < step]
  if not older:
    ckpt.close()
    raise RunError(f"no intact checkpoint in {ckpt.directory} (step {step}: {why}); resume training once "
                   "to set the damaged steps aside, or restore them from a backup")
  log(f"warning: checkpoint step {step} in {ckpt.directory} is damaged ({why}); using step {older[0]}")


def load_meta(run_dir: str) -> dict:
  """The metadata of a run's newest readable checkpoint."""
  ckpt = _open_run(run_dir)
  steps = ckpt.steps()
  for step in steps:
    try:
      meta = ckpt.read_meta(step)
      break
    except Exception as e:  # noqa: BLE001 - unreadable: the step before
      _skip_damaged(ckpt, step, e, steps)
  ckpt.close()
  return meta


def run_config(run_dir: str) -> ModelConfig:
  """The model config of a run's newest readable checkpoint, from its metadata alone."""
  return registry.config_from_dict(load_meta(run_dir)["model_config"])


def load_run(run_dir: str, mesh_spec: str = "", rules_name: str = "default", need_tokenizer: bool = True,
             options: RunOptions = RunOptions(), tokenizer: str = "", before_compile=None):
  """(config, model, tokenizer, meta, (graphdef, state, mesh, rules)) from the newest
  intact checkpoint of a run, the model under `options` (remat never applies
  here); `tokenizer` stands in when the one the run recorded is missing;
  `before_compile(meta)` runs the caller's own checks before anything compiles."""
  ckpt = _open_run(run_dir)
  steps = ckpt.steps()
  options = options.replace(remat="none")
  rules = sharding.rules_preset(rules_name)
  for step in steps:
    try:
      if ckpt.missing(step):            # seen before anything compiles
        raise FileNotFoundError(step)
      meta = ckpt.read_meta(step)
    except Exception as e:  # noqa: BLE001 - unreadable: the step before
      _skip_damaged(ckpt, step, e, steps)
      continue
    config = registry.config_from_dict(meta["model_config"])
    tc = T.TrainConfig(**meta["train_config"])
    loaded = None
    if need_tokenizer:              # before anything compiles: a missing tokenizer is a one-line error
      path = meta.get("tokenizer") or ""
      if not os.path.exists(path):
        if not tokenizer:
          ckpt.close()
          raise RunError(f"the run's tokenizer {path!r} is missing (moved, or an imported checkpoint that "
                         "recorded none); pass --tokenizer=PATH")
        path = tokenizer
      loaded = tok.use_special_tokens(tok.load(path), meta)
      meta = {**meta, "tokenizer": path}
    mesh = sharding.make_mesh(mesh_spec, config, rules=rules)
    if before_compile is not None:
      before_compile(meta)
    graphdef, state, shardings = T.create_state(config, tc, mesh, rules, options)
    try:
      if "converted_from" in meta:
        state = {**state, "params": _restore_params(ckpt, step, state, shardings)}
      else:
        abstract = T.abstract_with_shardings(jax.eval_shape(lambda: state), shardings)
        state, _, _ = ckpt.restore(abstract, step)
      break
    except Exception as e:  # noqa: BLE001 - truncated or missing arrays: the step before
      _skip_damaged(ckpt, step, e, steps)
  ckpt.close()
  return config, T.model_from_state(graphdef, state), loaded, meta, (graphdef, state, mesh, rules)


def validation_batches(data_spec: DataSpec, meta: dict, batch_size: int, num_batches: int,
                       split: str = "validation") -> list:
  """The fixed validation batches of a run ([batch_size, seq_len + 1] token windows
  of its validation split, this process's rows), with the tokenizer it recorded
  (`split="train"`: the first windows of the training split, unshuffled)."""
  data = prepare_data(dataclasses.replace(data_spec, tokenizer=meta["tokenizer"]))
  tok.use_special_tokens(data.tokenizer, meta)
  try:
    return pipeline.fixed_batches(
        data.sources[split], data.tokenizer, seq_len=meta["train_config"]["seq_len"],
        batch_size=batch_size, num_batches=num_batches,
        rows=pipeline.process_rows(batch_size, jax.process_index(), jax.process_count()))
  except ValueError:
    raise
  except Exception as e:  # noqa: BLE001 - a damaged array_record file
    raise data.damaged(e, f"the {split} split") from None


def run_eval(run_dir: str, data_spec: DataSpec, *, mesh: str, eval_batches: int, eval_batch_size: int,
             prompt: str, sample_tokens: int, seed: int, rules: str = "default",
             options: RunOptions = RunOptions(), sampling: Sampling = Sampling(0.8, 40, 0.95)) -> dict:
  batches = []

  def read_batches(meta):                # before the model compiles: a bad size is a one-line error
    batches[:] = validation_batches(data_spec, meta, eval_batch_size, eval_batches)

  config, model, tokenizer, meta, (graphdef, state, mesh_obj, rules_t) = load_run(
      run_dir, mesh, rules, options=options, tokenizer=data_spec.tokenizer, before_compile=read_batches)
  ev = evaluate(T.make_eval_step(graphdef, mesh_obj, rules_t), state["params"], batches, mesh_obj, rules_t)
  return {"step": meta["step"], **ev, "cache_elements_per_token": config.cache_elements_per_token(),
          "cache_bytes_per_token_all_layers_fp32": 4 * config.cache_elements_per_token() * config.num_layers,
          "sample": sample(model, tokenizer, prompt, max_new_tokens=sample_tokens, seed=seed, sampling=sampling)}


# ----------------------------------------------------------------------------- bench


def bench_train(config: ModelConfig, tc: T.TrainConfig, *, mesh: str = "", warmup: int = 3,
                steps: int = 10, rules: str = "default", options: RunOptions = RunOptions()) -> dict:
  """Median train-step time and tokens/s after warm-up, on fixed random tokens."""
  rules_t = sharding.rules_preset(rules)
  mesh_obj = sharding.make_mesh(mesh, config, rules=rules_t)
  graphdef, state, shardings = T.create_state(config, tc, mesh_obj, rules_t, options)
  step_fn = T.make_train_step(graphdef, tc, shardings, mesh_obj, rules_t)
  rng = np.random.default_rng(0)
  rows = pipeline.process_rows(tc.batch_size, jax.process_index(), jax.process_count())
  tokens = rng.integers(0, config.vocab_size, (tc.batch_size, tc.seq_len + 1)).astype(np.int32)
  tokens = global_batch(tokens[rows.start:rows.stop], mesh_obj, rules_t)
  times = []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    state, m = step_fn(state, tokens)
    jax.block_until_ready(m["loss"])
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  median = statistics.median(times)
  return {"median_step_s": median, "tokens_per_s": tc.tokens_per_step / median,
          "steps_timed": steps, "final_loss": float(m["loss"])}

