"""Full-size parity of our DeiT and DeiT III zoo against timm (random init), fp32 on the CPU.

  python scripts/full_parity.py --torch-python /path/to/venv-with-timm/bin/python
  python scripts/full_parity.py --torch-python ... --models deit3_huge_patch14_224
  python scripts/full_parity.py --torch-python ... --models deit_base_distilled_patch16_224 \
      --export stablehlo,savedmodel,onnx

The timm side runs in that interpreter (torch is never a dependency of deit_jax): it writes each
model's weights as .safetensors plus an input batch and its eval logits; this side converts the
weights with deit_jax.convert, restores them with load_model and reports the max abs difference.
With --export, each converted checkpoint is also exported (deit_jax.export) and the artifact,
run through its own runtime, compared with the JAX model (and timm) on that batch.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

TORCH_SIDE = r'''
import sys, numpy as np, timm, torch
from safetensors.torch import save_file
name, out = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
m = timm.create_model(name, pretrained=False).eval()
with torch.no_grad():  # DeiT III's LayerScale starts at 1e-6, which would hide the blocks
  for k, p in m.named_parameters():
    if k.endswith(".gamma"):
      p.copy_(torch.rand(p.shape) * 0.5 + 0.1)
size = m.patch_embed.img_size[0]
x = torch.randn(2, 3, size, size)
with torch.no_grad():
  y = m(x)
save_file({k: v.contiguous() for k, v in m.state_dict().items()}, out + ".safetensors")
np.savez(out + ".npz", images=x.permute(0, 2, 3, 1).numpy(), logits=y.numpy())
'''


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--torch-python", required=True)
  p.add_argument("--models", default="deit_tiny_patch16_224,deit_tiny_distilled_patch16_224,"
                 "deit_base_patch16_224,deit_base_distilled_patch16_224,deit_base_patch16_384,"
                 "deit_base_distilled_patch16_384,deit3_small_patch16_224,"
                 "deit3_medium_patch16_224,deit3_base_patch16_224,deit3_base_patch16_384,"
                 "deit3_large_patch16_224,deit3_huge_patch14_224")
  p.add_argument("--export", default="", help="comma-separated deit_jax.export formats")
  args = p.parse_args()
  from deit_jax import checkpoint, convert, export
  with tempfile.TemporaryDirectory() as tmp:
    for name in args.models.split(","):
      base = os.path.join(tmp, name)
      subprocess.run([args.torch_python, "-c", TORCH_SIDE, name, base], check=True)
      convert.convert(name, base + ".safetensors", base + "_orbax")
      os.remove(base + ".safetensors")
      model = checkpoint.load_model(base + "_orbax")
      io = np.load(base + ".npz")
      ours = np.asarray(model(io["images"]))
      diff = np.abs(ours - io["logits"]).max()
      print(f"{name}: max abs diff {diff:.2e} (logit scale {np.abs(io['logits']).max():.2f})",
            flush=True)
      del model
      for fmt in filter(None, args.export.split(",")):
        out = os.path.join(tmp, f"{name}_{fmt}")
        meta = export.export(base + "_orbax", out, fmt)
        got = export_outputs(fmt, out, io["images"])
        print(f"  {fmt}: export vs JAX {np.abs(got - ours).max():.2e} on the timm batch "
              f"({meta['parity']['max_abs_diff_vs_jax']:.2e} on export's own random batch), "
              f"vs timm {np.abs(got - io['logits']).max():.2e}", flush=True)
        shutil.rmtree(out)


def export_outputs(fmt, path, images):
  """The exported artifact's logits through its own runtime."""
  from deit_jax import export
  if fmt == "stablehlo":
    import jax
    with open(os.path.join(path, export.STABLEHLO_FILE), "rb") as f:
      return np.asarray(jax.export.deserialize(bytearray(f.read())).call(images))
  if fmt == "savedmodel":
    import tensorflow as tf
    out = tf.saved_model.load(path).signatures["serving_default"](images=tf.constant(images))
    return out["logits"].numpy()
  import onnxruntime
  session = onnxruntime.InferenceSession(os.path.join(path, export.ONNX_FILE),
                                         providers=["CPUExecutionProvider"])
  return session.run(["logits"], {"images": images})[0]


if __name__ == "__main__":
  sys.exit(main())
