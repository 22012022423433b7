"""From a config to a tokenizer, a training dataset and a fixed validation set."""

from __future__ import annotations

import os
from typing import Any

import jax

from jaxllm.config import ConfigError
from jaxllm.data.pipeline import lm_dataset, take_batches
from jaxllm.data.sources import DataError, load_documents, train_val_split
from jaxllm.tokenizer import load_tokenizer, train_bpe


def prepare_tokenizer(config: Any, workdir: str, train_docs: list[str]):
  """Loads data.tokenizer, else the workdir's, else init_from's (a converted HF model brings its
  own), else trains a byte-level BPE on the training documents (once per workdir)."""
  tok_dir = os.path.join(workdir, "tokenizer")
  init_tok_dir = os.path.join(config.get("init_from", ""), "tokenizer") if config.get("init_from") else ""
  if config.data.tokenizer:
    tokenizer = load_tokenizer(config.data.tokenizer)
  else:
    if os.path.isdir(tok_dir):
      tokenizer = load_tokenizer(tok_dir)
    elif init_tok_dir and os.path.isdir(init_tok_dir):
      tokenizer = load_tokenizer(init_tok_dir)
      if jax.process_index() == 0:  # the workdir stays a complete model directory (generate, to-hf)
        tokenizer.save_pretrained(tok_dir)
    else:
      vocab = config.data.tokenizer_vocab_size or config.model.vocab_size
      tokenizer = train_bpe(train_docs, vocab)
      if jax.process_index() == 0:
        tokenizer.save_pretrained(tok_dir)
  if len(tokenizer) > config.model.vocab_size:
    raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but model.vocab_size="
                      f"{config.model.vocab_size}; raise model.vocab_size to at least {len(tokenizer)}.")
  if tokenizer.eos_token_id is None:
    raise ConfigError("the tokenizer has no EOS token; documents need one appended. Set eos_token.")
  return tokenizer


def _datasets(config: Any, tokenizer: Any, train_docs: list[str], val_docs: list[str]):
  per_host = config.train.batch_size // jax.process_count()
  kwargs = dict(tokenizer=tokenizer, eos_id=tokenizer.eos_token_id, seq_len=config.data.seq_len,
                batch_size=per_host, shard_index=jax.process_index(), shard_count=jax.process_count())
  train_ds = lm_dataset(train_docs, seed=config.data.seed, **kwargs)
  val_batches = []
  if val_docs and config.train.eval_steps > 0:
    val_ds = lm_dataset(val_docs, seed=config.data.seed, shuffle=False, repeat=False, **kwargs)
    val_batches = take_batches(val_ds, config.train.eval_steps)
    if not val_batches:
      raise DataError(f"the validation split ({len(val_docs)} documents) is shorter than one batch of "
                      f"{per_host} x {config.data.seq_len} tokens; raise data.val_fraction.")
  return train_ds, val_batches


def build_lm_data(config: Any, workdir: str):
  """(tokenizer, training grain dataset, list of validation batches) for causal-LM training."""
  docs = load_documents(config.data)
  train_docs, val_docs = train_val_split(docs, config.data.val_fraction, config.data.seed)
  tokenizer = prepare_tokenizer(config, workdir, train_docs)
  train_ds, val_batches = _datasets(config, tokenizer, train_docs, val_docs)
  return tokenizer, train_ds, val_batches
