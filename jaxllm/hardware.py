"""Peak FLOP/s of the devices, for MFU. Accelerators from their datasheets (dense bf16);
CPUs measured on the spot, since their rate depends on cores and vector units."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

# Dense bf16 peak per device (FLOP/s), from vendor datasheets.
PEAK_FLOPS = {
    "h200": 989e12, "h100": 989e12, "a100": 312e12, "l4": 121e12, "a10": 125e12,
    "tpu v6": 918e12, "tpu v5p": 459e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12,
    "tpu v4": 275e12, "tpu v3": 123e12,
}


@functools.cache
def measured_matmul_flops(size: int = 1024, repeats: int = 5) -> float:
  """The f32 matmul rate of this machine's first device, measured now (FLOP/s)."""
  a = jnp.ones((size, size), jnp.float32) * 0.5
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size ** 3 / best


def peak_flops_per_device(override: float = 0.0) -> float:
  """The configured peak, else the datasheet figure, else (CPU) the measured matmul rate."""
  if override:
    return override
  kind = jax.devices()[0].device_kind.lower()
  for name, flops in PEAK_FLOPS.items():
    if name in kind:
      return flops
  return measured_matmul_flops()
