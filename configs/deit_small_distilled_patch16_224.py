r"""python launch.py --config configs/deit_small_distilled_patch16_224.py \
    --config.teacher.checkpoint=ckpt/regnety_160

deit_small_distilled_patch16_224 on ImageNet with the official DeiT recipe.
"""
from deit_jax import config


def get_config():
  return config.zoo_config("deit_small_distilled_patch16_224")
