"""The shakespeare_char recipe's pieces: character tokenizer, split by position, random windows, the config."""

import importlib.util
import json
import os

import numpy as np
import pytest

from jaxllm import train
from jaxllm.data.sources import DataError
from jaxllm.data.windows import window_data, window_rows
from jaxllm.data.build import build_lm_data
from jaxllm.data.tokenizers import prepare_tokenizer
from jaxllm.tokenizer import EOS_TOKEN, load_tokenizer, train_char
from tests.helpers import REPO_ROOT

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n\n") * 40


def shakespeare_config(tmp_path, **overrides):
  spec = importlib.util.spec_from_file_location("shakespeare_char",
                                                os.path.join(REPO_ROOT, "configs", "shakespeare_char.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  path = tmp_path / "input.txt"
  path.write_text(TEXT, encoding="utf-8")
  config.data.path = str(path)
  config.train.update(progress=False, tensorboard=False, sample_prompt="")
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


def test_char_tokenizer_numbers_sorted_characters_and_round_trips(tmp_path):
  tok = train_char([TEXT])
  chars = sorted(set(TEXT))
  ids = tok("All:\nSpeak", add_special_tokens=False)["input_ids"]
  assert ids == [chars.index(c) for c in "All:\nSpeak"]  # nanoGPT's stoi
  assert tok.eos_token == EOS_TOKEN and tok.eos_token_id == len(chars)
  tok.save_pretrained(tmp_path / "tok")
  loaded = load_tokenizer(str(tmp_path / "tok"))
  sample = "hear me  speak.\n\nAll:"
  assert loaded.decode(loaded(sample, add_special_tokens=False)["input_ids"]) == sample


def test_windows_split_by_position_and_resume(tmp_path):
  config = shakespeare_config(tmp_path, **{"train.batch_size": 4, "train.eval_steps": 3})
  tokenizer, train_ds, val_batches, _ = window_data(config, str(tmp_path / "w"), prepare_tokenizer)
  split = int(len(TEXT) * 0.9)
  train_text, val_text = TEXT[:split], TEXT[split:]
  decode = lambda ids: "".join(tokenizer.convert_ids_to_tokens([int(i) for i in ids]))  # noqa: E731
  it = iter(train_ds)
  batches = [next(it) for _ in range(3)]
  for batch in batches:
    assert batch["inputs"].shape == (4, 64)
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    for inputs, targets in zip(batch["inputs"], batch["targets"]):
      assert decode(inputs) + decode(targets[-1:]) in train_text  # a window of the first 90%
  starts = {decode(row[:16]) for b in batches for row in b["inputs"]}
  assert len(starts) > 6  # random offsets, not consecutive chunks
  assert len(val_batches) == 3
  for row in val_batches[0]["inputs"]:
    assert decode(row) in val_text
  # Resume: the state after 2 batches gives the same third batch.
  state_it = iter(train_ds)
  next(state_it), next(state_it)
  state = state_it.get_state()
  resumed = iter(train_ds)
  resumed.set_state(json.loads(json.dumps(state)))
  np.testing.assert_array_equal(next(resumed)["inputs"], batches[2]["inputs"])


def test_windows_too_short_text_is_one_clear_error():
  with pytest.raises(DataError, match="cannot fill one window"):
    window_rows(np.arange(10, dtype=np.int32), 64, seed=0)


def test_shakespeare_recipe_trains_and_evaluates(tmp_path):
  config = shakespeare_config(tmp_path, **{"train.steps": 4, "train.batch_size": 8, "train.log_every": 2, "train.eval_every": 2,
                                           "train.eval_steps": 2, "train.checkpoint_every": 4})
  data = build_lm_data(config, str(tmp_path / "run"))
  assert len(data.tokenizer) == len(set(TEXT)) + 1 <= config.model.vocab_size
  metrics = train.run(config, str(tmp_path / "run"))
  assert np.isfinite(metrics["eval_loss"]) and metrics["eval_loss"] < np.log(config.model.vocab_size)
