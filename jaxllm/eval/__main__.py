"""The `python -m jaxllm.eval` command line: one subcommand per evaluation.

  python -m jaxllm.eval perplexity --checkpoint DIR --data FILES [--seq-len N --stride N]
  python -m jaxllm.eval lm-eval --checkpoint DIR --tasks NAMES [--include-path DIR ...]
  python -m jaxllm.eval humaneval --checkpoint DIR --samples K --temperature T
"""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

from jaxllm.cli import ArgumentParser, run_command

# subcommand -> (module under jaxllm.eval, one-line help)
SUBCOMMANDS = {
    "perplexity": ("perplexity", "sliding-window perplexity and bits per byte over text"),
    "lm-eval": ("lm_harness", "EleutherAI lm-evaluation-harness tasks on a jaxllm model"),
    "humaneval": ("humaneval", "HumanEval pass@k of sampled (or given) completions"),
}


def main(argv: Sequence[str] | None = None) -> int:
  parser = ArgumentParser(prog="python -m jaxllm.eval", description="Evaluate a jaxllm model.")
  sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
  modules = {}
  for name, (module_name, help_text) in SUBCOMMANDS.items():
    module = importlib.import_module(f"jaxllm.eval.{module_name}")
    modules[name] = module
    module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
  args = parser.parse_args(argv)
  return run_command(lambda: modules[args.command].run(args))


if __name__ == "__main__":
  sys.exit(main())
