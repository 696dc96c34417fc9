"""DeiT's distillation as one unit (`Distillation`): where the teacher's outputs come from (none,
a frozen model run inside the step, or outputs stored by `--mode=precompute_teacher`), the
teacher's resolution and normalization, and the loss weighting. The loop builds it once from the
config (`Distillation.from_config`) and adds its rows to each batch; the step calls
`teacher_logits` and `loss`.

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

from deit_jax import checkpoint, conv, losses, progress, sharding

SOURCES = ("model", "precomputed")


class TeacherError(ValueError):
  """The teacher cannot be used for this run; raised before anything is compiled."""


def validate_teacher_config(teacher_cfg, kind: str, *, must_exist: bool = True) -> None:
  if teacher_cfg.source not in SOURCES:
    raise TeacherError(f"config.teacher.source={teacher_cfg.source!r}; use one of {SOURCES}.")
  try:
    conv.check_impl(teacher_cfg.get("conv_impl"))
  except ValueError as e:
    raise TeacherError(f"config.teacher.{e}") from e
  if teacher_cfg.source == "model" and not teacher_cfg.checkpoint:
    raise TeacherError(
        f"config.distillation.kind={kind!r} needs a teacher: set --config.teacher.checkpoint to "
        "an Orbax checkpoint (convert regnety_160-a5fe301d.pth with `python -m deit_jax.convert "
        "--model regnety_160 ...`), or --config.distillation.kind=none to train without one.")
  if must_exist and teacher_cfg.source == "model" and not os.path.isdir(teacher_cfg.checkpoint):
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


def model_checksum(model: nnx.Module) -> str:
  """`weights_checksum` of all of a model's variables (parameters and BatchNorm statistics)."""
  return weights_checksum(checkpoint.flatten(nnx.to_pure_dict(nnx.state(model))))


class Teacher:
  """A frozen teacher: `logits(params, images)` is pure and runs inside the jitted step."""

  def __init__(self, model: nnx.Module, *, student_img_size: int, student_mean, student_std,
               img_size: int | None, mean, std, mesh, rules):
    model.eval()
    self.graphdef, state = nnx.split(model)
    self.checksum = model_checksum(model)
    self.img_size = img_size or student_img_size
    # Its own resolution, or None: it sees the images at the size they come (the student's;
    # at eval, the eval size).
    self._own_size = img_size
    # Undo the student's normalization and apply the teacher's, only if they differ.
    s_mean, s_std = np.asarray(student_mean, np.float32), np.asarray(student_std, np.float32)
    t_mean, t_std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    self._renorm = None
    if not (np.allclose(s_mean, t_mean) and np.allclose(s_std, t_std)):
      self._renorm = (s_std / t_std, (s_mean - t_mean) / t_std)
    pure = checkpoint.unflatten(checkpoint.flatten(nnx.to_pure_dict(state)))
    self.shardings = sharding.tree_shardings(pure, mesh, rules)
    self.params = jax.device_put(pure, self.shardings)

  def logits(self, params, images):
    x = images.astype(jnp.float32)
    if self._renorm is not None:
      scale, shift = self._renorm
      x = x * scale + shift
    size = self._own_size
    if size and x.shape[1:3] != (size, size):
      x = jax.image.resize(x, (x.shape[0], size, size, x.shape[-1]), method="bicubic",
                           antialias=False)
    out = nnx.merge(self.graphdef, params)(x)
    return jax.lax.stop_gradient(out.astype(jnp.float32))


def check_recorded_teacher(workdir: str, checksum: str, path: str) -> None:
  """A run resuming (its workdir holds checkpoints) must see the teacher its teacher.json
  recorded: the same weights (sha256), wherever they now are."""
  record_path = os.path.join(workdir, "teacher.json")
  if not (os.path.exists(record_path)
          and checkpoint.step_folders(os.path.join(workdir, "checkpoints"))):
    return
  with open(record_path) as f:
    record = json.load(f)
  if record.get("sha256") not in (None, checksum):
    raise TeacherError(
        f"The teacher checkpoint changed: {workdir} was trained with the teacher recorded in "
        f"{record_path} ({record.get('checkpoint')}, sha256 {record['sha256']}), but "
        f"{path} has sha256 {checksum}. Resume with that teacher (or restore its files), or "
        "start a new --workdir.")


def load_teacher(config, mesh, rules, num_classes: int) -> Teacher:
  """The configured teacher checkpoint as a `Teacher`, checked against the student's class
  count; nothing recorded (`load` records it for a training run)."""
  tcfg = config.teacher
  try:
    model = checkpoint.load_model(tcfg.checkpoint)
  except (FileNotFoundError, checkpoint.CheckpointError) as e:
    raise TeacherError(f"Cannot load the teacher from {tcfg.checkpoint}: {e}") from e
  if tcfg.get("conv_impl"):
    conv.set_conv_impl(model, tcfg.conv_impl)
  probe_size = tcfg.img_size or config.aug.input_size
  out = jax.eval_shape(lambda: model(jnp.zeros((1, probe_size, probe_size, 3))))
  if out.shape[-1] != num_classes:
    raise TeacherError(f"The teacher at {tcfg.checkpoint} predicts {out.shape[-1]} classes but "
                       f"the student has {num_classes}. Use a teacher trained on the same labels.")
  return Teacher(model, student_img_size=config.aug.input_size, student_mean=config.aug.mean,
                 student_std=config.aug.std, img_size=tcfg.img_size, mean=tcfg.mean,
                 std=tcfg.std, mesh=mesh, rules=rules)


def load(config, mesh, rules, num_classes: int, workdir: str) -> Teacher:
  """Loads the configured teacher checkpoint, checks it against the run, records it."""
  tcfg = config.teacher
  teacher = load_teacher(config, mesh, rules, num_classes)
  check_recorded_teacher(workdir, teacher.checksum, tcfg.checkpoint)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    record = {"checkpoint": os.path.abspath(tcfg.checkpoint), "sha256": teacher.checksum,
              "img_size": teacher.img_size}
    with open(os.path.join(workdir, "teacher.json"), "w") as f:
      json.dump(record, f, indent=2)
  return teacher


def eval_teacher(config, mesh, num_classes: int, dist: "Distillation | None" = None
                 ) -> Teacher | None:
  """The teacher evaluation compares the student's heads with: the run's own (`dist.teacher`)
  when it has one, else config.teacher.checkpoint's model whenever that directory exists (a
  precomputed teacher, a run without distillation, --mode=eval); None without one. In training
  (`dist` given) a teacher that cannot be loaded is skipped with a warning (a diagnostic never
  stops the run); in --mode=eval it is a TeacherError."""
  if dist is not None and dist.teacher is not None:
    return dist.teacher
  if not (config.teacher.checkpoint and os.path.isdir(config.teacher.checkpoint)):
    if config.teacher.checkpoint and dist is None:
      progress.log(f"config.teacher.checkpoint={config.teacher.checkpoint} does not exist: "
                   "evaluating without a teacher.")
    return None
  try:
    return load_teacher(config, mesh, [tuple(r) for r in config.sharding.rules], num_classes)
  except TeacherError as e:
    if dist is None:
      raise
    progress.log(f"WARNING: evaluating without the teacher's agreement: {e}")
    return None


# ----------------------------------------------------------------------------------------------
# Precomputed teacher outputs: written once by `launch.py --mode=precompute_teacher`, read by
# training runs whose stream is the same (checked through a stored fingerprint).
# ----------------------------------------------------------------------------------------------
_FINGERPRINT = "fingerprint.json"
# Classes outside the stored top-k get this logit: exp() of it is exactly 0 in float32, yet it
# stays finite so 0 * logit terms in the KL stay 0.
_ABSENT_LOGIT = -1e9


def logits_from_topk(values, indices, num_classes: int):
  """Teacher logits rebuilt from stored top-k values/indices (hard distillation stores k=1 and
  no values: only the argmax matters)."""
  base = jnp.full(indices.shape[:-1] + (num_classes,), _ABSENT_LOGIT, jnp.float32)
  rows = jnp.arange(indices.shape[0])[:, None]
  return base.at[rows, indices].set(values.astype(jnp.float32))


def _json(value):
  return json.loads(json.dumps(value))


def store_fingerprint(config, *, data_identity: dict, num_examples: int, num_classes: int,
                      steps_per_epoch: int, num_groups: int, teacher_sha256: str | None) -> dict:
  """Everything the stored outputs depend on. Two runs with equal fingerprints see the same
  (mixed) images at every step, so the stored outputs are exactly the teacher's on them.

  data_identity: the train source's `identity()` (`deit_jax.data.Source`): it keeps the data
  keys version 1 listed by hand and adds what each source needs, so a store written before
  compares to it key by key (the new keys then read 'stored None')."""
  return _json({
      "version": 1,
      "data": data_identity,
      "num_examples": num_examples, "num_classes": num_classes, "seed": config.seed,
      "batch_size": config.batch_size, "steps_per_epoch": steps_per_epoch,
      "aug": config.aug.to_dict(), "mixup": config.mixup.to_dict(), "mixup_groups": num_groups,
      "kind": config.distillation.kind,
      "top_k": 1 if config.distillation.kind == "hard" else config.teacher.top_k,
      "store_dtype": config.teacher.store_dtype,
      "teacher": {"sha256": teacher_sha256, "img_size": config.teacher.img_size,
                  "mean": config.teacher.mean, "std": config.teacher.std},
  })


def expected_fingerprint(config, plan, teacher_sha256: str | None, data_identity: dict) -> dict:
  """The fingerprint a run with this config and plan (`deit_jax.plan.Plan`) on a train source
  of this `identity()` needs of a store."""
  return store_fingerprint(
      config, data_identity=data_identity, num_examples=plan.num_train_examples,
      num_classes=plan.num_classes, steps_per_epoch=plan.steps_per_epoch,
      num_groups=plan.num_devices if config.mixup.per_device else 1,
      teacher_sha256=teacher_sha256)


def fingerprint_differences(stored: dict, expected: dict) -> list[str]:
  a, b = checkpoint.flatten(stored), checkpoint.flatten(expected)
  if b.get("teacher/sha256") is None:  # no teacher checkpoint given to compare against
    b["teacher/sha256"] = a.get("teacher/sha256")
  return [f"{k}: stored {a.get(k)!r}, this run {b.get(k)!r}" for k in sorted(set(a) | set(b))
          if a.get(k) != b.get(k)]


def _epoch_file(directory: str, epoch: int, process: int, processes: int) -> str:
  return os.path.join(directory, f"epoch{epoch:05d}_process{process:03d}of{processes:03d}.npz")


def write_epoch(directory: str, epoch: int, indices: np.ndarray, values: np.ndarray | None):
  """This process's rows of one epoch: indices [steps, local_rows, k] (and values)."""
  os.makedirs(directory, exist_ok=True)
  path = _epoch_file(directory, epoch, jax.process_index(), jax.process_count())
  tmp = path + ".tmp.npz"
  arrays = {"indices": indices} if values is None else {"indices": indices, "values": values}
  np.savez(tmp, **arrays)
  os.replace(tmp, path)  # atomic: an interrupted precompute never leaves a half file


def epoch_written(directory: str, epoch: int) -> bool:
  return os.path.exists(_epoch_file(directory, epoch, jax.process_index(), jax.process_count()))


def write_fingerprint(directory: str, fingerprint: dict, num_steps: int, processes: int):
  with open(os.path.join(directory, _FINGERPRINT), "w") as f:
    json.dump({"fingerprint": fingerprint, "num_steps": num_steps, "processes": processes}, f,
              indent=2)


class PrecomputedTeacher:
  """Reads stored teacher outputs aligned with the train stream (any process count)."""

  def __init__(self, directory: str, expected: dict, total_steps: int):
    path = os.path.join(directory, _FINGERPRINT)
    if not os.path.exists(path):
      raise TeacherError(f"{directory} holds no complete precomputed teacher outputs (no "
                         f"{_FINGERPRINT}); run `launch.py --mode=precompute_teacher` first.")
    with open(path) as f:
      meta = json.load(f)
    diffs = fingerprint_differences(meta["fingerprint"], expected)
    if diffs:
      raise TeacherError(f"The precomputed teacher outputs in {directory} were made for another "
                         "stream; what differs:\n  " + "\n  ".join(diffs) +
                         "\nRecompute them with --mode=precompute_teacher for this config.")
    if meta["num_steps"] < total_steps:
      raise TeacherError(f"{directory} covers {meta['num_steps']} steps but this run has "
                         f"{total_steps}; precompute more epochs.")
    self.directory, self.processes = directory, meta["processes"]
    self.steps_per_epoch = expected["steps_per_epoch"]
    self._epoch, self._data = None, None

  def _load(self, epoch: int):
    parts = [np.load(_epoch_file(self.directory, epoch, p, self.processes))
             for p in range(self.processes)]
    # Process files hold consecutive row blocks of each global batch.
    self._data = {k: np.concatenate([p[k] for p in parts], axis=1) for k in parts[0].files}
    self._epoch = epoch

  def rows(self, step: int, start: int, stop: int) -> dict[str, np.ndarray]:
    """Batch keys 'teacher_topk_indices' / 'teacher_topk_values' for rows [start, stop)."""
    epoch, i = divmod(step, self.steps_per_epoch)
    if epoch != self._epoch:
      self._load(epoch)
    idx = self._data["indices"][i, start:stop]
    vals = self._data.get("values")
    vals = np.zeros(idx.shape, np.float32) if vals is None else vals[i, start:stop]
    return {"teacher_topk_indices": idx.astype(np.int32), "teacher_topk_values": vals}


def open_store(config, plan, data_identity: dict) -> PrecomputedTeacher:
  """The stored teacher outputs for this run (`plan`: a `deit_jax.plan.Plan`; data_identity: its
  train source's `identity()`), refused if they were made for another stream or another
  teacher."""
  sha = None
  if config.teacher.checkpoint:  # verify the store was made by this teacher
    sha = model_checksum(checkpoint.load_model(config.teacher.checkpoint))
  expected = expected_fingerprint(config, plan, sha, data_identity)
  return PrecomputedTeacher(config.teacher.precomputed_dir, expected, plan.total_steps)


class StoreError(TeacherError):
  """The precomputed store does not match the run (the trainer reports it as a config error)."""


class Distillation:
  """Distillation for one run. `source` is 'none', 'model' (a frozen `Teacher` inside the step)
  or 'precomputed' (top-k outputs read from a `PrecomputedTeacher` store into each batch)."""

  def __init__(self, config, *, num_classes: int, source: str, teacher: Teacher | None = None,
               store: PrecomputedTeacher | None = None):
    d = config.distillation
    self.kind, self.num_classes = d.kind, num_classes
    self.source = "none" if d.kind == "none" else source
    if self.source == "model" and teacher is None:
      raise ValueError("Distillation with source='model' needs a Teacher.")
    self.teacher, self.store = teacher, store
    self._loss_kw = dict(kind=d.kind, alpha=d.alpha, tau=d.tau, reduction=d.reduction,
                         base_loss=config.get("loss", "ce"),
                         bce_target_threshold=config.get("bce_target_threshold"))

  @classmethod
  def from_config(cls, config, plan, mesh, workdir: str, *,
                  train_source=None) -> "Distillation":
    """Loads (and records in the workdir) the configured teacher, or opens its store (which
    needs `train_source`, the run's `deit_jax.data.Source`, to check what the store was made
    from)."""
    kind, n = config.distillation.kind, plan.num_classes
    if kind == "none":
      return cls(config, num_classes=n, source="none")
    if config.teacher.source == "precomputed":
      if train_source is None:
        raise ValueError("Distillation.from_config with a precomputed teacher needs "
                         "train_source (the run's train data source).")
      try:
        return cls(config, num_classes=n, source="precomputed",
                   store=open_store(config, plan, train_source.identity()))
      except TeacherError as e:
        raise StoreError(str(e)) from e
    rules = [tuple(r) for r in config.sharding.rules]
    return cls(config, num_classes=n, source="model",
               teacher=load(config, mesh, rules, n, workdir))

  @property
  def params(self):
    """The teacher's parameters, an argument of the jitted step (None without a model)."""
    return None if self.teacher is None else self.teacher.params

  @property
  def shardings(self):
    return None if self.teacher is None else self.teacher.shardings

  def batch_rows(self, step: int, start: int, stop: int) -> dict[str, np.ndarray]:
    """What joins rows [start, stop) of the batch of `step`: stored outputs, or nothing."""
    return {} if self.store is None else self.store.rows(step, start, stop)

  def teacher_logits(self, params, images, batch):
    """Inside the step: the teacher's logits on the student's (augmented, mixed) images."""
    if self.source == "none":
      return jnp.zeros((images.shape[0], 0), jnp.float32)
    if self.source == "precomputed":
      return logits_from_topk(batch["teacher_topk_values"], batch["teacher_topk_indices"],
                              self.num_classes)
    return self.teacher.logits(params, images)

  def loss(self, outputs, targets, teacher_logits) -> dict:
    """{'loss', 'base', 'distill'}: the official loss with this run's kind, alpha, tau and
    reduction (`losses.distillation_terms`) on the student's `deit_jax.outputs.Outputs`."""
    return losses.distillation_terms(outputs.cls, outputs.dist, targets, teacher_logits,
                                     **self._loss_kw)
