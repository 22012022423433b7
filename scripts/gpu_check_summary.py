"""The GPU check's summary.md: one table per section, from the JSON the sections wrote."""

from __future__ import annotations

import os
from typing import Any

from gpu_check_common import read_json


def _f(x: Any, fmt: str = "{:.3g}") -> str:
  return fmt.format(x) if isinstance(x, (int, float)) else "-"


def _gib(x: Any) -> str:
  return f"{x / 2**30:.2f} GiB" if isinstance(x, (int, float)) else "-"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
  return ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def env_lines(env: dict) -> list[str]:
  if not env:
    return ["env: not recorded"]
  v = env.get("versions", {})
  return [f"device: {env.get('device_count')} x {env.get('device_kind')} ({env.get('platform')}); "
          f"python {env.get('python')}; jax {v.get('jax')}, jaxlib {v.get('jaxlib')}, flax {v.get('flax')}, "
          f"torch {v.get('torch')} (CUDA {env.get('torch_cuda')}), transformers {v.get('transformers')}; "
          f"dry run: {env.get('dry_run')}",
          f"measured bf16 {env.get('matmul_size')}^3 matmul: {_f(env.get('measured_bf16_matmul_flops', 0) / 1e12)} "
          f"TFLOP/s; MFU below is against {_f(env.get('peak_flops_for_mfu', 0) / 1e12)} TFLOP/s "
          f"({env.get('peak_is')})"]


def attention_lines(report: dict) -> list[str]:
  if not report:
    return ["not run (see log.txt)"]
  rows = []
  for r in report.get("results", []):
    e = r.get("errors", {})
    rows.append([r["backend"], r["shape"], r["dtype"], r["status"][:90]] +
                [_f(e.get(k, {}).get("rel"), "{:.1e}") for k in ("out", "dq", "dk", "dv")] +
                [",".join(r.get("kernels", [])) or "-", _f(r.get("fwd_bwd_ms_median"), "{:.2f}")])
  return ([f"accepted model.attention_impl: {report.get('accepted_impls')}; reference: {report.get('reference')}; "
           f"tolerance ||err||/||ref||: {report.get('tolerance_rel')}", ""] +
          _table(["backend", "shape", "dtype", "status", "out rel", "dq rel", "dk rel", "dv rel", "kernel in HLO",
                  "fwd+bwd ms"], rows))


def steps_lines(report: dict) -> list[str]:
  if not report:
    return ["not run (see log.txt)"]
  rows = []
  for r in report.get("runs", []):
    dev, cpu = r.get("device_losses") or [], r.get("cpu_losses") or []
    rows.append([r["model"], r["dtype"], r["attention_impl"], r.get("status", "-")[:90],
                 _f(r.get("max_rel_diff"), "{:.1e}"),
                 f"{_f(dev[0] if dev else None, '{:.4f}')} -> {_f(dev[-1] if dev else None, '{:.4f}')}",
                 f"{_f(cpu[0] if cpu else None, '{:.4f}')} -> {_f(cpu[-1] if cpu else None, '{:.4f}')}"])
  return [f"{report.get('num_steps')} train steps on {report.get('device')} vs the CPU (JAX_PLATFORMS=cpu subprocess)",
          ""] + _table(["model", "dtype", "attention", "status", "max rel diff", "device loss first -> last",
                        "CPU loss first -> last"], rows)


def bench_lines(rows: list[dict]) -> list[str]:
  out = []
  for r in rows or []:
    if r.get("status") != "ok":
      out.append([r.get("row", "?"), r.get("status", "incomplete (timed out?)")[:90]] + ["-"] * 8)
      continue
    out.append([r["row"], f"{r['batch_size']} x {r['seq_len']}" + (" packed" if r.get("packing") == "document" else ""),
                f"{r['step_ms_median']:.1f} ({r['step_ms_min']:.1f}-{r['step_ms_max']:.1f})",
                f"{r['tokens_per_s']:,.0f}", f"{r['mfu_6n']:.1%}", f"{r['mfu_matmul_causal_half']:.1%}",
                _gib(r.get("compiled_memory_bytes")), _gib(r.get("peak_bytes_in_use")), _f(r.get("compile_s"), "{:.1f}"),
                f"{r['params'] / 1e6:.1f}M"])
  return _table(["row", "batch x seq", "step ms median (min-max)", "tokens/s", "MFU 6N+12LHQT",
                 "MFU matmul, causal/2", "XLA step memory", "peak in use", "compile s", "params"], out) if out else ["not run"]


def torch_lines(rows: list[dict]) -> list[str]:
  out = []
  for r in rows or []:
    if r.get("status") != "ok":
      out.append([r.get("row", "?"), r.get("status", "incomplete (timed out?)")[:90]] + ["-"] * 5)
      continue
    out.append([r["row"], f"{r['batch_size']} x {r['seq_len']}", f"{r['step_ms_median']:.1f}",
                f"{r['tokens_per_s']:,.0f}", f"{r['mfu_6n']:.1%}", _gib(r.get("peak_memory_bytes")),
                _f(r.get("jaxllm_over_torch_tokens_per_s"), "{:.2f}x")])
  if not out:
    return ["not run"]
  return _table(["torch row", "batch x seq", "step ms median", "tokens/s", "MFU 6N+12LHQT", "peak memory",
                 "jaxllm / torch tokens/s"], out) + [
      "", "No torch row for the packed shape: packed rows in transformers need flash_attention_2 (varlen), "
      "which the machine does not have."]


def realrun_lines(r: dict) -> list[str]:
  if not r:
    return ["not run (see log.txt)"]
  train = r.get("train", {})
  lines = [f"data: {r.get('data')}; `jaxllm.train` rc {train.get('rc')} in {_f(train.get('wall_s'), '{:.0f}')} s; "
           f"checkpoints {r.get('checkpoints')}",
           f"loop tokens/s (median of log windows after the first): {_f(r.get('loop_tokens_per_s_median'), '{:,.0f}')}; "
           f"the same step timed alone: {_f(r.get('bench_step_tokens_per_s'), '{:,.0f}')}; loop / step "
           f"{_f(r.get('loop_over_step'), '{:.2f}')} (near 1: the pipeline keeps up)",
           f"torch twin: {r.get('torch', {}).get('steps', 0)} steps, "
           f"{_f(r.get('torch', {}).get('tokens_per_s'), '{:,.0f}')} tokens/s {r.get('torch', {}).get('error', '')}", ""]
  torch_curve = {p["step"]: p["loss"] for p in r.get("torch", {}).get("curve", [])}
  rows = [[str(p["step"]), _f(p["loss"], "{:.4f}"), _f(torch_curve.get(p["step"]), "{:.4f}"),
           _f(p.get("eval_loss"), "{:.4f}")] for p in r.get("jax_curve", [])]
  return lines + _table(["step", "jaxllm loss", "torch loss", "jaxllm eval loss"], rows)


def write_summary(out_dir: str, work_dir: str) -> None:
  lines = ["# GPU check summary", ""] + env_lines(read_json(os.path.join(work_dir, "env.json"), {}))
  sections = []
  path = os.path.join(work_dir, "sections.tsv")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      sections = [line.rstrip("\n").split("\t") for line in f if line.strip()]
  lines += ["", "## Sections (rc 124: its timeout stopped it)", ""]
  lines += _table(["section", "rc", "seconds", "budget s"], sections)
  lines += ["", "## 1a. Attention backends vs the XLA reference (packed rows, causal)", ""]
  lines += attention_lines(read_json(os.path.join(out_dir, "attention.json"), {}))
  lines += ["", "## 1b. Train steps: device vs CPU", ""] + steps_lines(read_json(os.path.join(out_dir, "steps.json"), {}))
  lines += ["", "## 2. jaxllm bench rows (bf16 compute, f32 master weights)", ""]
  lines += bench_lines(read_json(os.path.join(out_dir, "bench.json"), []))
  lines += ["", "## 3. transformers + torch, same shapes and batch", ""]
  lines += torch_lines(read_json(os.path.join(out_dir, "torch.json"), []))
  lines += ["", "## 4. Short real run: GPT-2 124M", ""] + realrun_lines(read_json(os.path.join(out_dir, "realrun.json"), {}))
  with open(os.path.join(out_dir, "summary.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
