"""HF model directory -> jaxllm model directory (config.json, tokenizer/, checkpoints/0/state).

Each HF tensor is read, rearranged on the host and placed straight onto the mesh with
its parameter's sharding; the next tensor is read only after that, so host memory
holds at most one (fused) tensor at a time and each device only its shards.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import types
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxllm import killpoints, model_dir, progress
from jaxllm.config import default_config
from jaxllm.convert.registry import architectures, get_architecture
from jaxllm.convert.base import Architecture, ConvertError
from jaxllm.convert.source import TensorSource
from jaxllm.models import ModelConfig, build_model, stacking
from jaxllm.sharding import logical_shardings, make_mesh

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "merges.txt", "vocab.txt", "spiece.model")


def read_hf_config(hf_dir: str):
  """The transformers config object (defaults filled in) of a local HF model directory."""
  if not os.path.isfile(os.path.join(hf_dir, "config.json")):
    raise ConvertError(f"{hf_dir}: no config.json; expected a Hugging Face model directory "
                       "(config.json + model.safetensors or pytorch_model.bin).")
  from transformers import AutoConfig  # pylint: disable=import-outside-toplevel
  try:
    return AutoConfig.from_pretrained(hf_dir)
  except (ValueError, KeyError, OSError) as e:
    raise ConvertError(f"{hf_dir}/config.json cannot be read by transformers: {str(e).splitlines()[0]}") from e


def architecture_of(hf_cfg: Any) -> Architecture:
  names = getattr(hf_cfg, "architectures", None) or []
  if not names:  # some configs omit it; the model_type then names the causal-LM class
    names = [a.name for a in architectures().values() if a.model_type == hf_cfg.model_type][:1]
  if len(names) != 1:
    raise ConvertError(f"config.json lists architectures={names}; expected exactly one, e.g. "
                       "['LlamaForCausalLM'].")
  arch = get_architecture(names[0])
  window = getattr(hf_cfg, "sliding_window", None)
  if window and getattr(hf_cfg, "use_sliding_window", True):
    raise ConvertError(f"{names[0]} with sliding_window={window} is not supported: jaxllm attends to "
                       "the whole context.")
  return arch


def model_section(hf_cfg: Any, param_dtype: str = "float32") -> dict:
  """`config.model` for this HF config: the architecture's keys over jaxllm's defaults."""
  arch = architecture_of(hf_cfg)
  section = default_config().model.to_dict()
  section.update(arch.model_config(hf_cfg))
  section["param_dtype"] = param_dtype
  try:
    ModelConfig.from_config(section)
  except ValueError as e:
    raise ConvertError(f"{arch.name}: {e}") from e
  return section


def default_mesh() -> jax.sharding.Mesh:
  """All devices on the fsdp axis: every weight split as finely as its shape allows."""
  return make_mesh(types.SimpleNamespace(data=1, fsdp=-1, tensor=1))


def _place(array: np.ndarray, sharding: jax.sharding.Sharding, dtype) -> jax.Array:
  array = np.asarray(array).astype(dtype, copy=False)
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _resolve_names(source: TensorSource, arch: Architecture, rules, tied: bool,
                   initialised: dict[str, np.ndarray]) -> dict[str, str]:
  """Rule name -> the name in this checkpoint (or in `initialised`); refuses missing and unexpected tensors."""
  available = set(source.names()) | set(initialised)
  resolved, missing = {}, []
  for rule in rules:
    if rule.hf in available:
      resolved[rule.hf] = rule.hf
    elif arch.base_prefix and rule.hf.startswith(arch.base_prefix) and \
        rule.hf[len(arch.base_prefix):] in available:
      resolved[rule.hf] = rule.hf[len(arch.base_prefix):]  # saved from the base model class
    else:
      missing.append(rule.hf)
  if missing:
    raise ConvertError(f"{source.hf_dir}: {len(missing)} tensor(s) that config.json implies are missing, "
                       f"e.g. {', '.join(missing[:3])}; the weights do not match config.json.")
  ignored = [re.compile(p) for p in arch.ignored] + ([re.compile(r"^lm_head\.weight$")] if tied else [])
  unexpected = sorted(n for n in available - set(resolved.values())
                      if not any(p.search(n) for p in ignored))
  if unexpected:
    raise ConvertError(f"{source.hf_dir}: {len(unexpected)} tensor(s) jaxllm's {arch.name} has no place "
                       f"for, e.g. {', '.join(unexpected[:3])}; an option in config.json that jaxllm "
                       "does not implement?")
  return resolved


def target_layout(model_cfg: ModelConfig, mesh: jax.sharding.Mesh, unrolled: bool = True) -> tuple[dict, dict]:
  """({path: ShapeDtypeStruct}, {path: NamedSharding}) of the model's parameters; nothing allocated.
  `unrolled`: per layer (layer_i/...), as the rules name them, whatever model.scan_layers says."""
  model = build_model(dataclasses.replace(model_cfg, scan_layers=False) if unrolled else model_cfg)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  shardings = traverse_util.flatten_dict(logical_shardings(boxed, mesh), sep="/")
  return traverse_util.flatten_dict(nn.meta.unbox(boxed), sep="/"), shardings


def load_hf_params(hf_dir: str, arch: Architecture, model_cfg: ModelConfig,
                   mesh: jax.sharding.Mesh, layout: tuple[dict, dict] | None = None,
                   initialised: dict[str, np.ndarray] | None = None) -> dict:
  """The jaxllm params tree, each leaf a global array laid out with its logical sharding.

  Tensors are placed per layer (`layout`: the unrolled `target_layout`); for scanned layers
  each stacked parameter is then assembled on the devices from its layers (`stack_onto`).
  `initialised` holds HF tensors the checkpoint lacks (a headless checkpoint's head), by HF name."""
  initialised = initialised or {}
  abstract, shardings = layout or target_layout(model_cfg, mesh)
  rules = arch.rules(model_cfg)
  covered = [p for rule in rules for p in rule.params]
  if sorted(covered) != sorted(abstract):  # a mapping bug, not a user error; say so plainly
    raise AssertionError(f"{arch.name} rules cover {sorted(set(covered) ^ set(abstract))} wrongly")
  flat = {}
  with TensorSource(hf_dir) as source:
    names = _resolve_names(source, arch, rules, model_cfg.tie_embeddings, initialised)
    for rule in progress.track(rules, desc="from-hf: reading tensors", unit="tensor"):
      name = names[rule.hf]
      tensor = initialised[name] if name in initialised else source.get(name)
      try:
        parts = rule.to_jax(tensor)
      except ValueError as e:
        raise ConvertError(f"{names[rule.hf]} has shape {list(tensor.shape)}, which does not fit "
                           f"config.json ({e}).") from e
      for path, part in zip(rule.params, parts):
        if part.shape != abstract[path].shape:
          raise ConvertError(f"{names[rule.hf]} gives {path} the shape {list(part.shape)} but "
                             f"config.json implies {list(abstract[path].shape)}.")
        flat[path] = _place(part, shardings[path], abstract[path].dtype)
      del tensor, parts
  params = traverse_util.unflatten_dict(flat, sep="/")
  if model_cfg.scan_layers:
    params = stacking.stack_onto(params)
  return params


def hf_class(hf_cfg: Any) -> str:
  """The HF class config.json names (the architecture's own when it names none)."""
  names = getattr(hf_cfg, "architectures", None) or []
  return names[0] if len(names) == 1 else architecture_of(hf_cfg).name


def head_note(hf_dir: str) -> str | None:
  """For a headless checkpoint (BertModel): one line saying that the head was initialised."""
  hf_cfg = read_hf_config(hf_dir)
  arch, name = architecture_of(hf_cfg), hf_class(hf_cfg)
  if name not in arch.headless:
    return None
  return (f"{name} has no head: the encoder is imported exactly and {arch.name}'s head is initialised "
          f"(N(0, {hf_cfg.initializer_range}) dense, LayerNorm 1/0, bias 0; decoder tied to the word "
          "embeddings); train it with task='mlm' before its predictions mean anything.")


def load_hf_tokenizer(hf_dir: str):
  """The HF tokenizer of the directory, or None when it has none."""
  if not any(os.path.isfile(os.path.join(hf_dir, f)) for f in TOKENIZER_FILES):
    return None
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
  try:
    return AutoTokenizer.from_pretrained(hf_dir)
  except (ValueError, OSError, KeyError) as e:
    raise ConvertError(f"{hf_dir}: its tokenizer files cannot be loaded: {str(e).splitlines()[0]}") from e


def prepare_output(out_dir: str, overwrite: bool) -> str:
  """A fresh temporary sibling of `out_dir` to write into; refuses to clobber a non-empty out_dir."""
  if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)) and not overwrite:
    raise ConvertError(f"{out_dir} exists and is not empty; choose a new directory or pass --overwrite.")
  tmp = os.path.abspath(out_dir).rstrip(os.sep) + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  return tmp


def finish_output(tmp: str, out_dir: str) -> None:
  """Swaps the complete temporary directory into place (the last step, so no half-written output).

  An old output (--overwrite) is moved aside first and deleted last, so a crash at any moment
  leaves either it or the new one complete under `out_dir`."""
  killpoints.reached("convert.write")
  old = None
  if os.path.lexists(out_dir):
    old = tmp + ".old"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out_dir, old)
  os.replace(tmp, out_dir)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.remove(old)


def from_hf(hf_dir: str, out_dir: str, *, param_dtype: str = "float32", overwrite: bool = False,
            mesh: jax.sharding.Mesh | None = None) -> ModelConfig:
  """Converts a local HF model directory into a jaxllm model directory; returns its ModelConfig."""
  if not os.path.isdir(hf_dir):
    raise FileNotFoundError(f"{hf_dir}: no such directory; give a local Hugging Face model directory.")
  hf_cfg = read_hf_config(hf_dir)
  arch = architecture_of(hf_cfg)
  run_config = default_config()
  run_config.model.update(model_section(hf_cfg, param_dtype))
  model_cfg = ModelConfig.from_config(run_config.model)
  run_config.data.seq_len = min(run_config.data.seq_len, model_cfg.max_seq_len)
  tmp = prepare_output(out_dir, overwrite)
  try:
    tokenizer = load_hf_tokenizer(hf_dir)
    head = arch.init_head(hf_cfg) if hf_class(hf_cfg) in arch.headless else None
    params = load_hf_params(hf_dir, arch, model_cfg, mesh or default_mesh(), initialised=head)
    model_dir.save_model_dir(tmp, run_config.to_dict(), params, tokenizer)
    finish_output(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return model_cfg
