"""Weights & Biases for a training run: on when train.wandb_project is set, on process 0 only.

The W&B run gets the resolved config as its config and, through `metrics.MetricsWriter`, the
same scalars as WORKDIR/metrics.jsonl at the same steps. Its id is kept in WORKDIR/wandb.json,
so rerunning a workdir (resuming after a crash or preemption) continues the same W&B run
instead of starting another. The local W&B files go to $WANDB_DIR if set, else into the
workdir (WORKDIR/wandb/), so an offline run (WANDB_MODE=offline) travels with its checkpoints
and `wandb sync WORKDIR/wandb/offline-run-*` uploads it later.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

from jaxllm import checkpoint
from jaxllm.errors import ConfigError
from jaxllm.preemption import PREEMPTED_EXIT_CODE

STATE_FILE = "wandb.json"
INSTALL_HINT = "pip install 'jaxllm[wandb]' (or pip install wandb)"


def require_installed(train_cfg: Any) -> None:
  """Refuses train.wandb_project without the wandb package: checked before a run starts, so
  a run that cannot log where it was asked to never touches its workdir."""
  if train_cfg.wandb_project and importlib.util.find_spec("wandb") is None:
    raise ConfigError(f"train.wandb_project={train_cfg.wandb_project!r} needs the wandb package, which "
                      f"is not installed: {INSTALL_HINT}; or leave train.wandb_project empty.")


def _saved_id(workdir: str, project: str, entity: str) -> str | None:
  """The W&B run id this workdir logged into before, if it logged into the same project."""
  path = os.path.join(workdir, STATE_FILE)
  try:
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path} cannot be read ({e}); it holds the W&B run id of this workdir's run. "
                      f"Fix it, or delete it to log into a new W&B run.") from e
  if saved.get("project") != project or saved.get("entity", "") != entity:
    return None  # the recipe now logs elsewhere: a new W&B run there
  return saved.get("run_id") or None


def _save_id(workdir: str, run_id: str, project: str, entity: str) -> None:
  checkpoint.write_json(os.path.join(workdir, STATE_FILE), {"run_id": run_id, "project": project, "entity": entity})


class WandbRun:
  """An open W&B run; `metrics.MetricsWriter` logs into it and finishes it."""

  def __init__(self, run: Any):
    self.run = run
    # A resumed W&B run already holds the steps up to run.step - 1. A rerun after a crash
    # resumes from the last checkpoint and logs the steps past it again; W&B would refuse
    # each of them with a warning, so they are left out here (metrics.jsonl rewrites them).
    self.first_new_step = run.step

  @classmethod
  def open(cls, config: Any, workdir: str) -> "WandbRun":
    """Starts the W&B run of `workdir`, or resumes the one it logged into before."""
    import wandb  # pylint: disable=import-outside-toplevel
    t = config.train
    project, entity = t.wandb_project, t.wandb_entity
    run_id = _saved_id(workdir, project, entity)  # None: W&B makes up a new one
    tags = [tag.strip() for tag in t.wandb_tags.split(",") if tag.strip()]
    try:
      run = wandb.init(project=project, entity=entity or None, id=run_id, resume="allow",
                       name=t.wandb_run_name or os.path.basename(os.path.abspath(workdir)),
                       tags=tags or None, config=config.to_dict(),
                       dir=os.environ.get("WANDB_DIR") or workdir)
    except wandb.errors.Error as e:  # no API key, unreachable server, no such entity
      raise ConfigError(f"Weights & Biases could not start the run ({' '.join(str(e).split())}); run "
                        "`wandb login` or set WANDB_API_KEY, or set WANDB_MODE=offline to log locally "
                        "and `wandb sync` later.") from e
    if not getattr(run, "disabled", False):  # WANDB_MODE=disabled: a stand-in id, not a run to resume
      _save_id(workdir, run.id, project, entity)
    return cls(run)

  def log(self, step: int, scalars: dict[str, Any]) -> None:
    if step < self.first_new_step:
      return
    self.run.log({k: v for k, v in scalars.items() if isinstance(v, (int, float))}, step=step)

  def finish(self, exit_code: int = 0) -> None:
    """Ends the run; a non-zero exit_code marks it failed, a preemption as preempted (resumable)."""
    if exit_code == PREEMPTED_EXIT_CODE:
      self.run.mark_preempting()
    self.run.finish(exit_code=exit_code)
