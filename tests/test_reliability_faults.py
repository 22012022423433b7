"""Numerical faults: a non-finite step is skipped inside the jitted step, counted, and stops the run per policy."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxllm import faults, train
from jaxllm.config import ConfigError, validate
from jaxllm.sharding import make_global_batch, make_mesh
from jaxllm.state import compile_steps, make_setup
from tests.helpers import make_tiny_config


def test_poisoned_batch_skips_the_update_and_counts_it(tmp_path):
  config = make_tiny_config(tmp_path)
  mesh = make_mesh(config.mesh)
  setup = make_setup(config, validate(config, jax.device_count()), mesh)
  jit_train, _ = compile_steps(setup, config, mesh)
  rng = np.random.default_rng(0)
  shape = (config.train.batch_size, config.data.seq_len)
  good = {"inputs": rng.integers(0, 300, shape, dtype=np.int32),
          "targets": rng.integers(0, 300, shape, dtype=np.int32),
          "weights": np.ones(shape, np.float32)}
  poisoned = dict(good, weights=good["weights"].copy())
  poisoned["weights"][3, 5] = np.nan  # e.g. a corrupt loss mask: NaN loss and gradients
  key = jax.random.key(0)

  state = setup.init_fn(key)
  state, _ = jit_train(state, make_global_batch(good, mesh), key)
  before = jax.device_get(state)
  state, metrics = jit_train(state, make_global_batch(poisoned, mesh), key)
  after = jax.device_get(state)
  assert not np.isfinite(metrics["loss"]) and not np.isfinite(metrics["grad_norm"])
  assert (int(metrics["nonfinite_in_a_row"]), int(metrics["nonfinite_total"])) == (1, 1)
  assert int(after.step) == 2  # the batch was consumed...
  # ...but parameters and optimizer moments are exactly as before it.
  jax.tree.map(np.testing.assert_array_equal, after.params, before.params)
  assert int(faults.counters(after.opt_state)["nonfinite_total"]) == 1  # checkpointed with the state
  state, metrics = jit_train(state, make_global_batch(good, mesh), key)
  assert np.isfinite(metrics["loss"])
  assert (int(metrics["nonfinite_in_a_row"]), int(metrics["nonfinite_total"])) == (0, 1)
  # The logged lr is the one applied: the skipped step did not advance the optimizer's schedule.
  assert float(setup.schedule(1)) != float(setup.schedule(2))
  np.testing.assert_allclose(float(metrics["lr"]), float(setup.schedule(1)), rtol=1e-7)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(state.params)))


def test_diverging_run_stops_after_n_in_a_row_with_good_checkpoints(tmp_path):
  # lr 1e30: the first real update (step 2) throws the weights to ~1e29, after which every
  # forward pass overflows. Steps 3, 4, 5 are non-finite; max 3 in a row stops at step 5.
  config = make_tiny_config(tmp_path, **{
      "train.steps": 20, "train.log_every": 4, "train.checkpoint_every": 1, "train.keep_checkpoints": 10,
      "train.eval_steps": 0, "train.peak_flops": 1e12, "train.max_nonfinite_in_a_row": 3,
      "optim.lr": 1e30, "optim.min_lr": 1e30})
  workdir = tmp_path / "run"
  with pytest.raises(faults.NonFiniteError, match=r"3 step\(s\) in a row \(steps 3-5"):
    train.run(config, str(workdir))
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert records[-1]["step"] == 5 and records[-1]["nonfinite_total"] == 3  # logged before stopping
  steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints"))
  assert steps == [1, 2, 3, 4]  # step 5 (where the policy was broken) is not saved
  with ocp.StandardCheckpointer() as ckpt:
    params = {s: ckpt.restore(workdir / "checkpoints" / str(s) / "state")["params"] for s in steps}
  for s in steps:
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params[s])), s
  # Skipped steps left the weights exactly as the last good step made them.
  jax.tree.map(np.testing.assert_array_equal, params[4], params[2])
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params[2]), jax.tree.leaves(params[1])))


def test_stop_policy_stops_at_the_first_and_bad_values_are_config_errors(tmp_path):
  config = make_tiny_config(tmp_path, **{"train.nonfinite_policy": "stop"})
  fetched = [{"nonfinite_in_a_row": 0}, {"nonfinite_in_a_row": 1}]
  assert "steps 8-8" in faults.violation(fetched, 7, config.train)
  assert faults.violation(fetched[:1], 7, config.train) is None
  config.train.update(nonfinite_policy="skip", max_nonfinite_in_a_row=0)  # 0: never stop
  assert faults.violation([{"nonfinite_in_a_row": 10 ** 6}], 1, config.train) is None
  config.train.nonfinite_policy = "ignore"
  with pytest.raises(ConfigError, match="nonfinite_policy"):
    validate(config, jax.device_count())
