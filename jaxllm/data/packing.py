"""Tokenizing documents in batches and packing them into fixed-length rows.

Two packing modes (`data.packing`):
  concat    documents joined (each ends in EOS) and cut every seq_len + 1 tokens
            (grain's ConcatThenSplit; the ConstantLengthDataset recipe). Attention
            crosses document boundaries; no padding at all.
  document  each document becomes (inputs, targets) = (tokens[:-1], tokens[1:]),
            documents longer than seq_len are cut into seq_len pieces, and pieces
            are placed first-fit into rows of seq_len (grain's FirstFitPack). Rows
            carry `segment_ids` (1, 2, ... per document, 0 = padding) and
            `positions` that restart at 0 per document, so attention never crosses
            documents; padding has weight 0.
"""

from __future__ import annotations

import collections
import concurrent.futures
import copy
import functools
import os
from typing import Any, Callable

import grain
import numpy as np

PACKING_MODES = ("concat", "document")


class _TokenizeBatch:
  """A list of documents -> a list of int32[len + 1] token arrays, EOS appended.

  Tokenizing a batch at once lets the Rust tokenizer use every core."""

  def __init__(self, tokenizer: Any, eos_id: int):
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    self._encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    self._eos = np.asarray([eos_id], np.int32)

  def __call__(self, docs: list[str]) -> list[np.ndarray]:
    encodings = self._encode(list(docs), add_special_tokens=False)
    # The model must learn where a document ends, so every document ends in EOS.
    return [np.concatenate([np.asarray(e.ids, np.int32), self._eos]) for e in encodings]


class _Unbatch(grain.experimental.FlatMapTransform):
  """A list of token arrays -> one {"tokens"} element per array."""

  def __init__(self, batch_size: int):
    self.max_fan_out = batch_size

  def flat_map(self, token_lists: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    return [{"tokens": tokens} for tokens in token_lists]


class ParallelMapIterDataset(grain.IterDataset):
  """`parent.map(fn)` computed `num_threads` elements ahead in a thread pool, in order.

  For functions that release the GIL (the Rust tokenizer does), so that several
  batches tokenize at once on separate cores while Python packs the previous ones.
  grain parallelizes maps of random-access datasets only; this works for streams too.
  The iterator's state is the parent's state after the last element handed out, so
  resuming from it yields exactly the elements an unbroken run yields next."""

  def __init__(self, parent: grain.IterDataset, fn: Callable[[Any], Any], num_threads: int):
    super().__init__(parent)
    self._fn, self._num_threads = fn, num_threads

  def __iter__(self) -> grain.DatasetIterator:
    return _ParallelMapIterator(self._parent.__iter__(), self._fn, self._num_threads)


class _ParallelMapIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, fn: Callable[[Any], Any], num_threads: int):
    super().__init__(parent)
    self._fn, self._num_threads = fn, num_threads
    self._pool = _thread_pool(num_threads)
    self._ahead: collections.deque = collections.deque()  # (future, parent state after its element)
    self._state = copy.deepcopy(parent.get_state())
    self._exhausted = False

  def _fill(self) -> None:
    while not self._exhausted and len(self._ahead) < 2 * self._num_threads:
      try:
        element = next(self._parent)
      except StopIteration:
        self._exhausted = True
        return
      self._ahead.append((self._pool.submit(self._fn, element), copy.deepcopy(self._parent.get_state())))

  def __next__(self) -> Any:
    self._fill()
    if not self._ahead:
      raise StopIteration
    future, state = self._ahead.popleft()
    result = future.result()  # an error in fn surfaces here, at the element that caused it
    self._state = state
    return result

  def get_state(self) -> dict[str, Any]:
    return copy.deepcopy(self._state)

  def _drop_ahead(self) -> None:
    for future, _ in self._ahead:
      future.cancel()
    self._ahead.clear()

  def set_state(self, state: dict[str, Any]) -> None:
    self._drop_ahead()
    self._parent.set_state(state)
    self._state, self._exhausted = copy.deepcopy(state), False

  def close(self) -> None:
    self._drop_ahead()
    super().close()


@functools.cache
def _thread_pool(num_threads: int) -> concurrent.futures.ThreadPoolExecutor:
  # One pool per process, shared by every source and shard: mixing sources must not multiply threads.
  return concurrent.futures.ThreadPoolExecutor(num_threads, thread_name_prefix="jaxllm-tokenize")


MAX_DEFAULT_TOKENIZE_THREADS = 16  # ~13M tokens/s of BPE: more than one host's accelerators consume


def tokenize_threads() -> int:
  """Default tokenizer threads: one per core this process may use, at most 16 (each thread keeps
  two batches in flight per source and shard, so a 200-core host should not start 200)."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
  return max(1, min(cores, MAX_DEFAULT_TOKENIZE_THREADS))


def tokenize(docs: grain.IterDataset, tokenizer: Any, eos_id: int, batch_size: int = 128,
             num_threads: int = -1) -> grain.IterDataset:
  """Documents (strings) -> {"tokens"} with EOS, tokenized `batch_size` documents per call.

  `num_threads` batches (-1: `tokenize_threads()`; 0: inline) are tokenized at once in a
  thread pool, each single-threaded: on a small machine this beats the tokenizer's own
  parallelism, whose idle workers spin, and it overlaps tokenizing with packing in Python."""
  num_threads = tokenize_threads() if num_threads < 0 else num_threads
  batched = docs.batch(batch_size, drop_remainder=False, batch_fn=list)
  encode = _TokenizeBatch(tokenizer, eos_id)
  if num_threads > 0:
    # Batches tokenize in our threads, so the tokenizer's own pool would only oversubscribe the cores.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    encoded = ParallelMapIterDataset(batched, encode, num_threads)
  else:
    encoded = batched.map(encode)
  return grain.experimental.FlatMapIterDataset(encoded, _Unbatch(batch_size))


def _concat_row(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  tokens = row["tokens"]
  # A finite stream's last row is padded: its padding (segment id 0) carries no loss.
  weights = (row["tokens_segment_ids"][1:] > 0) if "tokens_segment_ids" in row else np.ones(len(tokens) - 1)
  return {"inputs": tokens[:-1], "targets": tokens[1:], "weights": weights.astype(np.float32)}


def pack_concat(tokens: grain.IterDataset, seq_len: int) -> grain.IterDataset:
  """Rows of seq_len + 1 consecutive tokens, so inputs and targets (shifted by one) are seq_len long."""
  rows = grain.experimental.ConcatThenSplitIterDataset(tokens, length_struct={"tokens": seq_len + 1})
  return rows.map(_concat_row)


class _DocumentPieces(grain.experimental.FlatMapTransform):
  """{"tokens"} -> (inputs, targets) pieces of at most seq_len, so long documents fit a row."""

  def __init__(self, seq_len: int, max_pieces: int):
    self.seq_len, self.max_fan_out = seq_len, max_pieces

  def flat_map(self, element: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    tokens = element["tokens"]
    inputs, targets = tokens[:-1], tokens[1:]
    return [{"inputs": inputs[i:i + self.seq_len], "targets": targets[i:i + self.seq_len]}
            for i in range(0, len(inputs), self.seq_len)]


class _PackedRow:
  """grain's packed row -> the features, `segment_ids` and `positions` (from the inputs'), and
  `weights`: the packed per-token weights if the pieces carry them (instruction tuning), else
  1 on every real token. Padding is 0 in every feature (grain pads with zeros)."""

  def __init__(self, features: tuple[str, ...]):
    self.features = features

  def __call__(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    segment_ids = row["inputs_segment_ids"].astype(np.int32)
    out = {k: row[k] for k in self.features}
    if "weights" not in out:
      out["weights"] = (segment_ids > 0).astype(np.float32)
    out.update(segment_ids=segment_ids, positions=row["inputs_positions"].astype(np.int32))
    return out


def first_fit_rows(pieces: grain.IterDataset, seq_len: int, num_bins: int, seed: int,
                   features: tuple[str, ...] = ("inputs", "targets")) -> grain.IterDataset:
  """Pieces (dicts of per-token `features`, at most seq_len each) placed first-fit into rows of
  seq_len (grain's FirstFitPack) with segment ids 1, 2, ... (0 = padding) and positions that
  restart at 0 per piece. Every feature is packed alike, so per-token extras (loss weights,
  prefix flags) stay aligned with their tokens. `num_bins` rows are filled at once: more bins,
  fuller rows (see docs/data.md for measured fill)."""
  rows = grain.experimental.FirstFitPackIterDataset(
      pieces, length_struct={k: seq_len for k in features}, num_packing_bins=num_bins,
      seed=seed, shuffle_bins=True)
  return rows.map(_PackedRow(tuple(features)))


def pack_documents(tokens: grain.IterDataset, seq_len: int, num_bins: int, seed: int) -> grain.IterDataset:
  """First-fit packing of whole documents into rows of seq_len, with segment ids and positions."""
  pieces = grain.experimental.FlatMapIterDataset(tokens, _DocumentPieces(seq_len, max_pieces=1 << 20))
  pieces = pieces.filter(lambda p: len(p["inputs"]) > 0)  # a bare EOS predicts nothing
  return first_fit_rows(pieces, seq_len, num_bins, seed)


def pack(tokens: grain.IterDataset, mode: str, seq_len: int, num_bins: int = 128, seed: int = 0) -> grain.IterDataset:
  if mode == "concat":
    return pack_concat(tokens, seq_len)
  if mode == "document":
    return pack_documents(tokens, seq_len, num_bins, seed)
  raise ValueError(f"data.packing={mode!r}; use one of {PACKING_MODES}.")
