"""All documents of a configured source, whichever kind it is: the one entry point over
the memory readers (sources.py) and, for a stream read once in file order, stream.py.

It sits above both so that neither imports the other.
"""

from __future__ import annotations

from typing import Any, Sequence

from jaxllm.config_types import DataConfig, SourceConfig
from jaxllm.data.sources import (DataError, DataStats, SavedDataset, capped, jsonl_documents,
                                 parquet_documents, stdlib_documents, text_documents)
from jaxllm.data.stream import StreamDataset, spec_from_config


def load_documents(data_cfg: SourceConfig | DataConfig | Any, stats: DataStats | None = None,
                   path: str | None = None) -> Sequence[str]:
  """All documents of the source (`data.source`, at `path` or `data.path`), in a fixed order.
  `data_cfg`: config.data or one resolved source of it (the source keys of config_types.py)."""
  stats = stats if stats is not None else DataStats(data_cfg.on_bad_record)
  source, max_chars = data_cfg.source, data_cfg.max_chars
  path = data_cfg.path if path is None else path
  field = data_cfg.field
  if source == "stdlib":
    docs = stdlib_documents(max_chars)
  elif source == "text":
    docs = capped(text_documents(path, data_cfg.text_unit, stats), max_chars)
  elif source == "jsonl":
    docs = capped(jsonl_documents(path, field, stats), max_chars)
  elif source == "parquet":
    docs = capped(parquet_documents(path, field, stats), max_chars)
  elif source == "hf_disk":
    docs = SavedDataset(path, field, data_cfg.hf_split)
  elif source == "hf" or data_cfg.streaming:
    # One pass in file order (e.g. to fit a tokenizer): cap it with data.max_chars for a big stream.
    docs = capped(iter(StreamDataset(spec_from_config(data_cfg, path), stats, seed=0, shuffle_files=False,
                                      repeat=False)), max_chars)
  else:
    raise DataError(f"data.source={source!r} is not known; use stdlib, text, jsonl, parquet, hf_disk "
                    "or hf (streaming).")
  if len(docs) == 0:
    raise stats.nothing_error(f"{source!r} at {path!r}")
  stats.counts["documents"] += len(docs)
  return docs
