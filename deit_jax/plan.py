"""The run's plan: every check of a config that needs no data and no compilation, and the sizes
derived from the config and the data (`Plan`). Raised as `ConfigError`, before anything compiles.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import ml_collections

from deit_jax import conv, data, distill, evaluation, losses, models, sharding, teachers

OPTIMIZERS = ("adamw", "lamb")


class ConfigError(ValueError):
  """The config cannot run: raised before anything is compiled."""


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


def is_cnn(config) -> bool:
  """CNN teachers train with the same launcher (plain supervised, no distillation)."""
  return config.model in teachers.TEACHERS


def model_overrides(config) -> dict:
  kw = {k: v for k, v in config.model_kw.items()}
  if kw.get("attention_impl") == "":
    kw["attention_impl"] = None
  return {**kw, "num_classes": config.data.num_classes, "img_size": config.aug.input_size}


def _model_config(config):
  """The DeiT architecture the config names (None for a CNN); ConfigError if it cannot be built."""
  if config.model not in models.MODELS and config.model not in teachers.TEACHERS:
    raise ConfigError(f"config.model={config.model!r} is not a DeiT model nor a CNN teacher; "
                      f"known: {', '.join(sorted(models.MODELS))}; teachers: "
                      f"{', '.join(sorted(teachers.TEACHERS))}.")
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
    return None
  try:
    return models.model_config(config.model, **model_overrides(config))
  except ValueError as e:
    raise ConfigError(f"config.model_kw: {e}") from e


def _check_batches(config, num_devices: int) -> None:
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


def _check_heads(config, cfg) -> None:
  """Distillation-token options on a model without one; the eval resolution."""
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


def validate_config(config, num_devices: int) -> None:
  """Every check that needs no data and no compilation."""
  cfg = _model_config(config)
  if not config.data.num_classes:
    raise ConfigError("config.data.num_classes must be set (e.g. 1000 for ImageNet).")
  _check_batches(config, num_devices)
  dist = config.distillation
  try:
    losses.check(dist.kind, dist.reduction, dist.alpha, config.get("loss", "ce"))
  except ValueError as e:
    raise ConfigError(str(e)) from e
  if dist.kind != "none":
    try:
      distill.validate_teacher_config(config.teacher, dist.kind)
    except distill.TeacherError as e:
      raise ConfigError(str(e)) from e
  _check_heads(config, cfg)
  if config.optimizer.get("name", "adamw") not in OPTIMIZERS:
    raise ConfigError(f"config.optimizer.name={config.optimizer.name!r}; use one of "
                      f"{OPTIMIZERS}.")
  try:
    sharding.validate_rules(config.sharding.rules)
  except (ValueError, re.error) as e:
    raise ConfigError(f"config.sharding.rules: {e}") from e
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


def synthetic_plan(config, num_devices: int, *, num_train: int = 1_281_167) -> Plan:
  """The plan of a run on `num_train` examples that are not read (benchmarks on random data):
  the config's schedule, batch and class count, ImageNet's size by default."""
  return make_plan(config, num_devices, num_train, 0, config.data.num_classes)
