"""Orbax checkpoints: the train state plus the input pipeline's position, saved together.

Saves are asynchronous (the step goes on while the state is written) and atomic:
orbax writes into a temporary directory and renames it when complete, so a run
killed mid-save resumes from the previous complete checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import traverse_util

from jaxllm import killpoints
from jaxllm.errors import CheckpointError
from jaxllm.models import stacking


def make_manager(workdir: str, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
  # A save killed midway leaves only a `<step>.orbax-checkpoint-tmp-*` directory, which is
  # never listed as a step; cleanup_tmp_directories deletes such leftovers on the next start.
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options, item_names=("state", "data"))


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: Any | None,
         force: bool = False) -> bool:
  """Starts an asynchronous save of `state` and the (JSON-able) data iterator state.

  A disk without room for it is reported before anything is written (CheckpointError);
  earlier checkpoints are never touched by a failed save.
  """
  args = {"state": ocp.args.StandardSave(state)}
  args["data"] = ocp.args.JsonSave(data_state if data_state is not None else {})
  with _write_errors(manager, step):
    manager.wait_until_finished()  # the previous save's bytes count against the free space
    _check_free_space(str(manager.directory), step, state)
    saved = manager.save(step, args=ocp.args.Composite(**args), force=force)
    killpoints.reached("checkpoint.write")
    return saved


def wait(manager: ocp.CheckpointManager) -> None:
  """Blocks until every save has been written (and renamed into place)."""
  with _write_errors(manager, manager.latest_step()):
    manager.wait_until_finished()


# Substrings of the errors that writing to a full, read-only or forbidden disk produce, from
# Python (OSError) and from orbax/tensorstore (ValueError "RESOURCE_EXHAUSTED: ... os_error_code").
_DISK_ERRORS = ("No space left", "Read-only file system", "Permission denied", "Disk quota exceeded",
                "os_error_code")


@contextlib.contextmanager
def _write_errors(manager: ocp.CheckpointManager, step: int | None):
  try:
    yield
  except (OSError, ValueError) as e:
    reason = next((r for r in _DISK_ERRORS[:-1] if r in str(e)), None)
    if reason is None and _DISK_ERRORS[-1] not in str(e):
      raise
    raise CheckpointError(
        f"cannot write checkpoint {step} to {manager.directory} ({reason or str(e).splitlines()[0][:200]}); "
        "free space or use another --workdir. Earlier checkpoints are intact.") from e


def _check_free_space(directory: str, step: int, state: Any) -> None:
  needed = sum(getattr(leaf, "nbytes", 0) for leaf in jax.tree.leaves(state)) // jax.process_count()
  free = shutil.disk_usage(directory).free
  if free < needed * 1.05 + (1 << 16):  # the arrays plus some room for orbax's metadata
    raise CheckpointError(
        f"cannot write checkpoint {step} to {directory}: it needs about {needed / 2**20:.1f} MiB but "
        f"{free / 2**20:.1f} MiB are free; free space or use another --workdir. Earlier checkpoints "
        "are intact.")


def ensure_writable(workdir: str) -> None:
  """Creates `workdir` and writes a file there, so a read-only or missing disk stops the run at once."""
  probe = os.path.join(workdir, f".write_test.{jax.process_index()}")
  try:
    os.makedirs(workdir, exist_ok=True)
    with open(probe, "w", encoding="utf-8") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise CheckpointError(f"--workdir {workdir}: cannot write there ({e.strerror or e}); "
                          "use a writable directory.") from e


def restore(manager: ocp.CheckpointManager, abstract_state: Any, step: int | None = None
            ) -> tuple[Any, Any, int] | None:
  """Restores the latest (or given) step onto the shardings of `abstract_state`; None if there is none."""
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  where = f"checkpoint step {step} in {manager.directory}"
  with ocp.PyTreeCheckpointer() as checkpointer:
    stored = _stored_tree(checkpointer, os.path.join(str(manager.directory), str(step), "state"))
  wanted = _flat_params({"params": getattr(abstract_state, "params", None),
                         "frozen": getattr(abstract_state, "frozen", None)})
  if wanted:  # a train state: its parameters must be exactly the model's, shapes included
    _refuse_other_layer_layout(manager, step, stored, getattr(abstract_state, "params", {}) or {})
    check_params_fit(_flat_params(stored), wanted, wanted, where=where,
                     fix="resume with the config it was trained with (its config.json) or use a fresh --workdir")
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(
        f"checkpoint step {step} in {manager.directory} does not fit this model/config "
        f"({str(e).splitlines()[0][:200]}); use a fresh --workdir or the config it was trained with."
    ) from e
  return restored["state"], restored["data"], step


def _refuse_other_layer_layout(manager: ocp.CheckpointManager, step: int, stored: dict, params: Any) -> None:
  """One line saying how to go on when a run's checkpoint (`stored`: its tree) has the other
  layer layout than the model's `params` (unrolled layer_0.. from before scanned layers, or
  stacked `layers`)."""
  stored_params = dict(stored.get("params") or {})
  if stacking.is_unrolled(stored_params) and stacking.is_stacked(params):
    raise CheckpointError(
        f"checkpoint step {step} in {manager.directory} has unrolled layers (layer_0 ...) from before "
        "model.scan_layers; resume it with --config.model.scan_layers=False, or start a new workdir "
        f"with --config.init_from={os.path.dirname(str(manager.directory))} (converted on read).")
  if stacking.is_stacked(stored_params) and stacking.is_unrolled(params):
    raise CheckpointError(
        f"checkpoint step {step} in {manager.directory} has scanned layers (layers/...); resume it "
        "with --config.model.scan_layers=True.")


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class _NoStateMetadataNotice(logging.Filter):
  """orbax warns that a step's state/ has no _CHECKPOINT_METADATA when it is read directly: the
  CheckpointManager writes that file one level up, so for load_params it is expected, not news."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "_CHECKPOINT_METADATA" not in record.getMessage()


@contextlib.contextmanager
def _quiet_state_metadata():
  notice = _NoStateMetadataNotice()
  logging.getLogger("absl").addFilter(notice)
  try:
    yield
  finally:
    logging.getLogger("absl").removeFilter(notice)


def load_params(path: str, abstract_params: Any, step: int | None = None, *, expected: Any = None) -> Any:
  """Loads only the model parameters from a jaxllm checkpoint dir (a workdir, its
  `checkpoints/` folder, or one step), for `init_from` (continued training, fine-tuning).
  `step` picks one of several saved steps (default: the latest).

  Every parameter of `abstract_params` must be stored with its shape, and every stored
  parameter must belong to `expected` (the whole model's abstract params; default
  `abstract_params`), so a checkpoint of another architecture is refused, never half-loaded."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  step_dir = path
  if not os.path.isdir(os.path.join(path, "state")):
    steps = sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []
    if not steps:
      raise CheckpointError(f"init_from={path}: no jaxllm checkpoint there (expected <dir>/checkpoints/<step>/state).")
    if step is not None and step not in steps:
      raise CheckpointError(f"{path}: no checkpoint for step {step}; saved steps: {steps}.")
    step_dir = os.path.join(path, str(steps[-1] if step is None else step))
  state_dir = os.path.join(step_dir, "state")
  if not os.path.isdir(state_dir):
    raise CheckpointError(f"init_from={step_dir}: no 'state' directory; not a jaxllm checkpoint.")
  with _quiet_state_metadata(), ocp.PyTreeCheckpointer() as checkpointer:
    stored = _stored_tree(checkpointer, state_dir)
    stored_params = _flat_params(stored)
    if not stored_params:
      raise CheckpointError(f"{step_dir}: cannot read which parameters the checkpoint holds; it is not "
                            "a jaxllm checkpoint or it is damaged.")
    # Checkpoints written before scanned layers hold layer_0..; they are restacked on read.
    stored_trees = [dict(stored.get(k) or {}) for k in ("params", "frozen")]
    abstract_params, to_model_layout = stacking.match_stored(abstract_params, stored_trees)
    expected_stored, _ = stacking.match_stored(expected if expected is not None else abstract_params,
                                               stored_trees)
    check_params_fit(stored_params, traverse_util.flatten_dict(abstract_params),
                     traverse_util.flatten_dict(expected_stored), where=step_dir)
    restore_target = _split_like_stored(abstract_params, stored)
    try:
      restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
          item=restore_target, restore_args=ocp.checkpoint_utils.construct_restore_args(restore_target),
          partial_restore=True))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointError(f"init_from={step_dir}: its parameters do not match this model config "
                            f"({str(e).splitlines()[0][:200]}).") from e
  flat = traverse_util.flatten_dict(restored.get("frozen") or {})
  flat.update(traverse_util.flatten_dict(restored["params"]))
  return to_model_layout(traverse_util.unflatten_dict(flat))


def _path(key: tuple) -> str:
  return "/".join(map(str, key))


def _flat_params(stored: Any) -> dict[tuple, Any]:
  """{path: metadata} of the parameters in a stored state tree (its params and frozen parts)."""
  flat = {}
  for part in ("frozen", "params"):
    tree = stored.get(part) if hasattr(stored, "get") else None
    if tree:
      flat.update(traverse_util.flatten_dict(_as_dict(tree)))
  return flat


def _as_dict(tree: Any) -> Any:
  if hasattr(tree, "keys") and not hasattr(tree, "shape"):
    return {k: _as_dict(tree[k]) for k in tree.keys()}
  return tree


def check_params_fit(stored: dict[tuple, Any], wanted: dict[tuple, Any], model: dict[tuple, Any],
                     where: str, fix: str = "use the config it was saved with (its config.json)") -> None:
  """Refuses, naming the first parameter that differs, unless every wanted parameter is stored
  with its shape and every stored one belongs to the model (flat {path: array-like} dicts)."""
  def refuse(detail: str):
    raise CheckpointError(f"{where} does not fit this model: {detail}; it was saved for another model "
                          f"config. {fix[0].upper() + fix[1:]}.")
  for key in sorted(wanted, key=_path):
    if key not in stored:
      refuse(f"it has no parameter {_path(key)}")
    if tuple(stored[key].shape) != tuple(wanted[key].shape):
      refuse(f"parameter {_path(key)} is {tuple(stored[key].shape)} there but {tuple(wanted[key].shape)} here")
  for key in sorted(stored, key=_path):
    if key not in model:
      refuse(f"it holds parameter {_path(key)}, which this model lacks")
    if tuple(stored[key].shape) != tuple(model[key].shape):
      refuse(f"parameter {_path(key)} is {tuple(stored[key].shape)} there but {tuple(model[key].shape)} here")


def _stored_tree(checkpointer: ocp.PyTreeCheckpointer, state_dir: str) -> dict:
  """The stored tree's structure (leaves are metadata), or {} when orbax cannot say."""
  try:
    meta = checkpointer.metadata(state_dir)
  except (ValueError, KeyError, TypeError, OSError):
    return {}
  meta = getattr(meta, "item_metadata", meta)
  meta = getattr(meta, "tree", meta)
  return dict(meta) if isinstance(meta, dict) or hasattr(meta, "keys") else {}


def _split_like_stored(abstract_params: Any, stored: dict) -> dict:
  """{"params": ...} or, for a run with `train.trainable` (TrainState keeps the frozen part apart),
  {"params": trainable part, "frozen": frozen part} as the checkpoint stores them."""
  frozen = stored.get("frozen") or {}
  if not frozen:
    return {"params": abstract_params}
  frozen_paths = set(traverse_util.flatten_dict(dict(frozen)))
  flat = traverse_util.flatten_dict(abstract_params)
  return {"params": traverse_util.unflatten_dict({k: v for k, v in flat.items() if k not in frozen_paths}),
          "frozen": traverse_util.unflatten_dict({k: v for k, v in flat.items() if k in frozen_paths})}


def write_json(path: str, obj: Any) -> None:
  """Writes JSON atomically (temp file + rename) so a crash never leaves half a file."""
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, path)


# Model directories (config.json + tokenizer/ + checkpoints/) are read and written by model_dir.py.


def read_run_config(path: str) -> dict:
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: no such directory; give a jaxllm workdir or a directory written "
                          "by `python -m jaxllm.convert from-hf`.")
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise CheckpointError(f"{path}: no config.json; expected a jaxllm workdir or a directory written "
                          "by `python -m jaxllm.convert from-hf`.")
  with open(config_path, encoding="utf-8") as f:
    return json.load(f)
