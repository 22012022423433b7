"""The input pipeline's position as a checkpoint stores it: JSON that restores to the same state.

grain iterator states are plain Python values, but not JSON values: grain's
ConcatThenSplit marks "no remainder" with the tuple (-1, -1) and compares with
`!=`, so after a plain JSON round trip the list [-1, -1] reads as a remainder and
the restored pipeline drops an element. That happens exactly at positions with no
remainder, above all the not-yet-started position that a shuffle window (or a
fresh shard) restores to. So tuples (and anything else JSON would change) are
tagged on the way out and rebuilt on the way in: `decode(encode(s)) == s`, types
included, for every state our pipelines produce.

A job of several processes has one position per process. The checkpoint (written
by process 0 alone) holds all of them, in one of three shapes (`job_position`):
  {"num_shards": N, "shards": {...}}  every logical shard's position: LM, packed
                                      instruction tuning and masked-LM, which resume
                                      on any process count dividing N
  {"global": ...}                     the same on every process and for any process
                                      count (padded instruction tuning, windows)
  {"processes": [...]}                one per process: what masked-LM wrote before it
                                      moved onto logical shards (each process's state is
                                      then its one shard's); resumes only on the process
                                      count it was saved with
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import numpy as np

from jaxllm.data.sources import DataError

# 3: the whole job's position; 2: process 0's state alone, tagged; 1 (unmarked): process 0's
# raw state through plain JSON. 1 and 2 resume only on one process (others got process 0's).
FORMAT = 3
_TUPLE, _INT_KEYS = "__tuple__", "__int_keys__"


def encode(state: Any) -> Any:
  """A JSON-able snapshot of an iterator state (it never changes when the iterator moves on)."""
  return _encode(copy.deepcopy(state))


def decode(value: Any) -> Any:
  """The iterator state `encode` was given."""
  return _decode(value)


def job_position(local: Any, gather: Callable[[Any], list[Any]], process_count: int) -> dict:
  """What the checkpoint stores, from this process's iterator state; `gather(json_value)` returns
  every process's value in process order (a collective: every process calls it)."""
  if isinstance(local, dict) and "shards" in local:
    shards: dict[str, Any] = {}
    for part in gather(encode(local)):
      shards.update(part["shards"])
    state = {"num_shards": local["num_shards"], "shards": shards}
  elif isinstance(local, dict) and "global" in local:
    state = encode(local)
  else:
    state = {"processes": gather(encode(local))}
  return {"format": FORMAT, "process_count": process_count, "state": state}


def process_state(saved: Any, process_index: int, process_count: int) -> Any:
  """This process's iterator state from a checkpoint's position, of any format."""
  if not (isinstance(saved, dict) and "format" in saved and "state" in saved):
    return _legacy(saved)
  if saved["format"] == 2:
    return _decode(saved["state"])
  if saved["format"] != FORMAT:
    raise DataError(f"the checkpoint's data position has format {saved['format']}, newer than this jaxllm "
                    f"reads ({FORMAT}); resume with the jaxllm version that wrote it.")
  state = saved["state"]
  if isinstance(state, dict) and "processes" in state:
    if len(state["processes"]) != process_count:
      raise DataError(
          f"the checkpoint's data position was saved by {len(state['processes'])} processes and this run has "
          f"{process_count}; a position kept per process (masked-LM checkpoints written before its data moved "
          f"onto logical shards) resumes only on {len(state['processes'])} processes: run that many, or start "
          "in a fresh --workdir.")
    return _decode(state["processes"][process_index])
  return _decode(state)


def _encode(value: Any) -> Any:
  if isinstance(value, tuple):
    return {_TUPLE: [_encode(v) for v in value]}
  if isinstance(value, list):
    return [_encode(v) for v in value]
  if isinstance(value, dict):
    if value and all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) for k in value):
      return {_INT_KEYS: [[int(k), _encode(v)] for k, v in value.items()]}
    if not all(isinstance(k, str) for k in value):
      raise TypeError(f"an iterator state has dict keys JSON cannot keep: {list(value)[:4]}")
    return {k: _encode(v) for k, v in value.items()}
  if isinstance(value, np.ndarray):
    return _encode(value.tolist())
  if isinstance(value, np.generic):
    return value.item()
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  raise TypeError(f"an iterator state holds a {type(value).__name__}, which a checkpoint cannot store")


def _decode(value: Any) -> Any:
  if isinstance(value, list):
    return [_decode(v) for v in value]
  if isinstance(value, dict):
    if set(value) == {_TUPLE}:
      return tuple(_decode(v) for v in value[_TUPLE])
    if set(value) == {_INT_KEYS}:
      return {int(k): _decode(v) for k, v in value[_INT_KEYS]}
    return {k: _decode(v) for k, v in value.items()}
  return value


def _legacy(value: Any) -> Any:
  """A state saved as plain JSON: the one known loss is ConcatThenSplit's slice tuples."""
  if isinstance(value, list):
    return [_legacy(v) for v in value]
  if isinstance(value, dict):
    out = {k: _legacy(v) for k, v in value.items()}
    if isinstance(out.get("remainder_slices"), dict):
      out["remainder_slices"] = {k: tuple(v) if isinstance(v, list) else v
                                 for k, v in out["remainder_slices"].items()}
    return out
  return value
