"""XLA compiler options for the train and eval steps on the CPU backend (a CPU-only switch).

XLA CPU runs a batched matmul, such as attention's [batch x heads] score and value products, in
its default library on one thread: 125-130 GFLOP/s on 2 cores where PyTorch's runs at 300. Its
oneDNN library runs them on every core (240-256 GFLOP/s), most plain matmuls of the layers 3-8%
faster and the output head's weight gradient half again as fast; the train step of
configs/bench_gpt_cpu.py went from 897 and 850 ms to 818 and 771 ms in alternating runs
(docs/performance.md, "CPU guard: oneDNN dots").

XLA ships oneDNN off, and this switch turns it on for dots only, each dot on its own
(`LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT`). The `dot` mode, which also fuses a dot's neighbours,
is left off: in XLA 0.10 it puts two dots that feed one add (the input gradient of the query,
key and value projections) into one oneDNN partition, which fails to compile and stops the
process with an illegal instruction when the step runs.

Only the steps that jaxllm compiles get these options, never the user's own `jax.jit`s, and
only when their devices are CPUs. The first call compiles and runs a small probe with them on
this process's own CPU; on a jaxlib without oneDNN, or one that no longer takes these option
names, the probe fails and every step compiles as XLA's default does. Where jax's persistent
compilation cache is on (`JAX_COMPILATION_CACHE_DIR`), the steps also compile without them:
XLA cannot serialize an executable with oneDNN thunks ("ToProto is not implemented for thunk
kind: onednn-fusion"), so such a step would never be cached and every compile would warn.
`JAXLLM_CPU_ONEDNN=0` turns it off.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

ONEDNN_DOTS = {
    "xla_cpu_use_onednn": True,
    "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
}


@functools.lru_cache(maxsize=None)
def _onednn_dots_work(device: Any) -> bool:
  """Whether this jaxlib compiles a plain and a batched dot with ONEDNN_DOTS and gets them right."""
  rng = np.random.default_rng(0)
  a = rng.standard_normal((2, 16, 24), dtype=np.float32)
  b = rng.standard_normal((2, 24, 8), dtype=np.float32)
  probe = jax.jit(lambda a, b: (jnp.einsum("bik,bkj->bij", a, b), a[0] @ b[0]), compiler_options=ONEDNN_DOTS)
  try:
    batched, plain = probe(jax.device_put(a, device), jax.device_put(b, device))
  except Exception:  # pylint: disable=broad-except
    return False  # the option names are unknown to this jaxlib, or oneDNN is not built in
  want = np.einsum("bik,bkj->bij", a.astype(np.float64), b.astype(np.float64))
  return bool(np.allclose(batched, want, rtol=1e-4, atol=1e-4) and np.allclose(plain, want[0], rtol=1e-4, atol=1e-4))


def persistent_cache_on() -> bool:
  """Whether jax writes compiled programs to a persistent cache directory."""
  return bool(getattr(jax.config, "jax_enable_compilation_cache", True)
              and getattr(jax.config, "jax_compilation_cache_dir", None))


def step_compiler_options(devices: Sequence[Any]) -> dict[str, Any]:
  """The XLA options for a step that runs on `devices`: ONEDNN_DOTS on CPUs where they work
  (unless JAXLLM_CPU_ONEDNN is 0 or the persistent cache is on), nothing anywhere else."""
  if not devices or any(d.platform != "cpu" for d in devices):
    return {}
  if os.environ.get("JAXLLM_CPU_ONEDNN", "1") == "0" or persistent_cache_on():
    return {}
  # The probe runs on one of this process's devices: in a multi-process run the others
  # belong to other hosts.
  local = [d for d in devices if d.process_index == jax.process_index()] or jax.local_devices(backend="cpu")
  return dict(ONEDNN_DOTS) if _onednn_dots_work(local[0]) else {}
