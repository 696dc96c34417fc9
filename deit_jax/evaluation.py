"""Evaluation: exact top-1/top-5 over a padded, masked eval stream, for each head and the EMA.

Every process runs the same number of batches (padding rows have mask 0), so the numbers are
exact at any device or process count.

A model may be evaluated at another resolution than it trains at (`config.aug.eval_input_size`;
DeiT III trains at 192 and evaluates at 224): the eval step's model is built at the eval size and
the trained position embedding is resized to its grid in the model's forward pass
(`DeiT._position_embedding`), bicubically with the prefix rows kept, as loading a checkpoint at
another size does.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from deit_jax import data


def eval_input_size(config) -> int:
  """The eval resolution: aug.eval_input_size, or the training input size."""
  return int(config.aug.get("eval_input_size") or config.aug.input_size)


def make_eval_step(eval_graphdef) -> Callable:
  """Sums of correct top-1/top-5 predictions (masked) for each head and the EMA.

  The step takes the model's variables (parameters, and BatchNorm statistics for CNNs) as one
  nested dict, and the EMA's likewise (or None)."""

  noted = []

  def correct(logits, labels, mask):
    # With fewer than 5 classes "top5" is top-C (always 100%), said once per eval step.
    k = min(5, logits.shape[-1])
    if k < 5 and not noted:
      noted.append(k)
      from absl import logging  # noqa: PLC0415 - only this note uses it
      logging.warning("The model has %d classes: top5 is top-%d (every label is in it).", k, k)
    top5 = jax.lax.top_k(logits, k)[1]
    hit1 = (top5[:, 0] == labels)
    hit5 = jnp.any(top5 == labels[:, None], axis=-1)
    return {"top1": jnp.sum(hit1 * mask), "top5": jnp.sum(hit5 * mask)}

  def heads(variables, images):
    # A DeiT trained at another resolution resizes its position grid in the forward pass.
    return nnx.merge(eval_graphdef, variables).heads(images)

  def step(params, ema, batch):
    labels, mask = batch["label"], batch["mask"]
    res = {name: correct(lg, labels, mask)
           for name, lg in heads(params, batch["image"]).by_head().items()}
    if ema is not None:
      res["ema"] = correct(heads(ema, batch["image"]).both, labels, mask)
    res["count"] = jnp.sum(mask)
    return res

  return step


def evaluate(eval_step, params, ema, source, config, batch_sharding) -> dict[str, float]:
  """Runs `eval_step` over the whole eval source; percentages keyed 'eval/<head>_top1' etc.,
  plus 'eval/top1' / 'eval/top5' for the head named by config.eval_head."""
  totals = None
  aug = config.aug
  if eval_input_size(config) != aug.input_size:
    aug = ml_collections.ConfigDict(aug.to_dict())
    aug.input_size = eval_input_size(config)
  for batch in data.eval_iterator(source, aug, global_batch_size=config.eval_batch_size):
    res = eval_step(params, ema, data.to_global(batch, batch_sharding))
    totals = res if totals is None else jax.tree.map(jnp.add, totals, res)
  totals = jax.device_get(totals)
  count = float(totals.pop("count"))
  out = {f"eval/{head}_{k}": float(v) / count * 100 for head, r in totals.items()
         for k, v in r.items()}
  head = config.eval_head if f"eval/{config.eval_head}_top1" in out else "cls"
  out["eval/top1"], out["eval/top5"] = out[f"eval/{head}_top1"], out[f"eval/{head}_top5"]
  out["eval/count"] = count
  return out
