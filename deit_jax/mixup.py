"""Mixup / CutMix on device, label smoothing folded into the targets (timm `Mixup`, 'batch' mode).

One lambda per batch: with probability `prob` the batch is mixed, by CutMix with probability
`switch_prob` (when both alphas are > 0) and by Mixup otherwise; lambda ~ Beta(alpha, alpha) of
the chosen method. Each image is mixed with its partner in the batch reversed. CutMix pastes the
partner's box, whose side is sqrt(1 - lambda) of the image's, centred at a uniform pixel and
clipped to the image; with `correct_lam` lambda is then recomputed as 1 - (clipped box area /
image area), so the targets weigh exactly the pixels each image contributes. Targets are
`lam * smooth(y) + (1 - lam) * smooth(y_partner)`, with smooth(y) = one-hot with
on = 1 - ls + ls / C and off = ls / C.

Groups (`num_groups`): the batch is viewed as [num_groups, B / num_groups, ...] and every group is
reversed and paired within itself, with its own lambda and box. With num_groups = the number of
devices the batch is sharded over, the pairing is per device and costs no cross-device traffic;
the official code (timm Mixup inside each GPU's data-loader batch) also pairs within each GPU's
batch with a lambda per GPU. num_groups=1 pairs across the whole global batch. Groups map onto
devices when the batch axis is sharded in num_groups equal contiguous blocks (a 'data' mesh axis
of that size). The random draws avoid data-dependent loops (see `_gamma`), so the compiled mix has
no collectives at all.

Only timm's 'batch' mode is implemented (the DeiT recipe); 'pair' and 'elem' are not.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def one_hot_smoothed(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  """One-hot float32 targets with label smoothing: on = 1 - s + s / C, off = s / C (timm)."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (1.0 - smoothing) + off


_GAMMA_PROPOSALS = 16


def _gamma(key, shape_param):
  """One Gamma(shape_param, 1) draw, Marsaglia-Tsang, without a data-dependent loop.

  `jax.random.gamma` loops until a proposal is accepted; inside a step sharded over devices that
  loop makes every device vote on its exit (scalar all-reduces) and is slow to compile. Here a
  fixed batch of proposals is drawn and the first accepted one is used; each is accepted with
  probability > 0.95, so all 16 failing (then the last one, clipped, is used) has odds < 1e-20.
  Shapes < 1 use the usual boost Gamma(a) = Gamma(a + 1) * U^(1/a).
  """
  k_normal, k_uniform, k_boost = jax.random.split(key, 3)
  boosted = shape_param < 1
  a = jnp.where(boosted, shape_param + 1.0, shape_param)
  d = a - 1.0 / 3.0
  c = 1.0 / jnp.sqrt(9.0 * d)
  x = jax.random.normal(k_normal, (_GAMMA_PROPOSALS,))
  log_u = jnp.log(jax.random.uniform(k_uniform, (_GAMMA_PROPOSALS,), minval=1e-30))
  v = (1.0 + c * x) ** 3
  safe_v = jnp.maximum(v, 1e-30)
  accepted = (v > 0) & (log_u < 0.5 * x * x + d - d * safe_v + d * jnp.log(safe_v))
  sample = d * safe_v[jnp.argmax(accepted)]  # argmax: first True (or 0 when none is).
  boost = jax.random.uniform(k_boost, minval=1e-30) ** (1.0 / shape_param)
  return jnp.where(boosted, sample * boost, sample)


def _beta(key, alpha):
  """One Beta(alpha, alpha) draw as G1 / (G1 + G2)."""
  k1, k2 = jax.random.split(key)
  g1, g2 = _gamma(k1, alpha), _gamma(k2, alpha)
  return g1 / (g1 + g2)


def _cutmix_box(key, lam, height: int, width: int, cutmix_minmax):
  """timm's rand_bbox / rand_bbox_minmax for one lambda: returns (y0, y1, x0, x1) int32."""
  k_y, k_x, k_h, k_w = jax.random.split(key, 4)
  if cutmix_minmax is None:
    ratio = jnp.sqrt(1.0 - lam)
    cut_h = (height * ratio).astype(jnp.int32)  # int() truncation, as timm.
    cut_w = (width * ratio).astype(jnp.int32)
    cy = jax.random.randint(k_y, (), 0, height)
    cx = jax.random.randint(k_x, (), 0, width)
    y0 = jnp.clip(cy - cut_h // 2, 0, height)
    y1 = jnp.clip(cy + cut_h // 2, 0, height)
    x0 = jnp.clip(cx - cut_w // 2, 0, width)
    x1 = jnp.clip(cx + cut_w // 2, 0, width)
  else:
    lo, hi = cutmix_minmax
    cut_h = jax.random.randint(k_h, (), int(height * lo), int(height * hi))
    cut_w = jax.random.randint(k_w, (), int(width * lo), int(width * hi))
    y0 = jax.random.randint(k_y, (), 0, height - cut_h)
    x0 = jax.random.randint(k_x, (), 0, width - cut_w)
    y1, x1 = y0 + cut_h, x0 + cut_w
  return y0, y1, x0, x1


def _group_params(key, *, height, width, mixup_alpha, cutmix_alpha, prob, switch_prob,
                  cutmix_minmax, correct_lam):
  """One group's (lam, use_cutmix, box), following timm `Mixup._params_per_batch`."""
  k_apply, k_switch, k_mix, k_box = jax.random.split(key, 4)
  apply = jax.random.uniform(k_apply) < prob
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  # One Beta draw with the chosen method's alpha (both alphas are > 0 when both can be chosen).
  alpha = jnp.where(use_cutmix, cutmix_alpha, mixup_alpha).astype(jnp.float32)
  lam = _beta(k_mix, alpha)
  use_cutmix = use_cutmix & apply
  lam = jnp.where(apply, lam, 1.0).astype(jnp.float32)
  y0, y1, x0, x1 = _cutmix_box(k_box, lam, height, width, cutmix_minmax)
  if correct_lam or cutmix_minmax is not None:
    area = ((y1 - y0) * (x1 - x0)).astype(jnp.float32)
    lam = jnp.where(use_cutmix, 1.0 - area / (height * width), lam)
  return lam, use_cutmix, (y0, y1, x0, x1)


def mixup_cutmix(rng: jax.Array, images: jax.Array, labels: jax.Array, *, num_classes: int,
                 mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0,
                 switch_prob: float = 0.5, label_smoothing: float = 0.1,
                 cutmix_minmax: Sequence[float] | None = None, correct_lam: bool = True,
                 num_groups: int = 1) -> tuple[jax.Array, jax.Array]:
  """Mixes images [B, H, W, C] and returns (mixed_images, soft targets float32 [B, num_classes]).

  With mixing off (prob 0 or both alphas 0) the images come back unchanged and the targets are
  the smoothed one-hot labels. See the module docstring for semantics and `num_groups`.
  """
  if cutmix_minmax is not None:
    if len(cutmix_minmax) != 2 or not 0 <= cutmix_minmax[0] < cutmix_minmax[1] <= 1:
      raise ValueError(f"cutmix_minmax must be (min, max) with 0 <= min < max <= 1, got "
                       f"{cutmix_minmax}.")
    cutmix_alpha = 1.0  # timm forces this when minmax is set (lambda then comes from the box).
  if mixup_alpha < 0 or cutmix_alpha < 0:
    raise ValueError(f"alphas must be >= 0, got mixup {mixup_alpha}, cutmix {cutmix_alpha}.")
  batch, height, width = images.shape[0], images.shape[1], images.shape[2]
  if batch % num_groups:
    raise ValueError(f"batch size {batch} is not divisible by num_groups={num_groups}.")
  targets = one_hot_smoothed(labels, num_classes, label_smoothing)
  if (mixup_alpha == 0 and cutmix_alpha == 0) or prob <= 0:
    return images, targets

  params = jax.vmap(lambda k: _group_params(
      k, height=height, width=width, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
      prob=prob, switch_prob=switch_prob, cutmix_minmax=cutmix_minmax,
      correct_lam=correct_lam))(jax.random.split(rng, num_groups))
  lam, use_cutmix, (y0, y1, x0, x1) = params

  group_shape = (num_groups, batch // num_groups)
  x = images.reshape(group_shape + images.shape[1:])
  x_partner = x[:, ::-1]
  # Blend in at least float32 so a bf16 batch gets the same lambda as its targets.
  compute = jnp.promote_types(images.dtype, jnp.float32)
  lam_x = lam[:, None, None, None, None]
  mixed = (lam_x * x.astype(compute) + (1 - lam_x) * x_partner.astype(compute)).astype(images.dtype)
  rows = jnp.arange(height)[None, :, None]
  cols = jnp.arange(width)[None, None, :]
  in_box = ((rows >= y0[:, None, None]) & (rows < y1[:, None, None])
            & (cols >= x0[:, None, None]) & (cols < x1[:, None, None]))  # [G, H, W]
  pasted = jnp.where(in_box[:, None, :, :, None], x_partner, x)
  out = jnp.where(use_cutmix[:, None, None, None, None], pasted, mixed).reshape(images.shape)

  t = targets.reshape(group_shape + (num_classes,))
  lam_t = lam[:, None, None]
  soft = (lam_t * t + (1 - lam_t) * t[:, ::-1]).reshape(batch, num_classes)
  return out, soft
