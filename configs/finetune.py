r"""python launch.py --config configs/finetune.py:new_head --config.init_checkpoint=DIR ...

Fine-tunes any DeiT checkpoint: a converted official one (`python -m deit_jax.convert`), a
training run's workdir, its checkpoints/ or best/, or one step folder (e.g.
workdirs/demo/checkpoints/1000). The architecture is the checkpoint's (config.model is
'from_checkpoint'), so no model name is needed; config.model_kw still sets drop path, dtype and
attention. The weights are loaded (not the EMA), the position grid is resized (bicubic) to
config.aug.input_size, the optimizer and step start fresh and the EMA starts from the loaded
weights. Distillation may be added to either: --config.distillation.kind=hard
--config.teacher.checkpoint=DIR (a teacher of the new classes; the authors advise keeping the
distillation signal when fine-tuning a distilled model).

The argument, then options, comma-separated:
  new_head  transfer to a new data set with fresh heads (init_skip_head), the DeiT authors'
            AdamW transfer recipe (their CIFAR-10 setting): batch 768, lr 7.5e-6 x batch / 512,
            weight decay 0.05, 1000 epochs (CIFAR-10 size: set fewer for a larger data set),
            5 warmup epochs from 1e-6, cosine to 1e-6, at 224 (smaller images are upscaled);
            the rest as on ImageNet (RandAugment, Mixup/CutMix, repeated augmentation, label
            smoothing 0.1, drop path 0.1, random erasing 0.25). An image folder by default:
              python launch.py --config configs/finetune.py:new_head \
                  --config.init_checkpoint=ckpt/deit_small_distilled_patch16_224 \
                  --config.data.root=/data/flowers --config.data.num_classes=102
  384       the official fine-tuning at 384 of a 224 model on its own data (ImageNet here):
            30 epochs, batch 512, lr 5e-6 constant, weight decay 1e-8, eval crop 1.0:
              python launch.py --config configs/finetune.py:384 \
                  --config.init_checkpoint=ckpt/deit_base_patch16_224
  demo      the same at the demo's scale, from the distilled demo student (workdirs/demo/hard,
            trained by configs/demo.py, 32 px): new_head,demo moves it to 'mnist5k' (28 px
            MNIST digits upscaled to 32); 384,demo fine-tunes it on its digits at 48 px:
              python launch.py --config configs/finetune.py:new_head,demo
              python launch.py --config configs/finetune.py:384,demo
"""
import os
import sys

from deit_jax import config, plan

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import demo_distill  # noqa: E402

_KINDS = ("new_head", "384")
_OPTIONS = ("demo",)


def new_head(c):
  """The DeiT authors' AdamW transfer recipe (facebookresearch/dino#81, CIFAR-10; the official
  main.py scales lr by batch / 512). Their min lr (main.py's default 1e-5) is not given: 1e-6
  here, so the cosine decays below the peak at any batch size."""
  c.init_skip_head = True
  c.data.source = "folder"  # <root>/train/<class>/..., <root>/val/<class>/...
  c.data.split, c.data.eval_split = "train", "val"
  c.data.num_classes = None  # the new data set's: required
  c.batch_size = c.eval_batch_size = 768
  c.epochs = 1000
  c.optimizer.update(lr=7.5e-6, lr_base_batch=512, weight_decay=0.05, warmup_epochs=5.0,
                     warmup_lr=1e-6, min_lr=1e-6)
  return c


def demo_scale(c, kind: str):
  """The demo student's data, augmentation, batch and logging (configs/demo_distill.py); a few
  epochs from the distilled student that `python launch.py --config configs/demo.py` trains."""
  d = demo_distill.get_config("hard")
  c.data, c.aug, c.mixup = d.data, d.aug, d.mixup
  for k in ("batch_size", "eval_batch_size", "ema_decay", "log_every_steps", "eval_every_epochs",
            "checkpoint_every_steps"):
    c[k] = d[k]
  c.init_checkpoint = "workdirs/demo/hard"
  c.epochs = 5
  c.optimizer.lr_base_batch = d.optimizer.lr_base_batch
  if kind == "new_head":
    c.data.source, c.data.eval_split = "mnist5k", "test"
    c.data.num_classes = 10
    # eval/top1 is the class head's: the fresh distillation head trains only with a teacher
    # (with one, set --config.eval_head=both).
    c.eval_head = "cls"
    c.optimizer.update(lr=2e-4, warmup_epochs=1.0)  # a fifth of the demo's training lr
  else:
    c.data.image_size = c.aug.input_size = 48
    c.optimizer.update(lr=5e-5, min_lr=5e-5)  # constant, as at 384
  return c


def get_config(arg="new_head"):
  kind, *options = (arg or "new_head").split(",")
  if kind not in _KINDS or set(options) - set(_OPTIONS):
    raise ValueError(f"configs/finetune.py:{arg}: use new_head or 384, optionally with ,demo "
                     "(e.g. configs/finetune.py:new_head,demo).")
  c = config.base_config()
  c.model = plan.FROM_CHECKPOINT
  c = new_head(c) if kind == "new_head" else config.finetune_at_384(c)
  return demo_scale(c, kind) if "demo" in options else c
