r"""python launch.py --config configs/demo_distill.py:hard

The demo student: a small DeiT (4 blocks, width 64, 4x4 patches) trained from scratch on
scikit-learn's 8x8 handwritten digits (1,797 real images, upscaled to 32 px) with the whole
recipe (RandAugment, repeated augmentation, Mixup/CutMix, random erasing, AdamW + cosine, EMA),
the regularisation dialled down because the data set is tiny. The argument picks the
distillation from the demo teacher (configs/demo_teacher.py):

  hard   a distillation token, trained on the teacher's argmax (DeiT's best)
  soft   a distillation token, KL to the teacher at temperature 3
  none   the same student without a teacher: no distillation token (the paper's baseline)

`python launch.py --config configs/demo.py` runs the teacher, :none and :hard one after the other
and prints the comparison; train the teacher first to run one of these alone:

  python launch.py --config configs/demo_teacher.py
  python launch.py --config configs/demo_distill.py:hard
"""

from deit_jax import config as base

KINDS = ("hard", "soft", "none")


def get_config(kind="hard"):
  if kind not in KINDS:
    raise ValueError(f"Unknown distillation {kind!r}: use configs/demo_distill.py:hard, :soft or "
                     ":none.")
  c = base.base_config()
  c.model = ("deit_tiny_patch16_224" if kind == "none" else "deit_tiny_distilled_patch16_224")
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
  c.distillation.kind = kind
  if kind == "soft":
    c.distillation.tau = 3.0
  # A plain student has no teacher in its loss; its eval still compares with this teacher.
  # (`configs/demo.py` points it at the teacher it trains in its own workdir.)
  c.teacher.checkpoint = "workdirs/demo_teacher/checkpoints"
  # The teacher's convolutions, also what configs/demo_teacher.py trains it with: 'taps' compiles
  # its ~400 grouped convolutions of 8 channels per group in seconds, not a minute; in runs this
  # short that beats 'dense''s faster steps (deit_jax.conv).
  c.teacher.conv_impl = "taps"
  return c
