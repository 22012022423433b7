"""nanoGPT-style data (`data.packing='windows'`): one token stream, split by position, rows at random offsets.

The documents are joined into one text and tokenized; the first (1 - val_fraction)
of the tokens train and the rest validate (nanoGPT's `data[:int(n * 0.9)]`, a split
by position, not by document). Every training row is seq_len + 1 consecutive
tokens from an offset drawn uniformly at random (nanoGPT's `get_batch`); the draw
for row i depends only on (seed, i), so the iterator's state is just its position
and a resumed run sees the same rows. Global batch t is rows t * batch_size, ...,
and host h takes its contiguous share of them, so the position (global rows handed
out) is the same on every host and resumes on any process count. The validation
batches are a fixed, seeded draw from the held-out tail.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import grain
import jax
import numpy as np

from jaxllm.config_types import RunConfig
from jaxllm.data.pipeline import GlobalPositionIterDataset, take_batches
from jaxllm.data.documents import load_documents
from jaxllm.data.sources import DataError, DataStats

_ENDLESS = 1 << 62  # rows a training stream can hand out; never reached


def window_rows(tokens: np.ndarray, seq_len: int, seed: int, *, num_rows: int = _ENDLESS,
                shard_index: int = 0, shard_count: int = 1) -> grain.MapDataset:
  """Rows {inputs, targets, weights} [seq_len] cut at random offsets of `tokens` (this shard's share)."""
  if len(tokens) < seq_len + 2:
    raise DataError(f"{len(tokens)} tokens cannot fill one window of data.seq_len + 1 = {seq_len + 1}; "
                    "give more text or lower data.seq_len.")
  last_start = len(tokens) - seq_len - 1
  ones = np.ones(seq_len, np.float32)

  def row(index: int) -> dict[str, np.ndarray]:
    start = int(np.random.default_rng((seed, index)).integers(0, last_start + 1))
    window = tokens[start:start + seq_len + 1]
    return {"inputs": window[:-1], "targets": window[1:], "weights": ones}
  return grain.MapDataset.range(num_rows)[shard_index::shard_count].map(row)


def window_batches(rows: grain.MapDataset, batch_size: int, process_index: int = 0,
                   process_count: int = 1) -> grain.IterDataset:
  """This host's share of global batches of `batch_size` consecutive rows; resumes on any process count."""
  return GlobalPositionIterDataset(WindowBatches(rows, batch_size, process_index, process_count))


class WindowBatches(grain.IterDataset):
  """This host's rows of global batches of `batch_size` rows of `rows`: batch t is rows
  t * batch_size + [first, first + per_host). The state counts global rows handed out."""

  def __init__(self, rows: grain.MapDataset, batch_size: int, process_index: int, process_count: int):
    super().__init__()
    self.rows, self.batch_size = rows, batch_size
    self.per_host = batch_size // process_count
    self.first = process_index * self.per_host

  def __iter__(self) -> grain.DatasetIterator:
    return _WindowBatchesIterator(self)


class _WindowBatchesIterator(grain.DatasetIterator):

  def __init__(self, ds: WindowBatches):
    super().__init__()
    self._ds, self._next_row = ds, 0

  def __next__(self) -> dict[str, np.ndarray]:
    start = self._next_row + self._ds.first
    rows = [self._ds.rows[i] for i in range(start, start + self._ds.per_host)]
    self._next_row += self._ds.batch_size
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

  def get_state(self) -> dict[str, Any]:
    # The key a single process's batched row iterator used, so its older checkpoints resume.
    return {"next_index": self._next_row}

  def set_state(self, state: dict[str, Any]) -> None:
    self._next_row = copy.deepcopy(state["next_index"])


def window_data(config: RunConfig, workdir: str, prepare_tokenizer: Callable[..., Any]):
  """(tokenizer, this host's endless training batches, validation batches, {name: DataStats})."""
  data = config.data
  stats = DataStats(data.on_bad_record)
  text = "".join(load_documents(data, stats))
  val_fraction = data.val_fraction
  if not 0 <= val_fraction < 1:
    raise DataError(f"data.val_fraction={val_fraction} must be in [0, 1).")
  split = int(len(text) * (1 - val_fraction))
  # A character vocabulary comes from the whole text (as nanoGPT builds it); a trained BPE
  # sees only the training part.
  tokenizer = prepare_tokenizer(config, workdir, [text] if data.tokenizer == "char" else [text[:split]])
  backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
  train_tokens = np.asarray(backend.encode(text[:split], add_special_tokens=False).ids, np.int32)
  val_tokens = np.asarray(backend.encode(text[split:], add_special_tokens=False).ids, np.int32)
  per_host = config.train.batch_size // jax.process_count()
  train = window_batches(window_rows(train_tokens, data.seq_len, data.seed), config.train.batch_size,
                         jax.process_index(), jax.process_count())
  if data.prefetch > 0:
    train = grain.experimental.ThreadPrefetchIterDataset(train, prefetch_buffer_size=data.prefetch)
  val_batches = []
  if val_fraction > 0 and config.train.eval_steps > 0:
    rows = per_host * config.train.eval_steps * jax.process_count()
    val = window_rows(val_tokens, data.seq_len, data.seed + 1, num_rows=rows,
                      shard_index=jax.process_index(), shard_count=jax.process_count())
    val_batches = take_batches(val.to_iter_dataset().batch(per_host, drop_remainder=True),
                               config.train.eval_steps)
  return tokenizer, train, val_batches, {"windows": stats}
