"""A tiny random jaxllm GPT (d_model 32, 2 layers, 64 positions) with a BPE tokenizer, saved
as a model directory and exported with `convert to-hf`: the same weights on both sides for
the evaluation tests' comparisons with transformers and lm-eval's `hf` backend."""

from __future__ import annotations

import importlib
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import model_dir
from jaxllm.config import default_config
from jaxllm.convert import to_hf
from jaxllm.models import GPT, ModelConfig
from jaxllm.tokenizer import train_bpe
from tests.helpers import _WORDS

MAX_SEQ_LEN = 64


def word_texts(num: int, seed: int, min_words: int = 5, max_words: int = 60) -> list[str]:
  rng = np.random.default_rng(seed)
  return [" ".join(rng.choice(_WORDS, int(rng.integers(min_words, max_words + 1)))) + "."
          for _ in range(num)]


def build(root: str, init_std: float = 0.2) -> tuple[str, str]:
  """(jaxllm model dir, HF dir) of one random model. init_std 0.2 makes next-token
  distributions peaked, so greedy choices have no near-ties for float noise to flip."""
  tokenizer = train_bpe(word_texts(80, 0), vocab_size=300)
  config = default_config()
  config.model.update(vocab_size=320, d_model=32, num_layers=2, num_heads=4, d_ff=64,
                      max_seq_len=MAX_SEQ_LEN, init_std=init_std)
  cfg = ModelConfig.from_config(config.model)
  params = jax.jit(lambda key: nn.meta.unbox(GPT(cfg).init(key, jnp.zeros((1, 8), jnp.int32))["params"])
                   )(jax.random.key(0))
  jax_dir, hf_dir = os.path.join(root, "jaxllm"), os.path.join(root, "hf")
  model_dir.save_model_dir(jax_dir, config.to_dict(), params, tokenizer)
  to_hf(jax_dir, hf_dir)
  return jax_dir, hf_dir


def run_subcommand(name: str, argv: list[str]) -> int:
  """`python -m jaxllm.eval NAME ARGV...` in this process, through the subcommand's own parser
  and `run` (the dispatcher in __main__ imports every subcommand module)."""
  from jaxllm.cli import ArgumentParser, run_command  # pylint: disable=import-outside-toplevel
  from jaxllm.eval.__main__ import SUBCOMMANDS  # pylint: disable=import-outside-toplevel
  module = importlib.import_module(f"jaxllm.eval.{SUBCOMMANDS[name][0]}")
  parser = ArgumentParser(prog=f"python -m jaxllm.eval {name}")
  module.add_arguments(parser)
  args = parser.parse_args(argv)
  return run_command(lambda: module.run(args))
