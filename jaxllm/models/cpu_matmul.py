"""Matmuls with hand-written backwards laid out for XLA's CPU backend (`model.matmul_impl`).

XLA CPU's matmul wants its right operand with the contracting dimension minor. Written the
textbook way, the weight gradient x^T grad transposes grad (d_out wide, or [tokens, vocab]
for the output head) and fuses the activation's backward into that transposing copy, which
reads its inputs column by column: 4 ms of a 48 ms step per MLP layer of a small GPT.
These versions contract so that XLA transposes the narrow operand instead.

They are a CPU layout trick and nothing more: a `custom_vjp` hides the matmul from remat
policies and from forward-mode autodiff (`jax.jvp`), so `matmul_impl='auto'` uses them on
the CPU backend only; every other backend gets plain `lax.dot_general`.
"""

from __future__ import annotations

import functools
import math

import jax

Array = jax.Array


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x: Array, kernel: Array, num_contract: int) -> Array:
  """x's last `num_contract` dims against kernel's first ones: nn.Dense / nn.DenseGeneral's product."""
  return jax.lax.dot_general(x, kernel, ((tuple(range(x.ndim - num_contract, x.ndim)),
                                          tuple(range(num_contract))), ((), ())))


def _matmul_fwd(x: Array, kernel: Array, num_contract: int) -> tuple[Array, tuple[Array, Array]]:
  return _matmul(x, kernel, num_contract), (x, kernel)


def _matmul_bwd(num_contract: int, residuals: tuple[Array, Array], grad: Array) -> tuple[Array, Array]:
  x, kernel = residuals
  d_in = math.prod(kernel.shape[:num_contract])
  x2, grad2 = x.reshape(-1, d_in), grad.reshape(-1, kernel.size // d_in)
  kernel2 = kernel.reshape(d_in, -1)
  grad_x = jax.lax.dot_general(grad2, kernel2, (((1,), (1,)), ((), ()))).reshape(x.shape)
  # The weight gradient as (grad^T x)^T: XLA transposes x and the small [d_out, d_in] result.
  grad_kernel_t = jax.lax.dot_general(grad2, x2, (((0,), (0,)), ((), ())))
  return grad_x.astype(x.dtype), grad_kernel_t.T.reshape(kernel.shape).astype(kernel.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


@jax.custom_vjp
def tied_logits(x: Array, embedding: Array) -> Array:
  """x [..., d] against the embedding [vocab, d]: logits [..., vocab] (nn.Embed.attend)."""
  return jax.lax.dot_general(x, embedding, (((x.ndim - 1,), (1,)), ((), ())))


def _tied_logits_fwd(x: Array, embedding: Array) -> tuple[Array, tuple[Array, Array]]:
  return tied_logits(x, embedding), (x, embedding)


def _tied_logits_bwd(residuals: tuple[Array, Array], grad: Array) -> tuple[Array, Array]:
  x, embedding = residuals
  x2, grad2 = x.reshape(-1, x.shape[-1]), grad.reshape(-1, embedding.shape[0])
  grad_x = jax.lax.dot_general(grad2, embedding, (((1,), (0,)), ((), ()))).reshape(x.shape)
  # Contract over tokens with the narrow x on the right, so that XLA transposes x
  # [tokens, d] and not the [tokens, vocab] logits gradient.
  grad_embedding = jax.lax.dot_general(grad2, x2, (((0,), (0,)), ((), ())))
  return grad_x.astype(x.dtype), grad_embedding.astype(embedding.dtype)


tied_logits.defvjp(_tied_logits_fwd, _tied_logits_bwd)


def matmul_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """nn.Dense/DenseGeneral's dot_general with the CPU-laid-out backward (see _matmul_bwd).

  Any other contraction, an explicit precision or output type goes to lax.dot_general."""
  (lhs_contract, rhs_contract), (lhs_batch, _) = dimension_numbers
  k = len(rhs_contract)
  if (not lhs_batch and precision is None and preferred_element_type is None
      and tuple(lhs_contract) == tuple(range(lhs.ndim - k, lhs.ndim)) and tuple(rhs_contract) == tuple(range(k))):
    return _matmul(lhs, rhs, k)
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                             preferred_element_type=preferred_element_type)
