r"""python launch.py --config tests/tiny_config.py

The demo student (configs/demo_distill.py:none) shrunk for tests: 2 blocks, 16 px, batch 16, 6 steps.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs"))
import demo_distill  # noqa: E402


def get_config():
  c = demo_distill.get_config("none")
  c.model = "deit_tiny_distilled_patch16_224"  # the distillation token, trained without a teacher
  c.teacher.checkpoint = ""
  c.model_kw.update(patch_size=8, embed_dim=48, num_heads=3, depth=2, drop_path_rate=0.1)
  c.aug.auto_augment = "rand-m9-mstd0.5-inc1"
  c.aug.reprob = 0.25
  c.mixup.prob = 1.0
  c.data.image_size = 16
  c.aug.input_size = 16
  c.batch_size = 16
  c.eval_batch_size = 128
  c.total_steps = 6
  c.optimizer.lr = 5e-4
  c.optimizer.lr_base_batch = 512
  c.optimizer.warmup_epochs = 0.05
  c.ema_decay = 0.9
  c.log_every_steps = 2
  c.checkpoint_every_steps = 2
  c.eval_every_epochs = 1
  return c
