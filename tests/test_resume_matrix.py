"""Exact resume as a property of the whole input pipeline, over every data option a config can set.

Each case builds the training data the way `jaxllm.train` does (from a tiny config, through the
real builders), takes the checkpointed position after k batches (k before, inside and at the
edges of a row-shuffle window), sends it through JSON, rebuilds the whole data object from the
config, restores the position and must see exactly the batches the unbroken iterator yields
next. Some cases restore in a fresh process, as a resumed run would.
"""

import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from jaxllm.data.build import build_lm_data
from jaxllm.data.mlm import build_mlm_data
from jaxllm.data.pipeline import restore_iterator, saved_position
from jaxllm.data.sft import build_sft_data
from tests.helpers import REPO_ROOT, make_tiny_config, write_corpus

# batch_size 2, row_shuffle 8: a window is 4 batches with one shard, 8 with two (one row each).
KS = (0, 3, 4, 5, 8, 9)
M = 4  # batches compared after each restore: past the next window edge

BASE = {"train.batch_size": 2, "train.eval_steps": 0, "data.seq_len": 16, "model.max_seq_len": 16,
        "data.prefetch": 0, "data.tokenize_threads": 0, "data.tokenize_batch": 8, "data.pack_bins": 8}
SFT = {"task": "sft", "data.seq_len": 32, "model.max_seq_len": 32, "data.val_fraction": 0.0,
       "data.bucket_batches": 2, "data.pad_multiple": 8}
MLM = {"task": "mlm", "model.family": "bert", "model.vocab_size": 128, "data.tokenizer_vocab_size": 128,
       "data.val_fraction": 0.0}

CASES = {
    "concat": {},
    "concat-row_shuffle": {"data.row_shuffle": 8},
    "document-row_shuffle-prefetch-threads": {"data.packing": "document", "data.row_shuffle": 8,
                                              "data.prefetch": 2, "data.tokenize_threads": 2},
    "mixture": {"data.row_shuffle": 8, "data.prefetch": 2, "sources": "two files"},
    "stream": {"data.row_shuffle": 8, "data.prefetch": 2, "data.tokenize_threads": 2, "sources": "stream"},
    "num_shards-document": {"data.num_shards": 2, "data.packing": "document", "data.row_shuffle": 8,
                            "data.prefetch": 2},
    "num_shards-mixture-stream": {"data.num_shards": 2, "data.row_shuffle": 8, "data.prefetch": 1,
                                  "data.tokenize_threads": 1, "sources": "file and stream"},
    "windows": {"data.packing": "windows"},
    "windows-prefetch": {"data.packing": "windows", "data.prefetch": 2},
    "sft-padded": {**SFT, "data.packing": "concat"},
    "sft-packed": {**SFT, "data.packing": "document"},
    "sft-packed-prefix_lm-num_shards": {**SFT, "data.packing": "document", "sft.prefix_lm": True,
                                        "data.num_shards": 2},
    "mlm": MLM,
    "mlm-num_shards": {**MLM, "data.num_shards": 2},
}
FRESH_PROCESS = {"num_shards-mixture-stream": 5, "windows-prefetch": 3, "sft-packed": 4, "mlm": 9}


def write_records(path, n=60, seed=0):
  rng = np.random.default_rng(seed)
  words = "tell me about cats dogs and the sea write a poem list three colors red blue green".split()
  text = lambda lo, hi: " ".join(rng.choice(words, rng.integers(lo, hi)))  # noqa: E731
  with open(path, "w", encoding="utf-8") as f:
    for i in range(n):
      f.write(json.dumps({"instruction": text(2, 8), "input": text(1, 4) if i % 3 == 0 else "",
                          "output": text(2, 20)}) + "\n")
  return path


def write_stream(folder, num_files=3, seed=3):
  os.makedirs(folder, exist_ok=True)
  for i in range(num_files):
    write_corpus(os.path.join(folder, f"part{i}.jsonl"), num_docs=25, seed=seed + i)
  return folder


def case_config(tmp, name):
  overrides = dict(CASES[name])
  sources = overrides.pop("sources", None)
  config = make_tiny_config(tmp, **{**BASE, **overrides})
  if config.task == "sft":
    config.data.path = write_records(os.path.join(tmp, "sft.jsonl"))
  if sources == "two files":
    other = write_corpus(os.path.join(tmp, "other.jsonl"), num_docs=80, seed=1)
    config.data.sources = {"a": {"path": config.data.path, "weight": 2.0}, "b": {"path": other, "weight": 1.0}}
  elif sources == "stream":
    config.data.update(path=write_stream(os.path.join(tmp, "stream")), streaming=True, shuffle_buffer=5)
  elif sources == "file and stream":
    config.data.shuffle_buffer = 5
    config.data.sources = {"file": {"path": config.data.path, "weight": 1.0},
                           "stream": {"path": write_stream(os.path.join(tmp, "stream")), "streaming": True,
                                      "weight": 1.0}}
  return config


def train_dataset(config, workdir):
  """The training dataset `jaxllm.train.run` builds for this config."""
  if config.task == "sft":
    return build_sft_data(config, workdir).train
  if config.task == "mlm":
    return build_mlm_data(config, workdir)[1]
  return build_lm_data(config, workdir).train


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_same(actual, expected, where):
  assert len(actual) == len(expected), where
  for i, (a, e) in enumerate(zip(actual, expected)):
    assert sorted(a) == sorted(e), where
    for key in e:
      np.testing.assert_array_equal(a[key], e[key], err_msg=f"{where}, batch {i}, {key}")


def close(iterator):
  if hasattr(iterator, "close"):
    iterator.close()  # the prefetch thread


class Unbroken:
  """One case's config, workdir, unbroken batches and the JSON positions after k batches."""

  def __init__(self, tmp, name):
    os.makedirs(tmp, exist_ok=True)
    self.config, self.workdir = case_config(str(tmp), name), os.path.join(str(tmp), "run")
    iterator = iter(train_dataset(self.config, self.workdir))
    self.positions, self.batches = {}, []
    for i in range(max(KS) + M):
      if i in KS or i in FRESH_PROCESS.values():
        self.positions[i] = json.loads(json.dumps(saved_position(iterator)))  # as the checkpoint stores it
      self.batches.append(next(iterator))
    close(iterator)


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
  runs = {}

  def get(name):
    if name not in runs:
      runs[name] = Unbroken(tmp_path_factory.mktemp(name), name)
    return runs[name]
  return get


@pytest.mark.parametrize("name", list(CASES))
def test_restored_position_yields_the_unbroken_batches(unbroken, name):
  run = unbroken(name)
  for k in KS:
    fresh = iter(train_dataset(run.config, run.workdir))  # rebuilt from the config, as on resume
    restore_iterator(fresh, run.positions[k])
    assert_same(take(fresh, M), run.batches[k:k + M], f"{name}, resumed after {k} batches")
    close(fresh)


def test_restored_position_in_a_fresh_process(unbroken, tmp_path):
  jobs = []
  for name, k in FRESH_PROCESS.items():
    run = unbroken(name)
    position = str(tmp_path / f"{name}.json")
    with open(position, "w", encoding="utf-8") as f:
      json.dump(run.positions[k], f)
    jobs.append({"config": run.config.to_dict(), "workdir": run.workdir, "position": position,
                 "out": str(tmp_path / f"{name}.npz")})
  with open(tmp_path / "jobs.json", "w", encoding="utf-8") as f:
    json.dump(jobs, f)
  env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  result = subprocess.run([sys.executable, "-m", "tests.test_resume_matrix", str(tmp_path / "jobs.json")],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  for (name, k), job in zip(FRESH_PROCESS.items(), jobs):
    with np.load(job["out"]) as saved:
      resumed = [{key.split("/", 1)[1]: saved[key] for key in saved.files if key.startswith(f"{i}/")}
                 for i in range(M)]
    assert_same(resumed, unbroken(name).batches[k:k + M], f"{name}, resumed after {k} batches in a fresh process")


def _resume_in_this_process(jobs_file):
  """For each job: build the training data from its config, restore its position, save M batches."""
  with open(jobs_file, encoding="utf-8") as f:
    jobs = json.load(f)
  for job in jobs:
    iterator = iter(train_dataset(ml_collections.ConfigDict(job["config"]), job["workdir"]))
    with open(job["position"], encoding="utf-8") as f:
      restore_iterator(iterator, json.load(f))
    batches = take(iterator, M)
    close(iterator)
    np.savez(job["out"], **{f"{i}/{key}": value for i, batch in enumerate(batches) for key, value in batch.items()})


if __name__ == "__main__":
  _resume_in_this_process(sys.argv[1])
