"""The one way a leaf of a parameter tree is named: its path as 'a/b/c' (the names sharding
rules, weight-decay masks, checkpoints and converted weights use)."""

from __future__ import annotations


def path_str(path) -> str:
  """A jax key path -> 'a/b/c' (dict keys, attribute names and sequence indices)."""
  parts = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
    else:
      parts.append(str(entry))
  return "/".join(parts)

