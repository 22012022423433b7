"""`convert to-hf` writes a model card (README.md) and a generation_config.json that makes
transformers' generate and text-generation pipeline stop where jaxllm's generate stops."""

import json
import os
import shutil

import pytest

from jaxllm import __version__, train
from jaxllm.model_dir import load_model_dir
from jaxllm.convert import to_hf
from jaxllm.convert.model_card import GENERATE_DEFAULTS
from jaxllm.generate import Generator, SamplingConfig
from tests.helpers import make_tiny_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPT = "the cat sat"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 4-step tiny GPT run with evals at steps 2 and 4 (init_std 0.3: peaked next-token
  distributions, so greedy decoding has no near-ties between jaxllm and PyTorch)."""
  root = tmp_path_factory.mktemp("card")
  config = make_tiny_config(root, **{"train.steps": 4, "train.eval_every": 2, "train.checkpoint_every": 4,
                                     "model.init_std": 0.3, "optim.lr": 1e-4, "optim.min_lr": 1e-5})
  workdir = str(root / "run")
  train.run(config, workdir)
  return workdir


def test_model_card_states_architecture_data_tokens_eval_and_command(run, tmp_path):
  out = str(tmp_path / "hf")
  to_hf(run, out)
  card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
  config = json.load(open(os.path.join(run, "config.json"), encoding="utf-8"))
  records = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"), encoding="utf-8")]
  last_eval = [r for r in records if "eval_loss" in r][-1]
  cfg, _, _ = load_model_dir(run)
  assert "pipeline_tag: text-generation" in card
  assert "`GPT2LMHeadModel`" in card and f"({cfg.num_params():,})" in card
  assert "| layers, d_model, heads | 2, 64, 4 |" in card and "| context length | 32 |" in card
  assert f"`{config['data']['path']}` (`data.source=jsonl`, field `text`)" in card
  assert "| tokens | 1,024 (4 steps x 8 sequences x 32 tokens" in card  # steps x batch_size x seq_len
  assert last_eval["step"] == 4 and f"| eval_loss | {last_eval['eval_loss']:.4f} |" in card
  assert f"| eval_accuracy | {last_eval['eval_accuracy']:.4f} |" in card
  assert f"jaxllm {__version__}" in card and f"python -m jaxllm.convert to-hf {run} {out}\n" in card


def test_model_card_command_names_the_options_used(run, tmp_path):
  """--step and --dtype appear in the recorded command; the card names the exported step."""
  out = str(tmp_path / "hf")
  to_hf(run, out, step=4, dtype="bfloat16")
  card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
  assert f"to-hf {run} {out} --step 4 --dtype bfloat16" in card and "at step 4" in card


def test_generation_config_holds_eos_and_pad_and_the_generate_defaults(run, tmp_path):
  out = str(tmp_path / "hf")
  to_hf(run, out)
  _, _, tokenizer = load_model_dir(run)
  generation = transformers.GenerationConfig.from_pretrained(out)
  assert generation.eos_token_id == tokenizer.eos_token_id is not None
  assert generation.pad_token_id == tokenizer.pad_token_id is not None
  assert generation.temperature == GENERATE_DEFAULTS["temperature"] and generation.top_k == 0
  # A cap on the whole sequence, not max_new_tokens (which would override a caller's max_length).
  assert generation.max_length == 32 and generation.max_new_tokens is None


def test_generate_defaults_are_the_jaxllm_generate_commands():
  from jaxllm.generate.__main__ import _parse_args  # pylint: disable=import-outside-toplevel
  args = _parse_args(["--checkpoint", "x", "--prompt", "y"])
  assert GENERATE_DEFAULTS["max_new_tokens"] == args.max_new_tokens
  assert GENERATE_DEFAULTS["temperature"] == args.temperature
  assert (GENERATE_DEFAULTS["top_k"], GENERATE_DEFAULTS["top_p"]) == (args.top_k, args.top_p)
  assert GENERATE_DEFAULTS["repetition_penalty"] == args.repetition_penalty


def test_transformers_stops_at_eos_where_jaxllm_does(run, tmp_path):
  """Make the tokenizer's EOS a token the model produces mid-way through a greedy completion;
  then jaxllm's generate, HF generate and the pipeline all end there (and only generation_config
  tells transformers which token that is)."""
  _, _, tokenizer = load_model_dir(run)
  cfg, params, _ = load_model_dir(run)
  ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
  [free] = Generator(cfg, params).generate([ids], SamplingConfig(max_new_tokens=12))
  stop_at = next(k for k in range(1, 12) if free.tokens[k] not in free.tokens[:k])
  workdir = str(tmp_path / "run")
  shutil.copytree(run, workdir)
  tokenizer.eos_token = tokenizer.convert_ids_to_tokens(free.tokens[stop_at])
  tokenizer.save_pretrained(os.path.join(workdir, "tokenizer"))
  eos = tokenizer.eos_token_id
  assert eos == free.tokens[stop_at]

  [jax_out] = Generator(cfg, params).generate([ids], SamplingConfig(max_new_tokens=12, eos_id=eos))
  assert jax_out.finish_reason == "eos" and jax_out.tokens == free.tokens[:stop_at]

  out = str(tmp_path / "hf")
  to_hf(workdir, out)
  hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  with torch.no_grad():
    generated = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            max_new_tokens=12, do_sample=False)
  assert generated[0, len(ids):].tolist() == jax_out.tokens + [eos]
  pipe = transformers.pipeline("text-generation", model=out)
  [text] = pipe(PROMPT, max_new_tokens=12, do_sample=False)
  assert text["generated_text"] == PROMPT + tokenizer.decode(jax_out.tokens)
