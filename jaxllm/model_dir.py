"""Model directories: what `train` writes to its workdir and `convert from-hf` writes, and
what `generate`, `fill_mask`, `convert to-hf`/`to-peft` and `init_from` read.

  DIR/config.json               the run's resolved config (its "model" section builds the model)
  DIR/tokenizer/                a Hugging Face tokenizer directory
  DIR/checkpoints/<step>/state  an orbax PyTree holding at least {"params": ...}

A parameter-efficient run (`train.trainable` with `init_from`) holds only what trained; the
frozen rest is read by reference from the base directory its config names (`base_params`).
Everything goes through `checkpoint.load_params`, which refuses a checkpoint that does not
fit the model its config builds.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp
from flax import traverse_util

from jaxllm import checkpoint, optim
from jaxllm.config_types import RunConfig
from jaxllm.errors import CheckpointError
from jaxllm.models import ModelConfig, abstract_params
from jaxllm.sharding import logical_shardings


def base_params(path: str, abstract: Any, model: Any) -> Any:
  """Loads the parameters of `abstract` (a subset of the base's) from the base model directory;
  `model` is the whole model's abstract tree, which everything the base holds must belong to."""
  flat = traverse_util.flatten_dict(abstract)
  return checkpoint.load_params(path, traverse_util.unflatten_dict(flat), expected=model) if flat else {}


def read_prompt_tuned(path: str, run_config: dict, shardings: Any = None) -> tuple[ModelConfig, Any]:
  """(ModelConfig, full params) of a run whose checkpoint holds only the trainable part: the
  rest comes from the base model directory named by its `init_from`. Params are on the host
  unless `shardings` (boxed abstract params -> shardings tree) places them."""
  model_cfg = ModelConfig.from_config(run_config["model"])
  abstract = abstract_params(model_cfg, shardings)
  trainable_abs, frozen_abs = optim.partition_params(abstract, optim.trainable_pattern(run_config))
  base = run_config["init_from"]
  frozen = base_params(base, frozen_abs, abstract)
  trainable = checkpoint.load_params(path, trainable_abs, expected=abstract)
  return model_cfg, optim.merge_params(trainable, frozen)


def load_model_dir(path: str, shardings: Any = None, step: int | None = None):
  """(ModelConfig, params, tokenizer or None) from a model directory; params on host unless
  `shardings` (a callable abstract_params -> shardings tree) places them on a mesh; `step`
  picks a saved step (default: the latest)."""
  run_config = checkpoint.read_run_config(path)
  saved = RunConfig.from_config(run_config, strict=False)
  if saved.init_from and optim.trainable_pattern(saved):
    # A parameter-efficient run (prompt tuning, LoRA): its checkpoint holds only what trained.
    model_cfg, params = read_prompt_tuned(path, run_config, shardings)
    tokenizer = None
    for tok_dir in (os.path.join(path, "tokenizer"), saved.data.tokenizer, os.path.join(saved.init_from, "tokenizer")):
      if tok_dir and os.path.isdir(tok_dir):
        from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        break
    return model_cfg, params, tokenizer
  model_cfg = ModelConfig.from_config(run_config["model"])
  abstract = abstract_params(model_cfg, shardings)
  params = checkpoint.load_params(path, abstract, step)
  tokenizer = None
  tok_dir = os.path.join(path, "tokenizer")
  if os.path.isdir(tok_dir):
    from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
  return model_cfg, params, tokenizer


def trained_prefix_lm(path: str) -> bool:
  """Whether the model in `path` was trained as a prefix-LM (`sft.prefix_lm`): its prompts are
  then prefilled with bidirectional attention. Configs written before the key read as False."""
  saved = RunConfig.from_config(checkpoint.read_run_config(path), strict=False)
  return saved.task == "sft" and saved.sft.prefix_lm


def save_model_dir(path: str, run_config: dict, params: Any, tokenizer: Any = None, step: int = 0) -> None:
  """Writes a model directory (see above) that `load_model_dir` and `init_from` read."""
  os.makedirs(path, exist_ok=True)
  if tokenizer is not None:
    tokenizer.save_pretrained(os.path.join(path, "tokenizer"))
  state_dir = os.path.join(os.path.abspath(path), "checkpoints", str(step), "state")
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(state_dir, {"params": params}, force=True)
  checkpoint.write_json(os.path.join(path, "config.json"), run_config)


def load_with_tokenizer(path: str, mesh: Any) -> tuple[ModelConfig, Any, Any]:
  """(ModelConfig, params placed on `mesh`, tokenizer) for a command that reads and writes text
  (generate, eval); a missing directory or tokenizer is a CheckpointError naming the fix."""
  if not path:
    raise CheckpointError("--checkpoint DIR is required (a training workdir or converted model).")
  if not os.path.isdir(path):
    raise CheckpointError(f"--checkpoint {path}: no such directory; give a training workdir or a "
                          "model directory written by `python -m jaxllm.convert from-hf`.")
  cfg, params, tokenizer = load_model_dir(path, shardings=lambda boxed: logical_shardings(boxed, mesh))
  if tokenizer is None:
    raise CheckpointError(f"{path} has no tokenizer/ directory; save the tokenizer there "
                          "(training and `convert from-hf` do).")
  return cfg, params, tokenizer
