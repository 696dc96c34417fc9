"""DeiT: a plain ViT with a class token and, for the distilled models, a distillation token.

Tokens are ordered `[cls, dist, patches]` and one learnable position embedding is added to all of
them (not only to the patches, as some JAX ViTs do). Blocks are pre-norm. The model has two heads
when distilled: `head` reads the final-norm class token, `head_dist` the distillation token. In
train mode it returns both heads' logits `(cls_logits, dist_logits)`; in eval mode (`model.eval()`)
it returns their average, as the official code does (an average of logits, not of softmaxes).

`model.heads(x)` is the contract the trainer, the loss and the evaluation use (shared with
the CNN teachers, `deit_jax.outputs.Outputs`): both heads' logits by name, whatever the mode,
plus every intermediate (embeddings, per-block tokens, attention weights on request,
pre-logits) of the same forward pass. `model(x, return_aux=True)` returns the same intermediates beside timm's outputs.

DeiT III (`deit3_*`, "Revenge of the ViT") is the same model with two config changes: LayerScale
(`layer_scale_init`: each residual branch scaled by a learned per-channel `gamma`) and
`no_embed_class` (the position embedding `(1, N, D)` is added to the patches only, before the
class token is concatenated). A DeiT III model with `distilled=True` orders its tokens
`[cls, dist, patches]` like DeiT, and neither prefix token gets a position embedding: timm's
`VisionTransformerDistilled._pos_embed` semantics for no_embed_class.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deit_jax.outputs import Outputs

# Official init: trunc_normal(std .02) for tokens, position embedding and Linear weights.
_trunc02 = nnx.initializers.truncated_normal(stddev=0.02)
# PyTorch's default Conv2d init (kaiming_uniform with a=sqrt(5)), which timm keeps for patch_embed.
_torch_conv_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


@dataclasses.dataclass(frozen=True)
class DeiTConfig:
  """Architecture of one DeiT model. All zoo models share everything but width and resolution."""
  embed_dim: int = 192
  num_heads: int = 3
  depth: int = 12
  mlp_ratio: float = 4.0
  patch_size: int = 16
  img_size: int = 224
  in_chans: int = 3
  num_classes: int = 1000
  distilled: bool = False
  qkv_bias: bool = True
  drop_path_rate: float = 0.1
  dtype: str = "float32"  # compute dtype; parameters are always float32
  # Attention: 'einsum' (explicit einsums, [B, heads, N, head_dim]), or a
  # jax.nn.dot_product_attention implementation, 'xla' | 'cudnn'; None: 'einsum' on CPU,
  # dot_product_attention's own choice elsewhere.
  attention_impl: str | None = None
  # DeiT III. LayerScale: each residual branch is multiplied by a learned per-channel vector
  # (`ls1`/`ls2` `gamma`) initialised to this value; None = no LayerScale (DeiT).
  layer_scale_init: float | None = None
  # DeiT III (timm's no_embed_class): pos_embed covers the patches only, `(1, N, D)`, and is added
  # BEFORE the class (and distillation) token is concatenated; the prefix tokens get none.
  no_embed_class: bool = False
  # DeiT III's official code uses the same stochastic-depth rate in every block; DeiT (and timm)
  # ramp it linearly from 0 to drop_path_rate.
  drop_path_uniform: bool = False

  @property
  def grid_size(self) -> int:
    return self.img_size // self.patch_size

  @property
  def num_prefix_tokens(self) -> int:
    return 2 if self.distilled else 1

  @property
  def pos_embed_prefix_tokens(self) -> int:
    """Rows of pos_embed before the patch rows: the prefix tokens, or none (no_embed_class)."""
    return 0 if self.no_embed_class else self.num_prefix_tokens

  def validate(self):
    if self.embed_dim % self.num_heads:
      raise ValueError(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}.")
    if self.img_size % self.patch_size:
      raise ValueError(f"img_size={self.img_size} is not a multiple of patch_size={self.patch_size}.")
    if self.dtype not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"dtype={self.dtype!r}: use 'float32' or 'bfloat16' (or 'float16').")
    if self.attention_impl not in (None, "einsum", "xla", "cudnn"):
      raise ValueError(f"attention_impl={self.attention_impl!r}: use None, 'einsum', 'xla' or "
                       "'cudnn'.")
    if not 0.0 <= self.drop_path_rate < 1.0:
      raise ValueError(f"drop_path_rate={self.drop_path_rate} must be in [0, 1).")
    if self.layer_scale_init is not None and not self.layer_scale_init > 0:
      raise ValueError(f"layer_scale_init={self.layer_scale_init} must be > 0 (or None for no "
                       f"LayerScale).")
    return self


_WIDTHS = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}


def _zoo() -> dict[str, DeiTConfig]:
  zoo = {}
  for size, (dim, heads) in _WIDTHS.items():
    for distilled in (False, True):
      for res in (224, 384):
        if res == 384 and size != "base":
          continue
        name = f"deit_{size}_{'distilled_' if distilled else ''}patch16_{res}"
        zoo[name] = DeiTConfig(embed_dim=dim, num_heads=heads, img_size=res, distilled=distilled)
  # DeiT III (timm's deit3_*): LayerScale, pos_embed on the patches only, no distillation token
  # (distilled=True adds one). LayerScale starts at 1e-4 as in the official training code
  # (timm's entries say 1e-6; converted weights overwrite it either way). The `_in21ft1k` names
  # (timm's ImageNet-21k pretrained, 1k fine-tuned weights) share the architecture.
  for size, (dim, heads, depth, patch, resolutions) in _DEIT3.items():
    for res in resolutions:
      name = f"deit3_{size}_patch{patch}_{res}"
      cfg = DeiTConfig(embed_dim=dim, num_heads=heads, depth=depth, patch_size=patch,
                       img_size=res, layer_scale_init=1e-4, no_embed_class=True,
                       drop_path_uniform=True)
      zoo[name] = zoo[name + "_in21ft1k"] = cfg
  return zoo


# size: (embed_dim, heads, depth, patch, resolutions), as timm lists the deit3_* models.
_DEIT3 = {"small": (384, 6, 12, 16, (224, 384)), "medium": (512, 8, 12, 16, (224,)),
          "base": (768, 12, 12, 16, (224, 384)), "large": (1024, 16, 24, 16, (224, 384)),
          "huge": (1280, 16, 32, 14, (224,))}


MODELS: dict[str, DeiTConfig] = _zoo()


def model_config(name: str, **overrides) -> DeiTConfig:
  """The config of a zoo model, with any field overridden (e.g. num_classes, img_size, depth)."""
  if name not in MODELS:
    raise ValueError(f"Unknown model {name!r}. Known models: {', '.join(sorted(MODELS))}.")
  return override(MODELS[name], name, **overrides).validate()


def override(cfg: DeiTConfig, name: str, **overrides) -> DeiTConfig:
  """`cfg` with fields overridden (not validated); ValueError naming an unknown field."""
  fields = {f.name for f in dataclasses.fields(DeiTConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"Unknown model option(s) {unknown} for {name}. Known options: {sorted(fields)}.")
  return dataclasses.replace(cfg, **overrides)


class DropPath(nnx.Module):
  """Stochastic depth: drops the whole residual branch per example, rescaling the kept ones."""

  def __init__(self, rate: float):
    self.rate = rate
    self.deterministic = False

  def __call__(self, x, key):
    if self.deterministic or self.rate == 0.0:
      return x
    if key is None:
      raise ValueError(
          "The model is in train mode with stochastic depth but no random key was given: call "
          "model(images, rngs=jax.random.key(...)) for training, or model.eval() for inference.")
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


class Attention(nnx.Module):

  def __init__(self, cfg: DeiTConfig, *, rngs: nnx.Rngs):
    dim, dtype = cfg.embed_dim, jnp.dtype(cfg.dtype)
    self.num_heads = cfg.num_heads
    self.implementation = cfg.attention_impl
    self.qkv = nnx.Linear(dim, 3 * dim, use_bias=cfg.qkv_bias, kernel_init=_trunc02, dtype=dtype,
                          rngs=rngs)
    self.proj = nnx.Linear(dim, dim, kernel_init=_trunc02, dtype=dtype, rngs=rngs)

  def __call__(self, x, return_attention: bool = False):
    b, n, d = x.shape
    heads = self.num_heads
    # The qkv features are ordered (q|k|v) x head x head_dim, as in the PyTorch weights.
    qkv = self.qkv(x).reshape(b, n, 3, heads, d // heads)
    impl = self.implementation or ("einsum" if jax.default_backend() == "cpu" else None)
    weights = None
    if return_attention or impl == "einsum":
      # [3, B, heads, N, head_dim]: both batched matmuls then run without further transposes
      # (on the CPU ~25% faster inference, ~12% faster training than dot_product_attention's
      # [B, N, heads, head_dim]). Fused kernels don't expose the weights, so return_attention
      # always takes this path.
      q, k, v = qkv.transpose(2, 0, 3, 1, 4)
      q = q * (1.0 / math.sqrt(q.shape[-1]))
      logits = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32)
      probs = jax.nn.softmax(logits, axis=-1)
      out = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), v).transpose(0, 2, 1, 3)
      if return_attention:
        weights = probs
    else:
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, heads, head_dim]
      out = jax.nn.dot_product_attention(q, k, v, implementation=impl)
    return self.proj(out.reshape(b, n, d)), weights


class Mlp(nnx.Module):

  def __init__(self, cfg: DeiTConfig, *, rngs: nnx.Rngs):
    dim, hidden, dtype = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio), jnp.dtype(cfg.dtype)
    self.fc1 = nnx.Linear(dim, hidden, kernel_init=_trunc02, dtype=dtype, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, dim, kernel_init=_trunc02, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.fc2(gelu(self.fc1(x)))


# Eigen's and XLA's float32 erf: x * P(x^2) / Q(x^2) on x clamped to [-4, 4] (erf(4) = 1 in fp32).
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
          -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
          -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
          -7.37332916720468e-03, -1.42647390514189e-02)


def _erf32(x):
  x = jnp.clip(x, -4.0, 4.0)
  x2 = x * x
  p, q = _ERF_P[0], _ERF_Q[0]
  for c in _ERF_P[1:]:
    p = p * x2 + c
  for c in _ERF_Q[1:]:
    q = q * x2 + c
  return x * p / q


def _gelu_cdf(x):
  return 0.5 * (1 + _erf32(x.astype(jnp.float32) * (1 / math.sqrt(2))))


@jax.custom_jvp
def gelu(x):
  """The exact (erf) GELU in PyTorch's form, x/2 * (1 + erf(x/sqrt(2))), computed in float32.

  Same function as `jax.nn.gelu(approximate=False)` (largest error against float64 over 9.7M
  samples of 2 * N(0, 1): 1.5e-6 here, 3.8e-7 for jax's), written so that XLA's CPU backend runs
  it fast: jax's goes through erfc and its autodiff, 5.3 ms forward and 32 ms forward+backward
  over [12672, 768] fp32 on the 2-core development CPU, against 1.9 and 7.6 ms here (the
  derivative is given in closed form, cdf(x) + x * pdf(x)). erf is spelled out as a polynomial
  because `lax.erf` is serialized as a StableHLO composite that TensorFlow's SavedModel runtime
  cannot read.
  """
  return (x * _gelu_cdf(x)).astype(x.dtype)


@gelu.defjvp
def _gelu_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  x32, cdf = x.astype(jnp.float32), _gelu_cdf(x)
  slope = cdf + x32 * (1 / math.sqrt(2 * math.pi)) * jnp.exp(-0.5 * x32 * x32)
  return (x32 * cdf).astype(x.dtype), (slope * t).astype(t.dtype)


class LayerScale(nnx.Module):
  """DeiT III / CaiT: a residual branch times a learned per-channel `gamma` (timm's `ls1`/`ls2`)."""

  def __init__(self, dim: int, init: float):
    self.gamma = nnx.Param(jnp.full((dim,), init, jnp.float32))

  def __call__(self, x):
    return x * self.gamma[...].astype(x.dtype)


class Block(nnx.Module):

  def __init__(self, cfg: DeiTConfig, drop_path: float, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.dtype)
    self.norm1 = nnx.LayerNorm(cfg.embed_dim, epsilon=1e-6, dtype=dtype, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.norm2 = nnx.LayerNorm(cfg.embed_dim, epsilon=1e-6, dtype=dtype, rngs=rngs)
    self.mlp = Mlp(cfg, rngs=rngs)
    self.drop_path = DropPath(drop_path)
    self.layer_scale = cfg.layer_scale_init is not None
    if self.layer_scale:
      self.ls1 = LayerScale(cfg.embed_dim, cfg.layer_scale_init)
      self.ls2 = LayerScale(cfg.embed_dim, cfg.layer_scale_init)

  def __call__(self, x, key=None, return_attention: bool = False):
    k1, k2 = jax.random.split(key) if key is not None else (None, None)
    y, weights = self.attn(self.norm1(x), return_attention)
    x = x + self.drop_path(self.ls1(y) if self.layer_scale else y, k1)
    y = self.mlp(self.norm2(x))
    x = x + self.drop_path(self.ls2(y) if self.layer_scale else y, k2)
    return x, weights


class DeiT(nnx.Module):
  """DeiT / DeiT-distilled. See the module docstring for the output conventions."""

  def __init__(self, cfg: DeiTConfig, *, rngs: nnx.Rngs):
    cfg.validate()
    self.config = cfg
    self.deterministic = False  # flipped by model.train() / model.eval()
    dim, dtype = cfg.embed_dim, jnp.dtype(cfg.dtype)
    self.patch_embed = nnx.Conv(cfg.in_chans, dim, (cfg.patch_size, cfg.patch_size),
                                strides=cfg.patch_size, padding="VALID",
                                kernel_init=_torch_conv_init, dtype=dtype, rngs=rngs)
    self.cls_token = nnx.Param(_trunc02(rngs.params(), (1, 1, dim)))
    if cfg.distilled:
      # The distillation token: a second learned token beside the class token, trained (through
      # head_dist) to reproduce the teacher's prediction.
      self.dist_token = nnx.Param(_trunc02(rngs.params(), (1, 1, dim)))
    num_tokens = cfg.grid_size ** 2 + cfg.pos_embed_prefix_tokens
    self.pos_embed = nnx.Param(_trunc02(rngs.params(), (1, num_tokens, dim)))
    rates = (np.full(cfg.depth, cfg.drop_path_rate) if cfg.drop_path_uniform
             else np.linspace(0.0, cfg.drop_path_rate, cfg.depth))
    self.blocks = nnx.List([Block(cfg, float(r), rngs=rngs) for r in rates])
    self.norm = nnx.LayerNorm(dim, epsilon=1e-6, dtype=dtype, rngs=rngs)
    self.head = nnx.Linear(dim, cfg.num_classes, kernel_init=_trunc02, dtype=dtype, rngs=rngs)
    if cfg.distilled:
      self.head_dist = nnx.Linear(dim, cfg.num_classes, kernel_init=_trunc02, dtype=dtype,
                                  rngs=rngs)

  def _check_images(self, images):
    cfg = self.config
    expected = (cfg.img_size, cfg.img_size, cfg.in_chans)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
      raise ValueError(
          f"Expected NHWC images of shape (batch, {expected[0]}, {expected[1]}, {expected[2]}) for "
          f"this model, got {tuple(images.shape)}. Resize/crop inputs to {cfg.img_size}px (e.g. "
          f"deit_jax.augment.eval_transform), or create the model with img_size=... (position "
          f"embeddings are resized when loading a checkpoint).")

  def _position_embedding(self, dtype):
    """The position embedding, resized (bicubic, prefix rows kept; traceable) when the stored one
    was trained for another grid, e.g. DeiT III's 192 px weights evaluated at 224 px."""
    cfg, pos = self.config, self.pos_embed[...]
    prefix = cfg.pos_embed_prefix_tokens
    if pos.shape[1] != cfg.grid_size ** 2 + prefix:
      old = int(round(math.sqrt(pos.shape[1] - prefix)))
      w = jnp.asarray(_cubic_weights(old, cfg.grid_size), jnp.float32)
      grid = pos[0, prefix:].reshape(old, old, -1)
      grid = jnp.einsum("jw,iwd->ijd", w, jnp.einsum("ih,hwd->iwd", w, grid))
      pos = jnp.concatenate([pos[:, :prefix], grid.reshape(1, cfg.grid_size ** 2, -1)], axis=1)
    return pos.astype(dtype)

  def heads(self, images, *, rngs: nnx.Rngs | jax.Array | None = None,
            return_attention: bool = False) -> Outputs:
    """images: NHWC, normalized with the ImageNet mean/std.

    rngs: a key (or nnx.Rngs with a 'dropout' stream) for stochastic depth in train mode.
    Returns `Outputs(cls, dist, aux)`: the class head's and (distilled models) the distillation
    head's float32 logits in any mode, and the named intermediates.
    """
    cfg = self.config
    self._check_images(images)
    dtype = jnp.dtype(cfg.dtype)
    key = rngs.dropout() if isinstance(rngs, nnx.Rngs) else rngs
    x = self.patch_embed(images.astype(dtype))
    b = x.shape[0]
    x = x.reshape(b, -1, cfg.embed_dim)
    prefix = [self.cls_token[...]] + ([self.dist_token[...]] if cfg.distilled else [])
    prefix = [jnp.broadcast_to(t, (b, 1, cfg.embed_dim)).astype(dtype) for t in prefix]
    pos = self._position_embedding(dtype)
    if cfg.no_embed_class:  # DeiT III: position embedding on the patches only
      x = jnp.concatenate(prefix + [x + pos], axis=1)
    else:
      x = jnp.concatenate(prefix + [x], axis=1) + pos
    aux: dict[str, Any] = {"embeddings": x}
    keys = jax.random.split(key, cfg.depth) if key is not None else [None] * cfg.depth
    for i, block in enumerate(self.blocks):
      x, weights = block(x, keys[i], return_attention)
      aux[f"block{i}"] = x
      if return_attention:
        aux[f"attention{i}"] = weights
    x = self.norm(x)
    aux["encoded"] = x
    aux["pre_logits"] = x[:, 0]
    logits = self.head(x[:, 0]).astype(jnp.float32)
    dist_logits = None
    if cfg.distilled:
      aux["pre_logits_dist"] = x[:, 1]
      dist_logits = self.head_dist(x[:, 1]).astype(jnp.float32)
    return Outputs(logits, dist_logits, aux)

  def __call__(self, images, *, rngs: nnx.Rngs | jax.Array | None = None,
               return_aux: bool = False, return_attention: bool = False):
    """timm's conventions (see the module docstring): the logits, the pair
    `(cls_logits, dist_logits)` for a distilled model in train mode, their average in eval mode;
    `(logits, aux)` with `return_aux=True` (aux also holds 'cls_logits' / 'dist_logits')."""
    out = self.heads(images, rngs=rngs, return_attention=return_attention)
    if out.dist is None:
      logits = out.cls
    else:
      logits = out.both if self.deterministic else (out.cls, out.dist)
    if not return_aux:
      return logits
    aux = dict(out.aux, cls_logits=out.cls)
    if out.dist is not None:
      aux["dist_logits"] = out.dist
    return logits, aux


def create_model(name: str, *, seed: int = 0, **overrides) -> DeiT:
  """A randomly initialised zoo model, e.g. create_model('deit_tiny_distilled_patch16_224').

  Overrides change any DeiTConfig field (num_classes=10, img_size=384, dtype='bfloat16', ...).
  The model starts in train mode (like nnx and PyTorch); call `model.eval()` for inference.
  """
  return DeiT(model_config(name, **overrides), rngs=nnx.Rngs(seed))


def abstract_model(name: str, **overrides) -> DeiT:
  """The model with shape-only parameters (no compute, no memory), for restoring into."""
  cfg = model_config(name, **overrides)
  return nnx.eval_shape(lambda: DeiT(cfg, rngs=nnx.Rngs(0)))


def count_params(model: nnx.Module) -> int:
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _cubic_weights(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] matrix of PyTorch's bicubic interpolation (A=-0.75, align_corners=False, no
  antialias, edge-clamped): what the official code uses to resize position embeddings."""
  a = -0.75

  def kernel(t):
    t = abs(t)
    if t <= 1:
      return ((a + 2) * t - (a + 3)) * t * t + 1
    if t < 2:
      return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return 0.0

  w = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    src = (i + 0.5) * in_size / out_size - 0.5
    base = math.floor(src)
    frac = src - base
    for j in range(-1, 3):
      w[i, min(max(base + j, 0), in_size - 1)] += kernel(j - frac)
  return w


def resize_pos_embed(pos_embed: np.ndarray, num_prefix_tokens: int, new_grid: int) -> np.ndarray:
  """Resizes a `[1, prefix + g*g, D]` position embedding to a new grid, keeping the prefix rows
  (cls, dist) and resampling the patch rows bicubically (the official fine-tune behaviour)."""
  pos_embed = np.asarray(pos_embed, np.float32)
  prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[0, num_prefix_tokens:]
  old = int(round(math.sqrt(grid.shape[0])))
  if old * old != grid.shape[0]:
    raise ValueError(f"Position embedding has {grid.shape[0]} patch rows, not a square grid.")
  if old == new_grid:
    return pos_embed
  w = _cubic_weights(old, new_grid)
  g = grid.reshape(old, old, -1).astype(np.float64)
  g = np.einsum("ih,hwd->iwd", w, g)
  g = np.einsum("jw,iwd->ijd", w, g)
  return np.concatenate([prefix, g.reshape(1, new_grid * new_grid, -1).astype(np.float32)], 1)
