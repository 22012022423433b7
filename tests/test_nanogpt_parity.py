"""jaxllm trains exactly as nanoGPT does: same weights, same batches -> the same losses, step for step.

The reference is scripts/nanogpt_shakespeare_char.py (a condensation of nanoGPT's model and
AdamW setup, PyTorch on CPU) with the configs/shakespeare_char.py recipe, shrunk to 2 layers.
It covers the model (no biases, exact GELU, tied embedding), AdamW with decay on every
2-D weight, gradient clipping and the warmup-cosine schedule.
"""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.models.stacking import stack_layers

torch = pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D, HEADS, LAYERS, VOCAB, SEQ, BATCH = 128, 4, 2, 65, 64, 12


def _load(path, name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _jaxllm_params(torch_model):
  sd = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
  hd = D // HEADS
  params = {"embed": {"embedding": sd["transformer.wte.weight"]},
            "pos_embed": {"embedding": sd["transformer.wpe.weight"]},
            "final_norm": {"scale": sd["transformer.ln_f.weight"]}}
  for i in range(LAYERS):
    h = f"transformer.h.{i}."
    qkv = sd[h + "attn.c_attn.weight"]  # [3 d, d], PyTorch's [out, in]
    q, k, v = (qkv[j * D:(j + 1) * D].T.reshape(D, HEADS, hd) for j in range(3))
    params[f"layer_{i}"] = {
        "attn": {"query": {"kernel": q}, "key": {"kernel": k}, "value": {"kernel": v},
                 "out": {"kernel": sd[h + "attn.c_proj.weight"].T.reshape(HEADS, hd, D)}},
        "attn_norm": {"scale": sd[h + "ln_1.weight"]}, "mlp_norm": {"scale": sd[h + "ln_2.weight"]},
        "mlp": {"wi": {"kernel": sd[h + "mlp.c_fc.weight"].T}, "wo": {"kernel": sd[h + "mlp.c_proj.weight"].T}}}
  return stack_layers(jax.tree.map(jnp.asarray, params))  # scanned layers: [LAYERS, ...] under `layers`


def test_shakespeare_char_recipe_trains_step_for_step_like_nanogpt():
  from jaxllm.config import validate  # pylint: disable=import-outside-toplevel
  from jaxllm.sharding import make_global_batch, make_mesh  # pylint: disable=import-outside-toplevel
  from jaxllm.state import make_setup  # pylint: disable=import-outside-toplevel
  from jaxllm.train import compile_steps  # pylint: disable=import-outside-toplevel
  nanogpt = _load("scripts/nanogpt_shakespeare_char.py", "nanogpt_reference")
  config = _load("configs/shakespeare_char.py", "shakespeare_char_config").get_config()
  config.model.update(vocab_size=VOCAB, num_layers=LAYERS)
  config.optim.warmup_steps = 2  # reach a large learning rate (and so real weight decay) within the test
  config.train.steps = 12
  config.mesh.update(data=1, fsdp=1, tensor=1)

  torch.manual_seed(0)
  reference = nanogpt.GPT(VOCAB, SEQ, LAYERS, HEADS, D)
  optimizer = reference.configure_optimizers(config.optim.weight_decay, config.optim.lr,
                                             (config.optim.b1, config.optim.b2))
  mesh = make_mesh(config.mesh, jax.devices()[:1])
  setup = make_setup(config, validate(config, 1), mesh)
  state = setup.init_fn(jax.random.key(0), _jaxllm_params(reference))
  train_step, _ = compile_steps(setup, config, mesh)

  rng = np.random.default_rng(0)
  tokens = rng.integers(0, VOCAB, size=5000)
  for step in range(config.train.steps):
    rows = np.stack([tokens[s:s + SEQ + 1] for s in rng.integers(0, len(tokens) - SEQ - 1, size=BATCH)])
    inputs, targets = rows[:, :-1].copy(), rows[:, 1:].copy()
    for group in optimizer.param_groups:
      group["lr"] = float(setup.schedule(step))
    loss = reference(torch.from_numpy(inputs).long(), torch.from_numpy(targets).long())
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), config.optim.grad_clip)
    optimizer.step()
    optimizer.zero_grad()
    batch = {"inputs": inputs.astype(np.int32), "targets": targets.astype(np.int32),
             "weights": np.ones(inputs.shape, np.float32)}
    state, metrics = train_step(state, make_global_batch(batch, mesh), jax.random.key(1))
    np.testing.assert_allclose(float(metrics["loss"]), loss.item(), rtol=2e-5, err_msg=f"step {step}")
    np.testing.assert_allclose(float(metrics["grad_norm"]), grad_norm.item(), rtol=1e-4, err_msg=f"step {step}")
  ours = jax.device_get(state.params)
  theirs = _jaxllm_params(reference)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), ours, theirs)
