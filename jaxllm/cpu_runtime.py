"""Host-memory settings for runs on the CPU backend (a CPU-only switch: GPU and TPU runs skip it).

XLA's CPU runtime allocates each execution's temporaries as one buffer (737 MB for the train
step of configs/bench_gpt_cpu.py) and frees it when the step ends. glibc serves any request
over 32 MB with a fresh `mmap` and returns it with `munmap`, so every step the kernel maps,
zero-fills and faults in the whole buffer again: 189,000 page faults and 0.3 s of system time
per step there, about a tenth of the step. Telling glibc to keep freed memory in one heap
(no `mmap` for large blocks, no trimming, one arena so XLA's worker threads share that heap)
lets the next step reuse the same pages: 0 to 37,000 faults and 0.01-0.06 s (docs/performance.md).
Where the kernel offers transparent huge pages on request (`madvise`), the first 1.5 GiB of
that heap is also marked for them, so a step's temporaries sit in 2 MiB pages: fewer TLB
misses for every matmul and elementwise pass that streams them (what glibc's
`glibc.malloc.hugetlb=1` tunable does, without having to be set before the process starts).

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
_MADV_HUGEPAGE = 14
_HUGE_PAGE = 2 ** 21
# Below the trim threshold (_INT_MAX), so freeing the block leaves it in the heap.
_HUGE_PAGE_HEAP = 3 * 2 ** 29
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"

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
  except OSError:
    return False
  if not hasattr(libc, "gnu_get_libc_version"):
    return False  # not glibc (e.g. musl): its allocator has no such switches
  ok = all(libc.mallopt(param, value) == 1 for param, value in
           ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _INT_MAX)))
  if ok:
    _advise_huge_pages(libc)
  _applied = ok
  return ok


def _advise_huge_pages(libc: ctypes.CDLL) -> bool:
  """Grows the heap by _HUGE_PAGE_HEAP, marks it MADV_HUGEPAGE and frees it (it stays in the
  heap, unused pages cost no memory); whether the kernel took the advice."""
  try:
    with open(_THP_SETTING, encoding="ascii") as f:
      if "[never]" in f.read():
        return False
  except OSError:
    return False
  libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
  libc.free.argtypes = [ctypes.c_void_p]
  libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
  block = libc.malloc(_HUGE_PAGE_HEAP)
  if not block:
    return False
  start = -(-block // _HUGE_PAGE) * _HUGE_PAGE
  length = (block + _HUGE_PAGE_HEAP - start) // _HUGE_PAGE * _HUGE_PAGE
  advised = libc.madvise(start, length, _MADV_HUGEPAGE) == 0
  libc.free(block)
  return advised
