"""What one Hugging Face architecture mapping provides, and the tensor rules they are built from.

A mapping (one module per architecture: gpt2.py, llama.py, bloom.py, ...) says how
the HF config becomes `config.model`, when a jaxllm model can be written back in that
architecture, and a list of `Rule`s: each ties one HF tensor to one or more jaxllm
parameters with a pair of exact, inverse rearrangements (transpose, reshape, split).
Because every rule is a pure rearrangement, import then export gives back every
tensor bit for bit, and a rule's bytes are the sum of its parameters' bytes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np

from jaxllm.errors import ConvertError
from jaxllm.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Rule:
  """One HF tensor <-> one or more jaxllm parameters (paths like "layer_0/attn/query/kernel")."""
  hf: str
  params: tuple[str, ...]
  to_jax: Callable[[np.ndarray], tuple[np.ndarray, ...]]
  to_hf: Callable[..., np.ndarray]


@dataclasses.dataclass(frozen=True)
class Architecture:
  """Everything the converter needs to know about one HF architecture."""
  name: str                    # the HF class, as in config.json "architectures"
  model_type: str              # config.json "model_type"
  auto_class: str              # the transformers Auto class that loads it
  # HF config object -> dict of `config.model` keys; raises ConvertError for what jaxllm can't represent.
  model_config: Callable[[Any], dict]
  # ModelConfig -> why it can't be written as this architecture (None when it can).
  export_problem: Callable[[ModelConfig], str | None]
  # ModelConfig -> keyword arguments of the HF config class.
  hf_config: Callable[[ModelConfig], dict]
  rules: Callable[[ModelConfig], list[Rule]]
  # Regexes of HF tensor names that are buffers or duplicates, not weights (skipped on import).
  ignored: tuple[str, ...] = ()
  # The base model's prefix ("transformer."); some hub checkpoints store names without it.
  base_prefix: str = ""
  # HF classes of the same model without this one's head (BertModel for BertForMaskedLM): their
  # checkpoints import as this architecture, with the head's tensors from init_head(hf_config)
  # (by HF name, initialised as transformers initialises them).
  headless: tuple[str, ...] = ()
  init_head: Callable[[Any], dict[str, np.ndarray]] | None = None


def refuse(hf_name: str, option: str, value: Any, why: str = "") -> ConvertError:
  return ConvertError(f"{hf_name} with {option}={value!r} is not supported: jaxllm has no such option"
                      f"{' (' + why + ')' if why else ''}.")


def copy(hf: str, param: str) -> Rule:
  return Rule(hf, (param,), lambda w: (w,), lambda p: p)


def reshape(hf: str, param: str, shape: tuple[int, ...]) -> Rule:
  """Same values, another shape (biases [heads * head_dim] <-> [heads, head_dim])."""
  size = math.prod(shape)
  return Rule(hf, (param,), lambda w: (w.reshape(shape),), lambda p: p.reshape(size))


def linear(hf: str, param: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> Rule:
  """torch.nn.Linear weight [out, in] <-> Flax kernel [*in_shape, *out_shape]."""
  n_in, n_out = math.prod(in_shape), math.prod(out_shape)
  return Rule(hf, (param,), lambda w: (w.T.reshape(in_shape + out_shape),),
              lambda k: np.ascontiguousarray(k.reshape(n_in, n_out).T))


def conv1d(hf: str, param: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> Rule:
  """GPT-2's Conv1D weight [in, out] (already x @ W) <-> Flax kernel [*in_shape, *out_shape]."""
  n_in, n_out = math.prod(in_shape), math.prod(out_shape)
  return Rule(hf, (param,), lambda w: (w.reshape(in_shape + out_shape),),
              lambda k: k.reshape(n_in, n_out))


def fused(hf: str, params: tuple[str, ...], merged_shape: tuple[int, ...],
          split_shape: tuple[int, ...], axis: int, transpose: bool = False) -> Rule:
  """One HF tensor that holds several parameters side by side (fused q/k/v).

  The HF tensor (transposed first when `transpose`, i.e. a torch Linear weight) has
  `merged_shape`; reshaped to `split_shape`, parameter i is index i along `axis`.
  """
  def to_jax(w):
    parts = (w.T if transpose else w).reshape(split_shape)
    return tuple(np.ascontiguousarray(np.take(parts, i, axis=axis)) for i in range(len(params)))

  def to_hf(*parts):
    merged = np.stack(parts, axis=axis).reshape(merged_shape)
    return np.ascontiguousarray(merged.T if transpose else merged)

  return Rule(hf, params, to_jax, to_hf)


def norm(hf_prefix: str, param: str, cfg: ModelConfig) -> list[Rule]:
  """A LayerNorm (weight, bias) or RMSNorm (weight) <-> Flax norm (scale[, bias])."""
  rules = [copy(f"{hf_prefix}.weight", f"{param}/scale")]
  if cfg.norm == "layernorm":
    rules.append(copy(f"{hf_prefix}.bias", f"{param}/bias"))
  return rules


def export_problems(cfg: ModelConfig, required: dict[str, Any]) -> str | None:
  """'a=x (needs y), ...' for each ModelConfig field whose value is not the required one (or in the required tuple)."""
  problems = []
  for field, want in required.items():
    have = getattr(cfg, field)
    ok = have in want if isinstance(want, tuple) else have == want
    if not ok:
      problems.append(f"{field}={have!r} (needs {' or '.join(map(repr, want)) if isinstance(want, tuple) else repr(want)})")
  return ", ".join(problems) or None
