"""Compile-once, the benchmark's table and memory analysis, the FLOPs formula. Nothing here is timed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import bench, train
from jaxllm.models import ModelConfig, build_model
from tests.helpers import make_tiny_config, run_cli


@pytest.fixture
def compile_events():
  """Names of the functions lowered for XLA while the fixture is active: every (re)compile
  lowers first, before the persistent compilation cache is asked, so a cache hit counts too."""
  names: list[str] = []

  def listener(event, duration, **kwargs):
    del duration
    if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
      names.append(kwargs.get("fun_name", ""))
  jax.monitoring.register_event_duration_secs_listener(listener)
  yield names
  jax.monitoring.unregister_event_duration_listener(listener)


def test_train_and_eval_steps_compile_once(tmp_path, compile_events):
  # 6 steps with an evaluation after steps 2, 4 and 6: the train step must not be
  # recompiled after step 1 (a Python scalar or a changed sharding/dtype in the state
  # would do that), and the eval step compiles once for all three evaluations.
  config = make_tiny_config(tmp_path, **{"train.steps": 6, "train.log_every": 2,
                                         "train.eval_every": 2, "train.checkpoint_every": 100})
  metrics = train.run(config, str(tmp_path / "run"))
  assert "eval_loss" in metrics
  assert compile_events.count("jit(train_step)") == 1, compile_events
  assert compile_events.count("jit(eval_step)") == 1, compile_events


def test_flops_per_token_uses_the_real_parameter_count():
  for tie in (True, False):
    cfg = ModelConfig(vocab_size=100, d_model=32, num_layers=2, num_heads=4, max_seq_len=16,
                      tie_embeddings=tie)
    params = jax.eval_shape(lambda: build_model(cfg).init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32)))
    count = sum(x.size for x in jax.tree.leaves(params))
    assert cfg.num_params() == count
    embeddings = cfg.vocab_size * cfg.d_model * (1 if tie else 2) + cfg.max_seq_len * cfg.d_model
    # 6 N (N: weights touched by a matmul per token, the output projection included) + 12 L H Q T.
    n = count - embeddings + cfg.vocab_size * cfg.d_model
    assert cfg.flops_per_token(16) == 6 * n + 12 * 2 * 4 * 8 * 16


def test_matmul_flops_count_weights_and_halves_causal_attention():
  # MaxText's count: 3 x forward matmuls; attention (4 T H Q per layer and token) halved if causal.
  cfg = ModelConfig(vocab_size=100, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    d_ff=48, activation="swiglu", max_seq_len=16)
  weights = 32 * 8 * (4 + 2 * 2) + 4 * 8 * 32 + 32 * 48 * 3
  forward = 2 * (2 * weights + 100 * 32)
  assert cfg.matmul_flops_per_token(16) == 3 * (forward + 2 * 2 * 16 * 4 * 8)
  # Without the causal halving the attention term is the PaLM one, 12 L H Q T.
  attention = cfg.matmul_flops_per_token(16, causal=False) - 3 * forward
  assert attention == 12 * 2 * 4 * 8 * 16


def test_packed_random_batch_restarts_positions_per_segment():
  batch = bench.random_batch(4, 64, 50, packing="document")
  seg, pos = batch["segment_ids"], batch["positions"]
  assert (seg[:, 0] == 1).all() and (np.diff(seg, axis=1) >= 0).all() and seg.max() > 1
  new_doc = np.diff(seg, axis=1) > 0
  assert (pos[:, 1:][new_doc] == 0).all() and (pos[:, 1:][~new_doc] == pos[:, :-1][~new_doc] + 1).all()


def test_bench_table_rows_and_hf_ratio(tmp_path):
  config = make_tiny_config(tmp_path, **{"model.d_model": 32, "model.num_layers": 1, "model.d_ff": 64})
  report = bench.run(config, steps=2, warmup=1, remats=["none", "full"], compare_hf=True,
                     memory_only=False, matmul_size=256)
  rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in report.splitlines()
          if line.startswith("| jaxllm") or line.startswith("| transformers")}
  assert set(rows) >= {"jaxllm remat=none", "jaxllm remat=full"}
  assert any(name.startswith("transformers GPT2") for name in rows)
  for cells in rows.values():
    assert float(cells[3].replace(",", "")) > 0            # tokens/s
    assert cells[5].endswith("%") and cells[6].endswith("%")  # MFU vs jax and torch matmul
  assert "jax f32 matmul" in report and "torch f32 matmul" in report
  assert "/ transformers tokens/s:" in report


def test_memory_only_shows_fsdp_shrinking_per_device_memory(tmp_path):
  # Abstract arrays only: nothing is allocated. Sharding the weights and optimizer state
  # over 8 devices (fsdp) must need less memory per device than replicating them (data).
  per_device = {}
  for mesh in ({"mesh.data": 8, "mesh.fsdp": 1}, {"mesh.data": 1, "mesh.fsdp": 8}):
    config = make_tiny_config(tmp_path, **{"model.d_model": 128, "model.d_ff": 512, **mesh})
    from jaxllm.sharding import make_mesh  # pylint: disable=import-outside-toplevel
    row, step = bench.jax_variant(config, "none", make_mesh(config.mesh), allocate=False)
    assert step is None
    per_device[mesh["mesh.fsdp"]] = row.memory_bytes
  params_bytes = ModelConfig.from_config(config.model).num_params() * 4
  # Replicated: at least params + grads-sized updates + 2 Adam moments live on each device.
  assert per_device[1] > 3 * params_bytes
  # Params, gradients and both Adam moments sharded 8 ways: at least two parameter copies' worth saved.
  assert per_device[1] - per_device[8] > 2 * params_bytes


def test_bench_cli_rejects_unknown_remat():
  result = run_cli("jaxllm.bench", "--config", "configs/bench_gpt_cpu.py", "--remat", "none,most")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith("error: --remat='none,most'")
