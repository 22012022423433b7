"""Progress bars for long commands (tokenizer training, conversion, generation, evaluation).

One helper so every command's bar looks and behaves alike: on stderr (stdout stays the
command's result), redrawn at most once a second, and off when stderr is not a terminal
(CI logs, pipes) or when JAXLLM_PROGRESS=0. Training's own step bar lives in metrics.py.
"""

from __future__ import annotations

import os
import sys
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def enabled() -> bool:
  setting = os.environ.get("JAXLLM_PROGRESS", "")
  if setting in ("0", "false", "off"):
    return False
  return setting in ("1", "true", "on") or sys.stderr.isatty()


def bar(total: int | None = None, desc: str = "", unit: str = "it"):
  """A tqdm bar (update(n), set_postfix, close; a context manager) or a silent stand-in."""
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, mininterval=1.0,
              dynamic_ncols=True, disable=not enabled(), leave=False)


def track(items: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it") -> Iterator[T]:
  """Yields `items`, advancing a bar by one per item."""
  if total is None and hasattr(items, "__len__"):
    total = len(items)  # type: ignore[arg-type]
  with bar(total, desc, unit) as b:
    for item in items:
      yield item
      b.update(1)
