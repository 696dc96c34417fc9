"""Configs, models, the train step and the benchmarks import without TensorFlow (a GPU machine
may lack it); the input pipeline imports it on first use."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

_NO_TF = """
import sys
sys.modules["tensorflow"] = None  # any `import tensorflow` now raises ImportError
from deit_jax import config, conv, models, run, teachers
from deit_jax import plan as plan_lib
c = config.zoo_config("deit_small_distilled_patch16_224")
c.distillation.kind = "none"
plan_lib.validate_config(c, 1)
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


# Every config file in configs/ and the arguments it takes (None: no argument). A new config file
# must be added here. configs/deit3.py is tried with every size and set of options; the
# combinations it rejects must fail with its ValueError, not an ImportError.
CONFIG_ARGS = {
    "deit_ti": [None, "distilled"],
    "deit_s": [None, "distilled"],
    "deit_b": [None, "distilled", "384", "distilled_384"],
    "deit3": "all",
    "demo": [None],
    "demo_distill": [None, "hard", "soft", "none"],
    "demo_teacher": [None],
    "finetune": [None, "new_head", "384", "new_head,demo", "384,demo"],
    "table3": [None],
}
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")

_CONFIGS_NO_TF = """
import importlib.util, itertools, json, os, sys
sys.modules["tensorflow"] = None  # any `import tensorflow` now raises ImportError
configs_dir, config_args = sys.argv[1], json.loads(sys.argv[2])
loaded = 0
for name, args in config_args.items():
  path = os.path.join(configs_dir, name + ".py")
  spec = importlib.util.spec_from_file_location("_config_" + name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)  # as ml_collections' config_flags loads a config file
  if args == "all":
    from deit_jax import config
    options = ("distilled", "src", "ft224", "ft384")
    args = [None] + [",".join((size,) + extra) for size in config.DEIT3_RECIPES
                     for n in range(len(options) + 1)
                     for extra in itertools.combinations(options, n)]
  for arg in args:
    try:
      c = module.get_config(arg) if arg is not None else module.get_config()
    except ValueError:
      assert name == "deit3", (name, arg)
      continue
    c.to_dict()
    loaded += 1
real_tf = [m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow.")]
assert sys.modules["tensorflow"] is None and real_tf == ["tensorflow"], real_tf
print("ok", loaded)
"""


def test_every_config_loads_without_tensorflow():
  files = sorted(f[:-3] for f in os.listdir(CONFIGS_DIR) if f.endswith(".py"))
  assert files == sorted(CONFIG_ARGS), "list the new config file's arguments in CONFIG_ARGS"
  out = subprocess.run([sys.executable, "-c", _CONFIGS_NO_TF, CONFIGS_DIR, json.dumps(CONFIG_ARGS)],
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and out.stdout.strip().startswith("ok"), out.stderr[-3000:]


@pytest.mark.parametrize("name,arg,model", [
    ("deit_ti", None, "deit_tiny_patch16_224"),
    ("deit_ti", "distilled", "deit_tiny_distilled_patch16_224"),
    ("deit_s", None, "deit_small_patch16_224"),
    ("deit_s", "distilled", "deit_small_distilled_patch16_224"),
    ("deit_b", None, "deit_base_patch16_224"),
    ("deit_b", "distilled", "deit_base_distilled_patch16_224"),
    ("deit_b", "384", "deit_base_patch16_384"),
    ("deit_b", "distilled_384", "deit_base_distilled_patch16_384"),
])
def test_zoo_config_files_cover_the_zoo(name, arg, model):
  from deit_jax import config
  spec = importlib.util.spec_from_file_location("_zoo_config_" + name,
                                                os.path.join(CONFIGS_DIR, name + ".py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(arg) if arg is not None else module.get_config()
  assert c.to_dict() == config.zoo_config(model).to_dict()
  with pytest.raises(ValueError, match="'distilled'"):
    module.get_config("bogus")
