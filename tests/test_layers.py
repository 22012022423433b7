"""The CPU matmul backwards (jaxllm/models/cpu_matmul.py) equal JAX's own autodiff, and the model
gives the same loss and gradients with either `model.matmul_impl`."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.models import GPT, ModelConfig
from jaxllm.models.cpu_matmul import matmul_dot_general, tied_logits
from jaxllm.models.layers import gelu_exact


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


def _gpt_loss(cfg: ModelConfig):
  model = GPT(cfg)
  tokens = jax.random.randint(jax.random.key(4), (2, 12), 0, cfg.vocab_size)
  params = model.init(jax.random.key(5), tokens)["params"]

  def loss(p):
    logits = model.apply({"params": p}, tokens)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], -1))
  return loss, params


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_matmul_impls_give_the_same_loss_and_gradients(tie_embeddings):
  base = dict(vocab_size=48, d_model=32, num_layers=2, num_heads=4, max_seq_len=16,
              tie_embeddings=tie_embeddings)
  results = []
  for impl in ("xla", "cpu_vjp"):
    loss, params = _gpt_loss(ModelConfig(**base, matmul_impl=impl))
    results.append(jax.value_and_grad(loss)(params))
  (loss_xla, grads_xla), (loss_cpu, grads_cpu) = results
  np.testing.assert_allclose(loss_xla, loss_cpu, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads_xla, grads_cpu)


def test_forward_mode_autodiff_works_through_the_xla_matmuls():
  """The accelerator path (plain matmuls, no CPU attention) has forward mode; the CPU variants'
  custom_vjps (matmul_impl=cpu_vjp, attention_impl=cpu) do not."""
  loss, params = _gpt_loss(ModelConfig(vocab_size=48, d_model=32, num_layers=2, num_heads=4,
                                       max_seq_len=16, matmul_impl="xla", attention_impl="xla"))
  tangent = jax.tree.map(jnp.ones_like, params)
  _, forward = jax.jvp(loss, (params,), (tangent,))
  reverse = sum(jnp.sum(g) for g in jax.tree.leaves(jax.grad(loss)(params)))  # <grad, ones>
  np.testing.assert_allclose(forward, reverse, rtol=1e-4)
  for cpu_variant in ({"matmul_impl": "cpu_vjp", "attention_impl": "xla"},
                      {"matmul_impl": "xla", "attention_impl": "cpu"}):
    with pytest.raises(TypeError):  # a custom_vjp has no forward mode
      jax.jvp(_gpt_loss(ModelConfig(vocab_size=48, d_model=32, num_layers=2, num_heads=4,
                                    max_seq_len=16, **cpu_variant))[0], (params,), (tangent,))


def test_auto_picks_the_cpu_variant_on_cpu_only():
  assert ModelConfig(matmul_impl="auto").cpu_matmul == (jax.default_backend() == "cpu")
  assert not ModelConfig(matmul_impl="xla").cpu_matmul
  assert ModelConfig(matmul_impl="cpu_vjp").cpu_matmul
  with pytest.raises(ValueError, match="matmul_impl"):
    ModelConfig(matmul_impl="fast")
