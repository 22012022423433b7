"""The grain pipeline: packing modes, host-count-free sharding, exact resume (files and streams), mixtures."""

import json
import os
import random

import grain
import numpy as np
import pytest

from jaxllm.config import default_config
from jaxllm.data.pipeline import (PackSpec, host_shards, lm_batches, memory_documents, restore_iterator,
                                  saved_position)
from jaxllm.data.sources import DataError, DataStats
from jaxllm.data.stream import StreamDataset, spec_from_config
from jaxllm.tokenizer import train_bpe
from tests.helpers import _WORDS

SEQ = 16


def random_docs(n, seed=0, lo=1, hi=40, prefix="doc"):
  rng = random.Random(seed)
  return [f"{prefix} {i}: " + " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi))) for i in range(n)]


@pytest.fixture(scope="module")
def tok():
  return train_bpe(random_docs(200) + ["aaaa bbbb"] * 5, 300)


def spec_for(tok, packing="concat", **kw):
  return PackSpec(tok, tok.eos_token_id, SEQ, packing, pack_bins=kw.pop("pack_bins", 8), tokenize_batch=4, **kw)


def ids(tok, doc):
  return tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def write_jsonl_files(folder, num_files, docs_per_file, seed=0):
  os.makedirs(folder, exist_ok=True)
  docs = random_docs(num_files * docs_per_file, seed)
  for f in range(num_files):
    with open(os.path.join(folder, f"part{f}.jsonl"), "w", encoding="utf-8") as out:
      for doc in docs[f * docs_per_file:(f + 1) * docs_per_file]:
        out.write(json.dumps({"text": doc}) + "\n")
  return folder


def stream_fn(folder, seed=0, shuffle_buffer=0):
  cfg = default_config().data
  cfg.update(source="jsonl", path=folder, streaming=True)
  spec = spec_from_config(cfg)

  def make(s, n):
    ds = StreamDataset(spec, DataStats(), seed=seed, shard_index=s, num_shards=n)
    return grain.experimental.WindowShuffleIterDataset(ds, window_size=shuffle_buffer, seed=seed) \
        if shuffle_buffer else ds
  return make


def test_concat_rows_are_the_eos_joined_token_stream(tok):
  docs = random_docs(30, lo=20, hi=200)  # many documents longer than several rows
  make = memory_documents(docs, seed=0, shuffle=False, repeat=False)
  batches = list(lm_batches({"d": make}, spec_for(tok), 2, drop_remainder=False))
  stream = np.concatenate([ids(tok, d) for d in docs])
  rows = np.concatenate([b["inputs"] for b in batches])
  assert rows.shape[1] == SEQ and {"inputs", "targets", "weights"} == set(batches[0])
  full = [r for r, b in zip(rows, np.concatenate([b["weights"] for b in batches])) if b.all()]
  for i, row in enumerate(full):  # row i holds stream tokens [i*(SEQ+1), (i+1)*(SEQ+1))
    np.testing.assert_array_equal(row, stream[i * (SEQ + 1):i * (SEQ + 1) + SEQ])
  assert len(full) == len(stream) // (SEQ + 1)


def test_document_packing_keeps_documents_apart(tok):
  docs = random_docs(40, lo=1, hi=25) + [" ".join(["the cat sat"] * 30)]  # one doc over 5 rows long
  make = memory_documents(docs, seed=0, shuffle=False, repeat=False)
  batches = list(lm_batches({"d": make}, spec_for(tok, "document"), 4, drop_remainder=False))
  pieces = []
  for b in batches:
    assert set(b) == {"inputs", "targets", "weights", "segment_ids", "positions"}
    for inp, tgt, w, seg, pos in zip(b["inputs"], b["targets"], b["weights"], b["segment_ids"], b["positions"]):
      np.testing.assert_array_equal(w, (seg > 0).astype(np.float32))  # padding carries no loss
      for s in np.unique(seg[seg > 0]):
        where = np.flatnonzero(seg == s)
        assert (np.diff(where) == 1).all()  # a segment is one contiguous run
        np.testing.assert_array_equal(pos[where], np.arange(len(where)))  # positions restart per document
        np.testing.assert_array_equal(tgt[where][:-1], inp[where][1:])  # targets are next tokens of the same doc
        pieces.append((tuple(inp[where]), tuple(tgt[where])))
  expected = []
  for d in docs:
    t = np.asarray(ids(tok, d))
    expected += [(tuple(t[:-1][i:i + SEQ]), tuple(t[1:][i:i + SEQ])) for i in range(0, len(t) - 1, SEQ)]
  assert sorted(pieces) == sorted(expected)  # every document, whole or cut in seq_len pieces, exactly once
  total = sum(b["weights"].size for b in batches)
  assert sum(b["weights"].sum() for b in batches) / total > 0.75


@pytest.mark.parametrize("packing", ["concat", "document"])
def test_global_batch_does_not_depend_on_process_count(tok, packing):
  make = memory_documents(random_docs(300), seed=1)
  one = iter(lm_batches({"d": make}, spec_for(tok, packing), 8, num_shards=4))
  hosts = [iter(lm_batches({"d": make}, spec_for(tok, packing), 8, num_shards=4, process_index=h, process_count=2))
           for h in range(2)]
  for _ in range(3):
    global_batch = next(one)
    halves = [next(h) for h in hosts]
    assert halves[0]["inputs"].shape == (4, SEQ)
    assert_same([global_batch], [{k: np.concatenate([halves[0][k], halves[1][k]]) for k in global_batch}])
  assert list(host_shards(8, 1, 4)) == [2, 3]
  with pytest.raises(ValueError, match="not divisible by data.num_shards=3"):
    lm_batches({"d": make}, spec_for(tok), 8, num_shards=3)


def test_stream_global_batch_does_not_depend_on_process_count(tok, tmp_path):
  make = stream_fn(write_jsonl_files(str(tmp_path / "s"), 4, 10), shuffle_buffer=8)
  one = take(iter(lm_batches({"d": make}, spec_for(tok), 4, num_shards=2)), 3)
  hosts = [take(iter(lm_batches({"d": make}, spec_for(tok), 4, num_shards=2, process_index=h, process_count=2)), 3)
           for h in range(2)]
  assert_same(one, [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*hosts)])


def test_seeded_and_deterministic(tok):
  docs = random_docs(100)
  first = lambda seed: next(iter(lm_batches({"d": memory_documents(docs, seed=seed)}, spec_for(tok), 4)))
  assert_same([first(0)], [first(0)])
  assert not np.array_equal(first(0)["inputs"], first(1)["inputs"])


def resume_matches(dataset, k, m):
  """Batches k+1..k+m of an unbroken iterator == those of a fresh one restored from the state at k."""
  unbroken = iter(dataset)
  take(unbroken, k)
  state = json.loads(json.dumps(saved_position(unbroken)))  # the checkpoint stores it as JSON
  expected = take(unbroken, m)
  resumed = iter(dataset)
  restore_iterator(resumed, state)
  assert_same(take(resumed, m), expected)


@pytest.mark.parametrize("k", [0, 1, 5, 8, 13])
@pytest.mark.parametrize("packing", ["concat", "document"])
def test_resume_inside_the_first_row_shuffle_window_is_exact(tok, packing, k):
  # The quickstart's case: the window refills from the not-yet-started position on restore,
  # whose ConcatThenSplit state holds tuples that plain JSON turns into lists.
  ds = lm_batches({"a": memory_documents(random_docs(80, seed=1), seed=0)}, spec_for(tok, packing), 4,
                  prefetch=2, row_shuffle=32)
  resume_matches(ds, k=k, m=4)


def test_saved_positions_round_trip_exactly():
  from jaxllm.data import position  # pylint: disable=import-outside-toplevel
  state = {"a": (-1, -1), "b": [(1, 2), {"c": np.int64(3)}], "d": {0: "x", 2: (None,)}, "e": 1.5}
  decoded = position.decode(json.loads(json.dumps(position.encode(state))))
  assert decoded == {"a": (-1, -1), "b": [(1, 2), {"c": 3}], "d": {0: "x", 2: (None,)}, "e": 1.5}
  assert type(decoded["a"]) is tuple and type(decoded["b"][0]) is tuple
  legacy = {"parent": {"remainder_slices": {"tokens": [-1, -1]}, "parent_state": {}}}
  restored = position.process_state(json.loads(json.dumps(legacy)), 0, 1)
  assert restored["parent"]["remainder_slices"] == {"tokens": (-1, -1)}


@pytest.mark.parametrize("packing", ["concat", "document"])
def test_resume_from_files_is_exact(tok, packing):
  sources = {"a": memory_documents(random_docs(60, seed=1), seed=0),
             "b": memory_documents(random_docs(20, seed=2, prefix="other"), seed=5)}
  ds = lm_batches(sources, spec_for(tok, packing), 4, weights={"a": 2.0, "b": 1.0}, num_shards=2, prefetch=2)
  resume_matches(ds, k=7, m=6)  # 60 short docs: several epochs pass, each reshuffled


@pytest.mark.parametrize("packing,num_files", [("concat", 3), ("document", 3), ("document", 4)])
def test_resume_from_stream_is_exact(tok, tmp_path, packing, num_files):
  make = stream_fn(write_jsonl_files(str(tmp_path / "s"), num_files, 7), seed=4, shuffle_buffer=5)
  ds = lm_batches({"d": make}, spec_for(tok, packing), 4, num_shards=2, prefetch=2)
  resume_matches(ds, k=9, m=6)  # 21-28 docs: crosses file and epoch boundaries; 3 files split by record


def test_a_position_from_another_pipeline_is_a_clear_error(tok):
  make = memory_documents(random_docs(50), seed=0)
  it = iter(lm_batches({"d": make}, spec_for(tok, "concat"), 4))
  next(it)
  other = iter(lm_batches({"d": make}, spec_for(tok, "document"), 4))
  with pytest.raises(DataError, match="does not fit this data pipeline"):
    restore_iterator(other, saved_position(it))
  more_shards = iter(lm_batches({"d": make}, spec_for(tok, "concat"), 4, num_shards=2))
  with pytest.raises(DataError, match="has 1 logical data shards but this run builds 2.*num_shards=1"):
    restore_iterator(more_shards, saved_position(it))


def test_stream_shuffles_file_order_per_epoch_and_splits_files_between_shards(tmp_path):
  folder = write_jsonl_files(str(tmp_path / "s"), 4, 3)
  make = stream_fn(folder, seed=0)

  def file_order(docs):
    return [int(d.split(":")[0].split()[1]) // 3 for d in docs[::3]]
  it = iter(make(0, 1))
  epochs = [file_order(take(it, 12)) for _ in range(4)]
  assert all(sorted(e) == [0, 1, 2, 3] for e in epochs) and len({tuple(e) for e in epochs}) > 1
  assert epochs == [file_order(take(it2, 12)) for it2 in [iter(make(0, 1))] for _ in range(4)]
  halves = [set(take(iter(make(s, 2)), 6)) for s in range(2)]
  assert not halves[0] & halves[1] and len(halves[0] | halves[1]) == 12
  odd = [set(take(iter(make(s, 3)), 4)) for s in range(3)]  # 4 files, 3 shards: split by record
  assert len(set.union(*odd)) == 12


def test_mixture_weights_are_shares_of_rows(tok):
  sources = {"a": memory_documents(["aaaa bbbb aaaa"] * 20, seed=0),
             "b": memory_documents(random_docs(50), seed=0)}
  batches = take(iter(lm_batches(sources, spec_for(tok), 8, weights={"a": 3.0, "b": 1.0})), 10)
  aaaa = tok("aaaa", add_special_tokens=False)["input_ids"][0]
  rows = np.concatenate([b["inputs"] for b in batches])
  share_a = np.mean([(row == aaaa).sum() > 3 for row in rows])
  assert 0.7 <= share_a <= 0.8


def test_parallel_tokenizing_yields_the_sequential_tokens_and_resumes_exactly(tok):
  from jaxllm.data.packing import tokenize  # pylint: disable=import-outside-toplevel
  docs = random_docs(60, seed=3)
  def tokens(num_threads):
    source = grain.MapDataset.source(docs).to_iter_dataset()
    return tokenize(source, tok, tok.eos_token_id, batch_size=4, num_threads=num_threads)
  sequential = [e["tokens"].tolist() for e in tokens(0)]
  assert sequential == [ids(tok, d) for d in docs]
  it = iter(tokens(3))
  first = [next(it)["tokens"].tolist() for _ in range(13)]  # stops inside a batch, with batches in flight
  state = it.get_state()
  resumed = iter(tokens(3))
  resumed.set_state(state)
  assert first + [e["tokens"].tolist() for e in resumed] == sequential


def test_a_tokenizer_error_surfaces_at_its_document():
  from jaxllm.data.packing import ParallelMapIterDataset  # pylint: disable=import-outside-toplevel
  def fn(x):
    if x == 5:
      raise ValueError("bad record 5")
    return x * 10
  it = iter(ParallelMapIterDataset(grain.MapDataset.range(10).to_iter_dataset(), fn, num_threads=2))
  assert [next(it) for _ in range(5)] == [0, 10, 20, 30, 40]
  with pytest.raises(ValueError, match="bad record 5"):
    next(it)


def job_position(iterators):
  """What `saved_position` checkpoints for a job whose processes hold `iterators` (the gather simulated)."""
  from jaxllm.data import position  # pylint: disable=import-outside-toplevel
  parts = [json.loads(json.dumps(position.encode(it.get_state()))) for it in iterators]
  return json.loads(json.dumps(position.job_position(iterators[0].get_state(), lambda _: parts, len(iterators))))


def global_batches(iterators, n):
  return [{k: np.concatenate([b[k] for b in parts]) for k in parts[0]}
          for parts in zip(*[take(it, n) for it in iterators])]


def assert_elastic(make, k=5, m=4, changes=((2, 1), (2, 4), (1, 2))):
  """make(process_index, process_count) -> that process's dataset. A position saved by 2 processes
  resumes on 1 and 4, one saved by 1 resumes on 2, each with the batches of the unbroken job."""
  for saved_by, resumed_by in changes:
    unbroken = [iter(make(h, saved_by)) for h in range(saved_by)]
    global_batches(unbroken, k)
    saved = job_position(unbroken)
    resumed = [iter(make(h, resumed_by)) for h in range(resumed_by)]
    for h, it in enumerate(resumed):
      restore_iterator(it, saved, h, resumed_by)
    assert_same(global_batches(resumed, m), global_batches(unbroken, m))


@pytest.mark.parametrize("packing", ["concat", "document"])
def test_lm_position_resumes_on_another_process_count(tok, tmp_path, packing):
  sources = {"a": memory_documents(random_docs(60, seed=1), seed=0),
             "b": stream_fn(write_jsonl_files(str(tmp_path / "s"), 4, 7), seed=4, shuffle_buffer=5)}
  assert_elastic(lambda h, n: lm_batches(sources, spec_for(tok, packing), 8, weights={"a": 2.0, "b": 1.0},
                                         num_shards=4, process_index=h, process_count=n, prefetch=2,
                                         row_shuffle=4))


def test_windows_and_instruction_tuning_positions_resume_on_another_process_count():
  from jaxllm.data import sft  # pylint: disable=import-outside-toplevel
  from jaxllm.data.windows import window_batches, window_rows  # pylint: disable=import-outside-toplevel
  rows = window_rows(np.arange(500, dtype=np.int32), SEQ, seed=0)
  assert_elastic(lambda h, n: window_batches(rows, 8, h, n))
  rng = np.random.default_rng(0)
  examples = [sft.Encoded(rng.integers(0, 50, n).astype(np.int32), np.ones(n, np.float32))
              for n in rng.integers(3, 30, 80)]
  # Padded: the width comes from the global batch, whatever the process count. (Each iterator's
  # read-ahead threads cost a while here, so fewer changes.)
  assert_elastic(lambda h, n: sft.sft_dataset(examples, 8, seq_len=32, bucket_batches=2, process_index=h,
                                              process_count=n), changes=((2, 1), (1, 2)))


def test_a_per_process_position_refuses_another_process_count(tok):
  make = memory_documents(random_docs(60), seed=0)
  # A pipeline that deals documents to processes, as masked-LM did before logical shards: its
  # checkpoints hold one position per process.
  hosts = [iter(make(h, 2)) for h in range(2)]
  take(hosts[0], 3), take(hosts[1], 5)
  saved = job_position(hosts)
  for h in range(2):  # the same process count: each takes its own
    again = iter(make(h, 2))
    restore_iterator(again, saved, h, 2)
    assert next(again) == next(hosts[h])
  with pytest.raises(DataError, match="saved by 2 processes and this run has 1.*run that many"):
    restore_iterator(iter(make(0, 1)), saved, 0, 1)


@pytest.mark.parametrize("num_shards", [1, 2])
def test_a_position_saved_before_per_shard_positions_still_resumes(tok, num_shards):
  from jaxllm.data import position  # pylint: disable=import-outside-toplevel
  ds = lm_batches({"d": memory_documents(random_docs(60, seed=1), seed=0)}, spec_for(tok), 4,
                  num_shards=num_shards, row_shuffle=8)
  unbroken = iter(ds)
  take(unbroken, 3)
  shards = [unbroken.get_state()["shards"][str(s)] for s in range(num_shards)]
  # What a single process saved then: format 2, its one shard's state or grain Zip's {"parents"}.
  old = {"format": 2, "state": position.encode(shards[0] if num_shards == 1 else {"parents": shards})}
  resumed = iter(ds)
  restore_iterator(resumed, json.loads(json.dumps(old)))
  assert_same(take(resumed, 4), take(unbroken, 4))
