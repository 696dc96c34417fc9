"""The run's plan: every check of a config that needs no data and no compilation, and the sizes
derived from the config and the data (`Plan`). Raised as `ConfigError`, before anything compiles.
"""

from __future__ import annotations

import dataclasses
import os
import re

import jax
import ml_collections

from deit_jax import checkpoint, conv, data, distill, evaluation, losses, models, sharding
from deit_jax import teachers

OPTIMIZERS = ("adamw", "lamb")
# config.model of a fine-tuning run that takes its architecture from config.init_checkpoint
# (configs/finetune.py); config.model_kw, the class count and the resolution still apply.
FROM_CHECKPOINT = "from_checkpoint"
# What a checkpoint and the model it initialises must share; the resolution, the class count,
# drop path, dtype and the attention implementation may change when fine-tuning.
ARCHITECTURE_FIELDS = ("embed_dim", "num_heads", "depth", "mlp_ratio", "patch_size", "in_chans",
                       "distilled", "qkv_bias", "no_embed_class")


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


def model_name(config) -> str:
  """config.model as messages name it."""
  if config.model == FROM_CHECKPOINT:
    return f"the model of config.init_checkpoint={config.init_checkpoint}"
  return config.model


def init_checkpoint_step(config) -> tuple[str, int | None]:
  """(checkpoint directory, step) of config.init_checkpoint: a checkpoint directory, one of its
  step folders or a training workdir, resolved as --checkpoint is; ConfigError if none."""
  from deit_jax import run  # run imports this module
  path = config.init_checkpoint
  if not os.path.isdir(path):
    raise ConfigError(f"config.init_checkpoint={path}: no such directory. Pass a checkpoint "
                      "directory (`python -m deit_jax.convert` writes one), one of its step "
                      "folders, or a training workdir.")
  try:
    return run.resolve_checkpoint(path, path)
  except checkpoint.CheckpointError as e:
    raise ConfigError(str(e).replace("--checkpoint ", "config.init_checkpoint=")) from e


def init_checkpoint_config(config) -> models.DeiTConfig:
  """The architecture config.init_checkpoint stores; ConfigError unless it is a DeiT's."""
  directory, step = init_checkpoint_step(config)
  where = f"config.init_checkpoint={config.init_checkpoint}"
  try:
    description = checkpoint.read_description(directory, step)[0]
    if description.get("family") != "deit":
      what = description.get("name") or description.get("family")
      raise ConfigError(f"{where} is not a DeiT checkpoint (it holds {what!r}): fine-tuning "
                        "starts from DeiT weights.")
    return checkpoint.deit_config(description)
  except checkpoint.CheckpointError as e:
    raise ConfigError(f"{where}: {e}") from e


def deit_config(config, *, at_eval_size: bool = False) -> models.DeiTConfig:
  """The DeiT the config trains (at its eval resolution with at_eval_size): config.model's zoo
  entry, or config.init_checkpoint's architecture for FROM_CHECKPOINT, with config.model_kw, the
  class count and the resolution applied; ConfigError if it cannot be built."""
  kw, field = model_overrides(config), "aug.input_size"
  if at_eval_size:
    kw["img_size"], field = evaluation.eval_input_size(config), "aug.eval_input_size"
  from_checkpoint = config.model == FROM_CHECKPOINT
  base = init_checkpoint_config(config) if from_checkpoint else models.MODELS[config.model]
  try:
    cfg = models.override(base, config.model, **kw)
  except ValueError as e:
    raise ConfigError(f"config.model_kw: {e}") from e
  if cfg.img_size % cfg.patch_size:
    lo, p = cfg.img_size // cfg.patch_size * cfg.patch_size, cfg.patch_size
    whose = "config.init_checkpoint's" if from_checkpoint else f"{config.model}'s"
    raise ConfigError(
        f"config.{field}={cfg.img_size} is not a multiple of patch_size={p} ({whose} patch "
        f"size): the patches must tile the image. The nearest sizes that do: "
        f"{' or '.join(str(s) for s in (lo, lo + p) if s > 0)}.")
  try:
    return cfg.validate()
  except ValueError as e:
    raise ConfigError(f"config.model_kw: {e}") from e


def _architecture(cfg: models.DeiTConfig) -> dict:
  return {**{k: getattr(cfg, k) for k in ARCHITECTURE_FIELDS},
          "layer_scale": cfg.layer_scale_init is not None}


def _check_init_checkpoint(config, cfg: models.DeiTConfig) -> None:
  """Fine-tuning: config.init_checkpoint is a DeiT of the same architecture (all but the
  resolution and the heads), and a new class count comes with fresh heads."""
  stored, where = init_checkpoint_config(config), f"config.init_checkpoint={config.init_checkpoint}"
  old, new = _architecture(stored), _architecture(cfg)
  differ = [f"{k} {old[k]} in the checkpoint, {new[k]} here" for k in old if old[k] != new[k]]
  if differ:
    raise ConfigError(
        f"{where} does not fit config.model={config.model} (with config.model_kw): "
        f"{'; '.join(differ)}. Set config.model / config.model_kw to the checkpoint's, or use "
        "configs/finetune.py, which takes the architecture from the checkpoint.")
  if stored.num_classes != cfg.num_classes and not config.init_skip_head:
    raise ConfigError(
        f"{where} has {stored.num_classes} classes but config.data.num_classes="
        f"{cfg.num_classes}: for a new class count set --config.init_skip_head=True (fresh "
        "heads; configs/finetune.py:new_head does).")


def _model_config(config):
  """The DeiT architecture the config names (None for a CNN); ConfigError if it cannot be built."""
  if config.model == FROM_CHECKPOINT and not config.init_checkpoint:
    raise ConfigError(f"config.model={FROM_CHECKPOINT!r} takes the architecture from "
                      "config.init_checkpoint: set --config.init_checkpoint=DIR.")
  if (config.model not in models.MODELS and config.model not in teachers.TEACHERS
      and config.model != FROM_CHECKPOINT):
    raise ConfigError(f"config.model={config.model!r} is not a DeiT model nor a CNN teacher; "
                      f"known: {', '.join(sorted(models.MODELS))}; teachers: "
                      f"{', '.join(sorted(teachers.TEACHERS))}; or {FROM_CHECKPOINT!r} "
                      "(config.init_checkpoint's architecture).")
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
  cfg = deit_config(config)
  if config.init_checkpoint:
    _check_init_checkpoint(config, cfg)
  return cfg


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
                        f"but {model_name(config)} has no distillation token. Use a *_distilled_* "
                        f"model or leave the option at its default.")
    if config.eval_head != "both":
      raise ConfigError(f"config.eval_head={config.eval_head!r} needs a distillation token, which "
                        f"{model_name(config)} lacks.")
  if config.eval_head not in ("both", "cls", "dist"):
    raise ConfigError(f"config.eval_head={config.eval_head!r}; use 'both', 'cls' or 'dist'.")
  if cfg is not None and evaluation.eval_input_size(config) != cfg.img_size:
    deit_config(config, at_eval_size=True)


def validate_config(config, num_devices: int, *, teacher_pending: bool = False) -> None:
  """Every check that needs no data and no compilation. teacher_pending: the teacher checkpoint
  is written by an earlier run of the same experiment, so it need not exist yet."""
  if not config.data.num_classes:
    raise ConfigError("config.data.num_classes must be set (e.g. 1000 for ImageNet).")
  cfg = _model_config(config)
  _check_batches(config, num_devices)
  dist = config.distillation
  try:
    losses.check(dist.kind, dist.reduction, dist.alpha, config.get("loss", "ce"))
  except ValueError as e:
    raise ConfigError(str(e)) from e
  if dist.kind != "none":
    try:
      distill.validate_teacher_config(config.teacher, dist.kind, must_exist=not teacher_pending)
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


def _zoo_name(cfg: models.DeiTConfig) -> str | None:
  """The zoo model of this architecture (`_architecture`; of its resolution if one is)."""
  names = [n for n, c in models.MODELS.items() if _architecture(c) == _architecture(cfg)]
  return next((n for n in names if models.MODELS[n].img_size == cfg.img_size),
              names[0] if names else None)


def check_eval_checkpoint(config, description: dict, where: str) -> int:
  """--mode=eval: refuses (ConfigError) a checkpoint of another model than the config's (a DeiT
  of another architecture, `ARCHITECTURE_FIELDS` and LayerScale; another CNN; a DeiT for a CNN
  config or the other way round; the resolution and the class count may differ) or of another
  class count than config.data.num_classes. Returns the checkpoint's class count."""
  is_deit = description.get("family") == "deit"
  stored = checkpoint.deit_config(description) if is_deit else None
  if is_deit:
    arch = _architecture(stored)
    what = _zoo_name(stored) or "a DeiT (" + ", ".join(f"{k} {v}" for k, v in arch.items()) + ")"
  else:
    what = description.get("name") or str(description.get("family"))
  hint = (f"--config.model={what}" if (not is_deit or what in models.MODELS)
          else "config.model / config.model_kw set to its architecture")
  refuse = lambda why: ConfigError(
      f"--checkpoint {where} holds {what}, but --config is for {model_name(config)}: {why}. "
      f"Evaluate it with a config of that model ({hint}).")  # hint: read when raised
  if is_deit and is_cnn(config):
    raise refuse("a DeiT checkpoint for a CNN config")
  if not is_deit and not is_cnn(config):
    raise refuse("a CNN checkpoint for a DeiT config")
  if not is_deit and config.model != what:
    raise refuse("another CNN")
  if is_deit and config.model != FROM_CHECKPOINT:
    probe = ml_collections.ConfigDict(config.to_dict())
    probe.aug.input_size, probe.data.num_classes = stored.img_size, stored.num_classes
    mine = _architecture(deit_config(probe))
    differ = [f"{k} {mine[k]} here, {arch[k]} in the checkpoint" for k in arch
              if arch[k] != mine[k]]
    if differ and what not in models.MODELS:
      hint = "e.g. " + " ".join(f"--config.model_kw.{k}={arch[k]}" for k in arch
                                if arch[k] != mine[k] and k in ARCHITECTURE_FIELDS)
    if differ:
      raise refuse("; ".join(differ))
  num_classes = stored.num_classes if is_deit else int(description["num_classes"])
  check_eval_classes(config.data.num_classes, num_classes, where, "config.data.num_classes")
  return num_classes


def check_eval_classes(data_classes: int | None, num_classes: int, where: str, what: str):
  """ConfigError unless the eval data (`what`: where its count comes from) has the checkpoint's
  class count."""
  if data_classes is None or int(data_classes) == num_classes:
    return
  raise ConfigError(
      f"--checkpoint {where} predicts {num_classes} classes but the eval data ({what}) has "
      f"{data_classes}. Evaluate it on a dataset of {num_classes} classes (--config.data.* with "
      f"--config.data.num_classes={num_classes}), or fine-tune it to {data_classes} classes "
      f"first (--config.init_checkpoint={where} --config.init_skip_head=True).")


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
