r"""Runs a deit_jax config: training (default), evaluation, or a throughput benchmark.

  python launch.py --config configs/demo.py
  python launch.py --config configs/deit_b.py --workdir gs://bucket/deit_b --config.batch_size=2048
  python launch.py --config configs/deit_s.py --mode=eval --checkpoint ckpt/deit_small
  python launch.py --config configs/deit_b.py --mode=benchmark

Multi-host: on Cloud TPU pods and under SLURM `jax.distributed.initialize()` finds the cluster
by itself; elsewhere pass --coordinator_address=host:port --num_processes=N --process_id=i on
every host. Only process 0 writes logs.
"""

import os
import re

# TensorFlow (used for tf.data only) is chatty at import.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/deit_b.py.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default: workdirs/<config>).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "benchmark", "precompute_teacher"],
                          "What to run.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "--mode=eval: checkpoint directory (default: the workdir's).")
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Orbax and TF log every step at INFO; the trainer prints its own progress lines.
  logging.set_verbosity(logging.WARNING)
  import jax
  if _COORDINATOR.value or _NUM_PROCESSES.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif _cluster_detected():
    jax.distributed.initialize()
  from deit_jax import run
  config = _CONFIG.value
  workdir = _WORKDIR.value or _default_workdir()
  run.run(_MODE.value, config, workdir, checkpoint=_CHECKPOINT.value)


if __name__ == "__main__":
  app.run(main)
