r"""python launch.py --config configs/demo_teacher.py

Trains the demo's CNN teacher, a RegNetY-200MF (timm's regnety_002, the same RegNetY code as
the official RegNetY-16GF teacher), on the digits data at 32 px; its checkpoints in
workdirs/demo_teacher/checkpoints are what configs/demo_distill.py distils from.
"""
from deit_jax import config as base


def get_config():
  c = base.base_config()
  c.model = "regnety_002"
  c.data.source = "digits"
  c.data.eval_split = "test"
  c.data.num_classes = 10
  c.data.image_size = 32
  c.aug.input_size = 32
  c.aug.crop_pct = 1.0
  c.aug.scale = (0.35, 1.0)
  c.aug.hflip = 0.0  # digits are not mirror-symmetric
  c.aug.auto_augment = "rand-m5-mstd0.5-inc1"
  c.aug.reprob = 0.0
  c.aug.num_repeats = 1
  c.mixup.prob = 0.0
  c.batch_size = 64
  c.eval_batch_size = 120
  c.epochs = 15
  c.optimizer.lr = 2e-3
  c.optimizer.lr_base_batch = 64
  c.optimizer.warmup_epochs = 1.0
  c.ema_decay = 0.0
  c.log_every_steps = 50
  c.eval_every_epochs = 5
  c.checkpoint_every_steps = 200
  return c
