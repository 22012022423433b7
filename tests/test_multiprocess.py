"""The same training command as 2 jax.distributed processes (2 CPU devices each) equals 1 process with 4,
a SIGTERM to one of them stops both at the same step with a checkpoint, and that checkpoint resumes
on 1 process (elastic resume).

data.num_shards=2 in both runs makes the global batch independent of the process
count: one process reads both logical shards, or each of two processes reads one.
"""

import json
import os
import signal
import socket

import numpy as np
import pytest

from jaxllm.preemption import PREEMPTED_EXIT_CODE
from tests.helpers import make_tiny_config
from tests.test_reliability import LONG, finish, start_train, train_env, wait_for, write_config_file


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def losses(workdir) -> np.ndarray:
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == list(range(1, len(records) + 1))  # one writer, no repeats
  return np.array([r["loss"] for r in records])


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("multiprocess")
  # Constant lr after warmup, so a run cut short at step p equals a run configured for p steps.
  config = make_tiny_config(tmp, **{
      "train.steps": LONG, "train.log_every": 1, "train.eval_steps": 0, "train.checkpoint_every": 100,
      "train.peak_flops": 1e12, "data.num_shards": 2, "optim.min_lr": 3e-3, "optim.lr": 3e-3})
  return write_config_file(config, tmp / "config.py")


def test_two_processes_match_one_process_and_stop_together(config_file, tmp_path):
  multi = str(tmp_path / "multi")
  port = free_port()
  procs = [start_train(config_file, multi, env=train_env(
      devices=2, JAXLLM_COORDINATOR=f"127.0.0.1:{port}", JAXLLM_NUM_PROCESSES="2",
      JAXLLM_PROCESS_ID=str(i))) for i in range(2)]
  wait_for(procs[0], multi, lambda r: r[-1]["step"] >= 3)
  # Preemption reaches one host first: both must save the same step and exit.
  procs[1].send_signal(signal.SIGTERM)
  results = [finish(p, timeout=300) for p in procs]
  for i, (code, _, err) in enumerate(results):
    assert code == PREEMPTED_EXIT_CODE, f"process {i}: {err[-3000:]}"
  assert "'data': 4" in results[0][1]  # one mesh over both processes' devices
  assert "start at step" not in results[1][1]  # only process 0 reports
  multi_loss = losses(multi)
  stopped_at = len(multi_loss)
  assert [f"saved a checkpoint at step {stopped_at}" in err for _, _, err in results] == [True, True]
  assert sorted(os.listdir(os.path.join(multi, "checkpoints"))) == [str(stopped_at)]

  single = str(tmp_path / "single")
  code, out, err = finish(start_train(config_file, single, f"--config.train.steps={stopped_at}",
                                      env=train_env(devices=4)))
  assert code == 0, err[-3000:]
  assert "'data': 4" in out
  np.testing.assert_allclose(multi_loss, losses(single), rtol=1e-5)


def test_two_process_checkpoint_resumes_on_one_process(config_file, tmp_path):
  # Rows shuffled in windows that straddle the checkpoint, two logical shards (one per process at
  # first): the single process must take each shard's position from the checkpoint.
  shuffle, saved_at, total = "--config.data.row_shuffle=8", 5, 9
  workdir = str(tmp_path / "elastic")
  port = free_port()
  procs = [start_train(config_file, workdir, shuffle, f"--config.train.steps={saved_at}", env=train_env(
      devices=2, JAXLLM_COORDINATOR=f"127.0.0.1:{port}", JAXLLM_NUM_PROCESSES="2",
      JAXLLM_PROCESS_ID=str(i))) for i in range(2)]
  for i, (code, _, err) in enumerate(finish(p, timeout=300) for p in procs):
    assert code == 0, f"process {i}: {err[-3000:]}"
  code, out, err = finish(start_train(config_file, workdir, shuffle, f"--config.train.steps={total}",
                                      env=train_env(devices=4)))
  assert code == 0, err[-3000:]
  assert f"start at step {saved_at} of {total}" in out

  unbroken = str(tmp_path / "unbroken")
  code, _, err = finish(start_train(config_file, unbroken, shuffle, f"--config.train.steps={total}",
                                    env=train_env(devices=4)))
  assert code == 0, err[-3000:]
  np.testing.assert_allclose(losses(workdir), losses(unbroken), rtol=1e-5)


def test_incomplete_or_bad_environment_is_a_config_error():
  from jaxllm import distributed  # pylint: disable=import-outside-toplevel
  from jaxllm.config import ConfigError  # pylint: disable=import-outside-toplevel
  assert distributed.initialize({}) is False  # no job described: one process, nothing touched
  for env, message in [({"JAXLLM_COORDINATOR": "127.0.0.1:1"}, "JAXLLM_NUM_PROCESSES must be"),
                       ({"JAXLLM_COORDINATOR": "127.0.0.1:1", "JAXLLM_NUM_PROCESSES": "two",
                         "JAXLLM_PROCESS_ID": "0"}, "'two' is not an integer"),
                       ({"JAXLLM_COORDINATOR": "127.0.0.1:1", "JAXLLM_NUM_PROCESSES": "2",
                         "JAXLLM_PROCESS_ID": "2"}, "must be in 0..1")]:
    with pytest.raises(ConfigError, match=message):
      distributed.initialize(env)
