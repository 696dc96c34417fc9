r"""Runs a deit_jax config: training (default), evaluation, or a throughput benchmark.

  python launch.py --config configs/demo.py
  python launch.py --config configs/deit_b.py --workdir gs://bucket/deit_b --config.batch_size=2048
  python launch.py --config configs/deit_s.py --mode=eval --checkpoint ckpt/deit_small
  python launch.py --config configs/deit_b.py --mode=benchmark

Multi-host: on Cloud TPU pods and under SLURM `jax.distributed.initialize()` finds the cluster
by itself; elsewhere pass --coordinator_address=host:port --num_processes=N --process_id=i on
every host. Only process 0 writes logs.

Mistakes in the config, the data, a checkpoint or the teacher print one message saying what is
wrong and how to fix it, and exit with status 2; --traceback (or DEIT_JAX_TRACEBACK=1) shows the
traceback instead.
"""

import difflib
import glob
import os
import re
import sys

# TensorFlow (used for tf.data only) is chatty at import.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/deit_b.py.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default: workdirs/<config>).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "benchmark", "precompute_teacher",
                                            "visualize"],
                          "What to run.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "--mode=eval: checkpoint directory, one of its step folders, or a "
    "training workdir (default: the workdir's checkpoints).")
_STEP = flags.DEFINE_integer("step", None, "--mode=eval: the checkpoint step (default: latest).")
_TRACEBACK = flags.DEFINE_bool("traceback", False, "Show the traceback of a config, data, "
                               "checkpoint or teacher error (also DEIT_JAX_TRACEBACK=1).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (hosts).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config"])


def _cluster_detected() -> bool:
  """TPU pods and SLURM jobs of several tasks, which jax.distributed detects on its own."""
  env = os.environ
  if int(env.get("SLURM_NTASKS", "1")) > 1:
    return True
  return "," in env.get("TPU_WORKER_HOSTNAMES", "") or "MEGASCALE_COORDINATOR_ADDRESS" in env


def _default_workdir() -> str:
  """workdirs/<config file name>[_<config argument>], e.g. workdirs/demo_distill_hard."""
  path, _, arg = flags.FLAGS["config"].config_filename.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join("workdirs", name + (f"_{re.sub(r'[^A-Za-z0-9]+', '_', arg)}" if arg else ""))


# ----------------------------------------------------------------------------------------------
# Mistakes on the command line: one message each, status 2, before anything heavy runs.
# ----------------------------------------------------------------------------------------------
ROOT = os.path.dirname(os.path.abspath(__file__))
HELP_FLAGS = ("help", "h", "?", "helpshort", "helpfull", "helpxml")


def _show_traceback(argv) -> bool:
  return os.environ.get("DEIT_JAX_TRACEBACK", "") not in ("", "0") or "--traceback" in argv


def _fail(message: str):
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def _shown(path: str) -> str:
  """A path as the person would type it: relative to the current directory when inside it."""
  rel = os.path.relpath(path)
  return path if rel.startswith("..") else rel


def _config_arg(argv) -> str | None:
  """The --config value on the command line, or None."""
  for i, a in enumerate(argv[1:], 1):
    if a in ("--config", "-config"):
      return argv[i + 1] if i + 1 < len(argv) else None
    if a.startswith(("--config=", "-config=")):
      return a.split("=", 1)[1]
  return None


def _override_args(argv) -> list[tuple[str, str | None]]:
  """(field path, value or None) of each --config.a.b[=v] on the command line."""
  out = []
  for i, a in enumerate(argv[1:], 1):
    name, eq, value = a.lstrip("-").partition("=")
    if a.startswith("-") and name.startswith(("config.", "noconfig.")):
      if not eq:
        value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("-") else None
      out.append((name.split(".", 1)[1], value))
  return out


def _known_configs() -> list[str]:
  return sorted(_shown(p) for p in glob.glob(os.path.join(ROOT, "configs", "*.py")))


def config_file_error(arg: str | None) -> str | None:
  """What is wrong with `--config arg` (missing, or no such file), or None."""
  known = ", ".join(_known_configs())
  if not arg:
    return f"--config is required, e.g. --config configs/demo.py; the configs: {known}."
  path = arg.partition(":")[0]
  if os.path.isfile(path):
    return None
  close = difflib.get_close_matches(path, _known_configs(), n=1)
  hint = f"did you mean --config {close[0]}? " if close else ""
  return f"--config {arg}: the file {path} does not exist; {hint}the configs: {known}."


def override_error(config, path: str, value: str | None = None) -> str | None:
  """What is wrong with --config.<path>[=value] for `config` (no such field, or a group given a
  value), or None."""
  import ml_collections
  node, done = config, []
  for key in path.split("."):
    if not isinstance(node, ml_collections.ConfigDict):
      return (f"--config.{path}: config.{'.'.join(done)} is a value ({node!r}), not a group of "
              f"fields; set --config.{'.'.join(done)}=VALUE.")
    if key not in node:
      close = difflib.get_close_matches(key, list(node.keys()), n=3)
      prefix = "--config." + "".join(d + "." for d in done)
      if close:
        return (f"--config.{path}: no such config field; did you mean "
                f"{' or '.join(prefix + c for c in close)}?")
      return (f"--config.{path}: no such config field; {prefix}<field> is one of "
              f"{', '.join(sorted(node.keys()))}.")
    node, done = node[key], done + [key]
  if isinstance(node, ml_collections.ConfigDict):
    return _group_error(node, path, value)
  return None


def _group_error(group, path: str, value: str | None) -> str:
  msg = (f"--config.{path}{'=' + value if value else ''}: config.{path} is a group of fields, "
         f"not a value; set its fields instead, --config.{path}.<field> with <field> one of "
         f"{', '.join(sorted(group.keys()))}")
  if path == "data" and value:
    if value.endswith(".npz"):
      msg += f". For this file: --config.data.source=arrays --config.data.path={value}"
    elif os.sep in value or os.path.isdir(value):
      msg += (". For an image folder (<root>/<split>/<class>/<images>): "
              f"--config.data.source=folder --config.data.root={value}")
    else:
      msg += f". For a TFDS dataset: --config.data.source=tfds --config.data.name={value}"
  return msg + "."


def _condensed(message: str) -> str:
  """An error message without the traceback ml_collections embeds in it: its last line."""
  lines = [line for line in message.splitlines() if line.strip()]
  if any(line.startswith("Traceback (most recent call last)") for line in lines):
    return re.sub(r"^\w*(Error|Exception): ", "", lines[-1].strip())
  return message


def parse_error_message(argv, exc: Exception) -> str:
  """One message for an exception absl raised while parsing argv."""
  arg = _config_arg(argv)
  problem = config_file_error(arg)
  if problem:
    return problem
  from ml_collections.config_flags import config_flags as cf
  try:
    config = cf.ConfigFileFlagParser("config").parse(arg)
    config.get("model")  # a file that fails with an IOError raises on first use
  except Exception as e:  # noqa: BLE001 - the config file itself fails to load
    return f"--config {arg} cannot be loaded: {_condensed(str(e)).splitlines()[-1]}"
  for path, value in _override_args(argv):
    problem = override_error(config, path, value)
    if problem:
      return problem
  return _condensed(str(exc))


def _parse_flags(argv):
  """absl's parsing, with --help exiting 0 and every mistake as one line (status 2)."""
  tb = _show_traceback(argv)
  wants_help = any(a.lstrip("-") in HELP_FLAGS for a in argv[1:])
  problem = None if wants_help or tb else config_file_error(_config_arg(argv))
  if problem:
    _fail(problem)
  try:
    rest = flags.FLAGS(argv)
  except SystemExit:
    if wants_help:  # absl prints the usage, then exits with 1
      sys.exit(0)
    raise
  except Exception as e:  # noqa: BLE001 - absl and ml_collections raise many types
    if tb:
      raise
    _fail(parse_error_message(argv, e))
  try:
    _CONFIG.value.get("model")  # a config file that failed to load raises on first use
  except IOError as e:
    if tb:
      raise
    _fail(f"--config {_config_arg(argv)} cannot be loaded: {_condensed(str(e)).splitlines()[-1]}")
  return rest


def _config_writing(ckpt: str, config_arg: str) -> str | None:
  """The config whose default workdir holds `ckpt` (workdirs/<name>/checkpoints), if any."""
  m = re.fullmatch(r"(?:.*/)?workdirs/([^/]+)/(?:checkpoints|best)(?:/\d+)?",
                   os.path.normpath(ckpt))
  if not m:
    return None
  name = m.group(1)
  for folder in (os.path.dirname(config_arg.partition(":")[0]), os.path.join(ROOT, "configs")):
    if os.path.isfile(os.path.join(folder, name + ".py")):
      return _shown(os.path.join(folder, name + ".py"))
    base, _, arg = name.rpartition("_")
    if base and os.path.isfile(os.path.join(folder, base + ".py")):
      return f"{_shown(os.path.join(folder, base + '.py'))}:{arg}"
  return None


def teacher_error(config, mode: str, config_arg: str) -> str | None:
  """A distillation run whose teacher checkpoint does not exist, with the command writing it."""
  if "distillation" not in config:  # an experiment (configs/demo.py): each run checks its own
    return None
  teacher = config.teacher
  if (mode not in ("train", "precompute_teacher") or config.distillation.kind == "none"
      or (mode == "train" and teacher.source != "model") or not teacher.checkpoint
      or os.path.isdir(teacher.checkpoint)):
    return None
  msg = (f"config.teacher.checkpoint={teacher.checkpoint} does not exist: this "
         f"{config.distillation.kind} distillation needs its teacher.")
  maker = _config_writing(teacher.checkpoint, config_arg)
  if maker:
    return msg + f" Train the teacher first: python launch.py --config {maker}"
  return msg + (" Convert one (python -m deit_jax.convert --model regnety_160 --checkpoint "
                "<.pth> --output DIR) and set --config.teacher.checkpoint=DIR.")


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected argument(s) {' '.join(argv[1:])}; flags are --name=value.")
  tb = _show_traceback(sys.argv) or _TRACEBACK.value
  config = _CONFIG.value
  problem = teacher_error(config, _MODE.value, flags.FLAGS["config"].config_filename)
  if problem and not tb:
    _fail(problem)
  # Orbax and TF log every step at INFO; the trainer prints its own progress lines.
  logging.set_verbosity(logging.WARNING)
  import jax
  if _COORDINATOR.value or _NUM_PROCESSES.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif _cluster_detected():
    jax.distributed.initialize()
  from deit_jax import host_memory, run
  host_memory.configure()
  workdir = _WORKDIR.value or _default_workdir()
  try:
    result = run.run(_MODE.value, config, workdir, checkpoint=_CHECKPOINT.value, step=_STEP.value,
                     config_spec=flags.FLAGS["config"].config_filename)
  except run.USER_ERRORS as e:
    if tb:
      raise
    _fail(str(e))
  if isinstance(result, dict) and result.get("preempted"):  # SIGTERM: saved; requeue the job
    from deit_jax import train
    sys.exit(train.PREEMPTED_EXIT_STATUS)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
