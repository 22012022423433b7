"""The input pipeline's position as a checkpoint stores it: JSON that restores to the same state.

grain iterator states are plain Python values, but not JSON values: grain's
ConcatThenSplit marks "no remainder" with the tuple (-1, -1) and compares with
`!=`, so after a plain JSON round trip the list [-1, -1] reads as a remainder and
the restored pipeline drops an element. That happens exactly at positions with no
remainder, above all the not-yet-started position that a shuffle window (or a
fresh shard) restores to. So tuples (and anything else JSON would change) are
tagged on the way out and rebuilt on the way in: `decode(encode(s)) == s`, types
included, for every state our pipelines produce.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

FORMAT = 2  # 1 (unmarked): the raw state through plain JSON, written before this module
_TUPLE, _INT_KEYS = "__tuple__", "__int_keys__"


def encode(state: Any) -> dict:
  """A JSON-able snapshot of an iterator state (it never changes when the iterator moves on)."""
  return {"format": FORMAT, "state": _encode(copy.deepcopy(state))}


def decode(saved: Any) -> Any:
  """The iterator state `encode` was given, from what the checkpoint holds."""
  if isinstance(saved, dict) and saved.get("format") == FORMAT and "state" in saved:
    return _decode(saved["state"])
  return _legacy(saved)


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
