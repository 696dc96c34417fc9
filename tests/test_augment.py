"""DeiT augmentation ops against PIL / timm semantics, on small images."""
import io
import math

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from deit_jax import augment, image_ops

FILL = (124, 116, 104)
H, W = 32, 40


def _random_image(seed=0, low=0, high=256):
  return np.random.default_rng(seed).integers(low, high, (H, W, 3), dtype=np.uint8)


def _smooth_image():
  """A photo-like image: smooth gradients plus mild noise (not full-range per channel)."""
  yy, xx = np.mgrid[0:H, 0:W]
  rng = np.random.default_rng(1)
  image = np.stack([xx * 4 + 30, yy * 5 + 20, 180 - xx * 2 - yy], -1) + rng.normal(0, 4, (H, W, 3))
  return np.clip(image, 0, 255).astype(np.uint8)


IMAGES = [_random_image(), _smooth_image()]


def _np(x):
  return np.asarray(x).astype(np.int64)


# --- PIL-exact LUT ops ---------------------------------------------------------------------


@pytest.mark.parametrize("image", IMAGES, ids=["random", "smooth"])
def test_lut_ops_equal_pil_exactly(image):
  pil = Image.fromarray(image)
  np.testing.assert_array_equal(_np(image_ops.invert(image)), _np(ImageOps.invert(pil)))
  np.testing.assert_array_equal(_np(image_ops.auto_contrast(image)),
                                _np(ImageOps.autocontrast(pil)))
  np.testing.assert_array_equal(_np(image_ops.equalize(image)), _np(ImageOps.equalize(pil)))
  for bits in (1, 2, 3, 4, 8):
    np.testing.assert_array_equal(_np(image_ops.posterize(image, bits)),
                                  _np(ImageOps.posterize(pil, bits)))
  for threshold in (0, 26, 128, 200, 256):
    np.testing.assert_array_equal(_np(image_ops.solarize(image, threshold)),
                                  _np(ImageOps.solarize(pil, threshold)))


def test_posterize_zero_bits_is_black():
  # Old Pillow (DeiT's era) returned black; Pillow >= 10 raises for 0 bits.
  assert not np.any(image_ops.posterize(_smooth_image(), 0).numpy())


def test_equalize_and_autocontrast_on_narrow_histograms():
  # Few distinct values exercise the step == 0 and flat-channel branches.
  image = np.zeros((H, W, 3), np.uint8)
  image[:, :20] = (10, 50, 7)
  image[:, 20:] = (200, 50, 9)
  image[0, 0] = (0, 50, 250)
  pil = Image.fromarray(image)
  np.testing.assert_array_equal(_np(image_ops.equalize(image)), _np(ImageOps.equalize(pil)))
  np.testing.assert_array_equal(_np(image_ops.auto_contrast(image)),
                                _np(ImageOps.autocontrast(pil)))


def test_solarize_add_matches_its_definition():
  image = _random_image(3)
  for add in (0, 37, 110):
    expected = np.where(image < 128, np.minimum(image.astype(int) + add, 255), image)
    np.testing.assert_array_equal(_np(image_ops.solarize_add(image, add)), expected)


# --- ImageEnhance blends -------------------------------------------------------------------


@pytest.mark.parametrize("image", IMAGES, ids=["random", "smooth"])
@pytest.mark.parametrize("factor", [0.1, 0.55, 1.0, 1.45, 1.9])
def test_enhance_ops_equal_pil(image, factor):
  pil = Image.fromarray(image)
  for ours, theirs in ((image_ops.color, ImageEnhance.Color),
                       (image_ops.contrast, ImageEnhance.Contrast),
                       (image_ops.brightness, ImageEnhance.Brightness),
                       (image_ops.sharpness, ImageEnhance.Sharpness)):
    np.testing.assert_array_equal(_np(ours(image, factor)),
                                  _np(theirs(pil).enhance(factor)), err_msg=ours.__name__)


def test_contrast_uses_the_real_image_mean():
  # A dark image: its grey mean (~45) is far from the ~196 some TF ports end up using.
  image = _random_image(4, 0, 90)
  for factor in (0.5, 1.8):
    expected = _np(ImageEnhance.Contrast(Image.fromarray(image)).enhance(factor))
    np.testing.assert_array_equal(_np(image_ops.contrast(image, factor)), expected)
  # The test can fail: blending towards a wrong mean gives a visibly different image.
  wrong = np.clip(196 + 0.5 * (image.astype(np.float32) - 196), 0, 255).astype(np.int64)
  expected = _np(ImageEnhance.Contrast(Image.fromarray(image)).enhance(0.5))
  assert np.abs(wrong - expected).mean() > 50


# --- geometric ops -------------------------------------------------------------------------


def _pil_affine(image, matrix, resample=Image.BICUBIC):
  pil = Image.fromarray(image)
  return pil.transform(pil.size, Image.AFFINE, matrix, resample=resample, fillcolor=FILL)


def _pil_rotate(degrees):
  return lambda img: Image.fromarray(img).rotate(degrees, resample=Image.BICUBIC, fillcolor=FILL)


GEOMETRIC_CASES = [
    ("Rotate", -23.7, _pil_rotate(-23.7)),
    ("Rotate", 12.0, _pil_rotate(12.0)),
    ("Rotate", 27.0, _pil_rotate(27.0)),
    ("ShearX", 0.27, lambda img: _pil_affine(img, (1, 0.27, 0, 0, 1, 0))),
    ("ShearX", -0.3, lambda img: _pil_affine(img, (1, -0.3, 0, 0, 1, 0))),
    ("ShearY", -0.19, lambda img: _pil_affine(img, (1, 0, 0, -0.19, 1, 0))),
    ("ShearY", 0.27, lambda img: _pil_affine(img, (1, 0, 0, 0.27, 1, 0))),
    ("TranslateXRel", 0.31, lambda img: _pil_affine(img, (1, 0, 0.31 * W, 0, 1, 0))),
    ("TranslateXRel", -0.1, lambda img: _pil_affine(img, (1, 0, -0.1 * W, 0, 1, 0))),
    ("TranslateYRel", -0.405, lambda img: _pil_affine(img, (1, 0, 0, 0, 1, -0.405 * H))),
    ("TranslateYRel", 0.1, lambda img: _pil_affine(img, (1, 0, 0, 0, 1, 0.1 * H))),
]
# Random and photo-like images, and one where every pixel differs from its neighbours.
GEOMETRIC_IMAGES = IMAGES + [_random_image(9), _random_image(10, 100, 140)]


@pytest.mark.parametrize("name,arg,reference", GEOMETRIC_CASES)
def test_geometric_ops_equal_pil_bicubic(name, arg, reference):
  # PIL's transform bicubic (a = -1, float64, truncating store, fill) byte for byte. Shifts
  # like 0.1 * W put many exact results on integers, where an FMA-fused polynomial (XLA's
  # default) truncates to the level below on some of them.
  for image in GEOMETRIC_IMAGES:
    ours = augment.OPS[name](image, arg, fill=FILL, interpolation="bicubic")
    np.testing.assert_array_equal(_np(ours), _np(reference(image)), err_msg=name)


@pytest.mark.parametrize("kind,arg,matrix", [
    # Shifts a hair below an integer: float rounding moves the first tap of some outputs by
    # one (the d != 0 branch of the one-axis warps).
    ("translate_x", 5 - 2**-49, (1, 0, 5 - 2**-49, 0, 1, 0)),
    ("translate_y", -3 - 2**-49, (1, 0, 0, 0, 1, -3 - 2**-49)),
    ("shear_x", 2 - 2**-45, (1, 2 - 2**-45, 0, 0, 1, 0)),
    ("shear_y", 2 - 2**-48, (1, 0, 0, 2 - 2**-48, 1, 0)),
])
def test_one_axis_warps_at_near_integer_shifts_equal_pil(kind, arg, matrix):
  for image in GEOMETRIC_IMAGES:
    ours = image_ops._geometric(kind, image, arg, FILL, "bicubic")
    np.testing.assert_array_equal(_np(ours), _np(_pil_affine(image, matrix)), err_msg=kind)


def test_geometric_op_with_wrong_kernel_would_fail():
  # Sanity check of the bound above: a plain bilinear rotate is far from PIL's bicubic.
  image = IMAGES[0]
  ours = image_ops.rotate(image, 20.0, fill=FILL, interpolation="bilinear")
  theirs = Image.fromarray(image).rotate(20.0, resample=Image.BICUBIC, fillcolor=FILL)
  assert np.abs(_np(ours) - _np(theirs)).max() > 10


def test_bilinear_geometric_op_matches_pil():
  image = _smooth_image()
  ours = image_ops.shear_x(image, -0.23, fill=FILL, interpolation="bilinear")
  np.testing.assert_array_equal(_np(ours), _np(_pil_affine(image, (1, -0.23, 0, 0, 1, 0),
                                                           Image.BILINEAR)))


# --- RandAugment magnitudes and parsing ----------------------------------------------------


def _timm_args(name, level, negate):
  """timm's LEVEL_TO_ARG (auto_augment.py), transcribed, for the increasing op set."""
  sign = -1 if negate else 1
  if name == "Rotate":
    return sign * level / 10 * 30
  if name == "PosterizeIncreasing":
    return 4 - int(level / 10 * 4)
  if name == "SolarizeIncreasing":
    return 256 - min(256, int(level / 10 * 256))
  if name == "SolarizeAdd":
    return min(128, int(level / 10 * 110))
  if name.endswith("Increasing"):
    return max(0.1, 1.0 + sign * level / 10 * .9)
  if name in ("ShearX", "ShearY"):
    return sign * level / 10 * 0.3
  if name in ("TranslateXRel", "TranslateYRel"):
    return sign * level / 10 * 0.45
  raise AssertionError(name)


@pytest.mark.parametrize("level", [0., 4.4, 9., 9.73, 10.])
@pytest.mark.parametrize("negate", [False, True])
def test_level_to_arg_matches_timm(level, negate):
  for name in augment.RAND_INCREASING_OPS:
    fn = augment.LEVEL_TO_ARG[name]
    if fn is None:
      continue
    ours = float(fn(tf.constant(level, tf.float64), tf.constant(negate)))
    assert ours == pytest.approx(_timm_args(name, level, negate), abs=1e-9), name


def test_parse_rand_augment_deit_string():
  spec = augment.parse_rand_augment("rand-m9-mstd0.5-inc1")
  assert (spec.magnitude, spec.num_layers, spec.prob, spec.magnitude_std) == (9, 2, 0.5, 0.5)
  assert spec.ops == augment.RAND_INCREASING_OPS and len(spec.ops) == 15
  assert augment.parse_rand_augment("rand-n3-m5-p0.7").ops == augment.RAND_OPS
  assert augment.parse_rand_augment("rand-m9-mstd101").magnitude_std == math.inf
  for bad in ("original", "rand-m9-x3", "rand-m9-tweights", "augmix-m5"):
    with pytest.raises(ValueError, match="auto_augment"):
      augment.parse_rand_augment(bad)


def test_magnitude_noise_and_clipping():
  spec = augment.parse_rand_augment("rand-m9-mstd0.5-inc1")
  uniforms = tf.constant((np.arange(2000) + 0.5) / 2000, tf.float32)  # evenly spread quantiles
  levels = augment._sample_magnitude(uniforms, spec).numpy()
  assert levels.min() >= 0 and levels.max() <= 10
  assert abs(levels.mean() - 9) < 0.1 and 0.4 < levels.std() < 0.55
  assert (levels == 10).mean() > 0.005  # the clip at 10 is hit (~2%)


def test_rand_augment_applies_chosen_ops_with_prob():
  image = _random_image(5)
  inverted = 255 - image
  spec = augment.RandAugmentSpec(magnitude=9, num_layers=1, prob=0.5, ops=("Invert",))
  outcomes = [augment.rand_augment(image, tf.constant([s, 1]), spec, FILL).numpy()
              for s in range(200)]
  applied = [np.array_equal(o, inverted) for o in outcomes]
  assert all(a or np.array_equal(o, image) for a, o in zip(applied, outcomes))
  assert 0.4 < np.mean(applied) < 0.6
  twice = augment.RandAugmentSpec(magnitude=9, num_layers=2, prob=1.0, ops=("Invert",))
  np.testing.assert_array_equal(augment.rand_augment(image, tf.constant([0, 1]), twice), image)


# --- RandomResizedCrop ---------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(375, 500), (500, 333), (64, 64), (32, 40)])
def test_crop_box_within_scale_and_ratio(shape):
  height, width = shape
  sample = tf.function(lambda seed: augment.sample_crop_box(seed, height, width))
  for s in range(300):
    top, left, h, w = (int(v) for v in sample(tf.constant([s, 3])))
    assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
    # Sizes are rounded to whole pixels: allow half a pixel on each side.
    assert 0.08 * height * width <= (h + 1) * (w + 1)
    assert (h - 1) * (w - 1) <= height * width
    assert 3 / 4 <= (w + 0.5) / max(h - 0.5, 1e-9) and (w - 0.5) / (h + 0.5) <= 4 / 3


def test_crop_box_fallback_is_central_and_ratio_clamped():
  # A 10x400 strip: no attempt fits, torchvision falls back to a centred 4/3 crop.
  top, left, h, w = (int(v) for v in augment.sample_crop_box(tf.constant([1, 2]), 10, 400))
  assert (h, w) == (10, round(10 * 4 / 3)) and top == 0 and left == (400 - w) // 2


def _photo(height, width, seed=0):
  """Smooth gradients plus strong noise: exercises the kernels' negative lobes and clipping."""
  yy, xx = np.mgrid[0:height, 0:width]
  base = np.stack([xx * 0.5 + 30, yy * 0.6 + 20, 180 - xx * 0.2 - yy * 0.3], -1)
  noise = np.random.default_rng(seed).normal(0, 30, (height, width, 3))
  return np.clip(base + noise, 0, 255).astype(np.uint8)


# (input h, w) -> output (h, w): down (by up to 7x, and 37x: past the compiled weight
# windows), up, mixed, one-pixel and very thin inputs.
RESIZE_CASES = [((300, 400), (224, 224)), ((375, 500), (60, 70)), ((100, 150), (224, 224)),
                ((37, 29), (256, 301)), ((130, 500), (224, 224)), ((20, 300), (50, 70)),
                ((30, 1500), (20, 40)), ((1, 1), (5, 3)), ((224, 224), (224, 224))]


@pytest.mark.parametrize("in_shape,size", RESIZE_CASES)
def test_resize_matches_pil_bicubic(in_shape, size):
  image = _photo(*in_shape)
  theirs = _np(Image.fromarray(image).resize(size[::-1], Image.BICUBIC))
  diff = np.abs(_np(image_ops.resize(image, size, "bicubic")) - theirs)
  # PIL's fixed-point weights are reproduced; float32 accumulation may round a value sitting
  # on a half level the other way (~1e-5 of values). A float resize without PIL's
  # intermediate rounding, or a kernel with a = -0.75 or without the scaled support, is off
  # on a large fraction of values.
  assert diff.max() <= 1 and (diff > 0).mean() < 1e-4, (diff.max(), (diff > 0).mean())


@pytest.mark.parametrize("in_shape,size", RESIZE_CASES[:4])
def test_resize_matches_pil_bilinear(in_shape, size):
  image = _photo(*in_shape, seed=1)
  theirs = _np(Image.fromarray(image).resize(size[::-1], Image.BILINEAR))
  diff = np.abs(_np(image_ops.resize(image, size, "bilinear")) - theirs)
  # Bilinear weights are simple fractions, so many values land on a half level where the
  # float32 sum and PIL's integer sum may round apart: up to a few % of values are +-1.
  assert diff.max() <= 1 and (diff > 0).mean() < 0.05, (diff.max(), (diff > 0).mean())


def test_resize_would_fail_a_wrong_kernel():
  # The bounds above are tight: TF's antialiased float resize (no intermediate rounding) and
  # a non-antialiased bicubic both break them on downscaling.
  image = _photo(300, 400)
  theirs = _np(Image.fromarray(image).resize((224, 224), Image.BICUBIC))
  for antialias in (True, False):
    other = tf.image.resize(image, [224, 224], "bicubic", antialias=antialias)
    diff = np.abs(np.round(np.clip(other.numpy(), 0, 255)).astype(np.int64) - theirs)
    assert (diff > 0).mean() > 0.01


def test_resize_window_and_flip_equal_crop_and_mirror_of_the_full_resize():
  image = _photo(90, 70)
  full = _np(image_ops.resize(image, [120, 100], "bicubic"))
  window = (7, 11, 33, 29)
  np.testing.assert_array_equal(_np(image_ops.resize(image, [120, 100], window=window)),
                                full[7:40, 11:40])
  np.testing.assert_array_equal(
      _np(image_ops.resize(image, [120, 100], window=window, flip=True)),
      full[7:40, 11:40][:, ::-1])
  np.testing.assert_array_equal(_np(image_ops.resize(image, [120, 100], flip=tf.constant(True))),
                                full[:, ::-1])


def test_random_resized_crop_resizes_the_box():
  image = _smooth_image()
  out = augment.random_resized_crop(image, tf.constant([4, 4]), 16)
  assert out.shape == (16, 16, 3) and out.dtype == tf.uint8


# --- RandomErasing -------------------------------------------------------------------------


def test_random_erasing_bounds_and_probability():
  image = tf.zeros([H, W, 3])
  erase = tf.function(lambda seed: augment.random_erasing(image, seed, 0.25, "pixel"))
  erased = 0
  for s in range(400):
    out = erase(tf.constant([s, 9])).numpy()
    changed = np.any(out != 0, axis=-1)
    if not changed.any():
      continue
    erased += 1
    rows, cols = np.where(changed.any(1))[0], np.where(changed.any(0))[0]
    eh, ew = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    # Only the rectangle changed (noise is never exactly 0), and all of it.
    assert changed.sum() == eh * ew
    assert 0.02 * H * W <= (eh + 1) * (ew + 1) and (eh - 1) * (ew - 1) <= H * W / 3
    assert 0.3 <= (eh + 0.5) / (ew - 0.5) and (eh - 0.5) / (ew + 0.5) <= 1 / 0.3
    values = out[changed]
    assert abs(values.mean()) < 0.5 and 0.6 < values.std() < 1.4  # standard normal noise
  assert 0.25 - 0.07 < erased / 400 < 0.25 + 0.07


def test_random_erasing_modes():
  image = tf.ones([H, W, 3])
  seed = tf.constant([0, 0])
  const = augment.random_erasing(image, seed, 1.0, "const").numpy()
  rand = augment.random_erasing(image, seed, 1.0, "rand").numpy()
  assert set(np.unique(const)) == {0., 1.}
  patch = rand[np.any(rand != 1, axis=-1)]
  assert len(np.unique(patch, axis=0)) == 1  # one colour per box
  with pytest.raises(ValueError, match="remode"):
    augment.random_erasing(image, seed, 1.0, "noise")


# --- whole transforms ----------------------------------------------------------------------


def _small_config(**overrides):
  cfg = augment.default_augment_config()
  cfg.input_size = 24
  cfg.update(overrides)
  return cfg


def test_default_config_is_deit():
  cfg = augment.default_augment_config()
  assert cfg.input_size == 224 and cfg.crop_pct == 0.875 and augment.eval_resize_size(cfg) == 256
  assert cfg.auto_augment == "rand-m9-mstd0.5-inc1" and cfg.reprob == 0.25
  assert cfg.remode == "pixel" and cfg.recount == 1 and cfg.interpolation == "bicubic"
  assert augment.fill_value(cfg.mean) == FILL


def test_train_transform_shape_dtype_and_determinism():
  cfg = _small_config()
  image = _random_image(6)
  first = augment.train_transform(image, tf.constant([1, 2]), cfg)
  assert first.shape == (24, 24, 3) and first.dtype == tf.float32
  np.testing.assert_array_equal(first, augment.train_transform(image, tf.constant([1, 2]), cfg))
  assert not np.array_equal(first, augment.train_transform(image, tf.constant([1, 3]), cfg))
  # Same result inside tf.data (graph mode, unknown input shape) with an int64 seed.
  dataset = tf.data.Dataset.from_tensors(image).map(
      lambda x: augment.train_transform(x, tf.constant([1, 2], tf.int64), cfg))
  np.testing.assert_array_equal(first, next(iter(dataset)))


def test_default_train_transform_is_deterministic_in_parallel_tf_data():
  # The default (224 px, RandAugment, erasing) config, run twice through a parallel map: the
  # same (image, seed) always gives the same bits, and different seeds differ.
  cfg = augment.default_augment_config()
  image = tf.constant(_photo(150, 200, seed=3))

  def run():
    dataset = tf.data.Dataset.range(6).map(
        lambda i: augment.train_transform(image, tf.stack([i // 3, i % 3]), cfg),
        num_parallel_calls=3, deterministic=True)
    return np.stack([x.numpy() for x in dataset])

  first, second = run(), run()
  assert first.shape == (6, 224, 224, 3)
  np.testing.assert_array_equal(first, second)
  assert all(not np.array_equal(first[i], first[j]) for i in range(6) for j in range(i))


def test_resize_needs_a_static_output_size():
  with pytest.raises(ValueError, match="window of static size"):
    tf.function(lambda s: image_ops.resize(_photo(20, 30), s))(tf.constant([10, 10]))


def test_train_transform_normalizes_like_totensor():
  cfg = _small_config(auto_augment="", color_jitter=0., reprob=0., scale=(1., 1.),
                      ratio=(W / H, W / H), hflip=0.)
  image = _smooth_image()
  out = augment.train_transform(image, tf.constant([0, 0]), cfg).numpy()
  resized = image_ops.resize(image, [24, 24], "bicubic").numpy()
  expected = (resized / 255. - np.array(cfg.mean)) / np.array(cfg.std)
  np.testing.assert_allclose(out, expected, atol=1e-5)


def test_normalize_is_torchs_float32_arithmetic_bit_for_bit():
  levels = np.repeat(np.arange(256, dtype=np.uint8)[:, None, None], 3, axis=-1)  # [256, 1, 3]
  mean, std = np.float32(image_ops.IMAGENET_MEAN), np.float32(image_ops.IMAGENET_STD)
  expected = (levels.astype(np.float32) / np.float32(255) - mean) / std  # ToTensor, Normalize
  np.testing.assert_array_equal(image_ops.normalize(levels), expected)


def test_color_jitter_switch_and_range():
  image = _smooth_image()
  seed = tf.constant([3, 3])
  np.testing.assert_array_equal(augment.color_jitter(image, seed, 0.), image)
  jittered = augment.color_jitter(image, seed, 0.3)
  assert jittered.dtype == tf.uint8 and not np.array_equal(jittered, image)
  base = dict(auto_augment="", reprob=0.)
  off = augment.train_transform(image, seed, _small_config(color_jitter=0., **base))
  on = augment.train_transform(image, seed, _small_config(color_jitter=0.3, **base))
  with_ra = augment.train_transform(image, seed, _small_config(color_jitter=0.3, reprob=0.))
  ra_only = augment.train_transform(image, seed, _small_config(color_jitter=0., reprob=0.))
  assert not np.array_equal(off, on)
  np.testing.assert_array_equal(with_ra, ra_only)  # timm: jitter is off while RandAugment is on


def test_three_augment_is_one_of_its_ops():
  image = _smooth_image()
  gray = np.asarray(Image.fromarray(image).convert("L"))
  solarized = _np(ImageOps.solarize(Image.fromarray(image), 128))
  kinds = set()
  for s in range(30):
    out = augment.three_augment(image, tf.constant([s, 1])).numpy()
    if np.array_equal(out, np.repeat(gray[..., None], 3, -1)):
      kinds.add("gray")
    elif np.array_equal(out, solarized):
      kinds.add("solarize")
    else:  # blurred: no sharper than the input (sigma near 0.1 blurs nothing), same mean
      assert np.abs(np.diff(out.astype(int), axis=1)).mean() <= np.abs(
          np.diff(image.astype(int), axis=1)).mean()
      assert abs(out.mean() - image.mean()) < 2
      kinds.add("blur")
  assert kinds == {"gray", "solarize", "blur"}
  cfg = _small_config(three_augment=True, reprob=1.0)
  out = augment.train_transform(image, tf.constant([0, 1]), cfg)
  assert out.shape == (24, 24, 3)
  # No RandomErasing with ThreeAugment (as the official DeiT III transform): every output
  # value is a normalized uint8 level, never N(0, 1) noise.
  levels = out.numpy() * np.array(cfg.std) + np.array(cfg.mean)
  np.testing.assert_allclose(levels * 255, np.round(levels * 255), atol=1e-3)


def test_eval_transform_geometry():
  cfg = _small_config(input_size=32, crop_pct=0.8)  # resize shorter side to 40
  image = np.random.default_rng(8).integers(0, 256, (60, 90, 3), dtype=np.uint8)
  out = augment.eval_transform(image, cfg).numpy()
  assert out.shape == (32, 32, 3) and out.dtype == np.float32
  # torchvision: Resize(40) -> 40x60, CenterCrop(32) -> offsets (4, 14); PIL bicubic resize.
  resized = np.asarray(Image.fromarray(image).resize((60, 40), Image.BICUBIC))
  levels = np.round((out * np.array(cfg.std) + np.array(cfg.mean)) * 255).astype(np.int64)
  # PIL's resize (see test_resize_matches_pil_bicubic): equal but for a rare +-1.
  diff = np.abs(levels - resized[4:36, 14:46])
  assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_decode_and_train_transform_matches_decoded_path():
  image = _smooth_image()
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, "JPEG", quality=95)
  jpeg = tf.constant(buffer.getvalue())
  cfg = _small_config()
  for s in range(4):
    seed = tf.constant([s, 2])
    fused = augment.decode_and_train_transform(jpeg, seed, cfg).numpy()
    plain = augment.train_transform(tf.io.decode_jpeg(jpeg, channels=3), seed, cfg).numpy()
    assert np.abs(fused - plain).mean() < 0.05
  # Non-JPEG bytes take the full-decode path and give exactly train_transform's result.
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, "PNG")
  seed = tf.constant([7, 2])
  np.testing.assert_array_equal(
      augment.decode_and_train_transform(tf.constant(buffer.getvalue()), seed, cfg),
      augment.train_transform(image, seed, cfg))


def test_bad_inputs_raise_clear_errors():
  image = _random_image()
  with pytest.raises(TypeError, match="uint8"):
    augment.train_transform(image.astype(np.float32), tf.constant([0, 0]), _small_config())
  with pytest.raises(ValueError, match="seed"):
    augment.train_transform(image, tf.constant([0, 0, 0]), _small_config())
  for field, value in (("interpolation", "lanczos"), ("remode", "noise"), ("scale", (1., .5)),
                       ("crop_pct", 1.5), ("auto_augment", "v0")):
    with pytest.raises(ValueError, match=field if field != "auto_augment" else "auto_augment"):
      augment.train_transform(image, tf.constant([0, 0]), _small_config(**{field: value}))


# --- DeiT III's simple random crop -----------------------------------------------------------


def _src_reference(image, size):
  """Every output torchvision's Resize(size) + RandomCrop(size, padding=4, 'reflect') can give,
  keyed by (top, left) in the padded image: PIL resize, numpy reflect padding."""
  h, w = image.shape[:2]
  new_h, new_w = (size, size * w // h) if h <= w else (size * h // w, size)
  resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC))
  padded = np.pad(resized, ((4, 4), (4, 4), (0, 0)), mode="reflect")
  return {(t, l): padded[t:t + size, l:l + size].astype(np.int64)
          for t in range(new_h + 8 - size + 1) for l in range(new_w + 8 - size + 1)}


# Landscape and square inputs: for some portrait ones Pillow 13 runs its vertical pass first,
# which `resize` (horizontal first, as older Pillow) does not follow.
@pytest.mark.parametrize("shape", [(40, 60), (30, 75), (24, 24)])
def test_simple_random_crop_is_resize_reflect_pad_and_crop(shape):
  image = _photo(*shape)
  crops = _src_reference(image, 24)
  offsets = set()
  for s in range(12):
    out = _np(augment.simple_random_crop(image, tf.constant([s, 5]), 24, hflip=0.0))
    matches = [k for k, ref in crops.items() if np.abs(out - ref).max() <= 1]
    assert matches, s  # equal to one of the possible crops (PIL's rare +-1 rounding allowed)
    offsets.add(matches[0])
  # Crops reach into the reflected padding on both sides.
  assert min(t for t, _ in offsets) < 4 or min(l for _, l in offsets) < 4
  assert len(offsets) > 6
  flipped = _np(augment.simple_random_crop(image, tf.constant([0, 5]), 24, hflip=1.0))
  plain = _np(augment.simple_random_crop(image, tf.constant([0, 5]), 24, hflip=0.0))
  np.testing.assert_array_equal(flipped, plain[:, ::-1])


def test_train_transform_with_simple_random_crop_and_three_augment():
  cfg = _small_config(simple_random_crop=True, three_augment=True, reprob=0.0, auto_augment="")
  image = _photo(40, 60)
  for s in range(3):
    seed = tf.constant([s, 9])
    out = augment.train_transform(image, seed, cfg)
    assert out.shape == (24, 24, 3) and out.dtype == tf.float32
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    np.testing.assert_array_equal(
        augment.decode_and_train_transform(tf.constant(buffer.getvalue()), seed, cfg), out)
  # The whole image is seen (rescaled), not a RandomResizedCrop box of it: with no flip,
  # color op or jitter, the output is a crop of the resized image.
  cfg = _small_config(simple_random_crop=True, three_augment=False, reprob=0.0, auto_augment="",
                      hflip=0.0, color_jitter=0.0)
  out = augment.train_transform(image, tf.constant([1, 9]), cfg).numpy()
  unnormalized = np.round((out * np.array(cfg.std) + np.array(cfg.mean)) * 255).astype(np.int64)
  assert any(np.abs(unnormalized - ref).max() <= 1 for ref in _src_reference(image, 24).values())
