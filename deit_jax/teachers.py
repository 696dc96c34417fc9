"""CNN teachers for distillation: timm's RegNetY and ResNet in Flax NNX, loadable from PyTorch.

DeiT distills from a RegNetY-16GF (`regnety_160`, 83,590,140 parameters) trained with timm. The
modules here reproduce timm's `RegNet` and `ResNet` layer for layer, so a timm (or official DeiT)
state dict loads with `load_torch_state_dict` and gives the same logits (to float32 round-off).

  model = create_teacher("regnety_160")     # random init (timm's), eval mode: BN running stats
  model = abstract_teacher("regnety_160")   # or shapes only, faster when weights follow
  load_torch_state_dict(model, "regnety_160", state_dict)
  logits = model(images_nhwc)                # [B, num_classes], float32

Layout is NHWC. Convolutions run as matrix products on CPU and through XLA's (cuDNN's) kernels
elsewhere (`conv_impl`, see `deit_jax.conv`). Parameters are float32; `dtype` sets the compute
dtype of convolutions and the classifier (bfloat16 for speed). BatchNorm, pooling and the SE gate compute in float32: with
BatchNorm in bfloat16 too, the logits of a random-weight regnety_160 moved 11% (relative L2) from
PyTorch's float32 ones instead of 7%.

A teacher runs in eval mode (`model.eval()`, what `create_teacher` returns). In train mode
(`model.train()`) BatchNorm normalises with batch statistics and updates its running averages
with PyTorch's momentum (0.1, i.e. flax momentum 0.9) and eps (1e-5). One deliberate difference
from PyTorch: flax updates the running variance with the biased batch variance, PyTorch with the
unbiased one (a factor n/(n-1), n = batch x height x width: 1.0003 at 7x7 with batch 64).
Stochastic depth and dropout are not implemented (timm's defaults for these models are 0).

Module attribute names mirror timm's, so a parameter's NNX path joined with dots is its PyTorch
key (`s1.b1.conv2.conv.kernel` <-> `s1.b1.conv2.conv.weight`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deit_jax import conv
from deit_jax.outputs import SingleHead

# PyTorch BatchNorm2d defaults. Flax's momentum weighs the old running value, PyTorch's the new one.
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------

def _conv_init(groups: int = 1) -> Callable:
  """timm's conv init: N(0, sqrt(2 / fan_out)), fan_out = k*k*out_channels // groups."""
  def init(key, shape, dtype=jnp.float32):
    kh, kw, _, out_ch = shape
    return jax.random.normal(key, shape, dtype) * math.sqrt(2.0 / (kh * kw * out_ch // groups))
  return init


def _torch_linear_init(fan_in: int) -> Callable:
  """PyTorch's default nn.Linear init for weight and bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def _conv(in_ch: int, out_ch: int, kernel: int, *, stride: int = 1, groups: int = 1,
          use_bias: bool = False, dtype: Any, rngs: nnx.Rngs) -> conv.Conv:
  # PyTorch pads symmetrically, ((stride - 1) + (kernel - 1)) // 2 per side (timm's get_padding).
  # 'SAME' would pad (0, 1) for a stride-2 3x3 conv on an even input and shift every feature map.
  pad = ((stride - 1) + (kernel - 1)) // 2
  return conv.Conv(in_ch, out_ch, kernel, stride=stride, padding=pad, groups=groups,
                   use_bias=use_bias, dtype=dtype, kernel_init=_conv_init(groups), rngs=rngs)


def _batch_norm(ch: int, *, zero_scale: bool = False, rngs: nnx.Rngs) -> nnx.BatchNorm:
  # `zero_scale`: timm's zero_init_last, the residual branch starts as the identity.
  return nnx.BatchNorm(ch, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=jnp.float32,
                       param_dtype=jnp.float32, use_fast_variance=False,
                       scale_init=nnx.initializers.zeros if zero_scale else nnx.initializers.ones,
                       rngs=rngs)


class ConvBN(nnx.Module):
  """Conv (no bias) + BatchNorm, then ReLU if `act`: timm's ConvNormAct (keys `conv.*`, `bn.*`)."""

  def __init__(self, in_ch: int, out_ch: int, kernel: int, *, stride: int = 1, groups: int = 1,
               act: bool = True, zero_scale: bool = False, dtype: Any, rngs: nnx.Rngs):
    self.conv = _conv(in_ch, out_ch, kernel, stride=stride, groups=groups, dtype=dtype, rngs=rngs)
    self.bn = _batch_norm(out_ch, zero_scale=zero_scale, rngs=rngs)
    self.act = act

  def __call__(self, x):
    x = self.bn(self.conv(x))
    return nnx.relu(x) if self.act else x


def _compute_dtype(dtype) -> jnp.dtype:
  dtype = jnp.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"Teacher compute dtype must be floating (float32, bfloat16), got {dtype}.")
  return dtype


def _check_input(x, in_chans: int):
  if x.ndim != 4 or x.shape[-1] != in_chans:
    raise ValueError(
        f"Teacher input must be NHWC images with {in_chans} channels, got shape {x.shape}. "
        "Transpose NCHW batches with x.transpose(0, 2, 3, 1).")


def _global_avg_pool(x):
  # Average in float32 whatever the compute dtype.
  return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


# ---------------------------------------------------------------------------------------------
# RegNet (timm/models/regnet.py), the Y variant: Bottleneck blocks with group conv and SE
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RegNetCfg:
  """timm's RegNetCfg (the fields the X/Y models use). Per-block widths come from the linear
  parametrisation w_j = w0 + wa * j, quantised in log space with base wm (`regnet_stages`)."""
  depth: int
  w0: int
  wa: float
  wm: float
  group_size: int
  se_ratio: float = 0.0
  bottle_ratio: float = 1.0
  stem_width: int = 32


@dataclasses.dataclass(frozen=True)
class RegStageSpec:
  width: int
  depth: int
  group_size: int
  stride: int
  bottle_ratio: float


def _generate_regnet(wa: float, w0: int, wm: float, depth: int, quant: int = 8) -> list[int]:
  """Per-block widths, timm's `generate_regnet`, in float32 as timm computes it (in torch)."""
  if not (wa >= 0 and w0 > 0 and wm > 1 and w0 % quant == 0):
    raise ValueError(f"Invalid RegNet parameters wa={wa}, w0={w0}, wm={wm}: need wa >= 0, w0 > 0, "
                     f"wm > 1 and w0 a multiple of {quant}.")
  f32 = np.float32
  widths_cont = np.arange(depth, dtype=f32) * f32(wa) + f32(w0)
  width_exps = np.round(np.log(widths_cont / f32(w0)) / f32(math.log(wm)))
  widths = np.round(f32(w0) * np.power(f32(wm), width_exps) / f32(quant)) * f32(quant)
  return [int(w) for w in widths]


def regnet_stages(cfg: RegNetCfg) -> list[RegStageSpec]:
  """Stage widths/depths/group sizes exactly as timm's RegNet._get_stage_args (output stride 32)."""
  widths = _generate_regnet(cfg.wa, cfg.w0, cfg.wm, cfg.depth)
  stage_widths, stage_depths = np.unique(np.asarray(widths), return_counts=True)
  if len(stage_widths) != 4:
    raise ValueError(f"RegNet config {cfg} gives {len(stage_widths)} stages (widths {widths}); "
                     "timm's RegNet needs exactly 4: change depth, wa or wm.")
  stages = []
  for width, depth in zip(stage_widths.tolist(), stage_depths.tolist()):
    # timm's adjust_widths_groups_comp (group_min_ratio=0): the bottleneck width becomes a
    # multiple of the group size, which is capped at the bottleneck width.
    bottleneck = int(width * cfg.bottle_ratio)
    group_size = min(cfg.group_size, bottleneck)
    bottleneck = int(round(bottleneck / group_size) * group_size)
    width = int(bottleneck / cfg.bottle_ratio)
    stages.append(RegStageSpec(width, depth, group_size, 2, cfg.bottle_ratio))
  return stages


class SqueezeExcite(nnx.Module):
  """timm's SEModule: global mean, 1x1 conv, ReLU, 1x1 conv, sigmoid gate (keys fc1, fc2)."""

  def __init__(self, channels: int, rd_channels: int, *, dtype: Any, rngs: nnx.Rngs):
    self.fc1 = _conv(channels, rd_channels, 1, use_bias=True, dtype=dtype, rngs=rngs)
    self.fc2 = _conv(rd_channels, channels, 1, use_bias=True, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    s = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True)
    s = self.fc2(nnx.relu(self.fc1(s)))
    return x * nnx.sigmoid(s.astype(jnp.float32)).astype(x.dtype)


class RegBottleneck(nnx.Module):
  """RegNet block: 1x1 -> 3x3 group conv (stride) -> SE -> 1x1, plus the shortcut, then ReLU.

  Unlike the ResNet bottleneck, SE sits after the 3x3 conv and its width is
  round(se_ratio * in_chs) of the BLOCK INPUT, not of the bottleneck (timm and pycls)."""

  def __init__(self, in_ch: int, out_ch: int, *, stride: int, bottle_ratio: float, group_size: int,
               se_ratio: float, dtype: Any, rngs: nnx.Rngs):
    bottleneck = int(round(out_ch * bottle_ratio))
    groups = bottleneck // group_size
    self.conv1 = ConvBN(in_ch, bottleneck, 1, dtype=dtype, rngs=rngs)
    self.conv2 = ConvBN(bottleneck, bottleneck, 3, stride=stride, groups=groups, dtype=dtype,
                        rngs=rngs)
    self.se = (SqueezeExcite(bottleneck, int(round(in_ch * se_ratio)), dtype=dtype, rngs=rngs)
               if se_ratio else None)
    self.conv3 = ConvBN(bottleneck, out_ch, 1, act=False, zero_scale=True, dtype=dtype, rngs=rngs)
    self.downsample = (ConvBN(in_ch, out_ch, 1, stride=stride, act=False, dtype=dtype, rngs=rngs)
                       if in_ch != out_ch or stride != 1 else None)

  def __call__(self, x):
    shortcut = x if self.downsample is None else self.downsample(x)
    x = self.conv2(self.conv1(x))
    if self.se is not None:
      x = self.se(x)
    x = self.conv3(x)
    return nnx.relu(x + shortcut)


class RegStage(nnx.Module):
  """Blocks named b1..bN (timm's keys); the first one changes width and stride."""

  def __init__(self, in_ch: int, spec: RegStageSpec, *, se_ratio: float, dtype: Any,
               rngs: nnx.Rngs):
    self.block_names = tuple(f"b{i + 1}" for i in range(spec.depth))
    for i, name in enumerate(self.block_names):
      setattr(self, name, RegBottleneck(
          in_ch if i == 0 else spec.width, spec.width, stride=spec.stride if i == 0 else 1,
          bottle_ratio=spec.bottle_ratio, group_size=spec.group_size, se_ratio=se_ratio,
          dtype=dtype, rngs=rngs))

  def __call__(self, x):
    for name in self.block_names:
      x = getattr(self, name)(x)
    return x


class ClassifierHead(nnx.Module):
  """Global average pool + Linear (timm's ClassifierHead, key `head.fc`)."""

  def __init__(self, in_features: int, num_classes: int, *, dtype: Any, rngs: nnx.Rngs):
    self.fc = nnx.Linear(in_features, num_classes, dtype=dtype, param_dtype=jnp.float32,
                         kernel_init=nnx.initializers.normal(0.01),
                         bias_init=nnx.initializers.zeros, rngs=rngs)

  def __call__(self, x):
    return self.fc(_global_avg_pool(x)).astype(jnp.float32)


class RegNet(SingleHead, nnx.Module):
  """timm's RegNet (X when se_ratio=0, Y otherwise): stem 3x3/2 conv-BN-ReLU, four stages of
  RegBottleneck blocks (each stage halves the resolution), global average pool, Linear."""

  def __init__(self, cfg: RegNetCfg, num_classes: int = 1000, *, in_chans: int = 3,
               dtype: Any = jnp.float32, conv_impl: str | None = None, rngs: nnx.Rngs):
    dtype = _compute_dtype(dtype)
    self.cfg = cfg
    self.in_chans = in_chans
    self.num_classes = num_classes
    self.dtype = dtype
    self.stem = ConvBN(in_chans, cfg.stem_width, 3, stride=2, dtype=dtype, rngs=rngs)
    in_ch = cfg.stem_width
    for i, spec in enumerate(regnet_stages(cfg)):
      setattr(self, f"s{i + 1}", RegStage(in_ch, spec, se_ratio=cfg.se_ratio, dtype=dtype,
                                          rngs=rngs))
      in_ch = spec.width
    self.num_features = in_ch
    self.head = ClassifierHead(in_ch, num_classes, dtype=dtype, rngs=rngs)
    conv.set_conv_impl(self, conv_impl)

  def __call__(self, x):
    _check_input(x, self.in_chans)
    x = self.stem(x)
    x = self.s4(self.s3(self.s2(self.s1(x))))
    return self.head(x)


# ---------------------------------------------------------------------------------------------
# ResNet (timm/models/resnet.py): the v1.5 layout (stride in the 3x3 conv), torchvision's keys
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ResNetCfg:
  """timm's plain ResNet: 7x7/2 stem with 64 channels, 3x3/2 max pool, four stages of `block`
  ('basic': two 3x3 convs, expansion 1; 'bottleneck': 1x1-3x3-1x1, expansion 4)."""
  block: str
  layers: tuple[int, ...]
  channels: tuple[int, ...] = (64, 128, 256, 512)

  def __post_init__(self):
    if self.block not in ("basic", "bottleneck"):
      raise ValueError(f"ResNetCfg.block must be 'basic' or 'bottleneck', got {self.block!r}.")
    if len(self.layers) != len(self.channels):
      raise ValueError(f"ResNetCfg needs one channel count per stage: layers={self.layers}, "
                       f"channels={self.channels}.")

  @property
  def expansion(self) -> int:
    return 4 if self.block == "bottleneck" else 1


class BasicBlock(nnx.Module):
  """3x3 (stride) -> 3x3, plus the shortcut, then ReLU."""

  def __init__(self, in_ch: int, planes: int, *, stride: int, dtype: Any, rngs: nnx.Rngs):
    self.conv1 = _conv(in_ch, planes, 3, stride=stride, dtype=dtype, rngs=rngs)
    self.bn1 = _batch_norm(planes, rngs=rngs)
    self.conv2 = _conv(planes, planes, 3, dtype=dtype, rngs=rngs)
    self.bn2 = _batch_norm(planes, zero_scale=True, rngs=rngs)
    self.downsample = _resnet_downsample(in_ch, planes, stride, dtype, rngs)

  def __call__(self, x):
    shortcut = x if self.downsample is None else self.downsample[1](self.downsample[0](x))
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = self.bn2(self.conv2(x))
    return nnx.relu(x + shortcut)


class Bottleneck(nnx.Module):
  """1x1 -> 3x3 (stride, the v1.5 placement) -> 1x1 (x4 channels), plus the shortcut, then ReLU."""

  def __init__(self, in_ch: int, planes: int, *, stride: int, dtype: Any, rngs: nnx.Rngs):
    out_ch = planes * 4
    self.conv1 = _conv(in_ch, planes, 1, dtype=dtype, rngs=rngs)
    self.bn1 = _batch_norm(planes, rngs=rngs)
    self.conv2 = _conv(planes, planes, 3, stride=stride, dtype=dtype, rngs=rngs)
    self.bn2 = _batch_norm(planes, rngs=rngs)
    self.conv3 = _conv(planes, out_ch, 1, dtype=dtype, rngs=rngs)
    self.bn3 = _batch_norm(out_ch, zero_scale=True, rngs=rngs)
    self.downsample = _resnet_downsample(in_ch, out_ch, stride, dtype, rngs)

  def __call__(self, x):
    shortcut = x if self.downsample is None else self.downsample[1](self.downsample[0](x))
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.relu(self.bn2(self.conv2(x)))
    x = self.bn3(self.conv3(x))
    return nnx.relu(x + shortcut)


def _resnet_downsample(in_ch, out_ch, stride, dtype, rngs) -> nnx.List | None:
  # A list, not a named module: PyTorch's nn.Sequential keys are `downsample.0.*`, `downsample.1.*`.
  if stride == 1 and in_ch == out_ch:
    return None
  return nnx.List([_conv(in_ch, out_ch, 1, stride=stride, dtype=dtype, rngs=rngs),
                   _batch_norm(out_ch, rngs=rngs)])


class ResNet(SingleHead, nnx.Module):
  """timm's ResNet (default stem, no SE, no anti-aliasing): keys conv1, bn1, layerN.i.*, fc."""

  def __init__(self, cfg: ResNetCfg, num_classes: int = 1000, *, in_chans: int = 3,
               dtype: Any = jnp.float32, conv_impl: str | None = None, rngs: nnx.Rngs):
    dtype = _compute_dtype(dtype)
    self.cfg = cfg
    self.in_chans = in_chans
    self.num_classes = num_classes
    self.dtype = dtype
    self.conv1 = _conv(in_chans, 64, 7, stride=2, dtype=dtype, rngs=rngs)
    self.bn1 = _batch_norm(64, rngs=rngs)
    block_cls = Bottleneck if cfg.block == "bottleneck" else BasicBlock
    in_ch = 64
    self.stage_names = tuple(f"layer{i + 1}" for i in range(len(cfg.layers)))
    for i, (name, planes, depth) in enumerate(zip(self.stage_names, cfg.channels, cfg.layers)):
      blocks = []
      for j in range(depth):
        blocks.append(block_cls(in_ch, planes, stride=2 if i > 0 and j == 0 else 1, dtype=dtype,
                                rngs=rngs))
        in_ch = planes * cfg.expansion
      setattr(self, name, nnx.List(blocks))
    self.num_features = in_ch
    self.fc = nnx.Linear(in_ch, num_classes, dtype=dtype, param_dtype=jnp.float32,
                         kernel_init=_torch_linear_init(in_ch), bias_init=_torch_linear_init(in_ch),
                         rngs=rngs)
    conv.set_conv_impl(self, conv_impl)

  def __call__(self, x):
    _check_input(x, self.in_chans)
    x = nnx.relu(self.bn1(self.conv1(x)))
    # PyTorch's MaxPool2d(3, 2, padding=1) pads with -inf, as flax's max_pool does.
    x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for name in self.stage_names:
      for block in getattr(self, name):
        x = block(x)
    return self.fc(_global_avg_pool(x)).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

# timm's model_cfgs for the pycls RegNetY models (the `_tv` torchvision variants round widths
# differently and are not included).
REGNET_CFGS: dict[str, RegNetCfg] = {
    "regnety_002": RegNetCfg(w0=24, wa=36.44, wm=2.49, group_size=8, depth=13, se_ratio=0.25),
    "regnety_004": RegNetCfg(w0=48, wa=27.89, wm=2.09, group_size=8, depth=16, se_ratio=0.25),
    "regnety_006": RegNetCfg(w0=48, wa=32.54, wm=2.32, group_size=16, depth=15, se_ratio=0.25),
    "regnety_008": RegNetCfg(w0=56, wa=38.84, wm=2.4, group_size=16, depth=14, se_ratio=0.25),
    "regnety_016": RegNetCfg(w0=48, wa=20.71, wm=2.65, group_size=24, depth=27, se_ratio=0.25),
    "regnety_032": RegNetCfg(w0=80, wa=42.63, wm=2.66, group_size=24, depth=21, se_ratio=0.25),
    "regnety_040": RegNetCfg(w0=96, wa=31.41, wm=2.24, group_size=64, depth=22, se_ratio=0.25),
    "regnety_064": RegNetCfg(w0=112, wa=33.22, wm=2.27, group_size=72, depth=25, se_ratio=0.25),
    "regnety_080": RegNetCfg(w0=192, wa=76.82, wm=2.19, group_size=56, depth=17, se_ratio=0.25),
    "regnety_120": RegNetCfg(w0=168, wa=73.36, wm=2.37, group_size=112, depth=19, se_ratio=0.25),
    # RegNetY-16GF, the official DeiT teacher.
    "regnety_160": RegNetCfg(w0=200, wa=106.23, wm=2.48, group_size=112, depth=18, se_ratio=0.25),
    "regnety_320": RegNetCfg(w0=232, wa=115.89, wm=2.53, group_size=232, depth=20, se_ratio=0.25),
}

RESNET_CFGS: dict[str, ResNetCfg] = {
    "resnet18": ResNetCfg("basic", (2, 2, 2, 2)),
    "resnet34": ResNetCfg("basic", (3, 4, 6, 3)),
    "resnet50": ResNetCfg("bottleneck", (3, 4, 6, 3)),
    "resnet101": ResNetCfg("bottleneck", (3, 4, 23, 3)),
    "resnet152": ResNetCfg("bottleneck", (3, 8, 36, 3)),
}


def _constructor(model_cls, cfg) -> Callable[..., nnx.Module]:
  def build(num_classes: int = 1000, *, dtype: Any = jnp.float32, conv_impl: str | None = None,
            rngs: nnx.Rngs) -> nnx.Module:
    return model_cls(cfg, num_classes, dtype=dtype, conv_impl=conv_impl, rngs=rngs)
  build.__doc__ = f"{model_cls.__name__}({cfg})"
  return build


# name -> constructor(num_classes=1000, *, dtype=jnp.float32, conv_impl=None, rngs). Constructors
# return the module in NNX's default (train) mode; `create_teacher` returns it in eval mode.
TEACHERS: dict[str, Callable[..., nnx.Module]] = {
    **{name: _constructor(RegNet, cfg) for name, cfg in REGNET_CFGS.items()},
    **{name: _constructor(ResNet, cfg) for name, cfg in RESNET_CFGS.items()},
}


def _check_name(name: str):
  if name not in TEACHERS:
    raise ValueError(f"Unknown teacher {name!r}. Known teachers: {', '.join(sorted(TEACHERS))}.")


def create_teacher(name: str, *, num_classes: int = 1000, dtype: Any = jnp.float32,
                   seed: int = 0, conv_impl: str | None = None) -> nnx.Module:
  """Teacher `name`, randomly initialised as timm does, in eval mode (`.train()` to train).
  conv_impl: 'xla' | 'dense' | None (per platform), see deit_jax.conv."""
  _check_name(name)
  model = TEACHERS[name](num_classes, dtype=dtype, conv_impl=conv_impl, rngs=nnx.Rngs(seed))
  model.eval()
  return model


def abstract_teacher(name: str, *, num_classes: int = 1000,
                     dtype: Any = jnp.float32) -> nnx.Module:
  """Teacher `name` with shapes but no values (nnx.eval_shape), in eval mode: fill it with
  `load_torch_state_dict`, or count its parameters."""
  _check_name(name)
  model = nnx.eval_shape(lambda: TEACHERS[name](num_classes, dtype=dtype, rngs=nnx.Rngs(0)))
  model.eval()
  return model


def _registered_name(model: nnx.Module) -> str | None:
  cfgs = REGNET_CFGS if isinstance(model, RegNet) else RESNET_CFGS
  return next((name for name, cfg in cfgs.items() if cfg == model.cfg), None)


def describe(model: nnx.Module) -> dict:
  """JSON-able architecture of a teacher (what checkpoint.py stores next to the weights)."""
  if not isinstance(model, (RegNet, ResNet)):
    raise TypeError(f"Expected a teachers.RegNet or teachers.ResNet, got {type(model).__name__}.")
  return {"family": "teacher", "name": _registered_name(model),
          "kind": "regnet" if isinstance(model, RegNet) else "resnet",
          "config": dataclasses.asdict(model.cfg), "num_classes": model.num_classes,
          "in_chans": model.in_chans, "dtype": jnp.dtype(model.dtype).name}


def build(description: Mapping, *, abstract: bool = False, **overrides) -> nnx.Module:
  """The teacher `describe` described, in eval mode; abstract (shapes only) if `abstract`.

  overrides: num_classes, dtype ('float32' / 'bfloat16'), conv_impl (deit_jax.conv; not part of
  the description: an execution choice); img_size is accepted and has no effect, since a CNN
  teacher takes any resolution (DeiT feeds it the student's).
  """
  unknown = set(overrides) - {"num_classes", "dtype", "img_size", "conv_impl"}
  if unknown:
    raise ValueError(f"A CNN teacher cannot override {sorted(unknown)}; it accepts num_classes, "
                     "dtype, conv_impl and img_size (ignored: any resolution works).")
  kind, cfg = description.get("kind"), dict(description.get("config") or {})
  if kind == "regnet":
    model_cls, cfg = RegNet, RegNetCfg(**cfg)
  elif kind == "resnet":
    model_cls = ResNet
    cfg = ResNetCfg(cfg["block"], tuple(cfg["layers"]), tuple(cfg["channels"]))
  else:
    raise ValueError(f"Unknown teacher kind {kind!r} in description {dict(description)}.")
  num_classes = overrides.get("num_classes", description.get("num_classes", 1000))
  dtype = overrides.get("dtype", description.get("dtype", "float32"))
  make = lambda: model_cls(cfg, num_classes, in_chans=description.get("in_chans", 3),
                           dtype=dtype, conv_impl=overrides.get("conv_impl"), rngs=nnx.Rngs(0))
  model = nnx.eval_shape(make) if abstract else make()
  model.eval()
  return model


def param_count(model: nnx.Module) -> int:
  """Number of trainable parameters (nnx.Param; not BatchNorm statistics, as PyTorch counts).
  Works on an abstract model from `nnx.eval_shape` too."""
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


# ---------------------------------------------------------------------------------------------
# PyTorch weights
# ---------------------------------------------------------------------------------------------

# NNX variable name -> PyTorch parameter/buffer name.
_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
               "var": "running_var"}


def _to_torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  if len(shape) == 4:  # conv HWIO <- OIHW
    return (shape[3], shape[2], shape[0], shape[1])
  if len(shape) == 2:  # Linear (in, out) <- (out, in)
    return (shape[1], shape[0])
  return tuple(shape)


def _from_torch(value: np.ndarray) -> np.ndarray:
  if value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  if value.ndim == 2:
    return value.T
  return value


def torch_variables(model: nnx.Module) -> dict[str, nnx.Variable]:
  """The model's parameters and BatchNorm statistics by PyTorch key."""
  out = {}
  for path, var in nnx.iter_graph(model):
    if isinstance(var, (nnx.Param, nnx.BatchStat)):
      out[".".join(str(p) for p in path[:-1] + (_TORCH_LEAF[path[-1]],))] = var
  return out


def _unwrap(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
  # The official DeiT teacher file is {'model': state_dict}; DataParallel prefixes 'module.'.
  if len(state_dict) == 1:
    (key, value), = state_dict.items()
    if key in ("model", "state_dict") and isinstance(value, Mapping):
      state_dict = value
  if state_dict and all(k.startswith("module.") for k in state_dict):
    state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
  return state_dict


def _listing(title: str, items: list[str], limit: int = 50) -> str:
  shown = "\n".join(f"    {item}" for item in items[:limit])
  more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
  return f"  {title} ({len(items)}):\n{shown}{more}"


def load_torch_state_dict(model: nnx.Module, name: str | None,
                          state_dict: Mapping[str, np.ndarray]) -> None:
  """Loads a timm / official PyTorch state dict of teacher `name` into `model`, in place.

  `name` is a TEACHERS name, checked against the model's architecture, or None for a RegNet or
  ResNet built from an explicit config.

  Conv weights go OIHW -> HWIO (group convs alike: PyTorch's [O, I/groups, kh, kw] becomes flax's
  [kh, kw, I/groups, O]), Linear weights (out, in) -> (in, out), BatchNorm weight/bias/running
  stats as they are; `num_batches_tracked` is ignored. Every key and shape is checked before
  anything is assigned: on any missing or unexpected key, or shape mismatch, a ValueError lists
  them all and the model is left untouched.

  `model` may be abstract (`nnx.eval_shape(lambda: TEACHERS[name](rngs=nnx.Rngs(0)))`): every
  variable is then replaced by the loaded array, which skips the random init (one XLA compilation
  per distinct parameter shape: ~20 s for regnety_160 on a busy 2-core CPU). `abstract_teacher`
  builds one.
  """
  if not isinstance(model, (RegNet, ResNet)):
    raise TypeError(f"Expected a teachers.RegNet or teachers.ResNet, got {type(model).__name__}.")
  if name is not None:
    _check_name(name)
    want_cfg = REGNET_CFGS.get(name) or RESNET_CFGS.get(name)
    if model.cfg != want_cfg:
      raise ValueError(f"The model ({type(model).__name__}, {model.cfg}) is not teacher {name!r} "
                       f"({want_cfg}): build it with create_teacher({name!r}).")
  state_dict = _unwrap(state_dict)
  variables = torch_variables(model)

  missing = [k for k in variables if k not in state_dict]
  unexpected = sorted(k for k in state_dict
                      if k not in variables and not k.endswith("num_batches_tracked"))
  mismatched, not_float = [], []
  converted = {}
  for key, var in variables.items():
    if key not in state_dict:
      continue
    value = np.asarray(state_dict[key])
    want = _to_torch_shape(var.get_value().shape)
    if value.shape != want:
      mismatched.append(f"{key}: checkpoint {tuple(value.shape)}, model {want}")
    elif not np.issubdtype(value.dtype, np.floating):
      not_float.append(f"{key}: dtype {value.dtype}")
    else:
      converted[key] = _from_torch(value)

  if missing or unexpected or mismatched or not_float:
    what = f"teacher {name!r}" if name else f"{type(model).__name__}({model.cfg})"
    parts = [f"PyTorch state dict does not fit {what}; nothing was loaded."]
    if missing:
      parts.append(_listing("missing keys", missing))
    if unexpected:
      parts.append(_listing("unexpected keys", unexpected))
    if mismatched:
      parts.append(_listing("shape mismatches", mismatched))
    if not_float:
      parts.append(_listing("non-floating values", not_float))
    if mismatched and all(k.startswith(("head.fc.", "fc.")) for k in mismatched):
      parts.append("  Only the classifier differs: build the teacher with the checkpoint's "
                   "num_classes.")
    raise ValueError("\n".join(parts))

  for key, var in variables.items():
    old = var.get_value()
    new = jnp.asarray(converted[key], dtype=old.dtype)
    sharding = getattr(old, "sharding", None)
    if sharding is not None:
      new = jax.device_put(new, sharding)  # keep a sharded teacher sharded
    var.set_value(new)
