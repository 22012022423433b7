"""grain pipelines that turn documents into fixed-shape training batches.

Per logical data shard and per source:
  documents -> (memory: seeded global shuffle, reshuffled each epoch, this shard's
  every num_shards-th document | stream: this shard's files, window shuffle) ->
  tokenize in batches + EOS -> pack into rows (packing.py)
then the sources are mixed by weight (rows, so weights are shares of tokens) and
batched to batch_size / num_shards rows. A host concatenates its shards' batches
(`host_shards`, `HostShardsIterDataset`) and prefetches in a background thread.

The global batch depends only on the config: with `num_shards` logical shards,
one process building all of them yields exactly the rows that N processes yield
together, in the same order (host h holds a contiguous run of shards). Every
stage's iterator state is JSON, saved in the training checkpoint, so a resumed
run sees exactly the batches an unbroken run would have seen. A host's position
is kept per logical shard and the checkpoint gathers every host's shards
(`saved_position`), so a run resumes on any process count that divides num_shards.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any, Callable, Sequence

import grain
import jax
import numpy as np

from jaxllm.config_types import RunConfig
from jaxllm.data import position
from jaxllm.data.packing import pack, tokenize
from jaxllm.data.sources import DataError
from jaxllm.errors import ConfigError

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


def num_data_shards(config: RunConfig) -> int:
  """Logical data shards: data.num_shards, or one per process when it is 0."""
  num_shards = config.data.num_shards or jax.process_count()
  if num_shards % jax.process_count() or config.train.batch_size % num_shards:
    raise ConfigError(f"data.num_shards={num_shards} must be a multiple of the {jax.process_count()} processes "
                      f"and divide train.batch_size={config.train.batch_size}.")
  return num_shards


def host_shards(num_shards: int, process_index: int, process_count: int) -> range:
  """The logical shards this host builds: a contiguous run, so hosts' batches concatenate in order."""
  if num_shards % process_count:
    raise ValueError(f"data.num_shards={num_shards} is not a multiple of the {process_count} processes.")
  per_host = num_shards // process_count
  return range(process_index * per_host, (process_index + 1) * per_host)


def _concat_batches(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


class HostShardsIterDataset(grain.IterDataset):
  """This host's logical shards' batches, concatenated in shard order (one batch from each).

  Its position is kept per logical shard, {"num_shards": N, "shards": {"s": shard s's state}},
  so that the checkpoint can hold every shard of every host and any process count that divides
  N can take its own shards from it (a process count grain's ZipIterDataset, whose state is a
  list of this host's parents, cannot change)."""

  def __init__(self, shards: dict[int, grain.IterDataset], num_shards: int):
    super().__init__(list(shards.values()))
    self._shards, self._num_shards = shards, num_shards

  def __iter__(self) -> grain.DatasetIterator:
    return _HostShardsIterator({s: ds.__iter__() for s, ds in self._shards.items()}, self._num_shards)


class _HostShardsIterator(grain.DatasetIterator):

  def __init__(self, shards: dict[int, grain.DatasetIterator], num_shards: int):
    super().__init__(list(shards.values()))
    self._shards, self._num_shards = shards, num_shards

  def __next__(self) -> dict[str, np.ndarray]:
    batches = [next(it) for it in self._shards.values()]  # ends with the shortest shard, as zip does
    return batches[0] if len(batches) == 1 else _concat_batches(batches)

  def get_state(self) -> dict[str, Any]:
    return {"num_shards": self._num_shards,
            "shards": {str(s): copy.deepcopy(it.get_state()) for s, it in self._shards.items()}}

  def set_state(self, state: dict[str, Any]) -> None:
    if "shards" in state:
      if state["num_shards"] != self._num_shards:
        raise DataError(
            f"the checkpoint's data position has {state['num_shards']} logical data shards but this run "
            f"builds {self._num_shards} (data.num_shards=0 means one per process); resume with "
            f"--config.data.num_shards={state['num_shards']} (on a process count that divides it), or "
            "start in a fresh --workdir.")
      saved = state["shards"]
    else:  # written before positions were kept per shard: this host's shards in order (Zip's parents)
      parts = state["parents"] if len(self._shards) > 1 else [state]
      if len(parts) != len(self._shards):
        raise ValueError(f"{len(parts)} shard positions for {len(self._shards)} shards")
      saved = dict(zip(map(str, self._shards), parts))
    for s, it in self._shards.items():
      it.set_state(saved[str(s)])


class GlobalPositionIterDataset(grain.IterDataset):
  """Marks a dataset whose position is the same on every process and means the same global batch
  for any process count (it counts global batches); the checkpoint stores it once."""

  def __iter__(self) -> grain.DatasetIterator:
    return _GlobalPositionIterator(self._parent.__iter__())


class _GlobalPositionIterator(grain.DatasetIterator):

  def __next__(self) -> Any:
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return {"global": copy.deepcopy(self._parent.get_state())}

  def set_state(self, state: dict[str, Any]) -> None:
    # A checkpoint written before the mark holds the parent's state itself.
    self._parent.set_state(state["global"] if "global" in state else state)


def host_batches(make_rows: Callable[[int], grain.IterDataset], batch_size: int, *, num_shards: int = 1,
                 process_index: int = 0, process_count: int = 1, drop_remainder: bool = True,
                 prefetch: int = 0) -> grain.IterDataset:
  """This host's batches (batch_size / process_count rows), every task's one host-sharding scheme.

  make_rows(s) is logical shard s's rows; each of the `num_shards` shards makes
  batch_size / num_shards rows of the global batch `batch_size`, and this host concatenates its
  own shards' (`host_shards`, `HostShardsIterDataset`). So the global batch depends on
  num_shards, never on the process count, and a position resumes on any process count that
  divides num_shards.
  """
  if num_shards <= 0 or batch_size % num_shards:
    raise ValueError(f"train.batch_size={batch_size} is not divisible by data.num_shards={num_shards}.")
  rows_per_shard = batch_size // num_shards
  shard_batches = {s: make_rows(s).batch(rows_per_shard, drop_remainder=drop_remainder)
                   for s in host_shards(num_shards, process_index, process_count)}
  batches = HostShardsIterDataset(shard_batches, num_shards)
  if prefetch > 0:
    # A background thread keeps `prefetch` batches ready; its state is that of the last batch handed out.
    batches = grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=prefetch)
  return batches


def lm_batches(sources: dict[str, DocumentsFn], spec: PackSpec, batch_size: int, *,
               weights: dict[str, float] | None = None, num_shards: int = 1, process_index: int = 0,
               process_count: int = 1, drop_remainder: bool = True, prefetch: int = 0,
               row_shuffle: int = 0) -> grain.IterDataset:
  """This host's batches (batch_size / process_count rows) of packed causal-LM examples
  (`host_batches` over `num_shards` logical shards)."""
  weights = weights or {name: 1.0 for name in sources}

  def make_rows(s: int) -> grain.IterDataset:
    rows = shard_rows(sources, weights, spec, s, num_shards)
    if row_shuffle > 1:
      # Consecutive rows of a long document are near-duplicates; mixing a window of rows keeps
      # one file from filling whole batches (the ConstantLengthDataset + shuffle-buffer recipe).
      rows = grain.experimental.WindowShuffleIterDataset(rows, window_size=row_shuffle,
                                                         seed=spec.seed * 7_919 + s)
    return rows
  return host_batches(make_rows, batch_size, num_shards=num_shards, process_index=process_index,
                      process_count=process_count, drop_remainder=drop_remainder, prefetch=prefetch)


def saved_position(iterator: grain.DatasetIterator) -> dict:
  """The whole job's input position as a checkpoint stores it (JSON; see data/position.py).

  With several processes every one must call it (at the same step): it gathers their positions."""
  gather = _allgather_json if jax.process_count() > 1 else lambda value: [value]
  return position.job_position(iterator.get_state(), gather, jax.process_count())


def restore_iterator(iterator: grain.DatasetIterator, saved: dict, process_index: int | None = None,
                     process_count: int | None = None) -> None:
  """Puts a fresh iterator at a checkpointed position (`saved_position`'s value, or an older
  checkpoint's state); a state saved by a different pipeline is an error."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  try:
    iterator.set_state(position.process_state(saved, process_index, process_count))
  except DataError:
    raise
  except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
    raise DataError(f"the checkpoint's data position does not fit this data pipeline ({type(e).__name__}: "
                    f"{str(e)[:120]}); resume with the data config it was saved with (sources, packing, "
                    "num_shards, prefetch) or start in a fresh --workdir.") from e


def _allgather_json(value: Any) -> list[Any]:
  """`value` (JSON) from every process, in process order; a collective every process must enter."""
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  data = np.frombuffer(json.dumps(value).encode("utf-8"), np.uint8)
  sizes = multihost_utils.process_allgather(np.asarray([data.size], np.int32))
  width = -(-int(sizes.max()) // 4096) * 4096  # few distinct shapes: each one compiles once
  padded = np.zeros(width, np.uint8)
  padded[:data.size] = data
  rows = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row[:int(n)]).decode("utf-8")) for row, n in zip(rows, sizes.reshape(-1))]


def take_batches(dataset: grain.IterDataset, num_batches: int) -> list[dict[str, np.ndarray]]:
  """The first `num_batches` batches (fewer if the data runs out), e.g. a fixed eval set."""
  batches = []
  for batch in dataset:
    batches.append(batch)
    if len(batches) >= num_batches:
      break
  return batches
