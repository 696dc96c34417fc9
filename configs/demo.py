r"""python launch.py --config configs/demo.py

DeiT's idea end to end on real digits, on whatever devices exist (a CPU included): trains the
demo's CNN teacher (configs/demo_teacher.py, a RegNetY-200MF; reused when the workdir already
holds it), then the demo student with hard distillation through its distillation token
(configs/demo_distill.py:hard) and the same student without a teacher (:none), and prints the
results table (teacher; student without teacher; the distilled student's class head,
distillation head and both; each head's agreement with the teacher), also written to
<workdir>/results.md and results.json. Each run has its own folder in the workdir
(teacher/, no_distillation/, hard/), resumable like any run.

  python launch.py --config configs/demo.py --config.seeds=0,1,2    # three student seeds
  python launch.py --config configs/demo.py --config.students.hard.epochs=60
"""
import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import demo_distill  # noqa: E402
import demo_teacher  # noqa: E402


def get_config():
  c = ml_collections.ConfigDict()
  c.experiment = "demo"  # a comparison of runs: launch.py trains each, then the table
  c.seeds = (0,)  # the students' seeds; each seed trains every student once
  c.teacher = demo_teacher.get_config()  # trained in <workdir>/teacher
  c.teacher_checkpoint = ""  # or an existing teacher checkpoint to use instead of training one
  c.students = ml_collections.ConfigDict({
      "no_distillation": demo_distill.get_config("none"),
      "hard": demo_distill.get_config("hard"),
  })
  return c
