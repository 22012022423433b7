"""Attention with a hand-written backward, for XLA's CPU backend (`model.attention_impl=cpu`).

The reference (`jax.nn.dot_product_attention(implementation='xla')`) under autodiff makes XLA
CPU run the softmax's backward as several passes over the [batch, heads, q, k] scores and
transpose them between the batched matmuls: 41 ms for one GPT-2 layer's attention (8 x 256
tokens, 6 heads of 64) where PyTorch's fused CPU kernel takes 13 ms. This version keeps the
normalised probabilities from the forward and runs the flash-attention backward on them,
    dS = P * (dP - rowsum(P * dP)),   dP = dO V^T,
so the backward is four matmuls and one elementwise pass. (rowsum(P * dP) equals the usual
rowsum(dO * O); written with O, XLA fuses a second P V matmul into the backward to rebuild it.)
The causal mask is built from iotas inside the fusion that reads the scores, and causal rows
run in query blocks that skip the keys after each block (BLOCK).

It is plain JAX and exact (the same softmax, in float32), so it runs anywhere, but it is laid
out for the CPU backend only: `attention_impl='auto'` picks it on CPU, never on GPU or TPU,
where the fused kernels (cuDNN, Pallas, splash) hold the probabilities in on-chip memory.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array

# Masked scores: a large finite negative, as jax.nn.dot_product_attention uses, so that a
# row with no visible key gives a uniform softmax rather than NaN.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


# Query rows per block of a causal call: a block's queries attend to the keys up to its end
# only, so the matmuls and the softmax skip the (n_blocks - 1) / (2 n_blocks) of the score
# matrix that the causal mask would discard (a quarter at seq 256, 7/16 at 1024).
BLOCK = 128


def attention(q: Array, k: Array, v: Array, *, mask: Array | None = None, bias: Array | None = None,
              causal: bool = False, block: int | None = None) -> Array:
  """softmax(q k^T / sqrt(head_dim) + bias, where mask) v.

  q [batch, seq, heads, head_dim]; k, v [batch, seq, kv_heads, head_dim]; mask bool
  [batch or 1, 1, seq, seq] (True = may attend) or None; causal: no query attends to a later
  key (on top of the mask; only then are whole blocks skipped); bias [batch or 1, heads, seq,
  seq] or None. A causal sequence that `block` (default BLOCK) divides into two or more is
  run in query blocks of `block`. Returns q's shape and dtype.
  """
  batch, seq_len, num_heads, head_dim = q.shape
  num_kv_heads = k.shape[2]
  groups = num_heads // num_kv_heads
  # Rank 4 inside (XLA CPU runs a rank-5 version of these matmuls at half the speed): query
  # head n uses kv head n // groups, so the queries of one kv head are its rows
  # [batch, kv_heads, groups * block, head_dim], row r being the block's position r % block.
  q5 = q.reshape(batch, seq_len, num_kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
  kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  if bias is not None:
    bias = jnp.broadcast_to(bias, (bias.shape[0], num_heads, seq_len, seq_len)).reshape(
        bias.shape[0], num_kv_heads, groups, seq_len, seq_len)
  block = block or BLOCK
  size = block if causal and seq_len % block == 0 and seq_len >= 2 * block else seq_len
  rows = lambda x: x.reshape(x.shape[0], x.shape[1], groups * size, x.shape[-1])  # noqa: E731
  outs = []
  for start in range(0, seq_len, size):
    end = start + size
    keys = end if causal else seq_len  # a causal block sees no key after its last query
    block_mask = block_bias = None
    if mask is not None:
      block_mask = jnp.tile(mask[:, :, start:end, :keys], (1, 1, groups, 1))
    if bias is not None:
      block_bias = rows(bias[:, :, :, start:end, :keys])
    out = _attention(rows(q5[:, :, :, start:end]), kh[:, :, :keys], vh[:, :, :keys], block_mask,
                     block_bias, (start, size) if causal else None)
    outs.append(out.reshape(batch, num_kv_heads, groups, size, head_dim))
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
  return out.transpose(0, 3, 1, 2, 4).reshape(q.shape)


def _probs(q: Array, k: Array, mask: Array | None, bias: Array | None,
           causal: tuple[int, int] | None) -> Array:
  """Softmax probabilities [batch, kv_heads, rows, keys] in float32. causal = (position of
  the block's first query, queries per group) or None."""
  scale = q.shape[-1] ** -0.5
  scores = jnp.einsum("bkrh,bksh->bkrs", q, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    scores = scores + bias.astype(jnp.float32)
  if causal is not None:
    start, size = causal
    num_rows, num_keys = scores.shape[-2:]
    visible = jnp.arange(num_rows)[:, None] % size + start >= jnp.arange(num_keys)[None, :]
    mask = visible if mask is None else mask & visible
  if mask is not None:
    scores = jnp.where(mask, scores, _MASKED)
  probs = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
  return probs / jnp.sum(probs, axis=-1, keepdims=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, mask, bias, causal):
  return _forward(q, k, v, mask, bias, causal)[0]


def _forward(q, k, v, mask, bias, causal):
  probs = _probs(q, k, mask, bias, causal)
  out = jnp.einsum("bkrs,bksh->bkrh", probs.astype(v.dtype), v)
  return out, (q, k, v, probs, mask, bias)


def _backward(causal, residuals, grad_out):
  del causal  # the probabilities are zero where masked
  q, k, v, probs, mask, bias = residuals
  scale = q.shape[-1] ** -0.5
  grad_v = jnp.einsum("bkrs,bkrh->bksh", probs.astype(grad_out.dtype), grad_out)
  grad_probs = jnp.einsum("bkrh,bksh->bkrs", grad_out, v, preferred_element_type=jnp.float32)
  row = jnp.sum(probs * grad_probs, axis=-1, keepdims=True)
  grad_scores = probs * (grad_probs - row)  # d loss / d (scaled scores + bias)
  grad_scaled = grad_scores.astype(q.dtype)
  grad_q = jnp.einsum("bkrs,bksh->bkrh", grad_scaled, k) * jnp.asarray(scale, q.dtype)
  grad_k = jnp.einsum("bkrs,bkrh->bksh", grad_scaled, q) * jnp.asarray(scale, k.dtype)
  grad_bias = None
  if bias is not None:
    summed = tuple(i for i in range(bias.ndim) if bias.shape[i] == 1 and grad_scores.shape[i] != 1)
    grad_bias = jnp.sum(grad_scores, axis=summed, keepdims=True).astype(bias.dtype)
  return grad_q, grad_k, grad_v.astype(v.dtype), None, grad_bias  # None: the mask has no gradient


_attention.defvjp(_forward, _backward)
