"""Tokenizer training and analysis: exact round trips, code vs prose, the CLI and its statistics."""

from __future__ import annotations

import json
import os
import random

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from jaxllm import tokenizer as tok_lib
from jaxllm.data.sources import stdlib_documents
from jaxllm.tokenizer_analysis import analyze

_PROSE_WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there been one all we their has would when if so no will "
    "more about out up them what some can only other time into could new then two first years "
    "people over may after also most many these such like between through where before much "
    "government great world before state country city house life water family history music "
    "during under against war university school century national early general second north "
    "south river island church village population county district area known named later "
    "became including several while although however because though without within around "
    "small large important different social political public common").split()


def prose_documents(num_chars: int, seed: int = 0) -> list[str]:
  """English-like sentences from a fixed word list (prose with no code in it)."""
  rng = random.Random(seed)
  docs, total = [], 0
  while total < num_chars:
    sentences = []
    for _ in range(rng.randint(3, 12)):
      words = [rng.choice(_PROSE_WORDS) for _ in range(rng.randint(6, 25))]
      sentences.append(words[0].capitalize() + " " + " ".join(words[1:]) + rng.choice(".,;!?"))
    docs.append(" ".join(sentences))
    total += len(docs[-1])
  return docs


@pytest.fixture(scope="module")
def code_docs():
  docs = stdlib_documents(max_chars=600_000)
  return docs[:-4], docs[-4:]   # train on most files, test on the last few (never seen)


@pytest.fixture(scope="module")
def code_bpe(code_docs):
  return tok_lib.train_tokenizer(code_docs[0], "bpe", 1024)


def test_bpe_round_trips_unicode_and_python_exactly(code_bpe, code_docs, tmp_path):
  tok_lib.save_tokenizer(code_bpe, str(tmp_path / "tok"))
  tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))   # what configs and users load
  rng = random.Random(0)
  alphabet = ("abc XYZ 0123 \t\r\n\x00\x7f ,.;:!?()[]{}<>'\"\\ é ß Ω ж 中文字 日本語 한국어 العربية "
              "हिन्दी 🎉🐍👩‍👩‍👧 e\u0301 \u200b\ufeff")
  samples = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 200))) for _ in range(200)]
  samples += ["".join(chr(rng.randint(1, 0x2FFFF)) for _ in range(50)) for _ in range(50)]
  samples += ["  leading and trailing  ", "a , b . c ' d", "x\n\n\n    y", " "]
  samples = [s.encode("utf-8", "ignore").decode("utf-8") for s in samples]  # drop lone surrogates
  samples += code_docs[1]   # Python files the tokenizer never saw, indentation and all
  for text in samples:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_code_tokenizer_needs_far_fewer_tokens_on_code_than_prose_tokenizer(code_bpe, code_docs):
  prose_bpe = tok_lib.train_tokenizer(prose_documents(600_000), "bpe", 1024)
  assert len(prose_bpe) == len(code_bpe) == 1024
  held_out = code_docs[1]
  code_report, prose_report = analyze(code_bpe, held_out), analyze(prose_bpe, held_out)
  assert code_report["tokens"] < 0.75 * prose_report["tokens"], (code_report["tokens"], prose_report["tokens"])
  assert {"def", "return", "class", "if"} <= set(code_report["python_keywords_single"])
  assert len(code_report["python_keywords_single"]) > len(prose_report["python_keywords_single"])


def test_analyze_counts_match_a_hand_built_wordpiece():
  vocab = {"[UNK]": 0, "hel": 1, "##lo": 2, "world": 3}
  raw = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##"))
  raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
  # hello -> hel ##lo (split), world -> world, zzz -> [UNK], world -> world
  report = analyze(tokenizer, ["hello world", "zzz world"], top=2)
  assert report["tokens"] == 5
  assert report["fertility"] == pytest.approx(5 / 4)
  assert report["split_word_share"] == pytest.approx(1 / 4)
  assert report["unknown_rate"] == pytest.approx(1 / 5)
  assert report["chars_per_token"] == pytest.approx(20 / 5)
  assert report["last_learned_tokens"] == ["'world'", "'##lo'"]
  assert report["longest_tokens"][0] == "'world'"


def test_byte_fallback_is_counted_for_unseen_scripts(code_bpe):
  report = analyze(code_bpe, ["中文字符和日本語のテキスト"])
  assert report["unknown_rate"] == 0.0
  assert report["byte_fallback_rate"] > 0.5   # CJK never seen: spelled out in single bytes


def _write_jsonl(path, docs):
  with open(path, "w", encoding="utf-8") as f:
    for doc in docs:
      f.write(json.dumps({"body": doc}) + "\n")
  return str(path)


def test_cli_trains_wordpiece_and_bpe_and_analyzes_side_by_side(tmp_path, capsys):
  corpus = _write_jsonl(tmp_path / "c.jsonl", prose_documents(100_000))
  wp_dir, bpe_dir = str(tmp_path / "wp"), str(tmp_path / "bpe")
  tok_lib.main(["train", "--kind", "wordpiece", "--vocab-size", "300", "--out", wp_dir, "--source", "jsonl",
                "--path", corpus, "--field", "body", "--max-docs", "50"])
  tok_lib.main(["train", "--kind", "bpe", "--vocab-size", "400", "--no-round", "--chat-roles", "--out", bpe_dir,
                "--source", "jsonl", "--path", corpus, "--field", "body"])
  wp = AutoTokenizer.from_pretrained(wp_dir)
  assert len(wp) == 384   # 300 rounded up to a multiple of 128
  assert wp.convert_ids_to_tokens(list(range(5))) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  ids = wp("The river [MASK] north.")["input_ids"]
  assert ids[0] == wp.cls_token_id and ids[-1] == wp.sep_token_id and wp.mask_token_id in ids
  info = json.load(open(os.path.join(wp_dir, "training_info.json")))
  assert info["documents"] == 50 and info["vocab_size"] == 384
  bpe = AutoTokenizer.from_pretrained(bpe_dir)
  assert len(bpe) == 400 and bpe.eos_token == "<|endoftext|>" and bpe.pad_token == "<|pad|>"
  assert len(bpe.encode("<|assistant|>", add_special_tokens=False)) == 1
  assert "<|user|>" in bpe.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
  capsys.readouterr()
  tok_lib.main(["analyze", wp_dir, bpe_dir, "--source", "jsonl", "--path", corpus, "--field", "body",
                "--max-chars", "20000"])
  out = capsys.readouterr().out
  header = next(line for line in out.splitlines() if wp_dir in line)
  assert bpe_dir in header
  for label in ("characters per token", "fertility", "split into >= 2", "unknown-token rate",
                "byte-fallback rate", "Python keywords as one token", "longest tokens", "last-learned"):
    assert label in out


def test_cli_bad_source_is_one_clear_line_and_writes_nothing(tmp_path, capsys):
  out_dir = tmp_path / "never"
  assert tok_lib.main(["train", "--vocab-size", "300", "--out", str(out_dir), "--source", "text",
                       "--path", str(tmp_path / "missing.txt")]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "missing.txt" in err and len(err.splitlines()) == 1
  assert not out_dir.exists() and os.listdir(tmp_path) == []
