"""deit_jax.visualize: attention rollout and cls/dist token similarity (numpy and jax.numpy), and
the CLI on a tiny random DeiT saved as a checkpoint (PNGs written and not blank), a plain DeiT
(cls columns only), a CNN checkpoint refused."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from deit_jax import checkpoint, models, visualize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(ROOT, "tests", "tiny_config.py")  # digits at 16 px
# The tiny config's model: 16 px, 8 px patches (a 2 x 2 grid), 2 blocks, 10 classes.
TINY = dict(patch_size=8, embed_dim=48, num_heads=3, depth=2, img_size=16, num_classes=10)


@pytest.mark.parametrize("xp", [np, jnp])
def test_rollout_of_identity_attention_is_the_identity(xp):
  eye = np.broadcast_to(np.eye(5, dtype=np.float32), (2, 3, 5, 5))
  out = visualize.rollout([eye, eye, eye], xp=xp)
  np.testing.assert_allclose(np.asarray(out), np.broadcast_to(np.eye(5), (2, 5, 5)), atol=1e-6)


@pytest.mark.parametrize("xp", [np, jnp])
def test_rollout_of_uniform_attention(xp):
  n = 4
  uniform = np.full((1, 2, n, n), 1.0 / n, np.float32)
  one = np.asarray(visualize.rollout([uniform], xp=xp))
  # (U + I) / 2: 1/(2n) everywhere, plus 1/2 on the diagonal.
  np.testing.assert_allclose(one[0], np.full((n, n), 0.5 / n) + 0.5 * np.eye(n), atol=1e-6)
  many = np.asarray(visualize.rollout([uniform] * 12, xp=xp))
  np.testing.assert_allclose(many.sum(-1), 1.0, atol=1e-5)  # rows stay distributions
  np.testing.assert_allclose(many[0], np.full((n, n), 1.0 / n), atol=1e-3)  # -> uniform


def test_rollout_is_the_head_mean_plus_identity_multiplied_through_the_layers():
  rng = np.random.RandomState(0)
  layers = [rng.dirichlet(np.ones(6), size=(2, 3, 6)).astype(np.float32) for _ in range(3)]
  expected = np.broadcast_to(np.eye(6), (2, 6, 6))
  for att in layers:
    a = att.mean(1) + np.eye(6)
    expected = (a / a.sum(-1, keepdims=True)) @ expected
  np.testing.assert_allclose(visualize.rollout(layers), expected, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(visualize.rollout(layers, xp=jnp)), expected, rtol=1e-5)


@pytest.mark.parametrize("xp", [np, jnp])
def test_token_similarity(xp):
  rng = np.random.RandomState(1)
  same = rng.randn(3, 1, 8).astype(np.float32)
  x_same = np.concatenate([same, same, rng.randn(3, 4, 8)], axis=1)
  x_neg = np.concatenate([same, -2 * same, rng.randn(3, 4, 8)], axis=1)
  u, v = rng.randn(3, 8), rng.randn(3, 8)
  x_rand = np.concatenate([u[:, None], v[:, None], rng.randn(3, 4, 8)], axis=1)
  aux = {"embeddings": x_same, "block0": x_neg, "block1": x_rand, "encoded": x_rand}
  sims = np.asarray(visualize.token_similarity(aux, xp=xp))
  assert sims.shape == (3, 3)  # embeddings, block0, block1 x 3 images
  np.testing.assert_allclose(sims[0], 1.0, atol=1e-6)
  np.testing.assert_allclose(sims[1], -1.0, atol=1e-6)
  cos = (u * v).sum(-1) / np.linalg.norm(u, axis=-1) / np.linalg.norm(v, axis=-1)
  np.testing.assert_allclose(sims[2], cos, atol=1e-5)


def _png_is_not_blank(path):
  import matplotlib.image
  assert os.path.getsize(path) > 5000, path
  pixels = matplotlib.image.imread(path)[..., :3]
  assert pixels.std() > 0.05, path  # not a blank canvas
  return pixels.shape


@pytest.fixture(scope="module")
def distilled_ckpt(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("vis") / "distilled")
  checkpoint.save_model(models.create_model("deit_tiny_distilled_patch16_224", **TINY), path)
  return path


def test_cli_on_a_tiny_random_distilled_checkpoint(distilled_ckpt, capsys):
  """The CLI's entry point in-process (a subprocess would add ~10 s of imports)."""
  assert visualize.main(["--checkpoint", distilled_ckpt, "--config", TINY_CONFIG,
                         "--num_images", "3"]) == 0
  out = distilled_ckpt + "_pictures"
  printed = capsys.readouterr().out
  assert os.path.join(out, visualize.ATTENTION_FILE) in printed and "cosine similarity" in printed
  height, width = _png_is_not_blank(os.path.join(out, visualize.ATTENTION_FILE))[:2]
  assert height > width / 5 * 3 * 0.8  # 3 rows of 5 square panels
  _png_is_not_blank(os.path.join(out, visualize.SIMILARITY_FILE))
  result = json.load(open(os.path.join(out, visualize.JSON_FILE)))
  assert result["columns"] == ["image", "cls rollout", "dist rollout", "cls last layer",
                               "dist last layer"]
  sim = result["similarity"]
  assert sim["layers"] == ["embeddings", "block0", "block1"] and len(sim["mean"]) == 3
  assert len(sim["per_image"]) == 3 and all(-1 <= v <= 1 for v in sim["mean"])
  assert len(set(result["labels"])) >= 2  # varied classes, not the first rows of a periodic split


def test_a_plain_model_gets_the_cls_columns_only(tmp_path, monkeypatch):
  plain = models.create_model("deit_tiny_patch16_224", **TINY)
  plain.eval()
  monkeypatch.setattr(visualize, "load_deit", lambda *a: plain)  # no checkpoint to write
  config = visualize._load_config(TINY_CONFIG)
  result = visualize.visualize("unused", config, str(tmp_path), num_images=2)
  _png_is_not_blank(str(tmp_path / visualize.ATTENTION_FILE))
  assert not (tmp_path / visualize.SIMILARITY_FILE).exists()
  assert result["similarity"] is None and "no distillation token" in result["note"]
  assert json.load(open(tmp_path / visualize.JSON_FILE))["columns"] == [
      "image", "cls rollout", "cls last layer"]


def test_a_cnn_checkpoint_is_refused(tmp_path, monkeypatch):
  from deit_jax import run
  # What a CNN teacher's checkpoint describes (building and saving a RegNet here costs ~30 s).
  monkeypatch.setattr(checkpoint, "read_description", lambda d, step=None: (
      {"family": "teacher", "name": "regnety_002", "kind": "regnet"}, 0))
  with pytest.raises(visualize.VisualizeError, match="no attention") as e:
    visualize.visualize(str(tmp_path / "cnn"), None, str(tmp_path / "cnn_out"))
  assert isinstance(e.value, run.USER_ERRORS)  # the launcher prints it as one line
  assert not (tmp_path / "cnn_out").exists()
