"""Lazy, tensor-by-tensor reading of a Hugging Face checkpoint (safetensors, or PyTorch .bin).

Only the names are read up front; each tensor is read when asked for, so a model
larger than host memory is never whole in one place. torch is imported only when the
directory has no safetensors and .bin files must be read.
"""

from __future__ import annotations

import contextlib
import json
import os

import numpy as np

from jaxllm.convert.base import ConvertError

SAFETENSORS = ("model.safetensors.index.json", "model.safetensors")
PYTORCH = ("pytorch_model.bin.index.json", "pytorch_model.bin")


def _weight_map(hf_dir: str, index_name: str, single_name: str) -> dict[str, str] | None:
  """{tensor name: file} from an index, or from the single file; None when neither exists."""
  index = os.path.join(hf_dir, index_name)
  if os.path.isfile(index):
    with open(index, encoding="utf-8") as f:
      weight_map = json.load(f)["weight_map"]
    for file in set(weight_map.values()):
      if not os.path.isfile(os.path.join(hf_dir, file)):
        raise ConvertError(f"{index} lists {file}, which is missing from {hf_dir}; download all shards.")
    return weight_map
  if os.path.isfile(os.path.join(hf_dir, single_name)):
    return None if single_name.endswith(".bin") else {}
  return None


class TensorSource(contextlib.AbstractContextManager):
  """Names and lazily-read numpy tensors of one HF checkpoint directory."""

  def __init__(self, hf_dir: str):
    self.hf_dir = hf_dir
    self._stack = contextlib.ExitStack()
    self._handles: dict[str, object] = {}
    self._bin_cache: tuple[str, dict] | None = None
    weight_map = _weight_map(hf_dir, *SAFETENSORS)
    self.format = "safetensors"
    if weight_map is None:
      self.format = "pytorch"
      weight_map = self._bin_weight_map()
    elif not weight_map:  # a single model.safetensors: its header lists the names
      weight_map = {name: SAFETENSORS[1] for name in self._safetensors(SAFETENSORS[1]).keys()}
    self.weight_map = weight_map

  def _bin_weight_map(self) -> dict[str, str]:
    index = os.path.join(self.hf_dir, PYTORCH[0])
    if os.path.isfile(index):
      return _weight_map(self.hf_dir, *PYTORCH)
    if os.path.isfile(os.path.join(self.hf_dir, PYTORCH[1])):
      return {name: PYTORCH[1] for name in self._load_bin(PYTORCH[1])}
    raise ConvertError(f"{self.hf_dir}: no weights found (expected model.safetensors, "
                       "model.safetensors.index.json, pytorch_model.bin or its index).")

  def _safetensors(self, file: str):
    if file not in self._handles:
      from safetensors import safe_open  # pylint: disable=import-outside-toplevel
      self._handles[file] = self._stack.enter_context(
          safe_open(os.path.join(self.hf_dir, file), framework="numpy"))
    return self._handles[file]

  def _load_bin(self, file: str) -> dict:
    """One .bin shard, memory-mapped; the last one stays cached since names come shard by shard."""
    if self._bin_cache is None or self._bin_cache[0] != file:
      try:
        import torch  # pylint: disable=import-outside-toplevel
      except ImportError as e:
        raise ConvertError(f"{self.hf_dir} holds PyTorch .bin weights; reading them needs torch "
                           "(pip install torch), or convert them to safetensors first.") from e
      state = torch.load(os.path.join(self.hf_dir, file), map_location="cpu", mmap=True,
                         weights_only=True)
      self._bin_cache = (file, state)
    return self._bin_cache[1]

  def names(self) -> list[str]:
    return list(self.weight_map)

  def get(self, name: str) -> np.ndarray:
    file = self.weight_map[name]
    if self.format == "safetensors":
      return self._safetensors(file).get_tensor(name)
    return _torch_to_numpy(self._load_bin(file)[name])

  def __exit__(self, *exc):
    self._bin_cache = None
    self._stack.close()
    return False


def _torch_to_numpy(tensor) -> np.ndarray:
  import torch  # pylint: disable=import-outside-toplevel
  tensor = tensor.detach().cpu().contiguous()
  if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16; ml_dtypes (a jax dependency) does
    import ml_dtypes  # pylint: disable=import-outside-toplevel
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.numpy()
