"""Orbax checkpoints: the train state plus the input pipeline's position, saved together.

Saves are asynchronous (the step goes on while the state is written) and atomic:
orbax writes into a temporary directory and renames it when complete, so a run
killed mid-save resumes from the previous complete checkpoint.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used; the message says why and what to do."""


def make_manager(workdir: str, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options, item_names=("state", "data"))


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: Any | None,
         force: bool = False) -> bool:
  """Starts an asynchronous save of `state` and the (JSON-able) data iterator state."""
  args = {"state": ocp.args.StandardSave(state)}
  args["data"] = ocp.args.JsonSave(data_state if data_state is not None else {})
  return manager.save(step, args=ocp.args.Composite(**args), force=force)


def restore(manager: ocp.CheckpointManager, abstract_state: Any, step: int | None = None
            ) -> tuple[Any, Any, int] | None:
  """Restores the latest (or given) step onto the shardings of `abstract_state`; None if there is none."""
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(
        f"checkpoint step {step} in {manager.directory} does not fit this model/config "
        f"({str(e).splitlines()[0][:200]}); use a fresh --workdir or the config it was trained with."
    ) from e
  return restored["state"], restored["data"], step


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def load_params(path: str, abstract_params: Any) -> Any:
  """Loads only the model parameters from a jaxllm checkpoint dir (a workdir, its
  `checkpoints/` folder, or one step), for `init_from` (continued training, fine-tuning)."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  step_dir = path
  if not os.path.isdir(os.path.join(path, "state")):
    steps = sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []
    if not steps:
      raise CheckpointError(f"init_from={path}: no jaxllm checkpoint there (expected <dir>/checkpoints/<step>/state).")
    step_dir = os.path.join(path, str(steps[-1]))
  state_dir = os.path.join(step_dir, "state")
  metadata = ocp.StandardCheckpointer().metadata(state_dir)
  tree = getattr(metadata, "item_metadata", metadata)
  tree = getattr(tree, "tree", tree)
  if "params" not in tree:
    raise CheckpointError(f"init_from={step_dir}: the checkpoint holds no 'params'.")
  restore_target = {"params": abstract_params}
  if tree.get("frozen"):
    raise CheckpointError(f"init_from={step_dir}: a checkpoint with a frozen/trainable split; "
                          "start from its base model instead.")
  with ocp.StandardCheckpointer() as checkpointer:
    try:
      restored = checkpointer.restore(state_dir, target=None, args=ocp.args.PyTreeRestore(
          item=restore_target, restore_args=ocp.checkpoint_utils.construct_restore_args(restore_target),
          partial_restore=True))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointError(f"init_from={step_dir}: its parameters do not match this model config "
                            f"({str(e).splitlines()[0][:200]}).") from e
  return restored["params"]


def write_json(path: str, obj: Any) -> None:
  """Writes JSON atomically (temp file + rename) so a crash never leaves half a file."""
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, path)
