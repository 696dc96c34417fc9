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

from deit_jax import data, visualize


def eval_input_size(config) -> int:
  """The eval resolution: aug.eval_input_size, or the training input size."""
  return int(config.aug.get("eval_input_size") or config.aug.input_size)


def make_eval_step(eval_graphdef, teacher=None) -> Callable:
  """Sums of correct top-1/top-5 predictions (masked) for each head and the EMA.

  The step `step(params, ema, batch, teacher_params=None)` takes the model's variables
  (parameters, and BatchNorm statistics for CNNs) as one nested dict, and the EMA's likewise (or
  None). With a `distill.Teacher` it also sums, per head, the images whose argmax is the
  teacher's ('agree'), and the teacher's own top-1/top-5 ('teacher'); the teacher sees the eval
  images at its own resolution and normalization (`Teacher.logits`). A distilled DeiT adds the
  class/distillation token cosine similarity at the output of the last block (before the final
  LayerNorm: the last layer of `visualize.token_similarity`), summed over the images."""

  noted = []

  def correct(logits, labels, mask, target=None):
    # With fewer than 5 classes "top5" is top-C (always 100%), said once per eval step.
    k = min(5, logits.shape[-1])
    if k < 5 and not noted:
      noted.append(k)
      from absl import logging  # noqa: PLC0415 - only this note uses it
      logging.warning("The model has %d classes: top5 is top-%d (every label is in it).", k, k)
    top5 = jax.lax.top_k(logits, k)[1]
    hit1 = (top5[:, 0] == labels)
    hit5 = jnp.any(top5 == labels[:, None], axis=-1)
    res = {"top1": jnp.sum(hit1 * mask), "top5": jnp.sum(hit5 * mask)}
    if target is not None:  # the teacher's argmax
      res["agree"] = jnp.sum((top5[:, 0] == target) * mask)
    return res

  def heads(variables, images):
    # A DeiT trained at another resolution resizes its position grid in the forward pass.
    return nnx.merge(eval_graphdef, variables).heads(images)

  def step(params, ema, batch, teacher_params=None):
    labels, mask, images = batch["label"], batch["mask"], batch["image"]
    res, target = {}, None
    if teacher is not None:
      t_logits = teacher.logits(teacher_params, images)
      target = jnp.argmax(t_logits, axis=-1)
      res["teacher"] = correct(t_logits, labels, mask)
    out = heads(params, images)
    res.update({name: correct(lg, labels, mask, target) for name, lg in out.by_head().items()})
    if ema is not None:
      res["ema"] = correct(heads(ema, images).both, labels, mask, target)
    if out.dist is not None and out.aux and "block0" in out.aux:
      res["token_cos"] = jnp.sum(visualize.token_similarity(out.aux, xp=jnp)[-1] * mask)
    res["count"] = jnp.sum(mask)
    return res

  return step


def evaluate(eval_step, params, ema, source, config, batch_sharding, teacher=None
             ) -> dict[str, float]:
  """Runs `eval_step` over the whole eval source; percentages keyed 'eval/<head>_top1',
  '_top5' and (with the eval step's `teacher`, passed here too) '_agree', 'eval/teacher_top1'
  etc., plus 'eval/top1' / 'eval/top5' for the head named by config.eval_head, 'eval/count' and
  (a distilled DeiT) 'eval/token_cos', the mean cosine similarity."""
  totals = None
  aug = config.aug
  if eval_input_size(config) != aug.input_size:
    aug = ml_collections.ConfigDict(aug.to_dict())
    aug.input_size = eval_input_size(config)
  teacher_params = None if teacher is None else teacher.params
  for batch in data.eval_iterator(source, aug, global_batch_size=config.eval_batch_size):
    res = eval_step(params, ema, data.to_global(batch, batch_sharding), teacher_params)
    totals = res if totals is None else jax.tree.map(jnp.add, totals, res)
  totals = jax.device_get(totals)
  count = float(totals.pop("count"))
  token_cos = totals.pop("token_cos", None)
  out = {f"eval/{head}_{k}": float(v) / count * 100 for head, r in totals.items()
         for k, v in r.items()}
  head = config.eval_head if f"eval/{config.eval_head}_top1" in out else "cls"
  out["eval/top1"], out["eval/top5"] = out[f"eval/{head}_top1"], out[f"eval/{head}_top5"]
  out["eval/count"] = count
  if token_cos is not None:
    out["eval/token_cos"] = float(token_cos) / count
  return out


# The rows of the eval table (and of eval.json's "heads"), in order: key prefix -> name.
HEAD_NAMES = {"cls": "class", "dist": "distillation", "both": "both", "ema": "EMA",
              "teacher": "teacher"}


def by_head(results: dict[str, float]) -> dict[str, dict[str, float]]:
  """`evaluate`'s results as {row name: {'top1', 'top5'[, 'agree']}}, the rows it has."""
  rows = {}
  for key, name in HEAD_NAMES.items():
    row = {m: results[f"eval/{key}_{m}"] for m in ("top1", "top5", "agree")
           if f"eval/{key}_{m}" in results}
    if row:
      rows[name] = row
  return rows


def table(results: dict[str, float]) -> str:
  """`evaluate`'s results as a readable table, a row per head (and the teacher)."""
  rows = by_head(results)
  agree = any("agree" in r for r in rows.values())
  lines = [f"{'head':<14}{'top-1':>8}{'top-5':>8}" + ("  agrees with teacher" if agree else "")]
  for name, r in rows.items():
    line = f"{name:<14}{r['top1']:>8.2f}{r['top5']:>8.2f}"
    lines.append(line + (f"{r['agree']:>21.2f}" if "agree" in r else ""))
  lines.append(f"{int(results['eval/count'])} images; reported as eval/top1: "
               f"{results['eval/top1']:.2f}")
  if "eval/token_cos" in results:
    lines.append("class/distillation token cosine similarity after the last block: "
                 f"{results['eval/token_cos']:.4f}")
  return "\n".join(lines)
