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

from typing import Any, Callable

import grain
import numpy as np

PACKING_MODES = ("concat", "document")


class _TokenizeBatch(grain.experimental.FlatMapTransform):
  """A list of documents -> one {"tokens": int32[len + 1]} per document, EOS appended.

  Tokenizing a batch at once lets the Rust tokenizer use every core."""

  def __init__(self, tokenizer: Any, eos_id: int, batch_size: int):
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    self._encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    self._eos = np.asarray([eos_id], np.int32)
    self.max_fan_out = batch_size

  def flat_map(self, docs: list[str]) -> list[dict[str, np.ndarray]]:
    encodings = self._encode(list(docs), add_special_tokens=False)
    # The model must learn where a document ends, so every document ends in EOS.
    return [{"tokens": np.concatenate([np.asarray(e.ids, np.int32), self._eos])} for e in encodings]


def tokenize(docs: grain.IterDataset, tokenizer: Any, eos_id: int, batch_size: int = 128) -> grain.IterDataset:
  """Documents (strings) -> {"tokens"} with EOS, tokenized `batch_size` documents per call."""
  batched = docs.batch(batch_size, drop_remainder=False, batch_fn=list)
  return grain.experimental.FlatMapIterDataset(batched, _TokenizeBatch(tokenizer, eos_id, batch_size))


def tokenize_fn(tokenizer: Any, eos_id: int) -> Callable[[str], dict[str, np.ndarray]]:
  """One document -> {"tokens"} with EOS appended (for callers that tokenize one at a time)."""
  encode = _TokenizeBatch(tokenizer, eos_id, 1)
  return lambda text: encode.flat_map([text])[0]


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


def _document_row(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  segment_ids = row["inputs_segment_ids"].astype(np.int32)
  return {"inputs": row["inputs"], "targets": row["targets"],
          "weights": (segment_ids > 0).astype(np.float32),
          "segment_ids": segment_ids, "positions": row["inputs_positions"].astype(np.int32)}


def pack_documents(tokens: grain.IterDataset, seq_len: int, num_bins: int, seed: int) -> grain.IterDataset:
  """First-fit packing of whole documents into rows of seq_len, with segment ids and positions.

  `num_bins` rows are filled at once: more bins, fuller rows (see docs/data.md for measured fill)."""
  pieces = grain.experimental.FlatMapIterDataset(tokens, _DocumentPieces(seq_len, max_pieces=1 << 20))
  pieces = pieces.filter(lambda p: len(p["inputs"]) > 0)  # a bare EOS predicts nothing
  rows = grain.experimental.FirstFitPackIterDataset(
      pieces, length_struct={"inputs": seq_len, "targets": seq_len}, num_packing_bins=num_bins,
      seed=seed, shuffle_bins=True)
  return rows.map(_document_row)


def pack(tokens: grain.IterDataset, mode: str, seq_len: int, num_bins: int = 64, seed: int = 0) -> grain.IterDataset:
  if mode == "concat":
    return pack_concat(tokens, seq_len)
  if mode == "document":
    return pack_documents(tokens, seq_len, num_bins, seed)
  raise ValueError(f"data.packing={mode!r}; use one of {PACKING_MODES}.")
