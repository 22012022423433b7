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
  if name not in _MODULES:
    raise ConvertError(f"architecture {name!r} is not supported; jaxllm converts {', '.join(_MODULES)}.")
  return importlib.import_module(_MODULES[name]).ARCHITECTURE
