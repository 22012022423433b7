"""Hugging Face interop: `from_hf` (HF directory -> jaxllm model directory) and `to_hf` (back).

Architectures are registered by their HF class name, one mapping module each; adding
one is a module with an `ARCHITECTURE` and one line in `registry._MODULES`.
"""

from __future__ import annotations

from jaxllm.convert.base import Architecture, ConvertError
from jaxllm.convert.registry import architectures, get_architecture


def from_hf(*args, **kwargs):
  from jaxllm.convert.importer import from_hf as impl  # pylint: disable=import-outside-toplevel
  return impl(*args, **kwargs)


def to_hf(*args, **kwargs):
  from jaxllm.convert.exporter import to_hf as impl  # pylint: disable=import-outside-toplevel
  return impl(*args, **kwargs)


__all__ = ["Architecture", "ConvertError", "architectures", "get_architecture", "from_hf", "to_hf"]
