"""Distillation in the train step: the teacher in the step, precomputed teacher outputs, and the
teacher bad inputs."""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deit_jax import checkpoint, convert, data, distill, precompute, sharding, teachers, train
from deit_jax import plan as plan_lib

sys.path.insert(0, os.path.dirname(__file__))
import tiny_config  # noqa: E402

FIX = os.path.join(os.path.dirname(__file__), "fixtures")


def tiny_teacher(num_classes=10):
  cfg = teachers.RegNetCfg(depth=6, w0=8, wa=8.0, wm=2.0, group_size=4, se_ratio=0.25,
                           stem_width=8)
  return teachers.RegNet(cfg, num_classes, rngs=nnx.Rngs(1))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("teacher") / "ckpt")
  checkpoint.save_model(tiny_teacher(), path)
  return path


def cfg(teacher_dir, kind, **overrides):
  c = tiny_config.get_config()
  c.distillation.kind = kind
  c.teacher.checkpoint = teacher_dir
  c.total_steps = 4
  c.update_from_flattened_dict(overrides)
  return c


def _losses(workdir):
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return [(l["step"], l["train/loss"], l["train/distill_loss"]) for l in lines
          if "train/loss" in l]


@pytest.mark.parametrize("kind,top_k,dtype", [("hard", 10, "float16"), ("soft", 10, "float32")])
def test_precomputed_teacher_gives_the_in_step_losses(teacher_dir, tmp_path, kind, top_k, dtype):
  overrides = {"teacher.top_k": top_k, "teacher.store_dtype": dtype,
               "teacher.precomputed_dir": str(tmp_path / "store"), "distillation.tau": 2.0}
  in_step = str(tmp_path / "in_step")
  train.train_and_evaluate(cfg(teacher_dir, kind, **overrides), in_step)
  info = precompute.precompute_teacher(cfg(teacher_dir, kind, **overrides), str(tmp_path / "pre"))
  assert info["num_steps"] == 89  # one epoch of 1,437 digits at batch 16
  stored = str(tmp_path / "stored")
  train.train_and_evaluate(cfg(teacher_dir, kind, **overrides, **{"teacher.source": "precomputed"}),
                           stored)
  a, b = _losses(in_step), _losses(stored)
  assert [s for s, _, _ in a] == [2, 4] and all(d > 0 for _, _, d in a)
  np.testing.assert_allclose(np.array(a)[:, 1:], np.array(b)[:, 1:], rtol=1e-6)
  # Each eval compares the heads with the teacher: the step's own, or (precomputed) the model at
  # teacher.checkpoint; the same student and teacher agree alike (to one image of 360).
  ea, eb = (next(l for l in map(json.loads, open(os.path.join(w, "metrics.jsonl")))
                 if "eval/top1" in l) for w in (in_step, stored))
  for key in ("cls_agree", "dist_agree", "both_agree", "ema_agree", "teacher_top1", "token_cos"):
    assert ea[f"eval/{key}"] == pytest.approx(eb[f"eval/{key}"], abs=0.3), key
  # The run records its teacher; the teacher's weights never enter the student's checkpoint.
  record = json.load(open(os.path.join(in_step, "teacher.json")))
  assert record["checkpoint"] == os.path.abspath(teacher_dir) and len(record["sha256"]) == 64
  student = checkpoint.model_params(checkpoint.load_model(os.path.join(in_step, "checkpoints")))
  assert not any(k.startswith(("stem", "stages", "s1")) for k in student)


def test_precomputed_store_refuses_another_stream(teacher_dir, tmp_path):
  overrides = {"teacher.precomputed_dir": str(tmp_path / "store")}
  precompute.precompute_teacher(cfg(teacher_dir, "hard", **overrides), str(tmp_path / "pre"))
  run = cfg(teacher_dir, "hard", **overrides, **{"teacher.source": "precomputed", "seed": 7,
                                                  "aug.reprob": 0.5})
  with pytest.raises(plan_lib.ConfigError) as e:
    train.train_and_evaluate(run, str(tmp_path / "run"))
  assert "seed: stored 0, this run 7" in str(e.value) and "aug/reprob" in str(e.value)
  other_teacher = str(tmp_path / "other")
  m = tiny_teacher()
  checkpoint.assign_params(m, {k: v + 1 for k, v in checkpoint.model_params(m).items()})
  checkpoint.save_model(m, other_teacher)
  run = cfg(other_teacher, "hard", **overrides, **{"teacher.source": "precomputed"})
  with pytest.raises(plan_lib.ConfigError, match="teacher/sha256"):
    train.train_and_evaluate(run, str(tmp_path / "run2"))
  run = cfg(teacher_dir, "soft", **overrides, **{"teacher.source": "precomputed"})
  with pytest.raises(plan_lib.ConfigError, match="kind: stored 'hard', this run 'soft'"):
    train.train_and_evaluate(run, str(tmp_path / "run3"))


# The data keys version 1 of the fingerprint listed by hand (before sources described themselves).
_OLD_DATA_KEYS = ("source", "name", "split", "root", "path", "image_size")


def _folder(root):
  """root/train/{a,b}/ with one PNG each and a truncated JPEG in b/."""
  import io
  from PIL import Image

  def encode(size, fmt):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()
  rng = np.random.default_rng(0)
  for cls in ("a", "b"):
    os.makedirs(root / "train" / cls)
    (root / "train" / cls / "x.png").write_bytes(encode(8, "PNG"))
  jpeg = encode(16, "JPEG")
  (root / "train" / "b" / "broken.jpg").write_bytes(jpeg[:len(jpeg) // 2])
  return str(root)


def test_store_fingerprint_names_the_source_not_a_key_list(tmp_path):
  """Sources that differ only in a data key version 1 did not list yield other examples: a
  store made from one is refused for the other, and an old store reads as a difference."""
  config = tiny_config.get_config()
  config.distillation.kind = "hard"
  plan = plan_lib.make_plan(config, 8, 64, 0, 10)

  def expected(identity):
    return distill.expected_fingerprint(config, plan, "t", identity)

  images = np.random.default_rng(0).integers(0, 256, (64, 8, 8, 3), dtype=np.uint8)
  arrays = {"source": "arrays", "images": images, "labels": np.arange(64) % 10}
  root = _folder(tmp_path / "folder")
  folder = {"source": "folder", "root": root, "validate": "decode"}
  pairs = [  # (a store is made from, a run reads it with, the key that tells them apart)
      (arrays, {**arrays, "images": images[::-1].copy()}, "data/arrays_sha256"),
      (folder, {**folder, "validate": "header"}, "data/files_sha256")]  # keeps broken.jpg
  for made, run, key in pairs:
    assert {k: made.get(k) for k in _OLD_DATA_KEYS} == {k: run.get(k) for k in _OLD_DATA_KEYS}
    store = str(tmp_path / f"store_{made['source']}")
    os.makedirs(store)
    distill.write_fingerprint(store, expected(data.build_source(made).identity()),
                              plan.total_steps, 1)
    distill.PrecomputedTeacher(store, expected(data.build_source(made).identity()),
                               plan.total_steps)  # the same source: accepted
    with pytest.raises(distill.TeacherError,
                       match=f"{key}: stored '[0-9a-f]{{64}}', this run '[0-9a-f]{{64}}'"):
      distill.PrecomputedTeacher(store, expected(data.build_source(run).identity()),
                                 plan.total_steps)
  # A store written before (its data entry: the old key list) reports what it lacks.
  old_store = str(tmp_path / "old_store")
  os.makedirs(old_store)
  distill.write_fingerprint(old_store, expected({k: folder.get(k) for k in _OLD_DATA_KEYS}),
                            plan.total_steps, 1)
  with pytest.raises(distill.TeacherError, match="data/files_sha256: stored None, this run '"):
    distill.PrecomputedTeacher(old_store, expected(data.build_source(folder).identity()),
                               plan.total_steps)


def test_teacher_resizes_and_renormalizes_inside_the_step():
  model = tiny_teacher()
  model.eval()
  mesh = sharding.make_mesh(1)
  mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
  t = distill.Teacher(model, student_img_size=16, student_mean=(0.485, 0.456, 0.406),
                      student_std=(0.229, 0.224, 0.225), img_size=24, mean=mean, std=std,
                      mesh=mesh, rules=[(".*", "replicate")])
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  pixels = x * jnp.array([0.229, 0.224, 0.225]) + jnp.array([0.485, 0.456, 0.406])
  want = model(jax.image.resize((pixels - 0.5) / 0.25, (2, 24, 24, 3), "bicubic",
                                antialias=False))
  np.testing.assert_allclose(jax.jit(t.logits)(t.params, x), want, atol=1e-4)
  grad = jax.grad(lambda p: t.logits(p, x).sum())(t.params)
  assert all(np.all(g == 0) for g in jax.tree.leaves(grad))  # frozen


def test_teacher_with_another_class_count_is_refused(tmp_path):
  path = str(tmp_path / "t5")
  checkpoint.save_model(tiny_teacher(num_classes=5), path)
  with pytest.raises(distill.TeacherError, match="predicts 5 classes but the student has 10"):
    train.train_and_evaluate(cfg(path, "hard"), str(tmp_path / "run"))


def test_missing_or_unreadable_teacher(tmp_path):
  with pytest.raises(plan_lib.ConfigError, match="needs a teacher"):
    plan_lib.validate_config(cfg("", "hard"), 8)
  with pytest.raises(plan_lib.ConfigError, match="not a directory"):
    plan_lib.validate_config(cfg(str(tmp_path / "nowhere"), "soft"), 8)
  (tmp_path / "empty").mkdir()
  with pytest.raises(distill.TeacherError, match="no Orbax checkpoint"):
    train.train_and_evaluate(cfg(str(tmp_path / "empty"), "hard"), str(tmp_path / "run"))


def test_teacher_weights_for_another_architecture(tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match="missing|unexpected|shape"):
    convert.convert("regnety_002", os.path.join(FIX, "teacher_resnet_basic_tiny.safetensors"),
                    str(tmp_path / "out"), num_classes=10)
  assert not (tmp_path / "out").exists()


def test_a_cnn_teacher_trains_with_the_launcher(tmp_path):
  c = tiny_config.get_config()
  c.model = "resnet18"
  c.model_kw = {"dtype": "float32"}
  c.mixup.prob = 0.0
  c.total_steps = 2
  c.ema_decay = 0.0
  workdir = str(tmp_path / "cnn")
  result = train.train_and_evaluate(c, workdir)
  assert result["step"] == 2 and 0 <= result["eval/top1"] <= 100
  model = checkpoint.load_model(os.path.join(workdir, "checkpoints"))
  assert isinstance(model, teachers.ResNet)
  # BatchNorm statistics moved during training and were saved with the weights.
  stats = checkpoint.model_params(model, nnx.BatchStat)
  assert stats and any(np.abs(v).sum() > 0 for k, v in stats.items() if k.endswith("mean"))
