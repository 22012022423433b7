"""Device mesh, logical-axis rules and helpers that place pytrees on the mesh.

Model code names logical axes (`embed`, `heads`, ...); this table is the one place
that says which mesh axis each of them is split over. A dimension that does not
divide evenly by its mesh axes is replicated instead (odd head counts, vocabularies
that are not a multiple of the tensor axis), so any model runs on any mesh.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxllm.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical name -> mesh axes. FSDP shards the model dimension of every weight;
# tensor parallelism splits heads, MLP width and the vocabulary (Megatron style).
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("seq", None),
    ("layers", None),  # the stacked axis of scanned layers: each device holds every layer's share
    # Activations inside the blocks (layers.constrain): the batch over data x fsdp, heads and
    # MLP width over tensor; the model dimension whole (FSDP shards weights, not activations).
    ("activation_batch", BATCH_AXES),
    ("activation_seq", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
)


def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
  """Resolves the configured sizes (-1 = the rest of the devices) to a shape that uses them all."""
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ConfigError(f"mesh: at most one of data/fsdp/tensor may be -1, got {sizes}.")
  if any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(f"mesh: sizes must be positive or -1, got data={data} fsdp={fsdp} tensor={tensor}.")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(f"mesh: data x fsdp x tensor = {known} (without the -1) does not divide the "
                        f"{num_devices} devices; pick sizes whose product divides {num_devices}.")
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ConfigError(f"mesh: data x fsdp x tensor = {'x'.join(map(str, sizes))} = {int(np.prod(sizes))} "
                      f"but there are {num_devices} devices; make the product {num_devices} or set one axis to -1.")
  return tuple(sizes)


def make_mesh(mesh_cfg: Any, devices: list | None = None) -> Mesh:
  """Builds the (data, fsdp, tensor) mesh from `config.mesh`, laid out for the device topology."""
  devices = devices if devices is not None else jax.devices()
  shape = mesh_shape(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor, len(devices))
  try:
    device_array = mesh_utils.create_device_mesh(shape, devices)
  except (AssertionError, ValueError, NotImplementedError):
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES)


def mesh_from_flag(spec: str, flag: str = "--mesh") -> Mesh:
  """The mesh of a command's `--mesh DATA,FSDP,TENSOR` flag (such as 1,1,-1)."""
  try:
    data, fsdp, tensor = (int(x) for x in spec.split(","))
  except ValueError as e:
    raise ConfigError(f"{flag} {spec!r}: expected three integers DATA,FSDP,TENSOR such as 1,1,-1.") from e
  return make_mesh(SimpleNamespace(data=data, fsdp=fsdp, tensor=tensor))


def _fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Drops mesh axes from dimensions they do not divide evenly."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      fitted.append(None)
      continue
    axes_tuple = axes if isinstance(axes, tuple) else (axes,)
    kept = []
    size = 1
    for axis in axes_tuple:
      if dim % (size * mesh.shape[axis]) == 0:
        kept.append(axis)
        size *= mesh.shape[axis]
    fitted.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
  return P(*fitted)


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
  """NamedShardings for a tree of (possibly `nn.LogicallyPartitioned`) abstract arrays."""
  specs = nn.get_partition_spec(abstract_tree)
  mesh_specs = nn.logical_to_mesh(specs, rules)
  shapes = jax.tree.map(lambda x: x.shape, nn.meta.unbox(abstract_tree))
  return jax.tree.map(lambda spec, shape: NamedSharding(mesh, _fit_spec(spec, shape, mesh)),
                      mesh_specs, shapes, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches are split along their first dimension over the data and fsdp axes."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def make_global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each host's share of the batch into global arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def bytes_per_device(tree: Any) -> int:
  """The most bytes any single device holds of `tree` (a pytree of sharded jax.Arrays)."""
  per_device: dict[Any, int] = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
  return max(per_device.values()) if per_device else 0
