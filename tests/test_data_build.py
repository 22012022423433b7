"""From config to data (mixtures of files and streams, validation splits), and exact resume through train.run."""

import re
import shutil

import numpy as np
import pytest

from jaxllm.data.build import build_lm_data
from jaxllm.data.sources import DataError
from tests.helpers import make_tiny_config, write_corpus


def test_mixture_of_a_file_and_a_stream_with_document_packing(tmp_path):
  stream_path = write_corpus(str(tmp_path / "stream.jsonl"), num_docs=120, seed=5)
  config = make_tiny_config(tmp_path, **{"data.packing": "document", "data.num_shards": 2,
                                         "data.shuffle_buffer": 32, "train.eval_steps": 2})
  config.data.sources = dict(files=dict(weight=3.0),
                             web=dict(source="hf", hf_name="json", path=stream_path, weight=1.0))
  data = build_lm_data(config, str(tmp_path / "work"))
  it = iter(data.train)
  batch = next(it)
  assert batch["inputs"].shape == batch["segment_ids"].shape == batch["positions"].shape == (8, 32)
  np.testing.assert_array_equal(batch["weights"], batch["segment_ids"] > 0)
  assert len(data.val_batches) == 2 and data.val_batches[0]["inputs"].shape == (8, 32)
  assert "files: documents: 200" in data.summary() and "web: documents:" in data.summary()
  it.close()


def test_stream_validation_split_is_disjoint_from_training(tmp_path):
  from jaxllm.data.build import _Source, source_configs
  path = write_corpus(str(tmp_path / "c.jsonl"), num_docs=200)
  config = make_tiny_config(tmp_path, **{"data.streaming": True, "data.path": path, "data.val_fraction": 0.2})
  source = _Source(source_configs(config.data)["main"], seed=0, shuffle_buffer=0)
  val = set(iter(source.val()(0, 1)))
  it = iter(source.train()(0, 1))
  train = {next(it) for _ in range(200 - len(val))}
  assert 20 <= len(val) <= 60 and not val & train and len(val | train) == 200


@pytest.mark.parametrize("key,value,message", [
    ("data.packing", "best", "data.packing='best'; use one of"),
    ("data.pack_bins", 0, "data.pack_bins=0 must be at least 1"),
    ("data.num_shards", 3, "data.num_shards=3 must be a multiple of the 1 processes and divide train.batch_size=8"),
])
def test_bad_data_config_is_one_clear_line(tmp_path, key, value, message):
  from jaxllm.config import ConfigError
  with pytest.raises(ConfigError, match=re.escape(message)):
    build_lm_data(make_tiny_config(tmp_path, **{key: value}), str(tmp_path / "work"))


def test_validation_shorter_than_a_batch_is_a_clear_error(tmp_path):
  path = write_corpus(str(tmp_path / "small.jsonl"), num_docs=10)
  config = make_tiny_config(tmp_path, **{"data.path": path, "data.val_fraction": 0.1, "train.batch_size": 16,
                                         "data.seq_len": 32})
  with pytest.raises(DataError, match="validation split is shorter than one batch"):
    build_lm_data(config, str(tmp_path / "work"))


def test_stopped_and_resumed_run_sees_the_unbroken_runs_batches(tmp_path):
  """A streamed, document-packed run stopped after step 2 and resumed ends exactly like an unbroken one."""
  from jaxllm import train
  config = make_tiny_config(tmp_path, **{"data.streaming": True, "data.packing": "document", "data.num_shards": 2,
                                         "data.shuffle_buffer": 16, "train.steps": 4, "train.checkpoint_every": 2,
                                         "train.eval_every": 4, "train.async_checkpoint": False})
  unbroken = train.run(config, str(tmp_path / "run"))
  shutil.rmtree(tmp_path / "run" / "checkpoints" / "4")  # as if stopped right after the step-2 checkpoint
  resumed = train.run(config, str(tmp_path / "run"))
  assert resumed["loss"] == unbroken["loss"] and resumed["eval_loss"] == unbroken["eval_loss"]
