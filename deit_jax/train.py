"""The DeiT trainer: config -> mesh -> input -> model -> sharded state -> step -> checkpoints -> loop.

Read it top to bottom; each phase is marked. The train step is a pure function of pytrees (the
model's graph is split from its parameters once), jitted with NamedShardings over a one-axis mesh:
the batch is split over all devices, parameters replicated or FSDP-sharded by config rules.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from flax import nnx

from deit_jax import checkpoint, conv, data, distill, evaluation, losses, mixup, models, sharding
from deit_jax import teachers

TRAIN_STATE_ITEM = "train_state"


class ConfigError(ValueError):
  """The config cannot run: raised before anything is compiled."""


# ==============================================================================================
# Config: validation and derived values (computed from the final config, never frozen in it).
# ==============================================================================================
@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything derived from the config and the data before the run starts."""
  num_devices: int
  global_batch: int
  micro_batch: int
  steps_per_epoch: int
  total_steps: int
  warmup_steps: int
  peak_lr: float
  num_train_examples: int
  num_eval_examples: int
  num_classes: int


def str_keys(state) -> dict:
  """nnx.State -> a plain nested dict with string keys: what the step, optax and Orbax carry
  (nnx.merge accepts it back)."""
  return checkpoint.unflatten(checkpoint.flatten(nnx.to_pure_dict(state)))


def is_cnn(config) -> bool:
  """CNN teachers train with the same launcher (plain supervised, no distillation)."""
  return config.model in teachers.TEACHERS


def model_overrides(config) -> dict:
  kw = {k: v for k, v in config.model_kw.items()}
  if kw.get("attention_impl") == "":
    kw["attention_impl"] = None
  return {**kw, "num_classes": config.data.num_classes, "img_size": config.aug.input_size}


def validate_config(config, num_devices: int) -> None:
  """Every check that needs no data and no compilation."""
  if config.model not in models.MODELS and config.model not in teachers.TEACHERS:
    raise ConfigError(f"config.model={config.model!r} is not a DeiT model nor a CNN teacher; "
                      f"known: {', '.join(sorted(models.MODELS))}; teachers: "
                      f"{', '.join(sorted(teachers.TEACHERS))}.")
  if not config.data.num_classes:
    raise ConfigError("config.data.num_classes must be set (e.g. 1000 for ImageNet).")
  if is_cnn(config):
    if config.distillation.kind != "none":
      raise ConfigError(f"{config.model} is a CNN (a teacher); it trains without distillation: "
                        "set --config.distillation.kind=none.")
    if config.init_checkpoint:
      raise ConfigError("config.init_checkpoint (fine-tuning) is for DeiT models.")
    try:
      conv.check_impl(config.model_kw.get("conv_impl"))
    except ValueError as e:
      raise ConfigError(f"config.model_kw.{e}") from e
    cfg = None
  else:
    try:
      cfg = models.model_config(config.model, **model_overrides(config))
    except ValueError as e:
      raise ConfigError(f"config.model_kw: {e}") from e
  b, k = config.batch_size, config.grad_accum_steps
  if k < 1:
    raise ConfigError(f"config.grad_accum_steps={k} must be >= 1.")
  if b % (num_devices * k):
    raise ConfigError(
        f"config.batch_size={b} (global) must be divisible by the device count x grad_accum_steps "
        f"= {num_devices} x {k} = {num_devices * k}. Use a batch size that is a multiple of "
        f"{num_devices * k}.")
  if b % jax.process_count():
    raise ConfigError(f"config.batch_size={b} is not divisible by the {jax.process_count()} "
                      "processes.")
  if config.eval_batch_size % num_devices:
    raise ConfigError(f"config.eval_batch_size={config.eval_batch_size} must be divisible by the "
                      f"device count {num_devices}.")
  dist = config.distillation
  if dist.kind not in losses.KINDS:
    raise ConfigError(f"config.distillation.kind={dist.kind!r}; use one of {losses.KINDS}.")
  if dist.reduction not in losses.REDUCTIONS:
    raise ConfigError(f"config.distillation.reduction={dist.reduction!r}; use one of "
                      f"{losses.REDUCTIONS}.")
  if not 0 <= dist.alpha <= 1:
    raise ConfigError(f"config.distillation.alpha={dist.alpha} must be in [0, 1].")
  if dist.kind != "none":
    try:
      distill.validate_teacher_config(config.teacher, dist.kind)
    except distill.TeacherError as e:
      raise ConfigError(str(e)) from e
  if cfg is not None and not cfg.distilled:
    if not config.optimizer.decay_dist_token:
      raise ConfigError(f"config.optimizer.decay_dist_token=False is a distillation-token option, "
                        f"but {config.model} has no distillation token. Use a *_distilled_* model "
                        f"or leave the option at its default.")
    if config.eval_head != "both":
      raise ConfigError(f"config.eval_head={config.eval_head!r} needs a distillation token, which "
                        f"{config.model} lacks.")
  if config.eval_head not in ("both", "cls", "dist"):
    raise ConfigError(f"config.eval_head={config.eval_head!r}; use 'both', 'cls' or 'dist'.")
  eval_size = evaluation.eval_input_size(config)
  if cfg is not None and eval_size != cfg.img_size:
    try:
      models.model_config(config.model, **{**model_overrides(config), "img_size": eval_size})
    except ValueError as e:
      raise ConfigError(f"config.aug.eval_input_size={eval_size}: {e}") from e
  if config.get("loss", "ce") not in losses.BASE_LOSSES:
    raise ConfigError(f"config.loss={config.loss!r}; use one of {losses.BASE_LOSSES}.")
  if config.optimizer.get("name", "adamw") not in OPTIMIZERS:
    raise ConfigError(f"config.optimizer.name={config.optimizer.name!r}; use one of "
                      f"{OPTIMIZERS}.")
  for pattern, rule in config.sharding.rules:
    if rule not in sharding.RULES:
      raise ConfigError(f"config.sharding.rules: unknown rule {rule!r} for {pattern!r}; use one "
                        f"of {sharding.RULES}.")
  if config.ema_decay and not 0 < config.ema_decay < 1:
    raise ConfigError(f"config.ema_decay={config.ema_decay} must be in (0, 1) (0 turns EMA off).")


def build_eval_source(config) -> data.Source:
  """The source of `config.data`, on its `eval_split`."""
  eval_data = ml_collections.ConfigDict(config.data.to_dict())
  eval_data.split = config.data.eval_split
  return data.build_source(eval_data)


def make_plan(config, num_devices: int, num_train: int, num_eval: int, num_classes: int) -> Plan:
  if num_classes != config.data.num_classes:
    raise ConfigError(f"The training data has {num_classes} classes but config.data.num_classes="
                      f"{config.data.num_classes}.")
  spe = data.steps_per_epoch(num_train, config.batch_size)
  total = config.total_steps or int(round(config.epochs * spe))
  warmup = int(round(config.optimizer.warmup_epochs * spe))
  lr = config.optimizer.lr * config.batch_size / config.optimizer.lr_base_batch
  return Plan(num_devices=num_devices, global_batch=config.batch_size,
              micro_batch=config.batch_size // config.grad_accum_steps, steps_per_epoch=spe,
              total_steps=total, warmup_steps=warmup, peak_lr=lr, num_train_examples=num_train,
              num_eval_examples=num_eval, num_classes=num_classes)


# ==============================================================================================
# Optimizer: AdamW, warmup + cosine, decay mask; all optax.
# ==============================================================================================
def lr_schedule(config, plan: Plan) -> optax.Schedule:
  """Linear warmup from warmup_lr, then timm's cosine: the cosine runs over the whole run
  (warmup included) down to min_lr, evaluated per step (the official code steps it per epoch)."""
  o = config.optimizer
  cosine = optax.cosine_decay_schedule(plan.peak_lr, max(plan.total_steps, 1),
                                       alpha=o.min_lr / plan.peak_lr)
  if plan.warmup_steps == 0:
    return cosine
  warmup = optax.linear_schedule(o.warmup_lr, plan.peak_lr, plan.warmup_steps)
  return optax.join_schedules([warmup, lambda s: cosine(s + plan.warmup_steps)],
                              [plan.warmup_steps])


def decay_mask(params: dict, decay_dist_token: bool) -> dict:
  """No weight decay on biases, norms (every 1-D parameter), pos_embed and cls_token; the
  official code does decay dist_token (timm does not), hence the option."""
  skip = {"pos_embed", "cls_token"} | (set() if decay_dist_token else {"dist_token"})

  def mask(path, leaf):
    name = sharding._path_str(path)
    return leaf.ndim > 1 and name not in skip
  return jax.tree_util.tree_map_with_path(mask, params)


OPTIMIZERS = ("adamw", "lamb")


def lamb(schedule, o, mask) -> optax.GradientTransformation:
  """LAMB as DeiT III trains with it (`--opt fusedlamb`: apex FusedLAMB, which timm's Lamb
  mirrors): Adam moments with bias correction, weight decay added to the update, and the
  layer-wise trust ratio ||w|| / ||update|| only where weight decay applies (FusedLAMB without
  nvlamb skips it for the no-decay group; optax.lamb would apply it to every parameter).
  FusedLAMB also clips the gradient's global norm to 1: set optimizer.clip_grad=1.0."""
  return optax.chain(optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps),
                     optax.add_decayed_weights(o.weight_decay, mask),
                     optax.masked(optax.scale_by_trust_ratio(), mask),
                     optax.scale_by_learning_rate(schedule))


def make_optimizer(config, plan: Plan, params: dict) -> tuple[optax.GradientTransformation,
                                                                optax.Schedule]:
  o = config.optimizer
  schedule = lr_schedule(config, plan)
  parts = [optax.clip_by_global_norm(o.clip_grad)] if o.clip_grad else []
  mask = decay_mask(params, o.decay_dist_token)
  if o.get("name", "adamw") == "lamb":
    parts.append(lamb(schedule, o, mask))
  else:
    parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                             mask=mask))
  return optax.chain(*parts), schedule


# ==============================================================================================
# Steps.
# ==============================================================================================
def step_keys(rng_data, step):
  """(mixup key, stochastic-depth key) of a step: a function of the run's seed and the step."""
  return jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(rng_data), step))


def mix_batch(config, plan: Plan, key, images, labels):
  """Mixup/CutMix with smoothed targets; pairs within each device's rows when per_device."""
  mix = config.mixup
  return mixup.mixup_cutmix(
      key, images, labels, num_classes=plan.num_classes, mixup_alpha=mix.mixup_alpha,
      cutmix_alpha=mix.cutmix_alpha, prob=mix.prob, switch_prob=mix.switch_prob,
      label_smoothing=config.label_smoothing,
      cutmix_minmax=tuple(mix.cutmix_minmax) if mix.cutmix_minmax else None,
      num_groups=plan.num_devices if mix.per_device else 1)


def make_train_step(config, plan: Plan, graphdef, tx, schedule, teacher) -> Callable:
  dist = config.distillation
  k = config.grad_accum_steps
  deit = not is_cnn(config)

  def loss_fn(params, batch_stats, images, targets, teacher_logits, key):
    model = nnx.merge(graphdef, params, batch_stats)
    out = model(images, rngs=key) if deit else model(images)
    terms = losses.distillation_terms(out, targets, teacher_logits, kind=dist.kind,
                                      alpha=dist.alpha, tau=dist.tau, reduction=dist.reduction,
                                      base_loss=config.get("loss", "ce"),
                                      bce_target_threshold=config.get("bce_target_threshold"))
    return terms["loss"], (terms, str_keys(nnx.state(model, nnx.BatchStat)))

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state, batch, teacher_params):
    params, stats = state["params"], state["batch_stats"]
    mix_key, drop_key = step_keys(state["rng"], state["step"])
    images, targets = mix_batch(config, plan, mix_key, batch["image"], batch["label"])
    # The teacher sees exactly the student's augmented, mixed images.
    if dist.kind == "none":
      teacher_logits = jnp.zeros((images.shape[0], 0), jnp.float32)
    elif "teacher_topk_indices" in batch:  # precomputed by --mode=precompute_teacher
      teacher_logits = distill.logits_from_topk(batch["teacher_topk_values"],
                                                batch["teacher_topk_indices"], plan.num_classes)
    else:
      teacher_logits = teacher.logits(teacher_params, images)
    if k == 1:
      (loss, (terms, new_stats)), grads = grad_fn(params, stats, images, targets, teacher_logits,
                                                  drop_key)
    else:
      # Microbatch i takes rows i, i+k, i+2k, ...: every microbatch stays spread over all
      # devices, so no data moves between devices. Mean of equal-size means = the big mean.
      # BatchNorm statistics (CNNs) are updated microbatch after microbatch.
      split = lambda x: jnp.moveaxis(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 1, 0)
      micro = (split(images), split(targets), split(teacher_logits), jnp.arange(k))

      def body(carry, xs):
        acc, stats_i = carry
        im, tg, tl, i = xs
        (l, (t, stats_i)), g = grad_fn(params, stats_i, im, tg, tl, jax.random.fold_in(drop_key, i))
        return (jax.tree.map(jnp.add, acc, (l, t, g)), stats_i), None

      zero = jnp.zeros((), jnp.float32)
      acc0 = (zero, {"loss": zero, "base": zero, "distill": zero},
              jax.tree.map(jnp.zeros_like, params))
      ((loss, terms, grads), new_stats), _ = jax.lax.scan(body, (acc0, stats), micro)
      loss, terms, grads = jax.tree.map(lambda x: x / k, (loss, terms, grads))
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    # A non-finite loss or update leaves the state untouched; the host then stops the run
    # naming the step.
    finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(updates))
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = {**state, "params": keep(new_params, params), "batch_stats": keep(new_stats, stats),
                 "opt_state": keep(opt_state, state["opt_state"]), "step": state["step"] + 1}
    if "ema" in state:
      new_state["ema"] = optax.incremental_update(persistent(new_state), state["ema"],
                                                  1.0 - config.ema_decay)
    metrics = {"loss": loss, "base_loss": terms["base"], "distill_loss": terms["distill"],
               "lr": schedule(state["step"]), "grad_norm": optax.tree.norm(grads),
               "finite": finite}
    return new_state, metrics

  return step


def persistent(state) -> dict:
  """What a model checkpoint holds: parameters plus BatchNorm statistics (CNNs)."""
  return checkpoint.merge_trees(state["params"], state["batch_stats"])


# ==============================================================================================
# Logging: a readable progress line, TensorBoard events and a JSONL file (process 0 only).
# ==============================================================================================
class MetricWriter:

  def __init__(self, workdir: str, enabled: bool):
    self.enabled = enabled
    if not enabled:
      return
    from deit_jax import lazy_tf  # tf.summary writes TensorBoard event files
    self._tf = lazy_tf.load()
    self._tb = self._tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

  def write(self, step: int, metrics: dict[str, float]):
    if not self.enabled:
      return
    with self._tb.as_default():
      for k, v in metrics.items():
        self._tf.summary.scalar(k, v, step=step)
    self._tb.flush()
    self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
    self._jsonl.flush()

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def _fmt_time(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def log(msg: str):
  if jax.process_index() == 0:
    print(msg, flush=True)


# ==============================================================================================
# Checkpoints.
# ==============================================================================================
def _managers(workdir: str, config):
  items = (checkpoint.MODEL_ITEM, checkpoint.PARAMS_ITEM, checkpoint.EMA_ITEM, TRAIN_STATE_ITEM)
  last = ocp.CheckpointManager(
      os.path.join(workdir, "checkpoints"), item_names=items,
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints,
                                           enable_async_checkpointing=True))
  best = ocp.CheckpointManager(
      os.path.join(workdir, "best"), item_names=items,
      options=ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: m[config.best_metric],
                                           best_mode="max", enable_async_checkpointing=False))
  return last, best


def _save_args(state, description):
  items = {
      checkpoint.MODEL_ITEM: ocp.args.JsonSave(description),
      checkpoint.PARAMS_ITEM: ocp.args.StandardSave(persistent(state)),
      TRAIN_STATE_ITEM: ocp.args.StandardSave(
          {"opt_state": state["opt_state"], "step": state["step"], "rng": state["rng"]})}
  if "ema" in state:
    items[checkpoint.EMA_ITEM] = ocp.args.StandardSave(state["ema"])
  return ocp.args.Composite(**items)


def check_workdir_model(mngr, description: dict, workdir: str):
  """A workdir holding another model's checkpoints is refused before anything is written."""
  step = mngr.latest_step()
  if step is None:
    return
  stored = mngr.restore(step, args=ocp.args.Composite(**{
      checkpoint.MODEL_ITEM: ocp.args.JsonRestore()}))[checkpoint.MODEL_ITEM]
  description = json.loads(json.dumps(description))  # as stored: tuples become lists
  if dict(stored) != description:
    old, new = checkpoint.flatten(dict(stored)), checkpoint.flatten(description)
    diff = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)}
    raise ConfigError(
        f"{workdir} holds checkpoints of a different model (stored vs configured: {diff}). Use "
        f"another --workdir, or delete that one to start over; nothing was overwritten.")


@dataclasses.dataclass
class ModelState:
  """The model as the trainer holds it: graph split from a pytree state, with shardings."""
  description: dict
  graphdef: Any  # train mode
  eval_graphdef: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  abstract_state: dict
  state_sh: dict
  init: Callable[[], dict]  # creates the state already sharded
  num_params: int


def model_constructor(config) -> Callable[[], nnx.Module]:
  if is_cnn(config):
    return lambda: teachers.TEACHERS[config.model](
        config.data.num_classes, dtype=jnp.dtype(config.model_kw.dtype),
        conv_impl=config.model_kw.get("conv_impl") or None, rngs=nnx.Rngs(config.seed))
  cfg = models.model_config(config.model, **model_overrides(config))
  return lambda: models.DeiT(cfg, rngs=nnx.Rngs(config.seed))


def build_model_state(config, plan: Plan, mesh) -> ModelState:
  """`jax.eval_shape` -> shardings by the config's rules -> a jitted init with out_shardings.
  State: params, batch_stats (CNNs; empty for DeiT), opt_state, ema (params and stats, if on),
  step, rng. Trees have string keys."""
  make = model_constructor(config)
  abstract = nnx.eval_shape(make)
  abstract.train()
  graphdef, abstract_params, _ = nnx.split(abstract, nnx.Param, nnx.BatchStat)
  abstract.eval()
  eval_graphdef = nnx.split(abstract, nnx.Param, nnx.BatchStat)[0]
  eval_size = evaluation.eval_input_size(config)
  if not is_cnn(config) and eval_size != config.aug.input_size:
    # Evaluated at another resolution (DeiT III: train 192, eval 224): the same weights with the
    # position grid resized inside the eval step (evaluation.make_eval_step).
    cfg = models.model_config(config.model, **{**model_overrides(config), "img_size": eval_size})
    at_eval_size = nnx.eval_shape(lambda: models.DeiT(cfg, rngs=nnx.Rngs(0)))
    at_eval_size.eval()
    eval_graphdef = nnx.split(at_eval_size, nnx.Param, nnx.BatchStat)[0]
  tx, schedule = make_optimizer(config, plan, str_keys(abstract_params))

  def init():
    _, params, stats = nnx.split(make(), nnx.Param, nnx.BatchStat)
    params, stats = str_keys(params), str_keys(stats)
    state = {"params": params, "batch_stats": stats, "opt_state": tx.init(params),
             "step": jnp.int32(0), "rng": jax.random.key_data(jax.random.key(config.seed))}
    if config.ema_decay:
      state["ema"] = jax.tree.map(jnp.copy, persistent(state))
    return state

  abstract_state = jax.eval_shape(init)
  rules = [tuple(r) for r in config.sharding.rules]
  state_sh = {k: (sharding.tree_shardings(v, mesh, rules)
                  if k in ("params", "batch_stats", "ema", "opt_state")
                  else sharding.replicated(mesh)) for k, v in abstract_state.items()}
  return ModelState(description=checkpoint.model_description(abstract),
                    graphdef=graphdef, eval_graphdef=eval_graphdef, tx=tx, schedule=schedule,
                    abstract_state=abstract_state, state_sh=state_sh,
                    init=jax.jit(init, out_shardings=state_sh),
                    num_params=models.count_params(abstract))


def jit_train_step(config, plan: Plan, model: ModelState, mesh, teacher=None):
  """(state, batch, teacher_params) -> (state, metrics); the state's buffers are donated."""
  step = make_train_step(config, plan, model.graphdef, model.tx, model.schedule, teacher)
  return jax.jit(step, in_shardings=(model.state_sh, sharding.batch_sharding(mesh),
                                     teacher and teacher.shardings),
                 out_shardings=(model.state_sh, sharding.replicated(mesh)), donate_argnums=(0,))


def init_from_checkpoint(config, state, state_sh):
  """Fine-tuning: the weights of `config.init_checkpoint` (position embeddings resized to this
  resolution; the heads dropped with `init_skip_head` for a new class count). Optimizer state
  and step start fresh; the EMA starts from the loaded weights."""
  source = checkpoint.load_model(config.init_checkpoint)
  if not isinstance(source, models.DeiT):
    raise ConfigError(f"config.init_checkpoint={config.init_checkpoint} is not a DeiT checkpoint.")
  flat = checkpoint.model_params(source)
  target = model_constructor(config)()
  if config.init_skip_head:
    fresh = checkpoint.model_params(target)
    flat = {k: (fresh[k] if k.split("/")[0] in ("head", "head_dist") else v)
            for k, v in flat.items()}
  try:
    checkpoint.assign_params(target, flat)
  except checkpoint.CheckpointError as e:
    raise ConfigError(f"config.init_checkpoint does not fit {config.model}: {e}\nFor a new "
                      "class count set --config.init_skip_head=True.") from e
  params = jax.device_put(
      checkpoint.unflatten(checkpoint.model_params(target)), state_sh["params"])
  state = {**state, "params": params}
  if "ema" in state:
    state["ema"] = jax.device_put(params, state_sh["ema"])
  return state


def open_precomputed_store(config, plan: Plan):
  """The stored teacher outputs for this run, refused if they were made for another stream."""
  from deit_jax import precompute
  sha = None
  if config.teacher.checkpoint:  # verify the store was made by this teacher
    teacher = checkpoint.load_model(config.teacher.checkpoint)
    sha = distill.model_checksum(teacher)
  expected = precompute.expected_fingerprint(config, plan, sha)
  try:
    return distill.PrecomputedTeacher(config.teacher.precomputed_dir, expected, plan.total_steps)
  except distill.TeacherError as e:
    raise ConfigError(str(e)) from e


def stop_requested(local_flag: bool, step: int, every: int) -> bool:
  """A SIGTERM may reach only some hosts: they agree (at log steps) so all save and stop at the
  same step; a single process reacts at once."""
  if jax.process_count() == 1:
    return local_flag
  if step % every:
    return False
  return bool(np.max(multihost_utils.process_allgather(np.int32(local_flag))))


# ==============================================================================================
# The run.
# ==============================================================================================
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       max_steps: int | None = None) -> dict[str, Any]:
  """Trains (resuming from `workdir` if it holds checkpoints) and returns the final metrics.

  max_steps: stop after this many steps in this invocation, with a checkpoint (for time-sliced
  jobs); a later call resumes exactly where this one stopped.
  """
  # --- Mesh ----------------------------------------------------------------------------------
  num_devices = jax.device_count()
  validate_config(config, num_devices)
  mesh = sharding.make_mesh(num_devices)
  batch_sh = sharding.batch_sharding(mesh)
  rules = [tuple(r) for r in config.sharding.rules]

  # --- Input ---------------------------------------------------------------------------------
  train_source = data.build_source(config.data)
  eval_source = build_eval_source(config)
  plan = make_plan(config, num_devices, train_source.num_examples, eval_source.num_examples,
                   train_source.num_classes)

  # --- Model and sharded state -----------------------------------------------------------------
  model = build_model_state(config, plan, mesh)
  description = model.description
  state_sh, abstract_state = model.state_sh, model.abstract_state

  # --- Checkpoints: resume or start ---------------------------------------------------------
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  last_mngr, best_mngr = _managers(workdir, config)
  check_workdir_model(last_mngr, description, workdir)

  # --- Teacher (frozen; never part of the student's checkpoints) -----------------------------
  teacher = teacher_params = None
  if config.distillation.kind != "none" and config.teacher.source == "model":
    teacher = distill.load(config, mesh, rules, plan.num_classes, workdir)
    teacher_params = teacher.params
  store = None
  if config.distillation.kind != "none" and config.teacher.source == "precomputed":
    store = open_precomputed_store(config, plan)
  start = last_mngr.latest_step()
  if start is None:
    state = model.init()
    if config.init_checkpoint:
      state = init_from_checkpoint(config, state, state_sh)
    start = 0
  else:
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_state, state_sh)
    items = {checkpoint.PARAMS_ITEM: ocp.args.StandardRestore(persistent(target)),
             TRAIN_STATE_ITEM: ocp.args.StandardRestore(
                 {k: target[k] for k in ("opt_state", "step", "rng")})}
    if "ema" in target:
      items[checkpoint.EMA_ITEM] = ocp.args.StandardRestore(target["ema"])
    restored = last_mngr.restore(start, args=ocp.args.Composite(**items))
    stored = checkpoint.flatten(restored[checkpoint.PARAMS_ITEM])
    state = {part: checkpoint.unflatten({k: stored[k] for k in checkpoint.flatten(target[part])})
             for part in ("params", "batch_stats")}
    state.update(restored[TRAIN_STATE_ITEM])
    if config.ema_decay:
      state["ema"] = restored[checkpoint.EMA_ITEM]
    log(f"Resumed from {workdir} at step {start}.")
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  # --- Steps ---------------------------------------------------------------------------------
  train_step = jit_train_step(config, plan, model, mesh, teacher)
  eval_step = jax.jit(evaluation.make_eval_step(model.eval_graphdef))

  def evaluate(state) -> dict[str, float]:
    return evaluation.evaluate(eval_step, persistent(state), state.get("ema"), eval_source,
                               config, batch_sh)

  # --- Loop ----------------------------------------------------------------------------------
  preempted = {"flag": False}

  def on_sigterm(signum, frame):
    del signum, frame
    preempted["flag"] = True

  old_handler = signal.signal(signal.SIGTERM, on_sigterm)
  writer = MetricWriter(workdir, jax.process_index() == 0)
  log(f"Training {config.model} ({model.num_params:,} params) on {num_devices} "
      f"device(s), {jax.process_count()} process(es): {plan.total_steps} steps, "
      f"{plan.steps_per_epoch} per epoch, global batch {plan.global_batch}"
      f"{f' ({config.grad_accum_steps} x {plan.micro_batch})' if config.grad_accum_steps > 1 else ''}"
      f", peak lr {plan.peak_lr:.3g}.")
  it = data.train_iterator(train_source, config.aug, global_batch_size=plan.global_batch,
                           seed=config.seed, start_step=start)
  pending: list[tuple[int, dict]] = []
  last_saved = start
  best_path = os.path.join(workdir, "best.json")
  best = {"value": -math.inf, "step": None}
  if os.path.exists(best_path):
    with open(best_path) as f:
      best.update({k: v for k, v in json.load(f).items() if k in best})
  final: dict[str, Any] = {}
  t0, done_since_t0 = time.time(), 0

  def drain() -> dict[str, float]:
    """Fetches the pending step metrics; stops the run at the first non-finite loss."""
    nonlocal pending
    fetched = jax.device_get(pending)
    pending = []
    for s, m in fetched:
      if not m["finite"]:
        raise FloatingPointError(
            f"Loss is {m['loss']} at step {s} (0-based); stopping. The parameters were not "
            f"updated by that step, and the last checkpoint (step {last_saved}) in {workdir} is "
            f"intact. Lower the learning rate, enable optimizer.clip_grad, or use float32.")
    return {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[-1][1]
            if k != "finite"} if fetched else {}

  def save(step: int, mngr=None, metrics=None):
    nonlocal last_saved
    drain_metrics = drain()  # never save a state that went through a non-finite step
    (mngr or last_mngr).save(step, args=_save_args(state, description), metrics=metrics,
                             force=True)
    if mngr is None:
      last_saved = step
    return drain_metrics

  try:
    for step in range(start, plan.total_steps):
      batch = data.to_global(next(it), batch_sh)
      if store is not None:
        rows = plan.global_batch // jax.process_count()
        first = jax.process_index() * rows
        batch.update(data.to_global(store.rows(step, first, first + rows), batch_sh))
      batch.pop("step", None)
      batch.pop("index", None)
      state, metrics = train_step(state, batch, teacher_params)
      pending.append((step, metrics))
      done = step + 1
      done_since_t0 += 1
      if done % config.log_every_steps == 0 or done == plan.total_steps:
        m = drain()
        elapsed = time.time() - t0
        ips = done_since_t0 * plan.global_batch / max(elapsed, 1e-9)
        eta = (plan.total_steps - done) * elapsed / max(done_since_t0, 1)
        log(f"step {done}/{plan.total_steps} epoch {done / plan.steps_per_epoch:.2f} "
            f"loss {m['loss']:.4f} lr {m['lr']:.3e} {ips:.1f} img/s eta {_fmt_time(eta)}")
        writer.write(done, {f"train/{k}": v for k, v in m.items()} | {"train/img_per_s": ips})
        t0, done_since_t0 = time.time(), 0
      end_of_epoch = done % plan.steps_per_epoch == 0
      epoch = done // plan.steps_per_epoch
      if (end_of_epoch and epoch % config.eval_every_epochs == 0) or done == plan.total_steps:
        final = evaluate(state)
        log(f"eval at step {done} (epoch {epoch}): " + ", ".join(
            f"{k[5:]} {v:.2f}" for k, v in sorted(final.items())))
        writer.write(done, final)
        if final[config.best_metric] > best["value"]:
          save(done, best_mngr, metrics={config.best_metric: final[config.best_metric]})
          best.update(value=final[config.best_metric], step=done)
          if jax.process_index() == 0:
            with open(best_path, "w") as f:
              json.dump({"metric": config.best_metric, **best}, f)
      if done % config.checkpoint_every_steps == 0 or done == plan.total_steps:
        save(done)
      if stop_requested(preempted["flag"], done, config.log_every_steps) or (
          max_steps is not None and done - start >= max_steps):
        log(f"{'SIGTERM' if preempted['flag'] else 'max_steps'}: saving step {done} and exiting.")
        if last_saved != done:
          save(done)
        break
  finally:
    last_mngr.wait_until_finished()
    last_mngr.close()
    best_mngr.close()
    writer.close()
    signal.signal(signal.SIGTERM, old_handler)
  final = dict(final)
  final["step"] = int(jax.device_get(state["step"]))
  final["preempted"] = preempted["flag"]
  return final
