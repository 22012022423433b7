"""The same training command as 2 jax.distributed processes (2 CPU devices each) equals 1 process with 4.

data.num_shards=2 in both runs makes the global batch independent of the process
count: one process reads both logical shards, or each of two processes reads one.
"""

import json
import os
import socket

import numpy as np
import pytest

from tests.helpers import make_tiny_config
from tests.test_reliability import finish, start_train, train_env, write_config_file


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def losses(workdir) -> tuple[np.ndarray, np.ndarray]:
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  return (np.array([r["loss"] for r in records]),
          np.array([r["eval_loss"] for r in records if "eval_loss" in r]))


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("multiprocess")
  config = make_tiny_config(tmp, **{
      "train.steps": 3, "train.log_every": 1, "train.eval_every": 3, "train.eval_steps": 1,
      "train.checkpoint_every": 3, "train.peak_flops": 1e12, "data.num_shards": 2})
  return write_config_file(config, tmp / "config.py")


def test_two_processes_match_one_process(config_file, tmp_path):
  single = str(tmp_path / "single")
  code, out, err = finish(start_train(config_file, single, env=train_env(devices=4)))
  assert code == 0, err[-3000:]
  assert "'data': 4" in out

  multi = str(tmp_path / "multi")
  port = free_port()
  procs = [start_train(config_file, multi, env=train_env(
      devices=2, JAXLLM_COORDINATOR=f"127.0.0.1:{port}", JAXLLM_NUM_PROCESSES="2",
      JAXLLM_PROCESS_ID=str(i))) for i in range(2)]
  results = [finish(p, timeout=300) for p in procs]
  for i, (code, _, err) in enumerate(results):
    assert code == 0, f"process {i}: {err[-3000:]}"
  assert "'data': 4" in results[0][1]  # one mesh over both processes' devices
  assert "start at step" not in results[1][1]  # only process 0 reports

  single_loss, single_eval = losses(single)
  multi_loss, multi_eval = losses(multi)
  assert len(multi_loss) == 3 and len(multi_eval) == 1  # one writer: no step logged twice
  np.testing.assert_allclose(multi_loss, single_loss, rtol=1e-5)
  np.testing.assert_allclose(multi_eval, single_eval, rtol=1e-5)
  assert sorted(os.listdir(os.path.join(multi, "checkpoints"))) == ["3"]
