"""The `python -m jaxllm.generate` command line: load a model directory, generate, stream.

  python -m jaxllm.generate --checkpoint DIR --prompt "def main():" [--max-new-tokens 128
      --temperature 0.8 --top-k 40 --top-p 0.95 --repetition-penalty 1.1 --seed 0
      --num-samples 2 --stop "\\n\\n" --prompt-file prompts.txt --mesh 1,1,-1]
  python -m jaxllm.generate --bench [--bench-batch 8 --max-new-tokens 128 --temperature 0]
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import progress
from jaxllm.model_dir import load_with_tokenizer, trained_prefix_lm
from jaxllm.cli import ArgumentParser, run_command
from jaxllm.generate import Generator, decode_chunk, layout, prefill
from jaxllm.models import GPT, ModelConfig
from jaxllm.sampling import GenerationError, SamplingConfig
from jaxllm.sharding import mesh_from_flag


def _parse_args(argv: Sequence[str] | None):
  p = ArgumentParser(prog="python -m jaxllm.generate",
                              description="Generate text from a jaxllm model directory.")
  p.add_argument("--checkpoint", help="model directory: a training workdir or one written by "
                 "`python -m jaxllm.convert from-hf`")
  p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
  p.add_argument("--prompt-file", help="prompts, one per line; or .jsonl with a 'prompt' field")
  p.add_argument("--max-new-tokens", type=int, default=128)
  p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
  p.add_argument("--top-k", type=int, default=0, help="0 = off")
  p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
  p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
  p.add_argument("--batch-size", type=int, default=32,
                 help="sequences (prompts x samples) generated at once; batch i samples with seed + i")
  p.add_argument("--stop", action="append", default=[],
                 help=r"stop string (repeatable); \n and \t mean newline and tab")
  p.add_argument("--mesh", default="1,1,-1", help="DATA,FSDP,TENSOR device mesh (-1 = the rest)")
  p.add_argument("--bench", action="store_true",
                 help="measure decode tokens/s of a random 124M GPT-2-shaped model and exit")
  p.add_argument("--bench-batch", type=int, default=1)
  p.add_argument("--bench-prompt-len", type=int, default=64)
  return p.parse_args(argv)


def _read_prompts(args) -> list[str]:
  prompts = list(args.prompt)
  if args.prompt_file:
    if not os.path.isfile(args.prompt_file):
      raise FileNotFoundError(f"--prompt-file {args.prompt_file}: no such file.")
    with open(args.prompt_file, encoding="utf-8") as f:
      lines = [line.rstrip("\n") for line in f]
    for n, line in enumerate(lines, 1):
      if not line.strip():
        continue
      if args.prompt_file.endswith(".jsonl"):
        try:
          prompts.append(json.loads(line)["prompt"])
        except (ValueError, KeyError, TypeError) as e:
          raise GenerationError(f"--prompt-file {args.prompt_file} line {n}: expected a JSON object "
                                f"with a 'prompt' string ({e}).") from e
      else:
        prompts.append(line)
  if not prompts:
    raise GenerationError("no prompt: give --prompt TEXT or --prompt-file FILE.")
  return prompts


def run_cli(args) -> None:
  if not args.checkpoint:
    raise GenerationError("--checkpoint DIR is required (a training workdir or converted model).")
  if args.num_samples < 1:
    raise GenerationError(f"--num-samples={args.num_samples} must be at least 1.")
  if args.batch_size < 1:
    raise GenerationError(f"--batch-size={args.batch_size} must be at least 1.")
  sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p,
                            repetition_penalty=args.repetition_penalty)
  texts = _read_prompts(args)
  mesh = mesh_from_flag(args.mesh)
  cfg, params, tokenizer = load_with_tokenizer(args.checkpoint, mesh)
  sampling = dataclasses.replace(sampling, eos_id=tokenizer.eos_token_id)
  start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
  prompts = []
  for text in texts:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] or [start_id]
    prompts += [ids] * args.num_samples
  streaming = len(prompts) == 1

  def on_text(row: int, delta: str) -> None:
    del row
    sys.stdout.write(delta)
    sys.stdout.flush()

  if streaming:
    sys.stdout.write(texts[0])
    sys.stdout.flush()
  # A prefix-LM's whole prompt is its prefix (an SFT model's prompt is the template's prompt part).
  generator = Generator(cfg, params, mesh, prefix_lm=trained_prefix_lm(args.checkpoint))
  stop = [s.replace("\\n", "\n").replace("\\t", "\t") for s in args.stop]
  start = time.perf_counter()
  completions = []
  # Batches bound the KV cache (it holds every row of a batch) and let a long --prompt-file
  # show progress and print each batch's completions as soon as it is done.
  with progress.bar(len(prompts), desc="generating", unit="seq", disable=streaming) as bar:
    for first in range(0, len(prompts), args.batch_size):
      batch = generator.generate(
          prompts[first:first + args.batch_size], sampling, seed=args.seed + first // args.batch_size,
          on_text=on_text if streaming else None, stop=stop,
          detokenize=lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
      if not streaming:
        for i, c in enumerate(batch, first):
          prompt_index, sample_index = divmod(i, args.num_samples)
          progress.write(f"=== prompt {prompt_index} sample {sample_index} ({c.finish_reason}) ===\n"
                         f"{texts[prompt_index] + c.text}")
      completions += batch
      bar.update(len(batch))
  elapsed = time.perf_counter() - start
  if streaming:
    sys.stdout.write("\n")
  num_tokens = sum(len(c.tokens) for c in completions)
  print(f"[{num_tokens} tokens in {elapsed:.2f}s including compilation; finish: "
        f"{', '.join(sorted({c.finish_reason for c in completions}))}]", file=sys.stderr)


def bench(args) -> dict[str, float]:
  """Decode speed of a randomly initialised GPT-2 small (124M) on the default device."""
  cfg = ModelConfig(vocab_size=50257, d_model=768, num_layers=12, num_heads=12, max_seq_len=1024)
  params = jax.jit(lambda key: nn.meta.unbox(GPT(cfg).init(key, jnp.zeros((1, 8), jnp.int32))["params"])
                   )(jax.random.key(0))
  rng = np.random.default_rng(0)
  prompts = rng.integers(0, cfg.vocab_size, (args.bench_batch, args.bench_prompt_len)).tolist()
  sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p)
  generator = Generator(cfg, params)
  generator.generate(prompts, sampling)  # compile
  prompt, key_positions, key_valid = layout(prompts, 0, args.max_new_tokens)
  program = sampling.program_key()
  start = time.perf_counter()
  state = prefill(params, prompt, key_positions, key_valid, np.int32(-1), jax.random.key(0), None,
                  cfg=cfg, sampling=program, mesh=None)
  jax.block_until_ready(state)
  prefill_s = time.perf_counter() - start
  start = time.perf_counter()
  state = decode_chunk(params, state, np.int32(args.max_new_tokens), cfg=cfg, sampling=program, mesh=None)
  jax.block_until_ready(state)
  decode_s = time.perf_counter() - start
  decoded = args.bench_batch * (args.max_new_tokens - 1)
  return {"params_M": cfg.num_params() / 1e6, "batch": args.bench_batch,
          "prompt_len": args.bench_prompt_len, "new_tokens": args.max_new_tokens,
          "prefill_s": prefill_s, "decode_s": decode_s, "decode_tokens_per_s": decoded / decode_s,
          "ms_per_step": 1e3 * decode_s / (args.max_new_tokens - 1)}


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse_args(argv)
  return run_command(lambda: _print_bench(args) if args.bench else run_cli(args))


def _print_bench(args) -> None:
  print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in bench(args).items()))



if __name__ == "__main__":
  sys.exit(main())
