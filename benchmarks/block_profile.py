r"""Where a DeiT-Ti block's time goes on this machine, in XLA and in PyTorch, op by op.

  python benchmarks/block_profile.py --torch-python /work/timmvenv/bin/python

Times (best of --rounds, alternating JAX / torch per op) the pieces of one DeiT-Ti block at
inference batch 64 (tokens 198, width 192, 3 heads, MLP 768), fp32: the four projections, the two
attention matmuls, softmax, GELU, LayerNorm, and the whole block (torch's with its fused
`scaled_dot_product_attention`, as timm runs it). JAX programs compile with the project's CPU
options (deit_jax.compile_options). The same script runs the torch side when given --torch.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

B, N, D, H = 64, 198, 192, 3
HD = D // H


def _best(fn, reps: int) -> float:
  fn()
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  return best


def _ops_flops() -> dict[str, float]:
  m = B * N
  return {"qkv matmul": 2 * m * D * 3 * D, "q @ k^T": 2 * B * H * N * N * HD,
          "attn @ v": 2 * B * H * N * N * HD, "proj matmul": 2 * m * D * D,
          "fc1 matmul": 2 * m * D * 4 * D, "fc2 matmul": 2 * m * 4 * D * D,
          "softmax": 0, "gelu (erf)": 0, "layernorm": 0, "block": 0}


def jax_ops(reps: int) -> dict[str, float]:
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jax
  import jax.numpy as jnp
  from deit_jax import compile_options, host_memory, models
  host_memory.configure()
  k = jax.random.key(0)
  x, q = jax.random.normal(k, (B * N, D)), jax.random.normal(k, (B, H, N, HD))
  s, h = jax.random.normal(k, (B, H, N, N)), jax.random.normal(k, (B * N, 4 * D))
  w = {n: jax.random.normal(k, sh) * 0.02 for n, sh in
       dict(qkv=(D, 3 * D), proj=(D, D), fc1=(D, 4 * D), fc2=(4 * D, D)).items()}

  def ln(t):
    m = t.mean(-1, keepdims=True)
    return (t - m) * jax.lax.rsqrt(((t - m) ** 2).mean(-1, keepdims=True) + 1e-6)

  def block(t):
    t = t.reshape(B, N, D)
    qkv = (ln(t) @ w["qkv"]).reshape(B, N, 3, H, HD)
    qq, kk, vv = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    p = jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", qq * HD ** -0.5, kk), -1)
    o = jnp.einsum("bhqk,bhkd->bhqd", p, vv).transpose(0, 2, 1, 3).reshape(B, N, D)
    t = t + o @ w["proj"]
    return t + models.gelu(ln(t) @ w["fc1"]) @ w["fc2"]

  cases = {"qkv matmul": (lambda a: a @ w["qkv"], x),
           "q @ k^T": (lambda a: jnp.einsum("bhqd,bhkd->bhqk", a, a), q),
           "attn @ v": (lambda a: jnp.einsum("bhqk,bhkd->bhqd", a, q), s),
           "proj matmul": (lambda a: a @ w["proj"], x), "fc1 matmul": (lambda a: a @ w["fc1"], x),
           "fc2 matmul": (lambda a: a @ w["fc2"], h),
           "softmax": (lambda a: jax.nn.softmax(a, -1), s),
           "gelu (erf)": (models.gelu, h), "layernorm": (ln, x),
           "block": (block, x)}
  out = {}
  for name, (f, a) in cases.items():
    g = compile_options.jit(f)
    out[name] = _best(lambda: g(a).block_until_ready(), reps)
  return out


def torch_ops(reps: int) -> dict[str, float]:
  import torch
  import torch.nn.functional as F
  torch.set_grad_enabled(False)
  x, q = torch.randn(B * N, D), torch.randn(B, H, N, HD)
  s, h = torch.randn(B, H, N, N), torch.randn(B * N, 4 * D)
  w = {n: torch.randn(*sh) * 0.02 for n, sh in
       dict(qkv=(D, 3 * D), proj=(D, D), fc1=(D, 4 * D), fc2=(4 * D, D)).items()}

  def block(t):
    t = t.reshape(B, N, D)
    qkv = (F.layer_norm(t, (D,)) @ w["qkv"]).reshape(B, N, 3, H, HD).permute(2, 0, 3, 1, 4)
    o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(B, N, D)
    t = t + o @ w["proj"]
    return t + F.gelu(F.layer_norm(t, (D,)) @ w["fc1"]) @ w["fc2"]

  cases = {"qkv matmul": lambda: x @ w["qkv"], "q @ k^T": lambda: q @ q.transpose(-1, -2),
           "attn @ v": lambda: s @ q, "proj matmul": lambda: x @ w["proj"],
           "fc1 matmul": lambda: x @ w["fc1"], "fc2 matmul": lambda: h @ w["fc2"],
           "softmax": lambda: torch.softmax(s, -1), "gelu (erf)": lambda: F.gelu(h),
           "layernorm": lambda: F.layer_norm(x, (D,)), "block": lambda: block(x)}
  return {name: _best(f, reps) for name, f in cases.items()}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--torch-python", default=None, help="a Python with torch: times its side too")
  p.add_argument("--rounds", type=int, default=3, help="alternating JAX / torch rounds")
  p.add_argument("--reps", type=int, default=5, help="timed calls per op and round (best kept)")
  p.add_argument("--torch", action="store_true", help=argparse.SUPPRESS)  # the torch side
  args = p.parse_args(argv)
  if args.torch:
    print(json.dumps(torch_ops(args.reps)))
    return 0
  flops = _ops_flops()
  best_j: dict[str, float] = {}
  best_t: dict[str, float] = {}
  for _ in range(args.rounds):
    for k, v in jax_ops(args.reps).items():
      best_j[k] = min(best_j.get(k, float("inf")), v)
    if args.torch_python:
      out = subprocess.run([args.torch_python, os.path.abspath(__file__), "--torch", "--reps",
                            str(args.reps)], capture_output=True, text=True, check=True)
      for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items():
        best_t[k] = min(best_t.get(k, float("inf")), v)
  print(f"DeiT-Ti block pieces, batch {B}, fp32, best of {args.rounds} x {args.reps}; load "
        f"average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
  torch_cols = f"{'torch ms':>10}{'GFLOP/s':>9}{'jax/torch time':>16}" if best_t else ""
  print(f"{'op':<14}{'jax ms':>9}{'GFLOP/s':>9}" + torch_cols)
  for k in flops:
    j = best_j[k]
    line = f"{k:<14}{j * 1e3:>9.1f}{(flops[k] / j / 1e9 if flops[k] else float('nan')):>9.0f}"
    if best_t:
      t = best_t[k]
      line += (f"{t * 1e3:>10.1f}{(flops[k] / t / 1e9 if flops[k] else float('nan')):>9.0f}"
               f"{j / t:>16.2f}")
    print(line.replace("nan", "  -"))
  return 0


if __name__ == "__main__":
  sys.exit(main())
