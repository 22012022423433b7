"""Where documents come from: local files read into memory, a `datasets` directory, the Python stdlib.

A "memory" source is a random-access sequence of documents (strings), so the
pipeline can shuffle it globally and resume by index. Streams (corpora larger
than memory or disk) live in `stream.py`. Records that cannot be used are either
counted and skipped (`data.on_bad_record='skip'`, the counts are logged) or stop
the run with one line naming the file and record (`'error'`).
"""

from __future__ import annotations

import collections
import glob
import json
import os
import random
import sysconfig
import zlib
from typing import Any, Iterator, Sequence

from jaxllm.errors import DataError


class DataStats:
  """Counts of documents read and records skipped (and why), with the first example of each skip.

  Shared by the readers of one source; `summary()` is what the training log shows.
  """

  def __init__(self, on_bad_record: str = "skip"):
    if on_bad_record not in ("skip", "error"):
      raise DataError(f"data.on_bad_record={on_bad_record!r}; use 'skip' or 'error'.")
    self.on_bad_record = on_bad_record
    self.counts: collections.Counter = collections.Counter()
    self.first: dict[str, str] = {}

  def bad(self, reason: str, where: str, fix: str = "") -> None:
    """Records one unusable record: raises in 'error' mode, else counts it."""
    if self.on_bad_record == "error":
      raise DataError(f"{where}: {reason}{'; ' + fix if fix else ''}.")
    self.counts[f"skipped ({reason})"] += 1
    self.first.setdefault(f"skipped ({reason})", where)

  def summary(self) -> str:
    parts = [f"{k}: {v}" + (f" (first: {self.first[k]})" if k in self.first else "")
             for k, v in sorted(self.counts.items())]
    return "; ".join(parts) if parts else "nothing read yet"

  def nothing_error(self, name: str) -> DataError:
    return DataError(f"data source {name} yielded no documents ({self.summary()}); check data.path, "
                     "data.field and data.source.")


def stdlib_documents(max_chars: int = 0) -> list[str]:
  """The Python standard library's own .py files, one document each, in a fixed order.

  A code corpus present on every machine, so the quickstart needs no download.
  """
  root = sysconfig.get_paths()["stdlib"]
  # Leave out tests, vendored packages and generated data tables (codec maps, pydoc topics):
  # they are not the kind of code a model should learn to write.
  skip = {"site-packages", "test", "tests", "encodings", "pydoc_data", "idlelib", "lib2to3",
          "turtledemo", "ensurepip", "__phello__"}
  paths = sorted(p for p in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
                 if not skip & set(os.path.relpath(p, root).split(os.sep)[:-1])
                 and os.path.getsize(p) < 200_000)
  # A fixed shuffle, so a character cap samples the whole library rather than its first folders.
  random.Random(0).shuffle(paths)
  docs, total = [], 0
  for path in paths:
    try:
      with open(path, encoding="utf-8") as f:
        text = f.read()
    except (UnicodeDecodeError, OSError):
      continue
    if not text.strip():
      continue
    docs.append(text)
    total += len(text)
    if max_chars and total >= max_chars:
      break
  return docs


def expand_paths(path: str) -> list[str]:
  """A file, a folder (every file below it) or a glob, as a sorted list of files."""
  if not path:
    raise DataError("data.path is empty; point it at a file, a folder or a glob.")
  if any(ch in path for ch in "*?["):
    paths = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
  elif os.path.isdir(path):
    paths = sorted(p for p in glob.glob(os.path.join(path, "**", "*"), recursive=True) if os.path.isfile(p))
  elif os.path.isfile(path):
    paths = [path]
  else:
    raise DataError(f"data.path={path!r}: no such file or directory; point it at a file, a folder or a glob.")
  if not paths:
    raise DataError(f"data.path={path!r}: matches no files.")
  return paths


def _read_text(file_path: str, stats: DataStats) -> str | None:
  try:
    with open(file_path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise DataError(f"{file_path}: cannot be read ({e.strerror}).") from e
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    stats.bad("not valid UTF-8", f"{file_path} byte {e.start}",
              "convert it to UTF-8 or remove it from data.path")
    return None


def _file_texts(path: str, stats: DataStats) -> Iterator[tuple[str, str]]:
  """(file path, text) of every readable, non-empty file under `path`; the others are counted."""
  for file_path in expand_paths(path):
    text = _read_text(file_path, stats)
    if text is None:
      continue
    if not text.strip():
      stats.bad("empty file", file_path)
      continue
    yield file_path, text


def text_documents(path: str, unit: str, stats: DataStats) -> Iterator[str]:
  """Plain text: one document per file (`unit='file'`) or per non-empty line (`unit='line'`)."""
  if unit not in ("file", "line"):
    raise DataError(f"data.text_unit={unit!r}; use 'file' or 'line'.")
  for _, text in _file_texts(path, stats):
    if unit == "file":
      yield text
    else:
      yield from (line for line in text.splitlines() if line.strip())


def record_text(record: Any, field: str, where: str, stats: DataStats) -> str | None:
  """The document at `field` of a record, or None (counted) when it is missing, empty or not text."""
  if not isinstance(record, dict) or record.get(field) is None:
    keys = sorted(record)[:8] if isinstance(record, dict) else type(record).__name__
    stats.bad(f"no field {field!r}", where, f"set data.field to one of {keys}")
    return None
  value = record[field]
  if not isinstance(value, str):
    stats.bad(f"field {field!r} is not text", where)
    return None
  if not value.strip():
    stats.bad("empty document", where)
    return None
  return value


def jsonl_documents(path: str, field: str, stats: DataStats) -> Iterator[str]:
  """The string at `field` of every record of JSON-lines files (or files holding one JSON list)."""
  for file_path, text in _file_texts(path, stats):
    if text.lstrip()[:1] == "[":
      try:
        records = enumerate(json.loads(text), 1)
      except json.JSONDecodeError as e:
        raise DataError(f"{file_path}: invalid JSON at line {e.lineno}: {e.msg}.") from e
      label = "record"
    else:
      records = _jsonl_records(text, file_path, stats)
      label = "line"
    for number, record in records:
      doc = record_text(record, field, f"{file_path} {label} {number}", stats)
      if doc is not None:
        yield doc


def _jsonl_records(text: str, file_path: str, stats: DataStats) -> Iterator[tuple[int, Any]]:
  for line_no, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      yield line_no, json.loads(line)
    except json.JSONDecodeError as e:
      stats.bad("invalid JSON", f"{file_path} line {line_no} ({e.msg})")


def parquet_documents(path: str, field: str, stats: DataStats) -> Iterator[str]:
  """The `field` column of Parquet files, read one record batch at a time."""
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  for file_path in expand_paths(path):
    try:
      parquet = pq.ParquetFile(file_path)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
      raise DataError(f"{file_path}: not a readable Parquet file ({e}).") from e
    if field not in parquet.schema_arrow.names:
      raise DataError(f"{file_path}: no column {field!r}; set data.field to one of "
                      f"{parquet.schema_arrow.names[:8]}.")
    row = 0
    for batch in parquet.iter_batches(columns=[field]):
      for value in batch.column(0).to_pylist():
        row += 1
        doc = record_text({field: value}, field, f"{file_path} row {row}", stats)
        if doc is not None:
          yield doc


class SavedDataset(Sequence):
  """Random access to one text column of a `datasets.Dataset.save_to_disk` directory (memory-mapped)."""

  def __init__(self, path: str, field: str, split: str = "train"):
    import datasets  # pylint: disable=import-outside-toplevel
    try:
      ds = datasets.load_from_disk(path)
    except (FileNotFoundError, ValueError) as e:
      raise DataError(f"data.path={path!r}: not a directory written by save_to_disk ({e}).") from e
    if isinstance(ds, datasets.DatasetDict):
      if split not in ds:
        raise DataError(f"data.path={path!r} holds splits {list(ds)}; set data.hf_split to one of them.")
      ds = ds[split]
    if field not in ds.column_names:
      raise DataError(f"data.path={path!r}: no column {field!r}; set data.field to one of {ds.column_names[:8]}.")
    self._column = ds.select_columns([field]).with_format("arrow")
    self._field, self._path = field, path

  def __len__(self) -> int:
    return len(self._column)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    value = self._column[int(index)][self._field][0].as_py()
    return value if isinstance(value, str) else ""


def capped(docs: Iterator[str], max_chars: int) -> list[str]:
  kept, total = [], 0
  for doc in docs:
    kept.append(doc)
    total += len(doc)
    if max_chars and total >= max_chars:
      break
  return kept


def train_val_split(docs: Sequence[str], val_fraction: float, seed: int) -> tuple[Sequence[str], Sequence[str]]:
  """Holds out a fixed, seeded fraction of the documents for validation."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  if not 0 <= val_fraction < 1:
    raise DataError(f"data.val_fraction={val_fraction} must be in [0, 1).")
  order = np.random.default_rng(seed).permutation(len(docs))
  num_val = int(round(len(docs) * val_fraction))
  if val_fraction > 0:
    num_val = min(max(num_val, 1), len(docs) - 1)
  if isinstance(docs, list):
    return [docs[i] for i in sorted(order[num_val:])], [docs[i] for i in sorted(order[:num_val])]
  return _Subset(docs, sorted(order[num_val:])), _Subset(docs, sorted(order[:num_val]))


class _Subset(Sequence):
  """Some indices of a random-access source, without copying it into memory."""

  def __init__(self, base: Sequence[str], indices: Sequence[int]):
    self._base, self._indices = base, list(indices)

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int) -> str:
    return self._base[self._indices[index]]


def is_validation(text: str, val_fraction: float) -> bool:
  """A stable, order-free train/validation split of a stream: by a hash of the document itself."""
  return val_fraction > 0 and (zlib.crc32(text.encode("utf-8", "replace")) % 1_000_000) < val_fraction * 1_000_000
