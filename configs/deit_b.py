r"""python launch.py --config configs/deit_b.py

DeiT-B on ImageNet with the official DeiT recipe (deit_jax.config.zoo_config). The argument
picks the zoo model:

  (none)         deit_base_patch16_224
  distilled      deit_base_distilled_patch16_224, hard distillation from a RegNetY-16GF teacher:
                   python launch.py --config configs/deit_b.py:distilled \
                       --config.teacher.checkpoint=ckpt/regnety_160
  384            deit_base_patch16_384, the official fine-tuning at 384 of the 224 model
                 (30 epochs, batch 512, lr 5e-6, weight decay 1e-8, eval crop 1.0):
                   python launch.py --config configs/deit_b.py:384 \
                       --config.init_checkpoint=ckpt/deit_base_patch16_224
  distilled_384  deit_base_distilled_patch16_384, the same fine-tuning with hard distillation:
                   python launch.py --config configs/deit_b.py:distilled_384 \
                       --config.teacher.checkpoint=ckpt/regnety_160 \
                       --config.init_checkpoint=ckpt/deit_base_distilled_patch16_224
"""
from deit_jax import config

_MODELS = {"": "deit_base_patch16_224", "distilled": "deit_base_distilled_patch16_224",
           "384": "deit_base_patch16_384", "distilled_384": "deit_base_distilled_patch16_384"}


def get_config(arg=None):
  arg = arg or ""
  if arg not in _MODELS:
    raise ValueError(f"configs/deit_b.py:{arg}: unknown argument; use none (configs/deit_b.py), "
                     "'distilled', '384' or 'distilled_384'.")
  return config.zoo_config(_MODELS[arg])
