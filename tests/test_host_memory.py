"""deit_jax.host_memory: large host buffers come from the reused heap, unless the user chose."""
import os
import subprocess
import sys

import pytest

from deit_jax import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# In a fresh process: configure (or not), malloc 64 MiB, and count the mmap'd chunks it added.
PROBE = r"""
import ctypes, sys
from deit_jax import host_memory
on = host_memory.configure(sys.argv[1]) if sys.argv[1] != "skip" else False
class MallInfo2(ctypes.Structure):
  _fields_ = [(n, ctypes.c_size_t) for n in
              "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = host_memory._glibc()
libc.malloc.restype = ctypes.c_void_p
libc.mallinfo2.restype = MallInfo2
before = libc.mallinfo2().hblks
p = libc.malloc(64 << 20)
print(on, libc.mallinfo2().hblks - before)
"""

needs_glibc = pytest.mark.skipif(host_memory._glibc() is None, reason="glibc only")


def _probe(arg: str, **env) -> str:
  return subprocess.run([sys.executable, "-c", PROBE, arg], cwd=ROOT, check=True, text=True,
                        capture_output=True, env={**os.environ, **env}).stdout.split()


@needs_glibc
def test_cpu_buffers_come_from_the_heap():
  assert _probe("skip") == ["False", "1"]   # glibc's default: a fresh mmap for 64 MiB
  assert _probe("cpu") == ["True", "0"]     # configured: from the heap


@needs_glibc
def test_other_backends_and_the_users_choice_are_left_alone():
  assert _probe("gpu") == ["False", "1"]
  assert _probe("cpu", MALLOC_MMAP_MAX_="65536") == ["False", "1"]
  assert _probe("cpu", GLIBC_TUNABLES="glibc.malloc.mmap_max=65536") == ["False", "1"]
