"""Progress bars: on stderr when JAXLLM_PROGRESS=1 (or on a terminal), never into stdout, none when off."""

import io
import os
import sys

import pytest

from jaxllm import progress
from jaxllm import tokenizer as tok_lib
from jaxllm.metrics import MetricsWriter
from tests.helpers import write_corpus


class _Terminal(io.StringIO):
  def isatty(self):
    return True


@pytest.mark.parametrize("env, tty, expected", [
    (None, False, False), (None, True, True), ("1", False, True), ("0", True, False),
    ("off", True, False), ("on", False, True)])
def test_bars_follow_jaxllm_progress_else_the_terminal(monkeypatch, env, tty, expected):
  if env is None:
    monkeypatch.delenv(progress.ENV, raising=False)
  else:
    monkeypatch.setenv(progress.ENV, env)
  monkeypatch.setattr(sys, "stderr", _Terminal() if tty else io.StringIO())
  assert progress.enabled() is expected
  list(progress.track(range(3), desc="counting"))
  assert ("counting" in sys.stderr.getvalue()) is expected


def test_the_tokenizer_command_draws_its_bar_on_stderr_only_when_on(tmp_path, capsys, monkeypatch):
  corpus = write_corpus(str(tmp_path / "corpus.jsonl"), num_docs=50)
  outputs = {}
  for setting in ("1", "0"):
    monkeypatch.setenv(progress.ENV, setting)
    out = str(tmp_path / f"tok{setting}")
    assert tok_lib.main(["train", "--vocab-size", "300", "--out", out, "--source", "jsonl", "--path", corpus]) == 0
    outputs[setting] = capsys.readouterr()
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
  assert "tokenizer: reading documents" in outputs["1"].err and "0/50" in outputs["1"].err  # total known
  assert outputs["0"].err == ""
  for captured in outputs.values():  # stdout is the command's result line, bar or not
    assert captured.out.startswith("trained a bpe tokenizer") and "reading documents" not in captured.out


def test_jaxllm_progress_0_also_turns_the_training_step_bar_off(tmp_path, capsys, monkeypatch):
  for setting, shown in (("", True), ("0", False)):
    monkeypatch.setenv(progress.ENV, setting)
    writer = MetricsWriter(str(tmp_path / f"run{setting}"), total_steps=10, tensorboard=False, progress=True)
    writer.write(5, {"loss": 1.5})
    writer.advance(5)
    writer.close()
    assert ("5/10" in capsys.readouterr().out) is shown
