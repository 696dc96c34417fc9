"""Host memory on CPU: XLA's buffers come back from the heap instead of fresh pages from the OS.

XLA's CPU runtime allocates every output and temporary buffer of a step with malloc and frees it
when the step is done. glibc serves a request above its mmap threshold (at most 32 MiB) with a
fresh `mmap` and unmaps it on free, so each step touches new zero pages: a page fault per 4 KiB,
which costs more than the arithmetic in the memory-bound parts of a step. On the 2-core
development CPU `x + 1` over a [12672, 768] float32 array took 9.7 ms that way and 1.4 ms with
the heap reused; the demo student's train step ran 1.5x faster.

`configure()` tells glibc (`mallopt`) to serve every size from the heap (`M_MMAP_MAX` 0) and
never to give freed heap memory back (`M_TRIM_THRESHOLD` -1), so a step reuses the pages the last
step touched. The process keeps its peak heap for its lifetime, as PyTorch's and JAX's GPU
allocators keep theirs. The launcher and the benchmarks call it when JAX runs on CPU; anyone who
sets glibc's own malloc variables (`MALLOC_MMAP_MAX_`, `MALLOC_TRIM_THRESHOLD_`, ... or
`GLIBC_TUNABLES` with `glibc.malloc`) keeps their choice, and it does nothing on other C
libraries.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_USER_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                  "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX")

_done: bool | None = None


def _glibc():
  """The process's glibc, or None (other platforms and C libraries)."""
  if not sys.platform.startswith("linux"):
    return None
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.gnu_get_libc_version  # glibc only
    libc.mallopt
  except (OSError, AttributeError):
    return None
  return libc


def user_chose() -> bool:
  """Whether the environment already sets glibc's malloc options."""
  env = os.environ
  return any(k in env for k in _USER_SETTINGS) or "glibc.malloc" in env.get("GLIBC_TUNABLES", "")


def configure(backend: str | None = None) -> bool:
  """Keep freed host memory in the heap when `backend` (default: JAX's) is the CPU.

  Returns whether the settings are in force (set now or by an earlier call). Idempotent.
  """
  global _done
  if _done is not None:
    return _done
  if backend is None:
    import jax
    backend = jax.default_backend()
  libc = _glibc() if backend == "cpu" and not user_chose() else None
  _done = bool(libc and libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, -1))
  return _done
