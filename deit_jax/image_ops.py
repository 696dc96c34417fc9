"""PIL-exact image kernels in TensorFlow: the image -> image functions of the DeiT transforms.

Every function here is deterministic: it takes a uint8 [H, W, 3] image (and the op's
argument, already chosen) and returns an image; which kernel runs, with which argument and
on which random draw, is decided by the policy in `deit_jax.augment`. Held here:
  * the 15 RandAugment ops (auto_contrast, equalize, invert, posterize, solarize,
    solarize_add, color, contrast, brightness, sharpness, rotate, shear_x/y,
    translate_x/y_rel), with PIL's exact bytes: uint8 LUT arithmetic, `Image.blend`'s float32
    rounding, `ImageFilter.SMOOTH`, `Image.transform`'s bicubic with a = -1 in double, its
    clamping and fill rule, and `ImageOps.equalize`/`autocontrast` tables;
  * `resize`, PIL's `Image.resize`: horizontal then vertical pass, each output a kernel with
    support scaled by the downscale factor, PIL's 22-bit fixed-point weights, rounding to
    uint8 between the passes. Bicubic matches PIL except a rare +-1 (a few in 1e5 values)
    where the float32 sum and PIL's integer sum round a value on a half level apart;
    bilinear's simple weights hit half levels more often (up to a few % of values +-1);
  * `grayscale`, `gaussian_blur` (ThreeAugment), and `normalize`: torch's float32
    (v / 255 - mean) / std, bit for bit.
(All checked against PIL / torch in tests/test_augment.py.)
Documented differences:
  * `gaussian_blur` is a true Gaussian (sigma = radius); PIL approximates it with three box
    blurs.
  * posterize to 0 bits gives black (Pillow of DeiT's time); Pillow >= 10 raises instead.

Speed (one CPU core, see benchmarks/input_throughput.py): the RandAugment ops, normalize
and the resize weights run as small XLA-compiled kernels (compiled once per shape, cached),
because dozens of small TF ops would cost more than the work; XLA's CPU backend fuses a
multiply feeding an add into an FMA, which would change PIL's rounding, so products that PIL
rounds pass through `_mul`. The resize itself, whose input size changes with every crop, is
two batched matmuls over blocks of outputs.

TensorFlow is imported on first use (`deit_jax.lazy_tf`), not when this module is imported.
"""
import functools
import math

import numpy as np

from deit_jax.lazy_tf import tf  # imported on first use

# torchvision's ImageNet statistics: `normalize`'s defaults and the augmentation config's.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
# from the magnitude, see `augment.LEVEL_TO_ARG`) and returns a uint8 [H, W, 3] image, like
# timm's ops.
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
  return _compiled(kernel, *static_args)(tf.convert_to_tensor(image), as_float64(arg))


def as_float64(x):
  """float64 tensor of `x`; Python numbers go straight to float64 (not via float32). The
  kernels take their arguments in float64, as timm computes them in Python floats."""
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
  arg = as_float64(arg)
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
  pixels = as_float64(pct) * tf.cast(tf.shape(image)[1], tf.float64)
  return _geometric("translate_x", image, pixels, fill, interpolation)


def translate_y_rel(image, pct, fill=(128, 128, 128), interpolation="bicubic"):
  """timm `translate_y_rel`: output (x, y) <- input (x, y + pct * height)."""
  pixels = as_float64(pct) * tf.cast(tf.shape(image)[0], tf.float64)
  return _geometric("translate_y", image, pixels, fill, interpolation)


def _rotate_matrix(degrees, h, w):
  """PIL `Image.rotate`'s inverse AFFINE matrix, computed like its Python code (float64)."""
  angle = -(tf.math.floormod(as_float64(degrees), 360.) * (math.pi / 180.))
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
# ThreeAugment's grayscale and blur; ToTensor + Normalize.
# ------------------------------------------------------------------------------------------


def grayscale(image):
  """PIL `convert('L')` as a 3-channel uint8 image (ThreeAugment's grayscale)."""
  return tf.tile(tf.cast(_grayscale(image), tf.uint8)[..., None], [1, 1, 3])


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

