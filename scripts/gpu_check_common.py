"""What every section of the GPU check shares: the dry-run switch, recipes with overrides,
JSON output, the device's memory and peak rate.

DRY_RUN=1 shrinks every shape (2 layers, d_model 64, seq 64, a few steps) so the whole check
runs on a CPU through the same code paths; nothing else changes between the two modes.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

from jaxllm.config import apply_overrides  # noqa: E402,F401  (the sections import it from here)

DRY_RUN = os.environ.get("DRY_RUN", "0") not in ("", "0")

# The tiny shape of the dry run, applied on top of any recipe.
DRY_MODEL = {"model.num_layers": 2, "model.d_model": 64, "model.num_heads": 4, "model.d_ff": 128,
             "model.vocab_size": 512, "model.max_seq_len": 64, "data.seq_len": 64}


def load_config(recipe: str, overrides: dict[str, Any] | None = None):
  """configs/<recipe>.py's get_config() with dotted overrides ("train.steps": 5) applied."""
  config = importlib.import_module(f"configs.{recipe}").get_config()
  return apply_overrides(config, overrides or {})


def dry_overrides(config) -> dict[str, Any]:
  """DRY_MODEL, keeping grouped-query attention (2 kv heads) where the recipe has it."""
  out = dict(DRY_MODEL)
  if config.model.num_kv_heads:
    out["model.num_kv_heads"] = 2
  return out


def write_json(path: str, value: Any) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(value, f, indent=1, default=_jsonable)
  os.replace(path + ".tmp", path)


def read_json(path: str, default: Any = None) -> Any:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return default


def _jsonable(x: Any) -> Any:
  if hasattr(x, "tolist"):
    return x.tolist()
  return str(x)


def finite(x: float) -> float | None:
  """NaN/inf become None so that JSON stays standard."""
  return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def error_text(e: BaseException, limit: int = 300) -> str:
  text = " ".join(f"{type(e).__name__}: {e}".split())
  return text if len(text) <= limit else text[:limit] + " ..."


def is_oom(e: BaseException) -> bool:
  text = str(e).lower()
  return "resource_exhausted" in text or "out of memory" in text or "oom" in type(e).__name__.lower()


def device_info() -> dict[str, Any]:
  import jax  # pylint: disable=import-outside-toplevel
  d = jax.devices()[0]
  return {"platform": d.platform, "device_kind": d.device_kind, "device_count": jax.device_count(),
          "jax": jax.__version__}


def memory_stats() -> dict[str, float]:
  """The first device's allocator stats (bytes_limit, peak_bytes_in_use, ...); {} on CPU."""
  import jax  # pylint: disable=import-outside-toplevel
  try:
    return dict(jax.devices()[0].memory_stats() or {})
  except Exception:  # pylint: disable=broad-except
    return {}


def peak_flops() -> tuple[float, str]:
  """The device's peak FLOP/s for MFU and what it is: the datasheet bf16 figure on accelerators,
  the measured f32 matmul rate on CPU (jaxllm.hardware)."""
  import jax  # pylint: disable=import-outside-toplevel
  from jaxllm import hardware  # pylint: disable=import-outside-toplevel
  kind = jax.devices()[0].device_kind.lower()
  what = "datasheet dense bf16" if any(k in kind for k in hardware.PEAK_FLOPS) else "measured f32 matmul"
  return hardware.peak_flops_per_device(), what

