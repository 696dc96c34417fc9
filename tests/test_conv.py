"""deit_jax.conv: every implementation computes lax.conv_general_dilated, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deit_jax import conv, teachers


@pytest.mark.parametrize("k,stride,groups,cin,cout", [
    (1, 1, 1, 16, 24), (1, 2, 1, 16, 24), (1, 1, 4, 16, 8),
    (3, 1, 1, 8, 16), (3, 2, 1, 8, 16), (7, 2, 1, 3, 16),
    (3, 1, 2, 16, 16), (3, 2, 4, 16, 32), (3, 1, 8, 64, 64), (3, 2, 3, 24, 24)])
def test_dense_matches_lax(k, stride, groups, cin, cout):
  kx, kw = jax.random.split(jax.random.key(k * 100 + stride * 10 + groups))
  x = jax.random.normal(kx, (2, 9, 10, cin))
  w = jax.random.normal(kw, (k, k, cin // groups, cout)) * 0.2
  pad = ((stride - 1) + (k - 1)) // 2

  def f(impl):
    return lambda x, w: conv.conv2d(x, w, stride=stride, padding=pad, groups=groups, impl=impl)

  ref = jax.lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     feature_group_count=groups)
  loss = lambda impl: jax.grad(lambda x, w: jnp.sum(jnp.sin(f(impl)(x, w))), argnums=(0, 1))
  want = jax.jit(loss("xla"))(x, w)
  np.testing.assert_allclose(jax.jit(f("xla"))(x, w), ref, rtol=1e-5, atol=1e-5)
  for impl in ("dense", "taps"):
    np.testing.assert_allclose(jax.jit(f(impl))(x, w), ref, rtol=1e-5, atol=1e-5)
    for got, w_ in zip(jax.jit(loss(impl))(x, w), want):
      np.testing.assert_allclose(got, w_, rtol=1e-4, atol=1e-4)


def test_conv_module_matches_nnx_conv():
  """Same variables, same init order and the same output as nnx.Conv."""
  ours = conv.Conv(6, 12, 3, stride=2, padding=1, groups=3, use_bias=True, rngs=nnx.Rngs(0))
  ref = nnx.Conv(6, 12, (3, 3), strides=2, padding=((1, 1), (1, 1)), feature_group_count=3,
                 rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(ours.kernel[...], ref.kernel[...])
  np.testing.assert_array_equal(ours.bias[...], ref.bias[...])
  assert set(nnx.to_pure_dict(nnx.state(ours))) == set(nnx.to_pure_dict(nnx.state(ref)))
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 6))
  np.testing.assert_allclose(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_teacher_impls_agree_and_default_per_platform():
  assert conv.default_impl() == "dense"  # the tests run on the CPU
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  outs = {impl: teachers.create_teacher("regnety_002", num_classes=10, conv_impl=impl)(x)
          for impl in conv.IMPLS}
  np.testing.assert_allclose(outs["dense"], outs["xla"], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(outs["taps"], outs["xla"], rtol=1e-4, atol=1e-4)
  model = teachers.create_teacher("regnety_002", num_classes=10, conv_impl="xla")
  assert model.s1.b1.conv2.conv.conv_impl == "xla"
  conv.set_conv_impl(model, None)
  assert model.s1.b1.conv2.conv.conv_impl is None


def test_bad_impl_is_named():
  with pytest.raises(ValueError, match="conv_impl='cudnn'.*'xla', 'dense', 'taps'"):
    teachers.create_teacher("resnet18", conv_impl="cudnn")
