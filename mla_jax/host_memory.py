"""Keep freed host memory for reuse (glibc malloc), so that CPU steps stop page-faulting.

glibc serves every allocation over 32 MiB with a fresh mmap and unmaps it on
free. XLA:CPU allocates each execution's temporary buffer that way (about
400 MB for a train step of the runner issue's 4-layer model), so every step
touches it anew: ~100k page faults, a quarter of the step's CPU time in the
kernel. Heap allocations from one arena, never trimmed below 1 GiB, are reused
instead. The cost: the process keeps its peak memory until it exits.

Process-wide and irreversible, so only entry points call it (the runner, the
benchmarks), before JAX starts; importing the library never does.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_applied: bool | None = None


def reuse_freed_memory() -> bool:
  """Apply the settings above once; True where they took effect (Linux with
  glibc), False elsewhere (macOS, musl), where nothing changes."""
  global _applied
  if _applied is not None:
    return _applied
  _applied = False
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
  # mallopt returns 1 on success; musl has no mallopt, older glibc may refuse one.
  _applied = all(mallopt(param, value) == 1 for param, value in
                 ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 1 << 30)))
  return _applied
