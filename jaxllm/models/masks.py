"""The dense inputs attention can take: the reference mask (segment ids, causal, prefix-LM)
and the ALiBi bias. Only the `xla` and `cpu` kernels take a dense mask; the fused kernels
build theirs from the segment ids."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array


def reference_mask(q_len: int, segment_ids: Array | None = None, in_prefix: Array | None = None,
                   causal: bool = True, batch: int = 1) -> Array | None:
  """Boolean [batch, 1, q_len, q_len] mask (True = may attend), or None for plain causal:
  the only dense mask jaxllm builds, for the xla path.

  segment_ids [batch, seq]: tokens only see tokens of the same segment (padding, id 0, is a
  segment too, so no row is empty). in_prefix [batch, seq] bool (prefix-LM): with causal,
  query i also sees every key j of its segment that is in the prefix, later ones included;
  each segment's prefix is its first tokens, so the prefix sees itself both ways and the
  rest of the segment stays causal.
  """
  if segment_ids is None and in_prefix is None:
    return None
  mask = jnp.ones((batch, q_len, q_len), bool)
  if causal:
    i = jnp.arange(q_len)[:, None]
    j = jnp.arange(q_len)[None, :]
    allowed = j <= i
    if in_prefix is not None:
      allowed = allowed | in_prefix[:, None, :].astype(bool)
    mask = mask & allowed
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
  return mask[:, None, :, :]


def alibi_slopes(num_heads: int) -> Array:
  """Per-head ALiBi slopes (Press et al.; the Bloom variant for head counts that aren't powers of 2)."""
  closest = 2 ** math.floor(math.log2(num_heads))
  base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
  slopes = [base ** (i + 1) for i in range(closest)]
  if closest != num_heads:
    extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
    slopes += [extra_base ** (2 * i + 1) for i in range(num_heads - closest)]
  return jnp.asarray(slopes, jnp.float32)


def alibi_bias(num_heads: int, q_positions: Array, k_positions: Array) -> Array:
  """[batch, heads, q_len, k_len] bias slope * (key_pos - query_pos); per-row constants cancel in softmax."""
  rel = (k_positions[:, None, :] - q_positions[:, :, None]).astype(jnp.float32)
  return alibi_slopes(num_heads)[None, :, None, None] * rel[:, None, :, :]
