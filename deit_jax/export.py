r"""Exports a checkpoint for serving: StableHLO (jax.export), a TensorFlow SavedModel, or ONNX.

  python -m deit_jax.export --checkpoint ckpt/deit_b_distilled --format stablehlo --output out/hlo
  python -m deit_jax.export --checkpoint ckpt/deit_b_distilled --format savedmodel --output out/sm
  python -m deit_jax.export --checkpoint ckpt/deit_b_distilled --format onnx --output out/onnx

Every artifact takes one input, `images`: float32 NHWC `[batch, S, S, 3]` with a symbolic batch
dimension, already preprocessed like DeiT's eval transform (RGB; shorter side resized to
int(S / crop_pct) with bicubic, center crop S x S, scaled to [0, 1], then (x - mean) / std with the
ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225)). It returns float32 logits
`[batch, classes]`; a distilled model returns the average of its two heads' logits (what it
evaluates with), or with `--both_heads` the pair `cls_logits`, `dist_logits`.

  stablehlo   model.jax_exported: `jax.export.Exported.serialize()` bytes (weights embedded),
              lowered for --platforms (default cpu, cuda and tpu). Run it with
              `jax.export.deserialize(open(path, 'rb').read()).call(images)`.
  savedmodel  a SavedModel through jax2tf (weights as tf.Variables); signature
              `serving_default(images=...)` -> {'logits'} (or {'cls_logits', 'dist_logits'}).
              Run it with `tf.saved_model.load(dir).signatures['serving_default']`.
  onnx        model.onnx (weights over 1 MB in model.onnx.data beside it) through jax2onnx (the
              `export` extra); input `images`, outputs as above. Run it with onnxruntime.

Each output directory gets `export.json`: the format, files, input and outputs, the
preprocessing, the model's description, and the max abs difference to the JAX model measured
through the artifact's own runtime on a random batch right after export. The directory is
written beside its final place and renamed into it at the end, so a failed export leaves
nothing behind; an existing non-empty output is never overwritten.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

import deit_jax
from deit_jax import checkpoint, image_ops, models

FORMATS = ("stablehlo", "savedmodel", "onnx")
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
STABLEHLO_FILE = "model.jax_exported"
ONNX_FILE = "model.onnx"
METADATA_FILE = "export.json"


class ExportError(ValueError):
  """The export cannot be made as asked (bad options, output exists, missing converter)."""


def load_for_export(checkpoint_dir: str, *, img_size: int | None = None, ema: bool = False,
                    dtype: str = "float32") -> nnx.Module:
  """The checkpoint's model in eval mode, computing in `dtype` with portable attention."""
  description, _ = checkpoint.read_description(checkpoint_dir)
  overrides: dict[str, Any] = {"dtype": dtype}
  if description.get("family") == "deit":
    overrides["attention_impl"] = None  # the export must lower on every platform
    if img_size:
      overrides["img_size"] = img_size
  return checkpoint.load_model(checkpoint_dir, ema=ema, **overrides)


@dataclasses.dataclass
class Serving:
  """What gets exported: `apply(state, images)` -> one output or (cls_logits, dist_logits)."""
  apply: Callable
  state: Any  # the model's weights (nnx.State)
  output_names: list[str]

  def __call__(self, images):  # the weights closed over (stablehlo, onnx)
    return self.apply(self.state, images)


def serving(model: nnx.Module, *, both_heads: bool = False) -> Serving:
  graphdef, state = nnx.split(model)
  distilled = isinstance(model, models.DeiT) and model.config.distilled
  if both_heads and not distilled:
    raise ExportError("--both_heads needs a distilled model (a distillation token); this one has "
                      "a single head.")

  def apply(state, images):
    m = nnx.merge(graphdef, state)
    if both_heads:
      out = m.heads(images)
      return out.cls, out.dist
    return m(images)

  return Serving(apply, state, ["cls_logits", "dist_logits"] if both_heads else ["logits"])


def input_size(model: nnx.Module, img_size: int | None) -> int:
  if isinstance(model, models.DeiT):
    return model.config.img_size
  if not img_size:
    raise ExportError("A CNN (teacher) takes any input size: give --img_size.")
  return img_size


# ----------------------------------------------------------------------------------------------
# The three formats. Each writes into `directory` and returns the files it wrote plus a runner
# (images -> list of outputs) that goes through the artifact's own runtime.
# ----------------------------------------------------------------------------------------------
# jax.export serializes into a flatbuffer, which cannot grow past 2 GiB (weights included).
_FLATBUFFER_LIMIT = 2 ** 31 - 2 ** 26


def _stablehlo(serve, size, directory, platforms):
  weights = sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(serve.state))
  if weights > _FLATBUFFER_LIMIT:
    raise ExportError(f"The model's weights are {weights / 2 ** 30:.2f} GiB: a jax.export "
                      f"artifact embeds them in a flatbuffer, which stops at 2 GiB. Export it "
                      f"with --format=savedmodel (weights as variables) or --format=onnx.")
  b, = jax.export.symbolic_shape("b")
  exported = jax.export.export(jax.jit(lambda images: serve(images)),
                               platforms=tuple(platforms))(
      jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32))
  path = os.path.join(directory, STABLEHLO_FILE)
  with open(path, "wb") as f:
    f.write(exported.serialize())

  def run(images):
    with open(path, "rb") as f:
      out = jax.export.deserialize(bytearray(f.read())).call(images)
    return [np.asarray(o) for o in (out if isinstance(out, tuple) else (out,))]

  return [STABLEHLO_FILE], run


def _savedmodel(serve, size, directory, platforms):
  import tensorflow as tf
  from jax.experimental import jax2tf

  # The weights are tf.Variables (not graph constants), so large models fit a SavedModel.
  leaves, treedef = jax.tree.flatten(serve.state)
  output_names = serve.output_names

  def with_params(flat, images):
    return serve.apply(jax.tree.unflatten(treedef, flat), images)

  tf_fn = jax2tf.convert(with_params, polymorphic_shapes=[None, f"(b, {size}, {size}, 3)"],
                         with_gradient=False, native_serialization_platforms=tuple(platforms))
  module = tf.Module()
  module.params = [tf.Variable(np.asarray(leaf), trainable=False) for leaf in leaves]

  @tf.function(autograph=False,
               input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="images")])
  def signature(images):
    out = tf_fn(module.params, images)
    out = out if isinstance(out, (tuple, list)) else (out,)
    return dict(zip(output_names, out))

  module.serve = signature
  tf.saved_model.save(module, directory, signatures={"serving_default": signature})

  def run(images):
    loaded = tf.saved_model.load(directory).signatures["serving_default"]
    out = loaded(images=tf.constant(images))
    return [out[name].numpy() for name in output_names]

  files = sorted(os.path.relpath(os.path.join(r, n), directory)
                 for r, _, names in os.walk(directory) for n in names)
  return files, run


def _onnx(serve, size, directory):
  # jax2onnx logs (with tracebacks) the optional plugins it cannot import for this JAX; they are
  # not used here.
  logging.getLogger("jax2onnx.plugins.plugin_system").setLevel(logging.ERROR)
  try:
    from jax2onnx import to_onnx
    import onnxruntime
  except ImportError as e:
    raise ExportError(f"--format=onnx needs jax2onnx and onnxruntime: pip install "
                      f"'deit_jax[export]' ({e}).") from e
  path = os.path.join(directory, ONNX_FILE)
  with warnings.catch_warnings():  # its plugins use JAX / Flax APIs deprecated since
    warnings.simplefilter("ignore", DeprecationWarning)
    to_onnx(lambda images: serve(images), inputs=[("b", size, size, 3)], model_name="deit",
            return_mode="file", output_path=path, input_names=["images"],
            output_names=serve.output_names)

  def run(images):
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(serve.output_names, {"images": images})

  return sorted(os.listdir(directory)), run


# ----------------------------------------------------------------------------------------------
def _metadata(fmt, files, model, size, output_names, num_classes, platforms, crop_pct,
              checkpoint_dir, max_diff, both_heads):
  distilled = isinstance(model, models.DeiT) and model.config.distilled
  meanings = {"logits": ("(cls_logits + dist_logits) / 2, the distilled model's eval output"
                         if distilled else "class logits"),
              "cls_logits": "the class token's head", "dist_logits": "the distillation head"}
  return {
      "format": fmt,
      "files": files,
      "checkpoint": os.path.abspath(checkpoint_dir),
      "model": json.loads(json.dumps(checkpoint.model_description(model))),
      "input": {
          "name": "images", "dtype": "float32", "layout": "NHWC",
          "shape": [None, size, size, 3],
          "preprocessing": {
              "color": "RGB",
              "resize_shorter_side_to": int(size / crop_pct), "interpolation": "bicubic",
              "center_crop": size, "crop_pct": crop_pct,
              "scale": "x / 255", "mean": list(image_ops.IMAGENET_MEAN),
              "std": list(image_ops.IMAGENET_STD),
              "normalize": "(x / 255 - mean) / std per channel"}},
      "outputs": [{"name": n, "dtype": "float32", "shape": [None, num_classes],
                   "meaning": meanings[n]} for n in output_names],
      "both_heads": both_heads,
      "platforms": list(platforms) if fmt != "onnx" else None,
      "parity": {"max_abs_diff_vs_jax": max_diff, "batch": 2,
                 "runtime": {"stablehlo": "jax.export.deserialize",
                             "savedmodel": "tf.saved_model.load",
                             "onnx": "onnxruntime"}[fmt]},
      "versions": {"jax": jax.__version__, "deit_jax": deit_jax.__version__},
  }


def export(checkpoint_dir: str, output: str, fmt: str, *, both_heads: bool = False,
           img_size: int | None = None, platforms=DEFAULT_PLATFORMS, crop_pct: float = 0.875,
           ema: bool = False, seed: int = 0) -> dict:
  """Writes the export of `checkpoint_dir` to `output`; returns its export.json contents."""
  if fmt not in FORMATS:
    raise ExportError(f"--format={fmt!r}: use one of {', '.join(FORMATS)}.")
  unknown = sorted(set(platforms) - set(DEFAULT_PLATFORMS))
  if unknown or not platforms:
    raise ExportError(f"--platforms: {unknown or 'none given'}; use some of "
                      f"{', '.join(DEFAULT_PLATFORMS)}.")
  if not 0 < crop_pct <= 1:
    raise ExportError(f"--crop_pct={crop_pct} must be in (0, 1].")
  output = os.path.abspath(output)
  if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
    raise ExportError(f"{output} already exists; export to a new directory (nothing was "
                      f"overwritten).")
  model = load_for_export(checkpoint_dir, img_size=img_size, ema=ema)
  size = input_size(model, img_size)
  serve = serving(model, both_heads=both_heads)
  images = np.random.RandomState(seed).randn(2, size, size, 3).astype(np.float32)
  expected = [np.asarray(o) for o in jax.tree.leaves(jax.jit(lambda x: serve(x))(images))]

  parent = os.path.dirname(output)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.tmp-", dir=parent)
  try:
    if fmt == "stablehlo":
      files, run = _stablehlo(serve, size, tmp, platforms)
    elif fmt == "savedmodel":
      files, run = _savedmodel(serve, size, tmp, platforms)
    else:
      files, run = _onnx(serve, size, tmp)
    got = run(images)
    max_diff = max(float(np.max(np.abs(np.asarray(g) - e))) for g, e in zip(got, expected))
    meta = _metadata(fmt, files, model, size, serve.output_names, expected[0].shape[-1],
                     platforms, crop_pct, checkpoint_dir, max_diff, both_heads)
    with open(os.path.join(tmp, METADATA_FILE), "w") as f:
      json.dump(meta, f, indent=2)
    if os.path.isdir(output):
      os.rmdir(output)  # empty (checked above)
    os.rename(tmp, output)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return meta


def _define_flags():
  flags.DEFINE_string("checkpoint", None, "Orbax checkpoint directory (from deit_jax.convert or "
                      "training).")
  flags.DEFINE_enum("format", None, list(FORMATS), "What to write.")
  flags.DEFINE_string("output", None, "Output directory (must not exist, or be empty).")
  flags.DEFINE_bool("both_heads", False, "Distilled models: output cls_logits and dist_logits "
                    "instead of their average.")
  flags.DEFINE_integer("img_size", None, "Input size (DeiT: position embeddings are resized; "
                       "required for CNN teachers).")
  flags.DEFINE_list("platforms", list(DEFAULT_PLATFORMS), "stablehlo/savedmodel: platforms to "
                    "lower for.")
  flags.DEFINE_float("crop_pct", 0.875, "Recorded in export.json's preprocessing: eval resizes "
                     "the shorter side to int(size / crop_pct) before the center crop.")
  flags.DEFINE_bool("ema", False, "Export the EMA weights of a training run.")
  flags.mark_flags_as_required(["checkpoint", "format", "output"])


def main(argv):
  del argv
  f = flags.FLAGS
  try:
    meta = export(f.checkpoint, f.output, f.format, both_heads=f.both_heads, img_size=f.img_size,
                  platforms=f.platforms, crop_pct=f.crop_pct, ema=f.ema)
  except (checkpoint.CheckpointError, FileNotFoundError, ExportError) as e:
    print(f"error: {e}", file=sys.stderr)  # a user mistake: the message, no traceback
    sys.exit(2)
  print(f"Wrote {f.format} export of {f.checkpoint} to {os.path.abspath(f.output)} "
        f"(max abs diff to JAX {meta['parity']['max_abs_diff_vs_jax']:.1e}).")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
