"""Train, save and load Hugging Face tokenizers: byte-level BPE (GPT-2 style) and WordPiece (BERT).

  python -m jaxllm.tokenizer train --kind bpe --vocab-size 8000 --out tok/ --source stdlib
  python -m jaxllm.tokenizer analyze tok/ [other_tok/] --source text --path corpus.txt

`train` reads any source the input pipeline reads (`jaxllm.data.documents.load_documents`)
and writes a directory that `AutoTokenizer.from_pretrained` and `data.tokenizer` load.
`analyze` lives in `jaxllm.tokenizer_analysis`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Iterable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from jaxllm import progress
from jaxllm.cli import ArgumentParser, fail, run_command
from jaxllm.errors import ConfigError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
# BERT's special tokens, in the order they get ids 0..4.
WORDPIECE_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
CHAT_ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
# A role header, the message, then <|end|>; the prompt for generation ends with the assistant header.
CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
VOCAB_MULTIPLE = 128


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _fit(tok: Tokenizer, texts: Iterable[str], trainer: Any) -> None:
  """Trains `tok` on `texts` in view of a progress bar. On a terminal that is tokenizers' own
  (each phase, the merges too; the trainer was made with show_progress=progress.on_terminal());
  it draws nothing elsewhere, so a bar forced on there (JAXLLM_PROGRESS=1 into a log) is ours,
  over the documents as the trainer reads them."""
  total = len(texts) if hasattr(texts, "__len__") else None
  if progress.on_terminal():
    tok.train_from_iterator(texts, trainer=trainer, length=total)
  else:
    tok.train_from_iterator(progress.track(texts, total, desc="tokenizer: reading documents", unit="doc"),
                            trainer=trainer, length=total)


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: tuple[str, ...] = (EOS_TOKEN,),
              min_frequency: int = 2, *, bos_token: str | None = None,
              pad_token: str | None = None) -> PreTrainedTokenizerFast:
  """A GPT-2 style byte-level BPE: whitespace kept exactly, any Unicode text round-trips.

  `special_tokens[0]` is EOS; BOS and PAD default to it (the GPT-2 convention).
  """
  eos = special_tokens[0]
  bos, pad = bos_token or eos, pad_token or eos
  specials = list(dict.fromkeys([*special_tokens, bos, pad]))
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                special_tokens=specials,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=progress.on_terminal())
  _fit(tok, texts, trainer)
  return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=bos, unk_token=eos,
                                 pad_token=pad)


def train_wordpiece(texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
                    lowercase: bool = True, extra_special_tokens: tuple[str, ...] = ()
                    ) -> PreTrainedTokenizerFast:
  """A BERT WordPiece tokenizer: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4, `##` continuations,
  and `[CLS] A [SEP]` / `[CLS] A [SEP] B [SEP]` (token types 0/1) added on encode."""
  tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                              strip_accents=None, lowercase=lowercase)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece(prefix="##")
  specials = list(dict.fromkeys([*WORDPIECE_SPECIALS, *extra_special_tokens]))
  trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=specials, continuing_subword_prefix="##",
                                      show_progress=progress.on_terminal())
  _fit(tok, texts, trainer)
  cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
  tok.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
      special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
  return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]",
                                 sep_token="[SEP]", pad_token="[PAD]", mask_token="[MASK]",
                                 model_input_names=["input_ids", "token_type_ids", "attention_mask"])


def train_char(texts: Iterable[str], eos_token: str = EOS_TOKEN) -> PreTrainedTokenizerFast:
  """A character-level tokenizer (nanoGPT's shakespeare_char): one token per character seen.

  Characters get ids 0..n-1 in sorted order (nanoGPT's numbering); EOS comes last.
  Unseen characters map to EOS.
  """
  chars = sorted(set().union(*(set(t) for t in texts)))
  vocab = {ch: i for i, ch in enumerate(chars)}
  vocab[eos_token] = len(vocab)
  tok = Tokenizer(models.WordLevel(vocab, unk_token=eos_token))
  # [\s\S] matches any character, newlines included: every character is its own word.
  tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
  tok.decoder = decoders.Fuse()
  tok.add_special_tokens([eos_token])
  return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos_token, unk_token=eos_token,
                                 pad_token=eos_token)


def pad_vocab(tokenizer: PreTrainedTokenizerFast, size: int, kind: str) -> int:
  """Adds reserved special tokens until the vocabulary has `size` tokens (a corpus too small for
  the requested size runs out of merges first; LLaMA 3 reserves tokens the same way).
  Returns how many were added."""
  missing = size - len(tokenizer)
  if missing > 0:
    fmt = "[unused{}]" if kind == "wordpiece" else "<|reserved_{}|>"
    tokenizer.add_special_tokens({"additional_special_tokens": [fmt.format(i) for i in range(missing)]},
                                 replace_extra_special_tokens=False)
  return max(missing, 0)


def train_tokenizer(texts: list[str], kind: str, vocab_size: int, *, round_to: int = VOCAB_MULTIPLE,
                    min_frequency: int = 2, chat_roles: bool = False, lowercase: bool = True,
                    eos_token: str = EOS_TOKEN, bos_token: str | None = None,
                    pad_token: str | None = PAD_TOKEN) -> PreTrainedTokenizerFast:
  """Trains a `kind` ('bpe' | 'wordpiece') tokenizer of `vocab_size` rounded up to `round_to`
  (1 = as given), with its special tokens and, if asked, chat role tokens and a chat template."""
  if vocab_size <= 0:
    raise ConfigError(f"--vocab-size={vocab_size} must be positive.")
  target = round_up(vocab_size, max(round_to, 1))
  roles = CHAT_ROLE_TOKENS if chat_roles else ()
  if kind == "bpe":
    if target < 256 + 3 + len(roles):
      raise ConfigError(f"a byte-level BPE needs a vocabulary of at least {256 + 3 + len(roles)} "
                        f"(256 bytes plus special tokens), got {target}; raise --vocab-size.")
    tokenizer = train_bpe(texts, target, (eos_token, *roles), min_frequency,
                          bos_token=bos_token, pad_token=pad_token)
  elif kind == "wordpiece":
    tokenizer = train_wordpiece(texts, target, min_frequency, lowercase, roles)
  else:
    raise ConfigError(f"--kind={kind!r} is not known; use 'bpe' or 'wordpiece'.")
  if roles:
    tokenizer.chat_template = CHAT_TEMPLATE
  # The size is then exactly `target` (a multiple of `round_to`), so the embedding shards evenly.
  pad_vocab(tokenizer, target, kind)
  return tokenizer


def load_tokenizer(path: str) -> PreTrainedTokenizerFast:
  if not os.path.isdir(path):
    raise FileNotFoundError(f"tokenizer {path!r}: no such directory; give a Hugging Face tokenizer "
                            "directory (tokenizer.json) or leave data.tokenizer empty to train one.")
  try:
    return AutoTokenizer.from_pretrained(path)
  except (OSError, ValueError) as e:  # transformers' words for "no tokenizer here"
    detail = " ".join(str(e).split())[:300]
    raise ConfigError(f"tokenizer {path!r}: not a Hugging Face tokenizer directory ({detail}).") from e


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out: str, info: dict[str, Any] | None = None,
                   overwrite: bool = False) -> None:
  """Writes the tokenizer directory atomically: into a temporary sibling, then renamed."""
  out = os.path.abspath(out)
  if os.path.exists(out) and not overwrite:
    raise FileExistsError(f"--out {out} already exists; choose a new directory or pass --overwrite.")
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tokenizer-", dir=parent)
  try:
    tokenizer.save_pretrained(tmp)
    if info is not None:
      with open(os.path.join(tmp, "training_info.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
    if os.path.exists(out):
      shutil.rmtree(out)
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)


# ----------------------------------------------------------------------------- CLI


def add_source_args(parser: argparse.ArgumentParser) -> None:
  """The input pipeline's source options (the `data.*` config keys), plus caps."""
  g = parser.add_argument_group("source (as the data.* config keys)")
  g.add_argument("--source", default="stdlib", help="stdlib | text | jsonl | any source data.source takes")
  g.add_argument("--path", default="", help="file, folder or glob (data.path)")
  g.add_argument("--field", default="text", help="JSON field holding the document (data.field)")
  g.add_argument("--text-unit", default="file", choices=("file", "line"), help="data.text_unit")
  g.add_argument("--data", action="append", default=[], metavar="KEY=VALUE",
                 help="any other data.KEY for the source (repeatable)")
  g.add_argument("--max-docs", type=int, default=0, help="read at most this many documents (0 = all)")
  g.add_argument("--max-chars", type=int, default=0, help="read at most about this many characters (0 = all)")


STREAM_DEFAULT_CHARS = 20_000_000  # a stream has no end: read this much unless capped


def documents_from_args(args: argparse.Namespace) -> list[str]:
  """Documents of the source the arguments describe, read as the input pipeline reads them
  (`load_documents`, or the `datasets` stream for source='hf' / --data streaming=true), capped."""
  from jaxllm.config import default_config  # pylint: disable=import-outside-toplevel
  from jaxllm.config_types import DataConfig  # pylint: disable=import-outside-toplevel
  from jaxllm.data.documents import load_documents  # pylint: disable=import-outside-toplevel
  from jaxllm.data.sources import DataStats  # pylint: disable=import-outside-toplevel
  cfg = default_config().data
  cfg.update(source=args.source, path=args.path, field=args.field, text_unit=args.text_unit,
             max_chars=args.max_chars)
  for item in args.data:
    set_data_key(cfg, item)
  cfg = DataConfig.from_config(cfg)
  if cfg.is_stream:
    from jaxllm.data.stream import StreamDataset, spec_from_config  # pylint: disable=import-outside-toplevel
    stream = StreamDataset(spec_from_config(cfg), DataStats(cfg.on_bad_record), seed=0,
                           shuffle_files=False, repeat=False)
    docs = progress.track(stream, desc="reading the stream", unit="doc")  # slow: over the network, say
    max_chars = args.max_chars or STREAM_DEFAULT_CHARS
  else:
    docs = load_documents(cfg)
    max_chars = args.max_chars
  if args.max_docs:
    docs = itertools.islice(docs, args.max_docs)
  return _cap_chars(docs, max_chars) if max_chars else list(docs)


def set_data_key(cfg: Any, item: str) -> None:
  """Applies one `--data KEY=VALUE` to the data config, checked as --config.data.KEY=VALUE is:
  the key must exist and the value must have its type (JSON for non-strings: 3, true, 0.1)."""
  key, sep, raw = item.partition("=")
  if not sep:
    raise ConfigError(f"--data {item!r}: expected KEY=VALUE, e.g. --data hf_split=train.")
  if key not in cfg:
    raise ConfigError(f"--data {item!r}: unknown config key data.{key}; the data keys are "
                      f"{', '.join(sorted(cfg))}.")
  old = cfg[key]
  kinds = ((bool, "true or false"), (int, "an integer"), (float, "a number"), (str, "a string"))
  kind = next((name for t, name in kinds if isinstance(old, t)), "a JSON object")
  try:
    value = raw if isinstance(old, str) else json.loads(raw)
    if isinstance(value, bool) != isinstance(old, bool):  # ConfigDict takes True for an int
      raise TypeError(kind)
    cfg[key] = value
  except (ValueError, TypeError) as e:  # not JSON, or JSON of another type than the default's
    raise ConfigError(f"--data {item!r}: data.{key} takes {kind} (default {old!r}), got {raw!r}.") from e


def _cap_chars(docs: Iterable[str], max_chars: int) -> list[str]:
  kept, total = [], 0
  for doc in docs:
    if total >= max_chars:
      break
    kept.append(doc[:max_chars - total])
    total += len(kept[-1])
  return kept


def _train_cmd(args: argparse.Namespace) -> None:
  start = time.perf_counter()
  docs = documents_from_args(args)
  read_s = time.perf_counter() - start
  start = time.perf_counter()
  tokenizer = train_tokenizer(docs, args.kind, args.vocab_size, round_to=1 if args.no_round else args.round_to,
                              min_frequency=args.min_frequency, chat_roles=args.chat_roles,
                              lowercase=not args.cased, eos_token=args.eos, bos_token=args.bos or None,
                              pad_token=args.pad or None)
  train_s = time.perf_counter() - start
  chars = sum(len(d) for d in docs)
  info = dict(kind=args.kind, requested_vocab_size=args.vocab_size, vocab_size=len(tokenizer),
              source=args.source, path=args.path, documents=len(docs), characters=chars,
              train_seconds=round(train_s, 2))
  save_tokenizer(tokenizer, args.out, info, args.overwrite)
  print(f"trained a {args.kind} tokenizer of {len(tokenizer)} tokens on {len(docs)} documents "
        f"({chars / 1e6:.2f}M characters) in {train_s:.1f}s (reading took {read_s:.1f}s); saved to {args.out}")


def _analyze_cmd(args: argparse.Namespace) -> None:
  from jaxllm.tokenizer_analysis import analyze, format_side_by_side  # pylint: disable=import-outside-toplevel
  tokenizers = [load_tokenizer(path) for path in args.tokenizers]
  docs = documents_from_args(args)
  reports = [analyze(tok, docs, top=args.top) for tok in tokenizers]
  print(format_side_by_side(args.tokenizers, reports, show_keywords=not args.no_keywords))


def build_parser() -> argparse.ArgumentParser:
  parser = ArgumentParser(prog="python -m jaxllm.tokenizer", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  train = sub.add_parser("train", help="train a tokenizer and save it as a Hugging Face directory")
  train.add_argument("--kind", choices=("bpe", "wordpiece"), default="bpe")
  train.add_argument("--vocab-size", type=int, required=True)
  train.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
  train.add_argument("--overwrite", action="store_true")
  train.add_argument("--no-round", action="store_true", help="keep --vocab-size as given")
  train.add_argument("--round-to", type=int, default=VOCAB_MULTIPLE, help="round the vocabulary up to this")
  train.add_argument("--min-frequency", type=int, default=2)
  train.add_argument("--chat-roles", action="store_true",
                     help="register <|system|> <|user|> <|assistant|> <|end|> and a chat template")
  train.add_argument("--cased", action="store_true", help="wordpiece: keep case (default lowercases)")
  train.add_argument("--eos", default=EOS_TOKEN, help="bpe: end-of-document token")
  train.add_argument("--bos", default="", help="bpe: beginning token (default: the EOS token)")
  train.add_argument("--pad", default=PAD_TOKEN, help="bpe: padding token ('' = the EOS token)")
  add_source_args(train)
  train.set_defaults(func=_train_cmd)
  analyze = sub.add_parser("analyze", help="statistics of one or two tokenizers on a corpus sample")
  analyze.add_argument("tokenizers", nargs="+", help="one or two Hugging Face tokenizer directories")
  analyze.add_argument("--top", type=int, default=10, help="how many longest / last-learned tokens to list")
  analyze.add_argument("--no-keywords", action="store_true", help="leave out the Python keyword table")
  add_source_args(analyze)
  analyze.set_defaults(func=_analyze_cmd, max_chars=2_000_000)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  if args.command == "analyze" and len(args.tokenizers) > 2:
    fail(f"analyze takes one or two tokenizers, got {len(args.tokenizers)}.")
  return run_command(lambda: args.func(args))


if __name__ == "__main__":
  sys.exit(main())
