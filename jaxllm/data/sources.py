"""Where documents come from: text files and folders, JSONL fields, the Python standard library.

A source yields documents (strings). Errors name the file (and line) and say what to do.
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig
from typing import Any, Iterator


class DataError(ValueError):
  """Input data that cannot be used; the message names the file/record and the fix."""


def stdlib_documents(max_chars: int = 0) -> list[str]:
  """The Python standard library's own .py files, one document each, in a fixed order.

  A code corpus present on every machine, so the quickstart needs no download.
  """
  root = sysconfig.get_paths()["stdlib"]
  paths = sorted(p for p in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
                 if "site-packages" not in p and f"{os.sep}test" not in p[len(root):])
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


def _expand_paths(path: str) -> list[str]:
  if any(ch in path for ch in "*?["):
    paths = sorted(glob.glob(path, recursive=True))
  elif os.path.isdir(path):
    paths = sorted(p for p in glob.glob(os.path.join(path, "**", "*"), recursive=True) if os.path.isfile(p))
  elif os.path.isfile(path):
    paths = [path]
  else:
    raise DataError(f"data.path={path!r}: no such file or directory; point it at a text/JSONL file, "
                    "a folder or a glob.")
  if not paths:
    raise DataError(f"data.path={path!r}: matches no files.")
  return paths


def text_documents(path: str, unit: str = "file") -> Iterator[str]:
  """Plain text: one document per file (`unit='file'`) or per non-empty line (`unit='line'`)."""
  for file_path in _expand_paths(path):
    try:
      with open(file_path, encoding="utf-8") as f:
        if unit == "line":
          for line in f:
            if line.strip():
              yield line.rstrip("\n")
        else:
          text = f.read()
          if text.strip():
            yield text
    except UnicodeDecodeError as e:
      raise DataError(f"{file_path}: not valid UTF-8 (byte {e.start}); convert it to UTF-8 "
                      "or remove it from data.path.") from e
    except OSError as e:
      raise DataError(f"{file_path}: cannot be read ({e.strerror}).") from e


def jsonl_documents(path: str, field: str) -> Iterator[str]:
  """The string at `field` of every record of JSON-lines files (or a JSON list file)."""
  for file_path in _expand_paths(path):
    with open(file_path, encoding="utf-8") as f:
      head = f.read(1)
      f.seek(0)
      if head == "[":
        try:
          records = json.load(f)
        except json.JSONDecodeError as e:
          raise DataError(f"{file_path}: invalid JSON at line {e.lineno}: {e.msg}.") from e
        numbered = enumerate(records, 1)
      else:
        numbered = _jsonl_records(f, file_path)
      for line_no, record in numbered:
        if not isinstance(record, dict) or field not in record:
          raise DataError(f"{file_path}: record {line_no} has no field {field!r}; set data.field to "
                          f"one of {sorted(record)[:8] if isinstance(record, dict) else 'its keys'}.")
        yield str(record[field])


def _jsonl_records(f, file_path: str) -> Iterator[tuple[int, Any]]:
  for line_no, line in enumerate(f, 1):
    if not line.strip():
      continue
    try:
      yield line_no, json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{file_path}: invalid JSON on line {line_no}: {e.msg}.") from e


def load_documents(data_cfg: Any) -> list[str]:
  """All documents of the configured source, in a fixed order."""
  source = data_cfg.source
  if source == "stdlib":
    docs = stdlib_documents(data_cfg.get("max_chars", 0))
  elif source == "text":
    docs = list(text_documents(data_cfg.path, data_cfg.get("text_unit", "file")))
  elif source == "jsonl":
    docs = list(jsonl_documents(data_cfg.path, data_cfg.field))
  else:
    raise DataError(f"data.source={source!r} is not known; use 'stdlib', 'text' or 'jsonl'.")
  if data_cfg.get("max_chars", 0) and source != "stdlib":
    kept, total = [], 0
    for doc in docs:
      kept.append(doc)
      total += len(doc)
      if total >= data_cfg.max_chars:
        break
    docs = kept
  if not docs:
    raise DataError(f"data.source={source!r} path={data_cfg.get('path', '')!r}: yielded no documents.")
  return docs


def train_val_split(docs: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
  """Holds out a fixed, seeded fraction of the documents for validation."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  if not 0 <= val_fraction < 1:
    raise DataError(f"data.val_fraction={val_fraction} must be in [0, 1).")
  order = np.random.default_rng(seed).permutation(len(docs))
  num_val = int(round(len(docs) * val_fraction))
  if val_fraction > 0:
    num_val = min(max(num_val, 1), len(docs) - 1)
  val = [docs[i] for i in sorted(order[:num_val])]
  train = [docs[i] for i in sorted(order[num_val:])]
  return train, val
