"""jaxllm model directory (any step of a training workdir, or a converted one) -> HF model directory.

Writes config.json, safetensors shards of at most `max_shard_size` (with
model.safetensors.index.json when there is more than one) and the tokenizer. The
parameters are loaded sharded over the local devices and fetched to the host one
tensor at a time; each shard file is written as soon as it is full.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import traverse_util

from jaxllm import checkpoint, progress
from jaxllm.config_types import DataConfig
import jaxllm.convert.model_card as model_card
from jaxllm.convert.registry import architectures
from jaxllm.model_dir import load_model_dir, trained_prefix_lm
from jaxllm.convert.base import Architecture, ConvertError
from jaxllm.convert.importer import default_mesh, finish_output, prepare_output
from jaxllm.models import ModelConfig, stacking
from jaxllm.models.lora import LORA_A, LORA_B, merge_tree
from jaxllm.sharding import logical_shardings

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: str | int) -> int:
  """'2GB' (10^9, as transformers counts), '500MiB', or a number of bytes."""
  if isinstance(size, int):
    return size
  match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, re.IGNORECASE)
  if not match:
    raise ConvertError(f"--max-shard-size={size!r} is not a size; write e.g. 2GB, 500MB or 1GiB.")
  return int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])


def pick_architecture(cfg: ModelConfig) -> Architecture:
  """The registered architecture this model can be written as; refuses with every mismatch named."""
  problems = {}
  for name, arch in architectures().items():
    problem = arch.export_problem(cfg)
    if problem is None:
      return arch
    problems[name] = problem
  raise ConvertError("this model matches no Hugging Face architecture jaxllm exports: " +
                     "; ".join(f"{name} needs {p}" for name, p in problems.items()) + ".")


def _plan_shards(rules, abstract: dict, itemsize: int, max_bytes: int) -> list[list]:
  """Rules grouped into files of at most max_bytes (a tensor bigger than that gets a file of its own)."""
  shards, current, current_bytes = [], [], 0
  for rule in rules:
    nbytes = sum(math.prod(abstract[p].shape) for p in rule.params) * itemsize
    if current and current_bytes + nbytes > max_bytes:
      shards.append(current)
      current, current_bytes = [], 0
    current.append(rule)
    current_bytes += nbytes
  if current:
    shards.append(current)
  return shards


def write_hf_config(hf_dir: str, arch: Architecture, cfg: ModelConfig, dtype: str, tokenizer: Any) -> None:
  from transformers import AutoConfig  # pylint: disable=import-outside-toplevel
  kwargs = arch.hf_config(cfg)
  if tokenizer is not None:
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
      value = getattr(tokenizer, key, None)
      kwargs[key] = value if value is not None and value < cfg.vocab_size else None
  hf_cfg = AutoConfig.for_model(arch.model_type, **kwargs)
  hf_cfg.architectures = [arch.name]
  hf_cfg.dtype = dtype
  hf_cfg.save_pretrained(hf_dir)


def write_weights(hf_dir: str, rules, params: dict, dtype: str, max_bytes: int) -> list[str]:
  """Writes the safetensors file(s) (+ index when sharded); returns the file names."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  np_dtype = DTYPES[dtype]
  shards = _plan_shards(rules, params, np.dtype(np_dtype).itemsize, max_bytes)
  names = (["model.safetensors"] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  weight_map, total = {}, 0
  with progress.bar(len(rules), desc="to-hf: writing tensors", unit="tensor") as bar:
    for file, shard in zip(names, shards):
      bar.set_postfix_str(file, refresh=False)
      tensors = {}
      for rule in shard:
        parts = [np.asarray(jax.device_get(params[p])) for p in rule.params]
        tensors[rule.hf] = np.ascontiguousarray(rule.to_hf(*parts).astype(np_dtype, copy=False))
        weight_map[rule.hf] = file
        total += tensors[rule.hf].nbytes
        bar.update(1)
      save_file(tensors, os.path.join(hf_dir, file), metadata={"format": "pt"})
      del tensors
  if len(shards) > 1:
    checkpoint.write_json(os.path.join(hf_dir, "model.safetensors.index.json"),
                          {"metadata": {"total_size": total}, "weight_map": weight_map})
  return names


def to_hf(model_dir: str, hf_dir: str, *, step: int | None = None, max_shard_size: str | int = "2GB",
          dtype: str = "float32", overwrite: bool = False, merge_lora: bool = False,
          mesh: jax.sharding.Mesh | None = None) -> Architecture:
  """Writes the model of `model_dir` (at `step`, default the latest) as a HF directory; returns its
  architecture. `merge_lora`: fold a LoRA run's adapters into the weights (W + scale A B)."""
  if dtype not in DTYPES:
    raise ConvertError(f"--dtype={dtype!r} is not one of {tuple(DTYPES)}.")
  max_bytes = parse_size(max_shard_size)
  if max_bytes <= 0:
    raise ConvertError(f"--max-shard-size={max_shard_size!r} must be positive.")
  if not os.path.isdir(model_dir):
    raise FileNotFoundError(f"{model_dir}: no such directory; give a jaxllm workdir or converted model directory.")
  run_config = checkpoint.read_run_config(model_dir)
  if trained_prefix_lm(model_dir):
    raise ConvertError(f"{model_dir} was trained with sft.prefix_lm=True (its prompt attends both ways); "
                       "Hugging Face's causal classes would run it causally and answer differently. Generate "
                       "with `python -m jaxllm.generate`, which prefills the prompt as it was trained.")
  model_cfg = ModelConfig.from_config(run_config["model"])
  arch = pick_architecture(model_cfg)
  mesh = mesh or default_mesh()
  model_cfg, params, tokenizer = load_model_dir(
      model_dir, shardings=lambda boxed: logical_shardings(boxed, mesh), step=step)
  tokenizer_path = DataConfig.from_config(run_config.get("data"), strict=False).tokenizer
  if tokenizer is None and tokenizer_path and os.path.isdir(tokenizer_path):
    from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)  # a run given data.tokenizer keeps none
  flat = traverse_util.flatten_dict(params, sep="/")
  has_lora = any(k.endswith((f"/{LORA_A}", f"/{LORA_B}")) for k in flat)
  if has_lora and not merge_lora:
    raise ConvertError(f"{model_dir}: the model has LoRA adapters; pass --merge-lora to fold them into the "
                       "weights, or write them as a PEFT adapter with `to-peft`.")
  if merge_lora and not has_lora:
    raise ConvertError(f"{model_dir}: --merge-lora given but the model has no LoRA adapters (model.lora_rank=0).")
  if has_lora:
    flat = merge_tree({k: jax.device_get(v) for k, v in flat.items()}, model_cfg)
  flat = stacking.UnrolledView(flat)  # the rules name layer_i
  rules = arch.rules(model_cfg)
  extra = sorted(set(flat) - {p for rule in rules for p in rule.params})
  if extra:
    raise ConvertError(f"{model_dir}: parameters {', '.join(extra[:3])} have no place in {arch.name}; "
                       "only the plain model can be exported.")
  tmp = prepare_output(hf_dir, overwrite)
  try:
    write_hf_config(tmp, arch, model_cfg, dtype, tokenizer)
    write_weights(tmp, rules, flat, dtype, max_bytes)
    if tokenizer is not None:
      tokenizer.save_pretrained(tmp)
    model_card.write(tmp, model_dir=model_dir, target=hf_dir, arch=arch, cfg=model_cfg, run_config=run_config,
                     tokenizer=tokenizer, step=step, dtype=dtype, max_shard_size=max_shard_size)
    finish_output(tmp, hf_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return arch

