"""The official DeiT recipe as an ml_collections config; configs/*.py start from it.

Derived values (steps per epoch, total steps, scaled learning rate) are computed by the trainer
from the final config, never frozen here, so `--config.batch_size=...` rescales them correctly.
"""

from __future__ import annotations

import ml_collections
from ml_collections import FieldReference

from deit_jax import augment, data, image_ops, models


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
  # The base loss of the class head: 'ce' (softmax cross-entropy, DeiT) or 'bce' (sigmoid binary
  # cross-entropy, DeiT III), whose mixed targets are first binarized at this threshold
  # (DeiT III: 0.0, i.e. every mixed-in class is a positive; None keeps the soft targets).
  c.loss = "ce"
  c.bce_target_threshold = FieldReference(None, field_type=float)

  c.batch_size = 1024  # global
  c.eval_batch_size = 1024
  c.grad_accum_steps = 1  # the batch is split into this many microbatches inside the step
  c.epochs = 300
  c.total_steps = FieldReference(None, field_type=int)  # overrides epochs when set
  c.optimizer = ml_collections.ConfigDict({
      "name": "adamw",  # or 'lamb' (DeiT III; see step.lamb)
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
      "mean": image_ops.IMAGENET_MEAN, "std": image_ops.IMAGENET_STD,
      # A CNN teacher's convolutions: 'xla' | 'dense' | 'taps' | '' (per platform: 'dense' on
      # CPU, 'xla' = cuDNN on GPU); see deit_jax.conv.
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
  # Resuming a workdir with a config that differs in what the run's exactness depends on (seed,
  # batch, schedule, data, ...) is refused unless True; the change is logged in
  # <workdir>/config_changes.jsonl (see README, Reliability).
  c.allow_config_change = False
  return c


def zoo_config(name: str) -> ml_collections.ConfigDict:
  """The official recipe for a zoo model on ImageNet; distilled models default to hard
  distillation from a RegNetY-16GF teacher (set --config.teacher.checkpoint). DeiT III models
  get `deit3_config`."""
  if name.startswith("deit3_"):
    # The 384 models are the official fine-tuning at 384 of the 224 ones.
    res = models.MODELS[name].img_size
    c = deit3_config(name.split("_")[1], finetune_size=res if res != 224 else None)
    c.model = name
    return c
  c = base_config()
  c.model = name
  cfg = models.MODELS[name]
  c.aug.input_size = cfg.img_size
  if cfg.distilled:
    c.distillation.kind = "hard"
  if cfg.img_size == 384:
    finetune_at_384(c)  # set --config.init_checkpoint to the 224 checkpoint
  return c


def finetune_at_384(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The official fine-tuning at 384 of a 224 model, on the same data: 30 epochs, batch 512,
  lr 5e-6 (constant: min lr 5e-6, no warmup), weight decay 1e-8, eval crop 1.0."""
  c.aug.input_size = 384
  c.aug.crop_pct = 1.0
  c.epochs = 30
  c.batch_size = c.eval_batch_size = 512
  c.optimizer.lr = 5e-6
  c.optimizer.weight_decay = 1e-8
  c.optimizer.min_lr = 5e-6
  c.optimizer.warmup_epochs = 0.0
  return c


# DeiT III on ImageNet-1k, from the official commands (facebookresearch/deit README_revenge.md):
# size: (zoo model, train resolution, lr, drop path). Every command uses 2048 images per batch
# (e.g. 256 per GPU x 8 GPUs), `--unscale-lr` (lr used as given), LAMB, 800 epochs.
DEIT3_RECIPES = {
    "small": ("deit3_small_patch16_224", 224, 4e-3, 0.05),
    # No official command for M; S's, with a drop path between S's and B's (not verified).
    "medium": ("deit3_medium_patch16_224", 224, 4e-3, 0.1),
    "base": ("deit3_base_patch16_224", 192, 3e-3, 0.2),
    "large": ("deit3_large_patch16_224", 192, 3e-3, 0.45),
    # The official H trains at 160, which patch 14 does not divide (PyTorch's conv drops the
    # last 6 px); here 154 = 11 x 14, the same 11 x 11 grid.
    "huge": ("deit3_huge_patch14_224", 154, 3e-3, 0.6),
}
# The official 20-epoch fine-tuning (batch 512) at 224 of the B, L, H models trained at lower
# resolution, and at 384 of S: drop path. The README has no fine-tuning command for M, nor for
# B and L at 384 (their 224 values are used for those).
DEIT3_FINETUNE_DROP_PATH = {"small": 0.0, "base": 0.2, "large": 0.45, "huge": 0.55}


def deit3_config(size: str, *, distilled: bool = False, finetune_size: int | None = None,
                 simple_random_crop: bool = False) -> ml_collections.ConfigDict:
  """DeiT III ("Revenge of the ViT") on ImageNet-1k, as the official commands train it.

  3-Augment (one of grayscale / solarize / blur, color jitter 0.3, flip), binary cross-entropy on
  binarized Mixup/CutMix targets, LAMB (lr 3e-3 / 4e-3 at batch 2048, wd 0.05, FusedLAMB's
  gradient clipping at 1), warmup 5 epochs from 1e-6, cosine to 1e-5, no label smoothing, no
  random erasing, repeated augmentation, LayerScale (init 1e-4) with the same drop-path rate in
  every block, EMA as in DeiT, 800 epochs. B and L train at 192 and H at 154 (see DEIT3_RECIPES),
  and are evaluated at 224 (the position grid resized for the eval model).

  distilled: adds a distillation token and DeiT's hard distillation from a CNN teacher (set
    --config.teacher.checkpoint); the base term stays BCE, as the official DistillationLoss
    wraps whichever criterion is chosen.
  finetune_size: the official 20-epoch fine-tuning at this resolution (224 for B/L/H trained
    lower, 384 for S; set --config.init_checkpoint): AdamW lr 1e-5 at batch 512, wd 0.1, label
    smoothing 0.1 with softmax CE, RandAugment instead of 3-Augment, no repeated augmentation.
  simple_random_crop: DeiT III's simple random crop (`--src`) instead of RandomResizedCrop. The
    official ImageNet-1k commands keep RandomResizedCrop; its ImageNet-21k ones use `--src`.

  Official values not in the README commands are main.py's defaults (min lr 1e-5, eps 1e-8,
  eval crop 0.875, EMA 0.99996, mixup prob 1 / switch 0.5).
  """
  if size not in DEIT3_RECIPES:
    raise ValueError(f"Unknown DeiT III size {size!r}; use one of {', '.join(DEIT3_RECIPES)}.")
  name, train_size, lr, drop_path = DEIT3_RECIPES[size]
  c = base_config()
  c.model = name
  c.model_kw.drop_path_rate = drop_path
  if distilled:
    c.model_kw.distilled = True
    c.distillation.kind = "hard"
  c.aug.input_size = train_size
  if train_size != 224:
    c.aug.eval_input_size = 224
  c.aug.three_augment = True
  c.aug.auto_augment = ""
  c.aug.color_jitter = 0.3
  c.aug.reprob = 0.0
  c.aug.simple_random_crop = simple_random_crop
  c.label_smoothing = 0.0
  c.loss = "bce"
  c.bce_target_threshold = 0.0  # official engine.py: targets = targets.gt(0.0)
  c.batch_size = c.eval_batch_size = 2048
  c.epochs = 800
  c.optimizer.update(name="lamb", lr=lr, lr_base_batch=2048, weight_decay=0.05,
                     warmup_epochs=5.0, warmup_lr=1e-6, min_lr=1e-5, clip_grad=1.0)
  if finetune_size:
    if size not in DEIT3_FINETUNE_DROP_PATH:
      raise ValueError(f"The README has no fine-tuning recipe for DeiT III {size}; known for "
                       f"{', '.join(DEIT3_FINETUNE_DROP_PATH)}.")
    if finetune_size not in (224, 384) or (finetune_size, train_size) == (224, 224):
      raise ValueError(f"finetune_size={finetune_size}: use 224 (B/L/H, trained lower) or 384.")
    if finetune_size == 384:
      c.model = name.replace("_224", "_384")
      if c.model not in models.MODELS:
        raise ValueError(f"timm has no DeiT III {size} at 384.")
    c.model_kw.drop_path_rate = DEIT3_FINETUNE_DROP_PATH[size]
    c.aug.input_size = finetune_size
    c.aug.eval_input_size = None
    c.aug.three_augment = False
    c.aug.auto_augment = "rand-m9-mstd0.5-inc1"
    c.aug.num_repeats = 1
    c.label_smoothing = 0.1
    c.loss = "ce"
    c.bce_target_threshold = None
    c.epochs = 20
    c.batch_size = c.eval_batch_size = 512
    # min_lr = lr: after warmup the official schedule stays at 1e-5.
    c.optimizer.update(name="adamw", lr=1e-5, lr_base_batch=512, weight_decay=0.1,
                       clip_grad=None)
  return c
