"""Scanned layers (`model.scan_layers`) and remat: the same numbers as unrolled layers and as no
remat, stacking that round-trips exactly, and checkpoints from before scanning read converted."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import checkpoint, model_dir
from jaxllm.config import default_config
from jaxllm.models import ModelConfig, build_model
from jaxllm.models.stacking import stack_layers, unstack_layers

GPT_CFG = dict(vocab_size=64, d_model=32, num_layers=3, num_heads=4, d_ff=64, max_seq_len=16)
CONFIGS = {
    "gpt2": ModelConfig(**GPT_CFG),
    "llama": ModelConfig(**GPT_CFG, position="rotary", norm="rmsnorm", activation="swiglu", use_bias=False,
                         tie_embeddings=False, num_kv_heads=2),
    "bert": ModelConfig(**GPT_CFG, family="bert", activation="gelu"),
}


def _loss_fn(cfg: ModelConfig):
  model = build_model(cfg)
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)

  def loss(params):
    logits = model.apply({"params": params}, tokens)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], -1))
  return model, tokens, loss


def _params(cfg: ModelConfig):
  model, tokens, _ = _loss_fn(cfg)
  return nn.meta.unbox(model.init(jax.random.key(0), tokens)["params"])


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_scanned_and_unrolled_layers_give_the_same_loss_and_gradients(name):
  scanned_cfg = CONFIGS[name]
  unrolled_cfg = dataclasses.replace(scanned_cfg, scan_layers=False)
  params = _params(scanned_cfg)
  assert params["layers"]["mlp_norm"]["scale"].shape == (3, 32) and "layer_0" not in params
  loss_s, grads_s = jax.value_and_grad(_loss_fn(scanned_cfg)[2])(params)
  loss_u, grads_u = jax.value_and_grad(_loss_fn(unrolled_cfg)[2])(unstack_layers(params))
  np.testing.assert_allclose(loss_s, loss_u, rtol=1e-6)
  _assert_trees_close(grads_s, stack_layers(grads_u))


def test_stacking_round_trips_bit_for_bit_and_matches_the_unrolled_tree():
  params = _params(CONFIGS["llama"])
  unrolled = unstack_layers(params)
  shapes = jax.tree.map(lambda x: x.shape, _params(dataclasses.replace(CONFIGS["llama"], scan_layers=False)))
  assert jax.tree.map(lambda x: x.shape, unrolled) == shapes
  jax.tree.map(np.testing.assert_array_equal, stack_layers(unrolled), params)
  np.testing.assert_array_equal(unrolled["layer_2"]["attn"]["query"]["kernel"],
                                params["layers"]["attn"]["query"]["kernel"][2])


def test_the_stacked_axis_has_its_own_logical_name_and_is_not_sharded():
  cfg = CONFIGS["gpt2"]
  model, tokens, _ = _loss_fn(cfg)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens)["params"])
  assert boxed["layers"]["attn"]["query"]["kernel"].names == ("layers", "embed", "heads", "head_dim")
  from jaxllm.sharding import LOGICAL_RULES  # pylint: disable=import-outside-toplevel
  assert dict(LOGICAL_RULES)["layers"] is None


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_remat_policies_give_the_same_loss_and_gradients(name, scan_layers):
  cfg = dataclasses.replace(CONFIGS[name], scan_layers=scan_layers)
  params = _params(cfg)
  results = {remat: jax.jit(jax.value_and_grad(_loss_fn(dataclasses.replace(cfg, remat=remat))[2]))(params)
             for remat in ("none", "dots", "full")}
  for remat in ("dots", "full"):
    np.testing.assert_allclose(results[remat][0], results["none"][0], rtol=1e-6)
    _assert_trees_close(results[remat][1], results["none"][1])


def _step_temp_bytes(cfg: ModelConfig) -> int:
  model = build_model(cfg)
  tokens = jax.ShapeDtypeStruct((8, 128), jnp.int32)
  params = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 128), jnp.int32))["params"]))

  def loss(p, t):
    logits = model.apply({"params": p}, t)
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1))
  compiled = jax.jit(jax.grad(loss)).lower(params, tokens).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_full_remat_keeps_less_than_dots_which_keeps_less_than_none():
  """XLA's own accounting of the compiled backward of scanned layers: with `full` a layer keeps
  only its input for the backward pass, with `dots` also its matmul outputs, with `none`
  everything. (Unrolled, XLA CPU's scheduler gives all three the same temporaries:
  docs/performance.md.)"""
  cfg = ModelConfig(vocab_size=256, d_model=64, num_layers=4, num_heads=4, max_seq_len=128,
                    matmul_impl="xla", scan_unroll=1)  # the loop, as on accelerators (CPU's auto unrolls)
  temp = {remat: _step_temp_bytes(dataclasses.replace(cfg, remat=remat)) for remat in ("none", "dots", "full")}
  assert temp["full"] < temp["dots"] < temp["none"], temp


def test_a_checkpoint_with_unrolled_layers_loads_into_scanned_layers(tmp_path):
  """A model directory written before scan_layers (layer_0 ...) loads restacked, and the other way."""
  cfg = CONFIGS["gpt2"]
  params = _params(cfg)
  run_config = default_config()
  run_config.model.update(dataclasses.asdict(dataclasses.replace(cfg, scan_layers=False)))
  old = str(tmp_path / "old")
  model_dir.save_model_dir(old, run_config.to_dict(), unstack_layers(params))
  run_config.model.scan_layers = True
  checkpoint.write_json(str(tmp_path / "old" / "config.json"), run_config.to_dict())
  loaded_cfg, loaded, _ = model_dir.load_model_dir(old)
  assert loaded_cfg.scan_layers
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  # A scanned checkpoint read by an unrolled model.
  new = str(tmp_path / "new")
  model_dir.save_model_dir(new, run_config.to_dict(), params)
  run_config.model.scan_layers = False
  checkpoint.write_json(str(tmp_path / "new" / "config.json"), run_config.to_dict())
  _, loaded, _ = model_dir.load_model_dir(new)
  jax.tree.map(np.testing.assert_array_equal, loaded, unstack_layers(params))
