"""Parameter-efficient fine-tuning around the trainable/frozen split (prompt tuning, LoRA).

What trains is `train.trainable`, a regex over parameter paths (`optim.partition_params`);
the rest is frozen: never differentiated, without optimizer state, optionally held in
bf16 (`train.frozen_dtype`). When the run starts from `init_from`, its checkpoints hold
only the trainable part; the frozen part is re-read from `init_from` (the run's
config.json keeps that reference), so a prompt-tuned 1.3B model saves kilobytes.

LoRA (`model.lora_rank`, jaxllm/models/lora.py) trains `/(lora_a|lora_b)$` unless
`train.trainable` says otherwise (`optim.trainable_pattern`); its PEFT format is in
jaxllm/convert/lora.py.

Prompt tuning: `model.num_virtual_tokens` adds `prompt/embedding` [num_virtual_tokens,
d_model] to the GPT model; `train.trainable='^prompt/'` trains only it. Its on-disk
exchange format is Hugging Face PEFT's PROMPT_TUNING adapter (`to_peft` / `from_peft`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxllm import checkpoint, model_dir, optim
from jaxllm.config_types import RunConfig
from jaxllm.errors import ConfigError, ConvertError
from jaxllm.models import ModelConfig, lora

PROMPT_PATH = ("prompt", "embedding")
PROMPT_PATTERN = "^prompt/"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_KEY = "prompt_embeddings"


def count_params(tree: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def frozen_by_reference(config: RunConfig) -> bool:
  """True when checkpoints keep only the trainable part and re-read the rest from init_from."""
  return bool(config.init_from) and bool(optim.trainable_pattern(config))


def prompt_init_ids(tokenizer: Any, text: str, num_virtual_tokens: int) -> list[int]:
  """The text's token ids fitted to the prompt length: truncated when longer, repeated
  cyclically when shorter (as PEFT's TEXT init does)."""
  ids = tokenizer(text, add_special_tokens=False)["input_ids"]
  if not ids:
    raise ConfigError(f"train.prompt_init_text={text!r} has no tokens; give some text or leave it empty.")
  return [ids[i % len(ids)] for i in range(num_virtual_tokens)]


def with_prompt_from_ids(params: Any, ids: list[int]) -> Any:
  """`params` with prompt/embedding set to the token embeddings of `ids` (a "hard" prompt init)."""
  flat = traverse_util.flatten_dict(params)
  prompt = flat[PROMPT_PATH]
  flat[PROMPT_PATH] = flat[("embed", "embedding")][jnp.asarray(ids)].astype(prompt.dtype)
  return traverse_util.unflatten_dict(flat)


def _abstract_params(setup: Any) -> tuple[Any, Any]:
  """(abstract trainable, abstract frozen) param trees carrying their shardings; the frozen part as
  the base stores it (float, before `train.frozen_quant`)."""
  return (checkpoint.abstract_with_shardings(setup.abstract_state.params, setup.state_shardings.params),
          setup.frozen_source)


def load_frozen(config: RunConfig, setup: Any) -> Any:
  """The frozen part, re-read from `init_from` (used on resume when checkpoints hold only the
  trainable part); cast to `train.frozen_dtype` by the restore itself, then quantized if asked."""
  trainable, frozen = _abstract_params(setup)
  return setup.prepare_frozen(model_dir.base_params(config.init_from, frozen, optim.merge_params(trainable, frozen)))


def initial_params(config: RunConfig, setup: Any, tokenizer: Any, rng: jax.Array) -> Any | None:
  """The full parameter tree a run starts from, or None for a fresh random init.

  Parameters that the base (`init_from`) lacks, such as a new prompt, keep their random
  init; `train.prompt_init_text` then sets the prompt from the text's token embeddings.
  """
  init_text = config.train.prompt_init_text
  if not config.init_from and not init_text:
    return None
  flat = traverse_util.flatten_dict(optim.merge_params(*_abstract_params(setup)))
  # Parameters a base model does not have: a prompt, LoRA adapters.
  new = {k for k in flat if k[0] == "prompt" or k[-1] in (lora.LORA_A, lora.LORA_B)}
  params = {}
  if new or init_text or not config.init_from:  # a random init for what is not loaded
    params = traverse_util.flatten_dict(optim.merge_params(*_host_init(setup, rng)))
    # int8 kernels (frozen_quant, which needs init_from) are replaced by the base's float ones below.
    params = {k: v for k, v in params.items() if k[-1] != lora.KERNEL_SCALE}
  if config.init_from:
    loaded = model_dir.base_params(config.init_from, traverse_util.unflatten_dict(
        {k: v for k, v in flat.items() if k not in new}), traverse_util.unflatten_dict(flat))
    params.update(traverse_util.flatten_dict(loaded))
  params = traverse_util.unflatten_dict(params)
  if init_text:
    if PROMPT_PATH not in traverse_util.flatten_dict(params):
      raise ConfigError("train.prompt_init_text is set but the model has no prompt; "
                       "set model.num_virtual_tokens.")
    ids = prompt_init_ids(tokenizer, init_text, setup.model_cfg.num_virtual_tokens)
    params = with_prompt_from_ids(params, ids)
  return params


def _host_init(setup: Any, rng: jax.Array) -> tuple[Any, Any]:
  state = setup.init_fn(rng)
  return state.params, state.frozen


# ------------------------------------------------------------------------------- report

def step_memory_bytes(jitted_step: Any, *abstract_args: Any) -> int:
  """Per-device bytes the compiled step needs: arguments + outputs + temporaries, less what
  the outputs reuse of donated arguments."""
  analysis = jitted_step.lower(*abstract_args).compile().memory_analysis()
  if analysis is None:
    return 0
  return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes
             + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)


def memory_report(config: RunConfig | Any, model_cfg: ModelConfig, mesh: jax.sharding.Mesh, setup: Any) -> str:
  """Compiled per-device memory of this run's step beside that of full fine-tuning of the same model
  (it compiles both steps: `train.memory_report` asks for it)."""
  # pylint: disable=import-outside-toplevel
  from jaxllm.sharding import replicated
  from jaxllm.state import compile_steps, make_setup
  config = RunConfig.of(config)
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  shape = (config.train.batch_size, config.data.seq_len)
  keys = ("inputs", "targets") + (("positions", "segment_ids") if config.data.packing == "document" else ())
  batch = {k: jax.ShapeDtypeStruct(shape, np.int32, sharding=batch_sharding) for k in keys}
  batch["weights"] = jax.ShapeDtypeStruct(shape, np.float32, sharding=batch_sharding)
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated(mesh))
  state = checkpoint.abstract_with_shardings(setup.abstract_state, setup.state_shardings)
  mine = step_memory_bytes(compile_steps(setup, config, mesh)[0], state, batch, rng)
  full_model_cfg = dataclasses.replace(model_cfg, lora_rank=0)  # full fine-tuning of the base, no adapters
  full_config = dataclasses.replace(config, model=full_model_cfg, train=dataclasses.replace(
      config.train, trainable="", frozen_dtype="", frozen_quant=""))
  full_setup = make_setup(full_config, full_model_cfg, mesh)
  full_state = checkpoint.abstract_with_shardings(full_setup.abstract_state, full_setup.state_shardings)
  full = step_memory_bytes(compile_steps(full_setup, full_config, mesh)[0], full_state, batch, rng)
  return (f"step memory per device: {mine / 2**20:.1f} MiB (full fine-tuning: {full / 2**20:.1f} MiB, "
          f"{full / max(mine, 1):.1f}x)")

def parameter_report(setup: Any) -> str:
  trainable = count_params(setup.abstract_state.params)
  total = trainable + count_params(setup.frozen_source)  # int8 scales are not parameters
  return (f"parameters: {trainable:,} trainable of {total:,} total ({100 * trainable / max(total, 1):.4f}%)")


# ------------------------------------------------------------------ loading a tuned model

# ----------------------------------------------------------------------- PEFT interop

def to_peft(prompt: np.ndarray, out_dir: str, model_cfg: ModelConfig, *,
            base_model_name_or_path: str | None = None, init_text: str = "",
            tokenizer_name_or_path: str | None = None) -> None:
  """Writes a Hugging Face PEFT PROMPT_TUNING adapter: adapter_config.json + adapter_model.safetensors."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  prompt = np.asarray(prompt, np.float32)
  if prompt.shape != (model_cfg.num_virtual_tokens, model_cfg.d_model):
    raise ConvertError(f"prompt shape {prompt.shape} does not match num_virtual_tokens="
                       f"{model_cfg.num_virtual_tokens} x d_model={model_cfg.d_model}.")
  peft_config = {
      "peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "inference_mode": True,
      "num_virtual_tokens": model_cfg.num_virtual_tokens, "token_dim": model_cfg.d_model,
      "num_transformer_submodules": 1, "num_attention_heads": model_cfg.num_heads,
      "num_layers": model_cfg.num_layers,
      "prompt_tuning_init": "TEXT" if init_text else "RANDOM",
      "prompt_tuning_init_text": init_text or None,
      "tokenizer_name_or_path": tokenizer_name_or_path if init_text else None,
      "base_model_name_or_path": base_model_name_or_path, "revision": None,
  }
  os.makedirs(out_dir, exist_ok=True)
  save_file({PEFT_KEY: prompt}, os.path.join(out_dir, PEFT_WEIGHTS + ".tmp"))
  os.replace(os.path.join(out_dir, PEFT_WEIGHTS + ".tmp"), os.path.join(out_dir, PEFT_WEIGHTS))
  checkpoint.write_json(os.path.join(out_dir, PEFT_CONFIG), peft_config)


def from_peft(adapter_dir: str) -> tuple[np.ndarray, dict]:
  """(prompt [num_virtual_tokens, d_model] float32, adapter config) from a PEFT adapter directory."""
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  if not os.path.isdir(adapter_dir):
    raise FileNotFoundError(f"{adapter_dir}: no such directory; give a PEFT adapter directory "
                            f"({PEFT_CONFIG} + {PEFT_WEIGHTS}).")
  config_path = os.path.join(adapter_dir, PEFT_CONFIG)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{adapter_dir}: no {PEFT_CONFIG}; not a PEFT adapter directory.")
  with open(config_path, encoding="utf-8") as f:
    peft_config = json.load(f)
  if peft_config.get("peft_type") != "PROMPT_TUNING":
    raise ConvertError(f"{config_path}: peft_type={peft_config.get('peft_type')!r}; only PROMPT_TUNING and LORA "
                       "adapters are supported.")
  weights = os.path.join(adapter_dir, PEFT_WEIGHTS)
  if not os.path.isfile(weights):
    raise FileNotFoundError(f"{adapter_dir}: no {PEFT_WEIGHTS} (adapters saved as .bin need "
                            "`save_pretrained(safe_serialization=True)`).")
  tensors = load_file(weights)
  if PEFT_KEY not in tensors:
    raise ConvertError(f"{weights}: no {PEFT_KEY!r} tensor (has {sorted(tensors)}).")
  prompt = tensors[PEFT_KEY].astype(np.float32)
  expected = (peft_config["num_virtual_tokens"] * (peft_config.get("num_transformer_submodules") or 1),
              peft_config["token_dim"])
  if prompt.shape != expected:
    raise ConvertError(f"{weights}: {PEFT_KEY} has shape {prompt.shape}, config says {expected}.")
  if (peft_config.get("num_transformer_submodules") or 1) != 1:
    raise ConvertError(f"{config_path}: num_transformer_submodules="
                       f"{peft_config['num_transformer_submodules']}; only decoder-only (1) is supported.")
  return prompt, peft_config
