r"""python launch.py --config configs/deit_base_patch16_384.py \
    --config.init_checkpoint=ckpt/deit_base_patch16_224

deit_base_patch16_384 fine-tuned at 384 from the 224 model (official fine-tune recipe:
30 epochs, lr 5e-6, weight decay 1e-8).
"""
from deit_jax import config


def get_config():
  return config.zoo_config("deit_base_patch16_384")
