"""DeiT's objectives, with the official reductions.

`distillation_loss` is the official `DistillationLoss`:
  total = (1 - alpha) * base + alpha * distill
  base     cross-entropy of the class head on the (mixed, smoothed) targets
  soft     KL(teacher || student) of tau-softened distributions, x tau^2, summed and divided by
           batch x classes ('official'; 'batchmean' divides by the batch only)
  hard     cross-entropy of the distillation head against the teacher's argmax (no smoothing)
For a distilled model the distillation term goes to the distillation head; for a plain model it
goes to the class head ("class token only" in the paper). With kind='none' a distilled model's
distillation head gets no gradient, exactly as in the official code.

DeiT III replaces the base term by binary cross-entropy (`base_loss='bce'`, the official
`--bce-loss`: torch's BCEWithLogitsLoss, a mean over batch x classes) on the mixed targets, which
the official code first binarizes (`targets > 0`: every class mixed into an image is a positive);
`bce_target_threshold=None` keeps the soft mixed targets instead. The distillation terms are
unchanged (the official DistillationLoss wraps whichever base criterion).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

REDUCTIONS = ("official", "batchmean")
BASE_LOSSES = ("ce", "bce")


def cross_entropy(logits, targets, *, label_smoothing: float = 0.0):
  """Mean cross-entropy. Integer targets: timm's LabelSmoothingCrossEntropy (the official loss
  without mixup). Probability targets (mixup/cutmix, already smoothed): SoftTargetCrossEntropy."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  if jnp.issubdtype(jnp.asarray(targets).dtype, jnp.integer):
    nll = -jnp.take_along_axis(logp, targets[:, None].astype(jnp.int32), axis=-1)[:, 0]
    smooth = -logp.mean(axis=-1)
    return jnp.mean((1.0 - label_smoothing) * nll + label_smoothing * smooth)
  return jnp.mean(jnp.sum(-targets * logp, axis=-1))


def binary_cross_entropy(logits, targets, *, target_threshold: float | None = None,
                         num_classes: int | None = None):
  """Mean (over batch x classes) sigmoid binary cross-entropy, torch's BCEWithLogitsLoss.

  targets: probabilities (mixup/cutmix targets) or integer labels (one-hot). With
  `target_threshold`, targets > threshold become 1 and the rest 0 (DeiT III: 0.0).
  """
  logits = logits.astype(jnp.float32)
  targets = jnp.asarray(targets)
  if jnp.issubdtype(targets.dtype, jnp.integer):
    targets = jax.nn.one_hot(targets, num_classes or logits.shape[-1], dtype=jnp.float32)
  targets = targets.astype(jnp.float32)
  if target_threshold is not None:
    targets = (targets > target_threshold).astype(jnp.float32)
  # log(sigmoid(x)) and log(1 - sigmoid(x)) in their stable forms.
  return jnp.mean(-(targets * jax.nn.log_sigmoid(logits)
                    + (1.0 - targets) * jax.nn.log_sigmoid(-logits)))


def soft_distillation(student_logits, teacher_logits, *, tau: float = 1.0,
                      reduction: str = "official"):
  """KL(teacher || student) at temperature tau, times tau^2."""
  s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / tau, axis=-1)
  t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / tau, axis=-1)
  kl = jnp.sum(jnp.exp(t) * (t - s))
  denom = student_logits.size if reduction == "official" else student_logits.shape[0]
  return kl * (tau * tau) / denom


def hard_distillation(student_logits, teacher_logits):
  return cross_entropy(student_logits, jnp.argmax(teacher_logits, axis=-1))


# The logit-based distillation kinds: kind -> term(student_logits, teacher_logits, tau, reduction).
# A new kind is one entry here (the config check, the trainer and the precomputed store, which
# keeps the teacher's top-k logits for any kind but 'hard', follow this table).
DISTILLATION_TERMS: dict[str, Callable] = {
    "soft": lambda s, t, tau, reduction: soft_distillation(s, t, tau=tau, reduction=reduction),
    "hard": lambda s, t, tau, reduction: hard_distillation(s, t),
}
KINDS = ("none",) + tuple(DISTILLATION_TERMS)


def check(kind, reduction, alpha, base_loss="ce"):
  """The one check of the loss settings (the trainer calls it on the config before compiling);
  ValueError naming the setting (as `config.<name>`) and its allowed values."""
  if base_loss not in BASE_LOSSES:
    raise ValueError(f"config.loss={base_loss!r}: unknown base loss; use one of {BASE_LOSSES}.")
  if kind not in KINDS:
    raise ValueError(f"config.distillation.kind={kind!r}; use one of {KINDS}.")
  if reduction not in REDUCTIONS:
    raise ValueError(f"config.distillation.reduction={reduction!r}; use one of {REDUCTIONS}.")
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"config.distillation.alpha={alpha} must be in [0, 1].")


def distillation_terms(cls_logits, dist_logits, targets, teacher_logits=None, *, kind: str,
                       alpha: float = 0.5, tau: float = 1.0, reduction: str = "official",
                       label_smoothing: float = 0.0, base_loss: str = "ce",
                       bce_target_threshold: float | None = None) -> dict:
  """{'loss', 'base', 'distill'}; see `distillation_loss`."""
  check(kind, reduction, alpha, base_loss)
  if dist_logits is None:
    dist_logits = cls_logits  # class token only
  if base_loss == "bce":
    base = binary_cross_entropy(cls_logits, targets, target_threshold=bce_target_threshold)
  else:
    base = cross_entropy(cls_logits, targets, label_smoothing=label_smoothing)
  if kind == "none":
    return {"loss": base, "base": base, "distill": jnp.zeros_like(base)}
  if teacher_logits is None:
    raise ValueError(f"Distillation kind {kind!r} needs teacher logits.")
  teacher_logits = jax.lax.stop_gradient(teacher_logits)
  distill = DISTILLATION_TERMS[kind](dist_logits, teacher_logits, tau, reduction)
  return {"loss": (1.0 - alpha) * base + alpha * distill, "base": base, "distill": distill}


def distillation_loss(cls_logits, dist_logits, targets, teacher_logits=None, *, kind: str,
                      alpha: float = 0.5, tau: float = 1.0, reduction: str = "official",
                      label_smoothing: float = 0.0, base_loss: str = "ce",
                      bce_target_threshold: float | None = None):
  """The official DeiT loss (see the module docstring).

  cls_logits, dist_logits: the class head's and the distillation head's logits
  (`model.heads(x).cls` / `.dist`); dist_logits None for a model without a distillation token
  (the distillation term then goes to the class head).
  targets: integer labels (smoothed with `label_smoothing`) or probabilities (mixup targets).
  teacher_logits: the frozen teacher's logits on the same (mixed) images; unused for 'none'.
  base_loss: 'ce' (DeiT) or 'bce' (DeiT III, targets binarized by `bce_target_threshold`).
  """
  return distillation_terms(cls_logits, dist_logits, targets, teacher_logits, kind=kind,
                            alpha=alpha, tau=tau, reduction=reduction,
                            label_smoothing=label_smoothing, base_loss=base_loss,
                            bce_target_threshold=bce_target_threshold)["loss"]
