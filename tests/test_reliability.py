"""Reliability of real training processes: SIGTERM (preemption), SIGKILL (crash) and exact resume.

Every run here is a separate `python -m jaxllm.train` process on one CPU device, as a
scheduler would start it. The learning rate is constant after warmup (min_lr = lr), so
a run's losses do not depend on train.steps and a shortened rerun is comparable step
by step with the long one.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Callable

import pytest

from jaxllm.preemption import PREEMPTED_EXIT_CODE
from tests.helpers import REPO_ROOT, make_tiny_config

LONG = 1000  # steps the interrupted runs are configured for; they never get there


def write_config_file(config, path) -> str:
  """A config file (`get_config()`) holding `config`, for `--config`."""
  with open(path, "w", encoding="utf-8") as f:
    f.write("import ml_collections\n\n\ndef get_config():\n"
            f"  return ml_collections.ConfigDict({config.to_dict()!r})\n")
  return str(path)


def train_env(devices: int = 1, **extra) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env.update(extra)
  return env


def start_train(config_path: str, workdir: str, *overrides: str, env: dict | None = None) -> subprocess.Popen:
  return subprocess.Popen(
      [sys.executable, "-m", "jaxllm.train", "--config", config_path, "--workdir", workdir, *overrides],
      cwd=REPO_ROOT, env=env or train_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.endswith("\n")]


def wait_for(proc: subprocess.Popen, workdir: str, done: Callable[[list[dict]], bool],
             timeout: float = 180) -> int:
  """Waits until `done(records of metrics.jsonl)`; returns the last logged step."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    records = read_metrics(workdir)
    if records and done(records):
      return records[-1]["step"]
    if proc.poll() is not None:
      raise AssertionError(f"training exited early ({proc.returncode}): {proc.communicate()[1][-2000:]}")
    time.sleep(0.02)
  proc.kill()
  raise AssertionError(f"training did not get there in {timeout}s")


def finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str, str]:
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, out, err


def checkpoint_steps(workdir: str) -> list[int]:
  """The complete checkpoints: orbax renames a step's directory to `<step>` once it is written."""
  path = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


def losses(workdir: str) -> dict[int, float]:
  records = read_metrics(workdir)
  # One timeline: a resumed run drops what the crashed run logged past its checkpoint.
  assert [r["step"] for r in records] == list(range(1, len(records) + 1))
  return {r["step"]: r["loss"] for r in records}


@pytest.fixture(scope="module")
def run_config(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("reliability")
  config = make_tiny_config(tmp, **{
      "train.steps": LONG, "train.log_every": 1, "train.checkpoint_every": 4, "train.eval_steps": 0,
      "train.peak_flops": 1e12, "optim.lr": 3e-3, "optim.min_lr": 3e-3, "optim.warmup_steps": 2})
  return write_config_file(config, tmp / "config.py")


def test_sigkill_and_sigterm_resume_bit_identically(run_config, tmp_path):
  workdir = str(tmp_path / "run")

  # Leg 1: killed outright (no chance to save) several steps past a complete checkpoint.
  # Its records up to the kill are the losses of an unbroken run.
  proc = start_train(run_config, workdir)
  killed_at = wait_for(proc, workdir, lambda r: checkpoint_steps(workdir) and
                       r[-1]["step"] >= checkpoint_steps(workdir)[-1] + 6)
  proc.send_signal(signal.SIGKILL)
  assert finish(proc)[0] == -signal.SIGKILL
  unbroken = losses(workdir)
  assert sorted(unbroken) == list(range(1, killed_at + 1))
  resume_from = checkpoint_steps(workdir)[-1]
  assert resume_from <= killed_at - 6
  # A save that was cut off leaves a temporary directory behind; it must never be loaded.
  partial = os.path.join(workdir, "checkpoints", f"{killed_at + 40}.orbax-checkpoint-tmp-1700000000000")
  os.makedirs(os.path.join(partial, "state"))
  with open(os.path.join(partial, "state", "_METADATA"), "w", encoding="utf-8") as f:
    f.write("{truncated")

  # Leg 2: the same command resumes from the last complete checkpoint; SIGTERM at once.
  proc = start_train(run_config, workdir)
  # (metrics.jsonl is cut back to the checkpoint, then grows again)
  wait_for(proc, workdir, lambda r: resume_from < r[-1]["step"] < killed_at)
  proc.send_signal(signal.SIGTERM)
  code, out, err = finish(proc)
  assert code == PREEMPTED_EXIT_CODE, err[-2000:]
  assert f"start at step {resume_from} of {LONG}" in out
  assert not os.path.exists(partial), "the partial save was not cleaned up"
  preempted_at = read_metrics(workdir)[-1]["step"]
  # The current step was finished, logged and checkpointed before exiting.
  assert checkpoint_steps(workdir)[-1] == preempted_at
  assert f"saved a checkpoint at step {preempted_at}" in err
  assert preempted_at < killed_at, "SIGTERM came too late for this test; widen the 6-step margin"

  # Leg 3: the same command resumes after the preemption (ending where leg 1 was killed).
  code, out, err = finish(start_train(run_config, workdir, f"--config.train.steps={killed_at}"))
  assert code == 0, err[-2000:]
  assert f"start at step {preempted_at} of {killed_at}" in out
  # Every step, whether run once or again after the kill, has the unbroken run's exact loss.
  assert losses(workdir) == unbroken


def test_quickstart_as_it_ships_resumes_exactly_after_sigkill_and_sigterm(tmp_path):
  # The quickstart's own data options (row_shuffle 1024, stdlib source, val split): a checkpoint
  # inside the first shuffle window once resumed to other batches. Only the length changes.
  quickstart = os.path.join(REPO_ROOT, "configs", "quickstart.py")
  args = ("--config.train.steps=30", "--config.train.log_every=1", "--config.train.eval_every=1000",
          "--config.train.checkpoint_every=10", "--config.train.sample_prompt=",
          "--config.train.progress=False", "--config.train.tensorboard=False")
  unbroken = str(tmp_path / "unbroken")
  code, _, err = finish(start_train(quickstart, unbroken, *args), timeout=600)
  assert code == 0, err[-3000:]
  expected = losses(unbroken)
  # One interrupted run takes both signals in turn (SIGTERM: preemption save at once; SIGKILL:
  # back to the last periodic checkpoint), each followed by a resume: four starts, not five.
  workdir = str(tmp_path / "interrupted")
  # The tokenizer is deterministic; reusing it saves retraining it.
  shutil.copytree(os.path.join(unbroken, "tokenizer"), os.path.join(workdir, "tokenizer"))
  proc = start_train(quickstart, workdir, *args)
  for sig, stop_after in ((signal.SIGTERM, 13), (signal.SIGKILL, 23)):
    wait_for(proc, workdir, lambda r, n=stop_after: r[-1]["step"] >= n, timeout=600)
    proc.send_signal(sig)
    code, _, err = finish(proc, timeout=300)
    assert code in (-signal.SIGKILL, PREEMPTED_EXIT_CODE), err[-2000:]
    proc = start_train(quickstart, workdir, *args)
  code, _, err = finish(proc, timeout=600)
  assert code == 0, err[-3000:]
  assert losses(workdir) == expected
