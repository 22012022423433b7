"""One writer for run metrics: a progress bar on the console, DIR/metrics.jsonl, TensorBoard and
Weights & Biases (`jaxllm.wandb_run`): every scalar goes to each of them at the same step."""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

import jax

from jaxllm import progress as progress_lib


def perplexity(loss: float) -> float:
  """exp(loss), reported as inf instead of overflowing."""
  try:
    return math.exp(loss)
  except OverflowError:
    return float("inf")


class MetricsWriter:
  """Writes scalars on the main process only (process 0 of a multi-host run)."""

  def __init__(self, workdir: str, total_steps: int, initial_step: int = 0,
               tensorboard: bool = True, progress: bool = True, wandb: Any = None):
    """`wandb`: an open `wandb_run.WandbRun` (process 0 only); `close` finishes it."""
    self.active = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    self._bar = None
    self._wandb = wandb
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    jsonl_path = os.path.join(workdir, "metrics.jsonl")
    _drop_records_after(jsonl_path, initial_step)
    self._jsonl = open(jsonl_path, "a", encoding="utf-8")
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    # JAXLLM_PROGRESS=0 turns this bar off too; on its own it stays on stdout whether or not
    # that is a terminal, where the quickstart's users and logs have always seen it.
    if progress and progress_lib.setting() is not False:
      from tqdm import tqdm  # pylint: disable=import-outside-toplevel
      self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
                       file=sys.stdout, mininterval=1.0)

  def write(self, step: int, scalars: dict[str, Any]) -> None:
    if not self.active:
      return
    clean = {k: _to_python(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in clean.items():
        if isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, step)
    if self._wandb is not None:
      self._wandb.log(step, clean)
    if self._bar is not None:
      shown = {k: clean[k] for k in ("loss", "eval_loss", "eval_ppl", "tokens_per_s") if k in clean}
      self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
      if "eval_loss" in clean:
        self._bar.write(f"step {step}: eval_loss {clean['eval_loss']:.4f}  eval_ppl {clean['eval_ppl']:.2f}")
      held_out = {k: v for k, v in clean.items() if k.startswith("eval_data/")}  # train.eval_data
      if held_out:
        self._bar.write(f"step {step}: " + "  ".join(f"{k} {v:.4g}" for k, v in held_out.items()))

  def advance(self, step: int) -> None:
    if self._bar is not None:
      self._bar.n = step
      self._bar.refresh()

  def text(self, message: str) -> None:
    """A line of text to the console (above the progress bar)."""
    if not self.active:
      return
    if self._bar is not None:
      self._bar.write(message)
    else:
      print(message, flush=True)

  def close(self, exit_code: int = 0) -> None:
    """Flushes and closes every sink; `exit_code` is the run's (W&B marks a non-zero one failed)."""
    if self._bar is not None:
      self._bar.close()
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
    if self._wandb is not None:  # last: finishing may wait on the network
      self._wandb.finish(exit_code)
      self._wandb = None


def read_records(path: str) -> list[dict[str, Any]]:
  """The records of a metrics.jsonl, in order; a line cut short by a crash is skipped."""
  records = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue
      if isinstance(record, dict) and "step" in record:
        records.append(record)
  return records


def _drop_records_after(path: str, step: int) -> None:
  """Keeps one timeline in metrics.jsonl: a run resumed from the checkpoint at `step` after a
  crash logs the later steps again, so the records the crashed run wrote past it go."""
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    lines = f.readlines()
  kept = [l for l in lines if l.endswith("\n") and 0 <= _step_of(l) <= step]
  if len(kept) == len(lines):
    return
  with open(f"{path}.tmp", "w", encoding="utf-8") as f:
    f.writelines(kept)
  os.replace(f"{path}.tmp", path)


def _step_of(line: str) -> int:
  try:
    return int(json.loads(line).get("step", 0))
  except (ValueError, AttributeError):
    return -1  # a line cut short by the crash


def _to_python(v: Any) -> Any:
  if hasattr(v, "item"):
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return v if math.isnan(v) else (float("inf") if v > 0 else float("-inf"))
  return v
