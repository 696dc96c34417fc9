"""Meshes and sharding rules.

One data axis: the batch is split over all devices. Parameters (and anything shaped like them:
optimizer moments, EMA, a teacher) are placed by rules, a list of (regex on the leaf's path, rule)
pairs applied in order, first match wins:
  'replicate'  a full copy on every device (plain data parallelism, the default)
  'fsdp'       the largest dimension divisible by the device count is split over the data axis
               (ZeRO-3 / FSDP); leaves too small or with no divisible dimension stay replicated
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from deit_jax import trees

DATA = "data"
RULES = ("replicate", "fsdp")
# Below this many elements sharding a leaf saves nothing worth the collectives.
_MIN_FSDP_SIZE = 2 ** 14


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh over the first `num_devices` devices (all by default), grouped by process."""
  n = num_devices or jax.device_count()
  return jax.make_mesh((n,), (DATA,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:n])


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _fsdp_spec(shape: Sequence[int], n: int) -> P:
  if int(np.prod(shape)) < _MIN_FSDP_SIZE:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % n == 0:
      spec = [None] * len(shape)
      spec[dim] = DATA
      return P(*spec)
  return P()


def validate_rules(rules: Sequence[tuple[str, str]]):
  for pattern, rule in rules:
    if rule not in RULES:
      raise ValueError(f"unknown rule {rule!r} for {pattern!r}; use one of {RULES}.")
    re.compile(pattern)


def tree_shardings(tree: Any, mesh, rules: Sequence[tuple[str, str]] = ((".*", "replicate"),)):
  """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs) by the rules."""
  validate_rules(rules)
  n = mesh.shape[DATA]
  compiled = [(re.compile(p), r) for p, r in rules]

  def one(path, leaf):
    name = trees.path_str(path)
    rule = next((r for p, r in compiled if p.search(name)), "replicate")
    shape = getattr(leaf, "shape", ())
    spec = _fsdp_spec(shape, n) if rule == "fsdp" and shape else P()
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(one, tree)
