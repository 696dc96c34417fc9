r"""deit_base_patch16_384 on ImageNet with the official DeiT recipe.

  python launch.py --config configs/deit_base_patch16_384.py \
    --config.init_checkpoint=ckpt/deit_base_patch16_224
"""
from deit_jax import config


def get_config():
  return config.zoo_config("deit_base_patch16_384")
