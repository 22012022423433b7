"""The scorer's per-token log-probs and greedy flags equal a plain forward pass of each row
alone (padding, batching, the chunked logits and a prompt-tuned model's virtual tokens change
nothing), on one device and on a 2x2x2 mesh, with one compiled program per length bucket."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.errors import ConfigError
from jaxllm.eval.scoring import Scorer, bucket_length
from jaxllm.models import GPT, ModelConfig
from jaxllm.sharding import logical_shardings, mesh_from_flag

# 300 positions, 4 of them virtual: rows of up to 297 tokens, padded to 296 inputs at most,
# which is not a power of two and takes three 128-position chunks of logits.
CFG = ModelConfig(vocab_size=97, d_model=32, num_layers=2, num_heads=4, d_ff=64, max_seq_len=300,
                  num_virtual_tokens=4, init_std=0.1)


@pytest.fixture(scope="module")
def params():
  return jax.jit(lambda key: nn.meta.unbox(GPT(CFG).init(key, jnp.zeros((1, 8), jnp.int32))["params"])
                 )(jax.random.key(0))


@jax.jit
def forward(params, tokens):
  return GPT(CFG).apply({"params": params}, tokens)


def reference(params, row):
  logits = forward(params, jnp.asarray([row[:-1]]))[0]
  logprobs = jax.nn.log_softmax(logits)[jnp.arange(len(row) - 1), jnp.asarray(row[1:])]
  return np.asarray(logprobs), np.asarray(jnp.argmax(logits, -1) == jnp.asarray(row[1:]))


@pytest.fixture(scope="module")
def rows_and_expected(params):
  rng = np.random.default_rng(0)
  rows = [rng.integers(0, CFG.vocab_size, n).tolist() for n in (2, 17, 297, 40)]
  return rows, [reference(params, row) for row in rows]


@pytest.mark.parametrize("mesh", [None, "2,2,2"])
def test_scores_equal_each_row_alone(params, rows_and_expected, mesh):
  rows, expected = rows_and_expected
  if mesh is not None:
    mesh = mesh_from_flag(mesh)
    params = jax.device_put(params, logical_shardings(_boxed(), mesh))
  scorer = Scorer(CFG, mesh, batch_size=3)  # batches of 3 (8 rows on the mesh) and 1
  assert scorer.max_row_len == 297
  for (logprobs, greedy), scores in zip(expected, scorer.score(params, rows)):
    np.testing.assert_allclose(scores.logprobs, logprobs, atol=2e-5)
    np.testing.assert_array_equal(scores.greedy, greedy)
  assert expected[2][1].any()  # peaked enough that the greedy flags are not all False


def _boxed():
  return jax.eval_shape(lambda: GPT(CFG).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])


def test_one_program_per_length_bucket(params):
  scorer = Scorer(CFG, batch_size=4)
  rng = np.random.default_rng(1)
  rows = [rng.integers(0, CFG.vocab_size, n).tolist() for n in range(2, 60, 3)]  # 20 lengths
  scorer.score(params, rows)
  assert {bucket_length(len(r) - 1, scorer.max_input_len) for r in rows} == {16, 32, 64}
  assert scorer._jitted._cache_size() == 3  # pylint: disable=protected-access


def test_rows_that_do_not_fit_are_refused(params):
  scorer = Scorer(CFG, batch_size=2)
  with pytest.raises(ConfigError, match="rows need 2 to 297 tokens"):
    scorer.score(params, [[1, 2, 3], [1] * 298])
  with pytest.raises(ConfigError, match="outside the model's vocabulary"):
    scorer.score(params, [[1, CFG.vocab_size]])
