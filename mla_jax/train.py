"""Training: AdamW with warmup + cosine decay, clipping, weight decay, gradient
accumulation, a jitted and donated train step with shardings, an eval step,
and orbax checkpoints of (params, optimizer state, step) plus the data
iterator's state and the configs.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mla_jax import compat, registry, sharding
from mla_jax.config import ModelConfig, RunOptions, option
from mla_jax.model import Transformer


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = option(1000, "Training steps.")
  batch_size: int = option(16, "Global batch size in sequences.")
  seq_len: int = option(256, "Tokens per training sequence.")
  learning_rate: float = option(3e-3, "Peak learning rate.")
  warmup_steps: int = option(100, "Linear warm-up steps.")
  min_lr_ratio: float = option(0.1, "Cosine decay floor, as a fraction of the peak.")
  weight_decay: float = option(0.1, "AdamW weight decay (matrices only).")
  b1: float = option(0.9, "AdamW beta1.", flag="beta1")
  b2: float = option(0.95, "AdamW beta2.", flag="beta2")
  grad_clip: float = option(1.0, "Global-norm gradient clipping (0 = off).")
  grad_accum: int = option(1, "Micro-batches per step (gradient accumulation).")
  seed: int = option(0, "Random seed (initialisation, data order, sampling).")
  distill_weight: float = option(0.5, "With a teacher (--distill_from): the loss is (1 - w) cross-entropy + "
                                      "w KL(teacher || model) of the next-token distributions.")

  def __post_init__(self):
    checks = [(self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
              (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
              (self.seq_len >= 1, f"seq_len must be >= 1, got {self.seq_len}"),
              (self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}"),
              (0 <= self.warmup_steps <= self.steps,
               f"warmup_steps must be in [0, steps={self.steps}], got {self.warmup_steps}"),
              (0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}"),
              (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
              (self.grad_clip >= 0, f"grad_clip must be >= 0 (0 = off), got {self.grad_clip}"),
              (0 <= self.b1 < 1, f"beta1 must be in [0, 1), got {self.b1}"),
              (0 <= self.b2 < 1, f"beta2 must be in [0, 1), got {self.b2}"),
              (self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
              (self.batch_size % self.grad_accum == 0,
               f"batch_size={self.batch_size} must be divisible by grad_accum={self.grad_accum}"),
              (0 <= self.distill_weight <= 1, f"distill_weight must be in [0, 1], got {self.distill_weight}")]
    for ok, msg in checks:
      if not ok:
        raise ValueError(msg)

  @property
  def tokens_per_step(self) -> int:
    return self.batch_size * self.seq_len


def learning_rate_schedule(tc: TrainConfig) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=tc.learning_rate, warmup_steps=tc.warmup_steps,
      decay_steps=max(tc.steps, tc.warmup_steps + 1), end_value=tc.learning_rate * tc.min_lr_ratio)


def decays(path: Sequence[str]) -> bool:
  """Whether weight decay applies to the parameter at `path` (its module and field
  names): weights and embeddings do; norm weights and biases never, whatever their
  shape (a latent norm is stored [blocks, width], scanned layers stack every norm:
  deciding by rank decayed both)."""
  return path[-1] != "bias" and not any("norm" in name for name in path)


def decay_mask(params):
  def one(key_path, _):
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in key_path]
    return decays(names[:-1] if names[-1] == "value" else names)     # an nnx Variable's own field
  return jax.tree_util.tree_map_with_path(one, params)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
  parts = [optax.clip_by_global_norm(tc.grad_clip)] if tc.grad_clip else []
  parts.append(optax.adamw(learning_rate_schedule(tc), b1=tc.b1, b2=tc.b2,
                           weight_decay=tc.weight_decay, mask=decay_mask))
  return optax.chain(*parts)


def lm_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).mean()


def distill_kl(logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
  """Mean KL(p_teacher || p_model) of the next-token distributions (nats per token)."""
  p = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32), -1)
  q = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
  return (jnp.exp(p) * (p - q)).sum(-1).mean()


# ----------------------------------------------------------------------------- state


def split_model(model: Transformer):
  graphdef, params = nnx.split(model, nnx.Param)
  return graphdef, params


def init_state(params, tx: optax.GradientTransformation) -> dict:
  return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}


def state_shardings(state: dict, mesh, rules=sharding.RULES) -> dict:
  """Every leaf of the train state placed by its logical axes (the optimizer's
  moments inherit their parameter's names; counters are replicated)."""
  def one(x):
    if isinstance(x, nnx.State) or isinstance(x, nnx.Variable):
      return sharding.state_shardings(x, mesh, rules)
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, (nnx.State, nnx.Variable)))


def create_state(config: ModelConfig, tc: TrainConfig, mesh, rules=sharding.RULES,
                 options: RunOptions = RunOptions()) -> tuple[Any, dict, Any]:
  """(graphdef, train state placed on `mesh`, its shardings). Initialised inside
  jit with output shardings, so no device ever holds the whole model."""
  tx = make_optimizer(tc)
  abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(tc.seed), options=options))
  graphdef, abstract_params = split_model(abstract)
  abstract_state = jax.eval_shape(lambda p: init_state(p, tx), abstract_params)
  shardings = state_shardings(abstract_state, mesh, rules)

  def init():
    _, params = split_model(Transformer(config, rngs=nnx.Rngs(tc.seed), options=options))
    return init_state(params, tx)

  with sharding.use_mesh(mesh, rules):
    state = jax.jit(init, out_shardings=shardings)()
  return graphdef, state, shardings


def make_train_step(graphdef, tc: TrainConfig, shardings, mesh, rules=sharding.RULES, teacher=None):
  """jit(state, tokens [B, L+1]) -> (state, metrics); the state is donated.
  `teacher` (graphdef, params placed on the mesh): distil from it (`distill_kl`,
  weighted by tc.distill_weight); the metrics then also hold the two terms."""
  tx = make_optimizer(tc)
  schedule = learning_rate_schedule(tc)

  def loss_fn(params, tokens, teacher_params):
    model = nnx.merge(graphdef, params)
    logits = model(tokens[:, :-1])
    ce = lm_loss(logits, tokens[:, 1:])
    if teacher is None:
      return ce, {}
    kl = distill_kl(logits, nnx.merge(teacher[0], teacher_params)(tokens[:, :-1]))
    return (1 - tc.distill_weight) * ce + tc.distill_weight * kl, {"cross_entropy": ce, "distill_kl": kl}

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state, tokens, teacher_params):
    params = state["params"]
    if tc.grad_accum == 1:
      (loss, parts), grads = grad_fn(params, tokens, teacher_params)
    else:
      micro = tokens.reshape((tc.grad_accum, -1) + tokens.shape[1:])

      def body(carry, mb):
        loss_sum, parts_sum, grad_sum = carry
        (loss, parts), grads = grad_fn(params, mb, teacher_params)
        return (loss_sum + loss, jax.tree.map(jnp.add, parts_sum, parts), jax.tree.map(jnp.add, grad_sum, grads)), None

      zeros = jax.tree.map(jnp.zeros_like, params)
      no_parts = {} if teacher is None else {"cross_entropy": jnp.zeros(()), "distill_kl": jnp.zeros(())}
      (loss, parts, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), no_parts, zeros), micro)
      loss = loss / tc.grad_accum
      parts = jax.tree.map(lambda v: v / tc.grad_accum, parts)
      grads = jax.tree.map(lambda g: g / tc.grad_accum, grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    new_state = {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1}
    # param_norm lets the loop refuse to checkpoint parameters that went non-finite
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"]),
               "param_norm": optax.tree.norm(new_params), **parts}
    return new_state, metrics

  batch_sharding = sharding.named_sharding(mesh, ("batch", "length"), rules=rules, strict=False)
  teacher_params = None if teacher is None else teacher[1]
  teacher_shardings = None if teacher is None else jax.tree.map(lambda a: a.sharding, teacher_params)
  jitted = jax.jit(step, donate_argnums=(0,), in_shardings=(shardings, batch_sharding, teacher_shardings),
                   out_shardings=(shardings, None))

  def run(state, tokens):
    with sharding.use_mesh(mesh, rules):
      return jitted(state, tokens, teacher_params)

  return run


def make_eval_step(graphdef, mesh, rules=sharding.RULES):
  """jit(params, tokens) -> (summed token loss, token count)."""

  def step(params, tokens):
    model = nnx.merge(graphdef, params)
    logits = model(tokens[:, :-1])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens[:, 1:])
    return losses.sum(), jnp.asarray(losses.size, jnp.float32)

  jitted = jax.jit(step)

  def run(params, tokens):
    with sharding.use_mesh(mesh, rules):
      return jitted(params, tokens)

  return run


def model_from_state(graphdef, state) -> Transformer:
  return nnx.merge(graphdef, state["params"])


# ----------------------------------------------------------------------------- checkpoints


META_FORMAT = 2   # format 2: the model config versioned, run options saved apart from it


def migrate_meta(meta: dict) -> dict:
  """A checkpoint's meta of any format -> the current one (a new dict)."""
  meta = dict(meta)
  model_config, options = registry.migrate(meta["model_config"])
  meta["model_config"] = {**model_config, "config_version": registry.CONFIG_VERSION}
  meta.setdefault("run_options", options)
  meta["format"] = META_FORMAT
  return meta


def run_meta(config: ModelConfig, options: RunOptions, tc: TrainConfig, **extra) -> dict:
  """What every checkpoint records beside the arrays."""
  return {"format": META_FORMAT, "model_config": config.to_dict(), "run_options": options.to_dict(),
          "train_config": dataclasses.asdict(tc), **extra}


class Checkpoints:
  """orbax CheckpointManager holding, per step: the train state (params,
  optimizer state, step), the data iterator's state, and the configs.

  Saves are asynchronous; a save interrupted by a crash leaves only a
  temporary folder, which orbax ignores, so the previous step stays restorable.
  Meta written by earlier versions is migrated as it is read (`migrate_meta`).
  """

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    if keep < 1:            # orbax's max_to_keep=0 deletes every checkpoint, the newest included
      raise ValueError(f"keep_checkpoints must be >= 1 (the newest checkpoint is always kept), got {keep}")
    import orbax.checkpoint as ocp
    self._ocp = ocp
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler()}
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def steps(self) -> list[int]:
    """Every finished step, newest first."""
    return sorted(self.manager.all_steps(), reverse=True)

  # the files whose loss orbax reports obscurely ("pytree structure error" for _METADATA)
  REQUIRED = ("state/_METADATA", "state/manifest.ocdbt", "meta/metadata", "data/metadata")

  def missing(self, step: int) -> list[str]:
    return [f for f in self.REQUIRED if not os.path.exists(os.path.join(self.directory, str(step), f))]

  def damage(self, step: int, error: Exception | None) -> str:
    """What is wrong with a step that failed to load, in a few words."""
    missing = self.missing(step)
    if missing:
      return f"{', '.join(missing)} missing"
    return error_summary(error)

  def set_aside(self, step: int) -> str:
    """Move a damaged step out of orbax's sight, never deleting it: checkpoints/N
    -> checkpoints/damaged-N (a later save of step N then finds no clash)."""
    dst = os.path.join(self.directory, f"damaged-{step}")
    k = 1
    while os.path.exists(dst):
      dst, k = os.path.join(self.directory, f"damaged-{step}-{k}"), k + 1
    if jax.process_index() == 0:
      os.rename(os.path.join(self.directory, str(step)), dst)
    compat.barrier(f"mla_jax_set_aside_{step}", 600)
    self.manager.reload()
    return dst

  def save(self, step: int, state: dict, data_state: dict, meta: dict) -> None:
    args = self._ocp.args
    self.manager.save(step, args=args.Composite(
        state=args.StandardSave(state), data=args.JsonSave(data_state), meta=args.JsonSave(meta)))

  def read_meta(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    restored = self.manager.restore(step, args=self._ocp.args.Composite(meta=self._ocp.args.JsonRestore()))
    return migrate_meta(restored["meta"])

  def restore(self, abstract_state: dict, step: int | None = None) -> tuple[dict, dict, dict]:
    """Restore onto the shardings carried by `abstract_state` (any mesh shape)."""
    args = self._ocp.args
    step = self.latest_step() if step is None else step
    restored = self.manager.restore(step, args=args.Composite(
        state=args.StandardRestore(abstract_state), data=args.JsonRestore(), meta=args.JsonRestore()))
    return restored["state"], dict(restored["data"]), migrate_meta(restored["meta"])

  def restore_params(self, abstract_params, abstract_step, step: int | None = None):
    """Only the parameters (all an imported checkpoint holds), onto the
    shardings the abstract arrays carry."""
    args = self._ocp.args
    step = self.latest_step() if step is None else step
    restored = self.manager.restore(step, args=args.Composite(
        state=args.StandardRestore({"params": abstract_params, "step": abstract_step})))
    return restored["state"]["params"]

  def restore_as_saved(self, step: int | None = None) -> dict:
    """The train state on this process's first device, whatever topology wrote
    it: for inspection and tests."""
    args = self._ocp.args
    step = self.latest_step() if step is None else step
    meta = self.manager.item_metadata(step)["state"]
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
    return self.manager.restore(step, args=args.Composite(state=args.StandardRestore(target)))["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def save_error(self, block: bool = False) -> Exception | None:
    """The error of a background save that failed (a full disk, a lost mount), if any;
    `block` waits for the save in flight first."""
    try:
      self.wait() if block else self.manager.check_for_errors()
    except Exception as e:  # noqa: BLE001 - whatever the writer raised
      return e
    return None

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def refuse_existing_run(output_dir: str) -> None:
  """An imported or converted model goes into a new run directory, never over a run."""
  ckpt_dir = os.path.join(output_dir, "checkpoints")
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    raise ValueError(f"{ckpt_dir} already holds checkpoints; give a new --output_dir")


def save_step0(output_dir: str, model: Transformer, train_config: TrainConfig = TrainConfig(), **meta) -> None:
  """`model`'s parameters as step 0 of a new run directory (no optimizer state:
  training from it starts one), `meta` recorded beside them: what `convert`,
  the Hugging Face import and `convert_latent` write."""
  refuse_existing_run(output_dir)
  state = {"params": nnx.state(model, nnx.Param), "step": jnp.zeros((), jnp.int32)}
  ckpt = Checkpoints(os.path.join(output_dir, "checkpoints"), async_save=False)
  ckpt.save(0, state, {"iterator": None}, run_meta(model.config, RunOptions(), train_config, step=0, **meta))
  ckpt.close()


def error_summary(error: Exception, width: int = 160) -> str:
  """'Type: first line of the message', for one-line reports of a library's error."""
  lines = str(error).strip().splitlines()
  return f"{type(error).__name__}: {lines[0][:width] if lines else ''}"


def abstract_with_shardings(state_shapes, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      state_shapes, shardings)


def config_mismatch(saved: dict, current: dict) -> str | None:
  """A one-line description of how two model configs differ, or None."""
  diffs = []
  for key in sorted(set(saved) | set(current)):
    a, b = saved.get(key), current.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      inner = config_mismatch(a, b)
      if inner:
        diffs.append(f"{key}.{inner}")
    elif a != b:
      diffs.append(f"{key}: saved {json.dumps(a)}, now {json.dumps(b)}")
  return "; ".join(diffs) if diffs else None
