"""Per-program XLA options: what each backend compiles our steps with.

On CPU, XLA 0.10 hands matrix multiplications (and reductions) to YNNPACK fusions by default; on
the development CPU (2 cores, AVX-512) a [12672, 192] x [192, 576] product (a DeiT-Ti qkv
projection at batch 64) runs there at ~125 GFLOP/s, and at ~135-230 through XLA's own Eigen dot
(torch: ~190). YNNPACK's reductions alone are faster (a softmax over [64, 3, 198, 198]: 7.6 vs
15 ms), but whole models run fastest with no YNNPACK fusion at all (DeiT-Ti inference at batch
64, one process, best of 4: 19.8 img/s without, 15.4 with reductions only, 16.8 by default), so
on CPU `xla_cpu_experimental_ynn_fusion_type` is empty. The option is passed per compiled
program (`jax.jit(..., compiler_options=...)`), so nothing global changes; a user who sets the
flag in XLA_FLAGS keeps their value.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax

_YNN = "xla_cpu_experimental_ynn_fusion_type"


def compiler_options(backend: str | None = None) -> dict[str, Any] | None:
  """The options our jitted programs compile with on `backend` (default: JAX's)."""
  if (backend or jax.default_backend()) != "cpu" or _YNN in os.environ.get("XLA_FLAGS", ""):
    return None
  return {_YNN: ""}


def jit(fun: Callable, **kwargs) -> Callable:
  """`jax.jit` with `compiler_options()`."""
  return jax.jit(fun, compiler_options=compiler_options(), **kwargs)
