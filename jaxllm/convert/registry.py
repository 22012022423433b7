"""Architectures by their Hugging Face class name, one mapping module each.

Adding one is a module with an `ARCHITECTURE` and one line in `_MODULES`.
"""

from __future__ import annotations

import importlib

from jaxllm.convert.base import Architecture, ConvertError

_MODULES = {
    "GPT2LMHeadModel": "jaxllm.convert.gpt2",
    "LlamaForCausalLM": "jaxllm.convert.llama",
    "BloomForCausalLM": "jaxllm.convert.bloom",
    "BertForMaskedLM": "jaxllm.convert.bert",
}


def architectures() -> dict[str, Architecture]:
  """Every registered architecture by HF class name, in registration order."""
  return {name: importlib.import_module(module).ARCHITECTURE for name, module in _MODULES.items()}


def get_architecture(name: str) -> Architecture:
  """The architecture that imports HF class `name` (a registered one, or one it is the headless base of)."""
  if name in _MODULES:
    return importlib.import_module(_MODULES[name]).ARCHITECTURE
  for arch in architectures().values():
    if name in arch.headless:
      return arch
  supported = [n for a in architectures().values() for n in (a.name, *a.headless)]
  raise ConvertError(f"architecture {name!r} is not supported; jaxllm converts {', '.join(supported)}.")
