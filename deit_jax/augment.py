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

Every random choice comes from the `seed` argument (shape [2], int32/int64) through
`tf.random.stateless_*`, so a given (image, seed) always gives the same output. The train
transform draws all its uniform numbers in one op and hands each stage a fixed share of them
(`_train_draws`), so the stages stay independent; the erasing noise is a separate draw.

Exactness against the PIL pipeline (checked in tests/test_augment.py):
  * the resize (RandomResizedCrop, eval) is PIL's: horizontal then vertical pass, each output
    a kernel with support scaled by the downscale factor, PIL's 22-bit fixed-point weights,
    rounding to uint8 between the passes. Bicubic matches PIL except a rare +-1 (a few in
    1e5 values) where the float32 sum and PIL's integer sum round a value on a half level apart;
    bilinear's simple weights hit half levels more often (up to a few % of values +-1).
  * the 15 RandAugment ops give PIL's exact bytes: uint8 LUT arithmetic, `Image.blend`'s
    float32 rounding, `ImageFilter.SMOOTH`, `Image.transform`'s bicubic with a = -1 in
    double, its clamping and fill rule, and `ImageOps.equalize`/`autocontrast` tables.
  * normalize is torch's float32 (v / 255 - mean) / std, bit for bit.
Documented differences:
  * ThreeAugment's blur is a true Gaussian (sigma = radius); PIL approximates it with three
    box blurs.
  * posterize to 0 bits gives black (Pillow of DeiT's time); Pillow >= 10 raises instead.
  * the random numbers are TF's, not Python's/torch's: same distributions, other draws.

Speed (one CPU core, see benchmarks/input_throughput.py): the RandAugment ops, normalize
and the resize weights run as small XLA-compiled kernels (compiled once per shape, cached),
because dozens of small TF ops would cost more than the work; XLA's CPU backend fuses a
multiply feeding an add into an FMA, which would change PIL's rounding, so products that PIL
rounds pass through `_mul`. The resize itself, whose input size changes with every crop, is
two batched matmuls over blocks of outputs. `decode_and_train_transform` decodes only the
crop box of a JPEG.
"""
import dataclasses
import functools
import math
import re

import ml_collections
import numpy as np

from deit_jax.lazy_tf import tf  # imported on first use

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

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
      mean=IMAGENET_MEAN,
      std=IMAGENET_STD,
  ))


def fill_value(mean=IMAGENET_MEAN):
  """timm's fill for geometric ops: the dataset mean in uint8, (124, 116, 104) for ImageNet."""
  return tuple(min(255, round(255 * m)) for m in mean)


# ------------------------------------------------------------------------------------------
# uint8 helpers with PIL's arithmetic.
# ------------------------------------------------------------------------------------------


def _truncate_to_uint8(x):
  """PIL's float -> uint8 store: clip to [0, 255], then truncate (C cast)."""
  return tf.cast(tf.clip_by_value(x, 0., 255.), tf.uint8)


def _round_to_uint8(x):
  """PIL's resampling store: round half up, clip to [0, 255]."""
  return tf.cast(tf.clip_by_value(tf.floor(x + 0.5), 0., 255.), tf.uint8)


def _opaque_zero(image, dtype):
  """A 0 computed from the pixels, which XLA cannot constant-fold (see `_mul`)."""
  return tf.cast(tf.bitwise.right_shift(tf.cast(image[0, 0, 0], tf.int32), 8), dtype)


def _mul(a, b, zero):
  """`a * b` rounded to its dtype before it meets an add, as PIL's C code rounds it.

  XLA's CPU backend turns a multiply feeding an add into one FMA, which skips the product's
  rounding and can move a result that sits on an integer across PIL's truncation. `zero` is
  a 0 that XLA cannot fold away: a * b + zero is at most an FMA with a zero addend, which is
  exactly the rounded product.
  """
  return a * b + zero


def _blend(degenerate, image, factor, zero):
  """`Image.blend(degenerate, image, factor)`: float32 `d + f * (i - d)`, then truncate.

  This is how every `ImageEnhance` class works: factor 0 gives `degenerate`, 1 the image,
  above 1 it extrapolates away from `degenerate` (then clips). PIL rounds the factor and the
  product to float32 before the add.
  """
  degenerate = tf.cast(degenerate, tf.float32)
  image = tf.cast(image, tf.float32)
  return _truncate_to_uint8(
      degenerate + _mul(tf.cast(factor, tf.float32), image - degenerate, zero))


def _grayscale(image):
  """PIL's `convert('L')` (ITU-R 601-2 in 16-bit fixed point), as int32 [H, W]."""
  x = tf.cast(image, tf.int32)
  return tf.bitwise.right_shift(
      x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000, 16)


# ------------------------------------------------------------------------------------------
# RandAugment ops. Each takes a uint8 [H, W, 3] image and the op's argument (already mapped
# from the magnitude, see LEVEL_TO_ARG) and returns a uint8 [H, W, 3] image, like timm's ops.
# Each op runs as one XLA-compiled kernel (`_run`): the per-pixel work is small, so the cost
# of many small TF ops would dominate, and XLA fuses table building, stats and lookups.
# ------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _compiled(kernel, *static_args):
  """`kernel(image, arg, *static_args)` XLA-compiled, cached for the process (and by XLA per
  image shape)."""
  return tf.function(lambda image, arg: kernel(image, arg, *static_args), jit_compile=True,
                     autograph=False)


def _run(kernel, image, arg=0., *static_args):
  """Run an op kernel; `arg` travels as float64 (timm computes the arguments in Python)."""
  return _compiled(kernel, *static_args)(tf.convert_to_tensor(image), _as_float64(arg))


def _as_float64(x):
  """float64 tensor of `x`; Python numbers go straight to float64 (not via float32)."""
  if isinstance(x, (int, float)):
    return tf.constant(x, tf.float64)
  return tf.cast(x, tf.float64)


def _lookup(image, table):
  """out[y, x, c] = table[c, image[y, x, c]] for a [3, 256] (or [256]) table."""
  table = tf.broadcast_to(table, [3, 256])
  index = tf.cast(image, tf.int32) + 256 * tf.range(3, dtype=tf.int32)
  return tf.gather(tf.reshape(table, [-1]), index)


def _levels():
  return tf.range(256, dtype=tf.int32)


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


def _lookup_kernel(image, table):
  return _lookup(image, table)


def _auto_contrast_kernel(image, unused_arg):
  lo = tf.cast(tf.reduce_min(image, axis=[0, 1]), tf.float64)
  hi = tf.cast(tf.reduce_max(image, axis=[0, 1]), tf.float64)
  # A flat channel (hi <= lo) is left unchanged; the maximum(.., 1) only avoids a division
  # by zero in the branch that `where` then discards.
  scale = 255. / tf.maximum(hi - lo, 1.)
  offset = -lo * scale
  stretched = tf.cast(_mul(tf.cast(image, tf.float64), scale, _opaque_zero(image, tf.float64))
                      + offset, tf.int32)
  return tf.where(hi > lo, tf.cast(tf.clip_by_value(stretched, 0, 255), tf.uint8), image)


def auto_contrast(image, unused_arg=None):
  """`ImageOps.autocontrast`: per channel, stretch [min, max] to [0, 255].

  PIL builds its table as `int(ix * scale + offset)` in Python floats (float64); we evaluate
  the same expression per pixel.
  """
  return _run(_auto_contrast_kernel, image)


def _equalize_kernel(image, unused_arg):
  index = tf.reshape(tf.cast(image, tf.int32) + 256 * tf.range(3, dtype=tf.int32), [-1])
  hist = tf.reshape(tf.math.unsorted_segment_sum(tf.ones_like(index), index, 768), [3, 256])
  total = tf.reduce_sum(hist, axis=1)
  # Count of the highest value present in each channel.
  brightest = 255 - tf.argmax(tf.reverse(tf.cast(hist > 0, tf.int32), axis=[1]), axis=1,
                              output_type=tf.int32)
  last_count = tf.gather(hist, brightest, batch_dims=1)
  step = (total - last_count) // 255
  below = tf.cumsum(hist, axis=1, exclusive=True)
  safe_step = tf.maximum(step, 1)[:, None]
  lut = tf.minimum((safe_step // 2 + below) // safe_step, 255)
  return tf.cast(tf.where(step[:, None] > 0, lut, _levels()), tf.uint8)


def equalize(image, unused_arg=None):
  """`ImageOps.equalize`: per-channel histogram equalisation with PIL's exact LUT.

  PIL: step = (pixels - count of the brightest present value) // 255; if step is 0 the
  channel is unchanged, else lut[i] = (step // 2 + #pixels below i) // step (stored clipped
  to 255). Two compiled calls, table then lookup: fused into one, XLA would recompute the
  table for every pixel it looks up.
  """
  image = tf.convert_to_tensor(image)
  return _compiled(_lookup_kernel)(image, _run(_equalize_kernel, image))


def _invert_kernel(image, unused_arg):
  return 255 - image


def invert(image, unused_arg=None):
  """`ImageOps.invert`."""
  return _run(_invert_kernel, image)


def _posterize_kernel(image, bits):
  shift = 8 - tf.clip_by_value(tf.cast(bits, tf.int32), 0, 8)
  return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(tf.cast(image, tf.int32), shift),
                                       shift), tf.uint8)


def posterize(image, bits):
  """`ImageOps.posterize`: keep the `bits` most significant bits.

  0 bits (PosterizeIncreasing at magnitude 10) gives black, as Pillow did when DeiT was
  trained; Pillow >= 10 raises on 0 bits instead. bits >= 8 is the identity (timm skips it).
  """
  return _run(_posterize_kernel, image, bits)


def _solarize_kernel(image, threshold):
  return tf.where(tf.cast(image, tf.int32) >= tf.cast(threshold, tf.int32), 255 - image, image)


def solarize(image, threshold):
  """`ImageOps.solarize`: invert every value >= threshold (256 -> no-op)."""
  return _run(_solarize_kernel, image, threshold)


def _solarize_add_kernel(image, add, threshold):
  levels = tf.cast(image, tf.int32)
  added = tf.cast(tf.minimum(levels + tf.cast(add, tf.int32), 255), tf.uint8)
  return tf.where(levels < threshold, added, image)


def solarize_add(image, add, threshold=128):
  """timm's `solarize_add`: values below `threshold` get `+add`, saturating at 255."""
  return _run(_solarize_add_kernel, image, add, int(threshold))


def _color_kernel(image, factor):
  gray = tf.cast(_grayscale(image), tf.uint8)[..., None]
  return _blend(gray, image, factor, _opaque_zero(image, tf.float32))


def color(image, factor):
  """`ImageEnhance.Color`: blend with the grayscale image (0 = grayscale)."""
  return _run(_color_kernel, image, factor)


def _contrast_kernel(image, factor):
  gray = tf.cast(_grayscale(image), tf.float64)
  mean = tf.floor(tf.reduce_mean(gray) + 0.5)
  return _blend(tf.cast(mean, tf.float32), image, factor, _opaque_zero(image, tf.float32))


def contrast(image, factor):
  """`ImageEnhance.Contrast`: blend with a flat image at the grayscale image's mean.

  The mean is the REAL mean of this image's grayscale (rounded half up, as PIL's
  `int(mean + 0.5)`); several TF ports use a histogram trick that is off for large images.
  """
  return _run(_contrast_kernel, image, factor)


def _brightness_kernel(image, factor):
  return _blend(0., image, factor, _opaque_zero(image, tf.float32))


def brightness(image, factor):
  """`ImageEnhance.Brightness`: blend with black."""
  return _run(_brightness_kernel, image, factor)


def _smooth_interior(image):
  """`ImageFilter.SMOOTH` (3x3 kernel [[1,1,1],[1,5,1],[1,1,1]] / 13, rounded half up) of the
  pixels off the one-pixel border, which PIL leaves unchanged: [H - 2, W - 2, 3].

  The weighted sum s is an integer and s / 13 is never exactly x.5, so the integer form
  floor((2s + 13) / 26) is exact.
  """
  x = tf.cast(image, tf.int32)
  rows = x[:-2] + x[1:-1] + x[2:]  # vertical 3-sums, [H - 2, W, 3]
  total = rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:] + 4 * x[1:-1, 1:-1]
  return tf.cast((2 * total + 13) // 26, tf.uint8)


def _sharpness_interior_kernel(image, factor):
  # The border blends with itself, which leaves it unchanged: blend the interior only.
  return _blend(_smooth_interior(image), image[1:-1, 1:-1], factor,
                _opaque_zero(image, tf.float32))


def _put_interior_kernel(image, interior):
  h, w = image.shape[0], image.shape[1]  # static inside the compiled kernel
  if h < 3 or w < 3:
    return image  # no interior: PIL's SMOOTH returns the image unchanged
  return tf.raw_ops.TensorStridedSliceUpdate(
      input=image, begin=[1, 1, 0], end=[h - 1, w - 1, 3], strides=[1, 1, 1], value=interior)


def sharpness(image, factor):
  """`ImageEnhance.Sharpness`: blend with the SMOOTH-filtered image (0 = smoothed)."""
  image = tf.convert_to_tensor(image)
  # Two kernels: XLA runs the blend and the write-back much slower fused into one.
  interior = _run(_sharpness_interior_kernel, image, factor)
  return _compiled(_put_interior_kernel)(image, interior)


def _interpolate(taps, frac, interpolation, zero):
  """PIL's 1-D interpolation of the list of tap planes `taps` at fraction `frac`, in its exact
  arithmetic form (Geometry.c): the transform bicubic is the a = -1 cubic convolution
  written as a polynomial in `frac`; bilinear is a lerp."""
  if interpolation == "bicubic":
    v1, v2, v3, v4 = taps
    p2 = -v1 + v3
    p3 = 2. * (v1 - v2) + v3 - v4
    p4 = -v1 + v2 - v3 + v4
    return v2 + _mul(frac, p2 + _mul(frac, p3 + _mul(frac, p4, zero), zero), zero)
  a, b = taps
  return a + _mul(b - a, frac, zero)


def _tap_offsets(interpolation):
  return (-1, 0, 1, 2) if interpolation == "bicubic" else (0, 1)


def _taps(coordinate, size, interpolation):
  """Edge-clamped tap indices (int32) and fraction of a PIL sampling coordinate."""
  pos = coordinate - 0.5
  start = tf.floor(pos)
  first = tf.cast(start, tf.int32)
  return ([tf.clip_by_value(first + o, 0, size - 1) for o in _tap_offsets(interpolation)],
          (pos - start)[..., None])


def _fill_outside(value, inside, fill):
  return tf.where(inside[..., None], _truncate_to_uint8(value), tf.constant(fill, tf.uint8))


def _warp(image, xin, yin, fill, interpolation, zero):
  """PIL `Image.transform`: output pixel (x, y) samples the source at (xin, yin) [H, W].

  PIL samples at the pixel-centre coordinate (xin - 0.5, yin - 0.5) with edge-clamped taps,
  interpolates each tap row along x, then the rows along y, in double, truncates, and fills
  outputs whose (xin, yin) falls outside [0, W) x [0, H). Taps are gathered per pixel from
  the [H * W, 3] float64 pixel list (XLA's gather costs per gathered element).
  """
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  flat = tf.reshape(tf.cast(image, tf.float64), [-1, 3])
  inside = ((xin >= 0.) & (xin < tf.cast(w, tf.float64)) &
            (yin >= 0.) & (yin < tf.cast(h, tf.float64)))
  cols, frac_x = _taps(xin, w, interpolation)
  rows, frac_y = _taps(yin, h, interpolation)
  along_x = [_interpolate([tf.gather(flat, row * w + col) for col in cols], frac_x,
                          interpolation, zero) for row in rows]
  return _fill_outside(_interpolate(along_x, frac_y, interpolation, zero), inside, fill)


def _line_shifts(coordinate, axis, size, interpolation):
  """For `_warp_1d`: each line's shift n (int32, [lines or 1, 1] or [1, lines or 1]), each
  output's d (int32, like `coordinate`) and fraction (float64, [..., 1])."""
  pos = coordinate - 0.5
  start = tf.floor(pos)
  # Clipped so the int32 arithmetic cannot overflow; such outputs are filled anyway.
  limit = 2. * tf.cast(size, tf.float64) + 8.
  first = (tf.cast(tf.clip_by_value(start, -limit, limit), tf.int32) +
           _tap_offsets(interpolation)[0])
  along = tf.range(size)
  if axis == 1:
    shift = first[:, :1]
    d = first - (along[None, :] + shift)
  else:
    shift = first[:1, :]
    d = first - (along[:, None] + shift)
  return shift, d, (pos - start)[..., None]


def _shifted_lines_kernel(image, coordinate, axis, interpolation):
  """For `_warp_1d`: every line of `image` shifted by its n, edge-clamped, with room for
  the taps and d = -1..1: uint8 [H, W + taps + 1, 3] (axis 1) or [H + taps + 1, W, 3]."""
  shape = tf.shape(image)
  size = shape[axis]
  shift, _, _ = _line_shifts(coordinate, axis, size, interpolation)
  extended = size + len(_tap_offsets(interpolation)) + 1
  j = tf.range(extended)[None, :] if axis == 1 else tf.range(extended)[:, None]
  source = tf.clip_by_value(shift + j - 1, 0, size - 1)
  if source.shape[1 - axis] == 1:  # the same shift for every line: gather whole lines
    return tf.gather(image, tf.reshape(source, [-1]), axis=axis)
  flat = tf.reshape(image, [-1, 3])
  if axis == 1:
    return tf.gather(flat, tf.range(shape[0])[:, None] * shape[1] + source)
  return tf.gather(flat, source * shape[1] + tf.range(shape[1])[None, :])


def _warp_1d(image, shifted, coordinate, axis, fill, interpolation, zero):
  """`_warp` when only one coordinate moves: along x (axis 1, `coordinate` = xin [H or 1, W])
  or along y (axis 0, yin [H, W or 1]); PIL interpolates the other at fraction 0, which
  returns the tap exactly.

  Along each line (row for x, column for y) the taps of neighbouring outputs overlap: output
  i's taps start at i + n + d, with n the line's shift and d in {-1, 0, 1} (0 but for float
  rounding at integer shifts). So each line is gathered once, shifted by n (`shifted`, from
  `_shifted_lines_kernel`: N + taps + 1 values instead of N * taps), and every tap is a
  static slice of it, picked by d.
  """
  shape = tf.shape(image)
  size = shape[axis]
  _, d, frac = _line_shifts(coordinate, axis, size, interpolation)
  shifted = tf.cast(shifted, tf.float64)

  def piece(m):  # what outputs see at position m of their shifted line
    return shifted[:, m:m + size] if axis == 1 else shifted[m:m + size]

  d = d[..., None]
  taps = [tf.where(d < 0, piece(k), tf.where(d > 0, piece(k + 2), piece(k + 1)))
          for k in range(len(_tap_offsets(interpolation)))]
  inside = tf.broadcast_to((coordinate >= 0.) & (coordinate < tf.cast(size, tf.float64)),
                           shape[:2])
  return _fill_outside(_interpolate(taps, frac, interpolation, zero), inside, fill)


def _pixel_centres(h, w):
  ys = tf.range(h, dtype=tf.float64)[:, None] + 0.5
  xs = tf.range(w, dtype=tf.float64)[None, :] + 0.5
  return xs, ys


def _coordinates(image, arg, kind, zero):
  """PIL's sampling coordinates (xin, yin) of a geometric op at the output pixel centres;
  None for a coordinate the op leaves alone (the output's own pixel centre).

  arg: the AFFINE matrix (a0..a5) for 'affine' (xin = a0 x + a1 y + a2), the shear factor
  for 'shear_x'/'shear_y', the shift in pixels for 'translate_x'/'translate_y'.
  """
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  xs, ys = _pixel_centres(h, w)
  if kind == "affine":
    a0, a1, a2, a3, a4, a5 = tf.unstack(arg)
    return (_mul(a0, xs, zero) + _mul(a1, ys, zero) + a2,
            _mul(a3, xs, zero) + _mul(a4, ys, zero) + a5)
  return {"shear_x": lambda: (xs + _mul(arg, ys, zero), None),  # (1, f, 0, 0, 1, 0)
          "shear_y": lambda: (None, _mul(arg, xs, zero) + ys),  # (1, 0, 0, f, 1, 0)
          "translate_x": lambda: (xs + arg, None),  # (1, 0, t, 0, 1, 0)
          "translate_y": lambda: (None, ys + arg)}[kind]()  # (1, 0, 0, 0, 1, t)


def _moving_axis(xin, yin):
  """(axis, coordinate) of a one-coordinate warp: x moves along axis 1, y along axis 0."""
  return (1, xin) if yin is None else (0, yin)


def _lines_kernel(image, arg, kind, interpolation):
  axis, coordinate = _moving_axis(*_coordinates(image, arg, kind,
                                                _opaque_zero(image, tf.float64)))
  return _shifted_lines_kernel(image, coordinate, axis, interpolation)


def _warp_kernel(image, args, kind, fill, interpolation):
  """The per-pixel part of a geometric op; args = arg, or (arg, shifted lines) for the
  one-coordinate ops."""
  zero = _opaque_zero(image, tf.float64)
  if kind == "affine":
    return _warp(image, *_coordinates(image, args, kind, zero), fill, interpolation, zero)
  arg, shifted = args
  axis, coordinate = _moving_axis(*_coordinates(image, arg, kind, zero))
  return _warp_1d(image, shifted, coordinate, axis, fill, interpolation, zero)


def _geometric(kind, image, arg, fill, interpolation):
  # The warps are gathers plus element-wise float64 math: XLA fuses them, several times
  # faster than op-by-op TF, and with `_mul` they give PIL's bytes (checked in the tests).
  image = tf.convert_to_tensor(image)
  arg = _as_float64(arg)
  warp = _compiled(_warp_kernel, kind, tuple(fill), interpolation)
  if kind == "affine":
    return warp(image, arg)
  # The line gather is its own kernel: fused, XLA would redo it for each of its many uses.
  return warp(image, (arg, _compiled(_lines_kernel, kind, interpolation)(image, arg)))


def shear_x(image, factor, fill=(128, 128, 128), interpolation="bicubic"):
  """timm `shear_x`: AFFINE (1, factor, 0, 0, 1, 0), i.e. output (x, y) <- input (x + f y, y)."""
  return _geometric("shear_x", image, factor, fill, interpolation)


def shear_y(image, factor, fill=(128, 128, 128), interpolation="bicubic"):
  """timm `shear_y`: AFFINE (1, 0, 0, factor, 1, 0)."""
  return _geometric("shear_y", image, factor, fill, interpolation)


def translate_x_rel(image, pct, fill=(128, 128, 128), interpolation="bicubic"):
  """timm `translate_x_rel`: output (x, y) <- input (x + pct * width, y)."""
  # timm computes the shift in Python (float64), outside the per-pixel math.
  pixels = _as_float64(pct) * tf.cast(tf.shape(image)[1], tf.float64)
  return _geometric("translate_x", image, pixels, fill, interpolation)


def translate_y_rel(image, pct, fill=(128, 128, 128), interpolation="bicubic"):
  """timm `translate_y_rel`: output (x, y) <- input (x, y + pct * height)."""
  pixels = _as_float64(pct) * tf.cast(tf.shape(image)[0], tf.float64)
  return _geometric("translate_y", image, pixels, fill, interpolation)


def _rotate_matrix(degrees, h, w):
  """PIL `Image.rotate`'s inverse AFFINE matrix, computed like its Python code (float64)."""
  angle = -(tf.math.floormod(_as_float64(degrees), 360.) * (math.pi / 180.))
  # round(x, 15): the double nearest k / 1e15, k = round-half-even(x * 1e15).
  cos = tf.round(tf.cos(angle) * 1e15) / 1e15
  sin = tf.round(tf.sin(angle) * 1e15) / 1e15
  cx = tf.cast(w, tf.float64) / 2.
  cy = tf.cast(h, tf.float64) / 2.
  # matrix[2], matrix[5] = transform(-cx, -cy, matrix), then += the centre.
  return tf.stack([cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy])


def rotate(image, degrees, fill=(128, 128, 128), interpolation="bicubic"):
  """PIL `Image.rotate(degrees)` (counter-clockwise, about the centre, same size)."""
  image = tf.convert_to_tensor(image)
  matrix = _rotate_matrix(degrees, tf.shape(image)[0], tf.shape(image)[1])
  return _geometric("affine", image, matrix, fill, interpolation)


# Name -> op, as timm's NAME_TO_OP. 'Increasing' variants share the op and differ only in
# how the magnitude maps to the argument.
OPS = {
    "AutoContrast": auto_contrast,
    "Equalize": equalize,
    "Invert": invert,
    "Rotate": rotate,
    "Posterize": posterize,
    "PosterizeIncreasing": posterize,
    "Solarize": solarize,
    "SolarizeIncreasing": solarize,
    "SolarizeAdd": solarize_add,
    "Color": color,
    "ColorIncreasing": color,
    "Contrast": contrast,
    "ContrastIncreasing": contrast,
    "Brightness": brightness,
    "BrightnessIncreasing": brightness,
    "Sharpness": sharpness,
    "SharpnessIncreasing": sharpness,
    "ShearX": shear_x,
    "ShearY": shear_y,
    "TranslateXRel": translate_x_rel,
    "TranslateYRel": translate_y_rel,
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
  level = _as_float64(level)  # timm maps levels in Python floats
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
# Resize: PIL's `Image.resize` (convolution with a support scaled by the downscale factor).
# ------------------------------------------------------------------------------------------


def _bicubic_filter(x, zero):
  """PIL's bicubic kernel (a = -0.5), in float64 with PIL's rounding (`_mul`)."""
  a = -0.5
  x = tf.abs(x)
  near = _mul((_mul(a + 2., x, zero) - (a + 3.)) * x, x, zero) + 1.
  far = _mul(_mul(_mul(x - 5., x, zero) + 8., x, zero) - 4., a, zero)
  return tf.where(x < 1., near, tf.where(x < 2., far, 0.))


def _bilinear_filter(x, unused_zero):
  return tf.maximum(1. - tf.abs(x), 0.)


# interpolation -> (support at scale 1, kernel), as PIL's Resample.c.
_RESIZE_FILTERS = {"bicubic": (2., _bicubic_filter), "bilinear": (1., _bilinear_filter)}
# Outputs per weight block: each block of outputs reads one contiguous window of inputs, so a
# resize pass is one batched matmul of [blocks, _RESIZE_BLOCK, window] weights.
_RESIZE_BLOCK = 8
# The transposed pass runs on rows padded to a multiple of this, so the matmul shapes repeat
# from image to image (oneDNN caches one kernel per shape).
_RESIZE_ROW_ALIGN = 16
# Static window sizes the weight kernel is compiled for (the smallest that fits is used, then
# sliced to the real window): 32 covers downscales up to ~2.4x, 128 up to ~10x; larger ones
# run the same kernel op by op. Few of them: every new tf.data iterator instantiates each
# compiled one (~15 ms apiece).
_RESIZE_WINDOW_CAPS = (32, 128)


def _resize_weights_kernel(params, num_outputs, window_cap, interpolation):
  """PIL's resampling weights for both axes at once, grouped in blocks of outputs.

  params: int32 [5, 2], per axis: input size, output size, first output, output count,
  flip. For axis a, outputs first + j (j < count <= num_outputs) of a resize from input size
  to output size (in reverse order when flipped). PIL (precompute_coeffs and
  normalize_coeffs_8bpc): output o reads inputs [xmin, xmax) around center = (o + 0.5) *
  scale with weights kernel((x - center + 0.5) / max(scale, 1)), normalized to sum 1, then
  rounded to 22-bit fixed point; we keep those fixed-point values (exact in float32).

  Returns float32 weights [2, blocks, _RESIZE_BLOCK, window_cap], int32 input rows
  [2, blocks, window_cap] (block b's contiguous window, clamped inside the input) and the
  window actually needed (the rest has zero weights). window_cap=None: the window itself
  (a dynamic shape, for running op by op).
  """
  support, kernel = _RESIZE_FILTERS[interpolation]
  block = _RESIZE_BLOCK
  num_blocks = -(-num_outputs // block)
  zero = tf.cast(params[0, 0] // (params[0, 0] + 1), tf.float64)  # opaque 0 (see `_mul`)
  in_sizes, out_sizes, starts, counts, flip = (params[i][:, None] for i in range(5))
  scale = tf.cast(in_sizes, tf.float64) / tf.cast(out_sizes, tf.float64)
  filterscale = tf.maximum(scale, 1.)
  support = support * filterscale
  j = tf.range(num_blocks * block)[None, :]
  out = starts + tf.where(flip > 0, counts - 1 - j, j)
  center = _mul(tf.cast(out, tf.float64) + 0.5, scale, zero)  # [2, n]
  # PIL rounds the bounds with a C cast (truncation toward zero), then clips.
  xmin = tf.maximum(tf.cast(center - support + 0.5, tf.int32), 0)
  xmax = tf.minimum(tf.cast(center + support + 0.5, tf.int32), in_sizes)
  xmin, xmax, center = (tf.reshape(v, [2, num_blocks, block, 1]) for v in (xmin, xmax, center))
  # Outputs past the count (padding of the last block) may be empty (xmin >= xmax): they get
  # zero weights and are sliced off by the caller.
  lo = tf.reduce_min(xmin, axis=2, keepdims=True)  # [2, blocks, 1, 1]
  window = tf.maximum(tf.reduce_max(tf.reduce_max(xmax, axis=2, keepdims=True) - lo), 1)
  first = tf.maximum(tf.minimum(lo, in_sizes[:, :, None, None] - window), 0)
  x = first + tf.range(window if window_cap is None else window_cap)  # [2, blocks, 1, cap]
  taps = _mul(tf.cast(x, tf.float64) - center + 0.5, (1. / filterscale)[:, :, None, None], zero)
  weights = tf.where((x >= xmin) & (x < xmax), kernel(taps, zero), 0.)
  weights = tf.math.divide_no_nan(weights, tf.reduce_sum(weights, axis=3, keepdims=True))
  # PIL's 8-bit path rounds each weight to a multiple of 2^-22, half away from zero.
  fixed = tf.sign(weights) * tf.floor(tf.abs(weights) * 2.**22 + 0.5) * 2.**-22
  rows = tf.minimum(x[:, :, 0], in_sizes[:, :, None] - 1)  # [2, blocks, window_cap]
  return tf.cast(fixed, tf.float32), rows, window


@functools.lru_cache(maxsize=None)
def _compiled_resize_weights(num_outputs, window_cap, interpolation):
  return tf.function(
      lambda params: _resize_weights_kernel(params, num_outputs, window_cap, interpolation),
      jit_compile=True, autograph=False)


def _resize_weights(in_sizes, out_sizes, starts, counts, flip, num_outputs, interpolation):
  """`_resize_weights_kernel`, XLA-compiled for the smallest window cap that fits (its few
  dozen small ops, run op by op, would cost as much as the matmuls), sliced to the window."""
  params = tf.stack([in_sizes, out_sizes, starts, counts, tf.cast(flip, tf.int32)])
  # A block of outputs spans block * scale inputs plus the kernel's support on both sides.
  scale = tf.reduce_max(tf.cast(in_sizes, tf.float64) / tf.cast(out_sizes, tf.float64))
  support = _RESIZE_FILTERS[interpolation][0] * tf.maximum(scale, 1.)
  bound = tf.cast(tf.math.ceil(_RESIZE_BLOCK * scale + 2. * support), tf.int32) + 3

  def weights_for(caps):
    if not caps:  # past the compiled caps: the same kernel, op by op
      return lambda: _resize_weights_kernel(params, num_outputs, None, interpolation)
    compiled = _compiled_resize_weights(num_outputs, caps[0], interpolation)
    # Nested conds, not one switch: a branch is only instantiated once it runs.
    return lambda: tf.cond(bound <= caps[0], lambda: compiled(params), weights_for(caps[1:]))

  weights, rows, window = weights_for(_RESIZE_WINDOW_CAPS)()
  return weights[..., :window], rows[..., :window]


def _resize_pass(rows, weights, input_rows, count):
  """One separable pass over the rows of `rows` [n, m] (integer levels, float32): [count, m]
  float32 levels, rounded half up and clipped like PIL's fixed-point store."""
  gathered = tf.gather(rows, input_rows)  # [blocks, window, m]
  out = tf.reshape(tf.matmul(weights, gathered), [-1, tf.shape(rows)[1]])[:count]
  return tf.clip_by_value(tf.floor(out + 0.5), 0., 255.)


def _static_size(values, name):
  static = tf.get_static_value(values)
  if static is None:
    raise ValueError(f"resize: the {name} of the computed output must be known when the graph "
                     "is built (Python ints); give a window of static size to resize to a "
                     "data-dependent size (as eval_transform does).")
  return int(static[0]), int(static[1])


def resize(image, size, interpolation="bicubic", window=None, flip=False):
  """PIL `Image.resize((size[1], size[0]), BICUBIC | BILINEAR)` of a uint8 [h, w, 3] image.

  The antialiased resize PIL (and so torchvision and timm) runs: horizontal pass, rounded to
  uint8, then vertical pass, each output a normalized kernel over inputs within
  support * max(scale, 1). Each pass is a batched matmul over blocks of outputs.

  size: (height, width); Python ints, or tensors when a window is given.
  window: (top, left, height, width) of the resized image to compute (a center crop, say),
    height and width Python ints: only those outputs are computed, the same values as
    cropping the full resize.
  flip: mirror the result left-right (the same as flipping after the resize, at no cost).

  Matches PIL's fixed-point result except for a rare +-1 where float32 accumulation and
  PIL's integer sum round a value sitting on a half level differently (~1e-4 of values).
  """
  image = tf.convert_to_tensor(image)
  if window is None:
    out_h, out_w = _static_size(size, "size")
    top, left = 0, 0
  else:
    top, left = window[:2]
    out_h, out_w = _static_size(window[2:], "window's height and width")
  size = tf.cast(size, tf.int32)
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  weights, input_rows = _resize_weights(
      tf.stack([w, h]), tf.stack([size[1], size[0]]), tf.stack([left, top]),
      tf.constant([out_w, out_h]), tf.stack([tf.convert_to_tensor(flip), False]),
      max(out_h, out_w), interpolation)
  # Horizontal pass on the transposed image: [x, (c, y)] rows, so it is a row resample.
  padded_h = (h + _RESIZE_ROW_ALIGN - 1) // _RESIZE_ROW_ALIGN * _RESIZE_ROW_ALIGN
  rows = tf.gather(image, tf.minimum(tf.range(padded_h), h - 1))  # extra rows never read
  columns = tf.reshape(tf.transpose(tf.reshape(rows, [padded_h, 3 * w])), [w, 3 * padded_h])
  columns = _resize_pass(tf.cast(columns, tf.float32), weights[0], input_rows[0], out_w)
  # Vertical pass on [y, (x', c)] rows (a float32 transpose is faster than a uint8 one).
  rows = tf.transpose(tf.reshape(columns, [3 * out_w, padded_h]))
  rows = _resize_pass(rows, weights[1], input_rows[1], out_h)
  return tf.reshape(tf.cast(rows, tf.uint8), [out_h, out_w, 3])


# ------------------------------------------------------------------------------------------
# RandomResizedCrop, flip, color jitter, ThreeAugment, normalize, RandomErasing, eval.
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
  return resize(crop, [size, size], interpolation)


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
  window = resize(image, tf.stack([new_h, new_w]), interpolation,
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
  resize instead, see `resize(flip=...)`)."""
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
  enhance = (brightness, contrast, color)  # torchvision: saturation = ImageEnhance.Color
  for position in range(3):
    op_index = order[position]
    factor = tf.gather(factors, op_index)
    current = image
    image = tf.switch_case(op_index, [
        (lambda fn=fn, current=current: fn(current, factor)) for fn in enhance])
  return image


def gaussian_blur(image, sigma, max_sigma=2.0):
  """Separable Gaussian blur, edges replicated, rounded to uint8 (ThreeAugment's blur)."""
  radius = int(math.ceil(3 * max_sigma))
  taps = tf.range(-radius, radius + 1, dtype=tf.float32)
  sigma = tf.cast(sigma, tf.float32)
  weights = tf.exp(-0.5 * tf.square(taps / sigma))
  weights /= tf.reduce_sum(weights)
  x = tf.cast(image, tf.float32)
  for axis in (0, 1):
    n = tf.shape(x)[axis]
    index = tf.clip_by_value(tf.range(n)[:, None] + tf.range(-radius, radius + 1)[None, :],
                             0, n - 1)  # [n, taps], clamped = edge replication
    gathered = tf.gather(x, index, axis=axis)  # axis 0: [n, T, W, 3]; axis 1: [H, n, T, 3]
    x = tf.tensordot(gathered, weights, axes=[[axis + 1], [0]])
  return _round_to_uint8(x)


def three_augment(image, seed):
  """DeiT III: one of grayscale, solarize (threshold 128), Gaussian blur (radius uniform in
  [0.1, 2]), chosen uniformly."""
  return _three_augment(image, _uniforms(seed, _THREE_AUGMENT_DRAWS))


def _three_augment(image, u):
  """`three_augment` with its draws `u` [_THREE_AUGMENT_DRAWS] given."""
  image = tf.convert_to_tensor(image)
  choice = _randint(u[0], 0, 3)
  sigma = _uniform(u[1], 0.1, 2.0)
  gray = lambda: tf.tile(tf.cast(_grayscale(image), tf.uint8)[..., None], [1, 1, 3])
  return tf.switch_case(choice, [gray, lambda: solarize(image, 128),
                                 lambda: gaussian_blur(image, sigma)])


def _normalize_kernel(image, unused_arg, mean, std):
  # True divisions, as torch: XLA would turn a division by a constant into a multiplication
  # by its reciprocal (a different rounding), so the divisors go through an opaque zero.
  zero = _opaque_zero(image, tf.float32)
  scaled = tf.cast(image, tf.float32) / (255. + zero)
  return (scaled - np.asarray(mean, np.float32)) / (np.asarray(std, np.float32) + zero)


def normalize(image, mean=IMAGENET_MEAN, std=IMAGENET_STD):
  """ToTensor (/255) then Normalize, channels last: uint8 [H, W, 3] -> float32, with torch's
  float32 arithmetic ((v / 255 - mean) / std), bit for bit."""
  return _run(_normalize_kernel, image, 0., tuple(mean), tuple(std))


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
    image = resize(crop, [size, size], cfg.interpolation, flip=flip)
  jitter = cfg.color_jitter is not None and cfg.color_jitter > 0
  if cfg.three_augment:
    # Official DeiT III replaces the whole timm transform: no RandAugment, no erasing.
    image = _three_augment(image, draws["three_augment"])
    if jitter:
      image = _color_jitter(image, draws["color_jitter"], float(cfg.color_jitter))
    return normalize(image, mean, std)
  if cfg.auto_augment:
    image = _rand_augment(image, draws["rand_augment"], parse_rand_augment(cfg.auto_augment),
                          fill_value(mean), cfg.interpolation)
  elif jitter:  # timm disables color jitter while RandAugment is on
    image = _color_jitter(image, draws["color_jitter"], float(cfg.color_jitter))
  image = normalize(image, mean, std)
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
  cropped = resize(image, tf.stack([new_h, new_w]), cfg.interpolation,
                   window=(top, left, size, size))
  return normalize(cropped, tuple(cfg.mean), tuple(cfg.std))
