"""Converts official DeiT / timm PyTorch weights (and CNN teachers) into Orbax checkpoints.

  python -m deit_jax.convert --model deit_base_distilled_patch16_224 \
      --checkpoint deit_base_distilled_patch16_224-df68dfff.pth --output ckpt/deit_b_distilled

Reads an official `.pth` (`{'model': state_dict}`), a timm state dict (`.pth`/`.bin`) or a
`.safetensors` file (how the hub hosts timm's weights). `.safetensors` needs no PyTorch; `.pth`
is read with `torch.load(weights_only=True)`, so a checkpoint file can never run code.

DeiT III (`deit3_*`) converts the same way, from timm's weights or the official release (whose
LayerScale `blocks.i.gamma_1/2` become `ls1/ls2`). Weights of the other family (DeiT III into a
DeiT model, or the other way) are refused by name.

From a local Hugging Face hub cache, never the network (the model is read from config.json):

  python -m deit_jax.convert --hf timm/deit_base_distilled_patch16_224.fb_in1k --output ckpt/b_dist

The cache is `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`, in the hub's
layout `models--<org>--<name>/{refs/<revision>, snapshots/<commit>/{config.json,
model.safetensors}}`. A model that is not cached is an error that prints the `hf download`
command to run where there is network.
"""

from __future__ import annotations

import json
import os
import re
import sys
import zipfile
from typing import Any, Mapping

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
    new = re.sub(r"\.gamma_([12])$", r".ls\1.gamma", new)  # official DeiT III release names
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


# ----------------------------------------------------------------------------------------------
# A local Hugging Face hub cache (read only; never the network).
# ----------------------------------------------------------------------------------------------
class NotCachedError(FileNotFoundError):
  """The model is not in the local Hugging Face cache; the message says how to get it there."""


# timm's model_args (config.json) that map onto DeiTConfig fields.
_TIMM_MODEL_ARGS = {"img_size": "img_size", "patch_size": "patch_size", "embed_dim": "embed_dim",
                    "depth": "depth", "num_heads": "num_heads", "mlp_ratio": "mlp_ratio",
                    "qkv_bias": "qkv_bias", "in_chans": "in_chans", "num_classes": "num_classes",
                    "init_values": "layer_scale_init", "no_embed_class": "no_embed_class"}
_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def hf_hub_cache() -> str:
  """The hub cache directory, as huggingface_hub resolves it."""
  for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
    if os.environ.get(var):
      return os.path.expanduser(os.environ[var])
  home = os.environ.get("HF_HOME") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
  return os.path.expanduser(os.path.join(home, "hub"))


def _download_hint(repo_id: str, revision: str, cache: str) -> str:
  rev = "" if revision == "main" else f" --revision {revision}"
  return (f"deit_jax never downloads. On a machine with network access run\n"
          f"  hf download {repo_id} config.json model.safetensors{rev}\n"
          f"(huggingface_hub < 1.0: `huggingface-cli download ...` with the same arguments), then "
          f"copy that machine's hub cache (~/.cache/huggingface/hub, or $HF_HOME/hub) to {cache} "
          f"here, or point HF_HOME / HF_HUB_CACHE at a copy.")


def find_in_hf_cache(repo_id: str, *, revision: str = "main",
                     cache_dir: str | None = None) -> tuple[str, dict, str]:
  """(weights file, config.json as a dict, commit) of `repo_id` in the local hub cache."""
  if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id or ""):
    raise ValueError(f"--hf={repo_id!r}: expected a hub model id such as "
                     f"timm/deit_base_distilled_patch16_224.fb_in1k.")
  cache = os.path.abspath(cache_dir or hf_hub_cache())
  repo_dir = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
  commit = revision
  if not re.fullmatch(r"[0-9a-f]{40}", revision):
    ref = os.path.join(repo_dir, "refs", revision)
    if os.path.isfile(ref):
      with open(ref) as f:
        commit = f.read().strip()
  snapshot = os.path.join(repo_dir, "snapshots", commit)
  weights = [os.path.join(snapshot, w) for w in _HF_WEIGHTS
             if os.path.isfile(os.path.join(snapshot, w))]
  config_path = os.path.join(snapshot, "config.json")
  if not weights or not os.path.isfile(config_path):
    if os.path.isdir(snapshot):
      lacking = ([] if weights else [_HF_WEIGHTS[0]]) + (
          [] if os.path.isfile(config_path) else ["config.json"])
      what = f"The cached snapshot {snapshot} of {repo_id} lacks {' and '.join(lacking)}"
    else:
      what = f"{repo_id} (revision {revision}) is not in the Hugging Face cache at {cache}"
    raise NotCachedError(f"{what}.\n{_download_hint(repo_id, revision, cache)}")
  try:
    with open(config_path) as f:
      hf_config = json.load(f)
  except (OSError, ValueError) as e:
    raise checkpoint.CheckpointError(f"{config_path} is not readable JSON ({e}).") from e
  return weights[0], hf_config, commit


def model_from_hf_config(hf_config: Mapping[str, Any], repo_id: str) -> tuple[str, dict]:
  """(zoo or teacher name, overrides) for a timm config.json (`architecture`, `num_classes`,
  optional `model_args`)."""
  from deit_jax import teachers
  arch = hf_config.get("architecture")
  if arch not in models.MODELS and arch not in teachers.TEACHERS:
    raise checkpoint.CheckpointError(
        f"{repo_id} is a {arch!r} model (config.json 'architecture'), which deit_jax does not "
        f"implement. DeiT models: {', '.join(sorted(models.MODELS))}; teachers: "
        f"{', '.join(sorted(teachers.TEACHERS))}.")
  model_args = dict(hf_config.get("model_args") or {})
  if hf_config.get("num_classes") is not None:
    model_args.setdefault("num_classes", hf_config["num_classes"])
  known = {"num_classes": "num_classes"} if arch in teachers.TEACHERS else _TIMM_MODEL_ARGS
  unsupported = sorted(set(model_args) - set(known))
  if unsupported:
    raise checkpoint.CheckpointError(
        f"{repo_id}: config.json model_args {unsupported} are not supported for {arch}.")
  overrides = {known[k]: v for k, v in model_args.items()}
  if isinstance(overrides.get("img_size"), (list, tuple)):  # timm allows (h, w)
    overrides["img_size"] = overrides["img_size"][0]
  return arch, overrides


def convert_from_hf(repo_id: str, output: str, *, model_name: str | None = None,
                    revision: str = "main", cache_dir: str | None = None, **overrides) -> str:
  """`convert` for a model in the local Hugging Face hub cache (see the module docstring)."""
  weights, hf_config, commit = find_in_hf_cache(repo_id, revision=revision, cache_dir=cache_dir)
  arch, from_config = model_from_hf_config(hf_config, repo_id)
  if model_name is not None and model_name != arch:
    raise checkpoint.CheckpointError(
        f"{repo_id} holds a {arch} model (config.json), not {model_name}; drop --model or pass "
        f"--model {arch}.")
  print(f"Reading {repo_id} at {commit} from {weights}", flush=True)
  return convert(arch, weights, output, **{**from_config, **overrides})


def _define_flags():
  flags.DEFINE_string("model", None, "Zoo model name, e.g. deit_base_distilled_patch16_224 "
                      "(with --hf: optional, read from config.json).")
  flags.DEFINE_string("checkpoint", None, "PyTorch .pth/.bin or .safetensors weights.")
  flags.DEFINE_string("hf", None, "A Hugging Face model id, e.g. "
                      "timm/deit_base_distilled_patch16_224.fb_in1k, read from the local hub "
                      "cache ($HF_HUB_CACHE or $HF_HOME/hub); never downloaded.")
  flags.DEFINE_string("revision", "main", "--hf: the revision (a ref or a commit hash).")
  flags.DEFINE_string("output", None, "Directory for the Orbax checkpoint.")
  flags.DEFINE_integer("num_classes", None, "Override the number of classes.")
  flags.DEFINE_integer("img_size", None, "Target resolution (position embeddings are resized).")
  flags.mark_flags_as_required(["output"])


def main(argv):
  del argv
  f = flags.FLAGS
  overrides = {k: v for k, v in (("num_classes", f.num_classes), ("img_size", f.img_size))
               if v is not None}
  try:
    if f.hf:
      if f.checkpoint:
        raise app.UsageError("Give --hf or --checkpoint, not both.")
      out = convert_from_hf(f.hf, f.output, model_name=f.model, revision=f.revision, **overrides)
    else:
      if not f.model or not f.checkpoint:
        raise app.UsageError("--model and --checkpoint are required (or --hf).")
      out = convert(f.model, f.checkpoint, f.output, **overrides)
  except (checkpoint.CheckpointError, FileNotFoundError, ImportError, ValueError) as e:
    # A user mistake (wrong file, model or cache): the message, no traceback.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"Wrote {f.model or f.hf} to {out}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
