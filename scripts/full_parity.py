"""Full-size parity of our DeiT zoo against timm (random init), fp32 on the CPU.

  python scripts/full_parity.py --torch-python /path/to/venv-with-timm/bin/python

The timm side runs in that interpreter (torch is never a dependency of deit_jax): it writes each
model's weights as .safetensors plus an input batch and its eval logits; this side converts the
weights with deit_jax.convert, restores them with load_model and reports the max abs difference.
"""
import argparse
import os
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
                 "deit_base_distilled_patch16_384")
  args = p.parse_args()
  from deit_jax import checkpoint, convert
  with tempfile.TemporaryDirectory() as tmp:
    for name in args.models.split(","):
      base = os.path.join(tmp, name)
      subprocess.run([args.torch_python, "-c", TORCH_SIDE, name, base], check=True)
      convert.convert(name, base + ".safetensors", base + "_orbax")
      model = checkpoint.load_model(base + "_orbax")
      io = np.load(base + ".npz")
      diff = np.abs(np.asarray(model(io["images"])) - io["logits"]).max()
      print(f"{name}: max abs diff {diff:.2e} (logit scale {np.abs(io['logits']).max():.2f})",
            flush=True)


if __name__ == "__main__":
  sys.exit(main())
