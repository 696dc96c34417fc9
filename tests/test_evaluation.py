"""The eval step on a model with fewer classes than top-5 needs."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deit_jax import evaluation, models


def test_top5_is_clipped_to_the_class_count(caplog):
  model = models.create_model("deit_tiny_patch16_224", embed_dim=16, depth=1, num_heads=1,
                              num_classes=3, img_size=16, patch_size=8)
  model.eval()
  graphdef, params = nnx.split(model, nnx.Param)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(6, 16, 16, 3)), jnp.float32)
  batch = {"image": images, "label": jnp.array([0, 1, 2, 0, 1, 2]),
           "mask": jnp.array([1, 1, 1, 1, 1, 0], jnp.float32)}
  with caplog.at_level(logging.WARNING):
    res = jax.jit(evaluation.make_eval_step(graphdef))(nnx.to_pure_dict(params), None, batch)
  assert float(res["cls"]["top5"]) == 5.0  # top-3 of 3 classes: every real row is a hit
  logits = jax.jit(lambda v, x: nnx.merge(graphdef, v)(x))(nnx.to_pure_dict(params), images)
  predicted = np.argmax(np.asarray(logits), -1)
  assert float(res["cls"]["top1"]) == float(np.sum((predicted == batch["label"])[:5]))
  assert "top5 is top-3" in caplog.text
