r"""python launch.py --config configs/deit3.py:base

DeiT III ("Revenge of the ViT") on ImageNet-1k with the official recipe
(deit_jax.config.deit3_config): 3-Augment, binary cross-entropy on binarized Mixup/CutMix
targets, LAMB, LayerScale, no label smoothing, no random erasing, 800 epochs; B and L train at
192 and H at 154, all evaluated at 224.

The argument is a size (small, medium, base, large, huge) and options, comma-separated:
  distilled   a distillation token and hard distillation from a CNN teacher:
                python launch.py --config configs/deit3.py:base,distilled \
                    --config.teacher.checkpoint=ckpt/regnety_160
  src         DeiT III's simple random crop instead of RandomResizedCrop
  ft224       the official 20-epoch fine-tuning at 224 of a B/L/H run at lower resolution:
                python launch.py --config configs/deit3.py:base,ft224 \
                    --config.init_checkpoint=workdirs/deit3_base/best
  ft384       the official 20-epoch fine-tuning of S at 384
"""
from deit_jax import config

_OPTIONS = ("distilled", "src", "ft224", "ft384")


def get_config(arg="base"):
  size, *options = (arg or "base").split(",")
  unknown = sorted(set(options) - set(_OPTIONS))
  if unknown or size not in config.DEIT3_RECIPES:
    raise ValueError(f"configs/deit3.py:{arg}: use a size ({', '.join(config.DEIT3_RECIPES)}) "
                     f"and options from {_OPTIONS}, e.g. configs/deit3.py:base,distilled.")
  finetune = 224 if "ft224" in options else 384 if "ft384" in options else None
  return config.deit3_config(size, distilled="distilled" in options, finetune_size=finetune,
                             simple_random_crop="src" in options)
