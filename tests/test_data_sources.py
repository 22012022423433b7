"""Document sources: every file kind, mixtures and splits, and what bad input does (error or counted skip)."""

import json
import os

import ml_collections
import pytest

from jaxllm.config import ConfigError, default_config
from jaxllm.data.build import source_configs
from jaxllm.data.documents import load_documents
from jaxllm.data.sources import DataError, DataStats, is_validation, train_val_split
from jaxllm.data.stream import StreamDataset, spec_from_config


def data_cfg(**kw):
  cfg = default_config().data
  cfg.update(kw)
  return cfg


def write(path, content, mode="w"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
    f.write(content)
  return str(path)


def test_text_per_file_and_per_line_and_folder(tmp_path):
  write(tmp_path / "d" / "a.txt", "first doc\nline two\n")
  write(tmp_path / "d" / "sub" / "b.txt", "second doc\n")
  assert list(load_documents(data_cfg(source="text", path=str(tmp_path / "d")))) == \
      ["first doc\nline two\n", "second doc\n"]
  assert list(load_documents(data_cfg(source="text", path=str(tmp_path / "d"), text_unit="line"))) == \
      ["first doc", "line two", "second doc"]
  assert len(load_documents(data_cfg(source="text", path=str(tmp_path / "d" / "**" / "*.txt")))) == 2


def test_jsonl_and_json_list_with_configured_field(tmp_path):
  write(tmp_path / "a.jsonl", '{"completion": "one"}\n\n{"completion": "two", "x": 1}\n')
  write(tmp_path / "b.json", json.dumps([{"completion": "three"}]))
  assert list(load_documents(data_cfg(source="jsonl", path=str(tmp_path / "a.jsonl"), field="completion"))) == \
      ["one", "two"]
  assert list(load_documents(data_cfg(source="jsonl", path=str(tmp_path / "b.json"), field="completion"))) == \
      ["three"]


def test_parquet_and_saved_datasets_dir(tmp_path):
  import datasets
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"text": ["p1", None, "p3"], "n": [1, 2, 3]}), str(tmp_path / "x.parquet"))
  stats = DataStats()
  assert list(load_documents(data_cfg(source="parquet", path=str(tmp_path / "x.parquet")), stats)) == ["p1", "p3"]
  assert stats.counts["skipped (no field 'text')"] == 1 and "row 2" in stats.summary()
  datasets.Dataset.from_dict({"body": ["s1", "s2", "s3"]}).save_to_disk(str(tmp_path / "saved"))
  docs = load_documents(data_cfg(source="hf_disk", path=str(tmp_path / "saved"), field="body"))
  assert [docs[i] for i in range(len(docs))] == ["s1", "s2", "s3"] and docs[1:] == ["s2", "s3"]
  with pytest.raises(DataError, match="no column 'text'.*body"):
    load_documents(data_cfg(source="hf_disk", path=str(tmp_path / "saved")))


def test_stdlib_source_still_works():
  docs = load_documents(data_cfg(source="stdlib", max_chars=50_000))
  assert 1 <= len(docs) < 100 and all(isinstance(d, str) and d.strip() for d in docs)


def test_bad_records_are_counted_and_named(tmp_path):
  write(tmp_path / "d" / "empty.jsonl", "")
  write(tmp_path / "d" / "good.jsonl", '{"text": "fine"}\n{"title": "no text"}\n{not json}\n{"text": ""}\n')
  write(tmp_path / "d" / "latin1.jsonl", '{"text": "caf\xe9"}\n'.encode("latin-1"), "wb")
  stats = DataStats()
  assert list(load_documents(data_cfg(source="jsonl", path=str(tmp_path / "d")), stats)) == ["fine"]
  summary = stats.summary()
  assert stats.counts["skipped (empty file)"] == 1 and "empty.jsonl" in summary
  assert stats.counts["skipped (no field 'text')"] == 1 and "good.jsonl line 2" in summary
  assert stats.counts["skipped (invalid JSON)"] == 1 and "good.jsonl line 3" in summary
  assert stats.counts["skipped (empty document)"] == 1
  assert stats.counts["skipped (not valid UTF-8)"] == 1 and "latin1.jsonl byte" in summary


def test_bad_records_raise_in_error_mode(tmp_path):
  path = write(tmp_path / "a.jsonl", '{"text": "fine"}\n{"title": "no text"}\n')
  with pytest.raises(DataError, match=r"a.jsonl line 2: no field 'text'; set data.field to one of \['title'\]"):
    load_documents(data_cfg(source="jsonl", path=path, on_bad_record="error"))
  bad = write(tmp_path / "b.txt", b"ok \xff\xfe bytes", "wb")
  with pytest.raises(DataError, match="b.txt byte 3: not valid UTF-8"):
    load_documents(data_cfg(source="text", path=bad, on_bad_record="error"))


def test_source_yielding_nothing_is_an_error_with_the_reason(tmp_path):
  path = write(tmp_path / "a.jsonl", '{"body": "x"}\n{"body": "y"}\n')
  with pytest.raises(DataError, match=r"yielded no documents \(skipped \(no field 'text'\): 2 \(first: .*a.jsonl line 1"):
    load_documents(data_cfg(source="jsonl", path=path))
  with pytest.raises(DataError, match="no such file or directory"):
    load_documents(data_cfg(source="jsonl", path=str(tmp_path / "missing.jsonl")))
  with pytest.raises(DataError, match="not known"):
    load_documents(data_cfg(source="csv", path=path))


def test_stream_source_yielding_nothing_is_an_error_not_a_hang(tmp_path):
  path = write(tmp_path / "a.jsonl", '{"body": "x"}\n')
  spec = spec_from_config(data_cfg(source="jsonl", path=path, streaming=True))
  with pytest.raises(DataError, match="yielded no documents.*no field 'text'"):
    next(iter(StreamDataset(spec, DataStats(), seed=0)))
  path = write(tmp_path / "b.jsonl", '{"text": "x"}\n')
  spec = spec_from_config(data_cfg(source="jsonl", path=path, streaming=True))
  split = "train" if is_validation("x", 0.5) else "val"  # the only document belongs to the other split
  with pytest.raises(DataError, match="yielded no documents.*left to the"):
    next(iter(StreamDataset(spec, DataStats(), seed=0, split=split, val_fraction=0.5)))


def test_stream_record_that_cannot_be_decoded_names_file_and_record(tmp_path):
  path = write(tmp_path / "a.jsonl", b'{"text": "ok"}\n{"text": "\xff\xfe"}\n', "wb")
  spec = spec_from_config(data_cfg(source="jsonl", path=path, streaming=True))
  with pytest.raises(DataError, match="a.jsonl record"):
    list(StreamDataset(spec, DataStats(), seed=0, repeat=False))


def test_val_split_by_fraction_is_seeded_and_disjoint():
  docs = [f"d{i}" for i in range(100)]
  train, val = train_val_split(docs, 0.1, seed=3)
  assert len(val) == 10 and set(train).isdisjoint(val) and set(train) | set(val) == set(docs)
  assert train_val_split(docs, 0.1, seed=3) == (train, val)
  held = [d for d in docs if is_validation(d, 0.3)]
  assert 15 <= len(held) <= 45 and held == [d for d in docs if is_validation(d, 0.3)]


def test_mixture_entries_inherit_top_level_keys():
  cfg = data_cfg(source="jsonl", field="completion", path="/x")
  cfg.sources = dict(web=dict(path="/web", weight=3.0), code=dict(source="stdlib"))
  resolved = source_configs(cfg)
  assert resolved["web"].field == "completion" and resolved["web"].path == "/web" and resolved["web"].weight == 3.0
  assert resolved["code"].source == "stdlib" and list(source_configs(data_cfg())) == ["main"]
  cfg.sources = dict(bad=dict(pathh="/x"))
  with pytest.raises(ConfigError, match="unknown keys.*pathh"):
    source_configs(cfg)
  cfg.sources = ml_collections.ConfigDict(dict(zero=dict(weight=0.0)))
  with pytest.raises(ConfigError, match="weight must be positive"):
    source_configs(cfg)


def test_a_stream_can_be_read_as_a_list(tmp_path):
  path = write(tmp_path / "a.jsonl", "".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(5)))
  assert list(load_documents(data_cfg(source="hf", hf_name="json", path=path))) == [f"doc {i}" for i in range(5)]
  assert list(load_documents(data_cfg(source="jsonl", streaming=True, path=path, max_chars=10))) == ["doc 0", "doc 1"]


def test_text_and_parquet_files_stream_like_they_load(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  write(tmp_path / "t" / "a.txt", "first doc\nline two\n")
  write(tmp_path / "t" / "b.txt", "second doc\n")
  pq.write_table(pa.table({"body": ["p1", "p2"]}), str(tmp_path / "x.parquet"))
  for kw in (dict(source="text", path=str(tmp_path / "t")),
             dict(source="text", path=str(tmp_path / "t"), text_unit="line"),
             dict(source="parquet", path=str(tmp_path / "x.parquet"), field="body")):
    loaded = list(load_documents(data_cfg(**kw)))
    streamed = list(load_documents(data_cfg(streaming=True, **kw)))
    assert [d.strip() for d in streamed] == [d.strip() for d in loaded] and loaded
