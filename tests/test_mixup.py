"""Mixup / CutMix: timm 'batch' mode semantics, per-group pairing, sharded jit."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deit_jax import mixup
from deit_jax.mixup import mixup_cutmix, one_hot_smoothed

B, H, W, C = 8, 12, 10, 3
# Jitted once per option set: eager op-by-op dispatch of the Beta sampler is slow to start.
_mix = jax.jit(mixup_cutmix, static_argnames=(
    "num_classes", "mixup_alpha", "cutmix_alpha", "prob", "switch_prob", "label_smoothing",
    "cutmix_minmax", "correct_lam", "num_groups"))


def _batch(batch=B, num_classes=None):
  """Images whose every row differs from every other at every pixel; labels = row ids."""
  rng = np.random.default_rng(0)
  images = np.arange(batch, dtype=np.float32)[:, None, None, None] * 10 + rng.uniform(
      0, 1, (batch, H, W, C)).astype(np.float32)
  return jnp.asarray(images), jnp.arange(batch)


def _lam_from_targets(targets, labels, num_classes, smoothing):
  """Row 0's own-label weight recovers lambda: lam * on + (1 - lam) * off."""
  on, off = 1 - smoothing + smoothing / num_classes, smoothing / num_classes
  return (float(targets[0, labels[0]]) - off) / (on - off)


def test_one_hot_smoothed():
  t = one_hot_smoothed(jnp.array([2, 0]), 10, 0.1)
  np.testing.assert_allclose(t[0], [0.01, 0.01, 0.91] + [0.01] * 7, rtol=1e-6)
  np.testing.assert_allclose(t.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(one_hot_smoothed(jnp.array([1]), 3, 0.0), [[0, 1, 0]])


def test_cutmix_pastes_box_and_lambda_is_area():
  images, labels = _batch()
  boxes = set()
  for seed in range(12):
    out, targets = _mix(jax.random.key(seed), images, labels, num_classes=B,
                                mixup_alpha=0.0, label_smoothing=0.0)
    out = np.asarray(out)
    pasted = np.all(out == np.asarray(images)[::-1], axis=-1)  # [B, H, W]
    kept = np.all(out == np.asarray(images), axis=-1)
    assert (pasted ^ kept).all()  # every pixel comes whole from the image or its partner
    assert (pasted == pasted[0]).all()  # one box for the batch
    ys, xs = np.nonzero(pasted[0])
    if len(ys):  # the pasted region is exactly a rectangle
      y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
      assert pasted[0].sum() == (y1 - y0) * (x1 - x0)
      boxes.add((y0, y1, x0, x1))
    lam = _lam_from_targets(targets, labels, B, 0.0)
    np.testing.assert_allclose(lam, 1 - pasted[0].mean(), atol=1e-6)  # correct_lam
    np.testing.assert_allclose(targets[0, labels[-1]], pasted[0].mean(), atol=1e-6)
  assert len(boxes) > 5  # random boxes, not a fixed one
  clipped = [b for b in boxes if b[0] == 0 or b[1] == H or b[2] == 0 or b[3] == W]
  assert clipped  # boxes near the border are clipped, and lambda still matches the pixels


def test_cutmix_minmax_box_sizes():
  images, labels = _batch()
  for seed in range(6):
    out, targets = _mix(jax.random.key(seed), images, labels, num_classes=B,
                                mixup_alpha=0.0, cutmix_alpha=0.0, cutmix_minmax=(0.4, 0.8),
                                label_smoothing=0.0)
    pasted = np.all(np.asarray(out) == np.asarray(images)[::-1], axis=-1)[0]
    ys, xs = np.nonzero(pasted)
    assert int(H * 0.4) <= ys.max() + 1 - ys.min() < int(H * 0.8)
    assert int(W * 0.4) <= xs.max() + 1 - xs.min() < int(W * 0.8)
    np.testing.assert_allclose(_lam_from_targets(targets, labels, B, 0.0), 1 - pasted.mean(),
                               atol=1e-6)


def test_switch_prob_and_prob():
  images, labels = _batch()

  @jax.jit
  def kind(key):
    out, _ = _mix(key, images, labels, num_classes=B, switch_prob=0.5)
    same_or_partner = (out == images) | (out == images[::-1])
    return jnp.all(same_or_partner)  # CutMix moves whole pixels; Mixup blends them

  is_cutmix = np.array([kind(k) for k in jax.random.split(jax.random.key(0), 200)])
  assert 0.35 < is_cutmix.mean() < 0.65
  # prob=0: nothing mixed, targets are the smoothed labels.
  out, targets = _mix(jax.random.key(0), images, labels, num_classes=B, prob=0.0)
  np.testing.assert_array_equal(out, images)
  np.testing.assert_allclose(targets, one_hot_smoothed(labels, B, 0.1))


def test_mixup_pairs_reversed_within_each_group_with_its_own_lambda():
  groups, batch, smoothing = 4, 16, 0.1
  images, labels = _batch(batch)
  smooth = np.asarray(one_hot_smoothed(labels, batch, smoothing))
  size = batch // groups
  lams = []
  for seed in range(2):
    out, targets = _mix(jax.random.key(seed), images, labels, num_classes=batch,
                        cutmix_alpha=0.0, label_smoothing=smoothing, num_groups=groups)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-5)
    for g in range(groups):
      rows = np.arange(g * size, (g + 1) * size)
      partner = rows[::-1]  # the group reversed
      lam = _lam_from_targets(np.asarray(targets)[rows], np.asarray(labels)[rows], batch,
                              smoothing)
      assert 0 <= lam <= 1
      lams.append(lam)
      np.testing.assert_allclose(targets[rows], lam * smooth[rows] + (1 - lam) * smooth[partner],
                                 rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(out[rows], lam * images[rows] + (1 - lam) * images[partner],
                                 rtol=1e-5, atol=1e-5)
  assert len(set(np.round(lams, 6))) == len(lams)  # a lambda per group (and per call)
  with pytest.raises(ValueError, match="not divisible by num_groups"):
    _mix(jax.random.key(0), images, labels, num_classes=batch, num_groups=3)


def test_beta_sampler_matches_distribution():
  from scipy import stats
  draws = jax.jit(jax.vmap(lambda k: mixup._beta(k, jnp.float32(0.8))))(
      jax.random.split(jax.random.key(0), 20000))
  draws = np.asarray(draws)
  assert np.isfinite(draws).all() and (draws >= 0).all() and (draws <= 1).all()
  assert stats.kstest(draws, stats.beta(0.8, 0.8).cdf).pvalue > 1e-3


def test_sharded_jit_pairs_per_device_without_communication():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  images, labels = _batch(32)
  fn = jax.jit(functools.partial(mixup_cutmix, num_classes=32, num_groups=8))
  key = jax.random.key(5)
  sharded_images = jax.device_put(images, sharding)
  sharded_labels = jax.device_put(labels, sharding)
  out, targets = fn(key, sharded_images, sharded_labels)
  ref_out, ref_targets = _mix(key, images, labels, num_classes=32, num_groups=8)
  np.testing.assert_allclose(out, ref_out, rtol=1e-6)
  np.testing.assert_allclose(targets, ref_targets, rtol=1e-6)
  assert out.sharding.is_equivalent_to(sharding, out.ndim)
  # Pairing is per device and the draws are loop-free: the compiled step has no collectives.
  hlo = fn.lower(key, sharded_images, sharded_labels).compile().as_text()
  for collective in ("all-reduce", "all-gather", "all-to-all", "collective-permute",
                     "reduce-scatter"):
    assert collective not in hlo, collective
