"""Pictures of runs: a run's own loss_curve.png and the command that overlays several runs."""

import json
import os

import pytest

from jaxllm import plot
from tests.helpers import run_cli


def _write_run(workdir, losses, eval_every=2, lr=1e-3):
  """A metrics.jsonl as training writes it: a record per log step, eval keys on eval steps."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "metrics.jsonl"), "w", encoding="utf-8") as f:
    for step, loss in enumerate(losses, start=1):
      record = {"step": step, "loss": loss, "lr": lr * step / len(losses), "grad_norm": 1.0}
      if step % eval_every == 0:
        record.update(eval_loss=loss + 0.5, eval_ppl=float("inf") if step == 2 else 3.0)
      f.write(json.dumps(record) + "\n")
    f.write('{"step": 99, "lo')  # a crash cut the last line short
  return str(workdir)


def _lines(figure):
  loss_ax, lr_ax = figure.axes
  return ({l.get_label(): l for l in loss_ax.get_lines()}, {l.get_label(): l for l in lr_ax.get_lines()})


def test_a_run_draws_train_and_eval_loss_and_lr_against_step(tmp_path):
  workdir = _write_run(tmp_path / "run", [4.0, 3.0, 2.5, 2.0])
  path = plot.write_loss_curve(workdir)
  assert path == os.path.join(workdir, "loss_curve.png")
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  loss_lines, lr_lines = _lines(plot.plot_runs([workdir]))
  assert list(loss_lines["run train loss"].get_xdata()) == [1, 2, 3, 4]
  assert list(loss_lines["run train loss"].get_ydata()) == [4.0, 3.0, 2.5, 2.0]
  assert list(loss_lines["run eval loss"].get_xdata()) == [2, 4]
  assert list(loss_lines["run eval loss"].get_ydata()) == [3.5, 2.5]
  assert list(lr_lines["run lr"].get_ydata()) == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])


def test_plot_command_overlays_two_runs(tmp_path):
  a = _write_run(tmp_path / "baseline", [4.0, 3.0, 2.0, 1.5])
  b = _write_run(tmp_path / "bigger_lr", [4.0, 2.5, 1.8, 1.2], lr=3e-3)
  figure = plot.plot_runs([a, b])
  loss_lines, lr_lines = _lines(figure)
  assert sorted(loss_lines) == ["baseline eval loss", "baseline train loss",
                                "bigger_lr eval loss", "bigger_lr train loss"]
  assert sorted(lr_lines) == ["baseline lr", "bigger_lr lr"]
  # one colour per run, shared by its train and eval lines
  assert loss_lines["baseline train loss"].get_color() == loss_lines["baseline eval loss"].get_color()
  assert loss_lines["baseline train loss"].get_color() != loss_lines["bigger_lr train loss"].get_color()
  assert plot.run_labels([str(tmp_path / "x" / "run"), str(tmp_path / "y" / "run")]) == [
      str(tmp_path / "x" / "run"), str(tmp_path / "y" / "run")]  # same names: the paths tell them apart

  out = tmp_path / "pictures" / "compare.png"
  result = run_cli("jaxllm.plot", a, b, "--out", str(out))
  assert result.returncode == 0, result.stderr
  assert out.read_bytes()[:4] == b"\x89PNG"
  assert result.stderr == ""  # no font-cache or backend chatter


@pytest.mark.parametrize("case, message", [
    ("missing", "is not a directory"),
    ("empty", "has no metrics.jsonl"),
])
def test_plot_command_bad_input_is_one_error_line(tmp_path, case, message):
  good = _write_run(tmp_path / "good", [3.0, 2.0])
  bad = tmp_path / "bad"
  if case == "empty":
    bad.mkdir()
  out = tmp_path / "out.png"
  result = run_cli("jaxllm.plot", good, str(bad), "--out", str(out))
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
  assert not out.exists()


def test_a_drawing_error_at_the_end_of_a_run_is_a_warning(tmp_path, capsys):
  plot.write_loss_curve_or_warn(str(tmp_path / "never_logged"))
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("warning: could not draw") and "loss_curve.png" in err[0]
