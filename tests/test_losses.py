"""The chunked cross-entropy equals the plain one (value and gradients) and holds fewer logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.losses import chunked_cross_entropy, cross_entropy
from tests.helpers import make_tiny_config


def _inputs(batch=4, seq=37, d=24, vocab=301, seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  features = jax.random.normal(k[0], (batch, seq, d))
  head = jax.random.normal(k[1], (d, vocab)) * 0.3
  targets = jax.random.randint(k[2], (batch, seq), 0, vocab)
  weights = (jax.random.uniform(k[3], (batch, seq)) > 0.3).astype(jnp.float32)
  return features, head, targets, weights


def _plain(features, head, targets, weights):
  return cross_entropy(features @ head, targets, weights)


@pytest.mark.parametrize("chunk_size", [1, 8, 37, 64])  # 8 does not divide 37: padded
def test_chunked_equals_plain_in_value_and_gradients(chunk_size):
  features, head, targets, weights = _inputs()
  want = _plain(features, head, targets, weights)
  got = chunked_cross_entropy(features, head, targets, weights, chunk_size)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  grad = lambda f: jax.grad(lambda x, h: f(x, h, targets, weights)[0], argnums=(0, 1))(features, head)  # noqa: E731
  for a, b in zip(grad(lambda *a: chunked_cross_entropy(*a, chunk_size)), grad(_plain)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_chunked_holds_fewer_logits():
  """XLA's temporaries for the loss and its gradient: the plain form keeps [tokens, vocab]
  float32 logits (and their gradient); chunked, one chunk's worth."""
  features, head, targets, weights = _inputs(batch=8, seq=512, d=64, vocab=4096)

  def temp(loss):
    fn = jax.jit(jax.grad(lambda x, h: loss(x, h, targets, weights)[0], argnums=(0, 1)))
    return fn.lower(features, head).compile().memory_analysis().temp_size_in_bytes
  logits_bytes = 8 * 512 * 4096 * 4
  plain, chunked = temp(_plain), temp(lambda *a: chunked_cross_entropy(*a, 64))
  # Measured: plain 128 MiB (the logits and their gradient), chunked 18 MiB for 32 MiB of logits.
  assert plain >= logits_bytes > 3 * chunked, (plain, chunked, logits_bytes)


def test_training_with_the_chunked_loss_matches_the_plain_loss(tmp_path):
  from jaxllm import train  # pylint: disable=import-outside-toplevel
  losses = {}
  for chunk in (0, 12):  # 12 does not divide seq_len 32
    config = make_tiny_config(tmp_path, **{"train.steps": 3, "train.log_every": 1, "train.eval_every": 3,
                                           "train.loss_chunk_size": chunk, "mesh.data": 2, "mesh.fsdp": 2,
                                           "mesh.tensor": 2})
    train.run(config, str(tmp_path / f"chunk{chunk}"))
    import json  # pylint: disable=import-outside-toplevel
    with open(tmp_path / f"chunk{chunk}" / "metrics.jsonl", encoding="utf-8") as f:
      losses[chunk] = [r["loss"] for r in map(json.loads, f) if "loss" in r]
  np.testing.assert_allclose(losses[12], losses[0], rtol=1e-5)
