"""Masked-LM data: BERT's 15/80/10/10 masking statistics, special tokens never masked,
whole-word masking, [CLS] ... [SEP] blocks, and an exactly resumable masking RNG."""

from __future__ import annotations

import numpy as np
import pytest

from jaxllm.config import ConfigError
from jaxllm.data.mlm import mask_tokens, masking_spec, mlm_dataset
from jaxllm.tokenizer import train_tokenizer
from tests.test_tokenizer import prose_documents


@pytest.fixture(scope="module")
def docs():
  return prose_documents(150_000, seed=1)


@pytest.fixture(scope="module")
def wordpiece(docs):
  # Small on purpose: many words need ## pieces, so whole-word masking has something to do.
  return train_tokenizer(docs, "wordpiece", 256)


def _rows(wordpiece, docs, spec, num_batches=40, seq_len=64, mask_seed=0):
  ds = mlm_dataset(docs, wordpiece, spec, seq_len=seq_len, batch_size=16, seed=0, mask_seed=mask_seed)
  it = iter(ds)
  batches = [next(it) for _ in range(num_batches)]
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def test_masking_statistics_match_bert_and_specials_are_never_masked(wordpiece, docs):
  spec = masking_spec(wordpiece)
  rows = _rows(wordpiece, docs, spec)            # 640 rows x 64 tokens through the grain pipeline
  inputs, targets, chosen = rows["inputs"], rows["targets"], rows["weights"] > 0
  special = spec.special[targets]
  assert special.sum() > 640 * 2 - 1              # [CLS] and [SEP] in every row, at least
  assert not chosen[special].any()                # a special token is never chosen...
  assert (inputs[special] == targets[special]).all()  # ...nor altered
  assert not spec.special[inputs[~special & (inputs != spec.mask_id)]].any()  # random draws are ordinary
  rate = chosen[~special].mean()
  assert abs(rate - 0.15) < 0.01, rate
  masked = (inputs[chosen] == spec.mask_id).mean()
  replaced = ((inputs[chosen] != spec.mask_id) & (inputs[chosen] != targets[chosen])).mean()
  kept = (inputs[chosen] == targets[chosen]).mean()
  assert abs(masked - 0.8) < 0.02 and abs(replaced - 0.1) < 0.015 and abs(kept - 0.1) < 0.015, \
      (masked, replaced, kept)
  # Outside the chosen positions nothing changes, and the loss sees only chosen positions.
  assert (inputs[~chosen] == targets[~chosen]).all()
  assert set(np.unique(rows["weights"])) == {0.0, 1.0}


def test_blocks_are_cls_text_sep_and_wordpiece_round_trips(wordpiece, docs):
  spec = masking_spec(wordpiece)
  rows = _rows(wordpiece, docs, spec, num_batches=2)
  targets = rows["targets"]
  assert targets.shape == (32, 64)
  assert (targets[:, 0] == wordpiece.cls_token_id).all() and (targets[:, -1] == wordpiece.sep_token_id).all()
  assert (rows["segment_ids"] == 1).all()   # an endless stream: no padding
  # The unmasked targets are the corpus, lowercased, in WordPiece pieces joined back up.
  text = wordpiece.decode(targets[0, 1:-1].tolist())
  assert text.split()[3:8] and " ".join(text.split()[3:8]) in " ".join(d.lower() for d in docs).replace(
      ".", " .").replace(",", " ,").replace(";", " ;").replace("!", " !").replace("?", " ?")


def test_whole_word_masking_chooses_all_pieces_of_a_word(wordpiece, docs):
  spec = masking_spec(wordpiece, whole_word=True)
  rows = _rows(wordpiece, docs, spec, num_batches=20)
  targets, chosen = rows["targets"], rows["weights"] > 0
  continuation = ~spec.word_start[targets]
  assert continuation.mean() > 0.1   # the small vocabulary splits many words
  # A ## piece is chosen exactly when the piece before it (same word) is.
  prev_chosen = np.roll(chosen, 1, axis=1)
  inner = continuation.copy()
  inner[:, :2] = False
  assert (chosen[inner] == prev_chosen[inner]).all()
  words = spec.word_start[targets] & ~spec.special[targets]
  assert abs(chosen[words].mean() - 0.15) < 0.02


def test_masking_resumes_exactly_from_the_iterator_state(wordpiece, docs):
  spec = masking_spec(wordpiece)
  ds = mlm_dataset(docs, wordpiece, spec, seq_len=32, batch_size=4, seed=3, mask_seed=7)
  it = iter(ds)
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  resumed = iter(ds)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  other_seed = next(iter(mlm_dataset(docs, wordpiece, spec, seq_len=32, batch_size=4, seed=3, mask_seed=8)))
  first = next(iter(ds))
  np.testing.assert_array_equal(other_seed["targets"], first["targets"])
  assert not np.array_equal(other_seed["weights"], first["weights"])


def test_unit_masking_never_touches_specials_even_when_they_are_everything():
  special = np.zeros(50, bool)
  special[:5] = True
  from jaxllm.data.mlm import MaskingSpec  # pylint: disable=import-outside-toplevel
  spec = MaskingSpec(mask_id=4, special=special, word_start=None, probability=0.99)
  tokens = np.array([2, 0, 1, 3, 4] * 10)
  out = mask_tokens(tokens, np.random.default_rng(0), spec)
  assert out["weights"].sum() == 0 and (out["inputs"] == tokens).all()
  with pytest.raises(ConfigError, match="mlm.probability"):
    MaskingSpec(mask_id=4, special=special, word_start=None, probability=1.5)


def test_a_tokenizer_without_mask_token_is_refused_clearly(docs):
  bpe = train_tokenizer(docs[:20], "bpe", 384)
  with pytest.raises(ConfigError, match="no mask token"):
    masking_spec(bpe)
