"""The default config every recipe starts from, and the checks that turn bad values into one clear line."""

from __future__ import annotations

from typing import Any

import ml_collections

from jaxllm.config_types import SECTIONS, RunConfig, model_defaults
from jaxllm.errors import ConfigError
from jaxllm.models.config import ModelConfig


def default_config() -> ml_collections.ConfigDict:
  """Every key a recipe may set, with its default: the typed sections' (jaxllm/config_types.py, where
  each key is documented). Recipes override what they need."""
  c = ml_collections.ConfigDict()
  c.task = RunConfig.task
  c.init_from = RunConfig.init_from
  c.model = ml_collections.ConfigDict(model_defaults())
  for name, section in SECTIONS.items():
    c[name] = ml_collections.ConfigDict(section.defaults())
  return c


def validate(config: Any, num_devices: int) -> ModelConfig:
  """Checks values against each other and the hardware; returns the ModelConfig.

  `config` is the ConfigDict or the RunConfig built from it (an unknown key is a ConfigError)."""
  from jaxllm import faults, optim  # pylint: disable=import-outside-toplevel
  from jaxllm.sharding import mesh_shape  # pylint: disable=import-outside-toplevel
  config = RunConfig.of(config)
  model_cfg = config.model
  data, fsdp, _ = mesh_shape(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, num_devices)
  t = config.train
  if t.steps <= 0:
    raise ConfigError(f"train.steps={t.steps} must be positive.")
  if t.grad_accum <= 0 or t.batch_size % t.grad_accum:
    raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}.")
  micro = t.batch_size // t.grad_accum
  if micro % (data * fsdp):
    raise ConfigError(
        f"train.batch_size={t.batch_size} / grad_accum={t.grad_accum} = {micro} sequences per micro-batch "
        f"is not divisible by the mesh's data x fsdp = {data * fsdp}; use a multiple of {data * fsdp}.")
  if config.data.seq_len > model_cfg.max_seq_len and model_cfg.position == "learned":
    raise ConfigError(f"data.seq_len={config.data.seq_len} exceeds model.max_seq_len={model_cfg.max_seq_len}.")
  num_virtual = model_cfg.num_virtual_tokens
  if num_virtual and config.data.packing == "document":
    raise ConfigError("prompt tuning (model.num_virtual_tokens) cannot be combined with data.packing="
                      "'document': each example needs the prompt before it; use task='sft' with "
                      "data.packing='concat' (one padded example per row).")
  if num_virtual and config.task != "sft":
    raise ConfigError("prompt tuning (model.num_virtual_tokens) needs task='sft' (one example per "
                      "row, prompt before each); concatenated pretraining rows cannot carry it.")
  if num_virtual and model_cfg.position == "learned" and config.data.seq_len + num_virtual > model_cfg.max_seq_len:
    raise ConfigError(f"data.seq_len={config.data.seq_len} + model.num_virtual_tokens={num_virtual} exceeds "
                      f"model.max_seq_len={model_cfg.max_seq_len}; lower data.seq_len.")
  if t.prompt_init_text and not num_virtual:
    raise ConfigError("train.prompt_init_text is set but model.num_virtual_tokens=0; set it (e.g. 20).")
  if config.sft.prefix_lm:
    if config.task != "sft":
      raise ConfigError(f"sft.prefix_lm=True needs task='sft' (the prefix is each instruction's prompt); "
                        f"task is {config.task!r}.")
    if config.data.train_on_prompt:
      raise ConfigError("sft.prefix_lm=True with data.train_on_prompt=True: the prompt attends both ways, so "
                        "each prompt token would see the token it is trained to predict; turn one off.")
  frozen_quant = t.frozen_quant
  if frozen_quant not in ("", "int8"):
    raise ConfigError(f"train.frozen_quant={frozen_quant!r} is not one of '', 'int8'.")
  if frozen_quant and not optim.trainable_pattern(config):
    raise ConfigError("train.frozen_quant='int8' quantizes the frozen weights, but nothing is frozen; "
                      "set model.lora_rank or train.trainable.")
  if frozen_quant and not config.init_from:
    raise ConfigError("train.frozen_quant='int8' quantizes a base model's frozen weights; set init_from "
                      "to the model directory to fine-tune (a random base is not worth quantizing).")
  faults.validate(t)
  for key in ("log_every", "eval_every", "checkpoint_every"):
    if getattr(t, key) <= 0:
      raise ConfigError(f"train.{key}={getattr(t, key)} must be positive.")
  return model_cfg


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """Sets dotted keys ("train.steps") on a ConfigDict, as --config.train.steps=... would."""
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config
