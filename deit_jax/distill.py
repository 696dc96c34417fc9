"""The teacher as the train step sees it: a frozen model run inside the step, or stored outputs.

In the step the teacher runs on the student's augmented and mixed images (what the official code
does), resized to its own resolution and re-normalized with its own mean/std when they differ, in
eval mode (BatchNorm running statistics), under stop_gradient. Its parameters are placed by the
same sharding rules as the student's and are never written into the student's checkpoints; the
run records the teacher's path and a checksum of its weights in `<workdir>/teacher.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deit_jax import checkpoint, sharding

SOURCES = ("model", "precomputed")


class TeacherError(ValueError):
  """The teacher cannot be used for this run; raised before anything is compiled."""


def validate_teacher_config(teacher_cfg, kind: str) -> None:
  if teacher_cfg.source not in SOURCES:
    raise TeacherError(f"config.teacher.source={teacher_cfg.source!r}; use one of {SOURCES}.")
  if teacher_cfg.source == "model" and not teacher_cfg.checkpoint:
    raise TeacherError(
        f"config.distillation.kind={kind!r} needs a teacher: set --config.teacher.checkpoint to "
        "an Orbax checkpoint (convert regnety_160-a5fe301d.pth with `python -m deit_jax.convert "
        "--model regnety_160 ...`), or --config.distillation.kind=none to train without one.")
  if teacher_cfg.source == "model" and not os.path.isdir(teacher_cfg.checkpoint):
    raise TeacherError(f"config.teacher.checkpoint={teacher_cfg.checkpoint!r} is not a "
                       "directory; expected an Orbax checkpoint written by deit_jax.")
  if teacher_cfg.source == "precomputed" and not teacher_cfg.precomputed_dir:
    raise TeacherError("config.teacher.source='precomputed' needs config.teacher.precomputed_dir "
                       "(written by `launch.py --mode=precompute_teacher`).")


def weights_checksum(flat: dict[str, Any]) -> str:
  """sha256 over the names, shapes and bytes of the weights, in name order."""
  h = hashlib.sha256()
  for name in sorted(flat):
    value = np.ascontiguousarray(jax.device_get(flat[name]))
    h.update(name.encode())
    h.update(str(value.shape).encode())
    h.update(value.tobytes())
  return h.hexdigest()


class Teacher:
  """A frozen teacher: `logits(params, images)` is pure and runs inside the jitted step."""

  def __init__(self, model: nnx.Module, *, student_img_size: int, student_mean, student_std,
               img_size: int | None, mean, std, mesh, rules):
    model.eval()
    self.graphdef, state = nnx.split(model)
    flat = checkpoint.flatten(nnx.to_pure_dict(state))
    self.checksum = weights_checksum(flat)
    self.img_size = img_size or student_img_size
    self._resize = self.img_size != student_img_size
    # Undo the student's normalization and apply the teacher's, only if they differ.
    s_mean, s_std = np.asarray(student_mean, np.float32), np.asarray(student_std, np.float32)
    t_mean, t_std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    self._renorm = None
    if not (np.allclose(s_mean, t_mean) and np.allclose(s_std, t_std)):
      self._renorm = (s_std / t_std, (s_mean - t_mean) / t_std)
    pure = checkpoint.unflatten(flat)
    self.shardings = sharding.tree_shardings(pure, mesh, rules)
    self.params = jax.device_put(pure, self.shardings)
    self.num_classes = None

  def logits(self, params, images):
    x = images.astype(jnp.float32)
    if self._renorm is not None:
      scale, shift = self._renorm
      x = x * scale + shift
    if self._resize:
      x = jax.image.resize(x, (x.shape[0], self.img_size, self.img_size, x.shape[-1]),
                           method="bicubic", antialias=False)
    out = nnx.merge(self.graphdef, params)(x)
    return jax.lax.stop_gradient(out.astype(jnp.float32))


def load(config, mesh, rules, num_classes: int, workdir: str) -> Teacher:
  """Loads the configured teacher checkpoint, checks it against the run, records it."""
  tcfg = config.teacher
  try:
    model = checkpoint.load_model(tcfg.checkpoint)
  except (FileNotFoundError, checkpoint.CheckpointError) as e:
    raise TeacherError(f"Cannot load the teacher from {tcfg.checkpoint}: {e}") from e
  probe_size = tcfg.img_size or config.aug.input_size
  out = jax.eval_shape(lambda: model(jnp.zeros((1, probe_size, probe_size, 3))))
  if out.shape[-1] != num_classes:
    raise TeacherError(f"The teacher at {tcfg.checkpoint} predicts {out.shape[-1]} classes but "
                       f"the student has {num_classes}. Use a teacher trained on the same labels.")
  teacher = Teacher(model, student_img_size=config.aug.input_size, student_mean=config.aug.mean,
                    student_std=config.aug.std, img_size=tcfg.img_size, mean=tcfg.mean,
                    std=tcfg.std, mesh=mesh, rules=rules)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    record = {"checkpoint": os.path.abspath(tcfg.checkpoint), "sha256": teacher.checksum,
              "img_size": teacher.img_size}
    with open(os.path.join(workdir, "teacher.json"), "w") as f:
      json.dump(record, f, indent=2)
  return teacher
