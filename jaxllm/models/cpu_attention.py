"""Attention with a hand-written backward, for XLA's CPU backend (`model.attention_impl=cpu`).

The reference (`jax.nn.dot_product_attention(implementation='xla')`) under autodiff makes XLA
CPU run the softmax's backward as several passes over the [batch, heads, q, k] scores and
transpose them between the batched matmuls: 41 ms for one GPT-2 layer's attention (8 x 256
tokens, 6 heads of 64) where PyTorch's fused CPU kernel takes 13 ms. This version keeps the
normalised probabilities from the forward and runs the flash-attention backward on them,
    dS = P * (dP - rowsum(dO * O)),   dP = dO V^T,
so the backward is four matmuls and one elementwise pass; the causal mask (unless a dense
mask is given) is built from iotas inside the fusion that reads the scores.

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


def attention(q: Array, k: Array, v: Array, mask: Array | None, bias: Array | None,
              causal: bool) -> Array:
  """softmax(q k^T / sqrt(head_dim) + bias, where mask) v.

  q [batch, seq, heads, head_dim]; k, v [batch, seq, kv_heads, head_dim]; mask bool
  [batch or 1, 1, seq, seq] (True = may attend) or None, which with `causal` means the
  causal mask; bias [batch or 1, heads, seq, seq] or None. Returns q's shape and dtype.
  """
  batch, seq_len, num_heads, head_dim = q.shape
  num_kv_heads = k.shape[2]
  groups = num_heads // num_kv_heads
  # Rank 4 throughout (XLA CPU runs a rank-5 version of these matmuls at half the speed):
  # query head n uses kv head n // groups, so the queries of one kv head are its rows
  # [batch, kv_heads, groups * seq, head_dim], row r being position r % seq.
  rows = lambda x: x.reshape(x.shape[0], num_kv_heads, groups * seq_len, x.shape[-1])  # noqa: E731
  qr = rows(q.reshape(batch, seq_len, num_kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4))
  kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  if mask is not None and groups > 1:
    mask = jnp.tile(mask, (1, 1, groups, 1))
  if bias is not None:
    bias = rows(jnp.broadcast_to(bias, (bias.shape[0], num_heads, seq_len, seq_len)))
  out = _attention(qr, kh, vh, mask, bias, causal and mask is None)
  out = out.reshape(batch, num_kv_heads, groups, seq_len, head_dim).transpose(0, 3, 1, 2, 4)
  return out.reshape(q.shape)


def _probs(q: Array, k: Array, mask: Array | None, bias: Array | None, causal: bool) -> Array:
  """Softmax probabilities [batch, kv_heads, rows, keys] in float32."""
  scale = q.shape[-1] ** -0.5
  scores = jnp.einsum("bkrh,bksh->bkrs", q, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    scores = scores + bias.astype(jnp.float32)
  if causal:
    num_rows, seq_len = scores.shape[-2:]
    mask = jnp.arange(num_rows)[:, None] % seq_len >= jnp.arange(seq_len)[None, :]
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
  return out, (q, k, v, out, probs, mask, bias)


def _backward(causal, residuals, grad_out):
  del causal  # the probabilities are zero where masked
  q, k, v, out, probs, mask, bias = residuals
  scale = q.shape[-1] ** -0.5
  grad_v = jnp.einsum("bkrs,bkrh->bksh", probs.astype(grad_out.dtype), grad_out)
  grad_probs = jnp.einsum("bkrh,bksh->bkrs", grad_out, v, preferred_element_type=jnp.float32)
  row = jnp.sum(grad_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
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
