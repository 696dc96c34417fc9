r"""python launch.py --config configs/deit_b.py

DeiT-B at 224 on ImageNet, official recipe. The distilled twin:

  python launch.py --config configs/deit_b.py:distilled --config.teacher.checkpoint=ckpt/regnety_160
"""
from deit_jax import config


def get_config(arg=None):
  if arg not in (None, "", "distilled"):
    raise ValueError(f"Unknown argument {arg!r}: use configs/deit_b.py or configs/deit_b.py:distilled.")
  return config.zoo_config("deit_base_" + ("distilled_" if arg else "") + "patch16_224")
