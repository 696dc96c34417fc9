"""TensorFlow, imported on first use.

Only the input pipeline (tf.data) and the image transforms need TensorFlow, so configs, models,
the train step and the benchmarks import without it (a GPU machine without TensorFlow runs
`benchmarks/speed.py`). The first attribute access imports the real module and hides the GPUs
from it: JAX owns the accelerators, and TF must not allocate their memory.
"""

from __future__ import annotations

import importlib
import types


class _LazyTensorFlow(types.ModuleType):

  def __init__(self):
    super().__init__("tensorflow")
    self._module = None

  def _load(self):
    if self._module is None:
      try:
        tf = importlib.import_module("tensorflow")
      except ImportError as e:
        raise ImportError("The input pipeline needs TensorFlow (tf.data): pip install "
                          "tensorflow-cpu (see setup.cfg for the pinned version).") from e
      try:
        tf.config.set_visible_devices([], "GPU")
      except RuntimeError:  # TF already initialised its devices (the caller chose).
        pass
      self._module = tf
    return self._module

  def __getattr__(self, name):
    if name.startswith("__") and name.endswith("__"):
      raise AttributeError(name)
    return getattr(self._load(), name)


tf = _LazyTensorFlow()


def load():
  """The real TensorFlow module (imported now, GPUs hidden): call before importing a library
  that imports TensorFlow itself (tensorflow_datasets)."""
  return tf._load()
