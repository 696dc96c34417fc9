"""The timm side of benchmarks/speed.py: the official DeiT train step in PyTorch + timm.

Run by speed.py with the python that has torch and timm (`--timm-python`); it never imports jax or
deit_jax. It speaks JSON lines: one request per stdin line, one reply per stdout line (anything
else the libraries print goes to stderr).

  {"op": "hello"}                        -> {"ok": true, "torch": ..., "timm": ..., "threads": ...}
  {"op": "threads", "n": 1}              -> {"ok": true, "threads": 1}   (torch.set_num_threads)
  {"op": "setup", "row": {...}}          -> {"ok": true, "params": ..., "teacher_params": ...}
  {"op": "time", "what": "train" | "train_teacher" | "infer", "iters": 3, "warmup": 1}
                                         -> {"ok": true, "seconds": <per step>, "peak_bytes": ...}
  {"op": "quit"}
Failures answer {"ok": false, "error": "..."} and the worker keeps serving.

The train step is facebookresearch/deit engine.py `train_one_epoch` for one batch: timm Mixup on
the batch (label smoothing folded into the targets), the forward under autocast (bf16 when asked;
off in fp32), SoftTargetCrossEntropy on the class head, DeiT's DistillationLoss with the frozen
teacher run inside the step (hard: CE of the distillation head against the teacher's argmax;
total = (1 - alpha) * base + alpha * distill), `loss.item()` (the official finiteness check),
zero_grad, backward, AdamW step, and the EMA update (timm ModelEmaV3) when the row has an EMA.
The row spec (built by speed.py from our config) carries every hyperparameter, so both sides do
the same work.
"""
import json
import math
import os
import resource
import sys
import time

_PROTOCOL_OUT = sys.stdout
sys.stdout = sys.stderr  # stray prints from libraries must not break the protocol

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import timm  # noqa: E402
from timm.data import Mixup  # noqa: E402
from timm.loss import SoftTargetCrossEntropy  # noqa: E402
from timm.utils import ModelEmaV3  # noqa: E402


def reply(obj):
  _PROTOCOL_OUT.write(json.dumps(obj) + "\n")
  _PROTOCOL_OUT.flush()


def param_groups(model, weight_decay, skip):
  """timm's param_groups_weight_decay: no decay on 1-D parameters (biases, norms) and on `skip`."""
  decay, no_decay = [], []
  for name, p in model.named_parameters():
    if not p.requires_grad:
      continue
    (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
  return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


class Row:

  def __init__(self, spec):
    self.spec = spec
    want = spec.get("device", "cpu")
    if want == "cuda" and not torch.cuda.is_available():
      raise RuntimeError("the row asks for cuda but torch sees no GPU")
    self.device = torch.device(want)
    self.amp_dtype = {"float32": None, "bfloat16": torch.bfloat16,
                      "float16": torch.float16}[spec.get("dtype", "float32")]
    torch.manual_seed(spec.get("seed", 0))
    self.model = self.teacher = self.ema = self.optimizer = self.mixup = None
    kind = spec["kind"]  # 'deit' | 'cnn' (trained plain supervised) | 'infer' (CNN inference)
    self.kind = kind
    n, size = spec["num_classes"], spec["img_size"]
    if kind == "deit":
      kw = dict(spec.get("model_kw", {}))
      self.model = timm.create_model(spec["model"], pretrained=False, num_classes=n, img_size=size,
                                     **kw)
      self.distilled = hasattr(self.model, "set_distilled_training")
      if self.distilled:
        self.model.set_distilled_training(True)  # (cls, dist) logits in train mode, as DeiT's
    else:
      self.model = timm.create_model(spec["model"], pretrained=False, num_classes=n)
      self.distilled = False
    self.model.to(self.device)
    if spec.get("channels_last"):
      self.model.to(memory_format=torch.channels_last)
    t = spec.get("teacher")
    if t:
      self.teacher = timm.create_model(t["model"], pretrained=False, num_classes=t["num_classes"])
      self.teacher.to(self.device).eval()
      for p in self.teacher.parameters():
        p.requires_grad_(False)
    if kind != "infer":
      o = spec["optimizer"]
      skip = set(o.get("no_decay", ()))
      self.optimizer = torch.optim.AdamW(param_groups(self.model, o["weight_decay"], skip),
                                         lr=o["lr"], betas=(o["b1"], o["b2"]), eps=o["eps"])
      m = spec["mixup"]
      self.mixup = Mixup(mixup_alpha=m["mixup_alpha"], cutmix_alpha=m["cutmix_alpha"],
                         cutmix_minmax=m.get("cutmix_minmax"), prob=m["prob"],
                         switch_prob=m["switch_prob"], mode="batch",
                         label_smoothing=spec["label_smoothing"], num_classes=n)
      self.criterion = SoftTargetCrossEntropy()
      if spec.get("ema_decay"):
        self.ema = ModelEmaV3(self.model, decay=spec["ema_decay"], device=self.device)
      self.clip_grad = o.get("clip_grad")
    self.alpha = spec.get("alpha", 0.5)
    self.tau = spec.get("tau", 1.0)
    self.distill_kind = spec.get("distill_kind", "hard")
    fmt = torch.channels_last if spec.get("channels_last") else torch.contiguous_format
    g = torch.Generator().manual_seed(0)
    tb, ib = spec.get("train_batch"), spec.get("infer_batch")
    self.train_images = (torch.randn(tb, 3, size, size, generator=g).to(self.device)
                         .contiguous(memory_format=fmt) if tb else None)
    self.train_labels = (torch.randint(0, n, (tb,), generator=g).to(self.device) if tb else None)
    self.infer_images = (torch.randn(ib, 3, size, size, generator=g).to(self.device)
                         .contiguous(memory_format=fmt) if ib else None)

  def _autocast(self):
    if self.amp_dtype is None:
      return torch.autocast(self.device.type, enabled=False)
    return torch.autocast(self.device.type, dtype=self.amp_dtype)

  def train_step(self, with_teacher: bool):
    model = self.model
    model.train()
    samples, targets = self.mixup(self.train_images, self.train_labels)  # in place, as official
    with self._autocast():
      outputs = model(samples)
      if isinstance(outputs, (tuple, list)):
        outputs, outputs_kd = outputs
      else:
        outputs_kd = outputs
      base = self.criterion(outputs, targets)
      if with_teacher:
        with torch.no_grad():
          teacher_outputs = self.teacher(samples)
        if self.distill_kind == "soft":
          t = self.tau
          distill = F.kl_div(F.log_softmax(outputs_kd / t, dim=1),
                             F.log_softmax(teacher_outputs / t, dim=1), reduction="sum",
                             log_target=True) * (t * t) / outputs_kd.numel()
        else:
          distill = F.cross_entropy(outputs_kd, teacher_outputs.argmax(dim=1))
        loss = base * (1 - self.alpha) + distill * self.alpha
      else:
        loss = base
    loss_value = loss.item()  # engine.py: stop on a non-finite loss
    if not math.isfinite(loss_value):
      raise FloatingPointError(f"loss is {loss_value}")
    self.optimizer.zero_grad()
    loss.backward()
    if self.clip_grad:
      torch.nn.utils.clip_grad_norm_(model.parameters(), self.clip_grad)
    self.optimizer.step()
    if self.ema is not None:
      self.ema.update(model)

  def infer_step(self):
    model = self.model
    model.eval()
    with torch.inference_mode(), self._autocast():
      out = model(self.infer_images)
    return out

  def sync(self):
    if self.device.type == "cuda":
      torch.cuda.synchronize()

  def time(self, what: str, iters: int, warmup: int):
    if what == "train":
      fn = lambda: self.train_step(False)
    elif what == "train_teacher":
      if self.teacher is None:
        raise ValueError("this row has no teacher")
      fn = lambda: self.train_step(True)
    elif what == "infer":
      fn = self.infer_step
    else:
      raise ValueError(f"unknown 'what' {what!r}")
    if self.device.type == "cuda":
      torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
      fn()
    self.sync()
    t = time.perf_counter()
    for _ in range(iters):
      fn()
    self.sync()
    seconds = (time.perf_counter() - t) / iters
    if self.device.type == "cuda":
      peak, peak_kind = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    else:
      peak, peak_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "max RSS"
    return {"seconds": seconds, "peak_bytes": peak, "peak_kind": peak_kind}


def count(model):
  return sum(p.numel() for p in model.parameters()) if model is not None else None


def main():
  row = None
  for line in sys.stdin:
    line = line.strip()
    if not line:
      continue
    try:
      req = json.loads(line)
      op = req.get("op")
      if op == "hello":
        reply({"ok": True, "torch": torch.__version__, "timm": timm.__version__,
               "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
               "cuda": torch.cuda.is_available(),
               "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None})
      elif op == "threads":  # speed.py --timm-threads; by default torch's own choice stands
        torch.set_num_threads(int(req["n"]))
        reply({"ok": True, "threads": torch.get_num_threads()})
      elif op == "setup":
        row = None
        if torch.cuda.is_available():
          torch.cuda.empty_cache()
        row = Row(req["row"])
        reply({"ok": True, "params": count(row.model), "teacher_params": count(row.teacher)})
      elif op == "time":
        if row is None:
          raise RuntimeError("no row set up")
        reply({"ok": True, **row.time(req["what"], int(req.get("iters", 3)),
                                      int(req.get("warmup", 1)))})
      elif op == "quit":
        reply({"ok": True})
        return
      else:
        raise ValueError(f"unknown op {op!r}")
    except Exception as e:  # the caller reports it and carries on
      msg = f"{type(e).__name__}: {e}"
      if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower():
        msg = "out of memory: " + msg
      try:
        reply({"ok": False, "error": msg[:2000]})
      except BrokenPipeError:  # the caller is gone
        return


if __name__ == "__main__":
  try:
    main()
  except (BrokenPipeError, KeyboardInterrupt):
    pass
