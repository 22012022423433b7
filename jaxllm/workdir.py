"""A run's workdir at start: refuse a run that cannot continue there, and leave nothing behind
when the start fails.

A workdir holds one run. Rerunning it resumes that run, so the config must still
describe the same model and the same data stream; anything else would load the
checkpoint into another model or feed it other batches. `check_resumable` compares
the new config with the workdir's config.json before anything is read or written,
and `StartGuard` removes whatever a failed start created (a tokenizer trained on
the spot, an empty checkpoints/ folder, the workdir itself), so the rerun of a
fixed command starts clean and the old run's files stay as they were.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax

from jaxllm import optim
from jaxllm.config_types import RunConfig
from jaxllm.errors import ConfigError

# Model keys that say how to run a model, not what it is: a resumed run may change them.
RUNTIME_MODEL_KEYS = ("dropout_rate", "init_std", "dtype", "param_dtype", "remat", "attention_impl",
                      "matmul_impl", "scan_layers", "scan_unroll")
# Data keys that define the token stream a checkpoint's data position points into.
STREAM_DATA_KEYS = ("seq_len", "packing", "tokenizer", "tokenizer_vocab_size", "num_shards", "seed",
                    "row_shuffle", "pack_bins", "tokenize_batch", "shuffle_buffer", "source")


def has_checkpoint(workdir: str) -> bool:
  folder = os.path.join(workdir, "checkpoints")
  return os.path.isdir(folder) and any(d.isdigit() for d in os.listdir(folder))


def saved_config(workdir: str) -> dict | None:
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path} cannot be read ({e}); it belongs to the run in --workdir {workdir}. "
                      "Restore it or use a fresh --workdir.") from e


def _changes(saved: dict, new: dict, keys: Any, section: str) -> list[str]:
  changed = []
  for key in keys:
    if key in saved and key in new and saved[key] != new[key]:
      changed.append(f"{section}.{key}={new[key]!r} (the run has {saved[key]!r})")
  return changed


def check_resumable(config: Any, workdir: str) -> None:
  """Refuses a config that cannot resume the run whose checkpoints are in `workdir`."""
  if not has_checkpoint(workdir):
    return
  saved = saved_config(workdir)
  if saved is None:
    return  # a workdir from before config.json was written: the checkpoint check decides
  new = config.to_dict()
  # Keys the saved config lacks (written before they existed) read as their defaults.
  old = RunConfig.from_config(saved, strict=False)
  old_task, old_init_from = old.task, old.init_from
  changed = []
  if old_task != config.task:
    changed.append(f"task={config.task!r} (the run has {old_task!r})")
  saved_model, new_model = saved.get("model", {}), new.get("model", {})
  changed += _changes(saved_model, new_model, [k for k in new_model if k not in RUNTIME_MODEL_KEYS], "model")
  changed += _changes(saved.get("data", {}), new.get("data", {}), STREAM_DATA_KEYS, "data")
  # Prefix-LM changes what attention sees, so what the checkpoint's weights were trained for;
  # a run saved before the key existed was causal.
  if old.sft.prefix_lm != config.sft.prefix_lm:
    changed.append(f"sft.prefix_lm={config.sft.prefix_lm!r} (the run has {old.sft.prefix_lm!r})")
  if old_init_from != config.init_from and optim.trainable_pattern(old):
    changed.append(f"init_from={config.init_from!r} (the run has {old_init_from!r})")
  if changed:
    raise ConfigError(f"--workdir {workdir} holds a run with another config: {changed[0]}"
                      f"{f' and {len(changed) - 1} more' if len(changed) > 1 else ''}; resuming needs "
                      "the config it was started with (its config.json), or use a fresh --workdir.")


class StartGuard:
  """Context manager around a run's start: if it raises, what it created in the workdir goes."""

  def __init__(self, workdir: str):
    self.workdir = os.path.abspath(workdir)
    self.existed = os.path.isdir(self.workdir)
    self.before = set(os.listdir(self.workdir)) if self.existed else set()

  def __enter__(self) -> "StartGuard":
    return self

  def __exit__(self, exc_type, exc, tb) -> bool:
    if exc_type is None or jax.process_index() != 0 or not os.path.isdir(self.workdir):
      return False
    for name in set(os.listdir(self.workdir)) - self.before:
      path = os.path.join(self.workdir, name)
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
      else:
        try:
          os.remove(path)
        except OSError:
          pass
    if not self.existed:
      try:
        os.rmdir(self.workdir)
      except OSError:
        pass
    return False
