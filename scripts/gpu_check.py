"""The Python side of scripts/gpu_check.sh: one subcommand per step, each writing JSON.

  python scripts/gpu_check.py env OUT.json
  python scripts/gpu_check.py attention OUT.json
  python scripts/gpu_check.py steps OUT.json WORK_DIR          (spawns steps-reference on the CPU)
  python scripts/gpu_check.py bench-row NAME OUT.json [--start-from OTHER_ROW.json]
  python scripts/gpu_check.py torch-row NAME JAX_ROW.json OUT.json [--compile]
  python scripts/gpu_check.py realrun OUT.json WORK_DIR DATA_FILE|stdlib   (spawns realrun-torch)
  python scripts/gpu_check.py merge OUT.json PART.json ...      (a list of the parts that exist)
  python scripts/gpu_check.py summary OUT_DIR WORK_DIR         (OUT_DIR/summary.md)

Every subcommand takes --budget-s (seconds it may use; the shell's `timeout` is the hard stop,
this lets a step end cleanly first). DRY_RUN=1: tiny shapes on the CPU, same code paths.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu_check_common import DRY_RUN, read_json, write_json  # noqa: E402  pylint: disable=wrong-import-position


def env(out_path: str) -> None:
  """Versions, the device, and the measured bf16 matmul rate (a ceiling beside the datasheet's)."""
  import importlib.metadata as md  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from gpu_check_common import device_info, memory_stats, peak_flops  # pylint: disable=import-outside-toplevel
  versions = {}
  for name in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "orbax-checkpoint",
               "grain", "ml_collections", "datasets", "transformers", "torch", "tokenizers", "numpy"):
    try:
      versions[name] = md.version(name)
    except md.PackageNotFoundError:
      pass
  info = {"dry_run": DRY_RUN, "python": sys.version.split()[0], "versions": versions, **device_info(),
          "devices": [str(d) for d in jax.devices()], "memory_stats": memory_stats()}
  try:
    import torch  # pylint: disable=import-outside-toplevel
    info["torch_cuda"] = torch.version.cuda
    info["torch_sees_gpu"] = torch.cuda.is_available()
  except ImportError:
    pass
  size = 1024 if DRY_RUN else 8192
  a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size)), jnp.bfloat16)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  times = []
  for _ in range(10):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    times.append(time.perf_counter() - start)
  times.sort()
  info["measured_bf16_matmul_flops"] = 2 * size ** 3 / times[len(times) // 2]
  info["matmul_size"] = size
  info["peak_flops_for_mfu"], info["peak_is"] = peak_flops()
  write_json(out_path, info)
  print(f"env: {info['device_kind']} ({info['platform']}), jax {info['jax']}, bf16 {size}^3 matmul "
        f"{info['measured_bf16_matmul_flops'] / 1e12:.1f} TFLOP/s", flush=True)


def merge(out_path: str, parts: list[str]) -> None:
  write_json(out_path, [r for r in (read_json(p) for p in parts) if r])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("command")
  parser.add_argument("args", nargs="*")
  parser.add_argument("--budget-s", type=float, default=600)
  parser.add_argument("--compile", action="store_true")
  parser.add_argument("--start-from", default="", help="bench-row: another row's JSON; its batch first")
  a = parser.parse_args()
  deadline = time.monotonic() + a.budget_s
  if a.command == "env":
    env(*a.args)
  elif a.command == "attention":
    from gpu_check_kernels import attention_check  # pylint: disable=import-outside-toplevel
    attention_check(*a.args)
  elif a.command == "steps":
    from gpu_check_kernels import steps_check  # pylint: disable=import-outside-toplevel
    steps_check(a.args[0], a.args[1], timeout_s=max(deadline - time.monotonic(), 10))
  elif a.command == "steps-reference":
    from gpu_check_kernels import steps_reference  # pylint: disable=import-outside-toplevel
    steps_reference(*a.args)
  elif a.command == "bench-row":
    from gpu_check_bench import jax_row  # pylint: disable=import-outside-toplevel
    jax_row(a.args[0], a.args[1], deadline, a.start_from)
  elif a.command == "torch-row":
    from gpu_check_bench import torch_row  # pylint: disable=import-outside-toplevel
    torch_row(a.args[0], a.args[1], a.args[2], use_compile=a.compile)
  elif a.command == "realrun":
    from gpu_check_realrun import realrun  # pylint: disable=import-outside-toplevel
    realrun(a.args[0], a.args[1], a.args[2], deadline)
  elif a.command == "realrun-torch":
    from gpu_check_realrun import realrun_torch  # pylint: disable=import-outside-toplevel
    realrun_torch(a.args[0], a.args[1], a.args[2], deadline)
  elif a.command == "merge":
    merge(a.args[0], a.args[1:])
  elif a.command == "summary":
    from gpu_check_summary import write_summary  # pylint: disable=import-outside-toplevel
    write_summary(*a.args)
  else:
    parser.error(f"unknown command {a.command!r}")


if __name__ == "__main__":
  main()
