r"""Train-step and inference speed of our DeiT step, side by side with timm.

  python benchmarks/speed.py                                  # all CPU rows, ours only
  python benchmarks/speed.py --rows demo --timm-python /work/timmvenv/bin/python
  python benchmarks/speed.py --config configs/demo_distill.py:hard --iters 5
  python benchmarks/speed.py --rows deit_s,deit_b --dtype bfloat16 --train-batch 256 \
      --infer-batch 512 --attention xla,cudnn --json out.json --markdown out.md   # a GPU
  python benchmarks/speed.py --rows deit_b --find-max-batch   # largest batches that fit

For every row it measures, on random data and all local devices:
  train, student alone         our jitted train step (mixup, stochastic depth, AdamW, EMA: the
                               config's recipe) without distillation
  train, teacher in step       hard distillation with a random-init teacher run inside the step
  train, precomputed teacher   hard distillation fed stored top-k teacher outputs in the batch
  inference                    the eval-mode forward
img/s (best of --rounds rounds of --iters timed steps after --warmup steps each), compile seconds
(lower + compile), XLA's memory estimate of the compiled program and the peak so far (device
peak bytes on GPU/TPU; the process's max RSS on CPU), FLOPs per image from XLA's cost analysis,
and MFU = achieved FLOP/s / the device's peak (a table by device kind; on CPU the matmul peak
measured at start).

With --timm-python the same rows run in timm (benchmarks/timm_worker.py, the official DeiT
engine.py step in PyTorch) in a subprocess, rounds alternating ours / timm, and the table gives
ours/timm. timm has no precomputed-teacher path: that row's ratio is against timm's
teacher-in-step step (what the original needs), marked '*'. On a CPU that other processes load,
torch's OpenMP threads (spin-waiting) slow down far more than XLA's: compare on a quiet machine
(the header prints the load average), or give timm OMP_WAIT_POLICY=PASSIVE / --timm-threads 1.

Before a program runs, its XLA memory estimate is compared with the free memory; a row that does
not fit is skipped with the largest batch estimated to fit (--find-max-batch searches it by
compiling, without running). Exit status 2 when every requested row failed.

TensorFlow is not needed: deit_jax imports it on first use, for tf.data only.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from typing import Any, Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)
WORKER = os.path.join(REPO, "benchmarks", "timm_worker.py")


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
from flax import nnx  # noqa: E402

from deit_jax import (checkpoint, compile_options, distill, host_memory, models,  # noqa: E402
                      sharding, step)
from deit_jax import teachers  # noqa: E402
from deit_jax import plan as plan_lib  # noqa: E402
from deit_jax import config as base  # noqa: E402

GiB = 2 ** 30
VARIANTS = ("train", "train_teacher", "train_precomputed", "infer")
LABELS = {"train": "train, student alone", "train_teacher": "train, teacher in step",
          "train_precomputed": "train, precomputed", "infer": "inference"}
# What timm times for each of our variants (it has no precomputed-teacher path).
TIMM_WHAT = {"train": "train", "train_teacher": "train_teacher",
             "train_precomputed": "train_teacher", "infer": "infer"}


class SpeedError(Exception):
  """A row (or a variant of it) cannot run; the message says why and what to do."""


def log(msg: str):
  print(msg, file=sys.stderr, flush=True)


# ==============================================================================================
# Rows.
# ==============================================================================================
@dataclasses.dataclass
class Row:
  name: str
  config: ml_collections.ConfigDict  # the model's training config (model, input size, recipe)
  train_batch: int | None
  infer_batch: int | None
  variants: tuple[str, ...]
  teacher: str | None = None  # random-init teacher (teachers.TEACHERS name) for train_teacher
  teacher_classes: int = 1000
  teacher_checkpoint: str | None = None  # or a real one (--config rows whose teacher exists)
  infer_model: str | None = None  # CNN inference row: this model's forward only
  flop_reference: tuple[str, ...] = ()  # rows whose student step this row's FLOPs compare with
  description: str = ""


def load_config_file(spec: str) -> tuple[str, ml_collections.ConfigDict]:
  """'configs/x.py[:arg]' -> (row name, config), as ml_collections' config_flags loads it."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path) and os.path.exists(os.path.join(REPO, path)):
    path = os.path.join(REPO, path)
  if not os.path.isfile(path):
    raise SpeedError(f"--config {spec}: no such file {path!r}.")
  name = os.path.splitext(os.path.basename(path))[0]
  mod_spec = importlib.util.spec_from_file_location(f"_speed_config_{name}", path)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise SpeedError(f"--config {spec}: {path} has no get_config().")
  config = module.get_config(arg) if arg else module.get_config()
  return name + (f":{arg}" if arg else ""), ml_collections.ConfigDict(config.to_dict())


def _zoo_row(name: str, model: str, train_batch: int, infer_batch: int) -> Row:
  c = base.zoo_config(model)
  return Row(name, c, train_batch, infer_batch, VARIANTS, teacher="regnety_160",
             teacher_classes=1000, description=f"{model} at 224, ImageNet recipe, RegNetY-16GF "
             "teacher")


def _demo_row() -> Row:
  _, c = load_config_file(os.path.join(REPO, "configs", "demo_distill.py:hard"))
  return Row("demo", c, c.batch_size, c.eval_batch_size, VARIANTS, teacher="regnety_002",
             teacher_classes=c.data.num_classes,
             description="configs/demo_distill.py:hard student (DeiT, 4 blocks, width 64, "
             "4 px patches, 32 px, 10 classes), regnety_002 teacher")


def _regnety_002_row() -> Row:
  _, c = load_config_file(os.path.join(REPO, "configs", "demo_teacher.py"))
  c.model_kw.conv_impl = ""  # the platform's fastest steps; the demo's 'taps' is quick to compile
  return Row("regnety_002", c, c.batch_size, 128, ("train", "infer"),
             description="configs/demo_teacher.py: RegNetY-200MF trained supervised at 32 px")


def _infer_row(name: str, model: str, batch: int) -> Row:
  c = base.base_config()
  c.model = model
  c.model_kw = ml_collections.ConfigDict({"dtype": "float32"})
  c.aug.input_size = 224
  c.distillation.kind = "none"
  return Row(name, c, None, batch, ("infer",), infer_model=model,
             flop_reference=("deit_ti", "deit_s"),
             description=f"{model} forward at 224 (the in-step teacher's cost)")


CATALOG: dict[str, Callable[[], Row]] = {
    "deit_ti": lambda: _zoo_row("deit_ti", "deit_tiny_distilled_patch16_224", 32, 64),
    "deit_s": lambda: _zoo_row("deit_s", "deit_small_distilled_patch16_224", 32, 64),
    "deit_b": lambda: _zoo_row("deit_b", "deit_base_distilled_patch16_224", 32, 64),
    "demo": _demo_row,
    "regnety_002": _regnety_002_row,
    "regnety_160_infer": lambda: _infer_row("regnety_160_infer", "regnety_160", 16),
    "resnet50_infer": lambda: _infer_row("resnet50_infer", "resnet50", 16),
}
CPU_ROWS = ("deit_ti", "deit_s", "demo", "regnety_002", "regnety_160_infer", "resnet50_infer")


def config_row(spec: str, teacher: str) -> Row:
  """An extra row from a config file: its model, input size, batch sizes, dtype and recipe."""
  name, c = load_config_file(spec)
  if plan_lib.is_cnn(c):
    return Row(name, c, c.batch_size, c.eval_batch_size, ("train", "infer"),
               description=f"{spec}: {c.model} trained supervised")
  if c.distillation.kind == "none":
    return Row(name, c, c.batch_size, c.eval_batch_size, ("train", "infer"),
               description=f"{spec}: {c.model}, no distillation")
  ckpt = c.teacher.checkpoint if c.teacher.checkpoint and os.path.isdir(
      c.teacher.checkpoint) else None
  return Row(name, c, c.batch_size, c.eval_batch_size, VARIANTS, teacher=teacher,
             teacher_classes=c.data.num_classes, teacher_checkpoint=ckpt,
             description=f"{spec}: {c.model}, {c.distillation.kind} distillation from "
             f"{ckpt or 'a random-init ' + teacher}")


def is_deit(row: Row) -> bool:
  return row.infer_model is None and not plan_lib.is_cnn(row.config)


def variant_label(row: Row, variant: str) -> str:
  if variant == "train" and not is_deit(row):
    return "train, supervised"  # a CNN trained as the demo teacher is
  return LABELS[variant]


def select_rows(args) -> list[Row]:
  rows = []
  names = [n for n in (args.rows.split(",") if args.rows else []) if n]
  if args.rows is None and not args.config:
    names = list(CPU_ROWS)
  for n in names:
    if n not in CATALOG:
      raise SpeedError(f"--rows: unknown row {n!r}; known: {', '.join(CATALOG)} (or --config "
                       "configs/x.py).")
    rows.append(CATALOG[n]())
  for spec in args.config or []:
    rows.append(config_row(spec, args.teacher))
  out = []
  for row in rows:
    c = row.config
    if args.dtype:
      c.model_kw.dtype = args.dtype
    if args.train_batch and row.train_batch:
      row.train_batch = args.train_batch
    if args.infer_batch and row.infer_batch:
      row.infer_batch = args.infer_batch
    if args.variants:
      wanted = [v.strip() for v in args.variants.split(",")]
      bad = [v for v in wanted if v not in VARIANTS]
      if bad:
        raise SpeedError(f"--variants: unknown {bad}; use some of {', '.join(VARIANTS)}.")
      row.variants = tuple(v for v in row.variants if v in wanted)
      if not row.variants:
        continue
    if args.attention and is_deit(row):
      for impl in args.attention.split(","):
        r = dataclasses.replace(row, name=f"{row.name}/{impl or 'default'}",
                                config=ml_collections.ConfigDict(c.to_dict()))
        r.config.model_kw.attention_impl = "" if impl in ("", "default", "none") else impl
        out.append(r)
    else:
      out.append(row)
  return out


# ==============================================================================================
# Device: peak FLOP/s, free memory.
# ==============================================================================================
# Dense peak TFLOP/s per chip: (bf16, fp32). GPU fp32 is the TF32 tensor-core peak (XLA's default
# precision for fp32 dots there); TPUs run fp32 dots through bf16 passes by default.
PEAKS = (
    ("h100 pcie", 756.0, 378.0), ("h200", 989.0, 494.0), ("h100", 989.0, 494.0),
    ("a100", 312.0, 156.0), ("tpu v4", 275.0, 275.0), ("tpu v5 lite", 197.0, 197.0),
    ("tpu v5e", 197.0, 197.0), ("tpu v5p", 459.0, 459.0), ("tpu v5", 459.0, 459.0),
    ("tpu v6 lite", 918.0, 918.0), ("tpu v6e", 918.0, 918.0), ("tpu7x", 2307.0, 2307.0),
)


def table_peak(device_kind: str, dtype: str) -> float | None:
  """Peak FLOP/s of one device of this kind, or None for a kind not in the table."""
  kind = device_kind.lower()
  for key, bf16, fp32 in PEAKS:
    if key in kind:
      return (bf16 if dtype in ("bfloat16", "float16") else fp32) * 1e12
  return None


def measure_matmul_peak(dtype: str, n: int | None = None, reps: int = 8) -> float:
  """Best FLOP/s of a jitted n x n matmul on device 0 (CPU: fp32 2048; accelerators: 8192)."""
  cpu = jax.devices()[0].platform == "cpu"
  n = n or (2048 if cpu else 8192)
  dt = jnp.float32 if cpu else jnp.dtype(dtype)
  a = jax.random.normal(jax.random.key(1), (n, n), dt)
  b = jax.random.normal(jax.random.key(2), (n, n), dt)
  f = compile_options.jit(jnp.dot)
  jax.block_until_ready(f(a, b))
  best = math.inf
  inner = 1 if cpu else 10
  for _ in range(reps):
    t = time.perf_counter()
    for _ in range(inner):
      out = f(a, b)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - t) / inner)
  return 2.0 * n ** 3 / best


def _meminfo_available() -> int | None:
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def free_memory(limit_bytes: int | None = None) -> tuple[int | None, str]:
  """(bytes free for one device's program, what that is). --mem-limit overrides it."""
  if limit_bytes:
    return limit_bytes, "--mem-limit"
  stats = jax.devices()[0].memory_stats()
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0)), "device free"
  return _meminfo_available(), "host RAM available (MemAvailable)"


def _host_shared(platform_name: str, num_devices: int) -> int:
  """On CPU every simulated device shares the host's RAM: a program's per-device estimate is
  multiplied by the device count."""
  return num_devices if platform_name == "cpu" else 1


def peak_so_far() -> tuple[int | None, str]:
  stats = jax.devices()[0].memory_stats()
  if stats and "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use (process so far)"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process max RSS so far"


# ==============================================================================================
# Compiled programs: FLOPs, memory, the fit check.
# ==============================================================================================
def cost_flops(cost) -> float | None:
  """'flops' from a cost analysis: a dict, or a list of dicts (older jax), or None."""
  if cost is None:
    return None
  if isinstance(cost, (list, tuple)):
    vals = [c.get("flops") for c in cost if c]
    vals = [v for v in vals if v is not None]
    return float(sum(vals)) if vals else None
  v = cost.get("flops")
  return float(v) if v is not None else None


def memory_estimate(compiled) -> int | None:
  """Bytes one device's program needs by XLA's accounting: arguments + outputs + temporaries,
  minus what outputs alias (donated inputs), plus generated code."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # some backends do not implement it
    return None
  if m is None:
    return None
  total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
           + m.temp_size_in_bytes + getattr(m, "generated_code_size_in_bytes", 0))
  return int(total)


def estimate_max_batch(points: list[tuple[int, int]], free: int, multiple: int,
                       headroom: float = 0.95) -> int | None:
  """Largest batch (a multiple of `multiple`) whose memory fits `headroom * free`, from
  (batch, bytes) points on the line bytes = fixed + per_example * batch. None if none fits."""
  points = sorted(set(points))
  if len(points) >= 2 and points[-1][0] != points[0][0]:
    (b0, m0), (b1, m1) = points[0], points[-1]
    per = max((m1 - m0) / (b1 - b0), 1.0)
    fixed = m1 - per * b1
  else:  # one point: assume it is all per-example memory
    b1, m1 = points[-1]
    per, fixed = m1 / b1, 0.0
  n = int((headroom * free - fixed) // per)
  n -= n % multiple
  return n if n >= multiple else None


def _gib(x: float | None) -> str:
  return "?" if x is None else f"{x / GiB:.1f} GiB" if x >= 0.1 * GiB else f"{x / 2**20:.0f} MiB"


def fit_message(row: str, variant: str, batch: int, need: int, free: int, free_kind: str,
                max_batch: int | None, flag: str) -> str:
  """The one-line message for a program that does not fit."""
  what = "inference" if variant == "infer" else "train" if variant == "train" else (
      LABELS[variant])
  msg = (f"{row} {what} batch {batch} needs ~{_gib(need)}, the device has {_gib(free)} free "
         f"({free_kind}); ")
  if max_batch:
    msg += (f"the largest batch that fits is about {max_batch} (estimated) -- rerun with "
            f"{flag} {max_batch}, or --find-max-batch to search")
  else:
    msg += ("no batch fits (even the smallest needs more than that) -- use a smaller model, "
            "bfloat16 (--dtype bfloat16), or FSDP sharding rules on several devices")
  return msg


def is_oom(e: BaseException) -> bool:
  s = str(e)
  return (isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in s or "out of memory" in s.lower()
          or "Out of memory" in s)


def oom_message(row: str, variant: str, batch: int, flag: str, e: BaseException) -> str:
  first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
  half = max(batch // 2, 1)
  return (f"{row} {LABELS.get(variant, variant)} batch {batch} ran out of memory at run time "
          f"({first}) -- rerun with a smaller {flag} (e.g. {flag} {half}), or --find-max-batch "
          "to search")


# ==============================================================================================
# Our side.
# ==============================================================================================
@dataclasses.dataclass
class Program:
  """One compiled variant and how to call it."""
  variant: str
  batch: int
  compiled: Any
  compile_s: float
  flops: float | None  # per step, all devices
  mem_bytes: int | None  # XLA estimate, one device
  mem_total: int | None  # what it takes of the free memory (x devices sharing host RAM)
  peak: int | None = None  # peak memory so far, after it ran


class Ours:
  """Our step for one row: compiled programs first (nothing allocated but a teacher's weights),
  then state and batches, then timed calls."""

  def __init__(self, row: Row, mesh, *, seed: int = 0):
    self.row, self.mesh, self.seed = row, mesh, seed
    self.n = mesh.devices.size
    self.platform = jax.devices()[0].platform
    self.bsh = sharding.batch_sharding(mesh)
    self.programs: dict[str, Program] = {}
    self.model = self.teacher = self.state = None
    self.inputs: dict[str, tuple] = {}
    c = row.config
    self.dtype = c.model_kw.get("dtype", "float32")
    self.size = c.aug.input_size
    self.num_classes = c.data.num_classes
    self.params = None

  # --- configs ------------------------------------------------------------------------------
  def _train_config(self, variant: str, batch: int) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(self.row.config.to_dict())
    c.batch_size = batch
    c.eval_batch_size = self.row.infer_batch or self.n
    c.grad_accum_steps = c.get("grad_accum_steps", 1)
    kind = c.distillation.kind if c.distillation.kind != "none" else "hard"
    c.distillation.kind = "none"
    try:
      plan_lib.validate_config(c, self.n)  # the teacher checkpoint is not needed: validate as none
    except plan_lib.ConfigError as e:
      raise SpeedError(f"{self.row.name}: {e}") from e
    if variant in ("train_teacher", "train_precomputed"):
      c.distillation.kind = kind
    return c

  def _plan(self, c, batch: int) -> plan_lib.Plan:
    """The plan of an ImageNet-sized run of this config (c.batch_size is `batch`)."""
    assert c.batch_size == batch
    return plan_lib.synthetic_plan(c, self.n)

  def _teacher(self):
    if self.teacher is not None:
      return self.teacher
    row, c = self.row, self.row.config
    rules = [tuple(r) for r in c.sharding.rules]
    if row.infer_model:
      model = teachers.create_teacher(row.infer_model, num_classes=self.num_classes,
                                      dtype=jnp.dtype(self.dtype))
      self.params = teachers.param_count(model)
      self.teacher = distill.Teacher(model, student_img_size=self.size, student_mean=c.aug.mean,
                                     student_std=c.aug.std, img_size=None, mean=c.aug.mean,
                                     std=c.aug.std, mesh=self.mesh, rules=rules)
      return self.teacher
    if row.teacher_checkpoint:
      model = checkpoint.load_model(row.teacher_checkpoint)
      try:  # timm runs the same architecture
        row.teacher = teachers.describe(model).get("name") or row.teacher
        row.teacher_classes = model.num_classes
      except (TypeError, AttributeError):
        pass
    else:
      model = teachers.create_teacher(row.teacher, num_classes=row.teacher_classes,
                                      dtype=jnp.dtype(self.dtype))
    t = c.teacher
    self.teacher = distill.Teacher(model, student_img_size=self.size, student_mean=c.aug.mean,
                                   student_std=c.aug.std, img_size=t.img_size, mean=t.mean,
                                   std=t.std, mesh=self.mesh, rules=rules)
    return self.teacher

  # --- abstract inputs ------------------------------------------------------------------------
  def _batch_spec(self, variant: str, batch: int, c) -> dict:
    s = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=self.bsh)
    spec = {"image": s((batch, self.size, self.size, 3), jnp.float32),
            "label": s((batch,), jnp.int32)}
    if variant == "train_precomputed":
      k = 1 if c.distillation.kind == "hard" else c.teacher.top_k
      spec["teacher_topk_indices"] = s((batch, k), jnp.int32)
      spec["teacher_topk_values"] = s((batch, k), jnp.float32)
    return spec

  def _abstract(self, tree, shardings):
    return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                        tree, shardings)

  def _model_state(self, c, batch):
    if self.model is None:
      self.model = step.build_model_state(c, self._plan(c, batch), self.mesh)
      self.params = self.model.num_params
    return self.model

  # --- compile --------------------------------------------------------------------------------
  def lower(self, variant: str, batch: int):
    """The lowered program of a variant at a batch size, lowered on abstract arguments: nothing
    is allocated but a teacher's weights."""
    row = self.row
    if variant == "infer":
      if batch % self.n:
        raise SpeedError(f"{row.name}: inference batch {batch} must be divisible by the device "
                         f"count {self.n}.")
      x = jax.ShapeDtypeStruct((batch, self.size, self.size, 3), jnp.float32, sharding=self.bsh)
      if row.infer_model:
        teacher = self._teacher()
        fn = compile_options.jit(teacher.logits)
        v = self._abstract(teacher.params, teacher.shardings)
      else:
        c = self._train_config("train", row.train_batch or batch)
        model = self._model_state(c, row.train_batch or batch)
        graphdef = model.eval_graphdef
        fn = compile_options.jit(lambda variables, images: nnx.merge(graphdef, variables)(images))
        v = self._abstract(step.persistent(model.abstract_state), step.persistent(model.state_sh))
      return fn.lower(v, x)
    c = self._train_config(variant, batch)
    model = self._model_state(c, batch)
    plan = self._plan(c, batch)
    dist = None  # the student alone
    if variant == "train_teacher":
      dist = distill.Distillation(c, num_classes=self.num_classes, source="model",
                                  teacher=self._teacher())
    elif variant == "train_precomputed":
      dist = distill.Distillation(c, num_classes=self.num_classes, source="precomputed")
    train_step = step.jit_train_step(c, plan, model, self.mesh, dist)
    state = self._abstract(model.abstract_state, model.state_sh)
    return train_step.lower(state, self._batch_spec(variant, batch, c),
                            dist.params if dist else None)

  def compile(self, variant: str, batch: int) -> Program:
    t = time.perf_counter()
    lowered = self.lower(variant, batch)
    compiled = lowered.compile()
    dt = time.perf_counter() - t
    try:
      flops = cost_flops(compiled.cost_analysis())
    except Exception:
      flops = None
    if flops is not None and self.n > 1:
      flops *= self.n  # the cost analysis of an SPMD program is per device
    mem = memory_estimate(compiled)
    total = mem * _host_shared(self.platform, self.n) if mem is not None else None
    return Program(variant, batch, compiled, dt, flops, mem, total)

  def step_flops(self, variant: str, batch: int) -> float | None:
    """FLOPs of a step, all devices, from the lowered (not yet partitioned) program's cost
    analysis: no compile."""
    try:
      return cost_flops(self.lower(variant, batch).cost_analysis())
    except Exception:
      return None

  # --- run ------------------------------------------------------------------------------------
  def allocate(self, variants):
    row = self.row
    k_img, k_lab, k_top = jax.random.split(jax.random.key(self.seed + 1), 3)
    put = lambda x: jax.device_put(x, self.bsh)
    if any(v.startswith("train") for v in variants) or (
        "infer" in variants and not row.infer_model):
      if self.state is None:
        self.state = self.model.init()
    for v in variants:
      p = self.programs[v]
      b = p.batch
      images = put(jax.random.normal(k_img, (b, self.size, self.size, 3), jnp.float32))
      if v == "infer":
        if row.infer_model:
          variables = self.teacher.params
        else:
          # A copy: the train steps donate (delete) the state's buffers.
          variables = jax.tree.map(jnp.copy, step.persistent(self.state))
        self.inputs[v] = (variables, images)
        continue
      batch = {"image": images,
               "label": put(jax.random.randint(k_lab, (b,), 0, self.num_classes, jnp.int32))}
      if v == "train_precomputed":
        c = self.row.config
        k = 1 if c.distillation.kind in ("hard", "none") else c.teacher.top_k
        batch["teacher_topk_indices"] = put(
            jax.random.randint(k_top, (b, k), 0, self.num_classes, jnp.int32))
        batch["teacher_topk_values"] = put(jax.random.normal(k_top, (b, k), jnp.float32))
      self.inputs[v] = (batch, self.teacher.params if v == "train_teacher" else None)

  def time(self, variant: str, iters: int, warmup: int) -> float:
    """Seconds per call, after `warmup` calls."""
    fn = self.programs[variant].compiled
    if variant == "infer":
      variables, images = self.inputs[variant]
      out = None
      for _ in range(warmup):
        out = fn(variables, images)
      jax.block_until_ready(out)
      t = time.perf_counter()
      for _ in range(iters):
        out = fn(variables, images)
      jax.block_until_ready(out)
      return (time.perf_counter() - t) / iters
    batch, tparams = self.inputs[variant]
    state = self.state
    for _ in range(warmup):
      state, _ = fn(state, batch, tparams)
    jax.block_until_ready(state)
    t = time.perf_counter()
    for _ in range(iters):
      state, _ = fn(state, batch, tparams)
    jax.block_until_ready(state)
    self.state = state
    return (time.perf_counter() - t) / iters

  def release(self):
    self.programs.clear()
    self.inputs.clear()
    self.state = self.teacher = self.model = None
    gc.collect()


def batch_flag(variant: str) -> str:
  return "--infer-batch" if variant == "infer" else "--train-batch"


def row_batch(row: Row, variant: str) -> int:
  return row.infer_batch if variant == "infer" else row.train_batch


def _fit_or_raise(ours: Ours, prog: Program, free: int | None, free_kind: str):
  """SpeedError with the largest batch estimated to fit, if the program does not fit."""
  if free is None or prog.mem_total is None or prog.mem_total <= free:
    return
  variant, b = prog.variant, prog.batch
  points = [(b, prog.mem_total)]
  half = max(ours.n, (b // 2) - (b // 2) % ours.n)
  if half < b:
    try:
      p2 = ours.compile(variant, half)
      if p2.mem_total is not None:
        points.append((half, p2.mem_total))
    except Exception:
      pass
  est = estimate_max_batch(points, free, ours.n)
  raise SpeedError(fit_message(ours.row.name, variant, b, prog.mem_total, free, free_kind, est,
                               batch_flag(variant)))


def find_max_batch(ours: Ours, variant: str, free: int, start: int, *, limit: int = 2 ** 20,
                   log_fn=log) -> tuple[int | None, int | None]:
  """Doubling then bisection on the compiled program's memory estimate (nothing runs).
  Returns (largest batch that fits, its estimated bytes)."""
  n = ours.n
  cache: dict[int, int | None] = {}

  def need(b):
    if b not in cache:
      p = ours.compile(variant, b)
      cache[b] = p.mem_total
      log_fn(f"  {ours.row.name} {variant} batch {b}: ~{_gib(p.mem_total)} "
             f"(compile {p.compile_s:.1f} s)")
    return cache[b]

  def fits(b):
    m = need(b)
    return m is not None and m <= free

  b = max(n, start - start % n)
  if fits(b):
    lo, hi = b, None
    while hi is None and lo * 2 <= limit:
      if fits(lo * 2):
        lo *= 2
      else:
        hi = lo * 2
    if hi is None:
      return lo, cache[lo]
  else:
    hi, lo = b, None
    while lo is None and hi > n:
      nxt = max(n, (hi // 2) - (hi // 2) % n)
      if fits(nxt):
        lo = nxt
      else:
        hi = nxt
        if nxt == n:
          return None, None
    if lo is None:
      return None, None
  # Bisection to ~3% (in multiples of the device count).
  while hi - lo > max(n, lo // 32):
    mid = (lo + hi) // 2
    mid -= mid % n
    if mid <= lo:
      break
    if fits(mid):
      lo = mid
    else:
      hi = mid
  return lo, cache[lo]


# ==============================================================================================
# timm side.
# ==============================================================================================
class TimmError(Exception):
  pass


class TimmWorker:
  """benchmarks/timm_worker.py in a subprocess, spoken to in JSON lines."""

  def __init__(self, python: str):
    env = dict(os.environ)
    for k in ("XLA_FLAGS", "JAX_PLATFORMS"):
      env.pop(k, None)
    self.proc = subprocess.Popen([python, WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True, bufsize=1, env=env)

  def call(self, **req) -> dict:
    if self.proc.poll() is not None:
      raise TimmError(f"the timm worker exited (status {self.proc.returncode})")
    try:
      self.proc.stdin.write(json.dumps(req) + "\n")
      self.proc.stdin.flush()
      line = self.proc.stdout.readline()
    except (BrokenPipeError, OSError) as e:
      raise TimmError(f"the timm worker is gone ({e})") from e
    if not line:
      raise TimmError(f"the timm worker exited (status {self.proc.wait()}); see its stderr above")
    out = json.loads(line)
    if not out.get("ok"):
      raise TimmError(out.get("error", "unknown error"))
    return out

  def close(self):
    try:
      if self.proc.poll() is None:
        self.call(op="quit")
    except TimmError:
      pass
    try:
      self.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
      self.proc.kill()


def timm_spec(row: Row, device: str) -> dict:
  """The row for timm_worker.py: the same model, input, batch sizes and recipe as ours."""
  c = row.config
  o = c.optimizer
  spec = {"num_classes": c.data.num_classes, "img_size": c.aug.input_size,
          "train_batch": row.train_batch, "infer_batch": row.infer_batch,
          "dtype": c.model_kw.get("dtype", "float32"), "device": device, "seed": c.seed}
  if row.infer_model:
    spec.update(kind="infer", model=row.infer_model)
    return spec
  if plan_lib.is_cnn(c):
    spec.update(kind="cnn", model=c.model)
  else:
    cfg = models.model_config(c.model, **plan_lib.model_overrides(c))
    spec.update(kind="deit", model=c.model, model_kw={
        "patch_size": cfg.patch_size, "embed_dim": cfg.embed_dim, "depth": cfg.depth,
        "num_heads": cfg.num_heads, "mlp_ratio": cfg.mlp_ratio, "qkv_bias": cfg.qkv_bias,
        "drop_path_rate": cfg.drop_path_rate})
  skip = ["pos_embed", "cls_token"] + ([] if o.get("decay_dist_token", True) else ["dist_token"])
  spec["optimizer"] = {"lr": o.lr * row.train_batch / o.lr_base_batch,
                       "weight_decay": o.weight_decay, "b1": o.b1, "b2": o.b2, "eps": o.eps,
                       "clip_grad": o.clip_grad, "no_decay": skip}
  m = c.mixup
  spec["mixup"] = {"mixup_alpha": m.mixup_alpha, "cutmix_alpha": m.cutmix_alpha,
                   "cutmix_minmax": tuple(m.cutmix_minmax) if m.cutmix_minmax else None,
                   "prob": m.prob, "switch_prob": m.switch_prob}
  spec["label_smoothing"] = c.label_smoothing
  spec["ema_decay"] = c.ema_decay
  d = c.distillation
  spec.update(alpha=d.alpha, tau=d.tau, distill_kind=d.kind if d.kind != "none" else "hard")
  if row.teacher and ("train_teacher" in row.variants or "train_precomputed" in row.variants):
    spec["teacher"] = {"model": row.teacher, "num_classes": row.teacher_classes}
  return spec


# ==============================================================================================
# The run.
# ==============================================================================================
COLUMNS = (("row", 18, "<"), ("variant", 24, "<"), ("batch", 6, ">"), ("ours img/s", 11, ">"),
           ("timm img/s", 11, ">"), ("ours/timm", 10, ">"), ("compile s", 10, ">"),
           ("XLA mem", 10, ">"), ("peak mem", 10, ">"), ("GFLOP/img", 10, ">"), ("MFU", 7, ">"))


def _fmt_rate(x):
  return "-" if x is None else f"{x:,.1f}" if x < 1000 else f"{x:,.0f}"


def format_result(r: dict) -> list[str]:
  """One table row's cells."""
  if r.get("error"):
    return [r["row"], r.get("label") or LABELS.get(r["variant"], r["variant"]),
            str(r.get("batch") or "-"),
            "FAILED", "", "", "", "", "", "", ""]
  ratio = "-" if r.get("ratio") is None else f"{r['ratio']:.2f}" + (
      "*" if r["variant"] == "train_precomputed" else "")
  timm = _fmt_rate(r.get("timm_img_s")) if not r.get("timm_error") else "err"
  return [r["row"], r.get("label") or LABELS[r["variant"]], str(r["batch"]),
          _fmt_rate(r["ours_img_s"]), timm,
          ratio, f"{r['compile_s']:.1f}", _gib(r.get("xla_mem_bytes")).replace(" ", ""),
          _gib(r.get("peak_bytes")).replace(" ", ""),
          "-" if r.get("gflop_per_img") is None else f"{r['gflop_per_img']:.3g}",
          "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"]


def table_line(cells) -> str:
  return "  ".join(f"{c:{a}{w}}" for c, (_, w, a) in zip(cells, COLUMNS))


def table_header() -> str:
  head = table_line([name for name, _, _ in COLUMNS])
  return head + "\n" + "-" * len(head)


def markdown_table(header: dict, results: list[dict], notes: list[str]) -> str:
  lines = ["# Speed: deit_jax vs timm", ""]
  for k, v in header.items():
    lines.append(f"- {k}: {v}")
  lines += ["", "| " + " | ".join(n for n, _, _ in COLUMNS) + " |",
            "|" + "|".join("---" if a == "<" else "---:" for _, _, a in COLUMNS) + "|"]
  for r in results:
    lines.append("| " + " | ".join(c.replace("|", "/") for c in format_result(r)) + " |")
  lines.append("")
  lines += [f"- {n}" for n in notes]
  return "\n".join(lines) + "\n"


def legend(platform_name: str, peak_kind: str, timm: bool, precomputed: bool) -> list[str]:
  notes = [
      "img/s: best of the rounds, each the mean of --iters steps after --warmup; batch is "
      "global (all devices)",
      "compile s: lower + compile of our step (timm is eager: no compile)",
      "XLA mem: XLA's estimate for the compiled program per device (arguments + outputs + temps "
      "- donated)",
      f"peak mem: {peak_kind}",
      "GFLOP/img: XLA cost analysis of our compiled step / batch (a train step counts forward, "
      "backward, optimizer, EMA)",
      "MFU: (XLA FLOPs / step time) / device peak" + (
          " (on CPU: the matmul peak measured at start)" if platform_name == "cpu" else ""),
  ]
  if timm and precomputed:
    notes.append("* timm has no precomputed-teacher path: the ratio is against timm's "
                 "teacher-in-step step (what the original needs)")
  if timm and platform_name == "cpu":
    notes.append("on a CPU shared with other processes torch's OpenMP threads slow down far more "
                 "than XLA's: compare on a quiet machine (load average above), or with "
                 "OMP_WAIT_POLICY=PASSIVE (or --timm-threads 1) for timm")
  return notes


def _header(args, rows, n: int, dev, mem_limit) -> tuple[dict, str, int, str]:
  """(header lines, dtype, free bytes, what the free figure is)."""
  dtype = args.dtype or ("mixed" if len({r.config.model_kw.get("dtype", "float32") for r in rows})
                         > 1 else (rows[0].config.model_kw.get("dtype", "float32") if rows
                                   else "float32"))
  header = {"device": f"{n} x {dev.device_kind} ({dev.platform})",
            "jax": f"{jax.__version__} (flax {importlib.metadata.version('flax')}, optax "
                   f"{importlib.metadata.version('optax')})",
            "host": f"{platform.node()}, {os.cpu_count()} CPU cores, load average "
                    f"{os.getloadavg()[0]:.2f} at start",
            "dtype": dtype, "rounds x iters (+warmup)": f"{args.rounds} x {args.iters} "
                                                         f"(+{args.warmup})"}
  if dev.platform == "cpu":
    header["host malloc"] = ("heap reused (deit_jax.host_memory)" if host_memory.configure("cpu")
                             else "as the environment sets it (MALLOC_* / GLIBC_TUNABLES)"
                             if host_memory.user_chose() else "the C library's default")
  free, free_kind = free_memory(mem_limit)
  header["free memory"] = f"{_gib(free)} ({free_kind})"
  return header, dtype, free, free_kind


def _matmul_peak(args, dev, dtype: str, header: dict) -> float:
  """The measured (or given) matmul peak; the header says which and, off CPU, the table's."""
  if args.matmul_peak and dev.platform == "cpu":
    measured = args.matmul_peak * 1e9
  else:
    log("measuring the matmul peak ...")
    measured = measure_matmul_peak(dtype if dtype != "mixed" else "float32")
  if dev.platform == "cpu":
    header["matmul peak"] = (f"{measured / 1e9:.1f} GFLOP/s " + (
        "(--matmul-peak)" if args.matmul_peak else "measured (fp32 2048^2 jnp.dot)"))
  else:
    tp = table_peak(dev.device_kind, dtype)
    header["matmul peak"] = (f"{measured / 1e12:.0f} TFLOP/s measured ({dtype} 8192^2); "
                             f"MFU against the {'table' if tp else 'unknown'} peak"
                             + (f" {tp / 1e12:.0f} TFLOP/s per device" if tp else ""))
  return measured


def _start_timm(args, header: dict, timm_device: str):
  """The timm worker (None without --timm-python or when it cannot start)."""
  if not args.timm_python:
    return None
  try:
    worker = TimmWorker(args.timm_python)
    hello = worker.call(op="hello")
    threads = f"{hello['threads']} (default)"
    if args.timm_threads:
      threads = f"{worker.call(op='threads', n=args.timm_threads)['threads']} (--timm-threads)"
    omp = os.environ.get("OMP_WAIT_POLICY")
    header["timm"] = (f"timm {hello['timm']}, torch {hello['torch']}, torch threads {threads}"
                      + (f", OMP_WAIT_POLICY={omp}" if omp else "") + f", device {timm_device}"
                      + (f" ({hello['cuda_device']})" if timm_device == "cuda" else ""))
    return worker
  except (TimmError, OSError, json.JSONDecodeError) as e:
    log(f"timm: cannot start {args.timm_python} {WORKER}: {e}; continuing without timm.")
    header["timm"] = f"failed to start: {e}"
    return None


def _failure(row: Row, v: str, e: Exception) -> str:
  return (oom_message(row.name, v, row_batch(row, v), batch_flag(v), e) if is_oom(e)
          else f"{row.name} {LABELS[v]}: {type(e).__name__}: {e}")


def _compile_row(ours: "Ours", row: Row, mem_limit) -> dict[str, str]:
  """Compiles every variant of the row that fits; {variant: why it failed}."""
  failed: dict[str, str] = {}
  for v in row.variants:
    b = row_batch(row, v)
    try:
      log(f"[{row.name}] compiling {variant_label(row, v)} (batch {b}) ...")
      prog = ours.compile(v, b)
      log(f"[{row.name}]   {prog.compile_s:.1f} s, XLA estimate {_gib(prog.mem_bytes)}"
          + (f", {prog.flops / b / 1e9:.3g} GFLOP/img" if prog.flops else ""))
      f, fk = free_memory(mem_limit)
      _fit_or_raise(ours, prog, f, fk)
      ours.programs[v] = prog
    except SpeedError as e:
      failed[v] = str(e)
    except Exception as e:  # noqa: BLE001
      failed[v] = _failure(row, v, e)
    if v in failed:
      log("ERROR: " + failed[v])
  return failed


@dataclasses.dataclass
class Timings:
  ours: dict[str, list[float]]
  timm: dict[str, list[float]]
  timm_err: dict[str, str]
  timm_info: dict


def _time_row(ours: "Ours", row: Row, worker, timm_device: str, args,
              failed: dict[str, str]) -> Timings:
  """Allocates, then --rounds rounds of every compiled variant, ours then timm's."""
  ok = [v for v in row.variants if v in ours.programs]
  t = Timings({v: [] for v in ok}, {v: [] for v in ok}, {}, {})
  try:
    ours.allocate(ok)
  except Exception as e:  # noqa: BLE001
    msg = (oom_message(row.name, ok[0], row_batch(row, ok[0]), batch_flag(ok[0]), e)
           if is_oom(e) else f"{row.name}: allocating: {type(e).__name__}: {e}")
    log("ERROR: " + msg)
    failed.update({v: msg for v in ok})
    return t
  if worker is not None and ok:
    try:
      log(f"[{row.name}] timm setup ...")
      t.timm_info = worker.call(op="setup", row=timm_spec(row, timm_device))
    except TimmError as e:
      log(f"[{row.name}] timm setup failed: {e}")
      t.timm_err = {v: str(e) for v in ok}
  for r in range(args.rounds):
    timm_round: dict[str, dict] = {}
    for v in list(ok):
      try:
        t.ours[v].append(ours.time(v, args.iters, args.warmup))
      except Exception as e:  # noqa: BLE001
        failed[v] = _failure(row, v, e)
        log("ERROR: " + failed[v])
        ok.remove(v)
        if v.startswith("train"):  # the donated state is gone: no more train variants
          for w in [w for w in ok if w.startswith("train")]:
            failed[w] = failed[v]
            ok.remove(w)
        continue
      ours.programs[v].peak = peak_so_far()[0]
      if worker is not None and v not in t.timm_err:
        w = TIMM_WHAT[v]
        try:
          if w not in timm_round:
            timm_round[w] = worker.call(op="time", what=w, iters=args.iters, warmup=args.warmup)
          t.timm[v].append(timm_round[w]["seconds"])
        except TimmError as e:
          t.timm_err[v] = str(e)
          log(f"[{row.name}] timm {w}: {e}")
      b = row_batch(row, v)
      log(f"[{row.name}] round {r + 1}/{args.rounds} {variant_label(row, v)}: ours "
          f"{b / t.ours[v][-1]:.1f} img/s"
          + (f", timm {b / t.timm[v][-1]:.1f} img/s"
             if t.timm.get(v) and len(t.timm[v]) == r + 1 else ""))
  return t


def _result(ours: "Ours", row: Row, v: str, t: Timings, failed: dict[str, str], peak: float | None,
            peak_kind: str, with_timm: bool) -> dict:
  """One table row: best of the rounds, ratio to timm's best, compile, memory, MFU."""
  b = row_batch(row, v)
  res = {"row": row.name, "variant": v, "label": variant_label(row, v), "batch": b}
  if v in failed or v not in ours.programs:
    return {**res, "error": failed.get(v, "not run")}
  p = ours.programs[v]
  best = min(t.ours[v])
  res.update({"ours_img_s": b / best, "ours_step_s": best, "ours_times_s": t.ours[v],
              "compile_s": p.compile_s, "xla_mem_bytes": p.mem_bytes,
              "peak_bytes": p.peak, "peak_kind": peak_kind,
              "flops_per_step": p.flops,
              "gflop_per_img": p.flops / b / 1e9 if p.flops else None,
              "params": ours.params, "dtype": row.config.model_kw.get("dtype", "float32")})
  res["mfu"] = p.flops / best / peak if (p.flops and peak) else None
  res["achieved_tflop_s"] = p.flops / best / 1e12 if p.flops else None
  if with_timm:
    if t.timm.get(v):
      tb = min(t.timm[v])
      res.update(timm_img_s=b / tb, timm_step_s=tb, timm_times_s=t.timm[v],
                 ratio=(b / best) / (b / tb), timm_what=TIMM_WHAT[v],
                 timm_params=t.timm_info.get("params"))
    else:
      res["timm_error"] = t.timm_err.get(v, "not run")
  return res


def _flop_shares(row: Row, row_results: list[dict], step_flops_per_img: dict[str, float], mesh,
                 args) -> list[str]:
  """The in-step teacher's FLOPs next to the students' steps (notes for the table)."""
  r0 = next(r for r in row_results if not r.get("error"))
  if not r0.get("flops_per_step"):
    return []
  notes = []
  t_img = r0["flops_per_step"] / r0["batch"]
  for ref in row.flop_reference:
    s_img = step_flops_per_img.get(ref)
    if s_img is None:
      s_img = reference_step_flops(ref, mesh, args)
      if s_img:
        step_flops_per_img[ref] = s_img
    if s_img:
      notes.append(f"{row.name}: forward {t_img / 1e9:.2f} GFLOP/img = {t_img / s_img:.2f}x "
                   f"the {ref} train step ({s_img / 1e9:.2f} GFLOP/img); inside that step it "
                   f"would be {100 * t_img / (t_img + s_img):.0f}% of the FLOPs")
      r0.setdefault("flop_share", []).append(
          {"row": row.name, "reference": ref, "teacher_gflop_per_img": t_img / 1e9,
           "student_step_gflop_per_img": s_img / 1e9, "ratio": t_img / s_img})
  return notes


def _print_problems(row: Row, ours: "Ours", row_results: list[dict], t: Timings,
                    with_timm: bool) -> list[str]:
  for res in row_results:
    if res.get("error"):
      print(f"  ! {res['error']}", flush=True)
    elif res.get("timm_error") and with_timm:
      print(f"  ! timm {res['variant']}: {res['timm_error']}", flush=True)
  if t.timm_info.get("params") and ours.params and t.timm_info["params"] != ours.params:
    msg = (f"{row.name}: parameter counts differ: ours {ours.params:,}, timm "
           f"{t.timm_info['params']:,}")
    print(f"  ! {msg}", flush=True)
    return [msg]
  return []


def run(args) -> int:
  rows = select_rows(args)
  dev = jax.devices()[0]
  n = args.devices or jax.device_count()
  if not 1 <= n <= jax.device_count():
    raise SpeedError(f"--devices {n}: there are {jax.device_count()} devices.")
  mesh = sharding.make_mesh(n)
  mem_limit = int(args.mem_limit * GiB) if args.mem_limit else None
  header, dtype, free, free_kind = _header(args, rows, n, dev, mem_limit)
  if args.find_max_batch:
    header.pop("rounds x iters (+warmup)")
    return find_max_batches(args, rows, mesh, free, free_kind, header)
  measured = _matmul_peak(args, dev, dtype, header)

  def peak_for(row: Row) -> float | None:
    if dev.platform == "cpu":
      return measured  # the host's peak, shared by any simulated devices
    p = table_peak(dev.device_kind, row.config.model_kw.get("dtype", "float32"))
    return p * n if p else None

  timm_device = "cuda" if dev.platform == "gpu" else "cpu"
  worker = _start_timm(args, header, timm_device)
  _, peak_kind = peak_so_far()
  notes = legend(dev.platform, peak_kind, worker is not None,
                 any("train_precomputed" in r.variants for r in rows))
  for k, v in header.items():
    print(f"{k:>26}: {v}")
  print()
  print(table_header(), flush=True)

  results: list[dict] = []
  row_ok: dict[str, bool] = {}
  step_flops_per_img: dict[str, float] = {}
  extra_notes: list[str] = []

  def save():
    if args.json:
      with open(args.json, "w") as f:
        json.dump({"header": header, "results": results, "notes": notes + extra_notes}, f,
                  indent=2)
    if args.markdown:
      with open(args.markdown, "w") as f:
        f.write(markdown_table(header, results, notes + extra_notes))

  for row in rows:
    ours = Ours(row, mesh)
    log(f"[{row.name}] {row.description}")
    failed = _compile_row(ours, row, mem_limit)
    t = _time_row(ours, row, worker, timm_device, args, failed)
    row_results = [_result(ours, row, v, t, failed, peak_for(row), peak_kind, worker is not None)
                   for v in row.variants]
    for res in row_results:
      if res["variant"] == "train" and res.get("flops_per_step"):
        step_flops_per_img[row.name.split("/")[0]] = res["flops_per_step"] / res["batch"]
      results.append(res)
      print(table_line(format_result(res)), flush=True)
    extra_notes += _print_problems(row, ours, row_results, t, worker is not None)
    row_ok[row.name] = any(not r.get("error") for r in row_results)
    if row.flop_reference and row_ok[row.name]:
      for share in _flop_shares(row, row_results, step_flops_per_img, mesh, args):
        extra_notes.append(share)
        print(f"  {share}", flush=True)
    ours.release()
    save()
  if worker is not None:
    worker.close()
  extra_notes.append(f"load average (1 min) at the end: {os.getloadavg()[0]:.2f} on "
                     f"{os.cpu_count()} cores")
  print()
  for note in notes + extra_notes[-1:]:
    print(f"  {note}")
  save()
  if rows and not any(row_ok.values()):
    return 2
  return 0


def reference_step_flops(name: str, mesh, args) -> float | None:
  """FLOPs per image of a catalog row's student-alone train step, from the lowered program."""
  if name not in CATALOG:
    return None
  row = CATALOG[name]()
  if args.dtype:
    row.config.model_kw.dtype = args.dtype
  log(f"lowering the {name} train step for its FLOPs ...")
  ours = Ours(row, mesh)
  flops = ours.step_flops("train", row.train_batch)
  ours.release()
  return flops / row.train_batch if flops else None


def find_max_batches(args, rows, mesh, free, free_kind, header) -> int:
  for k, v in header.items():
    print(f"{k:>26}: {v}")
  print()
  results, any_ok = [], False
  for row in rows:
    ours = Ours(row, mesh)
    for v in row.variants:
      b = row_batch(row, v)
      label = variant_label(row, v)
      log(f"[{row.name}] searching the largest {label} batch (compiles only) ...")
      try:
        best, need = find_max_batch(ours, v, free, b)
      except SpeedError as e:
        print(f"{row.name:18}  {label:24}  {e}", flush=True)
        continue
      except Exception as e:  # noqa: BLE001
        print(f"{row.name:18}  {label:24}  {type(e).__name__}: {e}", flush=True)
        continue
      any_ok = any_ok or best is not None
      results.append({"row": row.name, "variant": v, "max_batch": best, "bytes": need,
                      "free_bytes": free})
      print(f"{row.name:18}  {label:24}  " + (
          f"largest batch that fits: {best} (~{_gib(need)} of {_gib(free)} free, XLA estimate; "
          f"use {batch_flag(v)} {best})" if best else
          f"no batch fits in {_gib(free)}"), flush=True)
    ours.release()
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"header": header, "max_batch": results}, f, indent=2)
  return 0 if any_ok else 2


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="Rows: " + ", ".join(CATALOG) + f". Default: "
                              f"{','.join(CPU_ROWS)}.")
  p.add_argument("--rows", default=None,
                 help="comma list of rows (default: all CPU rows; none when --config is given)")
  p.add_argument("--config", action="append", metavar="FILE[:ARG]",
                 help="an extra row from a config file (configs/x.py[:arg]); repeatable")
  p.add_argument("--teacher", default="regnety_160",
                 help="random-init teacher for --config rows whose teacher checkpoint is absent")
  p.add_argument("--variants", default=None,
                 help=f"comma list of {','.join(VARIANTS)} (default: each row's)")
  p.add_argument("--iters", type=int, default=3, help="timed steps per round")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps before each round")
  p.add_argument("--rounds", type=int, default=3, help="rounds (best is kept), ours/timm "
                 "alternating")
  p.add_argument("--timm-python", default=None,
                 help="python with torch + timm: run the same rows in timm side by side")
  p.add_argument("--timm-threads", type=int, default=None,
                 help="torch.set_num_threads in the timm worker (default: torch's, all cores)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                 help="compute dtype of every row (default: each config's model_kw.dtype)")
  p.add_argument("--train-batch", type=int, default=None, help="global train batch of every row")
  p.add_argument("--infer-batch", type=int, default=None, help="global inference batch")
  p.add_argument("--attention", default=None,
                 help="comma list of attention_impl for DeiT rows (xla, cudnn, default): one row "
                 "each")
  p.add_argument("--json", default=None, help="write all results as JSON here")
  p.add_argument("--markdown", default=None, help="write the results table as Markdown here")
  p.add_argument("--find-max-batch", action="store_true",
                 help="search each row's largest batch that fits (compiles only, runs nothing)")
  p.add_argument("--mem-limit", type=float, default=None, metavar="GIB",
                 help="pretend this much memory is free (GiB) for the fit check")
  p.add_argument("--matmul-peak", type=float, default=None, metavar="GFLOPS",
                 help="on CPU: take this as the peak instead of measuring it")
  p.add_argument("--devices", type=int, default=None,
                 help="use the first N devices (default: all)")
  args = p.parse_args(argv)
  for k in ("iters", "rounds"):
    if getattr(args, k) < 1:
      p.error(f"--{k} must be >= 1")
  if args.warmup < 0:
    p.error("--warmup must be >= 0")
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    return run(args)
  except SpeedError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
