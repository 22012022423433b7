"""Instruction tuning (SFT) data: records -> templated tokens with loss weights -> batches.

Records and templates live in chat.py (a template turns messages into text segments, each
marked prompt or response). Response segments end with EOS and are the only ones with
loss weight 1 (unless `train_on_prompt`). Examples longer than `max_len` lose the
response tail first; the prompt is kept where possible.

Batches are either padded (examples of similar length batched together, padded to
the longest, rounded up to `pad_multiple`) or packed (several examples per row of
`seq_len` on the LM pipeline's stages: grain's first-fit packer, logical data shards, with
`segment_ids` and restarting `positions` so none sees another). Both give the same loss per
example; both are grain datasets whose state resumes exactly. With `sft.prefix_lm` every
batch also carries `in_prefix` [batch, seq]: True on each example's prompt (the tokens before
its first response), which the model lets attend both ways (prefix-LM).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import grain
import numpy as np

from jaxllm.config_types import RunConfig
from jaxllm.data.packing import first_fit_rows
from jaxllm.data.pipeline import (GlobalPositionIterDataset, host_batches, memory_documents, num_data_shards,
                                  take_batches)
# get_template, load_records and register_template are this module's API too (recipes register templates).
from jaxllm.data.chat import Segment, Template, get_template, load_records, normalize_record, register_template  # noqa: F401
from jaxllm.data.sources import DataError

# --------------------------------------------------------------------------- encoding

@dataclasses.dataclass
class Encoded:
  """One example: tokens [n] and weights [n] (weight of predicting tokens[i] from tokens[:i]).
  prefix_len: the first prompt's tokens, up to the first response token (prefix-LM's prefix;
  later turns' prompts come after a response, so they stay causal)."""
  tokens: np.ndarray
  weights: np.ndarray
  truncated: bool = False
  prefix_len: int = 0


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
  prefix_len = -1
  for p, r in turns:
    room = max_len - len(tokens)
    if len(p) + len(r) > room:
      truncated = True
      if tokens and len(p) >= room:
        break  # a later turn whose prompt does not fit: drop it whole
      keep_r = min(len(r), max(room - len(p), min(len(r), max(1, max_len // 4))))
      p, r = p[:room - keep_r], r[:keep_r]
    if prefix_len < 0:
      prefix_len = len(tokens) + len(p)
    tokens += p + r
    weights += [1.0 if train_on_prompt else 0.0] * len(p) + [1.0] * len(r)
    if truncated:
      break
  return Encoded(np.asarray(tokens, np.int32), np.asarray(weights, np.float32), truncated,
                 max(prefix_len, 0))


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

def example_features(ex: Encoded, prefix_lm: bool = False) -> dict[str, np.ndarray]:
  """One example's per-token features, [n - 1] each: inputs, targets, weights and, for
  prefix-LM, in_prefix (input i is token i, in the prefix when i < prefix_len)."""
  n = len(ex.tokens) - 1
  out = {"inputs": ex.tokens[:-1], "targets": ex.tokens[1:], "weights": ex.weights[1:]}
  if prefix_lm:
    out["in_prefix"] = np.arange(n) < ex.prefix_len
  return out


def padded_batch(examples: list[Encoded], width: int, prefix_lm: bool = False) -> dict[str, np.ndarray]:
  """One example per row, right-padded to `width` inputs; padding has weight 0 (and no prefix)."""
  rows = [example_features(ex, prefix_lm) for ex in examples]
  batch = {k: np.zeros((len(examples), width), v.dtype) for k, v in rows[0].items()}
  for row, features in enumerate(rows):
    for k, v in features.items():
      batch[k][row, :len(v)] = v
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


def collate_fn(examples: list[Encoded], *, seq_len: int, pad_multiple: int, prefix_lm: bool = False,
               process_index: int = 0, process_count: int = 1) -> Callable[[list[list[int]]], dict]:
  """plan (global batch: rows of example indices) -> this host's rows as a padded batch. The
  width comes from the whole global batch, so every host builds the same shape and the global
  batch does not depend on the process count."""
  def collate(plan: list[list[int]]) -> dict[str, np.ndarray]:
    per_host = len(plan) // process_count
    mine = plan[process_index * per_host:(process_index + 1) * per_host]
    longest = max(len(examples[row[0]].tokens) - 1 for row in plan)
    width = min(_round_up(longest, pad_multiple), seq_len)
    return padded_batch([examples[row[0]] for row in mine], width, prefix_lm)
  return collate


def padded_dataset(examples: list[Encoded], batch_size: int, *, seq_len: int, pad_multiple: int = 16,
                   bucket_batches: int = 16, prefix_lm: bool = False, seed: int = 0, shuffle: bool = True,
                   repeat: bool = True, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """Padded batches as a grain dataset of global-batch plans, each host collating its rows.

  Padded batches cannot take the logical-shard scheme of packed ones: a batch's width is the
  longest example of the whole global batch, a fact no shard knows alone. So the global batch
  is planned in one place (every host plans the same) and its position counts global batches,
  which resumes on any process count."""
  lengths = [len(ex.tokens) - 1 for ex in examples]
  plans = plan_padded(lengths, batch_size, seed if shuffle else None, bucket_batches)
  if not plans:
    raise DataError(f"{len(examples)} examples do not fill one batch of {batch_size} rows; "
                    "add data or lower train.batch_size.")
  ds = grain.MapDataset.source(plans)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if repeat:
    ds = ds.repeat()
  ds = ds.map(collate_fn(examples, seq_len=seq_len, pad_multiple=pad_multiple, prefix_lm=prefix_lm,
                         process_index=process_index, process_count=process_count))
  return GlobalPositionIterDataset(ds.to_iter_dataset())


def packed_rows(examples: list[Encoded], seq_len: int, *, shard_index: int = 0, num_shards: int = 1,
                prefix_lm: bool = False, pack_bins: int = 128, seed: int = 0, shuffle: bool = True,
                repeat: bool = True) -> grain.IterDataset:
  """Logical shard `shard_index`'s rows of seq_len: the LM pipeline's stages over the examples
  (memory_documents: a seeded global shuffle, again each epoch, every num_shards-th example;
  then first_fit_rows), every per-token feature packed alongside the tokens."""
  features = [example_features(ex, prefix_lm) for ex in examples]
  pieces = memory_documents(features, seed=seed, shuffle=shuffle, repeat=repeat)(shard_index, num_shards)
  pieces = pieces.filter(lambda p: len(p["inputs"]) > 0)  # a one-token example predicts nothing
  return first_fit_rows(pieces, seq_len, pack_bins, seed=seed * 1_000_003 + shard_index * 101,
                        features=tuple(features[0]))


def sft_dataset(examples: list[Encoded], batch_size: int, *, seq_len: int, packing: bool = False,
                prefix_lm: bool = False, pad_multiple: int = 16, bucket_batches: int = 16, pack_bins: int = 128,
                seed: int = 0, shuffle: bool = True, repeat: bool = True, num_shards: int = 1,
                process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """This host's batches of `examples` (global `batch_size` rows): packed on `num_shards`
  logical shards (`host_batches`), or padded (`padded_dataset`, which ignores num_shards)."""
  if not packing:
    return padded_dataset(examples, batch_size, seq_len=seq_len, pad_multiple=pad_multiple,
                          bucket_batches=bucket_batches, prefix_lm=prefix_lm, seed=seed, shuffle=shuffle,
                          repeat=repeat, process_index=process_index, process_count=process_count)
  make_rows = lambda s: packed_rows(examples, seq_len, shard_index=s, num_shards=num_shards,  # noqa: E731
                                    prefix_lm=prefix_lm, pack_bins=pack_bins, seed=seed, shuffle=shuffle,
                                    repeat=repeat)
  return host_batches(make_rows, batch_size, num_shards=num_shards, process_index=process_index,
                      process_count=process_count)


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


def build_sft_data(config: RunConfig, workdir: str) -> SftData:
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
  packing = d.packing == "document"
  batch_size = config.train.batch_size
  kwargs = dict(seq_len=d.seq_len, packing=packing, prefix_lm=config.sft.prefix_lm, pad_multiple=d.pad_multiple,
                bucket_batches=d.bucket_batches, pack_bins=d.pack_bins, seed=d.seed,
                num_shards=num_data_shards(config) if packing else 1,
                process_index=jax.process_index(), process_count=jax.process_count())
  train_ds = sft_dataset(train_examples, batch_size, **kwargs)
  val_batches = []
  if val_examples and config.train.eval_steps > 0:
    if len(val_examples) < batch_size:
      raise DataError(f"the validation split has {len(val_examples)} examples, fewer than "
                      f"train.batch_size={batch_size}; raise data.val_fraction.")
    val_batches = take_batches(sft_dataset(val_examples, batch_size, shuffle=False, repeat=False, **kwargs),
                               config.train.eval_steps)
    if not val_batches:
      raise DataError(f"the validation split ({len(val_examples)} examples) packs into fewer than one batch "
                      f"of {batch_size} rows of data.seq_len={d.seq_len}; raise data.val_fraction.")
  num_truncated = sum(ex.truncated for ex in train_examples + val_examples)
  return SftData(tokenizer, train_ds, val_batches, template, len(records), num_truncated)
