"""The one output contract of every model here (DeiT and the CNN teachers): `model.heads(x)`.

`Outputs.cls` is the class head's logits (a CNN's only head), `Outputs.dist` the distillation
head's (None for a model without a distillation token), both float32 `[batch, classes]`;
`Outputs.aux` holds the named intermediates (DeiT: 'embeddings', 'block{i}', 'attention{i}' on
request, 'encoded', 'pre_logits', 'pre_logits_dist'; a CNN: none). The loss and the evaluation
read these fields and never look at the model's type; `model(x)` keeps timm's conventions
(a pair in train mode, the average in eval mode) for users.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax


class Outputs(NamedTuple):
  cls: jax.Array
  dist: jax.Array | None = None
  aux: dict[str, Any] | None = None

  @property
  def both(self) -> jax.Array:
    """What DeiT predicts at test time: the average of the two heads' logits (the class head
    alone for a model with one head)."""
    return self.cls if self.dist is None else (self.cls + self.dist) / 2

  def by_head(self) -> dict[str, jax.Array]:
    """{'cls'} for a single-head model; {'cls', 'dist', 'both'} for a distilled one."""
    if self.dist is None:
      return {"cls": self.cls}
    return {"cls": self.cls, "dist": self.dist, "both": self.both}


class SingleHead:
  """`heads()` for a model whose `__call__` returns one head's logits (the CNN teachers)."""

  def heads(self, images, *, rngs=None) -> Outputs:
    del rngs  # no stochastic layers
    return Outputs(self(images), None, {})
