"""timm's "every parameter gets a gradient" test, through the trainer's own objective
(`step.make_loss_fn`: `model.heads()` into the run's `Distillation.loss`), under no, soft and hard
distillation, for DeiT (distilled and not, DeiT III) and the CNN teachers."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tiny_config  # noqa: E402
from deit_jax import distill, models, step, teachers, trees  # noqa: E402

B, C = 4, 10


def _distillation(kind):
  c = tiny_config.get_config()
  c.distillation.kind = kind
  c.distillation.alpha = 0.5
  return distill.Distillation(c, num_classes=C, source="none" if kind == "none" else "precomputed")


KINDS = ("none", "soft", "hard")


def _grads(model, size):
  """{kind: {parameter path: gradient}}, the three kinds in one compiled program."""
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  fns = {kind: step.make_loss_fn(graphdef, _distillation(kind)) for kind in KINDS}
  images = jax.random.normal(jax.random.key(1), (B, size, size, 3))
  teacher = jax.random.normal(jax.random.key(2), (B, C)) * 3
  labels = jnp.arange(B) % C

  @jax.jit
  def all_grads(p, stats):
    return {kind: jax.grad(lambda p: fn(p, stats, images, labels, teacher,
                                        jax.random.key(3))[0])(p) for kind, fn in fns.items()}

  out = all_grads(step.str_keys(params), step.str_keys(stats))
  return {kind: {trees.path_str(path): np.asarray(leaf)
                 for path, leaf in jax.tree_util.tree_flatten_with_path(g)[0]}
          for kind, g in out.items()}


def _no_gradient(grads):
  return sorted(name for name, g in grads.items() if not np.any(g != 0))


@pytest.mark.parametrize("distilled,layer_scale", [(True, None), (False, None), (True, 1e-4)])
def test_every_deit_parameter_gets_a_gradient(distilled, layer_scale):
  model = models.DeiT(models.DeiTConfig(
      img_size=16, patch_size=8, embed_dim=24, depth=2, num_heads=2, num_classes=C,
      distilled=distilled, drop_path_rate=0.1, layer_scale_init=layer_scale,
      no_embed_class=layer_scale is not None), rngs=nnx.Rngs(0))
  for kind, grads in _grads(model, 16).items():
    assert all(np.all(np.isfinite(g)) for g in grads.values()), kind
    missing = _no_gradient(grads)
    if distilled and kind == "none":
      # Without a teacher the distillation head is outside the loss: exactly zero, as in the
      # official code (its token still reaches the class token through attention).
      assert missing == ["head_dist/bias", "head_dist/kernel"]
    else:
      assert missing == [], kind
    assert len(grads) == len(jax.tree.leaves(nnx.state(model, nnx.Param)))


# Small members of the two families (one block per stage): grouped convs, squeeze-excite,
# bottlenecks, projection shortcuts, BatchNorm in train mode; the zoo sizes compile for minutes.
# XLA's own convolutions compile quicker than the matrix-product form ('dense'), whose gradients
# test_conv.py checks against them.
TINY_CNNS = {
    "regnety": lambda: teachers.RegNet(teachers.RegNetCfg(
        depth=4, w0=8, wa=10, wm=1.5, group_size=4, se_ratio=0.25, stem_width=8), C,
        conv_impl="xla", rngs=nnx.Rngs(0)),
    "resnet_bottleneck": lambda: teachers.ResNet(teachers.ResNetCfg(
        "bottleneck", (1, 1, 1, 1), (8, 8, 16, 16)), C, conv_impl="xla", rngs=nnx.Rngs(0)),
}


@pytest.mark.parametrize("name", list(TINY_CNNS))
def test_every_cnn_parameter_gets_a_gradient(name):
  model = TINY_CNNS[name]()
  # Random values everywhere: timm zero-initialises each block's last BatchNorm scale, which
  # (correctly) starves the layers before it at init; the test is about connectivity.
  params = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(0), len(leaves))
  nnx.update(model, jax.tree.unflatten(treedef, [
      jax.random.normal(k, x.shape, x.dtype) * 0.1 + (1.0 if x.ndim == 1 else 0.0)
      for k, x in zip(keys, leaves)]))
  model.train()  # the trainer trains a CNN with batch statistics
  for kind, grads in _grads(model, 32).items():
    assert _no_gradient(grads) == [], kind
    assert all(np.all(np.isfinite(g)) for g in grads.values()), kind
