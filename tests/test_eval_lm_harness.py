"""`python -m jaxllm.eval lm-eval` gives the figures of lm-eval's own `hf` backend run on the
same weights (exported with `convert to-hf`): the small tasks under
tests/fixtures/lm_eval_tasks cover loglikelihood (multiple choice), loglikelihood_rolling and
greedy generate_until; bad input is one `error:` line."""

import json
import os
import sys

import numpy as np
import pytest

from tests import eval_models
from tests.helpers import REPO_ROOT

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("torch")

TASKS_DIR = os.path.join(REPO_ROOT, "tests", "fixtures", "lm_eval_tasks")
TASKS = ["jaxllm_tiny_choice", "jaxllm_tiny_gen", "jaxllm_tiny_rolling"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
  jax_dir, hf_dir = eval_models.build(str(tmp_path_factory.mktemp("lm_eval")))
  import lm_eval.tasks  # pylint: disable=import-outside-toplevel
  # batch_size 1: each request alone, so the comparison also covers jaxllm's batching and padding.
  reference = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={hf_dir},dtype=float32,device=cpu",
                                      tasks=TASKS, batch_size=1, log_samples=True,
                                      task_manager=lm_eval.tasks.TaskManager(include_path=TASKS_DIR,
                                                                             include_defaults=False))
  return {"jax": jax_dir, "hf": hf_dir, "reference": reference}


def by_doc(samples):
  return sorted(samples, key=lambda s: s["doc_id"])


def test_metrics_and_generations_equal_the_hf_backend(model, tmp_path, capsys):
  out = tmp_path / "out"
  assert eval_models.run_subcommand("lm-eval", [
      "--checkpoint", model["jax"], "--tasks", ",".join(TASKS), "--include-path", TASKS_DIR,
      "--batch-size", "4", "--mesh=2,2,2", "--output-path", str(out), "--log-samples"]) == 0
  table = capsys.readouterr().out
  assert all(task in table for task in TASKS) and "bits_per_byte" in table
  with open(out / "results.json", encoding="utf-8") as f:
    ours = json.load(f)["results"]
  theirs = model["reference"]["results"]
  for task in TASKS:
    metrics = {k: v for k, v in theirs[task].items() if isinstance(v, float) and "stderr" not in k}
    assert metrics, theirs[task]
    for key, value in metrics.items():
      np.testing.assert_allclose(ours[task][key], value, rtol=1e-4, err_msg=f"{task} {key}")
  samples = {task: by_doc(json.loads(line) for line in open(out / f"samples_{task}.jsonl", encoding="utf-8"))
             for task in TASKS}
  reference = {task: by_doc(model["reference"]["samples"][task]) for task in TASKS}
  # Every choice's log-likelihood and greedy flag, not only the accuracy they add up to.
  for ours_s, theirs_s in zip(samples["jaxllm_tiny_choice"], reference["jaxllm_tiny_choice"]):
    ours_ll = [r[0] for r in ours_s["resps"]]
    theirs_ll = [r[0] for r in theirs_s["resps"]]
    np.testing.assert_allclose([x[0] for x in ours_ll], [x[0] for x in theirs_ll], rtol=1e-4)
    assert [x[1] for x in ours_ll] == [x[1] for x in theirs_ll]
  generations = [s["filtered_resps"] for s in samples["jaxllm_tiny_gen"]]
  assert generations == [s["filtered_resps"] for s in reference["jaxllm_tiny_gen"]]
  assert any(g[0].strip() for g in generations), generations  # the comparison is not of empty strings


@pytest.mark.parametrize("extra,message", [
    (["--tasks", "jaxllm_tiny_choice,no_such_task"], "--tasks: unknown task no_such_task"),
    (["--tasks", "jaxllm_tiny_choice", "--include-path", "/nonexistent"], "--include-path /nonexistent: no such"),
])
def test_bad_input_is_one_error_line(model, capsys, extra, message):
  args = ["--checkpoint", model["jax"], *extra]
  if "--include-path" not in extra:
    args += ["--include-path", TASKS_DIR]
  assert eval_models.run_subcommand("lm-eval", args) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_without_the_extra_the_error_names_the_install(monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
  assert eval_models.run_subcommand("lm-eval", ["--checkpoint", "x", "--tasks", "y"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'pip install -e ".[eval]"' in err[0], err
