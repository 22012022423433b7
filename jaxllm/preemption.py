"""Preemption: a SIGTERM becomes a checkpoint at a step boundary and a distinct exit status.

TPU VMs and SLURM (`--signal`) announce preemption with SIGTERM some seconds to
minutes before the kill. The loop asks `Watcher.reached(step)` after every step;
once it says yes, the loop saves (train state + data iterator), waits until the
checkpoint is durable and exits with PREEMPTED_EXIT_CODE. Rerunning the same
command resumes from that checkpoint.

One process: a Python signal handler sets a flag, checked between steps (no
device sync). Several processes (jax.distributed): every process must stop at
the same step, so the decision comes from JAX's preemption sync manager, which
hears the signal on any process and agrees on the step with all of them.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

# EX_TEMPFAIL from sysexits.h: "temporary failure, retry later". Distinct from 0 (done),
# 1 (crash), 2 (bad input) and 3 (diverged), and from 143, which a process killed by SIGTERM
# before it could save also reports; launchers requeue the job on 75.
PREEMPTED_EXIT_CODE = 75


class Preempted(Exception):
  """Raised by the CLI's loop after the preemption checkpoint is durable."""

  def __init__(self, step: int):
    super().__init__(f"preempted: saved a checkpoint at step {step}; rerun the same command to resume.")
    self.step = step


def _multiprocess() -> bool:
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  return distributed.global_state.client is not None


class Watcher:
  """Listens for SIGTERM (and SIGINT if asked) while training; a context manager."""

  def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
    self._signals = signals
    self._previous: dict[int, Any] = {}
    self._received: int | None = None
    self._multiprocess = False

  def __enter__(self) -> "Watcher":
    self._multiprocess = _multiprocess()
    # Python only lets the main thread install handlers; elsewhere (a library caller's
    # thread) the process's own SIGTERM handling stays as it is.
    if not self._multiprocess and threading.current_thread() is threading.main_thread():
      for sig in self._signals:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    self._received = signum

  def reached(self, step: int) -> bool:
    """True once every process should save and stop after `step` (call after every step)."""
    if self._multiprocess:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      return multihost_utils.reached_preemption_sync_point(step)
    return self._received is not None
