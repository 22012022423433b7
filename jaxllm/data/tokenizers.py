"""The one way every task gets its tokenizer, and the one way a workdir's tokenizer is written.

In order: `data.tokenizer` (a path or a Hub name), else the workdir's own (a resumed run),
else init_from's (a converted HF model brings its own), else one trained on the training
documents. The workdir keeps a copy in every case but the first, so it is a complete
model directory (generate, fill_mask, convert to-hf read it).
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Callable, Sequence

import jax

from jaxllm import killpoints
from jaxllm.config_types import RunConfig
from jaxllm.errors import ConfigError
from jaxllm.tokenizer import load_tokenizer, train_bpe, train_char, train_tokenizer

Docs = Sequence[str] | Callable[[], Sequence[str]]


def save_tokenizer(tokenizer: Any, tok_dir: str) -> None:
  """Writes aside and renames: no process, and no rerun after a crash, loads half a directory."""
  tmp = f"{tok_dir}.tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  tokenizer.save_pretrained(tmp)
  killpoints.reached("tokenizer.save")
  os.replace(tmp, tok_dir)


def trainer_for(config: RunConfig) -> Callable[[Sequence[str]], Any]:
  """How this task trains a tokenizer: WordPiece for masked-LM, else byte-level BPE ('char': characters)."""
  vocab = config.data.tokenizer_vocab_size or config.model.vocab_size
  if config.task == "mlm":
    return lambda docs: train_tokenizer(docs, "wordpiece", vocab, round_to=1, lowercase=config.mlm.lowercase)
  if config.data.tokenizer == "char":
    return train_char
  return lambda docs: train_bpe(docs, vocab)


def prepare_tokenizer(config: RunConfig, workdir: str, train_docs: Docs) -> Any:
  """The run's tokenizer (see the module docstring). `train_docs` may be a function, called only
  when a tokenizer is trained (reading a stream costs time)."""
  tok_dir = os.path.join(workdir, "tokenizer")
  init_tok_dir = os.path.join(config.init_from, "tokenizer") if config.init_from else ""
  if config.data.tokenizer and config.data.tokenizer != "char":
    tokenizer = load_tokenizer(config.data.tokenizer)
  elif os.path.isdir(tok_dir):
    tokenizer = load_tokenizer(tok_dir)
  else:
    if init_tok_dir and os.path.isdir(init_tok_dir):
      tokenizer = load_tokenizer(init_tok_dir)
    else:
      tokenizer = trainer_for(config)(train_docs() if callable(train_docs) else train_docs)
    if jax.process_index() == 0:
      save_tokenizer(tokenizer, tok_dir)
  if len(tokenizer) > config.model.vocab_size:
    raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but model.vocab_size="
                      f"{config.model.vocab_size}; raise model.vocab_size to at least {len(tokenizer)}.")
  if config.task != "mlm" and tokenizer.eos_token_id is None:
    raise ConfigError("the tokenizer has no EOS token; documents need one appended. Set eos_token.")
  return tokenizer
