r"""python launch.py --config configs/demo.py

The embedded demo: a small DeiT (distillation token included, trained without a teacher here)
trained from scratch on scikit-learn's 8x8 handwritten digits (1,797 real images, upscaled to
32 px), on whatever devices exist, a CPU included. It exercises the whole recipe (RandAugment,
repeated augmentation, Mixup/CutMix, random erasing, AdamW + cosine, EMA, checkpoints, eval);
the regularisation is dialled down because the data set is tiny.
"""
from deit_jax import config as base


def get_config():
  c = base.base_config()
  c.model = "deit_tiny_distilled_patch16_224"
  c.model_kw.update(patch_size=4, embed_dim=64, num_heads=2, depth=4, drop_path_rate=0.05)
  c.data.source = "digits"
  c.data.split = "train"
  c.data.eval_split = "test"
  c.data.num_classes = 10
  c.data.image_size = 32
  c.aug.input_size = 32
  c.aug.crop_pct = 1.0
  c.aug.scale = (0.35, 1.0)
  c.aug.hflip = 0.0  # digits are not mirror-symmetric
  c.aug.auto_augment = "rand-m5-mstd0.5-inc1"
  c.aug.reprob = 0.1
  c.mixup.prob = 0.3
  c.batch_size = 32
  c.eval_batch_size = 128
  c.epochs = 30
  c.optimizer.lr = 1e-3
  c.optimizer.lr_base_batch = 32  # peak lr 1e-3 at batch 32
  c.optimizer.warmup_epochs = 2.0
  c.ema_decay = 0.995
  c.log_every_steps = 100
  c.eval_every_epochs = 10
  c.checkpoint_every_steps = 500
  return c
