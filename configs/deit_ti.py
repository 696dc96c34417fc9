r"""python launch.py --config configs/deit_ti.py

DeiT-Ti on ImageNet with the official DeiT recipe (deit_jax.config.zoo_config). The argument
picks the zoo model:

  (none)       deit_tiny_patch16_224
  distilled    deit_tiny_distilled_patch16_224, hard distillation from a RegNetY-16GF teacher:
                 python launch.py --config configs/deit_ti.py:distilled \
                     --config.teacher.checkpoint=ckpt/regnety_160
"""
from deit_jax import config

_MODELS = {"": "deit_tiny_patch16_224", "distilled": "deit_tiny_distilled_patch16_224"}


def get_config(arg=None):
  arg = arg or ""
  if arg not in _MODELS:
    raise ValueError(f"configs/deit_ti.py:{arg}: unknown argument; use none (configs/deit_ti.py) "
                     "or 'distilled'.")
  return config.zoo_config(_MODELS[arg])
