r"""python launch.py --config configs/deit_s.py

DeiT-S on ImageNet with the official DeiT recipe (deit_jax.config.zoo_config). The argument
picks the zoo model:

  (none)       deit_small_patch16_224
  distilled    deit_small_distilled_patch16_224, hard distillation from a RegNetY-16GF teacher:
                 python launch.py --config configs/deit_s.py:distilled \
                     --config.teacher.checkpoint=ckpt/regnety_160
"""
from deit_jax import config

_MODELS = {"": "deit_small_patch16_224", "distilled": "deit_small_distilled_patch16_224"}


def get_config(arg=None):
  arg = arg or ""
  if arg not in _MODELS:
    raise ValueError(f"configs/deit_s.py:{arg}: unknown argument; use none (configs/deit_s.py) "
                     "or 'distilled'.")
  return config.zoo_config(_MODELS[arg])
