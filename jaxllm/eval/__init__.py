"""Evaluation of a trained model: `python -m jaxllm.eval {perplexity,lm-eval,humaneval}`.

  jaxllm/eval/perplexity.py   sliding-window perplexity and bits per byte over text files
  jaxllm/eval/lm_harness.py   a jaxllm model class for EleutherAI's lm-evaluation-harness
  jaxllm/eval/humaneval.py    HumanEval pass@k: sample, cut at stop sequences, run sandboxed

Each subcommand module exposes `add_arguments(parser)` and `run(args)`; the command in
`__main__.py` only dispatches.
"""
