"""Section 4 of the GPU check: a short real run and its PyTorch twin.

GPT-2 124M (configs/gpt2_124m.py) trains for a few hundred steps on a real text through
`python -m jaxllm.train` (the real pipeline: BPE trained on the text, packing, prefetch,
evaluation, checkpointing). Then, in this process: the trainer's step on a random batch
of the same shape is timed (the bench's figure, to set beside the loop's tokens/s: a loop
much slower than its step means the pipeline starves the device), and transformers'
GPT2LMHeadModel trains on the same batches (the same pipeline, re-read from the run's
tokenizer) with the same schedule, for the loss curve side by side.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

from gpu_check_common import (DRY_RUN, REPO_ROOT, apply_overrides, dry_overrides, error_text, load_config,
                              read_json, write_json)

STEPS, BATCH, LOG_EVERY, EVAL_EVERY = (30, 4, 5, 10) if DRY_RUN else (300, 16, 10, 100)


def run_overrides(data: str) -> dict[str, Any]:
  if data == "stdlib":  # no text file reached the machine: the Python standard library's source
    source = {"data.source": "stdlib", "data.max_chars": 2_000_000}
  else:
    source = {"data.source": "text", "data.path": data, "data.text_unit": "line"}
  out = {**source, "train.steps": STEPS, "train.batch_size": BATCH, "train.log_every": LOG_EVERY,
         "train.eval_every": EVAL_EVERY, "train.eval_steps": 4, "train.checkpoint_every": EVAL_EVERY,
         "train.progress": False, "optim.warmup_steps": STEPS // 10}
  if DRY_RUN:
    out.update(dry_overrides(load_config("gpt2_124m")))
    out["data.tokenizer_vocab_size"] = out["model.vocab_size"]
  return out


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def train_subprocess(workdir: str, overrides: dict[str, Any], timeout_s: float) -> dict[str, Any]:
  cmd = [sys.executable, "-m", "jaxllm.train", "--config", os.path.join(REPO_ROOT, "configs", "gpt2_124m.py"),
         "--workdir", workdir] + [f"--config.{k}={v}" for k, v in overrides.items()]
  start = time.perf_counter()
  try:
    proc = subprocess.run(cmd, cwd=REPO_ROOT, timeout=timeout_s, check=False, capture_output=True, text=True)
    rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
  except subprocess.TimeoutExpired as e:
    rc, tail = "timeout", str(e.stdout or "")[-3000:] + str(e.stderr or "")[-3000:]
  print(tail, flush=True)
  return {"command": " ".join(cmd), "rc": rc, "wall_s": time.perf_counter() - start, "output_tail": tail[-1500:]}


def loop_throughput(metrics: list[dict[str, Any]]) -> dict[str, Any]:
  """tokens/s per log window, the first (compilation) left out."""
  windows = [m["tokens_per_s"] for m in metrics if "tokens_per_s" in m][1:]
  if not windows:
    return {}
  return {"loop_tokens_per_s_median": statistics.median(windows), "loop_tokens_per_s_min": min(windows),
          "loop_windows": len(windows)}


def torch_twin(config, workdir: str, deadline: float, out_path: str) -> dict[str, Any]:
  """transformers GPT-2 on the run's own batches (same pipeline and tokenizer), same schedule."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from jaxllm.data.build import build_lm_data  # pylint: disable=import-outside-toplevel
  from jaxllm.models.config import ModelConfig  # pylint: disable=import-outside-toplevel
  from jaxllm.optim import learning_rate_schedule  # pylint: disable=import-outside-toplevel
  from gpu_check_bench import torch_trainer  # pylint: disable=import-outside-toplevel
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model_cfg = ModelConfig.from_config(config.model)
  schedule = learning_rate_schedule(config.optim, config.train.steps)
  _, _, step = torch_trainer(model_cfg, config.optim, device, use_compile=False)
  data = build_lm_data(config, workdir)
  batches = iter(data.train)
  curve, window, start = [], [], time.perf_counter()
  try:
    for i in range(config.train.steps):
      if time.monotonic() > deadline:
        break
      batch = next(batches)
      inputs = torch.from_numpy(np.asarray(batch["inputs"])).long().to(device)
      targets = torch.from_numpy(np.asarray(batch["targets"])).long().to(device)
      window.append(step(inputs, targets, lr=float(schedule(i))))
      if (i + 1) % config.train.log_every == 0:
        curve.append({"step": i + 1, "loss": float(torch.stack(window).float().mean())})
        window = []
        write_json(out_path, {"device": device, "curve": curve, "partial": True})
  finally:
    if hasattr(batches, "close"):
      batches.close()
  steps_done = curve[-1]["step"] if curve else 0
  elapsed = time.perf_counter() - start
  return {"device": device, "curve": curve, "steps": steps_done, "wall_s": elapsed,
          "tokens_per_s": steps_done * config.train.batch_size * config.data.seq_len / max(elapsed, 1e-9)}


def realrun_torch(out_path: str, work_dir: str, data: str, deadline: float) -> None:
  config = apply_overrides(load_config("gpt2_124m"), run_overrides(data))
  try:
    result = torch_twin(config, os.path.join(work_dir, "realrun"), deadline, out_path)
  except Exception as e:  # pylint: disable=broad-except
    result = {"error": error_text(e)}
  write_json(out_path, result)


def realrun(out_path: str, work_dir: str, data: str, deadline: float) -> dict[str, Any]:
  from gpu_check_bench import compile_row, step_figures, time_row  # pylint: disable=import-outside-toplevel
  overrides = run_overrides(data)
  workdir = os.path.join(work_dir, "realrun")
  shutil.rmtree(workdir, ignore_errors=True)
  report: dict[str, Any] = {"data": data, "overrides": overrides}
  # The train run may take most of the time left; torch and the step timing share the rest.
  report["train"] = train_subprocess(workdir, overrides, max(deadline - time.monotonic() - 45, 30))
  metrics = read_metrics(workdir)
  report["jax_curve"] = [{"step": m["step"], "loss": m["loss"], **({"eval_loss": m["eval_loss"]}
                          if "eval_loss" in m else {})} for m in metrics if "loss" in m]
  report.update(loop_throughput(metrics))
  ckpt_dir = os.path.join(workdir, "checkpoints")
  report["checkpoints"] = sorted((int(d) for d in os.listdir(ckpt_dir) if d.isdigit())) if os.path.isdir(ckpt_dir) else []
  write_json(out_path, report)
  # torch in its own process, with JAX kept off the GPU (the pipeline imports JAX), before this
  # process starts JAX on the GPU and takes its memory pool for the step timing.
  torch_path = os.path.join(work_dir, "realrun_torch.json")
  cmd = [sys.executable, os.path.join(REPO_ROOT, "scripts", "gpu_check.py"), "realrun-torch", torch_path,
         work_dir, data, "--budget-s", str(max(deadline - time.monotonic() - 28, 5))]
  try:
    subprocess.run(cmd, cwd=REPO_ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), check=False,
                   timeout=max(deadline - time.monotonic() - 25, 5))
  except subprocess.TimeoutExpired:
    pass
  report["torch"] = read_json(torch_path, {"error": "the torch process wrote nothing (timed out?)"})
  config = apply_overrides(load_config("gpt2_124m"), overrides)
  try:
    row = compile_row(config)
    times = time_row(row, 5 if DRY_RUN else 10, 2)
    step = step_figures(times, BATCH * config.data.seq_len, row["model_cfg"], config.data.seq_len)
    report["bench_step_tokens_per_s"] = step["tokens_per_s"]
    report["bench_step_ms_median"] = step["step_ms_median"]
    if report.get("loop_tokens_per_s_median"):
      report["loop_over_step"] = report["loop_tokens_per_s_median"] / step["tokens_per_s"]
  except Exception as e:  # pylint: disable=broad-except
    report["bench_step_error"] = error_text(e)
  write_json(out_path, report)
  jax_by_step = {p["step"]: p["loss"] for p in report["jax_curve"]}
  pairs = [(jax_by_step[p["step"]], p["loss"]) for p in report["torch"].get("curve", []) if p["step"] in jax_by_step]
  if pairs:
    report["last_window_loss"] = {"jaxllm": pairs[-1][0], "torch": pairs[-1][1]}
  write_json(out_path, report)
  print(f"realrun: {len(report['jax_curve'])} jaxllm log points, loop {report.get('loop_tokens_per_s_median', 0):,.0f}"
        f" tokens/s vs step {report.get('bench_step_tokens_per_s', 0):,.0f}; torch {len(pairs)} points", flush=True)
  return report
