"""Instruction tuning data: templates, loss weights, truncation, padded vs packed batches, training."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxllm.data import chat, sft
from jaxllm.data.sources import DataError
from jaxllm.models import GPT, ModelConfig
from jaxllm.tokenizer import train_bpe

_WORDS = ("tell me about cats dogs and the sea write a poem list three colors red blue green "
          "what is two plus two four the answer explain why sky is blue light scatters").split()

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_records(n, seed=0, long_output=False):
  rng = np.random.default_rng(seed)
  words = lambda lo, hi: " ".join(rng.choice(_WORDS, rng.integers(lo, hi)))  # noqa: E731
  return [{"instruction": words(3, 10), "input": words(2, 6) if i % 3 == 0 else "",
           "output": words(30, 60) if long_output else words(2, 25)} for i in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
  texts = [" ".join(r.values()) for r in make_records(100)] + [chat.ALPACA_PREAMBLE_INPUT,
                                                              "### Instruction: Human: Assistant:"]
  tok = train_bpe(texts, 300, special_tokens=("<|im_end|>", "<|im_start|>"))
  tok.chat_template = CHATML
  return tok


def weighted_text(tok, ex):
  targets, weights = ex.tokens[1:], ex.weights[1:]
  return tok.decode(targets[weights == 1])


@pytest.mark.parametrize("template", ["alpaca", "human_assistant", "chat_template"])
@pytest.mark.parametrize("with_input", [False, True])
def test_weighted_tokens_are_exactly_response_plus_eos(tokenizer, template, with_input):
  record = {"instruction": "list three colors", "input": "red blue" if with_input else "",
            "output": "red, blue and green."}
  ex = sft.encode_record(record, sft.get_template(template), tokenizer, max_len=512)
  assert weighted_text(tokenizer, ex) == "red, blue and green." + tokenizer.eos_token
  assert tokenizer.eos_token_id in ex.tokens[-2:] and not ex.truncated  # ChatML adds "\n" after EOS
  # The prompt is all there (weight 0) and shows the instruction and the input.
  prompt = tokenizer.decode(ex.tokens[ex.weights == 0])
  assert "list three colors" in prompt and (("red blue" in prompt) == with_input)


@pytest.mark.parametrize("template", ["alpaca", "human_assistant", "chat_template"])
def test_multi_turn_chat_trains_every_assistant_turn(tokenizer, template):
  record = {"messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": "what is two plus two"},
                         {"role": "assistant", "content": "four"},
                         {"from": "human", "value": "why"},
                         {"role": "assistant", "content": [{"type": "text", "text": "the answer"}]}]}
  ex = sft.encode_record(record, sft.get_template(template), tokenizer, max_len=512)
  eos = tokenizer.eos_token
  assert weighted_text(tokenizer, ex) == "four" + eos + "the answer" + eos
  text = tokenizer.decode(ex.tokens)
  assert "be brief" in text and "why" in text


def test_chat_template_text_after_eos_is_not_trained(tokenizer):
  record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "red"}]}
  ex = sft.encode_record(record, sft.get_template("chat_template"), tokenizer, max_len=512)
  assert tokenizer.decode(ex.tokens[-1:]) == "\n" and ex.weights[-1] == 0  # ChatML's newline after <|im_end|>


def test_train_on_prompt_puts_weight_on_every_token(tokenizer):
  ex = sft.encode_record(make_records(1)[0], sft.get_template("alpaca"), tokenizer, 512,
                         train_on_prompt=True)
  assert np.all(ex.weights[1:] == 1)


def test_truncation_keeps_the_prompt_and_cuts_the_response_tail(tokenizer):
  template = sft.get_template("alpaca")
  record = make_records(1, long_output=True)[0]
  full = sft.encode_record(record, template, tokenizer, 10_000)
  num_prompt = int(np.sum(full.weights == 0))
  keep = num_prompt // 2  # leaves the response more than a quarter of max_len
  assert len(full.tokens) > num_prompt + keep
  max_len = num_prompt + keep
  ex = sft.encode_record(record, template, tokenizer, max_len)
  assert ex.truncated and len(ex.tokens) == max_len
  np.testing.assert_array_equal(ex.tokens, full.tokens[:max_len])  # whole prompt + response head
  assert np.sum(ex.weights == 1) == keep and ex.tokens[-1] != tokenizer.eos_token_id
  # A prompt longer than max_len still leaves a quarter of max_len to the response.
  short = sft.encode_record(record, template, tokenizer, 16)
  assert short.truncated and len(short.tokens) == 16 and np.sum(short.weights == 1) == 4


def test_bad_records_and_template_get_one_clear_error(tokenizer):
  with pytest.raises(DataError, match="record 3: neither Alpaca-shaped"):
    chat.normalize_record({"text": "x"}, "record 3")
  with pytest.raises(DataError, match="role 'robot'"):
    chat.normalize_record({"messages": [{"role": "robot", "content": "x"}]})
  with pytest.raises(DataError, match="data.template='nope' is not known"):
    sft.get_template("nope")


def _per_example_loss(model, params, batch):
  """Summed weighted loss per example, keyed by the example's inputs up to its last weighted
  one (a packed segment, or a padded row up to its padding)."""
  logits = jax.jit(model.apply)({"params": params}, batch["inputs"], positions=batch.get("positions"),
                                segment_ids=batch.get("segment_ids"), in_prefix=batch.get("in_prefix"))
  losses = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]) * batch["weights"])
  segment_ids = batch.get("segment_ids", np.ones(batch["inputs"].shape, np.int32))
  out = {}
  for row, segments in enumerate(segment_ids):
    for seg in np.unique(segments[segments > 0]):
      where = np.flatnonzero(segments == seg)
      where = where[:np.flatnonzero(batch["weights"][row, where])[-1] + 1]
      out[tuple(batch["inputs"][row, where])] = float(losses[row, where].sum())
  return out


@pytest.mark.parametrize("prefix_lm", [False, True])
def test_padded_and_packed_batches_give_the_same_loss_per_example(tokenizer, prefix_lm):
  """Padded rows and rows packed by grain's first-fit packer (several examples per row) give
  each example the same loss, with and without the prefix-LM mask."""
  template = sft.get_template("alpaca")
  examples = [sft.encode_record(r, template, tokenizer, 64) for r in make_records(12, seed=1)]
  cfg = ModelConfig(vocab_size=320, d_model=32, num_layers=1, num_heads=2, max_seq_len=128,
                    position="rotary")
  model = GPT(cfg)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  padded = sft.sft_dataset(examples, 4, seq_len=128, pad_multiple=16, bucket_batches=8, prefix_lm=prefix_lm,
                           seed=3, repeat=False)
  packed = sft.sft_dataset(examples, 2, seq_len=128, packing=True, prefix_lm=prefix_lm, pack_bins=4, seed=3,
                           repeat=False)
  padded_losses, packed_losses, rows = {}, {}, []
  for batch in padded:
    assert batch["inputs"].shape[1] % 16 == 0 and ("in_prefix" in batch) == prefix_lm
    padded_losses.update(_per_example_loss(model, params, batch))
  for batch in packed:
    rows += list(batch["segment_ids"])
    packed_losses.update(_per_example_loss(model, params, batch))
  assert len(padded_losses) == 12 and any(row.max() > 1 for row in rows)
  common = sorted(set(padded_losses) & set(packed_losses))
  assert len(common) >= 8
  np.testing.assert_allclose([packed_losses[i] for i in common], [padded_losses[i] for i in common], rtol=2e-5)


def test_padded_plans_bucket_by_length():
  rng = np.random.default_rng(0)
  lengths = [int(x) for x in rng.integers(5, 60, 200)]
  padded = sft.plan_padded(lengths, 8, seed=1, bucket_batches=5)
  assert len(padded) == 25
  spread = np.mean([max(lengths[r[0]] for r in p) - min(lengths[r[0]] for r in p) for p in padded])
  assert spread < 10  # similar lengths together: little padding


def test_packed_rows_fill_seq_len_and_keep_every_feature_aligned():
  """grain's first-fit packer over examples: each at most once per epoch, rows within seq_len
  and mostly full, and each example's weights, prefix flags and positions at its tokens."""
  rng = np.random.default_rng(0)
  lengths = rng.integers(6, 61, 200)
  # Example i's tokens are all i, so every packed token names its example.
  examples = [sft.Encoded(np.full(n, i, np.int32), (np.arange(n) >= n // 3).astype(np.float32),
                          prefix_len=int(n // 3)) for i, n in enumerate(lengths)]
  rows = list(sft.packed_rows(examples, 64, prefix_lm=True, pack_bins=64, seed=1, repeat=False))
  seen = []
  for row in rows:
    for seg in np.unique(row["segment_ids"][row["segment_ids"] > 0]):
      where = np.flatnonzero(row["segment_ids"] == seg)
      i = int(row["inputs"][where[0]])
      ex = examples[i]
      seen.append(i)
      np.testing.assert_array_equal(row["inputs"][where], ex.tokens[:-1])
      np.testing.assert_array_equal(row["positions"][where], np.arange(len(ex.tokens) - 1))
      np.testing.assert_array_equal(row["weights"][where], ex.weights[1:])
      np.testing.assert_array_equal(row["in_prefix"][where], np.arange(len(ex.tokens) - 1) < ex.prefix_len)
    padding = row["segment_ids"] == 0
    assert not row["weights"][padding].any() and not row["in_prefix"][padding].any()
  assert len(seen) == len(set(seen)) == 200  # every example exactly once in the epoch
  assert np.mean([np.sum(row["segment_ids"] > 0) for row in rows]) > 0.85 * 64


def test_in_prefix_is_the_prompt_and_gives_the_hand_built_mask(tokenizer):
  """The pipeline's in_prefix marks exactly each example's prompt (its weight-0 head), padded and
  packed; the xla reference builds from it the mask written out by hand: per example, the
  prompt block sees itself both ways, the response is causal, nothing crosses examples."""
  from jaxllm.models.attention import reference_mask
  template = sft.get_template("alpaca")
  examples = [sft.encode_record(r, template, tokenizer, 48) for r in make_records(16, seed=4)]
  for ex in examples:
    assert ex.prefix_len == np.flatnonzero(ex.weights)[0]  # the prompt ends where the loss starts
  for packing in (False, True):
    batch = next(iter(sft.sft_dataset(examples, 4, seq_len=48, packing=packing, prefix_lm=True, pack_bins=4)))
    segment_ids = batch.get("segment_ids", np.ones_like(batch["inputs"]))
    seq = segment_ids.shape[1]
    want = np.zeros((4, seq, seq), bool)
    for b in range(4):
      for i in range(seq):
        for j in range(seq):
          prompt_block = batch["in_prefix"][b, i] and batch["in_prefix"][b, j]
          want[b, i, j] = segment_ids[b, i] == segment_ids[b, j] and (j <= i or prompt_block)
      # in_prefix is each example's head of weight 0 (the weight of input i is that of target i)
      for seg in np.unique(segment_ids[b][segment_ids[b] > 0]):
        where = np.flatnonzero(segment_ids[b] == seg)
        first_weighted = where[0] + np.flatnonzero(batch["weights"][b, where])[0]
        np.testing.assert_array_equal(batch["in_prefix"][b, where], where < first_weighted + 1)
    got = reference_mask(seq, jnp.asarray(segment_ids) if packing else None, jnp.asarray(batch["in_prefix"]),
                         batch=4)
    np.testing.assert_array_equal(np.asarray(got)[:, 0], want, err_msg=f"packing={packing}")


def test_dataset_resumes_exactly(tokenizer):
  template = sft.get_template("human_assistant")
  examples = [sft.encode_record(r, template, tokenizer, 64) for r in make_records(40, seed=2)]
  ds = sft.sft_dataset(examples, 4, seq_len=64, seed=0)
  it = iter(ds)
  for _ in range(13):  # past one epoch (10 batches)
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  it2 = iter(ds)
  it2.set_state(state)
  for want in expected:
    got = next(it2)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_training_on_one_example_drives_its_loss_to_zero(tokenizer):
  """A padded prefix-LM batch (the prompt attends both ways) through the real train step."""
  from jaxllm.config import default_config
  from jaxllm.optim import build_optimizer
  from jaxllm.state import lm_apply_fn
  from jaxllm.step import TrainState, train_step
  ex = sft.encode_record(make_records(1, seed=5)[0], sft.get_template("alpaca"), tokenizer, 64)
  batch = {k: jnp.asarray(v) for k, v in sft.padded_batch([ex] * 2, 64, prefix_lm=True).items()}
  assert batch["in_prefix"][0, :ex.prefix_len].all() and not batch["in_prefix"][0, ex.prefix_len:].any()
  model = GPT(ModelConfig(vocab_size=320, d_model=32, num_layers=1, num_heads=2, max_seq_len=64))
  params = jax.jit(model.init)(jax.random.key(0), batch["inputs"][:1])["params"]
  optim_cfg = default_config().optim
  optim_cfg.update(lr=1e-2, warmup_steps=0, min_lr=1e-2, weight_decay=0.0)
  optimizer, schedule = build_optimizer(optim_cfg, 40)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen={},
                     opt_state=optimizer.init(params))
  step = jax.jit(functools.partial(train_step, apply_fn=lm_apply_fn(model), optimizer=optimizer,
                                   schedule=schedule))
  losses = []
  for _ in range(40):
    state, metrics = step(state, batch, jax.random.key(1))
    losses.append(float(metrics["loss"]))
  assert float(metrics["tokens"]) == 2 * np.sum(ex.weights[1:])  # only response + EOS count
  assert losses[0] > 3.0 and losses[-1] < 0.05, losses[::8]


def test_sft_through_the_training_cli(tmp_path, tiny_config, capsys):
  """train.run with task='sft' and sft.prefix_lm on a JSONL chat+Alpaca mix: packed, evaluated, loss
  falls, and the end-of-run sample (prefilled as a prefix-LM) is printed."""
  from jaxllm import train
  records = make_records(150, seed=7)
  records[::5] = [{"messages": [{"role": "user", "content": r["instruction"]},
                                {"role": "assistant", "content": r["output"]}]} for r in records[::5]]
  path = os.path.join(tmp_path, "sft.jsonl")
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  config = tiny_config(tmp_path, **{"task": "sft", "data.path": path, "data.seq_len": 32,
                                    "data.packing": "document", "data.val_fraction": 0.1, "sft.prefix_lm": True,
                                    "train.steps": 12, "train.eval_every": 12, "train.log_every": 4,
                                    "train.checkpoint_every": 12, "train.sample_prompt": "list three colors",
                                    "train.sample_tokens": 4})
  workdir = os.path.join(tmp_path, "run")
  last = train.run(config, workdir)
  assert "--- sample ---" in capsys.readouterr().out
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  losses = [r["loss"] for r in rows if "loss" in r]
  assert losses[-1] < losses[0] and np.isfinite(last["eval_loss"])


def test_records_load_from_json_jsonl_and_a_saved_dataset(tmp_path):
  import datasets
  records = make_records(5, seed=9)
  json_path, jsonl_path = os.path.join(tmp_path, "a.json"), os.path.join(tmp_path, "a.jsonl")
  with open(json_path, "w", encoding="utf-8") as f:
    json.dump(records, f)
  with open(jsonl_path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  disk = os.path.join(tmp_path, "saved")
  datasets.Dataset.from_list(records).save_to_disk(disk)
  for path in (json_path, jsonl_path, disk):
    assert sft.load_records(path) == records
  with pytest.raises(DataError, match="no such file"):
    sft.load_records(os.path.join(tmp_path, "missing.json"))


def test_a_prefix_lm_model_is_not_exported_to_a_causal_hf_class(tmp_path):
  from jaxllm import checkpoint
  from jaxllm.config import default_config
  from jaxllm.convert import ConvertError, to_hf
  from jaxllm.model_dir import trained_prefix_lm
  config = default_config()
  config.task, config.sft.prefix_lm = "sft", True
  checkpoint.write_json(os.path.join(tmp_path, "config.json"), config.to_dict())
  assert trained_prefix_lm(str(tmp_path))
  with pytest.raises(ConvertError, match="sft.prefix_lm=True"):
    to_hf(str(tmp_path), str(tmp_path / "hf"))


def test_a_run_does_not_resume_with_sft_prefix_lm_switched(tmp_path):
  from jaxllm import checkpoint
  from jaxllm.config import default_config
  from jaxllm.errors import ConfigError
  from jaxllm.workdir import check_resumable
  config = default_config()
  config.task = "sft"
  saved = config.to_dict()
  del saved["sft"]  # a run from before sft.prefix_lm existed: causal
  checkpoint.write_json(os.path.join(tmp_path, "config.json"), saved)
  os.makedirs(os.path.join(tmp_path, "checkpoints", "4"))
  check_resumable(config, str(tmp_path))
  config.sft.prefix_lm = True
  with pytest.raises(ConfigError, match=r"sft.prefix_lm=True \(the run has False\)"):
    check_resumable(config, str(tmp_path))
