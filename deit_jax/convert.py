"""Converts official DeiT / timm PyTorch weights (and CNN teachers) into Orbax checkpoints.

  python -m deit_jax.convert --model deit_base_distilled_patch16_224 \
      --checkpoint deit_base_distilled_patch16_224-df68dfff.pth --output ckpt/deit_b_distilled

Reads an official `.pth` (`{'model': state_dict}`), a timm state dict (`.pth`/`.bin`) or a
`.safetensors` file (how the hub hosts timm's weights). `.safetensors` needs no PyTorch; `.pth`
is read with `torch.load(weights_only=True)`, so a checkpoint file can never run code.
"""

from __future__ import annotations

import os
import re
import zipfile
from typing import Mapping

import numpy as np
from absl import app, flags

from deit_jax import checkpoint, models

_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def read_torch_weights(path: str) -> dict[str, np.ndarray]:
  """A PyTorch state dict file as {name: float32/int numpy array}."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Checkpoint file {path} does not exist.")
  if path.endswith(".safetensors"):
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    try:
      sd = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
      raise checkpoint.CheckpointError(
          f"{path} is not a readable .safetensors file ({e}); is it truncated?") from e
    return {k: np.asarray(v) for k, v in sd.items()}
  if not path.endswith(_TORCH_SUFFIXES):
    raise checkpoint.CheckpointError(
        f"{path}: unknown checkpoint format; expected .safetensors or a PyTorch "
        f"{'/'.join(_TORCH_SUFFIXES)} file.")
  try:
    import torch
  except ImportError as e:
    raise ImportError(
        f"Reading {path} needs PyTorch (only to unpickle the file; it is never a dependency of "
        f"deit_jax): `pip install torch` (a CPU build is enough), or convert from the "
        f".safetensors file that the Hugging Face hub hosts for timm models.") from e
  if not zipfile.is_zipfile(path):
    raise checkpoint.CheckpointError(
        f"{path} is not a PyTorch checkpoint (not a zip archive; truncated or another file type?).")
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
    raise checkpoint.CheckpointError(f"Cannot read {path} as a PyTorch checkpoint: {e}") from e
  if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
    obj = obj["model"]  # the official DeiT release format
  elif isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping) or not all(hasattr(v, "numpy") for v in obj.values()):
    raise checkpoint.CheckpointError(f"{path} holds no state dict of tensors.")
  return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in obj.items()}


def deit_params_from_torch(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """timm / official DeiT names and layouts -> our flat parameter names and layouts."""
  out = {}
  for name, value in sd.items():
    value = np.asarray(value)
    if name.endswith(".num_batches_tracked"):
      continue
    new = name
    new = re.sub(r"^patch_embed\.proj\.", "patch_embed.", new)
    new = re.sub(r"(^|\.)(norm\d?)\.weight$", r"\1\2.scale", new)
    if new.endswith(".weight"):
      new = new[: -len(".weight")] + ".kernel"
      if value.ndim == 4:  # conv OIHW -> HWIO
        value = value.transpose(2, 3, 1, 0)
      elif value.ndim == 2:  # Linear out x in -> in x out
        value = value.T
    out[new.replace(".", "/")] = value
  return out


def convert(model_name: str, checkpoint_path: str, output: str, **overrides) -> str:
  """Reads PyTorch weights for `model_name` and writes an Orbax checkpoint to `output`.

  Nothing is written unless the weights fit the model exactly (position embeddings excepted,
  which are resized when img_size is overridden).
  """
  sd = read_torch_weights(checkpoint_path)
  if model_name in models.MODELS:
    model = models.create_model(model_name, **overrides)
    checkpoint.assign_params(model, deit_params_from_torch(sd))
  else:
    from deit_jax import teachers
    if model_name not in teachers.TEACHERS:
      raise ValueError(f"Unknown model {model_name!r}. Known DeiT models: "
                       f"{', '.join(sorted(models.MODELS))}; teachers: "
                       f"{', '.join(sorted(teachers.TEACHERS))}.")
    model = teachers.abstract_teacher(model_name, **overrides)
    try:
      teachers.load_torch_state_dict(model, model_name, sd)
    except (KeyError, ValueError) as e:
      raise checkpoint.CheckpointError(str(e)) from e
  return checkpoint.save_model(model, output)


def _define_flags():
  flags.DEFINE_string("model", None, "Zoo model name, e.g. deit_base_distilled_patch16_224.")
  flags.DEFINE_string("checkpoint", None, "PyTorch .pth/.bin or .safetensors weights.")
  flags.DEFINE_string("output", None, "Directory for the Orbax checkpoint.")
  flags.DEFINE_integer("num_classes", None, "Override the number of classes.")
  flags.DEFINE_integer("img_size", None, "Target resolution (position embeddings are resized).")
  flags.mark_flags_as_required(["model", "checkpoint", "output"])


def main(argv):
  del argv
  f = flags.FLAGS
  overrides = {k: v for k, v in (("num_classes", f.num_classes), ("img_size", f.img_size))
               if v is not None}
  out = convert(f.model, f.checkpoint, f.output, **overrides)
  print(f"Wrote {f.model} to {out}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
