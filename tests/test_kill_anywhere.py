"""SIGKILL a real training (or conversion) process at the moments that matter, rerun the same
command, and check that nothing half-done is ever taken for done.

The process kills itself at a named moment (jaxllm/killpoints.py, `JAXLLM_KILL_AT`): a kill
timed from outside cannot land "while the checkpoint is being written" on a busy machine.
After each kill the rerun must finish with exit 0, log every step exactly once with the
losses of an unbroken run, and never load a half-written checkpoint or tokenizer.
"""

import json
import os
import signal

import numpy as np
import pytest

from tests.helpers import make_tiny_config, run_cli
from tests.test_reliability import finish, read_metrics, start_train, train_env, write_config_file

STEPS = 12  # checkpoints at 4, 8, 12; evals at 4, 8, 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("kill")
  config = make_tiny_config(tmp, **{
      "train.steps": STEPS, "train.log_every": 1, "train.checkpoint_every": 4, "train.eval_every": 4,
      "train.eval_steps": 2, "train.sample_prompt": "the cat", "train.sample_tokens": 4,
      "train.peak_flops": 1e12, "optim.lr": 3e-3, "optim.min_lr": 3e-3, "optim.warmup_steps": 2})
  config_file = write_config_file(config, tmp / "config.py")
  unbroken = str(tmp / "unbroken")
  code, out, err = finish(start_train(config_file, unbroken), timeout=300)
  assert code == 0, err[-3000:]
  return config_file, records_by_step(unbroken)


def records_by_step(workdir):
  records = read_metrics(workdir)
  steps = [r["step"] for r in records]
  assert steps == sorted(set(steps)), f"a step logged twice or out of order: {steps}"
  return {r["step"]: r for r in records}


@pytest.mark.parametrize("moment", ["tokenizer.save", "train.compile", "checkpoint.write@2", "eval@3",
                                    "sample"])
def test_killed_then_rerun_equals_unbroken(setup, tmp_path, moment):
  config_file, unbroken = setup
  workdir = str(tmp_path / "run")
  code, _, err = finish(start_train(config_file, workdir, env=train_env(JAXLLM_KILL_AT=moment)), timeout=300)
  assert code == -signal.SIGKILL, f"not killed at {moment}: {code} {err[-2000:]}"
  logged_before = max(records_by_step(workdir), default=0)

  code, out, err = finish(start_train(config_file, workdir), timeout=300)
  assert code == 0, err[-3000:]
  start = int(out.split("start at step ")[1].split()[0])
  assert start <= logged_before
  if moment in ("tokenizer.save", "train.compile"):
    assert start == 0
  if moment == "sample":  # the final checkpoint was complete before the sample began
    assert start == STEPS
  assert "--- sample ---" in out
  resumed = records_by_step(workdir)
  assert sorted(resumed) == list(range(1, STEPS + 1))
  for step, record in resumed.items():
    np.testing.assert_allclose(record["loss"], unbroken[step]["loss"], rtol=1e-6, err_msg=f"step {step}")
    if "eval_loss" in unbroken[step]:
      np.testing.assert_allclose(record["eval_loss"], unbroken[step]["eval_loss"], rtol=1e-6)
  assert not os.path.exists(os.path.join(workdir, "tokenizer.tmp"))
  leftovers = [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if not d.isdigit()]
  assert not leftovers, leftovers


def test_a_conversion_killed_mid_write_leaves_no_output_and_reruns(tmp_path):
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from jaxllm.tokenizer import train_bpe  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      n_embd=32, n_layer=2, n_head=4, vocab_size=320, n_positions=32, bos_token_id=0, eos_token_id=0))
  hf_dir, jx_dir, out_dir = str(tmp_path / "hf"), str(tmp_path / "jx"), str(tmp_path / "back")
  model.save_pretrained(hf_dir)
  train_bpe(["the cat sat on a mat", "dogs ran far away"], 300).save_pretrained(hf_dir)
  for args, out in ((("from-hf", hf_dir, jx_dir), jx_dir), (("to-hf", jx_dir, out_dir), out_dir)):
    killed = run_cli("jaxllm.convert", *args, env={"JAXLLM_KILL_AT": "convert.write"}, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not os.path.exists(out), "a half-written output sits where a complete one belongs"
    rerun = run_cli("jaxllm.convert", *args, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert not os.path.exists(out + ".partial")
  with open(os.path.join(out_dir, "config.json"), encoding="utf-8") as f:
    assert json.load(f)["n_layer"] == 2
  reloaded = transformers.GPT2LMHeadModel.from_pretrained(out_dir)
  for name, tensor in model.state_dict().items():
    if name in reloaded.state_dict():
      torch.testing.assert_close(reloaded.state_dict()[name], tensor, rtol=0, atol=0)
