"""Hugging Face `datasets` streams as checkpointable grain datasets.

`load_dataset(..., streaming=True)` reads a corpus shard by shard (a shard is
usually one file) without downloading or converting it first, so a corpus larger
than the disk can be trained on. This wrapper adds what training needs on top:
a seeded file-order shuffle that changes every epoch, a split of the shards (or,
when they do not divide evenly, of the records) between logical data shards, an
endless repeat, and an iterator state small enough to store in every checkpoint:
(epoch, position in this shard's file list, records read from that file).
Resuming re-opens that file and skips the records already read.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Iterator

import grain
import numpy as np

from jaxllm.config_types import DataConfig, SourceConfig
from jaxllm.data.sources import DataError, DataStats, expand_paths, is_validation, record_text

# data.source -> the `datasets` builder that streams that kind of local file
FILE_BUILDERS = {"jsonl": "json", "text": "text", "parquet": "parquet"}


@dataclasses.dataclass(frozen=True)
class StreamSpec:
  """How to open a stream: a builder or hub name, optional data files, the text field."""
  name: str                      # 'json', 'text', 'parquet' or a dataset id
  data_files: tuple[str, ...] = ()
  config_name: str | None = None
  split: str = "train"
  field: str = "text"
  builder_kwargs: tuple[tuple[str, Any], ...] = ()

  def open(self):
    import datasets  # pylint: disable=import-outside-toplevel
    kwargs = dict(self.builder_kwargs)
    if self.data_files:
      kwargs["data_files"] = list(self.data_files)
    try:
      ds = datasets.load_dataset(self.name, self.config_name, split=self.split, streaming=True, **kwargs)
    except (FileNotFoundError, ValueError) as e:
      raise DataError(f"cannot open the stream {self.name!r} (split {self.split!r}): {e}") from e
    return ds


def spec_from_config(source_cfg: SourceConfig | DataConfig | Any, path: str | None = None) -> StreamSpec:
  """The stream of `data.source='hf'` (`hf_name` + optional `path` as data files), or of local
  text/jsonl/parquet files with `data.streaming=True`."""
  path = source_cfg.path if path is None else path
  source = source_cfg.source
  if source == "hf":
    if not source_cfg.hf_name:
      raise DataError("data.source='hf' needs data.hf_name (a dataset id, or json/text/parquet with data.path).")
    files = tuple(expand_paths(path)) if path and "://" not in path else ((path,) if path else ())
    return StreamSpec(source_cfg.hf_name, files, source_cfg.hf_config or None, source_cfg.hf_split,
                      source_cfg.field)
  if source not in FILE_BUILDERS:
    raise DataError(f"data.streaming=True works for sources {sorted(FILE_BUILDERS)} and 'hf', not {source!r}.")
  kwargs: tuple = ()
  if source == "text":
    unit = source_cfg.text_unit
    kwargs = (("sample_by", "document" if unit == "file" else "line"),)
  return StreamSpec(FILE_BUILDERS[source], tuple(expand_paths(path)), None, "train",
                    "text" if source == "text" else source_cfg.field, kwargs)


class StreamDataset(grain.IterDataset):
  """The documents of one logical shard of a stream, endless if `repeat`; JSON-able iterator state.

  `split`: 'train' drops, 'val' keeps only the documents that `is_validation` holds out.
  """

  def __init__(self, spec: StreamSpec, stats: DataStats, *, seed: int, shard_index: int = 0,
               num_shards: int = 1, shuffle_files: bool = True, repeat: bool = True,
               split: str = "all", val_fraction: float = 0.0):
    super().__init__()
    self.spec, self.stats, self.seed = spec, stats, seed
    self.shard_index, self.num_shards = shard_index, num_shards
    self.shuffle_files, self.repeat = shuffle_files, repeat
    self.split, self.val_fraction = split, val_fraction

  def __iter__(self) -> grain.DatasetIterator:
    return _StreamIterator(self)


class _StreamIterator(grain.DatasetIterator):

  def __init__(self, ds: StreamDataset):
    super().__init__()
    self._ds = ds
    self._full = ds.spec.open()
    self._num_files = self._full.num_shards
    self._epoch, self._pos, self._read = 0, 0, 0
    self._docs_this_epoch = 0
    self._records: Iterator | None = None

  def _epoch_files(self, epoch: int) -> tuple[list[int], bool]:
    """This shard's files (indices into the stream's shards) for one epoch, and whether every
    record of them is ours (file split) or only every num_shards-th (record split)."""
    order = np.arange(self._num_files)
    if self._ds.shuffle_files:
      order = np.random.default_rng([self._ds.seed, epoch]).permutation(self._num_files)
    n, s = self._ds.num_shards, self._ds.shard_index
    if self._num_files % n == 0:
      return [int(i) for i in order[s::n]], True
    return [int(i) for i in order], False

  def _file_name(self, file_index: int) -> str:
    files = self._ds.spec.data_files
    return files[file_index] if len(files) == self._num_files else f"{self._ds.spec.name} shard {file_index}"

  def _open_current(self) -> None:
    files, _ = self._epoch_files(self._epoch)
    shard = self._full.shard(num_shards=self._num_files, index=files[self._pos], contiguous=True)
    self._records = itertools.islice(iter(shard), self._read, None)

  def __next__(self) -> str:
    while True:
      files, whole_files = self._epoch_files(self._epoch)
      if self._pos >= len(files):
        if not self._ds.repeat:
          raise StopIteration
        if self._docs_this_epoch == 0:
          raise self._ds.stats.nothing_error(f"stream {self._ds.spec.name!r} (shard {self._ds.shard_index})")
        self._epoch, self._pos, self._read, self._docs_this_epoch = self._epoch + 1, 0, 0, 0
        self._records = None
        continue
      if self._records is None:
        self._open_current()
      where = f"{self._file_name(files[self._pos])} record {self._read + 1}"
      try:
        record = next(self._records)
      except StopIteration:
        self._pos, self._read, self._records = self._pos + 1, 0, None
        continue
      except Exception as e:  # pyarrow/json decoding errors surface here, typed by the builder
        raise DataError(f"{where}: cannot be read ({type(e).__name__}: {str(e)[:200]}); fix or remove "
                        "the file.") from e
      self._read += 1
      ours = whole_files or (self._read - 1) % self._ds.num_shards == self._ds.shard_index
      if not ours:
        continue
      doc = record_text(record, self._ds.spec.field, where, self._ds.stats)
      if doc is None:
        continue
      if self._ds.split != "all" and is_validation(doc, self._ds.val_fraction) != (self._ds.split == "val"):
        self._ds.stats.counts[f"left to the {'train' if self._ds.split == 'val' else 'val'} split"] += 1
        continue
      self._docs_this_epoch += 1  # only documents handed out: an epoch of none would loop forever
      self._ds.stats.counts["documents"] += 1
      return doc

  def get_state(self) -> dict[str, Any]:
    return {"epoch": self._epoch, "file": self._pos, "read": self._read, "docs": self._docs_this_epoch}

  def set_state(self, state: dict[str, Any]) -> None:
    self._epoch, self._pos, self._read = state["epoch"], state["file"], state["read"]
    self._docs_this_epoch = state["docs"]
    self._records = None
