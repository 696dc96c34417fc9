"""DeiT image transforms in TensorFlow: stateless, graph-mode, for `tf.data.Dataset.map`.

The official DeiT recipe (timm's `create_transform`, PIL + torchvision) is, for training:

  RandomResizedCrop -> horizontal flip -> RandAugment (or color jitter) -> ToTensor/normalize
  -> RandomErasing

and for evaluation: resize the shorter side to `int(input_size / crop_pct)` (bicubic), center
crop, normalize. With `three_augment=True` the whole training transform is DeiT III's
ThreeAugment instead (crop, flip, one of grayscale/solarize/blur, color jitter, normalize; no
RandAugment, no RandomErasing), as the official `main.py` replaces the timm transform with it.
`simple_random_crop=True` replaces RandomResizedCrop by DeiT III's simple random crop (`--src`):
resize the shorter side to the input size (bicubic), pad 4 px by reflection, crop a random
input_size square (torchvision `Resize(S)` + `RandomCrop(S, padding=4, padding_mode='reflect')`),
then flip.

This module is the policy: the augmentation config, the RandAugment op table, magnitudes and
string parsing, the crop and erasing boxes, and the train / eval transforms. The image kernels
they run (resize, the RandAugment ops, blur, normalize), PIL-exact, are in
`deit_jax.image_ops`.

Every random choice comes from the `seed` argument (shape [2], int32/int64) through
`tf.random.stateless_*`, so a given (image, seed) always gives the same output. The train
transform draws all its uniform numbers in one op and hands each stage a fixed share of them
(`_train_draws`), so the stages stay independent; the erasing noise is a separate draw. The
random numbers are TF's, not Python's/torch's: same distributions, other draws.
`decode_and_train_transform` decodes only the crop box of a JPEG.
"""
import dataclasses
import functools
import math
import re

import ml_collections

from deit_jax import image_ops
from deit_jax.lazy_tf import tf  # imported on first use

# How many uniform numbers each random stage takes from the example's draw (see
# `_uniforms`): crop = 10 areas, 10 aspect ratios, top, left; per RandAugment layer = op,
# applied, magnitude, sign; color jitter = 3 factors, 3 order keys; ThreeAugment = choice,
# sigma; erasing = applied, count, then per box 10 areas, 10 aspects, top, left.
_CROP_DRAWS = 22
_LAYER_DRAWS = 4
_JITTER_DRAWS = 6
_THREE_AUGMENT_DRAWS = 2
_ERASE_DRAWS = 2
_ERASE_BOX_DRAWS = 22
# Folded into the example seed for the erasing noise (a separate, variable-size draw).
_ERASE_NOISE_STAGE = 6

_INTERPOLATIONS = ("bicubic", "bilinear")
_ERASE_MODES = ("const", "rand", "pixel")


def default_augment_config():
  """The official DeiT (timm) training and eval augmentation settings."""
  return ml_collections.ConfigDict(dict(
      input_size=224,
      # Eval resizes the shorter side to int(input_size / crop_pct); timm's default is 0.9.
      crop_pct=0.875,
      scale=(0.08, 1.0),
      ratio=(3. / 4., 4. / 3.),
      interpolation="bicubic",
      hflip=0.5,
      # timm RandAugment string; '' or None turns it off (then color_jitter is used).
      auto_augment="rand-m9-mstd0.5-inc1",
      color_jitter=0.3,
      three_augment=False,
      # DeiT III's simple random crop instead of RandomResizedCrop (scale/ratio then unused).
      simple_random_crop=False,
      # Evaluate at another resolution than input_size (DeiT III: train 192, eval 224); None =
      # input_size. The trainer resizes the position grid for the eval model.
      eval_input_size=ml_collections.FieldReference(None, field_type=int),
      reprob=0.25,
      remode="pixel",
      recount=1,
      mean=image_ops.IMAGENET_MEAN,
      std=image_ops.IMAGENET_STD,
  ))


def fill_value(mean=image_ops.IMAGENET_MEAN):
  """timm's fill for geometric ops: the dataset mean in uint8, (124, 116, 104) for ImageNet."""
  return tuple(min(255, round(255 * m)) for m in mean)


# ------------------------------------------------------------------------------------------
# Random draws: every stage maps its share of one stateless uniform draw to its choices.
# ------------------------------------------------------------------------------------------


def _uniforms(seed, count):
  """`count` uniform float32 numbers in [0, 1): one stateless draw feeds a whole stage (or the
  whole transform), which costs far fewer TF ops than a seed per number."""
  return tf.random.stateless_uniform([count], seed)


def _randint(u, low, high):
  """Uniform int32 in [low, high) from a uniform `u` in [0, 1)."""
  span = high - low
  return low + tf.minimum(tf.cast(u * tf.cast(span, tf.float32), tf.int32), span - 1)


def _uniform(u, low, high):
  return low + u * (high - low)


# ------------------------------------------------------------------------------------------
# RandAugment op table. The ops are the PIL-exact kernels of `image_ops`.
# ------------------------------------------------------------------------------------------


# Name -> op, as timm's NAME_TO_OP. 'Increasing' variants share the op and differ only in
# how the magnitude maps to the argument.
OPS = {
    "AutoContrast": image_ops.auto_contrast,
    "Equalize": image_ops.equalize,
    "Invert": image_ops.invert,
    "Rotate": image_ops.rotate,
    "Posterize": image_ops.posterize,
    "PosterizeIncreasing": image_ops.posterize,
    "Solarize": image_ops.solarize,
    "SolarizeIncreasing": image_ops.solarize,
    "SolarizeAdd": image_ops.solarize_add,
    "Color": image_ops.color,
    "ColorIncreasing": image_ops.color,
    "Contrast": image_ops.contrast,
    "ContrastIncreasing": image_ops.contrast,
    "Brightness": image_ops.brightness,
    "BrightnessIncreasing": image_ops.brightness,
    "Sharpness": image_ops.sharpness,
    "SharpnessIncreasing": image_ops.sharpness,
    "ShearX": image_ops.shear_x,
    "ShearY": image_ops.shear_y,
    "TranslateXRel": image_ops.translate_x_rel,
    "TranslateYRel": image_ops.translate_y_rel,
}
# Ops that move pixels: they take the fill colour and the interpolation.
GEOMETRIC_OPS = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")

# timm's `_RAND_TRANSFORMS` (inc0) and `_RAND_INCREASING_TRANSFORMS` (inc1), in timm's order.
RAND_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
            "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY",
            "TranslateXRel", "TranslateYRel")
RAND_INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                       "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing",
                       "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
                       "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")

# ------------------------------------------------------------------------------------------
# Magnitude (level in [0, 10]) -> op argument, as timm's LEVEL_TO_ARG. `negate` is the random
# sign timm draws with `_randomly_negate` (a bool tensor; ignored by unsigned maps).
# ------------------------------------------------------------------------------------------

_LEVEL_DENOM = 10.


def _signed(value, negate):
  return tf.where(negate, -value, value)


def _rotate_arg(level, negate):
  return _signed(level / _LEVEL_DENOM * 30., negate)  # degrees in [-30, 30]


def _enhance_arg(level, unused_negate):
  return level / _LEVEL_DENOM * 1.8 + 0.1  # [0.1, 1.9], 1 = identity at level 5


def _enhance_increasing_arg(level, negate):
  # Farther from the identity (1.0) as the level grows, either direction, kept >= 0.1.
  return tf.maximum(1. + _signed(level / _LEVEL_DENOM * .9, negate), 0.1)


def _shear_arg(level, negate):
  return _signed(level / _LEVEL_DENOM * 0.3, negate)


def _translate_rel_arg(level, negate):
  return _signed(level / _LEVEL_DENOM * 0.45, negate)  # timm's translate_pct 0.45


def _int(x):
  """Python's int() of a non-negative float."""
  return tf.floor(x)


def _posterize_arg(level, unused_negate):
  return _int(level / _LEVEL_DENOM * 4.)  # bits kept, 0..4


def _posterize_increasing_arg(level, unused_negate):
  return 4. - _posterize_arg(level, None)  # bits kept, 4..0


def _solarize_arg(level, unused_negate):
  return tf.minimum(_int(level / _LEVEL_DENOM * 256.), 256.)  # threshold 0..256


def _solarize_increasing_arg(level, unused_negate):
  return 256. - _solarize_arg(level, None)  # threshold 256..0


def _solarize_add_arg(level, unused_negate):
  return tf.minimum(_int(level / _LEVEL_DENOM * 110.), 128.)  # added value 0..110


LEVEL_TO_ARG = {
    "AutoContrast": None,
    "Equalize": None,
    "Invert": None,
    "Rotate": _rotate_arg,
    "Posterize": _posterize_arg,
    "PosterizeIncreasing": _posterize_increasing_arg,
    "Solarize": _solarize_arg,
    "SolarizeIncreasing": _solarize_increasing_arg,
    "SolarizeAdd": _solarize_add_arg,
    "Color": _enhance_arg,
    "ColorIncreasing": _enhance_increasing_arg,
    "Contrast": _enhance_arg,
    "ContrastIncreasing": _enhance_increasing_arg,
    "Brightness": _enhance_arg,
    "BrightnessIncreasing": _enhance_increasing_arg,
    "Sharpness": _enhance_arg,
    "SharpnessIncreasing": _enhance_increasing_arg,
    "ShearX": _shear_arg,
    "ShearY": _shear_arg,
    "TranslateXRel": _translate_rel_arg,
    "TranslateYRel": _translate_rel_arg,
}


def apply_op(name, image, level, negate=False, fill=(128, 128, 128), interpolation="bicubic"):
  """Apply RandAugment op `name` at magnitude `level` (0..10) with timm's argument map."""
  level = image_ops.as_float64(level)  # timm maps levels in Python floats
  level_fn = LEVEL_TO_ARG[name]
  arg = None if level_fn is None else level_fn(level, tf.convert_to_tensor(negate))
  if name in GEOMETRIC_OPS:
    return OPS[name](image, arg, fill=fill, interpolation=interpolation)
  return OPS[name](image, arg)


# ------------------------------------------------------------------------------------------
# RandAugment.
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RandAugmentSpec:
  """A parsed timm RandAugment string, e.g. 'rand-m9-mstd0.5-inc1'."""
  magnitude: float = 10.
  num_layers: int = 2
  prob: float = 0.5
  magnitude_std: float = 0.  # math.inf: uniform in [0, magnitude] (timm: mstd > 100)
  magnitude_max: float = _LEVEL_DENOM
  ops: tuple = RAND_OPS


def parse_rand_augment(config_str):
  """Parse timm's RandAugment grammar: 'rand' then dash-separated m, n, p, mstd, mmax, inc."""
  sections = config_str.split("-")
  if sections[0] != "rand":
    raise ValueError(
        f"auto_augment={config_str!r}: only timm RandAugment strings ('rand-...') are "
        "supported (AutoAugment policies and AugMix are not); use e.g. "
        "'rand-m9-mstd0.5-inc1', or '' to turn it off.")
  values = {}
  for section in sections[1:]:
    key, value = re.fullmatch(r"([a-z]*)(.*)", section).groups()
    if key == "t":
      raise ValueError(f"auto_augment={config_str!r}: transform-set sections ('t...') are not "
                       "supported; remove them to use timm's default op sets.")
    if key not in ("m", "n", "p", "mstd", "mmax", "inc") or not value:
      raise ValueError(f"auto_augment={config_str!r}: unknown section {section!r}; expected "
                       "m<int>, n<int>, p<float>, mstd<float>, mmax<int> or inc<0|1>.")
    values[key] = value
  mstd = float(values.get("mstd", 0.))
  return RandAugmentSpec(
      magnitude=float(int(values.get("m", 10))),
      num_layers=int(values.get("n", 2)),
      prob=float(values.get("p", 0.5)),
      magnitude_std=math.inf if mstd > 100 else mstd,
      magnitude_max=float(int(values["mmax"])) if "mmax" in values else _LEVEL_DENOM,
      ops=RAND_INCREASING_OPS if int(values.get("inc", 0)) else RAND_OPS)


def _sample_magnitude(u, spec):
  """Per-op magnitude from a uniform `u`: timm's `gauss(m, mstd)` (the normal as the inverse
  CDF of `u`), or uniform in [0, m] for mstd=inf, clipped to [0, magnitude_max]."""
  if spec.magnitude_std == math.inf:
    level = _uniform(u, 0., spec.magnitude)
  elif spec.magnitude_std > 0:
    level = spec.magnitude + spec.magnitude_std * tf.math.ndtri(u)
  else:
    level = tf.constant(spec.magnitude, tf.float32)
  return tf.clip_by_value(level, 0., spec.magnitude_max)


def rand_augment(image, seed, spec, fill=(128, 128, 128), interpolation="bicubic"):
  """timm `RandAugment`: `num_layers` ops drawn uniformly with replacement, each applied with
  probability `spec.prob` at a freshly sampled magnitude and sign.

  One `switch_case` per layer runs only the chosen op (or the identity when the layer is
  skipped), so unchosen ops cost nothing.
  """
  return _rand_augment(image, _uniforms(seed, _LAYER_DRAWS * spec.num_layers), spec, fill,
                       interpolation)


def _rand_augment(image, u, spec, fill, interpolation):
  """`rand_augment` with its draws `u` [_LAYER_DRAWS * num_layers] given."""
  image = tf.convert_to_tensor(image)
  num_ops = len(spec.ops)
  for layer in range(spec.num_layers):
    u_op, u_applied, u_level, u_sign = (u[_LAYER_DRAWS * layer + i] for i in range(4))
    op_index = _randint(u_op, 0, num_ops)
    applied = u_applied <= spec.prob  # timm skips the op if random() > p
    level = _sample_magnitude(u_level, spec)
    negate = u_sign > 0.5
    # Default arguments bind this layer's input image and op name into each branch.
    branches = [
        lambda name=name, image=image: apply_op(name, image, level, negate, fill, interpolation)
        for name in spec.ops]
    branches.append(lambda image=image: image)  # layer skipped
    image = tf.switch_case(tf.where(applied, op_index, num_ops), branches)
  return image


# ------------------------------------------------------------------------------------------
# RandomResizedCrop, flip, color jitter, ThreeAugment, RandomErasing, train and eval.
# ------------------------------------------------------------------------------------------


def sample_crop_box(seed, height, width, scale=(0.08, 1.0), ratio=(3. / 4., 4. / 3.)):
  """torchvision/timm RandomResizedCrop box as int32 (top, left, crop_height, crop_width).

  10 attempts with area uniform in `scale` x image area and log-uniform aspect (w / h) in
  `ratio`; the first that fits wins, else the central crop clamped to `ratio`.
  """
  return _crop_box(_uniforms(seed, _CROP_DRAWS), height, width, scale, ratio)


def _crop_box(u, height, width, scale, ratio):
  """`sample_crop_box` with its draws `u` [_CROP_DRAWS] given."""
  height = tf.cast(height, tf.int32)
  width = tf.cast(width, tf.int32)
  h_f = tf.cast(height, tf.float32)
  w_f = tf.cast(width, tf.float32)
  target_area = _uniform(u[:10], scale[0], scale[1]) * h_f * w_f
  aspect = tf.exp(_uniform(u[10:20], math.log(ratio[0]), math.log(ratio[1])))
  # tf.round rounds half to even, like Python's round().
  crop_w = tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32)
  crop_h = tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32)
  fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  any_fits = tf.reduce_any(fits)

  # Fallback: the whole image, cut down to the nearest allowed aspect ratio.
  in_ratio = w_f / h_f
  fallback_w = tf.where(in_ratio > ratio[1],
                        tf.cast(tf.round(h_f * ratio[1]), tf.int32), width)
  fallback_h = tf.where(in_ratio < ratio[0],
                        tf.cast(tf.round(w_f / ratio[0]), tf.int32), height)

  crop_h = tf.where(any_fits, crop_h[first], fallback_h)
  crop_w = tf.where(any_fits, crop_w[first], fallback_w)
  top = tf.where(any_fits, _randint(u[20], 0, height - crop_h + 1), (height - crop_h) // 2)
  left = tf.where(any_fits, _randint(u[21], 0, width - crop_w + 1), (width - crop_w) // 2)
  return top, left, crop_h, crop_w


def random_resized_crop(image, seed, size, scale=(0.08, 1.0), ratio=(3. / 4., 4. / 3.),
                        interpolation="bicubic"):
  """Crop a `sample_crop_box` box and resize only that crop to size x size (uint8)."""
  shape = tf.shape(image)
  top, left, crop_h, crop_w = sample_crop_box(seed, shape[0], shape[1], scale, ratio)
  crop = tf.slice(image, [top, left, 0], [crop_h, crop_w, 3])
  return image_ops.resize(crop, [size, size], interpolation)


def _shorter_side_to(h, w, size):
  """torchvision Resize(int): the shorter side becomes `size`, the longer one
  int(size * long / short) (truncated)."""
  short, long = tf.minimum(h, w), tf.maximum(h, w)
  new_long = tf.cast(size * long // short, tf.int32)
  return tf.where(h <= w, size, new_long), tf.where(h <= w, new_long, size)


_SRC_PADDING = 4  # DeiT III's RandomCrop(padding=4, padding_mode='reflect')


def _reflect(index, n):
  """Indices into a length-n axis padded by reflection (numpy/torch 'reflect': no edge repeat)."""
  index = tf.abs(index)
  return tf.where(index > n - 1, 2 * (n - 1) - index, index)


def _simple_random_crop(image, u, size, interpolation, flip):
  """`simple_random_crop` with its draws given (u[20], u[21]: top, left, as RandomResizedCrop's)."""
  shape = tf.shape(image)
  new_h, new_w = _shorter_side_to(shape[0], shape[1], size)
  # Offsets of the crop in the resized image; negative or past the end = in the padding.
  top = _randint(u[20], 0, new_h + 2 * _SRC_PADDING - size + 1) - _SRC_PADDING
  left = _randint(u[21], 0, new_w + 2 * _SRC_PADDING - size + 1) - _SRC_PADDING
  # Only a size x size window of the resize is computed; the reflected rows and columns lie in it.
  win_top = tf.clip_by_value(top, 0, new_h - size)
  win_left = tf.clip_by_value(left, 0, new_w - size)
  window = image_ops.resize(image, tf.stack([new_h, new_w]), interpolation,
                            window=(win_top, win_left, size, size))
  rows = _reflect(top + tf.range(size), new_h) - win_top
  cols = _reflect(left + tf.range(size), new_w) - win_left
  cols = tf.where(flip, tf.reverse(cols, [0]), cols)
  return tf.gather(tf.gather(window, rows, axis=0), cols, axis=1)


def simple_random_crop(image, seed, size, interpolation="bicubic", hflip=0.5):
  """DeiT III's simple random crop (uint8 in, uint8 out): torchvision `Resize(size)`,
  `RandomCrop(size, padding=4, padding_mode='reflect')`, then a horizontal flip with
  probability `hflip`."""
  u = _uniforms(seed, _CROP_DRAWS + 1)
  return _simple_random_crop(tf.convert_to_tensor(image), u, size, interpolation,
                             u[_CROP_DRAWS] < hflip)


def random_horizontal_flip(image, seed, prob=0.5):
  """Mirror left-right with probability `prob` (the train transform folds the flip into the
  resize instead, see `image_ops.resize(flip=...)`)."""
  image = tf.convert_to_tensor(image)
  flip = _uniforms(seed, 1)[0] < prob
  return tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)


def color_jitter(image, seed, strength):
  """torchvision `ColorJitter(s, s, s)` on a PIL image: brightness, contrast and saturation
  factors uniform in [max(0, 1 - s), 1 + s], applied in a random order (hue is off)."""
  return _color_jitter(image, _uniforms(seed, _JITTER_DRAWS), strength)


def _color_jitter(image, u, strength):
  """`color_jitter` with its draws `u` [_JITTER_DRAWS] given."""
  image = tf.convert_to_tensor(image)
  factors = _uniform(u[:3], max(0., 1. - strength), 1. + strength)
  order = tf.argsort(u[3:6])  # a uniform permutation
  # torchvision: saturation = ImageEnhance.Color.
  enhance = (image_ops.brightness, image_ops.contrast, image_ops.color)
  for position in range(3):
    op_index = order[position]
    factor = tf.gather(factors, op_index)
    current = image
    image = tf.switch_case(op_index, [
        (lambda fn=fn, current=current: fn(current, factor)) for fn in enhance])
  return image


def three_augment(image, seed):
  """DeiT III: one of grayscale, solarize (threshold 128), Gaussian blur (radius uniform in
  [0.1, 2]), chosen uniformly."""
  return _three_augment(image, _uniforms(seed, _THREE_AUGMENT_DRAWS))


def _three_augment(image, u):
  """`three_augment` with its draws `u` [_THREE_AUGMENT_DRAWS] given."""
  image = tf.convert_to_tensor(image)
  choice = _randint(u[0], 0, 3)
  sigma = _uniform(u[1], 0.1, 2.0)
  return tf.switch_case(choice, [lambda: image_ops.grayscale(image),
                                 lambda: image_ops.solarize(image, 128),
                                 lambda: image_ops.gaussian_blur(image, sigma)])


def sample_erase_box(seed, height, width, min_area=0.02, max_area=1 / 3, min_aspect=0.3,
                     max_aspect=None, count=1):
  """timm RandomErasing box as int32 (top, left, erase_h, erase_w); erase_h = erase_w = 0 if
  none of the 10 attempts fits (strictly smaller than the image): timm then erases nothing."""
  return _erase_box(_uniforms(seed, _ERASE_BOX_DRAWS), height, width, min_area, max_area,
                    min_aspect, max_aspect, count)


def _erase_box(u, height, width, min_area, max_area, min_aspect, max_aspect, count):
  """`sample_erase_box` with its draws `u` [_ERASE_BOX_DRAWS] given."""
  max_aspect = max_aspect or 1 / min_aspect
  height = tf.cast(height, tf.int32)
  width = tf.cast(width, tf.int32)
  area = tf.cast(height * width, tf.float32)
  count = tf.cast(count, tf.float32)
  target_area = _uniform(u[:10], min_area, max_area) * area / count
  aspect = tf.exp(_uniform(u[10:20], math.log(min_aspect), math.log(max_aspect)))
  erase_h = tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32)
  erase_w = tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32)
  fits = (erase_w < width) & (erase_h < height)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  any_fits = tf.reduce_any(fits)
  erase_h = tf.where(any_fits, erase_h[first], 0)
  erase_w = tf.where(any_fits, erase_w[first], 0)
  top = _randint(u[20], 0, height - erase_h + 1)
  left = _randint(u[21], 0, width - erase_w + 1)
  return top, left, erase_h, erase_w


def _standard_normal(shape, seed):
  """Standard normal float32 noise of `shape`: Box-Muller on one stateless uniform draw,
  about 1.7x faster than `tf.random.stateless_normal` on one CPU core."""
  size = tf.reduce_prod(shape)
  u = tf.random.stateless_uniform(tf.stack([2, (size + 1) // 2]), seed)
  radius = tf.sqrt(-2. * tf.math.log(1. - u[0]))  # 1 - u is in (0, 1]
  angle = (2. * math.pi) * u[1]
  normal = tf.concat([radius * tf.cos(angle), radius * tf.sin(angle)], axis=0)
  return tf.reshape(normal[:size], shape)


def random_erasing(image, seed, prob=0.25, mode="pixel", max_count=1, min_area=0.02,
                   max_area=1 / 3, min_aspect=0.3):
  """timm `RandomErasing` on a normalized float image [H, W, C].

  With probability `prob`, erase 1..max_count boxes (each with area / count) with
  per-pixel standard normal noise ('pixel'), one normal colour per box ('rand') or 0
  ('const'). Only the erased rectangle is generated, so the cost follows its area.
  """
  u = _uniforms(seed, _ERASE_DRAWS + _ERASE_BOX_DRAWS * max_count)
  return _random_erasing(image, u, seed, prob, mode, max_count, min_area, max_area, min_aspect)


def _random_erasing(image, u, seed, prob, mode, max_count, min_area=0.02, max_area=1 / 3,
                    min_aspect=0.3):
  """`random_erasing` with its box draws `u` given; the noise comes from `seed` (folded with
  a stage id, only when a box is erased)."""
  if mode not in _ERASE_MODES:
    raise ValueError(f"remode={mode!r}: expected one of {_ERASE_MODES}.")
  apply = u[0] <= prob  # timm skips if random() > p
  count = _randint(u[1], 1, max_count + 1) if max_count > 1 else tf.constant(1, tf.int32)
  shape = tf.shape(image)
  h, w, c = shape[0], shape[1], shape[2]
  for box in range(max_count):
    box_u = u[_ERASE_DRAWS + _ERASE_BOX_DRAWS * box:_ERASE_DRAWS + _ERASE_BOX_DRAWS * (box + 1)]
    top, left, eh, ew = _erase_box(box_u, h, w, min_area, max_area, min_aspect, None, count)
    active = apply & (box < count) & (eh > 0)

    def erase(image=image, top=top, left=left, eh=eh, ew=ew, box=box):
      noise_seed = tf.random.experimental.stateless_fold_in(
          tf.random.experimental.stateless_fold_in(seed, _ERASE_NOISE_STAGE), box)
      if mode == "pixel":
        patch = _standard_normal(tf.stack([eh, ew, c]), noise_seed)
      elif mode == "rand":
        patch = tf.broadcast_to(tf.random.stateless_normal([1, 1, c], noise_seed), [eh, ew, c])
      else:
        patch = tf.zeros([eh, ew, c])
      # Rebuild the image around the patch: cheaper than a full-image select.
      band = tf.concat([image[top:top + eh, :left], patch, image[top:top + eh, left + ew:]],
                       axis=1)
      return tf.concat([image[:top], band, image[top + eh:]], axis=0)

    image = tf.cond(active, erase, lambda image=image: image)
  return image


def _check_image(image):
  image = tf.convert_to_tensor(image)
  if image.dtype != tf.uint8:
    raise TypeError(f"image must be uint8 [H, W, 3], got {image.dtype}; decode with "
                    "tf.io.decode_jpeg(..., channels=3) or cast a [0, 255] image to uint8.")
  if image.shape.rank is not None and (image.shape.rank != 3 or image.shape[-1] not in (None, 3)):
    raise ValueError(f"image must be [H, W, 3], got shape {image.shape}; decode with "
                     "channels=3 to turn grayscale/RGBA into RGB.")
  return tf.ensure_shape(image, [None, None, 3])


def _check_seed(seed):
  seed = tf.convert_to_tensor(seed)
  if seed.dtype not in (tf.int32, tf.int64) or (seed.shape.rank is not None and
                                                 seed.shape.as_list() not in ([2], [None])):
    raise ValueError(f"seed must be an int32/int64 tensor of shape [2], got {seed.dtype} "
                     f"{seed.shape}; derive one with tf.random.experimental.stateless_fold_in.")
  return seed


def check_config(cfg):
  """Raise ValueError naming the first bad field of an augmentation config."""
  def bad(field, message):
    raise ValueError(f"augment config {field}={getattr(cfg, field)!r}: {message}")

  if int(cfg.input_size) <= 0:
    bad("input_size", "must be a positive int.")
  if not 0 < cfg.crop_pct <= 1:
    bad("crop_pct", "must be in (0, 1] (eval resizes to input_size / crop_pct, then crops).")
  scale, ratio = tuple(cfg.scale), tuple(cfg.ratio)
  if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
    bad("scale", "must be (min, max) area fractions with 0 < min <= max <= 1.")
  if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
    bad("ratio", "must be (min, max) aspect ratios with 0 < min <= max.")
  if cfg.interpolation not in _INTERPOLATIONS:
    bad("interpolation", f"must be one of {_INTERPOLATIONS}.")
  if cfg.get("eval_input_size") is not None and int(cfg.eval_input_size) <= 0:
    bad("eval_input_size", "must be a positive int (or None: input_size).")
  if not 0 <= cfg.hflip <= 1:
    bad("hflip", "must be a probability in [0, 1].")
  if cfg.auto_augment:
    parse_rand_augment(cfg.auto_augment)
  if cfg.color_jitter is not None and cfg.color_jitter < 0:
    bad("color_jitter", "must be >= 0 (or None / 0 for off).")
  if not 0 <= cfg.reprob <= 1:
    bad("reprob", "must be a probability in [0, 1].")
  if cfg.remode not in _ERASE_MODES:
    bad("remode", f"must be one of {_ERASE_MODES}.")
  if int(cfg.recount) < 1:
    bad("recount", "must be >= 1.")
  if len(tuple(cfg.mean)) != 3 or len(tuple(cfg.std)) != 3 or min(cfg.std) <= 0:
    bad("std", "mean and std must be 3 values each, std > 0.")


def _train_draws(seed, cfg):
  """All the uniform numbers of one example's train transform, drawn at once (one TF op) and
  split by stage; each stage's share has a fixed size, so stages stay independent."""
  spec = parse_rand_augment(cfg.auto_augment) if cfg.auto_augment else None
  sizes = dict(crop=_CROP_DRAWS, flip=1,
               rand_augment=_LAYER_DRAWS * spec.num_layers if spec else 0,
               color_jitter=_JITTER_DRAWS, three_augment=_THREE_AUGMENT_DRAWS,
               erase=_ERASE_DRAWS + _ERASE_BOX_DRAWS * int(cfg.recount))
  u = _uniforms(seed, sum(sizes.values()))
  draws, start = {}, 0
  for stage, size in sizes.items():
    draws[stage] = u[start:start + size]
    start += size
  return draws


def train_transform(image, seed, cfg):
  """DeiT training transform: uint8 [H, W, 3] + seed [2] -> float32 [S, S, 3], normalized."""
  check_config(cfg)
  image = _check_image(image)
  seed = _check_seed(seed)
  draws = _train_draws(seed, cfg)
  if cfg.get("simple_random_crop"):  # the whole image is resized, then cropped
    return _train_transform_from_crop(image, seed, draws, cfg)
  shape = tf.shape(image)
  top, left, crop_h, crop_w = _crop_box(draws["crop"], shape[0], shape[1], tuple(cfg.scale),
                                        tuple(cfg.ratio))
  crop = tf.slice(image, [top, left, 0], [crop_h, crop_w, 3])
  return _train_transform_from_crop(crop, seed, draws, cfg)


def decode_and_train_transform(encoded, seed, cfg):
  """`train_transform(decoded image, seed, cfg)` from encoded bytes, decoding only the
  RandomResizedCrop box of a JPEG (`tf.image.decode_and_crop_jpeg`), which is faster.

  Same box and same random draws as `train_transform`; libjpeg's cropped decode can differ
  from the full decode by a few levels on a small fraction of pixels (chroma upsampling at
  the crop edges). Non-JPEG bytes (PNG, GIF, BMP: ImageNet has a few) are fully decoded.
  """
  check_config(cfg)
  seed = _check_seed(seed)
  draws = _train_draws(seed, cfg)
  if cfg.get("simple_random_crop"):  # needs the whole image
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    return _train_transform_from_crop(tf.ensure_shape(image, [None, None, 3]), seed, draws, cfg)
  crop_box = functools.partial(_crop_box, draws["crop"], scale=tuple(cfg.scale),
                               ratio=tuple(cfg.ratio))

  def jpeg_crop():
    shape = tf.image.extract_jpeg_shape(encoded)
    return tf.image.decode_and_crop_jpeg(encoded, tf.stack(crop_box(shape[0], shape[1])),
                                         channels=3)

  def other_crop():
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    shape = tf.shape(image)
    top, left, crop_h, crop_w = crop_box(shape[0], shape[1])
    return tf.slice(image, [top, left, 0], [crop_h, crop_w, 3])

  crop = tf.cond(tf.io.is_jpeg(encoded), jpeg_crop, other_crop)
  return _train_transform_from_crop(tf.ensure_shape(crop, [None, None, 3]), seed, draws, cfg)


def _train_transform_from_crop(crop, seed, draws, cfg):
  """Everything after the RandomResizedCrop box (the whole image for the simple random crop):
  resize, flip, RandAugment / color jitter / ThreeAugment, normalize, RandomErasing."""
  size = int(cfg.input_size)
  mean, std = tuple(cfg.mean), tuple(cfg.std)
  flip = draws["flip"][0] < cfg.hflip
  if cfg.get("simple_random_crop"):
    image = _simple_random_crop(crop, draws["crop"], size, cfg.interpolation, flip)
  else:
    # The flip is folded into the resize (mirrored output order), which costs nothing.
    image = image_ops.resize(crop, [size, size], cfg.interpolation, flip=flip)
  jitter = cfg.color_jitter is not None and cfg.color_jitter > 0
  if cfg.three_augment:
    # Official DeiT III replaces the whole timm transform: no RandAugment, no erasing.
    image = _three_augment(image, draws["three_augment"])
    if jitter:
      image = _color_jitter(image, draws["color_jitter"], float(cfg.color_jitter))
    return image_ops.normalize(image, mean, std)
  if cfg.auto_augment:
    image = _rand_augment(image, draws["rand_augment"], parse_rand_augment(cfg.auto_augment),
                          fill_value(mean), cfg.interpolation)
  elif jitter:  # timm disables color jitter while RandAugment is on
    image = _color_jitter(image, draws["color_jitter"], float(cfg.color_jitter))
  image = image_ops.normalize(image, mean, std)
  if cfg.reprob > 0:
    image = _random_erasing(image, draws["erase"], seed, cfg.reprob, cfg.remode,
                            int(cfg.recount))
  return image


def eval_resize_size(cfg):
  """The eval shorter-side size, int(input_size / crop_pct): 256 for 224 at 0.875."""
  return int(cfg.input_size / cfg.crop_pct)


def eval_transform(image, cfg):
  """DeiT eval transform: shorter side to int(S / crop_pct) (bicubic), center crop S x S."""
  check_config(cfg)
  image = _check_image(image)
  size = int(cfg.input_size)
  resize_to = eval_resize_size(cfg)
  shape = tf.shape(image)
  new_h, new_w = _shorter_side_to(shape[0], shape[1], resize_to)
  # torchvision CenterCrop: offset int(round((n - size) / 2)), round half to even. Only the
  # cropped part of the resized image is computed.
  top = tf.cast(tf.round(tf.cast(new_h - size, tf.float32) / 2.), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_w - size, tf.float32) / 2.), tf.int32)
  cropped = image_ops.resize(image, tf.stack([new_h, new_w]), cfg.interpolation,
                             window=(top, left, size, size))
  return image_ops.normalize(cropped, tuple(cfg.mean), tuple(cfg.std))
