"""Section 1 of the GPU check: kernel correctness.

`attention`: every attention backend jaxllm accepts (`model.attention_impl`, read from
ModelConfig's own error message, plus names other backends may take later) and the Pallas
GPU kernel jax ships, against the XLA path in float32 at highest precision, on packed rows
(segment ids, causal), in bfloat16 and float32: the output and the gradients of q, k, v.
A backend that is not there or fails is recorded as "unavailable: <reason>", never a crash.

`steps`: a few real train steps (the trainer's jitted step) of a GPT-2-shaped and a packed
LLaMA-shaped model on this device, beside the same steps on the CPU, computed in a
subprocess with JAX_PLATFORMS=cpu.
"""

from __future__ import annotations

import ast
import contextlib
import math
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import numpy as np

from gpu_check_common import DRY_RUN, REPO_ROOT, error_text, read_json, write_json

# Backends that may exist behind model.attention_impl now or later; unknown ones are recorded.
IMPL_CANDIDATES = ("auto", "xla", "cudnn", "pallas_gpu", "pallas_triton", "pallas_mosaic_gpu")
# ||out - ref|| / ||ref|| a backend may reach (METHOD.md: bf16 operands land at 1e-3..1e-2;
# float32 far under 1e-3, tf32 near 3e-4, so 2e-3 leaves room for a TF32 matmul path).
TOLERANCE = {"bfloat16": 2e-2, "float32": 2e-3}
# Compiled-HLO markers of the kernel a backend really ran.
KERNEL_MARKERS = {"cudnn_fmha": "__cudnn$fmha", "triton": "__gpu$xla.gpu.triton"}

# [batch, seq, heads, kv_heads, head_dim]
SHAPES = ({"name": "gpt2_mha", "batch": 4, "seq": 1024, "heads": 12, "kv_heads": 12, "head_dim": 64},
          {"name": "llama_gqa", "batch": 2, "seq": 2048, "heads": 32, "kv_heads": 4, "head_dim": 64})
DRY_SHAPES = ({"name": "llama_gqa", "batch": 2, "seq": 64, "heads": 4, "kv_heads": 2, "head_dim": 16},)


def accepted_impls() -> tuple[str, ...]:
  """The values ModelConfig accepts for attention_impl, read from its own error message."""
  from jaxllm.models.config import ModelConfig  # pylint: disable=import-outside-toplevel
  try:
    ModelConfig(attention_impl="__probe__")
  except ValueError as e:
    match = re.search(r"attention_impl=.*? is not one of (\(.*?\))", str(e))
    if match:
      return tuple(ast.literal_eval(match.group(1)))
  return ()


def packed_segments(rng: np.random.Generator, batch: int, seq: int) -> np.ndarray:
  """Segment ids 1, 2, ... of documents of random lengths, a padding tail (id 0) on row 0."""
  from jaxllm.bench import random_batch  # pylint: disable=import-outside-toplevel
  seg = random_batch(batch, seq, 2, seed=int(rng.integers(1 << 30)), packing="document")["segment_ids"]
  seg[0, -seq // 8:] = 0
  return seg


def xla_reference(q, k, v, segment_ids):
  """jax.nn.dot_product_attention's XLA path with the dense causal + segment mask."""
  import jax  # pylint: disable=import-outside-toplevel
  seq = q.shape[1]
  causal = np.tril(np.ones((seq, seq), bool))
  mask = (segment_ids[:, :, None] == segment_ids[:, None, :]) & causal
  return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="xla")


def jaxllm_backend(impl: str) -> Callable:
  """attend(q, k, v, segment_ids) through jaxllm.models.attention.attention(impl=...), the function
  the model calls (causal, packed segment ids; a kernel lacking a feature falls back to xla and warns)."""
  from jaxllm.models.attention import attention  # pylint: disable=import-outside-toplevel

  def attend(q, k, v, segment_ids):
    return attention(q, k, v, segment_ids=segment_ids, causal=True, impl=impl)
  return attend


def pallas_gpu_backend(interpret: bool) -> Callable:
  """jax's own Pallas GPU (Triton) flash attention, which takes segment ids itself."""
  from jax.experimental.pallas.ops.gpu import attention  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  def attend(q, k, v, segment_ids):
    groups = q.shape[2] // k.shape[2]  # the kernel has no grouped-query form: repeat kv heads
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    block = min(128, q.shape[1])
    sizes = attention.BlockSizes(block_q=block, block_k=block, block_q_dkv=min(32, block),
                                 block_kv_dkv=min(32, block), block_q_dq=min(32, block),
                                 block_kv_dq=min(32, block))
    return attention.mha(q, k, v, segment_ids, sm_scale=1 / math.sqrt(q.shape[-1]), causal=True,
                         block_sizes=sizes, interpret=interpret)
  return attend


def _errors(got, ref, valid) -> dict[str, float]:
  """Max abs and relative (||got - ref|| / ||ref||) error over the non-padding rows."""
  got = np.asarray(got, np.float64)[valid]
  ref = np.asarray(ref, np.float64)[valid]
  diff = got - ref
  return {"max_abs": float(np.max(np.abs(diff))) if diff.size else 0.0,
          "rel": float(np.linalg.norm(diff) / max(np.linalg.norm(ref), 1e-30)),
          "nan": bool(np.isnan(got).any())}


def check_backend(name: str, attend: Callable, shape: dict, dtype: str, inputs, reference) -> dict:
  """One backend at one shape and dtype: errors of out, dq, dk, dv; the kernel in its HLO; time."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  q, k, v, seg, cotangent = inputs
  cast = [x.astype(dtype) for x in (q, k, v)]
  fwd = jax.jit(lambda q, k, v: attend(q, k, v, seg))
  loss = lambda q, k, v: jnp.sum(attend(q, k, v, seg).astype(jnp.float32) * cotangent)  # noqa: E731
  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  result: dict[str, Any] = {"backend": name, "shape": shape["name"], "dtype": dtype}
  try:
    fwd, grad = fwd.lower(*cast).compile(), grad.lower(*cast).compile()
    hlo = fwd.as_text() + grad.as_text()
    out = jax.device_get(fwd(*cast))
    grads = jax.device_get(grad(*cast))
  except Exception as e:  # pylint: disable=broad-except
    result["status"] = "unavailable: " + error_text(e)
    return result
  valid = np.asarray(seg) > 0  # [batch, seq]; padding queries' outputs are not compared
  errors = {"out": _errors(out, reference[0], valid)}
  for key, got, ref in zip(("dq", "dk", "dv"), grads, reference[1:]):
    errors[key] = _errors(got, ref, valid)
  result["errors"] = errors
  result["kernels"] = [marker for marker, text in KERNEL_MARKERS.items() if text in hlo]
  worst = max(e["rel"] for e in errors.values())
  bad = any(e["nan"] for e in errors.values()) or not worst <= TOLERANCE[dtype]
  result["worst_rel"] = worst
  result["status"] = "FAIL" if bad else "ok"
  if not DRY_RUN:
    times = []
    for _ in range(10):
      start = time.perf_counter()
      jax.block_until_ready(grad(*cast))
      times.append(time.perf_counter() - start)
    result["fwd_bwd_ms_median"] = statistics.median(times) * 1e3
  return result


def attention_check(out_path: str) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  accepted = accepted_impls()
  backends: list[tuple[str, Callable | str]] = []
  for impl in dict.fromkeys(accepted + IMPL_CANDIDATES):
    if impl in accepted:
      backends.append((f"jaxllm:{impl}", jaxllm_backend(impl)))
    else:
      backends.append((f"jaxllm:{impl}", f"unavailable: model.attention_impl accepts only {accepted}"))
  on_cpu = jax.devices()[0].platform == "cpu"
  try:
    backends.append(("jax_pallas_gpu_mha (direct)", pallas_gpu_backend(interpret=on_cpu)))
  except Exception as e:  # pylint: disable=broad-except
    backends.append(("jax_pallas_gpu_mha (direct)", "unavailable: " + error_text(e)))
  report: dict[str, Any] = {"accepted_impls": list(accepted), "tolerance_rel": TOLERANCE,
                            "reference": "jax.nn.dot_product_attention(implementation='xla'), "
                                         "float32 inputs, highest matmul precision", "results": []}
  for name, attend in backends:  # not there at all: one row, not one per shape and dtype
    if isinstance(attend, str):
      report["results"].append({"backend": name, "shape": "-", "dtype": "-", "status": attend})
  rng = np.random.default_rng(0)
  for shape in DRY_SHAPES if DRY_RUN else SHAPES:
    b, t, h, kv, d = (shape[x] for x in ("batch", "seq", "heads", "kv_heads", "head_dim"))
    q = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, t, kv, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, t, kv, d)), jnp.float32)
    seg = jnp.asarray(packed_segments(rng, b, t))
    cotangent = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
    precision = getattr(jax, "default_matmul_precision", None)
    with precision("highest") if precision is not None else contextlib.nullcontext():
      ref_out = xla_reference(q, k, v, seg)
      ref_grads = jax.grad(lambda q, k, v: jnp.sum(xla_reference(q, k, v, seg) * cotangent),
                           argnums=(0, 1, 2))(q, k, v)
    reference = jax.device_get((ref_out, *ref_grads))
    for name, attend in backends:
      if isinstance(attend, str):
        continue
      for dtype in ("bfloat16", "float32"):
        row = check_backend(name, attend, shape, dtype, (q, k, v, seg, cotangent), reference)
        report["results"].append(row)
        print(f"attention {shape['name']} {dtype} {name}: {row['status']} "
              f"worst rel {row.get('worst_rel', float('nan')):.2e} {row.get('kernels', '')}", flush=True)
        write_json(out_path, report)
  return report


# ---- a few train steps here and on the CPU ----

STEP_MODELS = {
    "gpt2": {},
    "llama_packed": {"model.position": "rotary", "model.norm": "rmsnorm", "model.activation": "swiglu",
                     "model.use_bias": False, "model.tie_embeddings": False, "model.num_kv_heads": 2,
                     "data.packing": "document"},
}
NUM_STEPS = 8


def step_config(kind: str, dtype: str, impl: str):
  from jaxllm.config import default_config  # pylint: disable=import-outside-toplevel
  from gpu_check_common import apply_overrides  # pylint: disable=import-outside-toplevel
  seq, d_model, vocab, batch = (64, 64, 512, 2) if DRY_RUN else (256, 256, 1024, 8)
  config = default_config()
  config.model.update(vocab_size=vocab, d_model=d_model, num_layers=2, num_heads=4, d_ff=4 * d_model,
                      max_seq_len=seq, dtype=dtype, param_dtype="float32", attention_impl=impl)
  config.data.seq_len = seq
  config.train.update(steps=NUM_STEPS, batch_size=batch)
  config.optim.update(lr=3e-3, warmup_steps=1, min_lr=3e-3)
  return apply_overrides(config, STEP_MODELS[kind])


def run_steps(config) -> list[float]:
  """NUM_STEPS trainer steps on one fixed random batch (memorised, so the loss falls)."""
  import jax  # pylint: disable=import-outside-toplevel
  from jaxllm.bench import random_batch  # pylint: disable=import-outside-toplevel
  from jaxllm.config import validate  # pylint: disable=import-outside-toplevel
  from jaxllm.sharding import make_global_batch, make_mesh  # pylint: disable=import-outside-toplevel
  from jaxllm.state import make_setup  # pylint: disable=import-outside-toplevel
  from jaxllm.train import compile_steps  # pylint: disable=import-outside-toplevel
  model_cfg = validate(config, jax.device_count())
  mesh = make_mesh(config.mesh)
  setup = make_setup(config, model_cfg, mesh)
  jit_train, _ = compile_steps(setup, config, mesh)
  state = setup.init_fn(jax.random.key(0))
  host = random_batch(config.train.batch_size, config.data.seq_len, model_cfg.vocab_size,
                      packing=config.data.packing)
  batch = make_global_batch(host, mesh)
  losses = []
  for _ in range(NUM_STEPS):
    state, metrics = jit_train(state, batch, jax.random.key(1))
    losses.append(metrics["loss"])
  return [float(x) for x in jax.device_get(losses)]


def step_runs(impls: tuple[str, ...]) -> list[tuple[str, str, str]]:
  runs = [(kind, dtype, "auto") for kind in STEP_MODELS for dtype in ("bfloat16", "float32")]
  if DRY_RUN:  # the same paths, half the compiles: one dtype per model
    runs = [runs[0], runs[3]]
  runs += [("llama_packed", "bfloat16", impl) for impl in impls if impl not in ("auto", "xla")]
  return runs


def steps_reference(out_path: str) -> None:
  """The CPU side (run under JAX_PLATFORMS=cpu): every (model, dtype) once, XLA attention."""
  result = {}
  for kind, dtype, _ in step_runs(()):
    result[f"{kind}/{dtype}"] = run_steps(step_config(kind, dtype, "xla"))
  write_json(out_path, result)


def steps_check(out_path: str, work_dir: str, timeout_s: float) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  ref_path = os.path.join(work_dir, "steps_cpu_reference.json")
  env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
  cmd = [sys.executable, os.path.join(REPO_ROOT, "scripts", "gpu_check.py"), "steps-reference", ref_path]
  # The CPU reference runs while this process runs the device's steps.
  child = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT)
  report: dict[str, Any] = {"device": jax.devices()[0].platform, "num_steps": NUM_STEPS,
                            "tolerance_rel": TOLERANCE, "runs": []}
  for kind, dtype, impl in step_runs(accepted_impls()):
    row: dict[str, Any] = {"model": kind, "dtype": dtype, "attention_impl": impl}
    try:
      row["device_losses"] = run_steps(step_config(kind, dtype, impl))
    except Exception as e:  # pylint: disable=broad-except
      row["status"] = "unavailable: " + error_text(e)
    report["runs"].append(row)
  try:
    child.wait(timeout=timeout_s)
  except subprocess.TimeoutExpired:
    child.kill()
  reference = read_json(ref_path, {})
  for row in report["runs"]:
    cpu = reference.get(f"{row['model']}/{row['dtype']}")
    row["cpu_losses"] = cpu
    if "device_losses" not in row:
      continue
    if not cpu:
      row["status"] = "no CPU reference (the subprocess failed or timed out)"
      continue
    rel = [abs(a - b) / max(abs(b), 1e-6) for a, b in zip(row["device_losses"], cpu)]
    row["max_rel_diff"] = max(rel)
    ok = all(math.isfinite(x) for x in row["device_losses"]) and max(rel) <= TOLERANCE[row["dtype"]]
    row["status"] = "ok" if ok else "FAIL"
    print(f"steps {row['model']} {row['dtype']} {row['attention_impl']}: {row['status']} "
          f"max rel diff {max(rel):.2e}", flush=True)
  write_json(out_path, report)
  return report
