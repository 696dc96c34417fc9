"""The train step and the state it carries: optimizer and schedule (optax), the sharded model
state (graph split from a pytree of string-keyed parameters), fine-tuning init, and the jitted
step, a pure function (state, batch, teacher params) -> (state, metrics)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from deit_jax import checkpoint, compile_options, distill, evaluation, mixup, models
from deit_jax import sharding, teachers, trees
from deit_jax.plan import ConfigError, Plan, deit_config, init_checkpoint_step, is_cnn
from deit_jax.plan import model_name


def str_keys(state) -> dict:
  """nnx.State -> a plain nested dict with string keys: what the step, optax and Orbax carry
  (nnx.merge accepts it back)."""
  return checkpoint.unflatten(checkpoint.flatten(nnx.to_pure_dict(state)))


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
    name = trees.path_str(path)
    return leaf.ndim > 1 and name not in skip
  return jax.tree_util.tree_map_with_path(mask, params)


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


def make_loss_fn(graphdef, distillation: distill.Distillation) -> Callable:
  """The trained objective: `loss_fn(params, batch_stats, images, targets, teacher_logits, key)
  -> (loss, (terms, new_batch_stats))`, the model's `heads()` into the run's distillation loss."""

  def loss_fn(params, batch_stats, images, targets, teacher_logits, key):
    model = nnx.merge(graphdef, params, batch_stats)
    terms = distillation.loss(model.heads(images, rngs=key), targets, teacher_logits)
    return terms["loss"], (terms, str_keys(nnx.state(model, nnx.BatchStat)))

  return loss_fn


def make_train_step(config, plan: Plan, graphdef, tx, schedule,
                    distillation: distill.Distillation) -> Callable:
  k = config.grad_accum_steps
  grad_fn = jax.value_and_grad(make_loss_fn(graphdef, distillation), has_aux=True)

  def step(state, batch, teacher_params):
    params, stats = state["params"], state["batch_stats"]
    mix_key, drop_key = step_keys(state["rng"], state["step"])
    images, targets = mix_batch(config, plan, mix_key, batch["image"], batch["label"])
    # The teacher sees exactly the student's augmented, mixed images.
    teacher_logits = distillation.teacher_logits(teacher_params, images, batch)
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
    # naming the step and what was non-finite (loss, gradient or update).
    grad_norm = optax.tree.norm(grads)
    loss_ok, grads_ok = jnp.isfinite(loss), jnp.isfinite(grad_norm)
    update_ok = jnp.isfinite(optax.tree.norm(updates))
    finite = loss_ok & update_ok
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = {**state, "params": keep(new_params, params), "batch_stats": keep(new_stats, stats),
                 "opt_state": keep(opt_state, state["opt_state"]), "step": state["step"] + 1}
    if "ema" in state:
      new_state["ema"] = optax.incremental_update(persistent(new_state), state["ema"],
                                                  1.0 - config.ema_decay)
    metrics = {"loss": loss, "base_loss": terms["base"], "distill_loss": terms["distill"],
               "lr": schedule(state["step"]), "grad_norm": grad_norm, "finite": finite,
               "finite_loss": loss_ok, "finite_grads": grads_ok, "finite_update": update_ok}
    return new_state, metrics

  return step


def persistent(state) -> dict:
  """What a model checkpoint holds: parameters plus BatchNorm statistics (CNNs)."""
  return checkpoint.merge_trees(state["params"], state["batch_stats"])


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
  cfg = deit_config(config)
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
    cfg = deit_config(config, at_eval_size=True)
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
                    init=compile_options.jit(init, out_shardings=state_sh),
                    num_params=models.count_params(abstract))


def jit_train_step(config, plan: Plan, model: ModelState, mesh,
                   distillation: distill.Distillation | None = None):
  """(state, batch, teacher_params) -> (state, metrics); the state's buffers are donated.
  `distillation` may be left out only for a config without distillation."""
  if distillation is None:
    if config.distillation.kind != "none":
      raise ValueError(f"distillation.kind={config.distillation.kind!r} needs a Distillation "
                       "(distill.Distillation.from_config).")
    distillation = distill.Distillation(config, num_classes=plan.num_classes, source="none")
  step = make_train_step(config, plan, model.graphdef, model.tx, model.schedule, distillation)
  return compile_options.jit(
      step, in_shardings=(model.state_sh, sharding.batch_sharding(mesh), distillation.shardings),
      out_shardings=(model.state_sh, sharding.replicated(mesh)), donate_argnums=(0,))


def init_from_checkpoint(config, state, state_sh):
  """Fine-tuning: the weights of `config.init_checkpoint` (a checkpoint directory, one of its
  step folders or a training workdir; its parameters, not its EMA), position embeddings resized
  to this resolution, the heads fresh with `init_skip_head` (a new class count). Optimizer state
  and step start fresh; the EMA starts from the loaded weights."""
  directory, at_step = init_checkpoint_step(config)
  source = checkpoint.load_model(directory, step=at_step)
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
    raise ConfigError(f"config.init_checkpoint does not fit {model_name(config)}: {e}\nFor a "
                      "new class count set --config.init_skip_head=True.") from e
  params = jax.device_put(
      checkpoint.unflatten(checkpoint.model_params(target)), state_sh["params"])
  state = {**state, "params": params}
  if "ema" in state:
    # A copy: the step donates params and ema, which must not share buffers.
    state["ema"] = jax.device_put(persistent(state), state_sh["ema"], may_alias=False)
  return state
