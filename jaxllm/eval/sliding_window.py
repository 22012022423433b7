"""Sliding-window perplexity and bits per byte of documents: the library behind
`python -m jaxllm.eval perplexity` and training's `train.eval_data`.

The strided method of the Hugging Face perplexity guide, per document: windows of
`seq_len` tokens start every `stride` tokens, and each window scores only the tokens the
previous one did not, so every token is scored once, after as much left context as the
window allows (stride = seq_len: disjoint windows; a smaller stride: more context per
token, more compute). A window's first token has no context inside it: with disjoint
windows it is read, not scored, as in the guide.

Each document is read after the tokenizer's BOS token (EOS where there is none): training
rows put EOS between documents, so a document's first token is scored after what it
followed in training (lm-eval's rolling loglikelihood does the same).

Bits per byte = total NLL in bits / UTF-8 bytes of the text: unlike perplexity per token,
it does not depend on the tokenizer, so models with different tokenizers compare.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Sequence

import numpy as np

from jaxllm.config_types import SourceConfig
from jaxllm.data.documents import load_documents
from jaxllm.data.sources import DataStats, expand_paths
from jaxllm.errors import ConfigError, DataError
from jaxllm.eval.scoring import Scorer


@dataclasses.dataclass
class Windows:
  """The scoring work of some documents: token rows and how many of each row's last tokens count."""
  rows: list[list[int]]
  num_scored: list[int]   # the last num_scored tokens of each row are scored
  num_documents: int
  num_bytes: int          # UTF-8 bytes of the text the rows hold


@dataclasses.dataclass
class PerplexityResult:
  nll_sum: float          # nats, summed over the scored tokens
  num_tokens: int         # scored tokens
  num_bytes: int
  num_documents: int
  num_windows: int

  @property
  def nll(self) -> float:
    """Mean negative log-likelihood per token, in nats."""
    return self.nll_sum / max(self.num_tokens, 1)

  @property
  def perplexity(self) -> float:
    try:
      return math.exp(self.nll)
    except OverflowError:
      return float("inf")

  @property
  def bits_per_byte(self) -> float:
    return self.nll_sum / math.log(2) / max(self.num_bytes, 1)

  def to_dict(self) -> dict[str, Any]:
    return {"nll": self.nll, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte,
            "num_tokens": self.num_tokens, "num_bytes": self.num_bytes,
            "num_documents": self.num_documents, "num_windows": self.num_windows}

  def __add__(self, other: "PerplexityResult") -> "PerplexityResult":
    return PerplexityResult(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


def strided_windows(num_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
  """(begin, end, num_scored) of each window over num_tokens tokens: the guide's loop."""
  windows, prev_end = [], 0
  for begin in range(0, num_tokens, stride):
    end = min(begin + seq_len, num_tokens)
    # Tokens new to this window, less the window's first token, which nothing predicts.
    num_scored = min(end - prev_end, end - begin - 1)
    if num_scored > 0:
      windows.append((begin, end, num_scored))
    prev_end = end
    if end == num_tokens:
      break
  return windows


def check_window(seq_len: int, stride: int, scorer: Scorer) -> None:
  if seq_len < 2 or seq_len > scorer.max_input_len:
    raise ConfigError(f"--seq-len={seq_len} must be between 2 and the model's "
                      f"{scorer.max_input_len} positions (model.max_seq_len"
                      f"{' less its virtual tokens' if scorer.cfg.num_virtual_tokens else ''}).")
  if not 1 <= stride <= seq_len:
    raise ConfigError(f"--stride={stride} must be between 1 and --seq-len={seq_len}.")


def prepare(tokenizer: Any, documents: Sequence[str], seq_len: int, stride: int,
            max_chars: int = 0) -> Windows:
  """The windows of `documents`; with max_chars, only that many characters of text are read
  (the last document cut), so the work is bounded and the byte count stays exact."""
  start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
  windows = Windows([], [], 0, 0)
  chars_left = max_chars or math.inf
  for text in documents:
    if chars_left <= 0:
      break
    if len(text) > chars_left:
      text = text[:int(chars_left)]
    chars_left -= len(text)
    # verbose=False: no "longer than the model's maximum" warning; the windows take care of that.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if start_id is not None:
      ids = [start_id] + ids
    for begin, end, num_scored in strided_windows(len(ids), seq_len, stride):
      windows.rows.append(ids[begin:end])
      windows.num_scored.append(num_scored)
    windows.num_documents += 1
    windows.num_bytes += len(text.encode("utf-8"))
  return windows


def evaluate(scorer: Scorer, params: Any, windows: Windows,
             on_batch: Callable[[int], None] | None = None) -> PerplexityResult:
  """Scores the windows; `on_batch(rows done)` after each batch (a progress bar)."""
  # Longest rows first, so that each batch pads to the fewest positions.
  order = sorted(range(len(windows.rows)), key=lambda i: -len(windows.rows[i]))
  nll_sum, num_tokens, start = 0.0, 0, 0
  for batch in scorer.batches(params, [windows.rows[i] for i in order]):
    for i, scores in zip(order[start:start + len(batch)], batch):
      scored = scores.logprobs[-windows.num_scored[i]:]
      nll_sum -= float(np.sum(scored, dtype=np.float64))
      num_tokens += len(scored)
    start += len(batch)
    if on_batch is not None:
      on_batch(len(batch))
  return PerplexityResult(nll_sum, num_tokens, windows.num_bytes, windows.num_documents, len(windows.rows))


def load_eval_documents(path: str, field: str = "text", flag: str = "--data") -> list[str] | Sequence[str]:
  """The documents at `path`: a `datasets` save_to_disk directory, JSON lines (`field` of each
  record; .jsonl/.json files) or text (one document per file); a folder or a glob of files."""
  if not any(ch in path for ch in "*?[") and not os.path.exists(path):
    raise DataError(f"{flag} {path}: no such file or directory.")
  try:
    if os.path.isdir(path) and any(os.path.exists(os.path.join(path, marker))
                                   for marker in ("dataset_info.json", "dataset_dict.json", "state.json")):
      source = "hf_disk"
    elif all(p.endswith((".jsonl", ".json")) for p in expand_paths(path)):
      source = "jsonl"
    else:
      source = "text"
    return load_documents(SourceConfig(source=source, path=path, field=field), DataStats("skip"))
  except DataError as e:
    raise DataError(f"{flag} {path}: {e}") from e


def source_names(paths: Sequence[str]) -> list[str]:
  """A short metric name per source (the file or folder name without extension), made unique."""
  names: list[str] = []
  for path in paths:
    literal = path.split("*")[0].split("?")[0].split("[")[0] or "."  # a glob: its fixed folder part
    base = os.path.splitext(os.path.basename(os.path.normpath(literal)))[0]
    base = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in base) or "data"
    name, n = base, 2
    while name in names:
      name, n = f"{base}_{n}", n + 1
    names.append(name)
  return names
