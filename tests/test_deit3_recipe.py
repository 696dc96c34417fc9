"""The DeiT III recipe: BCE on binarized mixed targets, LAMB as timm/apex FusedLAMB, the configs,
and a tiny distilled DeiT III run (3-Augment, simple random crop, CNN teacher) that trains at
one resolution and evaluates at another."""
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from deit_jax import checkpoint, config, evaluation, losses, models, step, teachers, train
from deit_jax import plan as plan_lib

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import deit3  # noqa: E402  (configs/deit3.py)
import tiny_config  # noqa: E402

FIX = os.path.join(os.path.dirname(__file__), "fixtures")


def _bce_reference(x, t):
  """torch.nn.BCEWithLogitsLoss (mean), in float64."""
  x, t = np.asarray(x, np.float64), np.asarray(t, np.float64)
  return np.mean(np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x))))


def test_bce_is_torchs_bce_with_logits_on_binarized_targets():
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 3, (4, 6)).astype(np.float32)
  mixed = np.zeros((4, 6), np.float32)
  mixed[np.arange(4), [0, 1, 2, 3]] = 0.7  # a Mixup pair per row
  mixed[np.arange(4), [5, 5, 4, 0]] += 0.3
  np.testing.assert_allclose(losses.binary_cross_entropy(logits, mixed),
                             _bce_reference(logits, mixed), rtol=1e-6)
  np.testing.assert_allclose(
      losses.binary_cross_entropy(logits, mixed, target_threshold=0.0),
      _bce_reference(logits, mixed > 0), rtol=1e-6)
  labels = np.array([1, 0, 5, 2])
  np.testing.assert_allclose(losses.binary_cross_entropy(logits, labels),
                             _bce_reference(logits, np.eye(6)[labels]), rtol=1e-6)
  # Stable for large logits.
  assert np.isfinite(losses.binary_cross_entropy(jnp.array([[1e4, -1e4]]), jnp.array([[0., 1.]])))


def test_distillation_terms_with_a_bce_base():
  rng = np.random.default_rng(1)
  cls, dist, teacher = (rng.normal(size=(3, 5)).astype(np.float32) for _ in range(3))
  eye = np.eye(5, dtype=np.float32)
  targets = eye[[0, 3, 4]] * 0.6 + eye[[1, 1, 2]] * 0.4  # mixed pairs
  terms = losses.distillation_terms(cls, dist, targets, teacher, kind="hard", base_loss="bce",
                                    bce_target_threshold=0.0)
  np.testing.assert_allclose(terms["base"], _bce_reference(cls, targets > 0), rtol=1e-6)
  np.testing.assert_allclose(terms["distill"], losses.hard_distillation(dist, teacher), rtol=1e-6)
  np.testing.assert_allclose(terms["loss"], 0.5 * terms["base"] + 0.5 * terms["distill"],
                             rtol=1e-6)
  with pytest.raises(ValueError, match="base loss"):
    losses.distillation_terms(cls, None, targets, kind="none", base_loss="focal")


def test_lamb_is_timms_lamb():
  """Three steps against timm's Lamb (tests/fixtures/make_lamb_fixture.py): clipping to global
  norm 1, Adam moments, decay and the trust ratio only on the decayed weight."""
  ref = np.load(os.path.join(FIX, "lamb_timm.npz"))
  c = config.deit3_config("small")
  c.optimizer.update(lr=1e-2, lr_base_batch=c.batch_size, warmup_epochs=0.0, min_lr=1e-2)
  plan = plan_lib.Plan(num_devices=1, global_batch=c.batch_size, micro_batch=c.batch_size,
                    steps_per_epoch=10, total_steps=10, warmup_steps=0, peak_lr=1e-2,
                    num_train_examples=0, num_eval_examples=0, num_classes=10)
  params = {k: jnp.asarray(ref[f"init_{k}"]) for k in ("w", "b", "gamma")}
  tx, _ = step.make_optimizer(c, plan, params)
  state = tx.init(params)
  for i in range(3):
    grads = {k: jnp.asarray(ref[f"grad{i}_{k}"]) for k in params}
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    for k in params:
      np.testing.assert_allclose(params[k], ref[f"step{i}_{k}"], rtol=1e-5, atol=1e-7,
                                 err_msg=f"step {i} {k}")


@pytest.mark.parametrize("arg", ["small", "medium", "base", "large", "huge", "base,distilled",
                                 "small,src", "base,ft224", "small,ft384"])
def test_deit3_configs_validate(arg):
  c = deit3.get_config(arg)
  if "distilled" in arg:
    assert c.distillation.kind == "hard"
    c.distillation.kind = "none"  # the teacher checkpoint is the user's to give
  plan_lib.validate_config(c, 8)
  cfg = models.model_config(c.model, **plan_lib.model_overrides(c))
  assert cfg.layer_scale_init is not None and cfg.no_embed_class and cfg.drop_path_uniform
  assert cfg.distilled == ("distilled" in arg)
  if "ft" in arg:
    assert c.optimizer.name == "adamw" and c.loss == "ce" and c.aug.auto_augment
    return
  assert c.optimizer.name == "lamb" and c.optimizer.clip_grad == 1.0 and c.loss == "bce"
  assert c.bce_target_threshold == 0.0 and c.label_smoothing == 0.0
  assert c.aug.three_augment and c.aug.reprob == 0.0 and not c.aug.auto_augment
  assert c.aug.simple_random_crop == ("src" in arg)
  assert evaluation.eval_input_size(c) == 224
  assert c.aug.input_size == {"small": 224, "medium": 224, "base": 192, "large": 192,
                              "huge": 154}[arg.split(",")[0]]


def test_deit3_config_bad_arguments():
  with pytest.raises(ValueError, match="use a size"):
    deit3.get_config("giant")
  with pytest.raises(ValueError, match="use a size"):
    deit3.get_config("base,distiled")
  with pytest.raises(ValueError, match="finetune_size"):
    deit3.get_config("small,ft224")  # S trains at 224 already
  with pytest.raises(plan_lib.ConfigError, match="config.loss"):
    plan_lib.validate_config(_tiny(**{"loss": "focal"}), 8)
  with pytest.raises(plan_lib.ConfigError, match="optimizer.name"):
    plan_lib.validate_config(_tiny(**{"optimizer.name": "sgd"}), 8)
  with pytest.raises(plan_lib.ConfigError, match="eval_input_size=20.*multiple of patch_size"):
    plan_lib.validate_config(_tiny(**{"aug.eval_input_size": 20}), 8)


def _tiny(**overrides):
  """tests/tiny_config.py as a distilled DeiT III with the DeiT III recipe: trains at 16 px
  (grid 2 x 2), evaluates at 24 (3 x 3)."""
  c = tiny_config.get_config()
  c.model = "deit3_small_patch16_224"
  c.model_kw.distilled = True
  c.loss = "bce"
  c.bce_target_threshold = 0.0
  c.label_smoothing = 0.0
  c.optimizer.update(name="lamb", clip_grad=1.0, lr=3e-3, lr_base_batch=16)
  c.aug.update(three_augment=True, auto_augment="", reprob=0.0, simple_random_crop=True)
  c.aug.eval_input_size = 24
  c.update_from_flattened_dict(overrides)
  return c


def test_tiny_distilled_deit3_trains_with_a_cnn_teacher_and_evaluates_at_another_size(tmp_path):
  cnn = teachers.RegNet(teachers.RegNetCfg(depth=6, w0=8, wa=8.0, wm=2.0, group_size=4,
                                           se_ratio=0.25, stem_width=8), 10, rngs=nnx.Rngs(1))
  teacher_dir = str(tmp_path / "teacher")
  checkpoint.save_model(cnn, teacher_dir)
  c = _tiny(**{"distillation.kind": "hard", "teacher.checkpoint": teacher_dir, "total_steps": 2,
               "ema_decay": 0.0})
  workdir = str(tmp_path / "run")
  final = train.train_and_evaluate(c, workdir)
  assert final["step"] == 2 and 0 <= final["eval/both_top1"] <= 100
  assert {"eval/cls_top1", "eval/dist_top1"} <= set(final)
  lines = [l for l in open(os.path.join(workdir, "metrics.jsonl")) if "train/loss" in l]
  assert lines and all(math.isfinite(float(l.split('"train/distill_loss": ')[1].split(",")[0]))
                       for l in lines)

  # The eval model (built at 24 px, grid resized in the step) gives what loading the trained
  # checkpoint at 24 px (grid resized on load) gives.
  trained = checkpoint.load_model(os.path.join(workdir, "checkpoints"))
  assert trained.config.img_size == 16 and trained.pos_embed.shape == (1, 4, 48)
  at_24 = checkpoint.load_model(os.path.join(workdir, "checkpoints"), img_size=24)
  cfg = models.model_config(c.model, **{**plan_lib.model_overrides(c), "img_size": 24})
  eval_model = nnx.eval_shape(lambda: models.DeiT(cfg, rngs=nnx.Rngs(0)))
  eval_model.eval()
  graphdef = nnx.split(eval_model, nnx.Param)[0]
  variables = nnx.state(trained, nnx.Param)

  def logits(variables, images):
    model = nnx.merge(graphdef, variables)
    return model(images)  # the 16 px position grid resized in the forward pass

  x = jax.random.normal(jax.random.key(0), (2, 24, 24, 3))
  np.testing.assert_allclose(jax.jit(logits)(variables, x), at_24(x), atol=1e-5)
