"""The eval step on a model with fewer classes than top-5 needs; --mode=eval of a (converted)
checkpoint on ImageNet (mocked) with a teacher; checkpoints that do not fit the config."""
import dataclasses
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deit_jax import checkpoint, config as config_lib, data, evaluation, models, plan, run


def test_top5_is_clipped_to_the_class_count(caplog):
  model = models.create_model("deit_tiny_patch16_224", embed_dim=16, depth=1, num_heads=1,
                              num_classes=3, img_size=16, patch_size=8)
  model.eval()
  graphdef, params = nnx.split(model, nnx.Param)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(6, 16, 16, 3)), jnp.float32)
  batch = {"image": images, "label": jnp.array([0, 1, 2, 0, 1, 2]),
           "mask": jnp.array([1, 1, 1, 1, 1, 0], jnp.float32)}
  with caplog.at_level(logging.WARNING):
    res = jax.jit(evaluation.make_eval_step(graphdef))(nnx.to_pure_dict(params), None, batch)
  assert float(res["cls"]["top5"]) == 5.0  # top-3 of 3 classes: every real row is a hit
  logits = jax.jit(lambda v, x: nnx.merge(graphdef, v)(x))(nnx.to_pure_dict(params), images)
  predicted = np.argmax(np.asarray(logits), -1)
  assert float(res["cls"]["top1"]) == float(np.sum((predicted == batch["label"])[:5]))
  assert "top5 is top-3" in caplog.text


TINY = dict(embed_dim=16, depth=1, num_heads=1, patch_size=8, img_size=16)


def _tiny_checkpoint(directory, name="deit_tiny_distilled_patch16_224", num_classes=1000):
  """What `python -m deit_jax.convert` writes, for a DeiT shrunk to 16 px and width 16."""
  model = models.create_model(name, num_classes=num_classes, **TINY)
  model.eval()
  return checkpoint.save_model(model, str(directory)), model


def _zoo_config(name="deit_tiny_distilled_patch16_224"):
  c = config_lib.zoo_config(name)  # ImageNet (tfds imagenet2012), the official eval transform
  c.model_kw.update({k: v for k, v in TINY.items() if k != "img_size"})
  c.aug.input_size, c.eval_batch_size = 16, 8
  return c


def test_eval_of_converted_weights_on_imagenet_with_a_teacher(tmp_path, capsys):
  """The README's path for the released weights, on mocked ImageNet: every head, the teacher
  (here the checkpoint itself, so 'both' agrees with it on every image), token similarity."""
  import tensorflow_datasets as tfds
  ckpt, model = _tiny_checkpoint(tmp_path / "ckpt")
  c = _zoo_config()
  c.teacher.checkpoint = ckpt
  workdir = str(tmp_path / "eval")
  with tfds.testing.mock_data(num_examples=11, policy=tfds.testing.MockPolicy.USE_CODE):
    res = run.run_eval(c, workdir, ckpt)
    # The reference: the same eval stream (11 images in 2 padded batches), numpy on the heads.
    source = plan.build_eval_source(c)
    heads = jax.jit(lambda x: model.heads(x))
    agree, seen = 0, 0
    for batch in data.eval_iterator(source, c.aug, global_batch_size=8):
      out, real = heads(jnp.asarray(batch["image"])), np.asarray(batch["mask"]) > 0
      agree += np.sum((np.argmax(out.cls, -1) == np.argmax(out.both, -1))[real])
      seen += real.sum()
  assert res["eval/count"] == seen == 11
  assert res["eval/both_agree"] == 100.0
  assert res["eval/cls_agree"] == pytest.approx(100 * agree / 11)
  assert res["eval/teacher_top1"] == res["eval/both_top1"]
  assert -1 <= res["eval/token_cos"] <= 1 and "eval/ema_top1" not in res
  saved = json.load(open(os.path.join(workdir, "eval.json")))
  assert saved["step"] == 0 and saved["num_images"] == 11 and saved["checkpoint"] == ckpt
  assert set(saved["heads"]) == {"class", "distillation", "both"}
  assert saved["teacher"]["checkpoint"] == ckpt and saved["token_cos"] == res["eval/token_cos"]
  assert saved["eval/top1"] == res["eval/both_top1"]  # the keys training reads, unchanged
  out = capsys.readouterr().out
  assert "agrees with teacher" in out and "\nteacher " in out and "\ndistillation " in out


def _description(name, **kw):
  return {"family": "deit", "config": dataclasses.asdict(
      dataclasses.replace(models.MODELS[name], **kw))}


def test_eval_checkpoint_must_fit_the_config():
  small = _description("deit_small_patch16_224")
  assert plan.check_eval_checkpoint(config_lib.zoo_config("deit_small_patch16_224"), small,
                                    "ckpt/deit_s") == 1000  # configs/deit_s.py
  with pytest.raises(plan.ConfigError, match=(
      "holds deit_small_patch16_224, but --config is for deit_small_distilled_patch16_224: "
      "distilled True here, False in the checkpoint.*--config.model=deit_small_patch16_224")):
    plan.check_eval_checkpoint(config_lib.zoo_config("deit_small_distilled_patch16_224"), small,
                               "ckpt/deit_s")
  with pytest.raises(plan.ConfigError, match="embed_dim 192 here, 384 in the checkpoint"):
    plan.check_eval_checkpoint(config_lib.zoo_config("deit_tiny_patch16_224"), small, "c")
  cnn = {"family": "teacher", "name": "regnety_002", "num_classes": 1000}
  regnet = config_lib.zoo_config("deit_tiny_patch16_224")
  regnet.model = "regnety_002"
  assert plan.check_eval_checkpoint(regnet, cnn, "c") == 1000
  with pytest.raises(plan.ConfigError, match="a DeiT checkpoint for a CNN config"):
    plan.check_eval_checkpoint(regnet, small, "c")
  regnet.model = "resnet50"
  with pytest.raises(plan.ConfigError, match="holds regnety_002, but --config is for resnet50"):
    plan.check_eval_checkpoint(regnet, cnn, "c")
  with pytest.raises(plan.ConfigError, match="a CNN checkpoint for a DeiT config"):
    plan.check_eval_checkpoint(config_lib.zoo_config("deit_tiny_patch16_224"), cnn, "c")


def test_eval_refuses_another_model_or_class_count_before_loading(tmp_path):
  import tensorflow_datasets as tfds
  ckpt, _ = _tiny_checkpoint(tmp_path / "ckpt", num_classes=10)
  workdir = tmp_path / "w"
  plain = _zoo_config("deit_tiny_patch16_224")
  with pytest.raises(plan.ConfigError, match=("distilled False here, True in the checkpoint. "
                                               ".*--config.model_kw.distilled=True")):
    run.run_eval(plain, str(workdir), ckpt)
  with pytest.raises(plan.ConfigError, match=(
      "predicts 10 classes but the eval data \\(config.data.num_classes\\) has 1000.*"
      "--config.data.num_classes=10.*--config.init_skip_head=True")):
    run.run_eval(_zoo_config(), str(workdir), ckpt)
  c = _zoo_config()
  c.data.num_classes = None  # the count then comes from the data: ImageNet's 1000
  with tfds.testing.mock_data(num_examples=2, policy=tfds.testing.MockPolicy.USE_CODE):
    with pytest.raises(plan.ConfigError, match="the eval data \\(the eval split\\) has 1000"):
      run.run_eval(c, str(workdir), ckpt)
  assert not workdir.exists()


def test_the_eval_teacher_is_the_runs_own_or_loaded_from_its_checkpoint(tmp_path, capsys):
  """Training reuses the step's teacher; otherwise teacher.checkpoint's model when it exists
  (tests/test_distill.py checks the agreement of both in training runs); in training a teacher
  that does not fit is skipped with a warning, in --mode=eval it is an error."""
  from types import SimpleNamespace
  from deit_jax import distill, sharding
  mesh, c = sharding.make_mesh(1), _zoo_config()
  own = object()
  assert distill.eval_teacher(c, mesh, 1000, SimpleNamespace(teacher=own)) is own
  assert distill.eval_teacher(c, mesh, 1000, SimpleNamespace(teacher=None)) is None  # none set
  c.teacher.checkpoint, _ = _tiny_checkpoint(tmp_path / "t", num_classes=10)
  assert distill.eval_teacher(c, mesh, 10).img_size == 16
  assert distill.eval_teacher(c, mesh, 1000, SimpleNamespace(teacher=None)) is None
  assert "WARNING: evaluating without the teacher's agreement" in capsys.readouterr().out
  with pytest.raises(distill.TeacherError, match="predicts 10 classes but the student has 1000"):
    distill.eval_teacher(c, mesh, 1000)
