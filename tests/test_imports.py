"""Configs, models, the train step and the benchmarks import without TensorFlow (a GPU machine
may lack it); the input pipeline imports it on first use."""

import subprocess
import sys

_NO_TF = """
import sys
sys.modules["tensorflow"] = None  # any `import tensorflow` now raises ImportError
from deit_jax import config, conv, models, run, teachers, train
c = config.zoo_config("deit_small_distilled_patch16_224")
c.distillation.kind = "none"
train.validate_config(c, 1)
models.create_model("deit_tiny_patch16_224", depth=1)
from deit_jax import data
try:
  data.tf.data
except ImportError as e:
  assert "needs TensorFlow" in str(e), e
  print("ok")
"""


def test_no_tensorflow_needed_outside_the_input_pipeline():
  out = subprocess.run([sys.executable, "-c", _NO_TF], capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
