"""The attention kernels inside the model: packed documents stay apart, and training on a sharded
mesh gives the same losses on every kernel (Pallas kernels in interpret mode on the CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.models import ModelConfig, build_model
from tests.test_train import _train_losses


@pytest.mark.parametrize("impl", ["xla", "cpu", "pallas_gpu", "splash"])
def test_no_token_sees_across_a_document_boundary(impl):
  cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=128,
                    position="rotary", norm="rmsnorm", activation="swiglu", use_bias=False,
                    tie_embeddings=False, attention_impl=impl)
  model = build_model(cfg)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 64, (1, 128)).astype(np.int32)
  segment_ids = np.repeat(np.arange(1, 5), 32)[None].astype(np.int32)  # four documents of 32
  positions = np.tile(np.arange(32), 4)[None].astype(np.int32)
  params = model.init(jax.random.key(0), jnp.asarray(tokens))["params"]
  logits = lambda t: np.asarray(model.apply({"params": params}, jnp.asarray(t), positions=positions,  # noqa: E731
                                            segment_ids=segment_ids))
  before = logits(tokens)
  perturbed = tokens.copy()
  perturbed[0, 32:64] = (perturbed[0, 32:64] + 7) % 64  # change document 2 only
  after = logits(perturbed)
  others = np.r_[0:32, 64:128]
  np.testing.assert_array_equal(after[0, others], before[0, others])
  assert np.abs(after[0, 32:64] - before[0, 32:64]).max() > 1e-3


def test_packed_training_on_a_2x2x2_mesh_is_the_same_on_every_kernel(tmp_path):
  common = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "data.packing": "document", "train.steps": 3,
            "train.eval_steps": 0, "model.position": "rotary", "model.use_bias": False}
  reference, _ = _train_losses(tmp_path, "xla", **common, **{"model.attention_impl": "xla"})
  for impl in ("pallas_gpu", "splash"):  # cpu: auto's pick here, so every training test runs it
    got, _ = _train_losses(tmp_path, impl, **common, **{"model.attention_impl": impl})
    np.testing.assert_allclose(got, reference, rtol=2e-5, err_msg=impl)


@pytest.mark.parametrize("impl", ["xla", "cpu", "splash"])
def test_prefix_lm_prompt_sees_itself_both_ways_and_never_the_response(impl):
  """A packed row of four examples, each a 6-token prompt and a 10-token response. With
  in_prefix, changing a later prompt token moves the earlier prompt positions' logits; without
  it, it does not; a response token never moves a prompt position; no other example moves."""
  cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, max_seq_len=64,
                    position="rotary", norm="rmsnorm", activation="swiglu", use_bias=False,
                    tie_embeddings=False, attention_impl=impl)
  model = build_model(cfg)
  tokens = np.random.default_rng(1).integers(0, 64, (1, 64)).astype(np.int32)
  segment_ids = np.repeat(np.arange(1, 5), 16)[None].astype(np.int32)
  positions = np.tile(np.arange(16), 4)[None].astype(np.int32)
  in_prefix = positions < 6
  params = model.init(jax.random.key(0), jnp.asarray(tokens))["params"]
  run = jax.jit(lambda t, p: model.apply({"params": params}, t, positions=positions, segment_ids=segment_ids,
                                         in_prefix=p))
  logits = lambda t, prefix: np.asarray(run(jnp.asarray(t), prefix))  # noqa: E731

  def perturbed(position):  # example 2's token at `position` of its 16
    out = tokens.copy()
    out[0, 16 + position] = (out[0, 16 + position] + 7) % 64
    return out

  early_prompt, others = np.r_[16:21], np.r_[0:16, 32:64]
  with_prefix, causal = logits(tokens, in_prefix), logits(tokens, None)
  moved = logits(perturbed(5), in_prefix)  # the prompt's last token
  assert np.abs(moved[0, early_prompt] - with_prefix[0, early_prompt]).max() > 1e-3
  np.testing.assert_array_equal(moved[0, others], with_prefix[0, others])
  np.testing.assert_array_equal(logits(perturbed(5), None)[0, early_prompt], causal[0, early_prompt])
  response_moved = logits(perturbed(8), in_prefix)  # a response token
  np.testing.assert_array_equal(response_moved[0, 16:22], with_prefix[0, 16:22])
  assert np.abs(response_moved[0, 24:32] - with_prefix[0, 24:32]).max() > 1e-3
