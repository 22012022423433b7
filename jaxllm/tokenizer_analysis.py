"""How well a tokenizer fits a corpus: compression, fertility, splits, unknown/byte-fallback rate.

`analyze` returns plain numbers and lists; `format_side_by_side` lays one or two reports out as a
table for `python -m jaxllm.tokenizer analyze`.
"""

from __future__ import annotations

import keyword
import re
from typing import Any

import numpy as np

_BYTE_FALLBACK = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")  # sentencepiece byte_fallback pieces


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible map from the 256 bytes to printable characters (ByteLevel's alphabet)."""
  printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
      list(range(ord("®"), ord("ÿ") + 1))
  chars, n = printable[:], 0
  for b in range(256):
    if b not in printable:
      printable.append(b)
      chars.append(256 + n)
      n += 1
  return dict(zip(printable, map(chr, chars)))


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


def _is_byte_level(backend: Any) -> bool:
  return "ByteLevel" in type(backend.pre_tokenizer).__name__ or \
      "ByteLevel" in repr(backend.pre_tokenizer)


def fallback_ids(tokenizer: Any) -> np.ndarray:
  """Boolean [vocab] mask of tokens that are raw bytes, not whole characters: byte-level BPE
  tokens whose bytes are not valid UTF-8 on their own, and sentencepiece `<0xNN>` pieces."""
  backend = tokenizer.backend_tokenizer
  vocab = backend.get_vocab(with_added_tokens=False)
  mask = np.zeros(max(len(tokenizer), max(vocab.values(), default=0) + 1), bool)
  byte_level = _is_byte_level(backend)
  for token, index in vocab.items():
    if _BYTE_FALLBACK.match(token):
      mask[index] = True
    elif byte_level and all(c in _UNICODE_TO_BYTE for c in token):
      try:
        bytes(_UNICODE_TO_BYTE[c] for c in token).decode("utf-8")
      except UnicodeDecodeError:
        mask[index] = True
  return mask


def _unk_id(tokenizer: Any) -> int | None:
  unk = getattr(tokenizer.backend_tokenizer.model, "unk_token", None)
  return tokenizer.backend_tokenizer.token_to_id(unk) if unk else None


def _word_counts(text: str, offsets: list[tuple[int, int]]) -> tuple[np.ndarray, int]:
  """Tokens per whitespace-separated word (a token belongs to the word its first or last
  character lies in; whitespace-only tokens to none) and the number of whitespace-only tokens."""
  word_of_char = np.full(len(text) + 1, -1, np.int64)
  spans = [m.span() for m in re.finditer(r"\S+", text)]
  for w, (s, e) in enumerate(spans):
    word_of_char[s:e] = w
  counts = np.zeros(len(spans), np.int64)
  whitespace = 0
  for s, e in offsets:
    w = word_of_char[s] if s < len(text) else -1
    if w < 0 and e > s:
      w = word_of_char[e - 1]
    if w >= 0:
      counts[w] += 1
    else:
      whitespace += 1
  return counts, whitespace


def learned_tokens(tokenizer: Any) -> list[str]:
  """The model's own vocabulary in id order (added/special tokens left out): for BPE and
  WordPiece that is the order the trainer learned them in."""
  vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=False)
  added = set(tokenizer.backend_tokenizer.get_added_tokens_decoder()) if hasattr(
      tokenizer.backend_tokenizer, "get_added_tokens_decoder") else set()
  return [t for t, i in sorted(vocab.items(), key=lambda kv: kv[1]) if i not in added]


def _display(tokenizer: Any, token: str) -> str:
  """A token quoted; byte-level tokens as the text they stand for (`Ġ` shown as a space)."""
  if _is_byte_level(tokenizer.backend_tokenizer):
    return repr(tokenizer.convert_tokens_to_string([token]))
  return repr(token)


def keyword_tokens(tokenizer: Any) -> dict[str, bool]:
  """For every Python keyword: is it one token (as written at a line start, or after a space)?"""
  backend = tokenizer.backend_tokenizer
  out = {}
  for kw in keyword.kwlist:
    bare = backend.encode(kw, add_special_tokens=False).ids
    spaced = backend.encode(" " + kw, add_special_tokens=False).ids
    out[kw] = len(bare) == 1 or len(spaced) == 1
  return out


def analyze(tokenizer: Any, docs: list[str], top: int = 10) -> dict[str, Any]:
  """Statistics of `tokenizer` on the documents `docs` (no special tokens added)."""
  backend = tokenizer.backend_tokenizer
  encodings = backend.encode_batch(docs, add_special_tokens=False)
  fallback, unk = fallback_ids(tokenizer), _unk_id(tokenizer)
  num_tokens = num_words = split_words = word_tokens = num_fallback = num_unk = 0
  for text, enc in zip(docs, encodings):
    ids = np.asarray(enc.ids, np.int64)
    num_tokens += len(ids)
    num_fallback += int(fallback[ids[ids < len(fallback)]].sum())
    if unk is not None:
      num_unk += int((ids == unk).sum())
    counts, _ = _word_counts(text, enc.offsets)
    num_words += len(counts)
    word_tokens += int(counts.sum())
    split_words += int((counts >= 2).sum())
  chars = sum(len(d) for d in docs)
  learned = learned_tokens(tokenizer)
  longest = sorted(learned, key=lambda t: -len(_display(tokenizer, t)))[:top]
  keywords = keyword_tokens(tokenizer)
  return {
      "vocab_size": len(tokenizer),
      "documents": len(docs),
      "characters": chars,
      "tokens": num_tokens,
      "chars_per_token": chars / max(num_tokens, 1),
      "fertility": word_tokens / max(num_words, 1),
      "split_word_share": split_words / max(num_words, 1),
      "unknown_rate": num_unk / max(num_tokens, 1),
      "byte_fallback_rate": num_fallback / max(num_tokens, 1),
      "longest_tokens": [_display(tokenizer, t) for t in longest],
      "last_learned_tokens": [_display(tokenizer, t) for t in learned[-top:][::-1]],
      "python_keywords_single": [k for k, single in keywords.items() if single],
      "python_keywords_split": [k for k, single in keywords.items() if not single],
  }


_ROWS = (("vocab_size", "vocabulary size", "{:d}"), ("tokens", "tokens in sample", "{:d}"),
         ("chars_per_token", "characters per token", "{:.3f}"),
         ("fertility", "fertility (tokens per word)", "{:.3f}"),
         ("split_word_share", "words split into >= 2 pieces", "{:.1%}"),
         ("unknown_rate", "unknown-token rate", "{:.3%}"),
         ("byte_fallback_rate", "byte-fallback rate", "{:.3%}"))


def format_side_by_side(names: list[str], reports: list[dict[str, Any]], show_keywords: bool = True) -> str:
  """One column per tokenizer: the numbers, then the token lists."""
  width = max(30, *(len(n) + 2 for n in names))
  first = reports[0]
  lines = [f"sample: {first['documents']} documents, {first['characters']:,} characters", "",
           f"{'':32}" + "".join(f"{n:>{width}}" for n in names)]
  for key, label, fmt in _ROWS:
    lines.append(f"{label:32}" + "".join(f"{fmt.format(r[key]):>{width}}" for r in reports))
  if show_keywords:
    total = len(first["python_keywords_single"]) + len(first["python_keywords_split"])
    cells = [f"{len(r['python_keywords_single'])}/{total}" for r in reports]
    lines.append(f"{'Python keywords as one token':32}" + "".join(f"{c:>{width}}" for c in cells))
  for key, label in (("longest_tokens", "longest tokens"), ("last_learned_tokens", "last-learned tokens")):
    lines.append("")
    lines.append(f"{label}:")
    for rank in range(max(len(r[key]) for r in reports)):
      cells = [(r[key][rank] if rank < len(r[key]) else "") for r in reports]
      lines.append(f"{rank + 1:>4}  " + "".join(f"{c[:width - 2]:<{width}}" for c in cells))
  if show_keywords:
    for name, r in zip(names, reports):
      lines.append("")
      lines.append(f"{name}: keywords split into pieces: {' '.join(r['python_keywords_split']) or '(none)'}")
  return "\n".join(lines)
