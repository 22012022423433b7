"""AdamW with warmup-cosine, masked weight decay and clipping; the trainable/frozen split.

The split is a regular expression over parameter paths ("layers/attn/query/kernel", or
"layer_3/attn/query/kernel" with model.scan_layers=False):
what matches trains, the rest is frozen and never differentiated. Full training,
prompt tuning and LoRA differ only in that pattern.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import optax
from flax import traverse_util

from jaxllm.config_types import OptimConfig, RunConfig
from jaxllm.errors import ConfigError
from jaxllm.models.lora import LORA_PATTERN

# Parameters whose path contains one of these never get weight decay: biases,
# norm scales, soft prompts, and embeddings (decaying them hurts rare tokens) unless
# optim.decay_embeddings.
NO_DECAY_NAMES = frozenset({"bias", "scale", "embed", "embedding", "pos_embed", "prompt"})
EMBEDDING_NAMES = frozenset({"embed", "embedding", "pos_embed"})


def learning_rate_schedule(optim_cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then cosine decay to `min_lr` at `optim.decay_steps`
  (0 = `total_steps`; set it to extend a run later without changing its schedule)."""
  total_steps = optim_cfg.decay_steps or total_steps
  warmup = min(optim_cfg.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim_cfg.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=optim_cfg.min_lr)


def decay_mask(params: Any, decay_embeddings: bool = False) -> Any:
  """True where weight decay applies: matrices, embeddings only if `decay_embeddings`
  (nanoGPT decays every 2-D weight, the tied embedding included)."""
  skip = NO_DECAY_NAMES - (EMBEDDING_NAMES if decay_embeddings else frozenset())
  flat = traverse_util.flatten_dict(params)
  # Scanned layers add a leading [num_layers] axis that does not make a vector a matrix.
  return traverse_util.unflatten_dict({
      path: not any(part in skip for part in path) and getattr(leaf, "ndim", 0) - (path[0] == "layers") >= 2
      for path, leaf in flat.items()})


def build_optimizer(optim_cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = learning_rate_schedule(optim_cfg, total_steps)
  transforms = []
  if optim_cfg.grad_clip and optim_cfg.grad_clip > 0:
    transforms.append(optax.clip_by_global_norm(optim_cfg.grad_clip))
  mask = functools.partial(decay_mask, decay_embeddings=optim_cfg.decay_embeddings)
  transforms.append(optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                                weight_decay=optim_cfg.weight_decay, mask=mask))
  return optax.chain(*transforms), schedule


def path_str(path: tuple[str, ...]) -> str:
  return "/".join(str(p) for p in path)


def trainable_pattern(config: Any) -> str:
  """The run's trainable regex: `train.trainable`, or for a LoRA run (model.lora_rank > 0) that
  leaves it empty, the adapters alone (`models.lora.LORA_PATTERN`). `config`: the RunConfig, the
  ConfigDict or the dict of a run's config.json."""
  config = RunConfig.of(config) if not isinstance(config, dict) else RunConfig.from_config(config, strict=False)
  if config.train.trainable or not config.model.lora_rank:
    return config.train.trainable
  return LORA_PATTERN


def partition_params(params: Any, trainable_pattern: str | None) -> tuple[dict, dict]:
  """Splits a nested param dict into (trainable, frozen) by regex search on each path.

  `trainable_pattern` None or "" means everything trains. Both halves keep the
  nesting, so `merge_params` restores the original tree.
  """
  if not trainable_pattern:
    return params, {}
  regex = re.compile(trainable_pattern)
  flat = traverse_util.flatten_dict(params)
  trainable = {k: v for k, v in flat.items() if regex.search(path_str(k))}
  if not trainable:
    raise ConfigError(f"train.trainable={trainable_pattern!r} matches no parameter; paths look like "
                      f"{path_str(next(iter(flat)))!r}.")
  frozen = {k: v for k, v in flat.items() if k not in trainable}
  return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge_params(trainable: Any, frozen: Any) -> Any:
  if not frozen:
    return trainable
  flat = traverse_util.flatten_dict(frozen)
  flat.update(traverse_util.flatten_dict(trainable))
  return traverse_util.unflatten_dict(flat)
