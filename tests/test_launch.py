"""The launcher's messages for a person's mistakes: one line, status 2, before anything heavy."""
import importlib.util
import os
import subprocess
import sys

import pytest

from deit_jax import checkpoint, models, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def launch():
  """launch.py as a module (its absl flags defined once)."""
  if "launch" not in sys.modules:
    spec = importlib.util.spec_from_file_location("launch", os.path.join(ROOT, "launch.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["launch"] = module
  return sys.modules["launch"]


def _launch(*args, cwd=ROOT):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("DEIT_JAX_TRACEBACK", None)
  return subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), *args], cwd=cwd,
                        env=env, capture_output=True, text=True, timeout=300)


def _config(name, arg=None):
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(ROOT, "configs",
                                                                            name + ".py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*([arg] if arg else []))


def test_override_messages(launch):
  c = _config("demo_distill", "none")
  assert launch.override_error(c, "batch_size") is None
  assert launch.override_error(c, "data.root") is None
  assert launch.override_error(c, "batchsize").startswith(
      "--config.batchsize: no such config field; did you mean --config.batch_size")
  assert "did you mean --config.data.source?" in launch.override_error(c, "data.sorce")
  msg = launch.override_error(c, "data", "/data/flowers")
  assert "config.data is a group of fields, not a value" in msg
  assert "--config.data.source=folder --config.data.root=/data/flowers" in msg
  assert "--config.data.path=x.npz" in launch.override_error(c, "data", "x.npz")
  assert "is a value ('digits')" in launch.override_error(c, "data.source.x")
  # An experiment's runs are groups: a typo inside one is found with its own suggestion.
  assert "did you mean --config.students.hard.epochs?" in launch.override_error(
      _config("demo"), "students.hard.epoch")


def test_config_file_messages(launch):
  assert launch.config_file_error(os.path.join(ROOT, "configs", "demo.py:x")) is None
  msg = launch.config_file_error("configs/dmeo.py")
  assert "the file configs/dmeo.py does not exist; did you mean --config" in msg
  assert "demo_teacher.py" in msg  # every config is listed
  assert launch.config_file_error(None).startswith("--config is required")


def test_teacher_message_names_the_config_that_trains_it(launch, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # no workdirs/demo_teacher here
  demo_distill = os.path.join(ROOT, "configs", "demo_distill.py")
  msg = launch.teacher_error(_config("demo_distill", "hard"), "train", demo_distill + ":hard")
  assert msg.startswith("config.teacher.checkpoint=workdirs/demo_teacher/checkpoints does not "
                        "exist")
  assert msg.endswith("Train the teacher first: python launch.py --config "
                      + os.path.join(ROOT, "configs", "demo_teacher.py"))
  assert launch.teacher_error(_config("demo_distill", "none"), "train", demo_distill) is None
  assert launch.teacher_error(_config("demo_distill", "hard"), "eval", demo_distill) is None


def test_checkpoint_step_folders_and_workdirs_resolve(tmp_path):
  model = models.create_model("deit_tiny_patch16_224", embed_dim=16, depth=1, num_heads=1,
                              num_classes=3, img_size=16, patch_size=8)
  ckpts = str(tmp_path / "run" / "checkpoints")
  checkpoint.save_model(model, ckpts, step=400)
  assert run.resolve_checkpoint(ckpts + "/400", "unused") == (ckpts, 400)
  assert run.resolve_checkpoint(ckpts, "unused", 400) == (ckpts, 400)
  assert run.resolve_checkpoint(str(tmp_path / "run"), "unused") == (ckpts, None)
  assert run.resolve_checkpoint(None, str(tmp_path / "run")) == (ckpts, None)
  with pytest.raises(checkpoint.CheckpointError, match=f"is step 400 of {ckpts}, but --step=3: "
                     f"pass --checkpoint {ckpts} --step=3"):
    run.resolve_checkpoint(ckpts + "/400", "unused", 3)
  with pytest.raises(checkpoint.CheckpointError, match="holds no checkpoint steps"):
    run.resolve_checkpoint(ckpts + "/400/params", "unused")
  with pytest.raises(checkpoint.CheckpointError, match="nothing trained there yet"):
    run.resolve_checkpoint(None, str(tmp_path / "other"))


def test_readme_python_api_snippet_runs_twice():
  with open(os.path.join(ROOT, "README.md")) as f:
    text = f.read()
  snippet = text.split("### Python API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
  for _ in range(2):
    exec(compile(snippet, "README.md", "exec"), {})  # noqa: S102


def test_launcher_mistakes_are_one_line_and_status_2(tmp_path):
  typo = _launch("--config", "configs/demo_distill.py:none", "--config.batchsize=8")
  assert (typo.returncode, typo.stderr.strip()) == (2, "error: --config.batchsize: no such config "
                                                    "field; did you mean --config.batch_size or "
                                                    "--config.eval_batch_size?")
  missing = _launch("--config", "configs/nope.py")
  assert missing.returncode == 2 and "Traceback" not in missing.stderr
  assert "the file configs/nope.py does not exist" in missing.stderr
  group = _launch("--config", "configs/demo_distill.py:none", "--config.data=/data/x")
  assert group.returncode == 2 and "config.data is a group of fields" in group.stderr
  assert _launch("--help").returncode == 0
  teacher = _launch("--config", os.path.join(ROOT, "configs", "demo_distill.py:hard"),
                    cwd=tmp_path)
  assert teacher.returncode == 2 and "Traceback" not in teacher.stderr
  assert "Train the teacher first: python launch.py --config" in teacher.stderr
  assert not os.listdir(tmp_path)  # refused before anything was written


def test_runtime_mistakes_are_one_line_and_status_2(tmp_path):
  """A checkpoint error raised inside the run (after jax is up), before any compile."""
  p = _launch("--config", "configs/demo_distill.py:none", "--mode=eval",
              "--workdir", str(tmp_path / "w"), "--checkpoint", str(tmp_path / "nope"))
  assert (p.returncode, p.stderr.strip()) == (
      2, f"error: --checkpoint {tmp_path / 'nope'}: no such directory.")
  tb = _launch("--config", "configs/demo_distill.py:none", "--mode=eval", "--traceback",
               "--checkpoint", str(tmp_path / "nope"))
  assert tb.returncode == 1 and "Traceback" in tb.stderr and "CheckpointError" in tb.stderr
