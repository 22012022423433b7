"""Host-memory settings for runs on the CPU backend (a CPU-only switch: GPU and TPU runs skip it).

XLA's CPU runtime allocates each execution's temporaries as one buffer (737 MB for the train
step of configs/bench_gpt_cpu.py) and frees it when the step ends. glibc serves any request
over 32 MB with a fresh `mmap` and returns it with `munmap`, so every step the kernel maps,
zero-fills and faults in the whole buffer again: 189,000 page faults and 0.3 s of system time
per step there, about a tenth of the step. Telling glibc to keep freed memory in one heap
(no `mmap` for large blocks, no trimming, one arena so XLA's worker threads share that heap)
lets the next step reuse the same pages: 37,000 faults and 0.06 s (docs/performance.md).

PyTorch users get the same effect from an `LD_PRELOAD`ed jemalloc or tcmalloc; this needs no
preload. It must run before JAX starts its backend threads (each thread binds to a malloc
arena on its first allocation), so the commands call it first. The price: the process keeps
its peak heap instead of returning freed memory to the system, as those allocators do too.
`JAXLLM_CPU_MALLOC=0` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import sys

# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_INT_MAX = 2 ** 31 - 1

_applied = False


def backend_will_be_cpu() -> bool:
  """Whether JAX will run on its CPU backend: JAX_PLATFORMS says cpu first, or no accelerator
  plugin (a `jax_plugins` entry point, libtpu) is installed. Decided without starting JAX."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  if importlib.util.find_spec("libtpu") is not None:
    return False
  return not list(importlib.metadata.entry_points(group="jax_plugins"))


def reuse_freed_host_memory() -> bool:
  """Configures glibc malloc as the module docstring says, once, on Linux/glibc when the backend
  will be the CPU. Returns whether it did."""
  global _applied  # pylint: disable=global-statement
  if _applied:
    return True
  if (not sys.platform.startswith("linux") or os.environ.get("JAXLLM_CPU_MALLOC", "1") == "0"
      or not backend_will_be_cpu()):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt, version = libc.mallopt, libc.gnu_get_libc_version
  except (OSError, AttributeError):
    return False  # not glibc (e.g. musl): its allocator has no such switches
  del version
  ok = all(mallopt(param, value) == 1 for param, value in
           ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _INT_MAX)))
  _applied = ok
  return ok
