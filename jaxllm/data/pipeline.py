"""grain pipelines that turn documents into fixed-shape training batches.

Per logical data shard and per source:
  documents -> (memory: seeded global shuffle, reshuffled each epoch, this shard's
  every num_shards-th document | stream: this shard's files, window shuffle) ->
  tokenize in batches + EOS -> pack into rows (packing.py)
then the sources are mixed by weight (rows, so weights are shares of tokens) and
batched to batch_size / num_shards rows. A host concatenates its shards' batches
(`host_shards`) and prefetches in a background thread.

The global batch depends only on the config: with `num_shards` logical shards,
one process building all of them yields exactly the rows that N processes yield
together, in the same order (host h holds a contiguous run of shards). Every
stage's iterator state is JSON, saved in the training checkpoint, so a resumed
run sees exactly the batches an unbroken run would have seen.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import grain
import numpy as np

from jaxllm.data import position
from jaxllm.data.packing import pack, tokenize, tokenize_fn  # noqa: F401  (tokenize_fn re-exported)
from jaxllm.data.sources import DataError

# A function (shard_index, num_shards) -> that shard's documents as a grain IterDataset.
DocumentsFn = Callable[[int, int], grain.IterDataset]


@dataclasses.dataclass(frozen=True)
class PackSpec:
  """How documents become rows: tokenizer, EOS, row length, packing mode."""
  tokenizer: Any
  eos_id: int
  seq_len: int
  packing: str = "concat"
  pack_bins: int = 128
  tokenize_batch: int = 128
  seed: int = 0
  tokenize_threads: int = -1  # -1: one per core (at most 16); 0: tokenize inline


def memory_documents(docs: Sequence[str], *, seed: int, shuffle: bool = True, repeat: bool = True) -> DocumentsFn:
  """A random-access list of documents, shuffled globally (again every epoch) and dealt to shards."""
  def make(shard_index: int, num_shards: int) -> grain.IterDataset:
    ds = grain.MapDataset.source(docs)
    if shuffle:
      ds = ds.shuffle(seed=seed)
    if repeat:
      ds = ds.repeat()
    if num_shards > 1:
      ds = ds[shard_index::num_shards]
    # The documents are in memory already: reading them needs no thread pool.
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  return make


def shard_rows(sources: dict[str, DocumentsFn], weights: dict[str, float], spec: PackSpec,
               shard_index: int, num_shards: int) -> grain.IterDataset:
  """Packed rows of one logical shard, the sources mixed by weight."""
  rows = {}
  for i, (name, make_docs) in enumerate(sources.items()):
    tokens = tokenize(make_docs(shard_index, num_shards), spec.tokenizer, spec.eos_id, spec.tokenize_batch,
                      spec.tokenize_threads)
    rows[name] = pack(tokens, spec.packing, spec.seq_len, spec.pack_bins,
                      seed=spec.seed * 1_000_003 + shard_index * 101 + i)
  if len(rows) == 1:
    return next(iter(rows.values()))
  return grain.IterDataset.mix(rows, {name: weights[name] for name in rows})


def host_shards(num_shards: int, process_index: int, process_count: int) -> range:
  """The logical shards this host builds: a contiguous run, so hosts' batches concatenate in order."""
  if num_shards % process_count:
    raise ValueError(f"data.num_shards={num_shards} is not a multiple of the {process_count} processes.")
  per_host = num_shards // process_count
  return range(process_index * per_host, (process_index + 1) * per_host)


def _concat_batches(batches: tuple[dict[str, np.ndarray], ...]) -> dict[str, np.ndarray]:
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def lm_batches(sources: dict[str, DocumentsFn], spec: PackSpec, batch_size: int, *,
               weights: dict[str, float] | None = None, num_shards: int = 1, process_index: int = 0,
               process_count: int = 1, drop_remainder: bool = True, prefetch: int = 0,
               row_shuffle: int = 0) -> grain.IterDataset:
  """This host's batches (batch_size / process_count rows) of packed causal-LM examples.

  `batch_size` is the global batch; each of the `num_shards` logical shards makes
  batch_size / num_shards rows of it.
  """
  if num_shards <= 0 or batch_size % num_shards:
    raise ValueError(f"train.batch_size={batch_size} is not divisible by data.num_shards={num_shards}.")
  rows_per_shard = batch_size // num_shards
  weights = weights or {name: 1.0 for name in sources}
  shard_batches = []
  for s in host_shards(num_shards, process_index, process_count):
    rows = shard_rows(sources, weights, spec, s, num_shards)
    if row_shuffle > 1:
      # Consecutive rows of a long document are near-duplicates; mixing a window of rows keeps
      # one file from filling whole batches (the ConstantLengthDataset + shuffle-buffer recipe).
      rows = grain.experimental.WindowShuffleIterDataset(rows, window_size=row_shuffle,
                                                         seed=spec.seed * 7_919 + s)
    shard_batches.append(rows.batch(rows_per_shard, drop_remainder=drop_remainder))
  if len(shard_batches) == 1:
    batches = shard_batches[0]
  else:
    batches = grain.experimental.ZipIterDataset(shard_batches, strict=False).map(_concat_batches)
  if prefetch > 0:
    # A background thread keeps `prefetch` batches ready; its state is that of the last batch handed out.
    batches = grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=prefetch)
  return batches


def lm_dataset(docs: Sequence[str], tokenizer: Any, eos_id: int, seq_len: int, batch_size: int, *,
               seed: int, shuffle: bool = True, repeat: bool = True, packing: str = "concat",
               shard_index: int = 0, shard_count: int = 1) -> grain.IterDataset:
  """Packed causal-LM batches of `batch_size` rows from one in-memory list of documents.

  `shard_index/shard_count` select one shard's documents (one host's share)."""
  spec = PackSpec(tokenizer, eos_id, seq_len, packing, seed=seed)
  make = memory_documents(docs, seed=seed, shuffle=shuffle, repeat=repeat)
  rows = shard_rows({"docs": lambda _s, _n: make(shard_index, shard_count)}, {"docs": 1.0}, spec, shard_index, 1)
  return rows.batch(batch_size, drop_remainder=True)


def saved_position(iterator: grain.DatasetIterator) -> dict:
  """The iterator's position as a checkpoint stores it (JSON; see data/position.py)."""
  return position.encode(iterator.get_state())


def restore_iterator(iterator: grain.DatasetIterator, saved: dict) -> None:
  """Puts a fresh iterator at a checkpointed position (`saved_position`'s value, or a raw state);
  a state saved by a different pipeline is an error."""
  try:
    iterator.set_state(position.decode(saved))
  except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
    raise DataError(f"the checkpoint's data position does not fit this data pipeline ({type(e).__name__}: "
                    f"{str(e)[:120]}); resume with the data config it was saved with (sources, packing, "
                    "num_shards, prefetch) or start in a fresh --workdir.") from e


def take_batches(dataset: grain.IterDataset, num_batches: int) -> list[dict[str, np.ndarray]]:
  """The first `num_batches` batches (fewer if the data runs out), e.g. a fixed eval set."""
  batches = []
  for batch in dataset:
    batches.append(batch)
    if len(batches) >= num_batches:
      break
  return batches
