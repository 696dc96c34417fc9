"""`launch.py --mode=precompute_teacher`: the teacher's outputs for a whole run, computed once.

The train stream is a pure function of (seed, step) and the mixup of a step a pure function of
(seed, step) too, so this job replays exactly the images every training step will show the
student (augmented and mixed), runs the teacher on them, and stores per image the top-k logits
(soft distillation) or the argmax (hard), one file per epoch and process. A training run with
`teacher.source='precomputed'` then reads them aligned with its batches and runs no teacher.
The store's fingerprint (data, seed, batch size, augmentation and mixup config, mixup device
groups, teacher checksum, ...) is checked by every run that reads it.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from deit_jax import compile_options, data, distill, losses, sharding, step
from deit_jax.plan import ConfigError, make_plan, validate_config
from deit_jax.progress import log


def _local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in row order."""
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  seen, rows = set(), []
  for s in shards:
    start = s.index[0].start or 0
    if start not in seen:  # replicated copies of the same rows appear once
      seen.add(start)
      rows.append(np.asarray(s.data))
  return np.concatenate(rows)


def precompute_teacher(config, workdir: str) -> dict:
  kind, tcfg = config.distillation.kind, config.teacher
  if kind == "none":
    raise ConfigError("--mode=precompute_teacher needs a distillation kind "
                      f"(config.distillation.kind one of {losses.KINDS[1:]}, got 'none'): it "
                      "decides what is stored.")
  if not tcfg.precomputed_dir:
    raise ConfigError("--mode=precompute_teacher needs config.teacher.precomputed_dir (the "
                            "output directory).")
  if not tcfg.checkpoint:
    raise ConfigError("--mode=precompute_teacher needs config.teacher.checkpoint.")
  num_devices = jax.device_count()
  check = config.copy_and_resolve_references()
  check.teacher.source = "model"
  validate_config(check, num_devices)
  mesh = sharding.make_mesh(num_devices)
  batch_sh = sharding.batch_sharding(mesh)
  rules = [tuple(r) for r in config.sharding.rules]
  source = data.build_source(config.data)
  plan = make_plan(config, num_devices, source.num_examples, 0, source.num_classes)
  teacher = distill.load(config, mesh, rules, plan.num_classes, workdir)
  epochs = tcfg.precompute_epochs or -(-plan.total_steps // plan.steps_per_epoch)
  num_steps = epochs * plan.steps_per_epoch
  top_k = 1 if kind == "hard" else min(tcfg.top_k, plan.num_classes)
  out_dir = tcfg.precomputed_dir
  rng = jax.random.key_data(jax.random.key(config.seed))  # as in the train state

  @compile_options.jit
  def outputs(teacher_params, images, labels, i):
    mix_key, _ = step.step_keys(rng, i)
    mixed, _ = step.mix_batch(config, plan, mix_key, images, labels)
    values, indices = jax.lax.top_k(teacher.logits(teacher_params, mixed), top_k)
    return values.astype(jnp.dtype(tcfg.store_dtype)), indices

  fingerprint = distill.expected_fingerprint(config, plan, teacher.checksum, source.identity())
  t0 = time.time()
  for epoch in range(epochs):
    if distill.epoch_written(out_dir, epoch):
      continue  # resumable: finished epochs are kept
    start = epoch * plan.steps_per_epoch
    it = data.train_iterator(source, config.aug, global_batch_size=plan.global_batch,
                             seed=config.seed, start_step=start)
    vals, idxs = [], []
    for i in range(start, start + plan.steps_per_epoch):
      batch = data.to_global(next(it), batch_sh)
      v, ix = outputs(teacher.params, batch["image"], batch["label"], jnp.int32(i))
      idxs.append(_local_rows(ix).astype(np.int16 if plan.num_classes < 2 ** 15 else np.int32))
      vals.append(_local_rows(v))
    distill.write_epoch(out_dir, epoch, np.stack(idxs),
                        None if kind == "hard" else np.stack(vals))
    log(f"precomputed epoch {epoch + 1}/{epochs} ({time.time() - t0:.0f} s)")
  # Wait for every process's files before declaring the store complete.
  multihost_utils.sync_global_devices("precompute_teacher")
  if jax.process_index() == 0:
    distill.write_fingerprint(out_dir, fingerprint, num_steps, jax.process_count())
  size = sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir))
  log(f"Stored the teacher's {'argmax' if kind == 'hard' else f'top-{top_k} logits'} for "
            f"{num_steps} steps in {out_dir} ({size / 2 ** 20:.1f} MiB).")
  return {"num_steps": num_steps, "bytes": size}
