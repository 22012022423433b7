"""Fill in [MASK] tokens with a trained BERT: the top-k tokens and their probabilities.

  python -m jaxllm.fill_mask --checkpoint WORKDIR "the capital of france is [MASK]." [--top-k 5]

WORKDIR is a model directory (a training workdir, or one written by `python -m jaxllm.convert
from-hf` from a BertForMaskedLM): config.json, tokenizer/, checkpoints/<step>/state.
"""

from __future__ import annotations

import sys
from typing import Any

import jax
import numpy as np

from jaxllm.cli import ArgumentParser, run_command
from jaxllm.errors import GenerationError


def fill_mask(model: Any, params: Any, tokenizer: Any, text: str, top_k: int = 5
              ) -> list[list[tuple[str, float]]]:
  """For each [MASK] in `text` (in order), the `top_k` (token, probability) pairs."""
  if tokenizer.mask_token is None:
    raise GenerationError("the tokenizer has no mask token; fill-mask needs a BERT (WordPiece) tokenizer.")
  ids = tokenizer(text)["input_ids"]   # with [CLS] ... [SEP], as in pretraining
  positions = [i for i, t in enumerate(ids) if t == tokenizer.mask_token_id]
  if not positions:
    raise GenerationError(f"the text has no {tokenizer.mask_token}; put one where a word should be filled in.")
  if len(ids) > model.cfg.max_seq_len:
    raise GenerationError(f"the text is {len(ids)} tokens; this model reads at most {model.cfg.max_seq_len}.")
  logits = model.apply({"params": params}, np.asarray([ids], np.int32))[0]
  probs = np.asarray(jax.nn.softmax(logits[np.asarray(positions)], axis=-1))  # [masks, vocab]
  results = []
  for row in probs:
    best = np.argsort(-row)[:top_k]
    results.append([(tokenizer.convert_ids_to_tokens(int(i)), float(row[i])) for i in best])
  return results


def main(argv: list[str] | None = None) -> int:
  parser = ArgumentParser(prog="python -m jaxllm.fill_mask", description=__doc__.split("\n")[0])
  parser.add_argument("--checkpoint", required=True, help="model directory (training workdir)")
  parser.add_argument("--top-k", type=int, default=5)
  parser.add_argument("--tokenizer", default="", help="tokenizer directory (default CHECKPOINT/tokenizer)")
  parser.add_argument("texts", nargs="+", help="text with one or more [MASK] tokens")
  args = parser.parse_args(argv)
  from absl import logging  # pylint: disable=import-outside-toplevel
  logging.set_verbosity(logging.ERROR)  # orbax notes about checkpoint metadata are not for this output
  return run_command(lambda: _fill_mask_cmd(args))


def _fill_mask_cmd(args) -> None:
  from jaxllm import checkpoint, model_dir  # pylint: disable=import-outside-toplevel
  from jaxllm.config_types import DataConfig  # pylint: disable=import-outside-toplevel
  from jaxllm.models import build_model  # pylint: disable=import-outside-toplevel
  from jaxllm.tokenizer import load_tokenizer  # pylint: disable=import-outside-toplevel
  model_cfg, params, tokenizer = model_dir.load_model_dir(args.checkpoint)
  if model_cfg.family != "bert":
    raise GenerationError(f"{args.checkpoint} holds a model.family={model_cfg.family!r} model; "
                          "fill-mask needs a BERT (model.family='bert').")
  tok_dir = args.tokenizer or DataConfig.from_config(checkpoint.read_run_config(args.checkpoint).get("data"),
                                                     strict=False).tokenizer
  if args.tokenizer or tokenizer is None:
    if not tok_dir:
      raise FileNotFoundError(f"{args.checkpoint} has no tokenizer/ directory; pass --tokenizer DIR.")
    tokenizer = load_tokenizer(tok_dir)
  model = build_model(model_cfg)
  for text in args.texts:
    fills = fill_mask(model, params, tokenizer, text, args.top_k)
    print(text)
    for number, candidates in enumerate(fills, 1):
      print(f"  [MASK] {number}: " + "  ".join(f"{tok} {p:.3f}" for tok, p in candidates))


if __name__ == "__main__":
  sys.exit(main())
