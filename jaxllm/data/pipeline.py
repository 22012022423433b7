"""grain pipelines that turn documents into fixed-shape training batches.

documents -> shuffle (seeded, reshuffled each epoch) -> this host's share ->
tokenize + EOS -> pack into rows of seq_len + 1 tokens -> inputs/targets/weights
-> batches of the per-host batch size. The iterator's state is JSON, saved in
the training checkpoint, so a resumed run sees exactly the batches it would have.
"""

from __future__ import annotations

from typing import Any, Callable

import grain
import numpy as np


def tokenize_fn(tokenizer: Any, eos_id: int) -> Callable[[str], dict[str, np.ndarray]]:
  backend = getattr(tokenizer, "backend_tokenizer", tokenizer)

  def tokenize(text: str) -> dict[str, np.ndarray]:
    ids = backend.encode(text, add_special_tokens=False).ids
    ids.append(eos_id)  # the model must learn where a document ends
    return {"tokens": np.asarray(ids, np.int32)}
  return tokenize


def _to_example(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  tokens = row["tokens"]
  return {"inputs": tokens[:-1], "targets": tokens[1:],
          "weights": (row["tokens_segment_ids"][1:] > 0).astype(np.float32)
          if "tokens_segment_ids" in row else np.ones(len(tokens) - 1, np.float32)}


def lm_dataset(docs: list[str], tokenizer: Any, eos_id: int, seq_len: int, batch_size: int, *,
               seed: int, shuffle: bool = True, repeat: bool = True,
               shard_index: int = 0, shard_count: int = 1) -> grain.IterDataset:
  """Concat-then-split packed causal-LM batches: documents joined with EOS and cut into rows.

  `batch_size` is this host's share of the global batch; `shard_index/shard_count`
  select this host's documents.
  """
  ds = grain.MapDataset.source(docs)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if repeat:
    ds = ds.repeat()
  if shard_count > 1:
    ds = ds[shard_index::shard_count]
  ds = ds.map(tokenize_fn(tokenizer, eos_id))
  it = ds.to_iter_dataset()
  # Rows hold seq_len + 1 tokens so inputs and targets (shifted by one) are both seq_len long.
  it = grain.experimental.ConcatThenSplitIterDataset(it, length_struct={"tokens": seq_len + 1})
  it = it.map(_to_example)
  return it.batch(batch_size, drop_remainder=True)


def take_batches(dataset: grain.IterDataset, num_batches: int) -> list[dict[str, np.ndarray]]:
  """The first `num_batches` batches (fewer if the data runs out), e.g. a fixed eval set."""
  batches = []
  for batch in dataset:
    batches.append(batch)
    if len(batches) >= num_batches:
      break
  return batches
