"""Hand-written backward passes (jaxllm/models/layers.py) equal JAX's own autodiff."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.models.layers import gelu_exact, matmul_dot_general, tied_logits


def _grads(fn, *args):
  return jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=tuple(range(len(args))))(*args)


@pytest.mark.parametrize("x_shape,kernel_shape,k", [((3, 5, 8), (8, 6), 1), ((3, 5, 4, 2), (4, 2, 7), 2),
                                                    ((5, 8), (8, 2, 3), 1)])
def test_matmul_backward_equals_autodiff(x_shape, kernel_shape, k):
  kx, kk = jax.random.split(jax.random.key(0))
  x, kernel = jax.random.normal(kx, x_shape), jax.random.normal(kk, kernel_shape)
  dims = ((tuple(range(x.ndim - k, x.ndim)), tuple(range(k))), ((), ()))
  ours = _grads(lambda a, b: matmul_dot_general(a, b, dims), x, kernel)
  reference = _grads(lambda a, b: jax.lax.dot_general(a, b, dims), x, kernel)
  for a, b in zip(ours, reference):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(matmul_dot_general(x, kernel, dims), jax.lax.dot_general(x, kernel, dims), rtol=1e-6)


def test_dense_layers_use_it_and_keep_their_gradients():
  x = jax.random.normal(jax.random.key(1), (2, 3, 8))
  for layer in (nn.Dense(5), nn.DenseGeneral((2, 3))):
    params = layer.init(jax.random.key(2), x)
    ours = jax.grad(lambda p: jnp.sum(jnp.tanh(layer.clone(dot_general=matmul_dot_general).apply(p, x))))(params)
    reference = jax.grad(lambda p: jnp.sum(jnp.tanh(layer.apply(p, x))))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), ours, reference)


def test_tied_logits_backward_equals_autodiff():
  kx, ke = jax.random.split(jax.random.key(3))
  x, embedding = jax.random.normal(kx, (2, 4, 8)), jax.random.normal(ke, (11, 8))
  ours = _grads(tied_logits, x, embedding)
  reference = _grads(lambda a, e: a @ e.T, x, embedding)
  for a, b in zip(ours, reference):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_exact_gelu_value_and_slope():
  x = jnp.linspace(-6, 6, 101)
  # erf (PyTorch's form) where flax uses erfc: equal to 1e-6 in the far negative tail
  np.testing.assert_allclose(gelu_exact(x), nn.gelu(x, approximate=False), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jax.vmap(jax.grad(gelu_exact))(x),
                             jax.vmap(jax.grad(lambda v: nn.gelu(v, approximate=False)))(x), rtol=1e-5, atol=1e-6)
  assert gelu_exact(jnp.ones(3, jnp.bfloat16)).dtype == jnp.bfloat16
