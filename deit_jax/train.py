"""The training loop: config -> mesh -> input -> model -> sharded state -> checkpoints -> steps.

Read it top to bottom. The plan (config checks, derived sizes) is `deit_jax.plan`; the step and
the state it carries are `deit_jax.step`; this module only runs them: it owns the checkpoint
managers (`Checkpoints`), the metric writer and SIGTERM. Nothing imports it but the launcher's
dispatcher (`deit_jax.run`).
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from deit_jax import checkpoint, compile_options, data, distill, evaluation, sharding, step
from deit_jax.plan import ConfigError, Plan, build_eval_source, make_plan, validate_config
from deit_jax.progress import MetricWriter, fmt_time, log

TRAIN_STATE_ITEM = "train_state"


def due(done: int, every: int, total: int) -> bool:
  """The one "every N steps, or at the end" rule of the loop (logs, checkpoints)."""
  return done % every == 0 or done == total


# ==============================================================================================
# Checkpoints: the regular manager, the best one and its record, in one object.
# ==============================================================================================
class Checkpoints:
  """`<workdir>/checkpoints` (the last `keep_checkpoints` steps, written asynchronously) and
  `<workdir>/best` (the step with the best `best_metric`, recorded in `best.json`)."""

  def __init__(self, workdir: str, config, description: dict):
    items = (checkpoint.MODEL_ITEM, checkpoint.PARAMS_ITEM, checkpoint.EMA_ITEM, TRAIN_STATE_ITEM)
    self.workdir, self.description, self.metric = workdir, description, config.best_metric
    self.last = ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"), item_names=items,
        options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints,
                                             enable_async_checkpointing=True))
    self.best = ocp.CheckpointManager(
        os.path.join(workdir, "best"), item_names=items,
        options=ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: m[self.metric],
                                             best_mode="max", enable_async_checkpointing=False))
    self.best_path = os.path.join(workdir, "best.json")
    self.best_record = {"value": -math.inf, "step": None}
    if os.path.exists(self.best_path):
      with open(self.best_path) as f:
        self.best_record.update({k: v for k, v in json.load(f).items() if k in self.best_record})
    self.last_saved: int | None = None

  def check_model(self):
    """A workdir holding another model's checkpoints is refused before anything is written."""
    step_ = self.last.latest_step()
    if step_ is None:
      return
    stored = self.last.restore(step_, args=ocp.args.Composite(**{
        checkpoint.MODEL_ITEM: ocp.args.JsonRestore()}))[checkpoint.MODEL_ITEM]
    description = json.loads(json.dumps(self.description))  # as stored: tuples become lists
    if dict(stored) != description:
      old, new = checkpoint.flatten(dict(stored)), checkpoint.flatten(description)
      diff = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
              if old.get(k) != new.get(k)}
      raise ConfigError(
          f"{self.workdir} holds checkpoints of a different model (stored vs configured: {diff}). "
          f"Use another --workdir, or delete that one to start over; nothing was overwritten.")

  def latest_step(self) -> int | None:
    return self.last.latest_step()

  def restore(self, step_: int, abstract_state: dict, state_sh: dict) -> dict:
    """The full train state at `step_`, placed by `state_sh`."""
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_state, state_sh)
    items = {checkpoint.PARAMS_ITEM: ocp.args.StandardRestore(step.persistent(target)),
             TRAIN_STATE_ITEM: ocp.args.StandardRestore(
                 {k: target[k] for k in ("opt_state", "step", "rng")})}
    if "ema" in target:
      items[checkpoint.EMA_ITEM] = ocp.args.StandardRestore(target["ema"])
    restored = self.last.restore(step_, args=ocp.args.Composite(**items))
    stored = checkpoint.flatten(restored[checkpoint.PARAMS_ITEM])
    state = {part: checkpoint.unflatten({k: stored[k] for k in checkpoint.flatten(target[part])})
             for part in ("params", "batch_stats")}
    state.update(restored[TRAIN_STATE_ITEM])
    if "ema" in target:
      state["ema"] = restored[checkpoint.EMA_ITEM]
    self.last_saved = step_
    return state

  def _args(self, state):
    items = {
        checkpoint.MODEL_ITEM: ocp.args.JsonSave(self.description),
        checkpoint.PARAMS_ITEM: ocp.args.StandardSave(step.persistent(state)),
        TRAIN_STATE_ITEM: ocp.args.StandardSave(
            {"opt_state": state["opt_state"], "step": state["step"], "rng": state["rng"]})}
    if "ema" in state:
      items[checkpoint.EMA_ITEM] = ocp.args.StandardSave(state["ema"])
    return ocp.args.Composite(**items)

  def save(self, step_: int, state):
    self.last.save(step_, args=self._args(state), force=True)
    self.last_saved = step_

  def save_if_best(self, step_: int, state, results: dict[str, float]) -> bool:
    """Saves `state` as the best one if its `best_metric` beats the record; records it."""
    value = results[self.metric]
    if value <= self.best_record["value"]:
      return False
    self.best.save(step_, args=self._args(state), metrics={self.metric: value}, force=True)
    self.best_record.update(value=value, step=step_)
    if jax.process_index() == 0:
      with open(self.best_path, "w") as f:
        json.dump({"metric": self.metric, **self.best_record}, f)
    return True

  def close(self):
    self.last.wait_until_finished()
    self.last.close()
    self.best.close()


class PendingMetrics:
  """The step metrics not yet fetched from the device; `drain` fetches and averages them and
  stops the run at the first non-finite step."""

  def __init__(self, ckpts: Checkpoints):
    self.ckpts, self.items = ckpts, []

  def add(self, step_: int, metrics):
    self.items.append((step_, metrics))

  def drain(self) -> dict[str, float]:
    fetched, self.items = jax.device_get(self.items), []
    for s, m in fetched:
      if not m["finite"]:
        raise FloatingPointError(
            f"Loss is {m['loss']} at step {s} (0-based); stopping. The parameters were not "
            f"updated by that step, and the last checkpoint (step {self.ckpts.last_saved or 0}) "
            f"in {self.ckpts.workdir} is intact. Lower the learning rate, enable "
            "optimizer.clip_grad, or use float32.")
    return {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[-1][1]
            if k != "finite"} if fetched else {}


# ==============================================================================================
# Teacher source, initial state, stopping.
# ==============================================================================================
def distillation(config, plan: Plan, mesh, workdir: str,
                 train_source: data.Source) -> distill.Distillation:
  """The run's distillation; a store made for another stream is a config error."""
  try:
    return distill.Distillation.from_config(config, plan, mesh, workdir,
                                            train_source=train_source)
  except distill.StoreError as e:
    raise ConfigError(str(e)) from e


def initial_state(config, model: step.ModelState, ckpts: Checkpoints) -> tuple[dict, int]:
  """(state, first step): the latest checkpoint's, or a fresh (or fine-tuning) init."""
  start = ckpts.latest_step()
  if start is None:
    state = model.init()
    if config.init_checkpoint:
      state = step.init_from_checkpoint(config, state, model.state_sh)
    return state, 0
  state = ckpts.restore(start, model.abstract_state, model.state_sh)
  log(f"Resumed from {ckpts.workdir} at step {start}.")
  return state, start


def stop_requested(local_flag: bool, step_: int, every: int) -> bool:
  """A SIGTERM may reach only some hosts: they agree (at log steps) so all save and stop at the
  same step; a single process reacts at once."""
  if jax.process_count() == 1:
    return local_flag
  if step_ % every:
    return False
  return bool(np.max(multihost_utils.process_allgather(np.int32(local_flag))))


# ==============================================================================================
# The run.
# ==============================================================================================
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       max_steps: int | None = None) -> dict[str, Any]:
  """Trains (resuming from `workdir` if it holds checkpoints) and returns the final metrics.

  max_steps: stop after this many steps in this invocation, with a checkpoint (for time-sliced
  jobs); a later call resumes exactly where this one stopped.
  """
  # --- Plan, mesh and input -------------------------------------------------------------------
  num_devices = jax.device_count()
  validate_config(config, num_devices)
  mesh = sharding.make_mesh(num_devices)
  train_source = data.build_source(config.data)
  eval_source = build_eval_source(config)
  plan = make_plan(config, num_devices, train_source.num_examples, eval_source.num_examples,
                   train_source.num_classes)

  # --- Model, checkpoints (resume or start), teacher ------------------------------------------
  model = step.build_model_state(config, plan, mesh)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  ckpts = Checkpoints(workdir, config, model.description)
  try:
    ckpts.check_model()
    # The teacher is frozen and never part of the student's checkpoints.
    dist = distillation(config, plan, mesh, workdir, train_source)
    state, start = initial_state(config, model, ckpts)
    if jax.process_index() == 0:
      with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    return _loop(config, plan, mesh, model, ckpts, state, start, dist, train_source,
                 eval_source, max_steps)
  finally:
    ckpts.close()


def _loop(config, plan: Plan, mesh, model, ckpts: Checkpoints, state, start: int,
          dist: distill.Distillation, train_source, eval_source, max_steps) -> dict[str, Any]:
  batch_sh = sharding.batch_sharding(mesh)
  train_step = step.jit_train_step(config, plan, model, mesh, dist)
  eval_step = compile_options.jit(evaluation.make_eval_step(model.eval_graphdef))
  preempted = {"flag": False}

  def on_sigterm(signum, frame):
    del signum, frame
    preempted["flag"] = True

  old_handler = signal.signal(signal.SIGTERM, on_sigterm)
  writer = MetricWriter(ckpts.workdir, jax.process_index() == 0)
  accum = (f" ({config.grad_accum_steps} x {plan.micro_batch})"
           if config.grad_accum_steps > 1 else "")
  log(f"Training {config.model} ({model.num_params:,} params) on {plan.num_devices} "
      f"device(s), {jax.process_count()} process(es): {plan.total_steps} steps, "
      f"{plan.steps_per_epoch} per epoch, global batch {plan.global_batch}{accum}"
      f", peak lr {plan.peak_lr:.3g}.")
  it = data.train_iterator(train_source, config.aug, global_batch_size=plan.global_batch,
                           seed=config.seed, start_step=start)
  pending = PendingMetrics(ckpts)
  ckpts.last_saved = start
  final: dict[str, Any] = {}
  t0, done_since_t0 = time.time(), 0
  try:
    for i in range(start, plan.total_steps):
      batch = data.to_global(next(it), batch_sh)
      rows = plan.global_batch // jax.process_count()
      first = jax.process_index() * rows
      batch.update(data.to_global(dist.batch_rows(i, first, first + rows), batch_sh))
      batch.pop("step", None)
      batch.pop("index", None)
      state, metrics = train_step(state, batch, dist.params)
      pending.add(i, metrics)
      done, done_since_t0 = i + 1, done_since_t0 + 1
      if due(done, config.log_every_steps, plan.total_steps):
        _log_progress(plan, writer, pending.drain(), done, time.time() - t0, done_since_t0)
        t0, done_since_t0 = time.time(), 0
      epoch, into_epoch = divmod(done, plan.steps_per_epoch)
      if (into_epoch == 0 and epoch % config.eval_every_epochs == 0) or done == plan.total_steps:
        final = evaluation.evaluate(eval_step, step.persistent(state), state.get("ema"),
                                    eval_source, config, batch_sh)
        log(f"eval at step {done} (epoch {epoch}): " + ", ".join(
            f"{k[5:]} {v:.2f}" for k, v in sorted(final.items())))
        writer.write(done, final)
        if final[config.best_metric] > ckpts.best_record["value"]:
          pending.drain()  # never save a state that went through a non-finite step
          ckpts.save_if_best(done, state, final)
      if due(done, config.checkpoint_every_steps, plan.total_steps):
        pending.drain()
        ckpts.save(done, state)
      if stop_requested(preempted["flag"], done, config.log_every_steps) or (
          max_steps is not None and done - start >= max_steps):
        log(f"{'SIGTERM' if preempted['flag'] else 'max_steps'}: saving step {done} and exiting.")
        if ckpts.last_saved != done:
          pending.drain()
          ckpts.save(done, state)
        break
  finally:
    writer.close()
    signal.signal(signal.SIGTERM, old_handler)
  final = dict(final)
  final["step"] = int(jax.device_get(state["step"]))
  final["preempted"] = preempted["flag"]
  return final


def _log_progress(plan: Plan, writer: MetricWriter, m: dict[str, float], done: int,
                  elapsed: float, steps: int):
  ips = steps * plan.global_batch / max(elapsed, 1e-9)
  eta = (plan.total_steps - done) * elapsed / max(steps, 1)
  log(f"step {done}/{plan.total_steps} epoch {done / plan.steps_per_epoch:.2f} "
      f"loss {m['loss']:.4f} lr {m['lr']:.3e} {ips:.1f} img/s eta {fmt_time(eta)}")
  writer.write(done, {f"train/{k}": v for k, v in m.items()} | {"train/img_per_s": ips})
