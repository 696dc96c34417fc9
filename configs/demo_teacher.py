r"""python launch.py --config configs/demo_teacher.py

Trains the demo's CNN teacher, a RegNetY-200MF (timm's regnety_002, the same RegNetY code as
the official RegNetY-16GF teacher), on the demo's digits at 32 px; its checkpoints in
workdirs/demo_teacher/checkpoints are what configs/demo_distill.py distils from
(`python launch.py --config configs/demo.py` trains it in workdirs/demo/teacher).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import demo_distill  # noqa: E402


def get_config():
  c = demo_distill.get_config("none")  # same data and input size as the student
  c.model = "regnety_002"
  # The convolutions the students run it with (configs/demo_distill.py: 'taps').
  c.model_kw = {"dtype": "float32", "conv_impl": c.teacher.conv_impl}
  c.teacher.checkpoint = ""  # the teacher itself has none
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
