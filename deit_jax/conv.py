"""2-D convolutions for the CNN teachers, in the form each backend runs fast.

`conv2d(x, kernel, stride, padding, groups, impl)` computes exactly what
`lax.conv_general_dilated` computes (NHWC input, HWIO kernel, symmetric padding, feature groups),
by one of three implementations:

- `'xla'`: `lax.conv_general_dilated` itself. On GPU this is cuDNN, the fastest there.
- `'dense'`: only dense kernels, which XLA's CPU backend runs near its matmul peak in both
  directions: a 1x1 convolution is one `dot_general` on the (strided) input, and a grouped
  convolution is split into one dense convolution per group (concatenated). XLA's CPU backend
  runs a grouped 3x3 convolution (8 to 112 channels per group, as in RegNetY) at 3-10 GFLOP/s
  forward and under 1-5 backward, and 1x1 convolutions backward at 6-11 GFLOP/s, on the 2-core
  development machine; these forms run at 15-130 forward and 10-75 forward+backward (the
  machine's fp32 matmul peak is ~165). `benchmarks/speed.py` measures whole models.
- `'taps'`: `'dense'`, except that a grouped k x k convolution is one batched matmul over the
  groups of its k*k shifted input windows (stacked, [..., k*k, groups, in/group]). One program
  op per convolution instead of one per group: a RegNetY-200MF forward + backward (~400 grouped
  convolutions of 8 channels per group, forward; batch 64 at 32 px, jitted `value_and_grad` of
  the eval-mode model on the development CPU) compiles in ~6 s instead of ~35 s and runs at ~2/3
  of `'dense'`'s speed (~1,000 vs ~1,600 img/s). The right choice where compiling dominates (the
  demo's short runs).

`impl=None` picks per platform: `'dense'` on CPU, `'xla'` elsewhere. Every implementation is
the same function of its inputs (to float32 round-off; tested against `lax`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx


def default_impl() -> str:
  return "dense" if jax.default_backend() == "cpu" else "xla"


def check_impl(impl: str | None) -> None:
  if impl not in (None, "") + IMPLS:
    raise ValueError(f"conv_impl={impl!r}: use {', '.join(map(repr, IMPLS))} or None / '' (per "
                     "platform: 'dense' on CPU, 'xla' on GPU/TPU).")


def _xla(x, kernel, stride, padding, groups):
  return jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), ((padding, padding), (padding, padding)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


def _taps(x, kernel, stride, padding, groups):
  k, _, cg, out = kernel.shape
  if k == 1 or groups == 1:
    return _dense(x, kernel, stride, padding, groups)
  b, h, w, _ = x.shape
  ho, wo = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  windows = jnp.stack([xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
                       for i in range(k) for j in range(k)], axis=3)
  y = jnp.einsum("bhwtgc,tcgo->bhwgo", windows.reshape(b, ho, wo, k * k, groups, cg),
                 kernel.reshape(k * k, cg, groups, out // groups))
  return y.reshape(b, ho, wo, out)


def _dense(x, kernel, stride, padding, groups):
  k, _, cg, out = kernel.shape
  if k == 1 and padding == 0:
    xs = x[:, ::stride, ::stride] if stride > 1 else x
    if groups == 1:
      return jnp.einsum("bhwc,co->bhwo", xs, kernel[0, 0])
    b, h, w, _ = xs.shape
    y = jnp.einsum("bhwgc,cgo->bhwgo", xs.reshape(b, h, w, groups, cg),
                   kernel[0, 0].reshape(cg, groups, out // groups))
    return y.reshape(b, h, w, out)
  if groups == 1:
    return _xla(x, kernel, stride, padding, 1)
  og = out // groups
  return jnp.concatenate(
      [_xla(x[..., g * cg:(g + 1) * cg], kernel[..., g * og:(g + 1) * og], stride, padding, 1)
       for g in range(groups)], axis=-1)


_FORMS = {"xla": _xla, "dense": _dense, "taps": _taps}
IMPLS = tuple(_FORMS)


def conv2d(x, kernel, *, stride: int = 1, padding: int = 0, groups: int = 1,
           impl: str | None = None):
  """NHWC x HWIO convolution with symmetric `padding`; see the module docstring for `impl`."""
  impl = impl or default_impl()
  check_impl(impl)
  return _FORMS[impl](x, kernel, stride, padding, groups)


class Conv(nnx.Module):
  """A square 2-D convolution with nnx.Conv's variables (`kernel` HWIO, optional `bias`), the
  same initialisation order, and a selectable implementation (`conv_impl`, see `conv2d`).

  Compute runs in `dtype` (inputs and kernel cast to it); parameters are float32."""

  def __init__(self, in_ch: int, out_ch: int, kernel: int, *, stride: int = 1, padding: int = 0,
               groups: int = 1, use_bias: bool = True, dtype=None,
               kernel_init: Callable = nnx.initializers.lecun_normal(),
               bias_init: Callable = nnx.initializers.zeros, conv_impl: str | None = None,
               rngs: nnx.Rngs):
    check_impl(conv_impl)
    if in_ch % groups or out_ch % groups:
      raise ValueError(f"Conv: channels {in_ch} -> {out_ch} are not divisible by {groups} groups.")
    self.kernel = nnx.Param(kernel_init(rngs.params(), (kernel, kernel, in_ch // groups, out_ch),
                                        jnp.float32))
    self.bias = (nnx.Param(bias_init(rngs.params(), (out_ch,), jnp.float32)) if use_bias
                 else nnx.data(None))
    self.stride, self.padding, self.groups = stride, padding, groups
    self.dtype = dtype
    self.conv_impl = conv_impl or None

  def __call__(self, x):
    dtype = self.dtype or jnp.result_type(x, self.kernel[...])
    y = conv2d(x.astype(dtype), self.kernel[...].astype(dtype), stride=self.stride,
               padding=self.padding, groups=self.groups, impl=self.conv_impl)
    if self.bias is not None:
      y = y + self.bias[...].astype(dtype)
    return y


def set_conv_impl(model: nnx.Module, impl: str | None) -> nnx.Module:
  """Sets the implementation of every `Conv` in `model` (in place; returns it)."""
  check_impl(impl)
  for _, module in nnx.iter_graph(model):
    if isinstance(module, Conv):
      module.conv_impl = impl or None
  return model
