"""Train and load Hugging Face tokenizers (byte-level BPE for code and any language)."""

from __future__ import annotations

import os
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: tuple[str, ...] = (EOS_TOKEN,),
              min_frequency: int = 2) -> PreTrainedTokenizerFast:
  """A GPT-2 style byte-level BPE: whitespace kept exactly, any Unicode text round-trips."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                special_tokens=list(special_tokens),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(texts, trainer=trainer)
  eos = special_tokens[0]
  return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos, unk_token=eos,
                                 pad_token=eos)


def load_tokenizer(path: str) -> PreTrainedTokenizerFast:
  if not os.path.isdir(path):
    raise FileNotFoundError(f"tokenizer {path!r}: no such directory; give a Hugging Face tokenizer "
                            "directory (tokenizer.json) or leave data.tokenizer empty to train one.")
  return AutoTokenizer.from_pretrained(path)
