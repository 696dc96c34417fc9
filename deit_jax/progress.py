"""What a run tells the person running it: progress lines on stdout, TensorBoard event files and
a JSONL file of metrics (process 0 only)."""

from __future__ import annotations

import json
import os

import jax


def log(msg: str):
  if jax.process_index() == 0:
    print(msg, flush=True)


def fmt_time(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class MetricWriter:
  """TensorBoard scalars and `metrics.jsonl` lines in the workdir (a no-op when not enabled). The
  files are opened by the first `write`: a run that writes nothing leaves none."""

  def __init__(self, workdir: str, enabled: bool):
    self.enabled, self.workdir, self._tb = enabled, workdir, None

  def _open(self):
    from deit_jax import lazy_tf  # tf.summary writes TensorBoard event files
    self._tf = lazy_tf.load()
    self._tb = self._tf.summary.create_file_writer(os.path.join(self.workdir, "tensorboard"))
    self._jsonl = open(os.path.join(self.workdir, "metrics.jsonl"), "a")

  def write(self, step: int, metrics: dict[str, float]):
    if not self.enabled:
      return
    if self._tb is None:
      self._open()
    with self._tb.as_default():
      for k, v in metrics.items():
        self._tf.summary.scalar(k, v, step=step)
    self._tb.flush()
    self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
    self._jsonl.flush()

  def close(self):
    if self._tb is not None:
      self._jsonl.close()
      self._tb.close()
