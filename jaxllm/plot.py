"""Pictures of runs: train and eval loss and the learning rate against step, from metrics.jsonl.

  python -m jaxllm.plot WORKDIR [WORKDIR ...] --out FILE.png

Every training run also draws its own WORKDIR/loss_curve.png when it ends. Several workdirs
share one figure, one colour per run, so two recipes can be compared at a glance. Drawing is
headless (matplotlib's Agg canvas, no pyplot and no display).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from typing import Any

from jaxllm.metrics import read_records

LOSS_CURVE = "loss_curve.png"  # the picture a run leaves in its workdir


class PlotError(ValueError):
  """A workdir that cannot be drawn (missing, or no metrics yet); the message says which."""


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The records of WORKDIR/metrics.jsonl, in order; a line cut short by a crash is skipped."""
  if not os.path.isdir(workdir):
    raise PlotError(f"{workdir} is not a directory; pass a training workdir.")
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise PlotError(f"{workdir} has no metrics.jsonl; is it a training workdir, and has the run "
                    "logged a step yet?")
  records = read_records(path)
  if not records:
    raise PlotError(f"{path} holds no metrics yet.")
  return records


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of the records that have `key`; non-finite values become gaps."""
  steps, values = [], []
  for r in records:
    if isinstance(r.get(key), (int, float)):
      steps.append(r["step"])
      values.append(r[key] if math.isfinite(r[key]) else math.nan)
  return steps, values


def run_labels(workdirs: list[str]) -> list[str]:
  """Each workdir's name, or its path where two runs share a name."""
  names = [os.path.basename(os.path.normpath(w)) for w in workdirs]
  return [n if names.count(n) == 1 else os.path.normpath(w) for n, w in zip(names, workdirs)]


def plot_runs(workdirs: list[str], labels: list[str] | None = None):
  """A matplotlib Figure: loss (train solid, eval dashed with dots) above the learning rate.

  Lines are labelled "LABEL train loss", "LABEL eval loss" and "LABEL lr".
  """
  runs = [read_metrics(w) for w in workdirs]  # every workdir checked before anything is drawn
  labels = labels or run_labels(workdirs)
  figure = _new_figure()
  loss_ax, lr_ax = figure.subplots(2, 1, sharex=True, height_ratios=(3, 1))
  for i, (records, label) in enumerate(zip(runs, labels)):
    color = f"C{i % 10}"
    loss_ax.plot(*_series(records, "loss"), color=color, label=f"{label} train loss")
    eval_steps, eval_losses = _series(records, "eval_loss")
    if eval_steps:
      loss_ax.plot(eval_steps, eval_losses, color=color, linestyle="--", marker="o", markersize=3,
                   label=f"{label} eval loss")
    lr_ax.plot(*_series(records, "lr"), color=color, label=f"{label} lr")
  loss_ax.set_ylabel("loss")
  loss_ax.grid(alpha=0.3)
  loss_ax.legend(fontsize="small")
  loss_ax.set_title(labels[0] if len(labels) == 1 else " vs ".join(labels), fontsize="medium")
  lr_ax.set_ylabel("learning rate")
  lr_ax.set_xlabel("step")
  lr_ax.grid(alpha=0.3)
  lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
  return figure


def save(figure: Any, path: str) -> str:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  root, ext = os.path.splitext(os.path.basename(path))
  tmp = os.path.join(directory, f".{root}.tmp{ext or '.png'}")  # the extension picks the format
  figure.savefig(tmp, dpi=110)
  os.replace(tmp, path)  # a reader never sees half a picture
  return path


def write_loss_curve(workdir: str) -> str:
  """Draws WORKDIR/loss_curve.png from WORKDIR/metrics.jsonl; returns its path."""
  return save(plot_runs([workdir]), os.path.join(workdir, LOSS_CURVE))


def write_loss_curve_or_warn(workdir: str) -> None:
  """The end of a training run: the picture is a convenience, so any failure to draw it is a
  one-line warning on stderr, never a failed run."""
  try:
    write_loss_curve(workdir)
  except Exception as e:  # pylint: disable=broad-except
    detail = " ".join(str(e).split()) or type(e).__name__
    print(f"warning: could not draw {os.path.join(workdir, LOSS_CURVE)}: {detail}", file=sys.stderr,
          flush=True)


def _new_figure():
  # matplotlib announces building its font cache on first use at WARNING; that is not for the user.
  logging.getLogger("matplotlib").setLevel(logging.ERROR)
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  figure = Figure(figsize=(8, 6), layout="constrained")
  FigureCanvasAgg(figure)
  return figure


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m jaxllm.plot",
                                   description="Draw train/eval loss and learning rate of runs.")
  parser.add_argument("workdirs", nargs="+", metavar="WORKDIR", help="training workdirs to overlay")
  parser.add_argument("--out", required=True, metavar="FILE.png", help="where to write the picture")
  parser.add_argument("--label", action="append", default=None, metavar="NAME",
                      help="a name per workdir, in order (default: the workdirs' names)")
  args = parser.parse_args(argv)
  if args.label and len(args.label) != len(args.workdirs):
    print(f"error: {len(args.label)} --label for {len(args.workdirs)} workdirs; give one per workdir.",
          file=sys.stderr, flush=True)
    return 2
  try:
    save(plot_runs(args.workdirs, args.label), args.out)
  except (PlotError, OSError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
