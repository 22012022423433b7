"""Scanned (stacked) and unrolled layer parameters, and the conversions between them.

With `model.scan_layers` the blocks' parameters live under one key, `layers`, each leaf with a
leading [num_layers] axis; unrolled, they are `layer_0 ... layer_{N-1}`. Code that names single
layers (the Hugging Face converters, checkpoints written before scanning) works on the unrolled
form and converts at its boundary with `stack_layers` / `unstack_layers`. Both are exact
rearrangements, so a round trip gives back every value bit for bit.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

STACKED = "layers"
_LAYER = re.compile(r"^layer_(\d+)$")


def layer_indices(tree: Mapping) -> list[int]:
  """The i of every top-level `layer_i` key, sorted."""
  return sorted(int(m.group(1)) for m in (_LAYER.match(str(k)) for k in tree) if m)


def is_stacked(tree: Mapping) -> bool:
  return STACKED in tree


def is_unrolled(tree: Mapping) -> bool:
  return bool(layer_indices(tree))


def _stack(leaves: list) -> Any:
  if isinstance(leaves[0], jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(leaves),) + leaves[0].shape, leaves[0].dtype)
  if isinstance(leaves[0], np.ndarray):
    return np.stack(leaves)
  return jnp.stack(leaves)


def stack_layers(params: Mapping) -> dict:
  """`layer_0 ... layer_{N-1}` -> `layers` with every leaf stacked [N, ...]; other keys as they are."""
  indices = layer_indices(params)
  if not indices:
    return dict(params)
  if indices != list(range(len(indices))):
    raise ValueError(f"layer keys {indices} are not 0..{len(indices) - 1}; cannot stack them.")
  out = {k: v for k, v in params.items() if not _LAYER.match(str(k))}
  out[STACKED] = jax.tree.map(lambda *leaves: _stack(list(leaves)),
                              *[params[f"layer_{i}"] for i in indices])
  return out


def _unstack_leaf(leaf: Any, i: int) -> Any:
  if isinstance(leaf, jax.ShapeDtypeStruct):
    sharding = leaf.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
      sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
    return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=sharding)
  return leaf[i]


def unstack_layers(params: Mapping) -> dict:
  """`layers` [N, ...] -> `layer_0 ... layer_{N-1}`; other keys as they are. Abstract leaves
  (ShapeDtypeStruct) lose the stacked axis from their shape and NamedSharding alike."""
  if not is_stacked(params):
    return dict(params)
  stacked = params[STACKED]
  num_layers = jax.tree.leaves(stacked)[0].shape[0]
  out = {k: v for k, v in params.items() if k != STACKED}
  for i in range(num_layers):
    out[f"layer_{i}"] = jax.tree.map(lambda leaf, i=i: _unstack_leaf(leaf, i), stacked)
  return out


def like(params: Mapping, scan_layers: bool) -> dict:
  """`params` in the layout `scan_layers` asks for (stacked or unrolled), converted if needed."""
  return stack_layers(params) if scan_layers else unstack_layers(params)


def stack_onto(params: Mapping, shardings: Mapping | None = None) -> dict:
  """`stack_layers` for device arrays: each stacked leaf is built on the devices straight onto
  its sharding in `shardings` (a tree like the stacked params; by default its layers' sharding
  with the unsharded `layers` axis in front) and its per-layer parts are freed as soon as it
  exists, so the devices never hold the layers twice and nothing passes through the host."""
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  indices = layer_indices(params)
  if not indices:
    return dict(params)
  if indices != list(range(len(indices))):
    raise ValueError(f"layer keys {indices} are not 0..{len(indices) - 1}; cannot stack them.")
  layers = [traverse_util.flatten_dict(params[f"layer_{i}"]) for i in indices]
  flat_shardings = traverse_util.flatten_dict(shardings[STACKED]) if shardings else {}
  stacked = {}
  for path in list(layers[0]):
    parts = [layer.pop(path) for layer in layers]
    if not isinstance(parts[0], jax.Array):
      stacked[path] = _stack(parts)
      continue
    sharding = flat_shardings.get(path, _stacked_sharding(parts[0].sharding))
    stacked[path] = jax.jit(lambda *xs: jnp.stack(xs), out_shardings=sharding)(*parts)
    for part in parts:
      part.delete()
  out = {k: v for k, v in params.items() if not _LAYER.match(str(k))}
  out[STACKED] = traverse_util.unflatten_dict(stacked)
  return out


def _stacked_sharding(sharding: Any) -> Any:
  """A layer's sharding with the stacked axis in front, unsharded (as sharding.LOGICAL_RULES maps `layers`)."""
  if isinstance(sharding, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(None, *sharding.spec))
  return sharding


def _stack_abstract(leaves: list) -> jax.ShapeDtypeStruct:
  leaf = leaves[0]
  return jax.ShapeDtypeStruct((len(leaves),) + leaf.shape, leaf.dtype, sharding=_stacked_sharding(leaf.sharding))


def match_stored(abstract_params: Mapping, stored_trees: list[Mapping]):
  """(abstract params in the layout a checkpoint stores, a function turning what is restored in
  that layout back into the layout of `abstract_params`).

  `stored_trees` are the checkpoint's top-level parameter trees (params, frozen); a checkpoint
  written before scanned layers holds `layer_i`, and a scanned model reads it converted."""
  stored_stacked = any(is_stacked(t) for t in stored_trees)
  stored_unrolled = any(is_unrolled(t) for t in stored_trees)
  if is_stacked(abstract_params) and stored_unrolled and not stored_stacked:
    shardings = {STACKED: jax.tree.map(lambda a: a.sharding, abstract_params[STACKED])}
    return unstack_layers(abstract_params), lambda restored: stack_onto(restored, shardings)
  if is_unrolled(abstract_params) and stored_stacked and not stored_unrolled:
    indices = layer_indices(abstract_params)
    out = {k: v for k, v in abstract_params.items() if not _LAYER.match(str(k))}
    out[STACKED] = jax.tree.map(lambda *leaves: _stack_abstract(list(leaves)),
                                *[abstract_params[f"layer_{i}"] for i in indices])
    return out, unstack_layers
  return dict(abstract_params), lambda restored: restored


class UnrolledView(Mapping):
  """A read-only {"layer_i/...": array} view of a flat {"layers/...": [N, ...]} params dict: each
  layer's tensor is sliced from its stack only when asked for (exporting one tensor at a time)."""

  def __init__(self, flat: Mapping[str, Any]):
    self._flat = dict(flat)
    self._keys = []
    for key, leaf in self._flat.items():
      head, _, rest = key.partition("/")
      if head == STACKED:
        self._keys += [f"layer_{i}/{rest}" for i in range(leaf.shape[0])]
      else:
        self._keys.append(key)

  def __getitem__(self, key: str) -> Any:
    match = re.match(r"^layer_(\d+)/(.*)$", key)
    if match and f"{STACKED}/{match.group(2)}" in self._flat:
      return self._flat[f"{STACKED}/{match.group(2)}"][int(match.group(1))]
    return self._flat[key]

  def __iter__(self):
    return iter(self._keys)

  def __len__(self) -> int:
    return len(self._keys)
