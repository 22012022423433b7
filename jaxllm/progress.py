"""Progress bars for long commands (tokenizer training, conversion, generation, evaluation).

One helper so every command's bar looks and behaves alike: on stderr (stdout stays the
command's result), redrawn at most once a second, gone when done, and off when stderr is
not a terminal (CI logs, pipes). JAXLLM_PROGRESS=1 forces bars on, JAXLLM_PROGRESS=0 off
(that one also silences training's step bar, which lives in metrics.py). Imports nothing
heavy, so any module may use it:

  for batch in progress.track(batches, desc="perplexity", unit="batch"):
    ...
  with progress.bar(total=num_tensors, desc="writing", unit="tensor") as b:
    b.update(1)
"""

from __future__ import annotations

import os
import sys
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
ENV = "JAXLLM_PROGRESS"
_ON, _OFF = ("1", "true", "on", "yes"), ("0", "false", "off", "no")


def setting() -> bool | None:
  """What JAXLLM_PROGRESS says: True (force on), False (force off) or None (unset: decide by the terminal)."""
  value = os.environ.get(ENV, "").strip().lower()
  if value in _ON:
    return True
  if value in _OFF:
    return False
  return None


def enabled() -> bool:
  """Whether bars are drawn: JAXLLM_PROGRESS if set, else whether stderr is a terminal."""
  forced = setting()
  if forced is not None:
    return forced
  return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


def on_terminal() -> bool:
  """Whether a library's own bars (tokenizers', transformers') should show: they draw only on a
  terminal (into a pipe, tokenizers prints blank lines), so only when `enabled()` there."""
  return enabled() and hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


def bar(total: int | None = None, desc: str = "", unit: str = "it", disable: bool = False):
  """A tqdm bar (update(n), set_postfix, close; a context manager), silent when not `enabled()`
  or when `disable` (e.g. while the command streams text to the same terminal)."""
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, mininterval=1.0,
              dynamic_ncols=True, disable=disable or not enabled(), leave=False)


def write(text: str, file=None) -> None:
  """Prints a line of results (stdout by default) without tearing a bar that is being drawn."""
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  tqdm.write(text, file=file or sys.stdout)
  (file or sys.stdout).flush()


def track(items: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it") -> Iterator[T]:
  """Yields `items`, advancing a bar by one per item (total: len(items) when it has one)."""
  if total is None and hasattr(items, "__len__"):
    total = len(items)  # type: ignore[arg-type]
  with bar(total, desc, unit) as b:
    for item in items:
      yield item
      b.update(1)
