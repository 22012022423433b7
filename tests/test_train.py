"""The training core: mesh equivalence, sharded memory, accumulation, resume, CLI errors."""

import json
import os

import jax
import numpy as np
import pytest

from jaxllm import train
from jaxllm.config import ConfigError, validate
from jaxllm.metrics import perplexity
from jaxllm.models import ModelConfig
from jaxllm.sharding import bytes_per_device, make_mesh
from jaxllm.state import make_setup
from tests.helpers import make_tiny_config, run_cli

# 8 heads, d_ff 256 and vocab 384 divide by 8, so every mesh axis really shards.
SHARDABLE = {"model.num_heads": 8, "model.d_ff": 256}


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _train_losses(tmp_path, name, **overrides):
  config = make_tiny_config(tmp_path, **{**SHARDABLE, "train.steps": 3, "train.log_every": 1,
                                         "train.eval_every": 3, **overrides})
  workdir = str(tmp_path / name)
  train.run(config, workdir)
  records = _metrics(workdir)
  return np.array([r["loss"] for r in records]), records


def test_loss_is_the_same_on_every_mesh(tmp_path):
  """Data, FSDP and tensor parallelism, scanned or unrolled layers, each remat policy: one loss curve.
  (The same seed initialises scanned and unrolled layers differently, so the unrolled runs start
  from the scanned run's first checkpoint.)"""
  no_eval = {"train.eval_steps": 0}  # losses only: no eval step to compile per mesh
  reference, _ = _train_losses(tmp_path, "ref", **{"mesh.data": 8, "mesh.fsdp": 1, "mesh.tensor": 1, **no_eval})
  assert np.all(np.isfinite(reference)) and reference[-1] < reference[0]
  # Each remat policy once: remat none on the pure fsdp and tensor meshes covers the 2x2x2 mesh's
  # axes, which runs with dots (the policy does not change the sharding).
  for mesh, remat in [((1, 8, 1), "none"), ((1, 1, 8), "none"), ((2, 2, 2), "dots"), ((1, 4, 2), "full")]:
    name = "x".join(map(str, mesh)) + remat
    got, _ = _train_losses(tmp_path, name, **{
        "mesh.data": mesh[0], "mesh.fsdp": mesh[1], "mesh.tensor": mesh[2], "model.remat": remat, **no_eval})
    np.testing.assert_allclose(got, reference, rtol=1e-5, err_msg=f"mesh {mesh}, remat {remat}")


@pytest.mark.parametrize("remat", ["none", "dots"])
def test_unrolled_layers_train_like_scanned_ones_on_a_sharded_mesh(tmp_path, remat):
  """Unrolled layers started from the scanned run's weights (restacked on read) follow its losses."""
  scanned, _ = _train_losses(tmp_path, "scanned", **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
                                                     "optim.lr": 0.0, "optim.min_lr": 0.0})
  unrolled, _ = _train_losses(tmp_path, "unrolled", **{
      "mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2, "model.scan_layers": False, "model.remat": remat,
      "init_from": str(tmp_path / "scanned"), "optim.lr": 0.0, "optim.min_lr": 0.0})
  np.testing.assert_allclose(unrolled, scanned, rtol=1e-5)


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
  full, _ = _train_losses(tmp_path, "full", **{"train.grad_accum": 1})
  accumulated, _ = _train_losses(tmp_path, "accum", **{"train.grad_accum": 4, "mesh.data": 2,
                                                       "mesh.fsdp": 1, "mesh.tensor": 4})
  np.testing.assert_allclose(accumulated, full, rtol=1e-5)


def test_parameter_bytes_per_device_shrink_with_fsdp_and_tensor(tmp_path):
  config = make_tiny_config(tmp_path, **SHARDABLE)

  def params_on(data, fsdp, tensor):
    config.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
    model_cfg = validate(config, jax.device_count())
    setup = make_setup(config, model_cfg, make_mesh(config.mesh))
    return setup.init_fn(jax.random.key(0)).params

  replicated_total = bytes_per_device(params_on(8, 1, 1))
  for mesh, factor in [((1, 8, 1), 8), ((1, 1, 8), 8), ((2, 2, 2), 4), ((2, 4, 1), 4)]:
    params = params_on(*mesh)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in flat:
      name = jax.tree_util.keystr(path)
      largest_shard = max(s.data.nbytes for s in leaf.addressable_shards)
      if name.endswith("['kernel']") or name.endswith("['embedding']") and "pos_embed" not in name:
        # every weight matrix is split fsdp x tensor ways
        assert largest_shard * factor == leaf.nbytes, (mesh, name, leaf.sharding.spec)
    assert bytes_per_device(params) < replicated_total / factor * 1.3, mesh


def test_resume_continues_without_repeating_or_skipping_steps(tmp_path):
  # optim.decay_steps pins the schedule, so a 3-step leg followed by a 6-step leg in the same
  # workdir must equal one unbroken 6-step run: same optimizer state, same data position.
  common = {"train.checkpoint_every": 3, "optim.decay_steps": 6}
  unbroken, _ = _train_losses(tmp_path, "unbroken", **{"train.steps": 6, **common})
  first, _ = _train_losses(tmp_path, "resumed", **{"train.steps": 3, **common})
  _, records = _train_losses(tmp_path, "resumed", **{"train.steps": 6, **common})
  steps = [r["step"] for r in records]
  assert steps == [1, 2, 3, 4, 5, 6]  # metrics.jsonl is appended to: no step twice, none missing
  resumed = np.array([r["loss"] for r in records])
  np.testing.assert_array_equal(resumed[:3], first)
  np.testing.assert_allclose(resumed, unbroken, rtol=1e-6)


def test_eval_perplexity_overflow_is_inf_not_a_crash():
  assert perplexity(1000.0) == float("inf")
  assert perplexity(0.0) == 1.0


def test_config_errors_are_one_clear_line(tmp_path):
  config = make_tiny_config(tmp_path)
  config.mesh.update(data=3, fsdp=1, tensor=1)
  with pytest.raises(Exception, match="devices"):
    validate(config, 8)
  config.mesh.update(data=8)
  config.train.batch_size = 12
  with pytest.raises(ConfigError, match="not divisible by the mesh"):
    validate(config, 8)
  with pytest.raises(ValueError, match="num_kv_heads"):
    ModelConfig(num_heads=6, num_kv_heads=4)


def _config_file(tmp_path, **overrides):
  path = tmp_path / "tiny_config.py"
  path.write_text("from tests.helpers import make_tiny_config\n\n"
                  f"def get_config():\n  return make_tiny_config({str(tmp_path)!r}, **{overrides!r})\n")
  return str(path)


def test_cli_trains_writes_metrics_config_and_checkpoints(tmp_path):
  workdir = tmp_path / "work"
  result = run_cli("jaxllm.train", "--config", _config_file(tmp_path), "--workdir", str(workdir),
                   "--config.train.steps=4", "--config.train.eval_every=2",
                   "--config.train.tensorboard=True", devices=2)
  assert result.returncode == 0, result.stderr[-2000:]
  records = _metrics(str(workdir))
  for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
    assert key in records[-1]
  assert any("eval_loss" in r and "eval_ppl" in r for r in records)
  resolved = json.loads((workdir / "config.json").read_text())
  assert resolved["train"]["steps"] == 4  # the command-line override is what was recorded
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "4"]  # checkpoint_every=3, and the end
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir / "tensorboard"))
  assert (workdir / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"  # the run's picture (test_plot.py)


@pytest.mark.parametrize("flag, message", [
    ("--config.train.stpes=3", "stpes"),
    ("--config.mesh.data=3", "devices"),
    ("--config.train.batch_size=7", "divisible"),
])
def test_cli_bad_config_is_one_clear_line(tmp_path, flag, message):
  result = run_cli("jaxllm.train", "--config", _config_file(tmp_path), "--workdir",
                   str(tmp_path / "work"), flag, devices=2)
  assert result.returncode != 0
  lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
  assert message in lines[0] or message in lines[-1], result.stderr[-1500:]
  assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name, params_m", [
    ("quickstart", 2.5), ("gpt2_124m", 124), ("gpt2_355m", 355), ("gpt2_774m", 774),
    ("gpt2_1558m", 1558), ("llama_100m", 93),
    # "389m" counts the tied 42,437 x 1024 embedding twice (as input and output): 346M + 43M.
    ("bloom_389m_zh", 346)])
def test_recipe_configs_build_the_published_sizes(name, params_m):
  import importlib  # pylint: disable=import-outside-toplevel
  config = importlib.import_module(f"configs.{name}").get_config()
  model_cfg = ModelConfig.from_config(config.model)
  # GPT-2 sizes count the 50,257-token tied embedding; our vocabulary is padded to 50,304.
  assert abs(model_cfg.num_params() / 1e6 - params_m) / params_m < 0.06, model_cfg.num_params()
  validate(config, 8)  # the mesh and batch of every recipe fit 8 devices


def test_weight_decay_spares_biases_norms_and_embeddings_unless_asked():
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  from jaxllm.models import GPT  # pylint: disable=import-outside-toplevel
  from jaxllm.optim import decay_mask  # pylint: disable=import-outside-toplevel
  cfg = ModelConfig(vocab_size=32, d_model=16, num_layers=1, num_heads=2, max_seq_len=8, use_bias=False)
  params = nn.meta.unbox(GPT(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  # use_bias=False drops every bias, the LayerNorms' too (nanoGPT's bias=False)
  names = ["/".join(p) for p in traverse_util.flatten_dict(params)]
  assert not [n for n in names if n.endswith("bias")], names
  assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params()
  for decay_embeddings, decayed_embeddings in ((False, set()), (True, {"embed/embedding", "pos_embed/embedding"})):
    mask = {"/".join(p): v for p, v in traverse_util.flatten_dict(decay_mask(params, decay_embeddings)).items()}
    assert {n for n, v in mask.items() if v} == {n for n in names if "kernel" in n} | decayed_embeddings


def test_the_step_pins_activations_by_logical_name(tmp_path):
  """The train step's blocks carry sharding constraints (batch over data x fsdp, heads and MLP
  width over tensor); models built without a mesh (init, decoding) carry none."""
  from jaxllm.models import build_model  # pylint: disable=import-outside-toplevel
  from jaxllm.train import compile_steps  # pylint: disable=import-outside-toplevel
  config = make_tiny_config(tmp_path, **{**SHARDABLE, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  model_cfg = validate(config, jax.device_count())
  mesh = make_mesh(config.mesh)
  setup = make_setup(config, model_cfg, mesh)
  jit_train, _ = compile_steps(setup, config, mesh)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          setup.abstract_state, setup.state_shardings)
  batch = {k: jax.ShapeDtypeStruct((8, 32), np.int32) for k in ("inputs", "targets")}
  batch["weights"] = jax.ShapeDtypeStruct((8, 32), np.float32)
  text = jit_train.lower(abstract, batch, jax.random.key(0)).as_text()
  assert text.count("sharding_constraint") >= 5  # hidden in/out, q, k, v, mlp: inside the scanned block
  assert '[{"data", "fsdp"}, {}, {"tensor"}, {}]' in text  # q, k, v [batch, seq, heads, head_dim]
  assert '[{"data", "fsdp"}, {}, {"tensor"}]' in text  # the MLP's hidden [batch, seq, d_ff]
  plain = jax.jit(lambda p, t: build_model(model_cfg).apply({"params": p}, t)).lower(
      setup.abstract_state.params, batch["inputs"]).as_text()
  assert "sharding_constraint" not in plain
