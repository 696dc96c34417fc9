r"""python launch.py --config tests/tiny_config.py

A very small DeiT on the digits data, for tests: 2 blocks, 16 px, a handful of steps.
"""
from deit_jax import config as base


def get_config():
  c = base.base_config()
  c.model = "deit_tiny_distilled_patch16_224"
  c.model_kw.update(patch_size=8, embed_dim=48, num_heads=3, depth=2)
  c.data.source = "digits"
  c.data.eval_split = "test"
  c.data.num_classes = 10
  c.data.image_size = 16
  c.aug.input_size = 16
  c.aug.crop_pct = 1.0
  c.batch_size = 16
  c.eval_batch_size = 128
  c.total_steps = 6
  c.optimizer.warmup_epochs = 0.05
  c.ema_decay = 0.9
  c.log_every_steps = 2
  c.checkpoint_every_steps = 2
  c.eval_every_epochs = 1
  return c
