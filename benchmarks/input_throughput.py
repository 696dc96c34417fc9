"""Training input throughput: JPEG decode + DeiT train transform, ours (tf.data) vs timm (PIL).

Run (from the repository root, project venv active; scikit-image supplies the photos):

  python benchmarks/input_throughput.py --timm-python /work/torchenv/bin/python

Both sides read the same JPEG files: real photos bundled with scikit-image (no network),
cropped and re-encoded at ImageNet-like sizes (~500x375, quality 90). Each side runs in its own
subprocess:
  * per core: the process is pinned to one CPU (sched_setaffinity); TF runs with one
    inter-op and one intra-op thread, a private tf.data pool of 1 and num_parallel_calls=1;
    timm runs single-threaded (torch.set_num_threads(1)) in a plain loop, like one
    DataLoader worker.
  * all cores: TF with default threading and num_parallel_calls=AUTOTUNE; timm with one
    process per core (multiprocessing), like DataLoader workers.
Ours is timed both per element (the Python loop pulls one image at a time from tf.data, as
the timm loop handles one image at a time) and in batches of --batch images, as
`deit_jax.data` batches inside tf.data before anything reaches Python: pulling single images
costs ~0.15-0.2 ms of iterator and Python work per image on the pinned core, which is not part
of the transform and which the training input pipeline does not pay.
The timm side is `timm.data.create_transform(224, is_training=True,
auto_augment='rand-m9-mstd0.5-inc1', interpolation='bicubic', re_prob=0.25,
re_mode='pixel', re_count=1)` after `Image.open(...).convert('RGB')`, in the interpreter given
by --timm-python (it needs torch, torchvision, timm). With Pillow >= 10, timm's posterize
raises on 0 bits (PosterizeIncreasing at magnitude 10, ~0.3% of images); the benchmark
patches it to the old Pillow result (black), as our op does, so the run can finish.

Measured on a shared 2-core AMD EPYC VM (x86_64, AVX-512), TF 2.21 CPU, Pillow 13, timm
1.0.31, with the command above (best of 3 interleaved rounds; other jobs were running, so
numbers move by ~5-10% between runs), images/s on one pinned core:
  timm (PIL)                                          451
  ours, decode_jpeg + train_transform (per image)     632  (1.40x)
  ours, decode_and_train_transform (per image)        684  (1.51x)
  ours, decode_and_train_transform, batches of 32     782  (1.73x)
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
           "immunohistochemistry", "retina", "camera", "grass", "gravel", "brick", "moon")


def make_jpegs(directory, count, seed=0):
  """Write `count` JPEGs cut from scikit-image's bundled photos, resized to ~500x375."""
  import numpy as np
  from PIL import Image
  import skimage.data

  rng = np.random.default_rng(seed)
  photos = []
  for name in _PHOTOS:
    array = getattr(skimage.data, name)()
    image = Image.fromarray(array)
    photos.append(image.convert("RGB"))
  paths = []
  for index in range(count):
    photo = photos[index % len(photos)]
    width, height = photo.size
    # A random crop of 50-100% of each side, then the ImageNet-typical ~500x375 (or portrait).
    crop_w = int(width * rng.uniform(0.5, 1.0))
    crop_h = int(height * rng.uniform(0.5, 1.0))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    size = (500, 375) if rng.uniform() < 0.75 else (375, 500)
    out = photo.crop((left, top, left + crop_w, top + crop_h)).resize(size, Image.BICUBIC)
    path = os.path.join(directory, f"img_{index:04d}.jpg")
    out.save(path, "JPEG", quality=90)
    paths.append(path)
  return paths


def _pin_to_one_core():
  core = sorted(os.sched_getaffinity(0))[0]
  os.sched_setaffinity(0, {core})


def run_ours(paths, num_images, warmup, per_core, fused_decode, batch=1):
  """Images/s of our tf.data pipeline over `num_images` (after `warmup`), pulled from Python
  one image at a time or in batches of `batch`."""
  if per_core:
    _pin_to_one_core()
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf
  if per_core:
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.threading.set_intra_op_parallelism_threads(1)
  from deit_jax import augment

  cfg = augment.default_augment_config()

  def transform(index, path):
    seed = tf.stack([tf.constant(0, tf.int64), index])
    data = tf.io.read_file(path)
    if fused_decode:
      return augment.decode_and_train_transform(data, seed, cfg)
    return augment.train_transform(tf.io.decode_jpeg(data, channels=3), seed, cfg)

  parallel = 1 if per_core else tf.data.AUTOTUNE
  dataset = (tf.data.Dataset.from_tensor_slices(paths).repeat().enumerate()
             .map(transform, num_parallel_calls=parallel, deterministic=True)
             .take(warmup + num_images))
  if batch > 1:
    dataset = dataset.batch(batch)
  start = None
  options = tf.data.Options()
  if per_core:
    options.threading.private_threadpool_size = 1
    options.autotune.enabled = False
  dataset = dataset.with_options(options)
  count = 0
  for image in dataset:
    if count >= warmup and start is None:
      start, timed = time.perf_counter(), count
    count += 1 if batch == 1 else image.shape[0]
  image.numpy()
  return (count - timed) / (time.perf_counter() - start)


def _timm_transform():
  """timm's DeiT train transform, with Pillow >= 10's posterize(0 bits) error patched out."""
  import timm.data
  from timm.data import auto_augment

  original = auto_augment.posterize

  def posterize(img, bits_to_keep, **kwargs):
    if bits_to_keep <= 0:  # Pillow >= 10 raises here; older Pillow returned black
      return img.point(lambda _: 0)
    return original(img, bits_to_keep, **kwargs)

  # AugmentOp looks its function up in NAME_TO_OP when the transform is built.
  for name, fn in list(auto_augment.NAME_TO_OP.items()):
    if fn is original:
      auto_augment.NAME_TO_OP[name] = posterize
  return timm.data.create_transform(
      224, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic",
      re_prob=0.25, re_mode="pixel", re_count=1)


def _timm_loop(args):
  paths, start_index, count = args
  import torch
  from PIL import Image
  torch.set_num_threads(1)
  transform = _timm_transform()
  for index in range(start_index, start_index + count):
    with Image.open(paths[index % len(paths)]) as image:
      transform(image.convert("RGB"))
  return count


def run_timm(paths, num_images, warmup, per_core):
  """Images/s of timm's PIL transform (single process, or one process per core)."""
  import torch
  torch.set_num_threads(1)
  if per_core:
    _pin_to_one_core()
    _timm_loop((paths, 0, warmup))
    start = time.perf_counter()
    _timm_loop((paths, warmup, num_images))
    return num_images / (time.perf_counter() - start)
  import multiprocessing
  workers = len(os.sched_getaffinity(0))
  share = num_images // workers
  with multiprocessing.get_context("fork").Pool(workers) as pool:
    pool.map(_timm_loop, [(paths, 0, warmup)] * workers)
    start = time.perf_counter()
    pool.map(_timm_loop, [(paths, warmup + i * share, share) for i in range(workers)])
    return share * workers / (time.perf_counter() - start)


def _worker(args):
  paths = sorted(os.path.join(args.image_dir, name) for name in os.listdir(args.image_dir))
  per_core = args.mode == "per_core"
  if args.worker == "ours":
    rate = run_ours(paths, args.num_images, args.warmup, per_core, args.fused_decode,
                    args.batch)
  else:
    rate = run_timm(paths, args.num_images, args.warmup, per_core)
  print(json.dumps({"images_per_s": rate}))


def _spawn(python, args, worker, mode, extra=()):
  command = [python, os.path.abspath(__file__), "--worker", worker, "--mode", mode,
             "--image-dir", args.image_dir, "--num-images", str(args.num_images),
             "--warmup", str(args.warmup), "--batch", str(args.batch), *extra]
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  if result.returncode != 0:
    raise RuntimeError(f"{worker} {mode} worker failed:\n{result.stderr[-3000:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])["images_per_s"]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--timm-python", default=None,
                      help="Python interpreter with torch, torchvision and timm installed.")
  parser.add_argument("--num-files", type=int, default=128)
  parser.add_argument("--num-images", type=int, default=1000, help="images timed per run")
  parser.add_argument("--warmup", type=int, default=50, help="images run before timing")
  parser.add_argument("--rounds", type=int, default=3, help="interleaved repeats, best kept")
  parser.add_argument("--image-dir", default=None, help="reuse JPEGs here (else a temp dir)")
  parser.add_argument("--fused-decode", action="store_true",
                      help="ours: decode only the crop (decode_and_train_transform)")
  parser.add_argument("--batch", type=int, default=32,
                      help="ours, batched rows: images per tf.data batch pulled into Python")
  parser.add_argument("--worker", choices=("ours", "timm"), help=argparse.SUPPRESS)
  parser.add_argument("--mode", choices=("per_core", "all_cores"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    _worker(args)
    return

  with tempfile.TemporaryDirectory() as temp_dir:
    if args.image_dir is None:
      args.image_dir = temp_dir
      make_jpegs(temp_dir, args.num_files)
    cores = len(os.sched_getaffinity(0))
    print(f"{len(os.listdir(args.image_dir))} JPEGs (~500x375, q90, scikit-image photos); "
          f"{args.num_images} images timed after {args.warmup} warm-up; best of {args.rounds} "
          f"interleaved rounds; {cores} cores ({os.uname().machine}).")
    # The machine may be shared: run every configuration `rounds` times, interleaved, and
    # keep each one's best (the run least disturbed by other load).
    configs = [("ours, decode_jpeg", sys.executable, "ours", ("--batch", "1")),
               ("ours, decode_and_crop_jpeg", sys.executable, "ours",
                ("--fused-decode", "--batch", "1")),
               (f"ours, decode_and_crop, batch {args.batch}", sys.executable, "ours",
                ("--fused-decode",))]
    if args.timm_python:
      configs.append(("timm (PIL)", args.timm_python, "timm", ()))
    best = {}
    for _ in range(args.rounds):
      for label, python, worker, extra in configs:
        for mode in ("per_core", "all_cores"):
          rate = _spawn(python, args, worker, mode, extra)
          best[label, mode] = max(best.get((label, mode), 0.), rate)
    rows = [(label, best[label, "per_core"], best[label, "all_cores"])
            for label, *_ in configs]
    print(f"{'pipeline':36s} {'img/s, 1 core':>14s} {f'img/s, {cores} cores':>16s} "
          f"{'per core':>9s}")
    for label, one, many in rows:
      print(f"{label:36s} {one:14.1f} {many:16.1f} {many / cores:9.1f}")
    if args.timm_python:
      timm_one, timm_many = rows[-1][1:]
      for label, one, many in rows[:-1]:
        print(f"{label}: {one / timm_one:.2f}x timm on 1 core, {many / timm_many:.2f}x on "
              f"{cores} cores")


if __name__ == "__main__":
  main()
