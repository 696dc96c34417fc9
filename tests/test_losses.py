"""The DeiT losses against the official formulas, computed by hand in numpy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deit_jax import losses, mixup

rng = np.random.RandomState(0)
B, C = 4, 5
CLS = rng.randn(B, C).astype(np.float32) * 2
DIST = rng.randn(B, C).astype(np.float32) * 2
TEACHER = rng.randn(B, C).astype(np.float32) * 3
LABELS = np.array([0, 3, 1, 4])


def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_label_smoothing_ce_matches_timm_formula():
  lp = log_softmax(CLS)
  nll = -lp[np.arange(B), LABELS]
  want = np.mean(0.9 * nll + 0.1 * (-lp.mean(-1)))
  np.testing.assert_allclose(losses.cross_entropy(CLS, LABELS, label_smoothing=0.1), want,
                             rtol=1e-6)
  # Equivalent to soft-target CE on the smoothed one-hot (what mixup targets fold in).
  soft = mixup.one_hot_smoothed(LABELS, C, 0.1)
  np.testing.assert_allclose(losses.cross_entropy(CLS, soft), want, rtol=1e-6)


def test_soft_distillation_official_reduction():
  tau = 3.0
  s, t = log_softmax(DIST / tau), log_softmax(TEACHER / tau)
  kl_sum = np.sum(np.exp(t) * (t - s))
  base = -np.mean(log_softmax(CLS)[np.arange(B), LABELS])
  got = losses.distillation_terms(CLS, DIST, LABELS, TEACHER, kind="soft", alpha=0.1, tau=tau)
  np.testing.assert_allclose(got["distill"], kl_sum * tau * tau / (B * C), rtol=1e-5)
  np.testing.assert_allclose(got["base"], base, rtol=1e-6)
  np.testing.assert_allclose(got["loss"], 0.9 * base + 0.1 * kl_sum * tau * tau / (B * C),
                             rtol=1e-5)
  batchmean = losses.distillation_terms(CLS, DIST, LABELS, TEACHER, kind="soft", tau=tau,
                                        reduction="batchmean")
  np.testing.assert_allclose(batchmean["distill"], kl_sum * tau * tau / B, rtol=1e-5)


def test_hard_distillation_uses_teacher_argmax_without_smoothing():
  hard = TEACHER.argmax(-1)
  want_d = -np.mean(log_softmax(DIST)[np.arange(B), hard])
  lp = log_softmax(CLS)
  want_b = np.mean(0.9 * -lp[np.arange(B), LABELS] + 0.1 * -lp.mean(-1))
  got = losses.distillation_terms(CLS, DIST, LABELS, TEACHER, kind="hard",
                                  label_smoothing=0.1)
  np.testing.assert_allclose(got["distill"], want_d, rtol=1e-6)
  np.testing.assert_allclose(got["loss"], 0.5 * want_b + 0.5 * want_d, rtol=1e-6)


def test_class_token_only_puts_distillation_on_the_class_head():
  got = losses.distillation_loss(CLS, None, LABELS, TEACHER, kind="hard")
  want = 0.5 * -np.mean(log_softmax(CLS)[np.arange(B), LABELS]) + 0.5 * -np.mean(
      log_softmax(CLS)[np.arange(B), TEACHER.argmax(-1)])
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_none_gives_no_gradient_to_the_distillation_head_nor_the_teacher():
  def f(cls, dist, teacher):
    return losses.distillation_loss(cls, dist, LABELS, teacher, kind="none")
  g_cls, g_dist, g_t = jax.grad(f, argnums=(0, 1, 2))(CLS, DIST, TEACHER)
  assert np.abs(g_cls).sum() > 0 and np.all(g_dist == 0) and np.all(g_t == 0)

  def h(teacher):
    return losses.distillation_loss(CLS, DIST, LABELS, teacher, kind="soft")
  assert np.all(jax.grad(h)(TEACHER) == 0)  # the teacher is frozen


def test_mixed_targets():
  t = mixup.one_hot_smoothed(LABELS, C, 0.1) * 0.7 + mixup.one_hot_smoothed(
      LABELS[::-1], C, 0.1) * 0.3
  want = np.mean(np.sum(-np.asarray(t) * log_softmax(CLS), -1))
  np.testing.assert_allclose(losses.cross_entropy(CLS, t), want, rtol=1e-6)


@pytest.mark.parametrize("kw,match", [({"kind": "kl"}, "kind"),
                                      ({"kind": "soft", "reduction": "mean"}, "reduction"),
                                      ({"kind": "soft", "alpha": 2.0}, "alpha")])
def test_bad_options(kw, match):
  with pytest.raises(ValueError, match=match):
    losses.distillation_loss(CLS, DIST, LABELS, TEACHER, **kw)


def test_missing_teacher():
  with pytest.raises(ValueError, match="teacher logits"):
    losses.distillation_loss(CLS, DIST, LABELS, None, kind="hard")


def test_jits():
  f = jax.jit(lambda c, d, t: losses.distillation_loss(c, d, jnp.asarray(LABELS), t,
                                                       kind="soft", tau=2.0))
  np.testing.assert_allclose(f(CLS, DIST, TEACHER), losses.distillation_loss(
      CLS, DIST, LABELS, TEACHER, kind="soft", tau=2.0), rtol=1e-6)
