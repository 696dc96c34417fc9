"""The DeiT zoo: exact parameter counts, token order, train/eval outputs, intermediates."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deit_jax import models

# Exact counts of timm's implementations (REFERENCE.md).
PARAM_COUNTS = {
    "deit_tiny_patch16_224": 5_717_416,
    "deit_small_patch16_224": 22_050_664,
    "deit_base_patch16_224": 86_567_656,
    "deit_base_patch16_384": 86_859_496,
    "deit_tiny_distilled_patch16_224": 5_910_800,
    "deit_small_distilled_patch16_224": 22_436_432,
    "deit_base_distilled_patch16_224": 87_338_192,
    "deit_base_distilled_patch16_384": 87_630_032,
    # DeiT III, from tests/fixtures/deit3_param_counts.py (timm 1.0.31).
    "deit3_small_patch16_224": 22_059_496,
    "deit3_small_patch16_384": 22_205_416,
    "deit3_medium_patch16_224": 38_849_512,
    "deit3_base_patch16_224": 86_585_320,
    "deit3_base_patch16_384": 86_877_160,
    "deit3_large_patch16_224": 304_374_760,
    "deit3_large_patch16_384": 304_763_880,
    "deit3_huge_patch14_224": 632_126_440,
}
# DeiT III with a distillation token (distilled=True), same script.
DEIT3_DISTILLED_COUNTS = {
    "deit3_small_patch16_224": 22_444_880,
    "deit3_base_patch16_224": 87_355_088,
    "deit3_huge_patch14_224": 633_408_720,
}

SMALL = dict(embed_dim=48, num_heads=3, depth=2, img_size=32, num_classes=10)


def test_zoo_is_the_deit_and_deit3_families():
  deit3 = {n for n in PARAM_COUNTS if n.startswith("deit3_")}
  assert set(models.MODELS) == set(PARAM_COUNTS) | {n + "_in21ft1k" for n in deit3}
  for name in deit3:
    assert models.MODELS[name + "_in21ft1k"] == models.MODELS[name]


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_param_count(name):
  assert models.count_params(models.abstract_model(name)) == PARAM_COUNTS[name]


@pytest.mark.parametrize("name", sorted(DEIT3_DISTILLED_COUNTS))
def test_deit3_with_a_distillation_token_param_count(name):
  model = models.abstract_model(name, distilled=True)
  assert models.count_params(model) == DEIT3_DISTILLED_COUNTS[name]


def test_deit3_architecture():
  """LayerScale in every block, pos_embed on the patches only (added before the class token is
  concatenated), the same drop-path rate in every block, huge at patch 14."""
  cfg = models.MODELS["deit3_base_patch16_224"]
  assert cfg.layer_scale_init == 1e-4 and cfg.no_embed_class and not cfg.distilled
  assert models.MODELS["deit3_huge_patch14_224"].patch_size == 14
  model = models.create_model("deit3_base_patch16_224", drop_path_rate=0.2, **SMALL)
  assert model.pos_embed.shape == (1, 4, 48)
  assert [b.drop_path.rate for b in model.blocks] == [0.2, 0.2]
  np.testing.assert_array_equal(model.blocks[0].ls1.gamma[...], np.full(48, 1e-4, np.float32))
  x = jax.random.normal(jax.random.key(1), (1, 32, 32, 3))
  _, aux = model(x, rngs=jax.random.key(0), return_aux=True)
  np.testing.assert_allclose(aux["embeddings"][0, 0], model.cls_token[0, 0], atol=1e-6)
  patches = model.patch_embed(x).reshape(1, 4, 48)
  np.testing.assert_allclose(aux["embeddings"][0, 1:], patches[0] + model.pos_embed[0], atol=1e-5)


def test_deit3_distilled_tokens_get_no_position_embedding():
  model = models.create_model("deit3_small_patch16_224", distilled=True, **SMALL)
  model.eval()
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  out, aux = model(x, return_aux=True)
  emb = aux["embeddings"]
  assert emb.shape == (2, 2 + 4, 48) and model.pos_embed.shape == (1, 4, 48)
  np.testing.assert_allclose(emb[:, 0], jnp.broadcast_to(model.cls_token[0], (2, 48)), atol=1e-6)
  np.testing.assert_allclose(emb[:, 1], jnp.broadcast_to(model.dist_token[0], (2, 48)), atol=1e-6)
  np.testing.assert_allclose(out, (aux["cls_logits"] + aux["dist_logits"]) / 2, atol=1e-6)


def test_layer_scale_scales_each_residual_branch():
  model = models.create_model("deit3_small_patch16_224", drop_path_rate=0.0, **SMALL)
  model.eval()
  x = jax.random.normal(jax.random.key(2), (2, 6, 48))
  block = model.blocks[0]
  block.ls1.gamma[...] = jnp.zeros(48)
  block.ls2.gamma[...] = jnp.zeros(48)
  np.testing.assert_array_equal(block(x)[0], x)  # both branches switched off
  with pytest.raises(ValueError, match="layer_scale_init"):
    models.create_model("deit3_small_patch16_224", layer_scale_init=0.0)


def test_unknown_model_lists_known_names():
  with pytest.raises(ValueError, match="deit_base_distilled_patch16_384"):
    models.create_model("deit_huge_patch14_224")


def test_unknown_option():
  with pytest.raises(ValueError, match="Unknown model option"):
    models.create_model("deit_tiny_patch16_224", widht=3)


def test_train_returns_both_heads_eval_their_average():
  model = models.create_model("deit_tiny_distilled_patch16_224", drop_path_rate=0.0, **SMALL)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  cls_logits, dist_logits = model(x)
  assert cls_logits.shape == dist_logits.shape == (2, 10)
  assert not np.allclose(cls_logits, dist_logits)
  model.eval()
  np.testing.assert_allclose(model(x), (cls_logits + dist_logits) / 2, atol=1e-6)


def test_plain_model_returns_class_logits():
  model = models.create_model("deit_tiny_patch16_224", **SMALL)
  model.eval()
  assert model(jnp.zeros((1, 32, 32, 3))).shape == (1, 10)
  assert not hasattr(model, "dist_token") and not hasattr(model, "head_dist")


def test_token_order_and_position_embedding():
  """[cls, dist, patches] with the position embedding added to all of them."""
  model = models.create_model("deit_tiny_distilled_patch16_224", **SMALL)
  x = jax.random.normal(jax.random.key(1), (1, 32, 32, 3))
  _, aux = model(x, rngs=jax.random.key(0), return_aux=True)
  emb, pos = aux["embeddings"], model.pos_embed[...]
  assert emb.shape == (1, 2 + 4, 48)
  np.testing.assert_allclose(emb[0, 0], model.cls_token[0, 0] + pos[0, 0], atol=1e-6)
  np.testing.assert_allclose(emb[0, 1], model.dist_token[0, 0] + pos[0, 1], atol=1e-6)
  patches = model.patch_embed(x).reshape(1, 4, 48)
  np.testing.assert_allclose(emb[0, 2:], patches[0] + pos[0, 2:], atol=1e-5)


def test_intermediates_come_from_the_same_pass():
  model = models.create_model("deit_tiny_distilled_patch16_224", **SMALL)
  model.eval()
  x = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
  out, aux = model(x, return_aux=True, return_attention=True)
  np.testing.assert_allclose(out, model(x), atol=1e-5)  # explicit-softmax path == fused path
  for i in range(2):
    assert aux[f"block{i}"].shape == (2, 6, 48)
    attn = aux[f"attention{i}"]
    assert attn.shape == (2, 3, 6, 6)
    np.testing.assert_allclose(attn.sum(-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(model.norm(aux["block1"]), aux["encoded"], atol=1e-5)
  np.testing.assert_allclose((aux["cls_logits"] + aux["dist_logits"]) / 2, out, atol=1e-6)


def test_stochastic_depth():
  model = models.create_model("deit_tiny_patch16_224", **{**SMALL, "depth": 4},
                              drop_path_rate=0.3)
  rates = [b.drop_path.rate for b in model.blocks]
  np.testing.assert_allclose(rates, np.linspace(0, 0.3, 4))
  x = jax.random.normal(jax.random.key(3), (8, 32, 32, 3))
  with pytest.raises(ValueError, match="no random key"):
    model(x)
  a, b = model(x, rngs=jax.random.key(0)), model(x, rngs=jax.random.key(1))
  assert not np.allclose(a, b)  # different examples dropped
  np.testing.assert_array_equal(a, model(x, rngs=jax.random.key(0)))
  model.eval()
  np.testing.assert_array_equal(model(x), model(x))


def test_bfloat16_compute_keeps_float32_params():
  model = models.create_model("deit_tiny_distilled_patch16_224", dtype="bfloat16", **SMALL)
  model.eval()
  params = jax.tree.leaves(jax.tree.map(lambda p: p.dtype, models.nnx.state(model)))
  assert set(params) == {jnp.dtype("float32")}
  x = jax.random.normal(jax.random.key(4), (2, 32, 32, 3))
  _, aux = model(x, return_aux=True)
  assert aux["block0"].dtype == jnp.bfloat16
  ref = models.create_model("deit_tiny_distilled_patch16_224", **SMALL)
  ref.eval()
  out = model(x)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref(x), atol=0.1)


@pytest.mark.parametrize("shape", [(2, 32, 32, 1), (2, 48, 48, 3), (32, 32, 3), (2, 3, 32, 32)])
def test_wrong_image_shape_names_expected_shape(shape):
  model = models.create_model("deit_tiny_patch16_224", **SMALL)
  with pytest.raises(ValueError, match=r"\(batch, 32, 32, 3\)"):
    model(jnp.zeros(shape))


def test_pos_embed_resize_matches_torch_bicubic_on_a_known_case():
  # Identity when the grid is unchanged; constant grids stay constant (weights sum to 1).
  pe = np.random.RandomState(0).randn(1, 2 + 16, 5).astype(np.float32)
  np.testing.assert_array_equal(models.resize_pos_embed(pe, 2, 4), pe)
  const = np.concatenate([pe[:, :2], np.ones((1, 16, 5), np.float32)], 1)
  out = models.resize_pos_embed(const, 2, 7)
  assert out.shape == (1, 2 + 49, 5)
  np.testing.assert_array_equal(out[:, :2], pe[:, :2])
  np.testing.assert_allclose(out[:, 2:], 1.0, atol=1e-6)
