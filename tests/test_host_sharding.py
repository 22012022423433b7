"""One host-sharding scheme for every task: the global batch of causal LM, instruction tuning
(padded and packed, with prefix-LM flags) and masked LM is the same whether one process builds
it or two simulated processes (process_index / process_count, in this process) build halves of
it; and a position saved by one process count resumes on another (elastic resume)."""

import numpy as np
import pytest

from jaxllm.data import sft
from jaxllm.data.mlm import masking_spec, mlm_dataset
from jaxllm.data.pipeline import lm_batches, memory_documents
from jaxllm.tokenizer import train_tokenizer
from tests.test_data_pipeline import (assert_elastic, assert_same, global_batches, random_docs, spec_for,
                                      tok)  # noqa: F401  (tok: a fixture)

BATCH, NUM_SHARDS = 8, 2


@pytest.fixture(scope="module")
def wordpiece():
  return train_tokenizer(random_docs(200), "wordpiece", 200)


def sft_examples():
  rng = np.random.default_rng(0)
  return [sft.Encoded(rng.integers(1, 50, n).astype(np.int32), (np.arange(n) >= n // 3).astype(np.float32),
                      prefix_len=int(n // 3)) for n in rng.integers(3, 30, 80)]


def make_task(name, tok, wordpiece):  # noqa: F811
  """name -> make(process_index, process_count): that process's dataset of the task."""
  if name == "lm":
    sources = {"d": memory_documents(random_docs(120, seed=1), seed=0)}
    return lambda h, n: lm_batches(sources, spec_for(tok, "document"), BATCH, num_shards=NUM_SHARDS,
                                   process_index=h, process_count=n)
  if name.startswith("sft"):
    examples = sft_examples()
    return lambda h, n: sft.sft_dataset(examples, BATCH, seq_len=32, packing=name == "sft-packed", prefix_lm=True,
                                        pack_bins=4, bucket_batches=2, num_shards=NUM_SHARDS,
                                        process_index=h, process_count=n)
  docs = random_docs(150, seed=2)
  spec = masking_spec(wordpiece)
  return lambda h, n: mlm_dataset(docs, wordpiece, spec, 16, BATCH, seed=0, mask_seed=1, num_shards=NUM_SHARDS,
                                  process_index=h, process_count=n)


TASKS = ["lm", "sft-padded", "sft-packed", "mlm"]


@pytest.mark.parametrize("name", TASKS)
def test_global_batch_is_the_same_on_one_and_two_processes(name, tok, wordpiece):  # noqa: F811
  make = make_task(name, tok, wordpiece)
  one = global_batches([iter(make(0, 1))], 3)
  two = global_batches([iter(make(h, 2)) for h in range(2)], 3)
  assert two[0]["inputs"].shape[0] == BATCH
  assert_same(two, one)
  if name.startswith("sft"):
    assert "in_prefix" in one[0] and one[0]["in_prefix"].any()


@pytest.mark.parametrize("name", ["sft-packed", "mlm"])
def test_position_resumes_on_another_process_count(name, tok, wordpiece):  # noqa: F811
  """Packed instruction tuning and masked LM keep their position per logical shard, like LM
  (tests/test_data_pipeline.py): saved on 2 processes, resumed on 1, and the other way."""
  assert_elastic(make_task(name, tok, wordpiece), changes=((2, 1), (1, 2)))


def test_a_masked_lm_position_kept_per_process_still_resumes_on_its_process_count(tok, wordpiece):  # noqa: F811
  """Masked-LM checkpoints written before logical shards hold one position per process, that
  process's batch iterator: the same stages and seeds as logical shard h of num_shards = the
  process count, so they resume on that count (and refuse another with one clear line)."""
  from jaxllm.data import position  # pylint: disable=import-outside-toplevel
  from jaxllm.data.pipeline import restore_iterator  # pylint: disable=import-outside-toplevel
  from jaxllm.data.sources import DataError  # pylint: disable=import-outside-toplevel
  make = make_task("mlm", tok, wordpiece)
  unbroken = [iter(make(h, 2)) for h in range(2)]
  global_batches(unbroken, 3)
  old = {"format": 3, "process_count": 2,
         "state": {"processes": [position.encode(it.get_state()["shards"][str(h)]) for h, it in enumerate(unbroken)]}}
  resumed = [iter(make(h, 2)) for h in range(2)]
  for h, it in enumerate(resumed):
    restore_iterator(it, old, h, 2)
  assert_same(global_batches(resumed, 3), global_batches(unbroken, 3))
  with pytest.raises(DataError, match="saved by 2 processes and this run has 1"):
    restore_iterator(iter(make(0, 1)), old, 0, 1)
