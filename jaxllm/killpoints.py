"""Named moments of a run at which a crash test can SIGKILL the process, exactly there.

`JAXLLM_KILL_AT=NAME` (or `NAME@N`: the N-th time it is reached) makes the process kill
itself at that moment; unset, `reached` costs one dictionary lookup. Timing a kill from
outside cannot hit "while the checkpoint is being written" or "during the first compile"
reliably on a busy machine; a kill from inside can, and it is as abrupt as any other
SIGKILL: no handler, no flush, no cleanup runs.

The moments (see docs/reliability.md for what a rerun does after each):
  tokenizer.save      the trained tokenizer is written to its temporary directory, not yet renamed
  train.compile       the first train step is about to be traced and compiled
  checkpoint.write    an asynchronous save has started and is still being written
  eval                an evaluation has started, its first batch dispatched
  sample              training is done and checkpointed; the final sample is about to decode
  convert.write       a converted model is written in its temporary directory, not yet renamed
"""

from __future__ import annotations

import collections
import os
import signal

ENV = "JAXLLM_KILL_AT"
_counts: collections.Counter = collections.Counter()


def reached(name: str) -> None:
  spec = os.environ.get(ENV)
  if not spec:
    return
  target, _, nth = spec.partition("@")
  if target != name:
    return
  _counts[name] += 1
  if _counts[name] == int(nth or 1):
    os.kill(os.getpid(), signal.SIGKILL)
