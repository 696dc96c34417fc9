"""The official DeiT recipe as an ml_collections config; configs/*.py start from it.

Derived values (steps per epoch, total steps, scaled learning rate) are computed by the trainer
from the final config, never frozen here, so `--config.batch_size=...` rescales them correctly.
"""

from __future__ import annotations

import ml_collections
from ml_collections import FieldReference

from deit_jax import augment, data, models


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = "deit_tiny_patch16_224"
  # DeiTConfig fields passed to the model; num_classes / img_size come from data / aug.
  c.model_kw = ml_collections.ConfigDict(
      {"drop_path_rate": 0.1, "dtype": "float32", "attention_impl": ""})

  c.data = data.default_data_config()
  c.data.source = "tfds"
  c.data.name = "imagenet2012"
  c.data.split = "train"
  c.data.eval_split = "validation"
  c.data.num_classes = 1000
  c.aug = augment.default_augment_config()
  c.aug.num_repeats = 3  # repeated augmentation; 1 turns it off
  c.mixup = ml_collections.ConfigDict({
      "mixup_alpha": 0.8, "cutmix_alpha": 1.0, "prob": 1.0, "switch_prob": 0.5,
      "cutmix_minmax": FieldReference(None, field_type=tuple),
      # Partners are paired within each device's rows (the official code pairs within each GPU).
      "per_device": True})
  c.label_smoothing = 0.1

  c.batch_size = 1024  # global
  c.eval_batch_size = 1024
  c.grad_accum_steps = 1  # the batch is split into this many microbatches inside the step
  c.epochs = 300
  c.total_steps = FieldReference(None, field_type=int)  # overrides epochs when set
  c.optimizer = ml_collections.ConfigDict({
      "lr": 5e-4, "lr_base_batch": 512,  # lr = lr x batch_size / lr_base_batch
      "warmup_epochs": 5.0, "warmup_lr": 1e-6, "min_lr": 1e-5,
      "weight_decay": 0.05, "b1": 0.9, "b2": 0.999, "eps": 1e-8,
      "decay_dist_token": True,  # the official code decays dist_token; timm does not
      "clip_grad": FieldReference(None, field_type=float)})
  c.ema_decay = 0.99996  # 0 turns the EMA off; the EMA is evaluated too

  c.distillation = ml_collections.ConfigDict({
      "kind": "none", "alpha": 0.5, "tau": 1.0, "reduction": "official"})
  c.teacher = ml_collections.ConfigDict({
      "checkpoint": "",  # Orbax dir from `python -m deit_jax.convert` or a teacher training run
      "source": "model",  # 'model': run inside the step; 'precomputed': read stored outputs
      "precomputed_dir": "",
      # --mode=precompute_teacher: logits kept per image for soft distillation (hard keeps the
      # argmax), their dtype, and how many epochs to cover (default: the whole run).
      "top_k": 10, "store_dtype": "float16",
      "precompute_epochs": FieldReference(None, field_type=int),
      "img_size": FieldReference(None, field_type=int),  # default: the student's resolution
      "mean": augment.IMAGENET_MEAN, "std": augment.IMAGENET_STD,
      # A CNN teacher's convolutions: 'xla' | 'dense' | '' (per platform: 'dense' on CPU,
      # 'xla' = cuDNN on GPU); see deit_jax.conv.
      "conv_impl": ""})

  c.init_checkpoint = ""  # start from these weights (fine-tuning); pos_embed resized
  c.init_skip_head = False  # drop head weights when fine-tuning to a new class count

  c.sharding = ml_collections.ConfigDict({"rules": [(".*", "replicate")]})
  c.seed = 0
  c.log_every_steps = 100
  c.eval_every_epochs = 1
  c.eval_head = "both"  # the head reported as eval/top1: 'both' (average), 'cls' or 'dist'
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.best_metric = "eval/top1"
  return c


def zoo_config(name: str) -> ml_collections.ConfigDict:
  """The official recipe for a zoo model on ImageNet; distilled models default to hard
  distillation from a RegNetY-16GF teacher (set --config.teacher.checkpoint)."""
  c = base_config()
  c.model = name
  cfg = models.MODELS[name]
  c.aug.input_size = cfg.img_size
  if cfg.distilled:
    c.distillation.kind = "hard"
  if cfg.img_size == 384:
    # Fine-tuning at 384 from a 224 checkpoint (set --config.init_checkpoint).
    c.aug.crop_pct = 1.0
    c.epochs = 30
    c.batch_size = c.eval_batch_size = 512
    c.optimizer.lr = 5e-6
    c.optimizer.weight_decay = 1e-8
    c.optimizer.min_lr = 5e-6
    c.optimizer.warmup_epochs = 0.0
  return c
