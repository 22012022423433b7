"""Token cross-entropy, plain (from logits) or chunked (from features and the output head).

The chunked form never holds the float32 logits [tokens, vocab] of the whole batch: it walks
over the sequence in chunks of `chunk_size` positions (a `lax.scan`), and each chunk's logits
are rematerialised in the backward pass (`jax.checkpoint`) instead of kept. At GPT-2 sizes the
logits are the largest activation of the step (32 x 1024 tokens x 50304 x 4 bytes = 6.1 GiB);
chunked, one chunk's [batch, chunk_size, vocab] exists at a time, for one more matmul of the
head in the backward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Sum of weighted token losses and the sum of weights (both float32 scalars)."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  weights = weights.astype(jnp.float32)
  return jnp.sum(losses * weights), jnp.sum(weights)


def split_sequence(chunk_size: int, *arrays: jax.Array) -> tuple[jax.Array, ...]:
  """[batch, seq, ...] arrays zero-padded along seq to a multiple of chunk_size and split into
  [num_chunks, batch, chunk_size, ...]: the batch (the sharded axis) stays whole in every chunk."""
  batch, seq_len = arrays[0].shape[:2]
  pad = -seq_len % chunk_size
  num_chunks = (seq_len + pad) // chunk_size

  def split(x):
    x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
    return jnp.swapaxes(x.reshape((batch, num_chunks, chunk_size) + x.shape[2:]), 0, 1)

  return tuple(split(x) for x in arrays)


def chunked_cross_entropy(features: jax.Array, head: jax.Array, targets: jax.Array, weights: jax.Array,
                          chunk_size: int) -> tuple[jax.Array, jax.Array]:
  """`cross_entropy(features @ head, targets, weights)` without all the logits at once.

  features [batch, seq, d_model] (compute dtype), head [d_model, vocab], targets and weights
  [batch, seq]. Chunks run along the sequence, so a batch sharded over devices stays sharded.
  """
  d_model = features.shape[-1]
  assert head.shape[0] == d_model, (features.shape, head.shape)
  # Padded positions get weight 0.
  xs, ts, ws = split_sequence(min(chunk_size, features.shape[1]), features, targets,
                              weights.astype(jnp.float32))
  head = head.astype(features.dtype)

  @jax.checkpoint  # the backward recomputes this chunk's logits instead of keeping them
  def chunk_loss(x, t, w):
    logits = jnp.einsum("bcd,dv->bcv", x, head).astype(jnp.float32)  # [batch, chunk, vocab]
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, t) * w)

  def body(total, chunk):
    return total + chunk_loss(*chunk), None

  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (xs, ts, ws))
  return total, jnp.sum(weights.astype(jnp.float32))
