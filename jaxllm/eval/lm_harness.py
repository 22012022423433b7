"""`python -m jaxllm.eval lm-eval`: EleutherAI lm-evaluation-harness tasks on a jaxllm model.

  python -m jaxllm.eval lm-eval --checkpoint DIR --tasks hellaswag,lambada_openai
      [--include-path DIR --num-fewshot N --limit N --batch-size N --mesh 1,1,-1
       --output-path DIR --log-samples]

The model class is jaxllm/eval/lm_model.py; lm-eval itself loads the tasks, builds the
requests and computes the metrics. Prints lm-eval's results table; writes its results
JSON to DIR/results.json (and, with --log-samples, each task's samples to
DIR/samples_<task>.jsonl, as lm-eval's own CLI does). Needs the `eval` extra.
"""

from __future__ import annotations

import json
import os
from typing import Any

from jaxllm.errors import ConfigError

INSTALL_HINT = 'pip install -e ".[eval]"'


def add_arguments(p: Any) -> None:
  p.add_argument("--checkpoint", required=True,
                 help="model directory: a training workdir or one written by `convert from-hf`")
  p.add_argument("--tasks", required=True, help="comma-separated lm-eval task, group or tag names")
  p.add_argument("--include-path", default="", help="a folder of task YAML files of your own")
  p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
  p.add_argument("--limit", type=float, default=None,
                 help="documents per task (a fraction when below 1); for quick checks only")
  p.add_argument("--batch-size", type=int, default=8, help="requests per forward pass or generation")
  p.add_argument("--seed", type=int, default=0, help="sampling seed (greedy tasks do not use it)")
  p.add_argument("--mesh", default="1,1,-1", help="DATA,FSDP,TENSOR device mesh (-1 = the rest)")
  p.add_argument("--output-path", default="", help="directory for results.json")
  p.add_argument("--log-samples", action="store_true", help="also write every request and response")


def import_lm_eval() -> Any:
  try:
    import lm_eval  # pylint: disable=import-outside-toplevel
    import lm_eval.tasks  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    raise ConfigError(f"lm-eval needs the lm_eval package ({e}); install the eval extra: {INSTALL_HINT}") from e
  return lm_eval


def task_manager(lm_eval: Any, names: list[str], include_path: str) -> Any:
  """lm-eval's TaskManager (its own tasks and those under include_path); every name must be known."""
  if include_path and not os.path.isdir(include_path):
    raise ConfigError(f"--include-path {include_path}: no such directory.")
  if include_path:
    # Indexing lm-eval's thousands of built-in YAML files takes seconds; tasks of one's own
    # (plain tasks, not groups that may name built-in ones) do without it.
    own = lm_eval.tasks.TaskManager(include_path=include_path, include_defaults=False)
    if all(n in own.all_subtasks for n in names):
      return own
  manager = lm_eval.tasks.TaskManager(include_path=include_path or None)
  matched = set(manager.match_tasks(names))
  unknown = [n for n in names if n not in matched and not os.path.isfile(n)]
  if unknown:
    raise ConfigError(f"--tasks: unknown task {', '.join(unknown)}; `python -m lm_eval ls tasks` lists "
                      "lm-eval's own, --include-path DIR adds YAML tasks of your own.")
  return manager


def run(args: Any) -> dict[str, Any]:
  # pylint: disable=import-outside-toplevel
  lm_eval = import_lm_eval()
  from lm_eval.utils import handle_non_serializable, make_table

  from jaxllm.eval.lm_model import JaxLM
  from jaxllm.model_dir import load_with_tokenizer
  from jaxllm.sharding import mesh_from_flag

  names = [n.strip() for n in args.tasks.split(",") if n.strip()]
  if not names:
    raise ConfigError("--tasks is empty; give comma-separated task names such as hellaswag,arc_easy.")
  manager = task_manager(lm_eval, names, args.include_path)
  mesh = mesh_from_flag(args.mesh)
  cfg, params, tokenizer = load_with_tokenizer(args.checkpoint, mesh)
  model = JaxLM(cfg, params, tokenizer, mesh, args.batch_size, args.seed)
  limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
  results = lm_eval.simple_evaluate(model=model, tasks=names, num_fewshot=args.num_fewshot, limit=limit,
                                    task_manager=manager, log_samples=args.log_samples,
                                    random_seed=args.seed)
  samples = results.pop("samples", None)
  results["config"]["model"] = f"jaxllm:{args.checkpoint}"
  print(make_table(results))
  if "groups" in results:
    print(make_table(results, "groups"))
  if args.output_path:
    os.makedirs(args.output_path, exist_ok=True)
    with open(os.path.join(args.output_path, "results.json"), "w", encoding="utf-8") as f:
      f.write(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))
    for task, task_samples in (samples or {}).items():
      with open(os.path.join(args.output_path, f"samples_{task}.jsonl"), "w", encoding="utf-8") as f:
        for sample in task_samples:
          f.write(json.dumps(sample, default=handle_non_serializable, ensure_ascii=False) + "\n")
  return results
