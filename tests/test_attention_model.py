"""The attention kernels inside the model: packed documents stay apart, and training on a sharded
mesh gives the same losses on every kernel (Pallas kernels in interpret mode on the CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.models import ModelConfig, build_model
from tests.test_train import _train_losses


@pytest.mark.parametrize("impl", ["xla", "pallas_gpu", "splash"])
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
  for impl in ("pallas_gpu", "splash"):
    got, _ = _train_losses(tmp_path, impl, **common, **{"model.attention_impl": impl})
    np.testing.assert_allclose(got, reference, rtol=2e-5, err_msg=impl)
