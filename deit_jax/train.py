"""The training loop: config -> mesh -> input -> model -> sharded state -> checkpoints -> steps.

Read it top to bottom. The plan (config checks, derived sizes) is `deit_jax.plan`; the step and
the state it carries are `deit_jax.step`; this module only runs them: it owns the checkpoint
managers (`Checkpoints`), the metric writer and SIGTERM. Nothing imports it but the launcher's
dispatcher (`deit_jax.run`).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import socket
import time
from typing import Any, Iterable, Iterator

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from deit_jax import (checkpoint, compile_options, data, distill, evaluation, sharding, step,
                      summary)
from deit_jax.plan import ConfigError, Plan, build_eval_source, make_plan, validate_config
from deit_jax.progress import MetricWriter, fmt_time, log

TRAIN_STATE_ITEM = "train_state"


def due(done: int, every: int, total: int) -> bool:
  """The one "every N steps, or at the end" rule of the loop (logs, checkpoints)."""
  return done % every == 0 or done == total


# ==============================================================================================
# The workdir lock, the stored run config, metrics.jsonl after a resume.
# ==============================================================================================
LOCK_FILE = "run.lock"
PREEMPTED_EXIT_STATUS = 75  # EX_TEMPFAIL: preempted, a checkpoint was saved; requeue the job
# Config fields a resumed run may change without `allow_config_change`: they change what is
# logged, evaluated or kept, never the trained parameters. Everything else (seed, batch, epochs or
# total_steps -- the cosine runs over the whole run --, optimizer, data, aug, mixup,
# distillation, model_kw, sharding, ...) breaks the bit-exact resume and is refused. The teacher's
# paths may move: its weights (teacher.json) and a store's fingerprint are checked anyway.
RESUME_MAY_CHANGE = ("log_every_steps", "eval_every_epochs", "checkpoint_every_steps",
                     "keep_checkpoints", "eval_batch_size", "allow_config_change",
                     "teacher.checkpoint", "teacher.precomputed_dir")


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def acquire_lock(workdir: str) -> str | None:
  """`<workdir>/run.lock` ({host, pid}) for process 0, or ConfigError naming the live holder; a
  lock of a dead process on this host is recovered. Returns the lock's path (None elsewhere)."""
  if jax.process_index() != 0:
    return None
  path, host = os.path.join(workdir, LOCK_FILE), socket.gethostname()
  for _ in range(3):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      try:
        with open(path) as f:
          holder = json.load(f)
      except (OSError, ValueError):
        holder = {}
      if not holder and time.time() - os.path.getmtime(path) < 10:
        holder = {"host": "?", "pid": "?"}  # being written right now
      if holder and not (holder.get("host") == host and not _alive(int(holder["pid"]))):
        raise ConfigError(
            f"{workdir} is in use by another run (host {holder.get('host')}, pid "
            f"{holder.get('pid')}): one run per workdir. Wait for it, stop it, or use another "
            f"--workdir; if that process is gone for good, delete {path}.")
      log(f"Recovering the stale lock {path} of a dead process ({holder or 'unreadable'}).")
      os.remove(path)
      continue
    with os.fdopen(fd, "w") as f:
      json.dump({"host": host, "pid": os.getpid(), "started": time.time()}, f)
    return path
  raise ConfigError(f"Could not take the lock {path}.")


def release_lock(path: str | None):
  if path is None:
    return
  try:
    with open(path) as f:
      mine = json.load(f).get("pid") == os.getpid()
  except (OSError, ValueError):
    mine = False
  if mine:
    os.remove(path)


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_changes(config, workdir: str) -> dict[str, list]:
  """{field: [stored, now]} against the config of the run the workdir resumes ({} for a new
  run); ConfigError listing them if one breaks exactness and config.allow_config_change is off."""
  path = os.path.join(workdir, "config.json")
  if not (checkpoint.step_folders(os.path.join(workdir, "checkpoints"))
          and os.path.exists(path)):
    return {}
  with open(path) as f:
    old = _flat(json.load(f))
  new = _flat(json.loads(config.to_json_best_effort()))
  diff = {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new))
          if old.get(k) != new.get(k)}
  breaking = [k for k in diff if k not in RESUME_MAY_CHANGE]
  if breaking and not config.get("allow_config_change", False):
    lines = "\n  ".join(f"{k}: stored {diff[k][0]!r}, this run {diff[k][1]!r}" for k in breaking)
    raise ConfigError(
        f"{workdir} holds a run with another config; resuming it with this one would not "
        f"continue it exactly. What differs:\n  {lines}\nUse the stored config (config.json), "
        "another --workdir, or --config.allow_config_change=True to continue with the change "
        "(recorded in config_changes.jsonl).")
  return diff


def record_config(config, workdir: str, changes: dict, start: int):
  """config.json (this run's config), and the changes it made, with the step, appended to
  config_changes.jsonl."""
  if jax.process_index() != 0:
    return
  if changes:
    with open(os.path.join(workdir, "config_changes.jsonl"), "a") as f:
      f.write(json.dumps({"step": start, "time": time.time(), "changes": changes}) + "\n")
    log(f"Resuming at step {start} with a changed config: {changes}.")
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))


def trim_metrics(workdir: str, start: int):
  """Drops the metrics.jsonl records beyond the restored step (and a torn last line): the
  resumed run writes them again."""
  path = os.path.join(workdir, "metrics.jsonl")
  if jax.process_index() != 0 or not os.path.exists(path):
    return
  kept, dropped = [], 0
  with open(path) as f:
    for line in f:
      try:
        ok = json.loads(line)["step"] <= start
      except (ValueError, KeyError, TypeError):
        ok = False
      if ok:
        kept.append(line)
      dropped += not ok
  if dropped:
    with open(path + ".tmp", "w") as f:
      f.writelines(kept)
    os.replace(path + ".tmp", path)


# ==============================================================================================
# Checkpoints: the regular manager, the best one and its record, in one object.
# ==============================================================================================
class Checkpoints:
  """`<workdir>/checkpoints` (the last `keep_checkpoints` steps, written asynchronously, each with
  a `sha256.json` once committed) and `<workdir>/best` (the step with the best `best_metric`,
  recorded in `best.json`). A step that already exists is moved to `<workdir>/superseded/`
  before it is written again (a best step re-evaluated after a resume, a corrupt step)."""

  def __init__(self, workdir: str, config, description: dict):
    items = (checkpoint.MODEL_ITEM, checkpoint.PARAMS_ITEM, checkpoint.EMA_ITEM, TRAIN_STATE_ITEM)
    self.workdir, self.description, self.metric = workdir, description, config.best_metric
    self.last = ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"), item_names=items,
        options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints,
                                             enable_async_checkpointing=True))
    # Old best steps are deleted by `save_if_best` itself, once the new one is written.
    self.best = ocp.CheckpointManager(
        os.path.join(workdir, "best"), item_names=items,
        options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False))
    self.best_path = os.path.join(workdir, "best.json")
    self.best_record = {"value": -math.inf, "step": None}
    if os.path.exists(self.best_path):
      with open(self.best_path) as f:
        self.best_record.update({k: v for k, v in json.load(f).items() if k in self.best_record})
    if self.best_record["step"] is not None and self.best_record["step"] not in (
        self.best.all_steps()):
      log(f"best.json names step {self.best_record['step']}, which {workdir}/best does not "
          "hold; the next eval becomes the best.")
      self.best_record = {"value": -math.inf, "step": None}
    self.last_saved: int | None = None
    self._unsummed: list[int] = []

  def step_dir(self, step_: int) -> str:
    return os.path.join(self.workdir, "checkpoints", str(step_))

  def candidates(self) -> Iterator[int]:
    """The steps to resume from, newest first, each verified against its recorded checksums only
    when reached (a resume reads one step's files, not every kept step's); a step whose files
    differ is skipped with a warning (and kept on disk)."""
    for s in sorted(self.last.all_steps(), reverse=True):
      problems = checkpoint.checksum_problems(self.step_dir(s))
      if problems:
        log(f"WARNING: checkpoint step {s} in {self.workdir}/checkpoints is corrupt "
            f"({', '.join(problems[:5])}); skipping it (nothing deleted).")
        continue
      yield s

  def check_model(self, step_: int | None):
    """A workdir holding another model's checkpoints is refused before anything is written."""
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

  def _set_aside(self, mngr: ocp.CheckpointManager, name: str, step_: int):
    """Moves an existing step out of the manager's way (to `<workdir>/superseded/`)."""
    if jax.process_index() == 0:
      dest = os.path.join(self.workdir, "superseded", f"{name}_{step_}_{int(time.time() * 1e3)}")
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      os.rename(os.path.join(self.workdir, name, str(step_)), dest)
      log(f"{name}/{step_} existed already: moved to {dest}.")
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"set_aside_{name}_{step_}")
    mngr.reload()

  def _write_checksums(self):
    """Checksums of the committed steps that have none yet (after the async save finished)."""
    self.last.wait_until_finished()
    if jax.process_index() == 0:
      for s in self._unsummed:
        if os.path.isdir(self.step_dir(s)):
          checkpoint.write_checksums(self.step_dir(s))
    self._unsummed = []

  def save(self, step_: int, state):
    self._write_checksums()
    if step_ in self.last.all_steps():
      self._set_aside(self.last, "checkpoints", step_)
    self.last.save(step_, args=self._args(state), force=True)
    self._unsummed.append(step_)
    self.last_saved = step_

  def save_if_best(self, step_: int, state, results: dict[str, float]) -> bool:
    """Saves `state` as the best one if its `best_metric` beats the record; records it."""
    value = results[self.metric]
    if value <= self.best_record["value"]:
      return False
    if step_ in self.best.all_steps():  # e.g. a resumed run evaluating that step again
      self._set_aside(self.best, "best", step_)
    self.best.save(step_, args=self._args(state), force=True)
    self.best.wait_until_finished()
    for s in self.best.all_steps():
      if s != step_:
        self.best.delete(s)
    self.best_record.update(value=value, step=step_)
    if jax.process_index() == 0:
      with open(self.best_path + ".tmp", "w") as f:
        json.dump({"metric": self.metric, **self.best_record}, f)
      os.replace(self.best_path + ".tmp", self.best_path)
    return True

  def close(self):
    self._write_checksums()
    self.last.close()
    self.best.close()


def nan_hints(config, plan: Plan) -> str:
  """The fixes that apply to this run for a non-finite step."""
  o = config.optimizer
  if not math.isfinite(o.lr):
    return f"config.optimizer.lr is {o.lr}: set a finite learning rate"
  hints = [f"lower the learning rate (peak {plan.peak_lr:.3g})"]
  hints.append("enable optimizer.clip_grad (e.g. 1.0)" if o.clip_grad is None else
               f"a smaller optimizer.clip_grad (now {o.clip_grad})")
  if config.model_kw.get("dtype", "float32") != "float32":
    hints.append(f"model_kw.dtype=float32 (now {config.model_kw.dtype})")
  return ", or ".join(hints)


class PendingMetrics:
  """The step metrics: `check` fetches those still on the device (stopping the run at the first
  non-finite step) and keeps them; `means` averages every step since the last call."""

  def __init__(self, ckpts: Checkpoints, hints: str = ""):
    self.ckpts, self.hints, self.items, self.fetched = ckpts, hints, [], []

  def add(self, step_: int, metrics):
    self.items.append((step_, metrics))

  def check(self):
    fetched, self.items = jax.device_get(self.items), []
    for s, m in fetched:
      if not m["finite"]:
        raise FloatingPointError(self.message(s, m))
    self.fetched.extend(fetched)

  def message(self, s: int, m) -> str:
    what = ("loss" if not m.get("finite_loss", m["finite"]) else
            "gradient" if not m.get("finite_grads", True) else "update")
    last, where = self.ckpts.last_saved, os.path.join(self.ckpts.workdir, "checkpoints")
    kept = (f"No checkpoint of this run exists yet (in {where})." if last is None else
            f"The last checkpoint, step {last} in {where}, is intact.")
    return (f"Non-finite {what} at step {s} (0-based): loss {m['loss']}, gradient norm "
            f"{m['grad_norm']}; stopping. The parameters were not updated by that step. {kept} "
            f"Try: {self.hints or 'a lower learning rate'}.")

  def means(self) -> dict[str, float]:
    self.check()
    fetched, self.fetched = self.fetched, []
    return {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[-1][1]
            if not k.startswith("finite")} if fetched else {}


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


def initial_state(config, model: step.ModelState, ckpts: Checkpoints,
                  candidates: Iterable[int]) -> tuple[dict, int]:
  """(state, first step): the newest restorable checkpoint's (a step that fails to restore is
  skipped with a warning), or a fresh (or fine-tuning) init when the workdir holds none."""
  for s in candidates:
    try:
      state = ckpts.restore(s, model.abstract_state, model.state_sh)
    except Exception as e:  # noqa: BLE001 - Orbax raises many types for a broken step
      log(f"WARNING: checkpoint step {s} in {ckpts.workdir}/checkpoints cannot be restored "
          f"({type(e).__name__}: {str(e)[:200]}); skipping it (nothing deleted).")
      continue
    log(f"Resumed from {ckpts.workdir} at step {s}.")
    ckpts.last_saved = s  # what a NaN message names and a stop at this step need not rewrite
    return state, s
  if ckpts.latest_step() is not None:
    raise checkpoint.CheckpointError(
        f"No checkpoint step in {ckpts.workdir}/checkpoints is intact (steps "
        f"{sorted(ckpts.last.all_steps())}); nothing was deleted. Move them away to start over.")
  state = model.init()
  if config.init_checkpoint:
    state = step.init_from_checkpoint(config, state, model.state_sh)
  return state, 0


# Hosts agree on a stop every STOP_SYNC_EVERY steps (a SIGTERM is honoured within that many
# steps, seconds on a pod). The all-gather of one int32 is cheap, but it makes the host wait for
# the step in flight, so doing it every step would cost the overlap of host and device work.
STOP_SYNC_EVERY = 10


def stop_requested(local_flag: bool, step_: int, *, agree_now: bool = False) -> bool:
  """A SIGTERM may reach only some hosts: they agree so all save and stop at the same step (and
  all report the SIGTERM); a single process reacts at once."""
  if jax.process_count() == 1:
    return local_flag
  if step_ % STOP_SYNC_EVERY and not agree_now:
    return False
  return bool(np.max(multihost_utils.process_allgather(np.int32(local_flag))))


class Preemption:
  """The SIGTERM handler, installed for the whole run (before anything slow)."""

  def __init__(self):
    self.flag = False
    self._old = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self.flag = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._old)


# ==============================================================================================
# The run.
# ==============================================================================================
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       max_steps: int | None = None,
                       config_spec: str | None = None) -> dict[str, Any]:
  """Trains (resuming from `workdir` if it holds checkpoints) and returns the final metrics,
  "step", "total_steps", "preempted" and "summary", what the run printed at its end (`_report`).

  max_steps: stop after this many steps in this invocation, with a checkpoint (for time-sliced
  jobs); a later call resumes exactly where this one stopped. A SIGTERM saves and stops too
  (result["preempted"]; launch.py then exits with PREEMPTED_EXIT_STATUS).
  config_spec: the --config argument of launch.py (e.g. configs/demo_distill.py:hard), for the
  commands the summary suggests.
  """
  preemption = Preemption()
  lock = None
  try:
    num_devices = jax.device_count()
    validate_config(config, num_devices)
    shown, workdir = workdir, os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    lock = acquire_lock(workdir)
    return _report(_run(config, workdir, num_devices, preemption, max_steps), shown,
                   config_spec)
  finally:
    release_lock(lock)
    preemption.restore()


def _run(config, workdir: str, num_devices: int, preemption: Preemption,
         max_steps) -> dict[str, Any]:
  # --- Plan, mesh and input -------------------------------------------------------------------
  mesh = sharding.make_mesh(num_devices)
  train_source = data.build_source(config.data)
  eval_source = build_eval_source(config)
  plan = make_plan(config, num_devices, train_source.num_examples, eval_source.num_examples,
                   train_source.num_classes)

  # --- Model, checkpoints (resume or start), teacher ------------------------------------------
  model = step.build_model_state(config, plan, mesh)
  ckpts = Checkpoints(workdir, config, model.description)
  try:
    candidates = ckpts.candidates()
    newest = next(candidates, None)
    ckpts.check_model(newest)
    changes = config_changes(config, workdir)  # another model: check_model's message first
    if newest is not None and newest >= plan.total_steps:  # a finished run started again
      record_config(config, workdir, changes, newest)
      return {**summary.last_eval(summary.read_metrics(workdir)), "step": newest,
              "total_steps": plan.total_steps, "preempted": False, "complete": True}
    # The teacher is frozen and never part of the student's checkpoints.
    dist = distillation(config, plan, mesh, workdir, train_source)
    state, start = initial_state(config, model, ckpts,
                                 itertools.chain([] if newest is None else [newest], candidates))
    record_config(config, workdir, changes, start)
    trim_metrics(workdir, start)
    return _loop(config, plan, mesh, model, ckpts, state, start, dist, train_source,
                 eval_source, max_steps, preemption)
  finally:
    ckpts.close()


def _batch(i: int, it, dist: distill.Distillation, plan: Plan, batch_sh) -> dict:
  batch = data.to_global(next(it), batch_sh)
  rows = plan.global_batch // jax.process_count()
  first = jax.process_index() * rows
  batch.update(data.to_global(dist.batch_rows(i, first, first + rows), batch_sh))
  batch.pop("step", None)
  batch.pop("index", None)
  return batch


def _loop(config, plan: Plan, mesh, model, ckpts: Checkpoints, state, start: int,
          dist: distill.Distillation, train_source, eval_source, max_steps,
          preemption: Preemption) -> dict[str, Any]:
  batch_sh = sharding.batch_sharding(mesh)
  train_step = step.jit_train_step(config, plan, model, mesh, dist)
  # Each eval also compares the heads with the teacher (the run's own, or a precomputed run's
  # teacher.checkpoint when it exists) and reports the token similarity.
  eval_teacher = distill.eval_teacher(config, mesh, plan.num_classes, dist)
  eval_step = compile_options.jit(evaluation.make_eval_step(model.eval_graphdef, eval_teacher))
  writer = MetricWriter(ckpts.workdir, jax.process_index() == 0)
  accum = (f" ({config.grad_accum_steps} x {plan.micro_batch})"
           if config.grad_accum_steps > 1 else "")
  log(f"Training {config.model} ({model.num_params:,} params) on {plan.num_devices} "
      f"device(s), {jax.process_count()} process(es): {plan.total_steps} steps, "
      f"{plan.steps_per_epoch} per epoch, global batch {plan.global_batch}{accum}"
      f", peak lr {plan.peak_lr:.3g}.")
  it = data.train_iterator(train_source, config.aug, global_batch_size=plan.global_batch,
                           seed=config.seed, start_step=start)
  pending = PendingMetrics(ckpts, nan_hints(config, plan))
  final: dict[str, Any] = {}
  # A SIGTERM during start-up (data, model, restore) stops before the first step.
  preempted = start < plan.total_steps and stop_requested(preemption.flag, start, agree_now=True)
  if preempted:
    _save_and_stop(ckpts, pending, state, start, "SIGTERM")
  t0, done_since_t0 = time.time(), 0
  wall0 = t0 - (summary.wall_time(summary.read_metrics(ckpts.workdir)) or 0)  # over resumes
  try:
    for i in range(start, start if preempted else plan.total_steps):
      state, metrics = train_step(state, _batch(i, it, dist, plan, batch_sh), dist.params)
      pending.add(i, metrics)
      done, done_since_t0 = i + 1, done_since_t0 + 1
      if due(done, config.log_every_steps, plan.total_steps):
        _log_progress(plan, writer, pending.means(), done, time.time() - t0, done_since_t0,
                      time.time() - wall0)
        t0, done_since_t0 = time.time(), 0
      epoch, into_epoch = divmod(done, plan.steps_per_epoch)
      best = None
      if (into_epoch == 0 and epoch % config.eval_every_epochs == 0) or done == plan.total_steps:
        final = evaluation.evaluate(eval_step, step.persistent(state), state.get("ema"),
                                    eval_source, config, batch_sh, eval_teacher)
        log(f"eval at step {done} (epoch {epoch}): " + ", ".join(
            f"{k[5:]} {v:.2f}" for k, v in sorted(final.items())))
        writer.write(done, final)
        best = final if final[config.best_metric] > ckpts.best_record["value"] else None
      if due(done, config.checkpoint_every_steps, plan.total_steps):
        pending.check()  # never save a state that went through a non-finite step
        ckpts.save(done, state)
      if best is not None:  # after the regular checkpoint: neither can block the other
        pending.check()
        ckpts.save_if_best(done, state, best)
      preempted = stop_requested(preemption.flag, done)
      if preempted or (max_steps is not None and done - start >= max_steps):
        _save_and_stop(ckpts, pending, state, done, "SIGTERM" if preempted else "max_steps")
        break
  finally:
    writer.close()
  final = dict(final)
  final["step"] = int(jax.device_get(state["step"]))
  final["preempted"] = preempted
  final["total_steps"] = plan.total_steps
  return final


def _save_and_stop(ckpts: Checkpoints, pending: PendingMetrics, state, done: int, why: str):
  log(f"{why}: saving step {done} and exiting.")
  if ckpts.last_saved != done:
    pending.check()
    ckpts.save(done, state)


def _log_progress(plan: Plan, writer: MetricWriter, m: dict[str, float], done: int,
                  elapsed: float, steps: int, wall: float):
  """The progress line, and its metrics with `wall`, the run's training seconds so far."""
  ips = steps * plan.global_batch / max(elapsed, 1e-9)
  eta = (plan.total_steps - done) * elapsed / max(steps, 1)
  log(f"step {done}/{plan.total_steps} epoch {done / plan.steps_per_epoch:.2f} "
      f"loss {m['loss']:.4f} lr {m['lr']:.3e} {ips:.1f} img/s eta {fmt_time(eta)}")
  writer.write(done, {f"train/{k}": v for k, v in m.items()}
               | {"train/img_per_s": ips, summary.WALL_KEY: wall})


def _report(result: dict[str, Any], workdir: str, config_spec: str | None) -> dict[str, Any]:
  """Prints how the run ended: the summary of a finished run (also written to summary.md), or
  how to resume one that stopped early; returns `result` with it as "summary"."""
  done, total = result["step"], result["total_steps"]
  if done < total:
    text = summary.stopped(workdir, done, total, "SIGTERM" if result["preempted"] else
                           "max_steps", config_spec)
  else:
    text = summary.build(workdir, config_spec)
    if jax.process_index() == 0:
      summary.write(workdir, text)
    if result.pop("complete", False):
      log(f"{workdir} is complete (step {done}/{total}); nothing to train.")
  log(text)
  return {**result, "summary": text}
