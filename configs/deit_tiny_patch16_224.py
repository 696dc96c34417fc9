r"""python launch.py --config configs/deit_tiny_patch16_224.py

deit_tiny_patch16_224 on ImageNet with the official DeiT recipe.
"""
from deit_jax import config


def get_config():
  return config.zoo_config("deit_tiny_patch16_224")
