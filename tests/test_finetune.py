"""Fine-tuning (configs/finetune.py) at tiny scale: a new data set with fresh heads, 32 -> 48 px
(the position grid resized), distillation during fine-tuning, and the bad inputs, each refused
by the config check before anything is compiled or written."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from deit_jax import checkpoint, data, distill, models, sharding, step, train
from deit_jax import plan as plan_lib

sys.path.insert(0, os.path.dirname(__file__))
import tiny_config  # noqa: E402  (puts configs/ on sys.path)
import finetune  # noqa: E402
from test_distill import tiny_teacher  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """A workdir holding step 2 of tests/tiny_config.py's DeiT at 32 px (4 x 4 patches of 8 px),
  10 classes, randomly initialised (training it would only cost time: the demo-scale commands
  of the README fine-tune a trained one)."""
  workdir = str(tmp_path_factory.mktemp("source") / "run")
  c = tiny_config.get_config()
  c.data.image_size = c.aug.input_size = 32
  checkpoint.save_model(step.model_constructor(c)(), os.path.join(workdir, "checkpoints"), step=2)
  return workdir


@pytest.fixture(scope="module")
def source_params(source):
  return checkpoint.model_params(checkpoint.load_model(os.path.join(source, "checkpoints")))


def ft_config(arg, init, **overrides):
  """configs/finetune.py:<arg>,demo from `init`, 2 steps at batch 16."""
  c = finetune.get_config(arg + ",demo")
  c.init_checkpoint = init
  c.batch_size, c.total_steps = 16, 2
  c.update_from_flattened_dict(overrides)
  return c


def start(c, num_devices=1):
  """(plan, mesh, model, the run's initial state) as the trainer makes them; no data read."""
  plan_lib.validate_config(c, num_devices)
  plan = plan_lib.make_plan(c, num_devices, 64, 64, c.data.num_classes)
  mesh = sharding.make_mesh(num_devices)
  model = step.build_model_state(c, plan, mesh)
  return plan, mesh, model, step.init_from_checkpoint(c, model.init(), model.state_sh)


def _is_head(key):
  return key.split("/")[0] in ("head", "head_dist")


def test_new_head_keeps_the_trunk_and_starts_fresh_heads(source, source_params):
  c = ft_config("new_head", source, **{"data.num_classes": 4})  # a workdir
  _, _, model, state = start(c)
  state, fresh = jax.device_get(state), jax.device_get(model.init())
  params, fresh = checkpoint.flatten(state["params"]), checkpoint.flatten(fresh["params"])
  assert params.keys() == source_params.keys()
  for k, v in params.items():
    if _is_head(k):  # the new class count's heads, as a fresh init draws them
      assert v.shape[-1] == 4, k
      np.testing.assert_array_equal(v, fresh[k], err_msg=k)
    else:  # the trunk (and pos_embed: same resolution) as stored
      np.testing.assert_array_equal(v, source_params[k], err_msg=k)
  assert params["head/kernel"].shape == (48, 4)
  for k, v in checkpoint.flatten(state["ema"]).items():
    np.testing.assert_array_equal(v, params[k], err_msg=k)
  assert int(state["step"]) == 0


def test_32_to_48_resizes_the_position_grid(source, source_params):
  c = ft_config("384", os.path.join(source, "checkpoints"))
  assert c.aug.input_size == 48 and not c.init_skip_head
  params = checkpoint.flatten(jax.device_get(start(c)[3]["params"]))
  assert params["pos_embed"].shape == (1, 2 + 6 * 6, 48)  # cls, dist, 6 x 6 patches
  assert source_params["pos_embed"].shape == (1, 2 + 4 * 4, 48)
  np.testing.assert_allclose(params["pos_embed"],
                             models.resize_pos_embed(source_params["pos_embed"], 2, 6), atol=1e-7)
  for k, v in params.items():
    if k != "pos_embed":  # the heads too: same data set
      np.testing.assert_array_equal(v, source_params[k], err_msg=k)


def test_a_hard_distillation_step_from_the_fine_tuning_init(source, tmp_path):
  """Distillation is allowed while fine-tuning: one jitted step, whose state is donated (the
  loaded parameters and the EMA must not share buffers), from a step folder."""
  teacher = checkpoint.save_model(tiny_teacher(), str(tmp_path / "teacher"))
  c = ft_config("new_head", os.path.join(source, "checkpoints", "2"),
                **{"distillation.kind": "hard", "teacher.checkpoint": teacher,
                   "eval_head": "both"})
  assert c.model == plan_lib.FROM_CHECKPOINT
  plan, mesh, model, state = start(c)
  dist = distill.Distillation.from_config(c, plan, mesh, str(tmp_path / "run"))
  rng = np.random.default_rng(0)
  batch = data.to_global({"image": rng.normal(size=(16, 32, 32, 3)).astype(np.float32),
                          "label": rng.integers(0, 10, 16).astype(np.int32)},
                         sharding.batch_sharding(mesh))
  state, metrics = step.jit_train_step(c, plan, model, mesh, dist)(state, batch, dist.params)
  metrics = jax.device_get(metrics)
  assert metrics["finite"] and metrics["distill_loss"] > 0 and int(state["step"]) == 1


def _bad(kind, source, tmp):
  """(config, the message expected) of each bad input."""
  if kind == "patch_does_not_divide":
    return (ft_config("384", source, **{"aug.input_size": 50}),
            r"config.aug.input_size=50 is not a multiple of patch_size=8 .* 48 or 56\.")
  if kind == "missing":
    return ft_config("new_head", str(tmp / "nowhere")), "nowhere: no such directory"
  if kind == "no_steps":
    os.makedirs(tmp / "empty")
    return ft_config("new_head", str(tmp / "empty")), "empty holds no checkpoint steps"
  if kind == "not_deit":
    path = checkpoint.save_model(tiny_teacher(), str(tmp / "teacher"))
    return ft_config("new_head", path), "is not a DeiT checkpoint"
  if kind == "classes_without_skip_head":
    return (ft_config("384", source, **{"data.num_classes": 5}),
            r"has 10 classes but config.data.num_classes=5: .*--config.init_skip_head=True")
  if kind == "from_checkpoint_without_one":
    return ft_config("new_head", ""), "set --config.init_checkpoint=DIR"
  c = tiny_config.get_config()  # config.model named: its architecture must be the checkpoint's
  c.init_checkpoint = source
  if kind == "patch_size_differs":
    c.model_kw.patch_size = 4
    return c, "patch_size 8 in the checkpoint, 4 here.*configs/finetune.py"
  c.model_kw.update(embed_dim=96, num_heads=3)
  return c, "embed_dim 48 in the checkpoint, 96 here"


@pytest.mark.parametrize("kind", [
    "patch_does_not_divide", "missing", "no_steps", "not_deit", "classes_without_skip_head",
    "from_checkpoint_without_one", "patch_size_differs", "width_differs"])
def test_bad_inputs_are_refused_before_anything_is_written(source, tmp_path, kind):
  c, message = _bad(kind, source, tmp_path)
  workdir = tmp_path / "run"
  with pytest.raises(plan_lib.ConfigError, match=message):
    train.train_and_evaluate(c, str(workdir))
  assert not workdir.exists()


def test_launcher_prints_one_line(source, tmp_path):
  workdir = tmp_path / "run"
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch.py"), "--config",
       os.path.join(ROOT, "configs", "finetune.py:384,demo"),
       f"--config.init_checkpoint={source}", "--config.aug.input_size=50",
       f"--workdir={workdir}"], env={**os.environ, "JAX_PLATFORMS": "cpu"},
      capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "input_size=50 is not a multiple of patch_size=8" in errors[0]
  assert not workdir.exists()
