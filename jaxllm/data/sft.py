"""Instruction tuning (SFT) data: records -> templated tokens with loss weights -> batches.

Records and templates live in chat.py (a template turns messages into text segments, each
marked prompt or response). Response segments end with EOS and are the only ones with
loss weight 1 (unless `train_on_prompt`). Examples longer than `max_len` lose the
response tail first; the prompt is kept where possible.

Batches are either padded (examples of similar length batched together, padded to
the longest, rounded up to `pad_multiple`) or packed (several examples per row of
`seq_len`, with `segment_ids` and restarting `positions` so none sees another). Both
give the same loss per example; both are grain datasets whose state resumes exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import grain
import numpy as np

from jaxllm.data.pipeline import GlobalPositionIterDataset
# get_template, load_records and register_template are this module's API too (recipes register templates).
from jaxllm.data.chat import Segment, Template, get_template, load_records, normalize_record, register_template  # noqa: F401
from jaxllm.data.sources import DataError

# --------------------------------------------------------------------------- encoding

@dataclasses.dataclass
class Encoded:
  """One example: tokens [n] and weights [n] (weight of predicting tokens[i] from tokens[:i])."""
  tokens: np.ndarray
  weights: np.ndarray
  truncated: bool = False


def _bos_prefix(tokenizer: Any) -> list[int]:
  """[BOS] when the tokenizer adds one by itself (LLaMA-style), else []."""
  bos = getattr(tokenizer, "bos_token_id", None)
  if bos is None:
    return []
  with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
  plain = tokenizer("a", add_special_tokens=False)["input_ids"]
  return [bos] if with_special[:1] == [bos] and plain[:1] != [bos] else []


def encode_segments(segments: list[Segment], tokenizer: Any, max_len: int,
                    train_on_prompt: bool = False) -> Encoded:
  """Tokenizes segments one by one (so weights follow segment boundaries exactly) and truncates
  to `max_len` tokens: whole later turns are dropped first, then the response tail is cut; the
  prompt is shortened (its tail) only when it leaves less than a quarter of max_len to reply."""
  eos = tokenizer.eos_token_id
  turns: list[tuple[list[int], list[int]]] = []  # (prompt ids, response ids) per turn
  prompt, response = list(_bos_prefix(tokenizer)), []
  for text, is_response in segments:
    ids = [eos] if text is None else tokenizer(text, add_special_tokens=False)["input_ids"]
    if is_response:
      response += ids
    else:
      if response:
        turns.append((prompt, response))
        prompt, response = [], []
      prompt += ids
  if prompt or response:
    turns.append((prompt, response))

  tokens: list[int] = []
  weights: list[float] = []
  truncated = False
  for p, r in turns:
    room = max_len - len(tokens)
    if len(p) + len(r) > room:
      truncated = True
      if tokens and len(p) >= room:
        break  # a later turn whose prompt does not fit: drop it whole
      keep_r = min(len(r), max(room - len(p), min(len(r), max(1, max_len // 4))))
      p, r = p[:room - keep_r], r[:keep_r]
    tokens += p + r
    weights += [1.0 if train_on_prompt else 0.0] * len(p) + [1.0] * len(r)
    if truncated:
      break
  return Encoded(np.asarray(tokens, np.int32), np.asarray(weights, np.float32), truncated)


def encode_record(record: Any, template: Template, tokenizer: Any, max_len: int,
                  train_on_prompt: bool = False, where: str = "record") -> Encoded:
  return encode_segments(template(normalize_record(record, where), tokenizer), tokenizer, max_len,
                         train_on_prompt)


def prompt_ids(tokenizer: Any, template: Template, instruction: str, input_text: str = "") -> list[int]:
  """Token ids of the prompt for one instruction, ready for generation (ends where the reply starts)."""
  messages = [{"role": "user", "content": instruction, "input": input_text}]
  segments = template(messages, tokenizer)
  ids = list(_bos_prefix(tokenizer))
  for text, _ in segments:
    if text is not None:
      ids += tokenizer(text, add_special_tokens=False)["input_ids"]
  return ids


# --------------------------------------------------------------------------- batching

def padded_batch(examples: list[Encoded], width: int) -> dict[str, np.ndarray]:
  """One example per row, right-padded to `width` inputs; padding has weight 0."""
  batch = {k: np.zeros((len(examples), width), dt) for k, dt in
           (("inputs", np.int32), ("targets", np.int32), ("weights", np.float32))}
  for row, ex in enumerate(examples):
    n = len(ex.tokens) - 1
    batch["inputs"][row, :n] = ex.tokens[:-1]
    batch["targets"][row, :n] = ex.tokens[1:]
    batch["weights"][row, :n] = ex.weights[1:]
  return batch


def packed_batch(rows: list[list[Encoded]], width: int) -> dict[str, np.ndarray]:
  """Several examples per row: segment_ids 1, 2, ... (0 = padding) and positions restarting at 0."""
  batch = {k: np.zeros((len(rows), width), dt) for k, dt in
           (("inputs", np.int32), ("targets", np.int32), ("weights", np.float32),
            ("segment_ids", np.int32), ("positions", np.int32))}
  for row, examples in enumerate(rows):
    start = 0
    for seg, ex in enumerate(examples, 1):
      n = len(ex.tokens) - 1
      end = start + n
      batch["inputs"][row, start:end] = ex.tokens[:-1]
      batch["targets"][row, start:end] = ex.tokens[1:]
      batch["weights"][row, start:end] = ex.weights[1:]
      batch["segment_ids"][row, start:end] = seg
      batch["positions"][row, start:end] = np.arange(n)
      start = end
  return batch


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple if multiple > 1 else n


def plan_padded(lengths: list[int], batch_size: int, seed: int | None, bucket_batches: int = 16
                ) -> list[list[list[int]]]:
  """Global batches of single-example rows. Examples are shuffled, then sorted by length within
  windows of `bucket_batches` batches, so each batch holds similar lengths (little padding)."""
  order = np.arange(len(lengths)) if seed is None else np.random.default_rng(seed).permutation(len(lengths))
  window = batch_size * max(bucket_batches, 1)
  plans = []
  for start in range(0, len(order), window):
    chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
    plans += [[[int(i)] for i in chunk[b:b + batch_size]] for b in range(0, len(chunk), batch_size)]
  return [p for p in plans if len(p) == batch_size]


def plan_packed(lengths: list[int], batch_size: int, seq_len: int, seed: int | None,
                open_rows: int = 64) -> list[list[list[int]]]:
  """Global batches of packed rows: first fit over the shuffled examples into rows of `seq_len`
  inputs (at most `open_rows` rows open at once, so memory stays bounded)."""
  order = np.arange(len(lengths)) if seed is None else np.random.default_rng(seed).permutation(len(lengths))
  rows: list[list[int]] = []
  free: list[int] = []
  first_open = 0
  for i in order:
    n = lengths[i]
    for r in range(first_open, len(rows)):
      if free[r] >= n:
        rows[r].append(int(i))
        free[r] -= n
        break
    else:
      rows.append([int(i)])
      free.append(seq_len - n)
      first_open = max(first_open, len(rows) - open_rows)
  return [rows[b:b + batch_size] for b in range(0, len(rows) - batch_size + 1, batch_size)]


def collate_fn(examples: list[Encoded], *, packing: bool, seq_len: int, pad_multiple: int,
               shard_index: int = 0, shard_count: int = 1) -> Callable[[list[list[int]]], dict]:
  """plan (global batch: rows of example indices) -> this host's rows as arrays. Padded widths
  come from the whole global batch, so every host builds the same shape and the global batch
  does not depend on the process count."""
  def collate(plan: list[list[int]]) -> dict[str, np.ndarray]:
    per_host = len(plan) // shard_count
    mine = plan[shard_index * per_host:(shard_index + 1) * per_host]
    if packing:
      return packed_batch([[examples[i] for i in row] for row in mine], seq_len)
    longest = max(len(examples[row[0]].tokens) - 1 for row in plan)
    width = min(_round_up(longest, pad_multiple), seq_len)
    return padded_batch([examples[row[0]] for row in mine], width)
  return collate


def sft_dataset(examples: list[Encoded], batch_size: int, *, seq_len: int, packing: bool = False,
                pad_multiple: int = 16, bucket_batches: int = 16, seed: int = 0, shuffle: bool = True,
                repeat: bool = True, shard_index: int = 0, shard_count: int = 1) -> grain.IterDataset:
  """Batches of `examples` (global `batch_size` rows; each host gets its share) as a grain dataset."""
  lengths = [len(ex.tokens) - 1 for ex in examples]
  plan_seed = seed if shuffle else None
  plans = (plan_packed(lengths, batch_size, seq_len, plan_seed) if packing
           else plan_padded(lengths, batch_size, plan_seed, bucket_batches))
  if not plans:
    raise DataError(f"{len(examples)} examples do not fill one batch of {batch_size} rows; "
                    "add data or lower train.batch_size.")
  ds = grain.MapDataset.source(plans)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if repeat:
    ds = ds.repeat()
  ds = ds.map(collate_fn(examples, packing=packing, seq_len=seq_len, pad_multiple=pad_multiple,
                         shard_index=shard_index, shard_count=shard_count))
  # The position counts global batches (plans), the same on every host: any process count resumes it.
  return GlobalPositionIterDataset(ds.to_iter_dataset())


# ------------------------------------------------------------------------ from config

@dataclasses.dataclass
class SftData:
  tokenizer: Any
  train: grain.IterDataset
  val_batches: list[dict[str, np.ndarray]]
  template: Template
  num_examples: int
  num_truncated: int

  @property
  def summary(self) -> str:
    return (f"sft: {self.num_examples} examples, {self.num_truncated} truncated to data.seq_len "
            f"(response tail cut)")


def _training_texts(records: Iterable[dict], template: Template) -> Iterable[str]:
  for i, record in enumerate(records):
    yield "".join(t for t, _ in template(normalize_record(record, f"record {i + 1}"), None) if t)


def build_sft_data(config: Any, workdir: str) -> SftData:
  """Tokenizer, training dataset and validation batches for `config.task == 'sft'`."""
  import jax  # pylint: disable=import-outside-toplevel
  from jaxllm.data.tokenizers import prepare_tokenizer  # pylint: disable=import-outside-toplevel
  from jaxllm.data.sources import train_val_split  # pylint: disable=import-outside-toplevel
  d = config.data
  template = get_template(d.template)
  records = load_records(d.path)
  if not records:
    raise DataError(f"data.path={d.path!r}: holds no records.")
  train_records, val_records = train_val_split(records, d.val_fraction, d.seed)
  texts = [] if d.tokenizer or d.template == "chat_template" else list(_training_texts(train_records, template))
  tokenizer = prepare_tokenizer(config, workdir, texts)
  encode = lambda recs, tag: [  # noqa: E731
      encode_record(r, template, tokenizer, d.seq_len, d.train_on_prompt, f"{d.path} {tag} record {i + 1}")
      for i, r in enumerate(recs)]
  train_examples, val_examples = encode(train_records, "train"), encode(val_records, "val")
  kwargs = dict(seq_len=d.seq_len, packing=d.packing == "document", pad_multiple=d.pad_multiple,
                bucket_batches=d.bucket_batches, seed=d.seed, shard_index=jax.process_index(),
                shard_count=jax.process_count())
  train_ds = sft_dataset(train_examples, config.train.batch_size, **kwargs)
  val_batches = []
  if val_examples and config.train.eval_steps > 0:
    val_ds = sft_dataset(val_examples, min(config.train.batch_size, len(val_examples)), shuffle=False,
                         repeat=False, **kwargs) if len(val_examples) >= config.train.batch_size else None
    if val_ds is None:
      raise DataError(f"the validation split has {len(val_examples)} examples, fewer than "
                      f"train.batch_size={config.train.batch_size}; raise data.val_fraction.")
    for batch in val_ds:
      val_batches.append(batch)
      if len(val_batches) >= config.train.eval_steps:
        break
  num_truncated = sum(ex.truncated for ex in train_examples + val_examples)
  return SftData(tokenizer, train_ds, val_batches, template, len(records), num_truncated)
