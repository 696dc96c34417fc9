r"""python launch.py --config configs/demo_distill.py:hard

The demo student (configs/demo.py: a small DeiT with a distillation token, digits at 32 px)
distilled from the demo teacher trained by configs/demo_teacher.py. The argument picks the
distillation: 'hard' (the teacher's argmax, DeiT's best), 'soft' (KL at temperature 3) or
'none' (the same student without a teacher, for comparison). Train the teacher first:

  python launch.py --config configs/demo_teacher.py
  python launch.py --config configs/demo_distill.py:hard
  python launch.py --config configs/demo_distill.py:soft
  python launch.py --config configs/demo_distill.py:none
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import demo  # noqa: E402


def get_config(kind="hard"):
  if kind not in ("hard", "soft", "none"):
    raise ValueError(f"Unknown distillation {kind!r}: use configs/demo_distill.py:hard, :soft or "
                     ":none.")
  c = demo.get_config()
  c.distillation.kind = kind
  if kind == "soft":
    c.distillation.tau = 3.0
  c.teacher.checkpoint = "workdirs/demo_teacher/checkpoints"
  return c
