"""Builds the model, optimizer and sharded train state from a config, and the jitted steps.

The state's shardings come from the parameters' logical axis names; it is born
sharded (jit with out_shardings), so no host ever holds a full copy.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from jaxllm import cpu_compile, faults, optim
from jaxllm.config_types import RunConfig
from jaxllm.models import ModelConfig, build_model, lora
from jaxllm.models.gpt import GPT, output_head
from jaxllm.sharding import logical_shardings, replicated
from jaxllm.losses import chunked_cross_entropy
from jaxllm.step import Batch, LossFn, TrainState, eval_step, train_step


@dataclasses.dataclass
class Setup:
  """Everything the loop needs that is derived from the config."""
  model: nn.Module
  model_cfg: ModelConfig
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule
  apply_fn: Callable[[Any, Batch, jax.Array, bool], jax.Array]
  state_shardings: TrainState
  abstract_state: TrainState
  init_fn: Callable[[jax.Array], TrainState]
  loss_fn: LossFn | None = None  # None: cross-entropy of apply_fn's logits
  # The frozen part as a base model directory stores it (with its shardings, in train.frozen_dtype),
  # and the jitted function that turns that into `abstract_state.frozen` (int8 with frozen_quant).
  frozen_source: Any = None
  prepare_frozen: Callable[[Any], Any] | None = None


def lm_apply_fn(model: nn.Module):
  """The causal-LM forward used by the train/eval steps."""
  def apply_fn(params, batch: Batch, rng: jax.Array, deterministic: bool) -> jax.Array:
    return model.apply({"params": params}, batch["inputs"], positions=batch.get("positions"),
                       segment_ids=batch.get("segment_ids"), in_prefix=batch.get("in_prefix"),
                       deterministic=deterministic, rngs={"dropout": rng})
  return apply_fn


def chunked_lm_loss(model: nn.Module, chunk_size: int) -> LossFn:
  """The causal-LM loss from the model's features, `chunk_size` positions of logits at a time."""
  def loss_fn(params, batch: Batch, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    features = model.apply({"params": params}, batch["inputs"], positions=batch.get("positions"),
                           segment_ids=batch.get("segment_ids"), in_prefix=batch.get("in_prefix"),
                           deterministic=False, rngs={"dropout": rng}, method=GPT.features)
    return chunked_cross_entropy(features, output_head(params, model.cfg), batch["targets"],
                                 batch["weights"], chunk_size)
  return loss_fn


def encoder_apply_fn(model: nn.Module):
  """The BERT forward (bidirectional; segment_ids mark padding, token_types optional)."""
  def apply_fn(params, batch: Batch, rng: jax.Array, deterministic: bool) -> jax.Array:
    return model.apply({"params": params}, batch["inputs"], positions=batch.get("positions"),
                       segment_ids=batch.get("segment_ids"), token_types=batch.get("token_types"),
                       deterministic=deterministic, rngs={"dropout": rng})
  return apply_fn


def dummy_inputs(seq_len: int) -> jax.Array:
  return jnp.zeros((1, seq_len), jnp.int32)


def make_setup(config: RunConfig | Any, model_cfg: ModelConfig, mesh: jax.sharding.Mesh) -> Setup:
  """`config`: the RunConfig (or the ConfigDict it is built from); `model_cfg` may differ from its model."""
  config = RunConfig.of(config)
  model = build_model(model_cfg)
  apply_fn_factory = encoder_apply_fn if model_cfg.family == "bert" else lm_apply_fn
  optimizer, schedule = optim.build_optimizer(config.optim, config.train.steps)
  optimizer = faults.guard(optimizer)  # non-finite gradients skip the update (see faults.py)
  seq_len = min(config.data.seq_len, model_cfg.max_seq_len)
  trainable_pattern = optim.trainable_pattern(config)
  frozen_quant = config.train.frozen_quant  # "" or "int8" (config.validate checks)

  def init_params(rng):
    return model.init(rng, dummy_inputs(seq_len))["params"]

  boxed_params = jax.eval_shape(init_params, jax.random.key(0))
  param_shardings = logical_shardings(boxed_params, mesh)
  abstract_params = nn.meta.unbox(boxed_params)
  lora.check_targets(traverse_util.flatten_dict(abstract_params), model_cfg)
  trainable_abs, frozen_abs = optim.partition_params(abstract_params, trainable_pattern)
  trainable_sh, frozen_sh = optim.partition_params(param_shardings, trainable_pattern)
  frozen_dtype = config.train.frozen_dtype  # e.g. bfloat16: frozen weights in half the memory
  if frozen_dtype:
    frozen_abs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(frozen_dtype)), frozen_abs)
  frozen_source = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), frozen_abs, frozen_sh)

  def quantize(frozen):
    if not frozen_quant:
      return frozen
    return traverse_util.unflatten_dict(lora.quantize_tree(traverse_util.flatten_dict(frozen)))

  if frozen_quant:
    frozen_abs = jax.eval_shape(quantize, frozen_abs)
    frozen_sh = _quantized_shardings(frozen_abs, frozen_sh, mesh)
  abstract_opt = jax.eval_shape(optimizer.init, trainable_abs)
  opt_shardings = optax.tree_map_params(
      optimizer, lambda _, sharding: sharding, abstract_opt, trainable_sh,
      transform_non_params=lambda _: replicated(mesh))
  state_shardings = TrainState(step=replicated(mesh), params=trainable_sh, frozen=frozen_sh,
                               opt_state=opt_shardings)
  abstract_state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=trainable_abs,
                              frozen=frozen_abs, opt_state=abstract_opt)

  def init_state(rng: jax.Array, params: Any | None = None) -> TrainState:
    if params is None:
      params = nn.meta.unbox(init_params(rng))
    trainable, frozen = optim.partition_params(params, trainable_pattern)
    if frozen_dtype:
      frozen = jax.tree.map(lambda x: x.astype(frozen_dtype), frozen)
    frozen = quantize(frozen)
    return TrainState(step=jnp.zeros((), jnp.int32), params=trainable, frozen=frozen,
                      opt_state=optimizer.init(trainable))

  init_fn = jax.jit(init_state, out_shardings=state_shardings)
  step_model = build_model(model_cfg, mesh)  # the same parameters, activations pinned to the mesh
  chunk_size = config.train.loss_chunk_size
  loss_fn = chunked_lm_loss(step_model, chunk_size) if chunk_size and apply_fn_factory is lm_apply_fn else None
  return Setup(model=model, model_cfg=model_cfg, optimizer=optimizer, schedule=schedule,
               apply_fn=apply_fn_factory(step_model), state_shardings=state_shardings,
               abstract_state=abstract_state, init_fn=init_fn, loss_fn=loss_fn,
               frozen_source=frozen_source,
               prepare_frozen=jax.jit(quantize, out_shardings=frozen_sh, donate_argnums=(0,)))


def _quantized_shardings(frozen_abs: Any, frozen_sh: Any, mesh: jax.sharding.Mesh) -> Any:
  """Shardings of the quantized frozen tree: a kernel keeps its own, its scale the kernel's on the
  output dims (the input dims, of size 1, unsharded)."""
  flat_sh = traverse_util.flatten_dict(frozen_sh)
  out = {}
  for path, leaf in traverse_util.flatten_dict(frozen_abs).items():
    if path in flat_sh:
      out[path] = flat_sh[path]
      continue
    spec = tuple(flat_sh[path[:-1] + ("kernel",)].spec)
    spec += (None,) * (leaf.ndim - len(spec))
    out[path] = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
        *[None if dim == 1 else axes for dim, axes in zip(leaf.shape, spec)]))
  return traverse_util.unflatten_dict(out)


def compile_steps(setup: Setup, config: RunConfig | Any, mesh: jax.sharding.Mesh):
  """The train step (state donated) and eval step of `setup`, jitted once with explicit shardings.

  The trainer and the benchmark run these same functions.
  """
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  options = cpu_compile.step_compiler_options(list(mesh.devices.flat))  # {} off the CPU backend
  step_fn = functools.partial(train_step, apply_fn=setup.apply_fn, optimizer=setup.optimizer,
                              schedule=setup.schedule, grad_accum=config.train.grad_accum, mesh=mesh,
                              loss_fn=setup.loss_fn)
  jit_train = jax.jit(step_fn, in_shardings=(setup.state_shardings, batch_sharding, replicated(mesh)),
                      out_shardings=(setup.state_shardings, replicated(mesh)), donate_argnums=(0,),
                      compiler_options=options)
  jit_eval = jax.jit(functools.partial(eval_step, apply_fn=setup.apply_fn),
                     in_shardings=(setup.state_shardings, batch_sharding),
                     out_shardings=replicated(mesh), compiler_options=options)
  return jit_train, jit_eval
