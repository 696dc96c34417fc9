"""What `launch.py --mode=...` runs: train, eval, benchmark, precompute_teacher."""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from deit_jax import checkpoint, compile_options, data, distill, evaluation, models, sharding, step
from deit_jax.plan import (ConfigError, build_eval_source, check_eval_checkpoint,
                           check_eval_classes, synthetic_plan, validate_config)
from deit_jax.progress import log

# The mistakes a person running a config makes (config, data, checkpoint, teacher): the launcher
# prints their message, without a traceback, and exits with status 2.
USER_ERRORS = (ConfigError, checkpoint.CheckpointError, distill.TeacherError, data.DataError)


def _train(config, workdir: str, checkpoint_dir: str | None, config_spec: str | None = None):
  del checkpoint_dir
  from deit_jax import train  # the loop: a leaf that only this dispatcher imports
  return train.train_and_evaluate(config, workdir, config_spec=config_spec)


def _precompute(config, workdir: str, checkpoint_dir: str | None):
  del checkpoint_dir
  from deit_jax import precompute
  return precompute.precompute_teacher(config, workdir)


def run(mode: str, config: ml_collections.ConfigDict, workdir: str, *,
        checkpoint: str | None = None, step: int | None = None, config_spec: str | None = None):
  """step: --mode=eval only, the checkpoint step to evaluate (default: the latest).
  config_spec: the --config argument, named by the commands a training run's summary suggests."""
  if mode not in MODES:
    raise ValueError(f"Unknown mode {mode!r}; use one of {', '.join(MODES)}.")
  if step is not None and mode != "eval":
    raise ConfigError(f"--step={step} is for --mode=eval (training resumes from the latest step).")
  from deit_jax import experiment  # noqa: PLC0415 - a leaf like train
  if experiment.is_experiment(config):
    if mode != "train":
      raise ConfigError(
          f"This config is the experiment {config.experiment!r} (a teacher and students, each "
          f"its own run in {workdir}/<run>, <run> one of teacher, "
          f"{', '.join(config.students.keys())}); --mode={mode} takes one run's config and "
          f"checkpoint, e.g. for the demo: --config configs/demo_distill.py:hard --checkpoint "
          f"workdirs/demo/hard.")
    return experiment.run_experiment(config, workdir)
  options = {"step": step} if step is not None else {}
  if mode == "train":
    options["config_spec"] = config_spec
  return MODES[mode](config, workdir, checkpoint, **options)


def resolve_checkpoint(path: str | None, workdir: str, step: int | None = None
                       ) -> tuple[str, int | None]:
  """(checkpoint directory, step) for --checkpoint PATH [--step N]: PATH may be a checkpoint
  directory, one of its step folders (e.g. workdir/checkpoints/400: that step) or a training
  workdir (its checkpoints/); None is the workdir's checkpoints. CheckpointError if none is."""
  if path is None:
    path = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(path):
      raise checkpoint.CheckpointError(
          f"{workdir} holds no checkpoints/ (nothing trained there yet): train with this "
          "--config and --workdir first, or pass --checkpoint DIR.")
  path = os.path.normpath(path)
  if not os.path.isdir(path):
    raise checkpoint.CheckpointError(f"--checkpoint {path}: no such directory.")
  if checkpoint.step_folders(path):
    return path, step
  parent, name = os.path.split(path)
  if name.isdigit() and int(name) in checkpoint.step_folders(parent or "."):
    if step is not None and step != int(name):
      raise checkpoint.CheckpointError(
          f"--checkpoint {path} is step {name} of {parent}, but --step={step}: pass "
          f"--checkpoint {parent} --step={step}.")
    return parent, int(name)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return resolve_checkpoint(os.path.join(path, "checkpoints"), workdir, step)
  raise checkpoint.CheckpointError(
      f"--checkpoint {path} holds no checkpoint steps: pass the directory written by "
      "`python -m deit_jax.convert` or a training run's <workdir>/checkpoints.")


def _variables(model) -> tuple:
  """(eval graphdef, parameters + BatchNorm statistics as one string-keyed tree)."""
  graphdef, *states = nnx.split(model, nnx.Param, nnx.BatchStat)
  return graphdef, checkpoint.merge_trees(*(step.str_keys(s) for s in states))


def run_eval(config, workdir: str, checkpoint_dir: str | None = None, step: int | None = None
             ) -> dict[str, float]:
  """Top-1/top-5 of a checkpoint (converted or trained; DeiT or CNN; `resolve_checkpoint`) on
  config's eval split, every head, and the EMA when the checkpoint is a training run's; with a
  teacher at config.teacher.checkpoint, its numbers and each head's agreement with it; a
  distilled DeiT's token similarity. Prints a table, writes <workdir>/eval.json. A checkpoint
  of another model or class count than the config's is refused before anything loads."""
  ckpt_dir, step = resolve_checkpoint(checkpoint_dir, workdir, step)
  description, step = checkpoint.read_description(ckpt_dir, step)
  num_classes = check_eval_checkpoint(config, description, ckpt_dir)
  source = build_eval_source(config)
  check_eval_classes(source.num_classes, num_classes, ckpt_dir, "the eval split")
  # aug.eval_input_size (DeiT III: trained at 192, evaluated at 224) resizes a DeiT's position
  # grid on load; otherwise the eval transform follows the checkpoint's resolution.
  resize = {}
  if config.aug.get("eval_input_size") and description.get("family") == "deit":
    resize = {"img_size": int(config.aug.eval_input_size)}
  model = checkpoint.load_model(ckpt_dir, step=step, **resize)
  try:
    ema = checkpoint.load_model(ckpt_dir, step=step, ema=True, **resize)
  except checkpoint.CheckpointError:
    ema = None  # converted weights and runs without EMA have none
  config = ml_collections.ConfigDict(config.to_dict())
  if isinstance(model, models.DeiT):
    config.aug.input_size = model.config.img_size
    config.aug.eval_input_size = None
  mesh = sharding.make_mesh()
  teacher = distill.eval_teacher(config, mesh, num_classes)
  graphdef, variables = _variables(model)
  variables = jax.device_put(variables, sharding.replicated(mesh))
  ema_vars = None if ema is None else jax.device_put(_variables(ema)[1],
                                                     sharding.replicated(mesh))
  eval_step = compile_options.jit(evaluation.make_eval_step(graphdef, teacher))
  results = evaluation.evaluate(eval_step, variables, ema_vars, source, config,
                                sharding.batch_sharding(mesh), teacher)
  log(f"eval of {ckpt_dir} (step {step}):\n{evaluation.table(results)}")
  if jax.process_index() == 0:
    _write_eval_json(workdir, results, ckpt_dir, step, config if teacher else None)
  return results


def _write_eval_json(workdir: str, results: dict, ckpt_dir: str, step: int, teacher_config):
  """<workdir>/eval.json: the checkpoint, its step, the table by head, the teacher (when
  `teacher_config`, the config it came from, is given), the token similarity, and every
  'eval/...' number."""
  heads = evaluation.by_head(results)
  teacher = heads.pop("teacher", None)
  if teacher is not None:
    tcfg = teacher_config.teacher
    teacher = {"checkpoint": os.path.abspath(tcfg.checkpoint),
               "img_size": tcfg.img_size or teacher_config.aug.input_size, **teacher}
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump({"checkpoint": os.path.abspath(ckpt_dir), "step": step,
               "num_images": int(results["eval/count"]), "heads": heads, "teacher": teacher,
               "token_cos": results.get("eval/token_cos"), **results}, f, indent=2)


def run_benchmark(config, *, warmup: int = 2, iters: int = 10) -> dict[str, float]:
  """Images/s of inference (eval_batch_size) and of a train step (batch_size, no teacher) for the
  config's model on random data, on all devices. Compilation is excluded."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.distillation.kind = "none"
  num_devices = jax.device_count()
  validate_config(config, num_devices)
  mesh = sharding.make_mesh(num_devices)
  plan = synthetic_plan(config, num_devices)
  student = step.build_model_state(config, plan, mesh)
  size = config.aug.input_size

  def images(n):
    return jax.device_put(jnp.zeros((n, size, size, 3), jnp.float32),
                          sharding.batch_sharding(mesh))

  def timed(fn, state):
    """Seconds per call of state -> state, after `warmup` calls."""
    for _ in range(warmup):
      state = fn(state)
    jax.block_until_ready(state)
    t = time.perf_counter()
    for _ in range(iters):
      state = fn(state)
    jax.block_until_ready(state)
    return (time.perf_counter() - t) / iters

  state = student.init()
  infer = compile_options.jit(lambda v, x: nnx.merge(student.eval_graphdef, v)(x))
  eval_images = images(config.eval_batch_size)
  variables = step.persistent(state)
  infer_s = timed(lambda out: infer(variables, eval_images), None)

  train_step = step.jit_train_step(config, plan, student, mesh)
  batch = {"image": images(config.batch_size),
           "label": jax.device_put(jnp.zeros((config.batch_size,), jnp.int32),
                                   sharding.batch_sharding(mesh))}
  train_s = timed(lambda st: train_step(st, batch, None)[0], state)
  result = {"model": config.model, "devices": num_devices,
            "device_kind": jax.devices()[0].device_kind, "dtype": config.model_kw.dtype,
            "inference_batch": config.eval_batch_size,
            "inference_img_per_s": round(config.eval_batch_size / infer_s, 1),
            "train_batch": config.batch_size,
            "train_img_per_s": round(config.batch_size / train_s, 1)}
  log(json.dumps(result))
  return result


# What `launch.py --mode=NAME` runs: (config, workdir, --checkpoint) -> results.
MODES = {
    "train": _train,
    "eval": run_eval,
    "benchmark": lambda config, workdir, checkpoint_dir: run_benchmark(config),
    "precompute_teacher": _precompute,
    "visualize": lambda *args: __import__("deit_jax.visualize").visualize.run_visualize(*args),
}
