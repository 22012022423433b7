"""Masked-LM data: BERT masking and the grain pipeline that feeds it.

Per logical data shard (the LM pipeline's host-sharding scheme, `pipeline.host_batches`):
documents -> seeded global shuffle, every num_shards-th -> WordPiece ids + [SEP] -> blocks of
seq_len - 2 -> [CLS] block [SEP] -> masking (seeded grain random_map per shard: resumable, its
position is part of the iterator state) -> batch_size / num_shards rows; a host concatenates
its shards' batches. So the global batch depends on data.num_shards, never on the process
count, and a position resumes on any process count that divides num_shards.

Masking follows BERT: 15% of the non-special tokens are chosen (optionally whole words), of
those 80% become [MASK], 10% a random token, 10% stay; the loss weights are 1 exactly on the
chosen positions.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import jax
import numpy as np

from jaxllm.config import ConfigError
from jaxllm.config_types import RunConfig
from jaxllm.data.pipeline import host_batches, memory_documents, num_data_shards, take_batches, tokenize
from jaxllm.data.documents import load_documents
from jaxllm.data.sources import DataError, train_val_split
from jaxllm.data.tokenizers import prepare_tokenizer


@dataclasses.dataclass(frozen=True)
class MaskingSpec:
  """What the masking needs to know about the vocabulary, and the BERT rates."""
  mask_id: int
  special: np.ndarray            # bool [vocab]: never chosen, never drawn as a random token
  word_start: np.ndarray | None  # bool [vocab]: token begins a word (whole-word masking), or None
  probability: float = 0.15
  mask_fraction: float = 0.8
  random_fraction: float = 0.1

  def __post_init__(self):
    if not 0 < self.probability < 1:
      raise ConfigError(f"mlm.probability={self.probability} must be in (0, 1).")
    if self.mask_fraction < 0 or self.random_fraction < 0 or self.mask_fraction + self.random_fraction > 1:
      raise ConfigError(f"mlm.mask_fraction={self.mask_fraction} + mlm.random_fraction="
                        f"{self.random_fraction} must be non-negative and at most 1.")

  @property
  def random_candidates(self) -> np.ndarray:
    return np.flatnonzero(~self.special)


def masking_spec(tokenizer: Any, probability: float = 0.15, mask_fraction: float = 0.8,
                 random_fraction: float = 0.1, whole_word: bool = False) -> MaskingSpec:
  """The spec for a Hugging Face tokenizer: its [MASK], its special and added tokens, and (for
  whole-word masking) which tokens start a word: not `##` pieces (WordPiece) or, for byte-level
  BPE, tokens that start with a space (`Ġ`)."""
  if tokenizer.mask_token_id is None:
    raise ConfigError("the tokenizer has no mask token; masked-LM needs one: train a WordPiece "
                      "tokenizer (python -m jaxllm.tokenizer train --kind wordpiece) or leave data.tokenizer empty.")
  size = len(tokenizer)
  special = np.zeros(size, bool)
  special[[i for i in tokenizer.all_special_ids if i < size]] = True
  backend = tokenizer.backend_tokenizer
  for index, added in backend.get_added_tokens_decoder().items():
    if added.special and index < size:
      special[index] = True
  word_start = None
  if whole_word:
    tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
    prefix = getattr(backend.model, "continuing_subword_prefix", None)
    if prefix:
      word_start = np.array([not t.startswith(prefix) for t in tokens])
    else:
      word_start = np.array([t.startswith("Ġ") or t.startswith("▁") for t in tokens])
    word_start |= special
  return MaskingSpec(tokenizer.mask_token_id, special, word_start, probability, mask_fraction,
                     random_fraction)


def mask_tokens(tokens: np.ndarray, rng: np.random.Generator, spec: MaskingSpec) -> dict[str, np.ndarray]:
  """BERT masking of one row `tokens` [seq]: inputs (masked), targets (original), weights (chosen)."""
  tokens = np.asarray(tokens)
  maskable = ~spec.special[tokens]
  if spec.word_start is None:
    chosen = rng.random(tokens.shape) < spec.probability
  else:
    # Every piece of a word shares the word's draw; a row starting mid-word counts it as a word.
    word_index = np.cumsum(spec.word_start[tokens])
    chosen = (rng.random(word_index[-1] + 1) < spec.probability)[word_index]
  chosen &= maskable
  action = rng.random(tokens.shape)
  to_mask = chosen & (action < spec.mask_fraction)
  to_random = chosen & (action >= spec.mask_fraction) & (action < spec.mask_fraction + spec.random_fraction)
  candidates = spec.random_candidates
  random_tokens = candidates[rng.integers(0, len(candidates), tokens.shape)]
  inputs = np.where(to_mask, spec.mask_id, np.where(to_random, random_tokens, tokens))
  return {"inputs": inputs.astype(np.int32), "targets": tokens.astype(np.int32),
          "weights": chosen.astype(np.float32)}


def _block_fn(cls_id: int, sep_id: int, pad_id: int):
  def to_block(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    real = row["tokens_segment_ids"] > 0
    body = np.where(real, row["tokens"], pad_id)
    tokens = np.concatenate([[cls_id], body, [sep_id]]).astype(np.int32)
    # Segment 1 = the block, 0 = padding (only the last block of a finite stream has any).
    segment_ids = np.concatenate([[1], real.astype(np.int32), [1]]).astype(np.int32)
    return {"tokens": tokens, "segment_ids": segment_ids}
  return to_block


def mlm_dataset(docs: list[str], tokenizer: Any, spec: MaskingSpec, seq_len: int, batch_size: int, *,
                seed: int, mask_seed: int, shuffle: bool = True, repeat: bool = True, num_shards: int = 1,
                process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """This host's batches (global `batch_size` rows over `num_shards` logical shards) of masked
  `[CLS] ... [SEP]` blocks of `seq_len` tokens, documents separated by [SEP]: inputs, targets,
  weights, segment_ids [batch_size / process_count, seq_len]."""
  if seq_len < 3:
    raise ConfigError(f"data.seq_len={seq_len} leaves no room between [CLS] and [SEP]; use at least 3.")
  sep_id, cls_id, pad_id = tokenizer.sep_token_id, tokenizer.cls_token_id, tokenizer.pad_token_id
  if None in (sep_id, cls_id, pad_id):
    raise ConfigError("masked-LM blocks need [CLS], [SEP] and [PAD] tokens; this tokenizer lacks "
                      "one. Train a WordPiece tokenizer (python -m jaxllm.tokenizer train --kind wordpiece).")

  make_docs = memory_documents(docs, seed=seed, shuffle=shuffle, repeat=repeat)

  def mask_row(row: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    return dict(mask_tokens(row["tokens"], rng, spec), segment_ids=row["segment_ids"])

  def make_rows(shard: int) -> grain.IterDataset:
    # [SEP] ends every document: the boundary, as in RoBERTa's full-sentence packing.
    it = tokenize(make_docs(shard, num_shards), tokenizer, sep_id)
    it = grain.experimental.ConcatThenSplitIterDataset(it, length_struct={"tokens": seq_len - 2})
    it = it.map(_block_fn(cls_id, sep_id, pad_id))
    # Each logical shard masks its rows with its own stream, whichever host builds it.
    return it.random_map(mask_row, seed=mask_seed * 1_000_003 + shard)
  return host_batches(make_rows, batch_size, num_shards=num_shards, process_index=process_index,
                      process_count=process_count)


def build_mlm_data(config: RunConfig, workdir: str):
  """(tokenizer, training grain dataset, validation batches) for masked-LM training (task='mlm')."""
  if config.model.family != "bert":
    raise ConfigError(f"task='mlm' needs model.family='bert', got {config.model.family!r}.")
  docs = load_documents(config.data)
  train_docs, val_docs = train_val_split(docs, config.data.val_fraction, config.data.seed)
  tokenizer = prepare_tokenizer(config, workdir, train_docs)
  m = config.mlm
  spec = masking_spec(tokenizer, m.probability, m.mask_fraction, m.random_fraction, m.whole_word)
  num_shards = num_data_shards(config)
  kwargs = dict(tokenizer=tokenizer, spec=spec, seq_len=config.data.seq_len, batch_size=config.train.batch_size,
                seed=config.data.seed, num_shards=num_shards, process_index=jax.process_index(),
                process_count=jax.process_count())
  train_ds = mlm_dataset(train_docs, mask_seed=m.seed, **kwargs)
  val_batches = []
  if val_docs and config.train.eval_steps > 0:
    # A fixed masking seed of its own: every evaluation scores the same masked positions.
    val_ds = mlm_dataset(val_docs, mask_seed=m.seed + 1, shuffle=False, repeat=False, **kwargs)
    val_batches = take_batches(val_ds, config.train.eval_steps)
    if not val_batches:
      raise DataError(f"the validation split ({len(val_docs)} documents) is shorter than one batch of "
                      f"{config.train.batch_size // num_shards} x {config.data.seq_len} tokens per data "
                      "shard; raise data.val_fraction.")
  return tokenizer, train_ds, val_batches
