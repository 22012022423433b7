"""Pure train and eval steps: (state, batch, rng) -> (state, metrics).

Batches are dicts of arrays: `inputs`, `targets`, `weights` [batch, seq] and,
when present, `positions`, `segment_ids` and `in_prefix` (prefix-LM) [batch, seq].
The loss is the weight-averaged token cross-entropy, so packed pretraining,
padding and prompt masking (weight 0) all go through the same function.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxllm import faults
from jaxllm.losses import cross_entropy
from jaxllm.optim import merge_params
from jaxllm.sharding import BATCH_AXES

Batch = dict[str, jax.Array]
# apply_fn(params, batch, dropout_rng, deterministic) -> logits [batch, seq, vocab] float32
ApplyFn = Callable[[Any, Batch, jax.Array, bool], jax.Array]


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any      # the trainable parameters
  frozen: Any      # parameters that are used but never trained ({} for full training)
  opt_state: Any


# loss_fn(params, batch, dropout_rng) -> (sum of weighted token losses, sum of weights)
LossFn = Callable[[Any, Batch, jax.Array], tuple[jax.Array, jax.Array]]


def logits_loss(apply_fn: ApplyFn) -> LossFn:
  """The training loss from the model's logits (`cross_entropy`)."""
  def loss_fn(params, batch: Batch, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits = apply_fn(params, batch, rng, False)
    return cross_entropy(logits, batch["targets"], batch["weights"])
  return loss_fn


def _split_micro_batches(batch: Batch, grad_accum: int, mesh: jax.sharding.Mesh | None) -> Batch:
  """[batch, ...] -> [grad_accum, batch / grad_accum, ...], every micro-batch spread over all devices."""
  def split(x):
    micro = x.shape[0] // grad_accum
    # Row r goes to micro-batch r % grad_accum: each device's rows land in every micro-batch.
    x = x.reshape((micro, grad_accum) + x.shape[1:]).swapaxes(0, 1)
    if mesh is None:
      return x
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, BATCH_AXES))
    return jax.lax.with_sharding_constraint(x, sharding)
  return jax.tree.map(split, batch)


def schedule_count(opt_state: Any, default: jax.Array) -> jax.Array:
  """The step count the learning-rate schedule read for this update: the optimizer's own, which
  a skipped non-finite step does not advance (so it can run behind `state.step`)."""
  counts = [s.count for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
            if isinstance(s, optax.ScaleByScheduleState)]
  return counts[0] if counts else default


def train_step(state: TrainState, batch: Batch, rng: jax.Array, *, apply_fn: ApplyFn,
               optimizer: optax.GradientTransformation, schedule: optax.Schedule,
               grad_accum: int = 1, mesh: jax.sharding.Mesh | None = None,
               loss_fn: LossFn | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update over `batch`, accumulating gradients over `grad_accum` micro-batches.
  `loss_fn` (default: cross-entropy of `apply_fn`'s logits) may compute the loss another way,
  e.g. chunked over the sequence (`state.chunked_lm_loss`)."""
  rng = jax.random.fold_in(rng, state.step)
  loss_fn = loss_fn or logits_loss(apply_fn)

  def loss_sum(params, micro_batch, micro_rng):
    return loss_fn(merge_params(params, state.frozen), micro_batch, micro_rng)

  grad_fn = jax.value_and_grad(loss_sum, has_aux=True)
  if grad_accum == 1:
    (total_loss, total_weight), grads = grad_fn(state.params, batch, rng)
  else:
    micro_batches = _split_micro_batches(batch, grad_accum, mesh)

    def body(carry, xs):
      grads_acc, loss_acc, weight_acc = carry
      index, micro_batch = xs
      (loss, weight), grads = grad_fn(state.params, micro_batch, jax.random.fold_in(rng, index))
      grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
      return (grads_acc, loss_acc + loss, weight_acc + weight), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    (grads, total_loss, total_weight), _ = jax.lax.scan(
        body, init, (jnp.arange(grad_accum), micro_batches))
  # Sum of losses / sum of weights over the whole batch: exactly the big-batch mean.
  denom = jnp.maximum(total_weight, 1.0)
  grads = jax.tree.map(lambda g: g / denom, grads)
  loss = total_loss / denom
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(schedule_count(state.opt_state, state.step)),
             "tokens": total_weight, **faults.counters(opt_state)}
  return new_state, metrics


def eval_step(state: TrainState, batch: Batch, *, apply_fn: ApplyFn) -> dict[str, jax.Array]:
  """Summed loss and weight over `batch`; the caller divides after summing over batches."""
  logits = apply_fn(merge_params(state.params, state.frozen), batch, jax.random.key(0), True)
  loss_sum, weight_sum = cross_entropy(logits, batch["targets"], batch["weights"])
  # Weighted count of positions whose most likely token is the target (masked-token accuracy for MLM).
  correct = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
  correct_sum = jnp.sum(correct * batch["weights"].astype(jnp.float32))
  return {"loss_sum": loss_sum, "weight_sum": weight_sum, "correct_sum": correct_sum}
