"""Model checkpoints in Orbax.

One layout serves converted weights and training runs: an Orbax `CheckpointManager` directory whose
steps hold the items
  - `model`:  JSON describing the architecture (family, zoo name, full config),
  - `params`: the parameters as a nested dict (string keys),
and, for training runs, `ema_params` and `train_state` (written by deit_jax.train). The converter
writes step 0. `load_model(dir)` rebuilds the model from `model` and restores `params` (or the EMA).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from deit_jax import models, trees

MODEL_ITEM = "model"
PARAMS_ITEM = "params"
EMA_ITEM = "ema_params"


class CheckpointError(ValueError):
  """A checkpoint that cannot be used as asked: wrong keys or shapes, or not a checkpoint."""


def flatten(tree: Mapping) -> dict[str, Any]:
  """Nested dict -> {'a/b/c': leaf}."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {trees.path_str(path): v for path, v in leaves}


def unflatten(flat: Mapping[str, Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def merge_trees(*trees: Mapping) -> dict:
  """Nested dicts with disjoint leaves -> one nested dict (e.g. parameters + BatchNorm stats)."""
  flat: dict[str, Any] = {}
  for tree in trees:
    flat.update(flatten(tree))
  return unflatten(flat)


def model_params(model: nnx.Module, variables=nnx.Param) -> dict[str, Any]:
  """The model's variables (parameters by default) as a flat {'blocks/0/attn/qkv/kernel': array}."""
  return flatten(nnx.to_pure_dict(nnx.state(model, variables)))


def model_description(model: nnx.Module) -> dict:
  """What `build_model` needs to rebuild the architecture."""
  if isinstance(model, models.DeiT):
    return {"family": "deit", "config": dataclasses.asdict(model.config)}
  from deit_jax import teachers  # teachers are optional until used
  return teachers.describe(model)


def deit_config(description: Mapping, **overrides) -> models.DeiTConfig:
  """The DeiTConfig a DeiT checkpoint's description stores, with `overrides` applied."""
  fields = {f.name for f in dataclasses.fields(models.DeiTConfig)}
  stored = dict(description.get("config") or {})
  unknown = sorted(set(stored) - fields)
  if unknown:
    raise CheckpointError(
        f"Cannot rebuild the model: its description has config field(s) {unknown} that this "
        f"deit_jax does not know (written by a newer version?). Known fields: {sorted(fields)}.")
  try:
    return dataclasses.replace(models.DeiTConfig(**stored), **overrides).validate()
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"Cannot rebuild the model from its description: {e}") from e


def _build_deit(description: Mapping, abstract: bool, **overrides) -> nnx.Module:
  cfg = deit_config(description, **overrides)
  make = lambda: models.DeiT(cfg, rngs=nnx.Rngs(0))
  return nnx.eval_shape(make) if abstract else make()


def _build_teacher(description: Mapping, abstract: bool, **overrides) -> nnx.Module:
  from deit_jax import teachers  # teachers are optional until used
  return teachers.build(description, abstract=abstract, **overrides)


# The model families a checkpoint's description can name: family -> builder.
FAMILIES = {"deit": _build_deit, "teacher": _build_teacher}


def build_model(description: Mapping, *, abstract: bool = False, **overrides) -> nnx.Module:
  family = description.get("family")
  if family not in FAMILIES:
    raise CheckpointError(f"Unknown model family {family!r} in checkpoint description "
                          f"{description}; known: {', '.join(FAMILIES)}.")
  return FAMILIES[family](description, abstract, **overrides)


def assign_params(model: nnx.Module, flat: Mapping[str, Any], *, variables=nnx.Param,
                  resize_pos_embed: bool = True) -> None:
  """Loads flat parameters into `model`, all or nothing.

  Every key and shape is checked first; a mismatch raises CheckpointError listing the missing,
  unexpected and mis-shaped keys, and the model is left untouched. A DeiT position embedding for
  another resolution is resized (bicubic, cls/dist rows kept) when `resize_pos_embed`.
  """
  state = nnx.state(model, variables)
  target = flatten(nnx.to_pure_dict(state))
  flat = dict(flat)
  if isinstance(model, models.DeiT):
    check_deit_family(model.config, flat)
  if (resize_pos_embed and isinstance(model, models.DeiT) and "pos_embed" in flat
      and tuple(np.shape(flat["pos_embed"])) != tuple(target["pos_embed"].shape)):
    cfg = model.config
    src = np.asarray(flat["pos_embed"])
    if src.shape[-1] == cfg.embed_dim and src.shape[1] > cfg.pos_embed_prefix_tokens:
      flat["pos_embed"] = models.resize_pos_embed(src, cfg.pos_embed_prefix_tokens,
                                                  cfg.grid_size)
  missing = sorted(set(target) - set(flat))
  unexpected = sorted(set(flat) - set(target))
  mismatched = sorted(
      f"{k}: checkpoint {tuple(np.shape(flat[k]))} vs model {tuple(target[k].shape)}"
      for k in set(target) & set(flat) if tuple(np.shape(flat[k])) != tuple(target[k].shape))
  if missing or unexpected or mismatched:
    lines = []
    if missing:
      lines.append(f"missing from the checkpoint: {missing}")
    if unexpected:
      lines.append(f"not in the model: {unexpected}")
    if mismatched:
      lines.append(f"shape mismatches: {mismatched}")
    raise CheckpointError("Checkpoint does not fit the model; nothing was loaded.\n  "
                          + "\n  ".join(lines))
  new = unflatten({k: jax.numpy.asarray(flat[k], dtype=target[k].dtype) for k in target})
  nnx.replace_by_pure_dict(state, _match_key_types(nnx.to_pure_dict(state), new))
  nnx.update(model, state)


_LAYER_SCALE_KEY = re.compile(r"^blocks/\d+/ls[12]/gamma$")


def _family(layer_scale: bool) -> str:
  return "DeiT III (LayerScale, position embedding on the patches only)" if layer_scale else (
      "DeiT (no LayerScale, position embedding on every token)")


def _zoo_names_like(cfg: models.DeiTConfig, layer_scale: bool) -> list[str]:
  """Zoo models of the other family with this width, depth and patch size."""
  return sorted(n for n, c in models.MODELS.items()
                if (c.layer_scale_init is not None) == layer_scale and c.embed_dim == cfg.embed_dim
                and c.depth == cfg.depth and c.patch_size == cfg.patch_size
                and not n.endswith("_in21ft1k"))


def check_deit_family(cfg: models.DeiTConfig, flat: Mapping[str, Any]) -> None:
  """Refuses DeiT III weights for a DeiT model and the other way round, naming the problem
  (rather than listing the LayerScale keys and a pos_embed shape as a mismatch)."""
  has_ls = any(_LAYER_SCALE_KEY.match(k) for k in flat)
  wants_ls = cfg.layer_scale_init is not None
  if has_ls == wants_ls and "pos_embed" in flat:
    rows = int(np.shape(flat["pos_embed"])[1])
    square = lambda n: n > 0 and round(math.sqrt(n)) ** 2 == n
    other = cfg.num_prefix_tokens if cfg.no_embed_class else 0
    if not square(rows - cfg.pos_embed_prefix_tokens) and square(rows - other):
      raise CheckpointError(
          f"The checkpoint's position embedding has {rows} rows: {other} prefix row(s) and a "
          f"square patch grid, but the model's (no_embed_class={cfg.no_embed_class}) has "
          f"{cfg.pos_embed_prefix_tokens}. Convert with no_embed_class={not cfg.no_embed_class}; "
          f"nothing was loaded.")
  if has_ls == wants_ls:
    return
  like = _zoo_names_like(cfg, has_ls)
  hint = f" (e.g. {', '.join(like[:3])})" if like else ""
  raise CheckpointError(
      f"The checkpoint is a {_family(has_ls)} model, but the target model is a "
      f"{_family(wants_ls)} model. Use a {'deit3_*' if has_ls else 'deit_*'} model{hint}; "
      f"nothing was loaded.")


def _match_key_types(reference: Mapping, tree: Mapping) -> dict:
  """String keys back to the reference's key types (nnx.List children are indexed by int)."""
  by_str = {str(k): k for k in reference}
  return {by_str[k]: (_match_key_types(reference[by_str[k]], v) if isinstance(v, Mapping) else v)
          for k, v in tree.items()}


def _abstract(flat: Mapping[str, Any]) -> dict:
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return unflatten({k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)
                    for k, v in flat.items()})


def save_model(model: nnx.Module, directory: str, *, step: int = 0) -> str:
  """Writes `model`'s parameters (and its description) as step `step` of an Orbax checkpoint."""
  directory = os.path.abspath(directory)
  params = unflatten(model_params(model, _persistent_filter(model)))
  with ocp.CheckpointManager(directory, item_names=(MODEL_ITEM, PARAMS_ITEM)) as mngr:
    if step in mngr.all_steps():
      raise CheckpointError(f"{directory} already holds a checkpoint at step {step}; write to "
                            f"another directory or delete it first.")
    mngr.save(step, args=ocp.args.Composite(**{
        MODEL_ITEM: ocp.args.JsonSave(model_description(model)),
        PARAMS_ITEM: ocp.args.StandardSave(params)}), force=True)
    mngr.wait_until_finished()
  return directory


def _persistent_filter(model):
  """Parameters, plus BatchNorm statistics for CNN teachers."""
  return nnx.Param if isinstance(model, models.DeiT) else (nnx.Param, nnx.BatchStat)


def step_folders(directory: str) -> list[int]:
  """The steps of an Orbax checkpoint directory (its integer-named folders), sorted; [] when the
  directory does not exist."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory)
                if d.isdigit() and os.path.isdir(os.path.join(directory, d)))


def _open(directory: str, *items: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(os.path.abspath(directory), item_names=items,
                               options=ocp.CheckpointManagerOptions(create=False))


def read_description(directory: str, step: int | None = None) -> tuple[dict, int]:
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"No checkpoint directory at {directory}.")
  with _open(directory, MODEL_ITEM) as mngr:
    steps = mngr.all_steps()
    if not steps:
      raise CheckpointError(f"{directory} holds no Orbax checkpoint steps (expected a directory "
                            f"written by `python -m deit_jax.convert` or by training).")
    step = max(steps) if step is None else step
    if step not in steps:
      raise CheckpointError(f"No step {step} in {directory}; available steps: {sorted(steps)}.")
    try:
      desc = mngr.restore(step, args=ocp.args.Composite(**{MODEL_ITEM: ocp.args.JsonRestore()}))
    except Exception as e:  # noqa: BLE001 - Orbax raises many types for a broken directory
      raise CheckpointError(f"Cannot read the model description of step {step} in {directory}: "
                            f"{e}") from e
  return dict(desc[MODEL_ITEM]), step


def load_model(directory: str, *, step: int | None = None, ema: bool = False,
               **overrides) -> nnx.Module:
  """The model stored in an Orbax checkpoint directory, in eval mode.

  step: which step (default: the latest). ema: restore the EMA weights of a training run.
  overrides: architecture changes such as img_size=384 (position embeddings are resized),
  dtype='bfloat16' or attention_impl='cudnn'.
  """
  description, step = read_description(directory, step)
  item = EMA_ITEM if ema else PARAMS_ITEM
  stored = build_model(description, abstract=True)
  target = _abstract(model_params(stored, _persistent_filter(stored)))
  with _open(directory, item) as mngr:
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(
          **{item: ocp.args.StandardRestore(target)}))[item]
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"Cannot restore {item!r} from step {step} of {directory}: {e}") from e
  model = build_model(description, **overrides)
  assign_params(model, flatten(restored), variables=_persistent_filter(model))
  model.eval()
  return model


# ----------------------------------------------------------------------------------------------
# Checksums of saved steps: `<step dir>/sha256.json` ({relative path: sha256} of every file of the
# step), written once the (asynchronous) save has committed, verified before a restore.
# ----------------------------------------------------------------------------------------------
CHECKSUM_FILE = "sha256.json"


def _file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      h.update(chunk)
  return h.hexdigest()


def step_digests(step_dir: str) -> dict[str, str]:
  """{path relative to step_dir: sha256} of every file of a step but the checksum file."""
  out = {}
  for root, _, files in os.walk(step_dir):
    for name in files:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, step_dir)
      if not rel.startswith(CHECKSUM_FILE):  # the checksum file (and its temporary)
        out[rel] = _file_sha256(path)
  return dict(sorted(out.items()))


def write_checksums(step_dir: str) -> None:
  digests = step_digests(step_dir)
  tmp = os.path.join(step_dir, CHECKSUM_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump(digests, f, indent=0)
  os.replace(tmp, os.path.join(step_dir, CHECKSUM_FILE))


def checksum_problems(step_dir: str) -> list[str] | None:
  """None when the step has no checksum file (not verifiable), else the files that are missing,
  changed or unreadable ([] = intact)."""
  path = os.path.join(step_dir, CHECKSUM_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      recorded = json.load(f)
  except (OSError, ValueError) as e:
    return [f"{CHECKSUM_FILE} unreadable ({e})"]
  actual = step_digests(step_dir)
  problems = [f"{k} missing" for k in recorded if k not in actual]
  problems += [f"{k} changed" for k in recorded if k in actual and actual[k] != recorded[k]]
  return problems
