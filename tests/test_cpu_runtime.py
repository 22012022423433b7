"""The CPU-only malloc switch (jaxllm/cpu_runtime.py): XLA's per-step temporaries are served from
the retained heap instead of a fresh mmap per step; it stays off for accelerator backends."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from jaxllm import cpu_runtime

# Runs one XLA program whose temporaries (two materialised [4096, 4096] cumsums) far exceed
# glibc's 32 MB mmap limit, then reports how much memory the malloc heap itself holds.
PROBE = textwrap.dedent("""
    import ctypes, json, sys
    applied = False
    if sys.argv[1] == "on":
        from jaxllm import cpu_runtime
        applied = cpu_runtime.reuse_freed_host_memory()
    import jax, jax.numpy as jnp

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                     "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    x = jnp.ones((4096, 4096), jnp.float32)
    compiled = jax.jit(lambda x: jnp.sum(jnp.cumsum(x, axis=0) * jnp.cumsum(x, axis=1))).lower(x).compile()
    for _ in range(3):
        compiled(x).block_until_ready()
    print(json.dumps({"applied": applied, "heap": libc.mallinfo2().arena,
                      "temp": compiled.memory_analysis().temp_size_in_bytes}))
""")


def _probe(mode: str) -> dict:
  out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout
  return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_xla_temporaries_stay_in_the_heap_with_the_switch():
  off, on = _probe("off"), _probe("on")
  assert on["applied"] and not off["applied"]
  assert on["temp"] > 100 * 2 ** 20
  # Without the switch the temporaries were mmap'd (and unmapped after each step), so the
  # heap never held them; with it, the heap kept them for the next step.
  assert off["heap"] < on["temp"] / 2, off
  assert on["heap"] >= on["temp"], on


def test_the_switch_is_only_for_the_cpu_backend(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  assert not cpu_runtime.backend_will_be_cpu()
  monkeypatch.setenv("JAX_PLATFORMS", "tpu")
  assert not cpu_runtime.backend_will_be_cpu()
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert cpu_runtime.backend_will_be_cpu()
  monkeypatch.setenv("JAXLLM_CPU_MALLOC", "0")
  monkeypatch.setattr(cpu_runtime, "_applied", False)
  assert not cpu_runtime.reuse_freed_host_memory()


def test_commands_turn_it_on_before_any_import_and_library_imports_do_not():
  """The hook in jaxllm/__init__.py: a process started as `python -m jaxllm.<command>` has the
  switch on as soon as the package is imported; any other process (`import jaxllm`) does not."""
  code = ("import sys; sys.orig_argv = {argv!r}; import jaxllm.cpu_runtime as c; print(c._applied)")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  def applied(argv):
    out = subprocess.run([sys.executable, "-c", code.format(argv=argv)], capture_output=True, text=True,
                         check=True, env=env).stdout
    return out.strip().splitlines()[-1]
  assert applied(["python", "-m", "jaxllm.train", "--config", "c.py"]) == "True"
  assert applied(["python", "-m", "pytest"]) == "False"
  assert applied(["python", "-c", "import jaxllm"]) == "False"
