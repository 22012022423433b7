"""Sections 2 and 3 of the GPU check: benchmark rows in jaxllm, then the same shapes in
transformers + PyTorch.

A jaxllm row (one process per row, so each row's peak memory is its own) compiles the
trainer's step (jaxllm.train.compile_steps, bf16 compute, f32 master weights) on abstract
arrays, reads XLA's memory analysis, and picks the largest batch that fits the allocator's
limit: from the first compile a line through (state bytes, measured bytes) predicts the
largest batch, which is compiled and checked in turn; an out-of-memory at run time halves
it. Then warm-up and timed steps, each waited for.

A torch row builds GPT2LMHeadModel or LlamaForCausalLM with the same shapes, on the same
batch as the jaxllm row: bf16 autocast, attn_implementation="sdpa", fused AdamW on CUDA
(unfused on the CPU dry run), optionally torch.compile.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from typing import Any

from gpu_check_common import (DRY_RUN, dry_overrides, error_text, finite, is_oom, load_config,
                              memory_stats, peak_flops, read_json, write_json)

# name: (recipe, overrides, largest batch tried)
ROWS = {
    "gpt2_124m": ("gpt2_124m", {}, 128),
    "gpt2_355m": ("gpt2_355m", {}, 64),
    "llama_1b": ("llama_1b", {}, 32),
    "gpt2_124m_packed": ("gpt2_124m", {"data.packing": "document"}, 128),
}
MAX_TOKENS_PER_STEP = 262_144  # bounds the step time of the smallest models
MEMORY_HEADROOM = 0.92         # of the allocator's limit
MAX_COMPILES = 3               # per row, in the batch search
DRY_BATCH_CAP = 8
STEPS, WARMUP = (3, 1) if DRY_RUN else (8, 2)


def row_config(name: str, batch_size: int | None = None):
  recipe, overrides, _ = ROWS[name]
  config = load_config(recipe, overrides)
  if DRY_RUN:
    from gpu_check_common import apply_overrides  # pylint: disable=import-outside-toplevel
    apply_overrides(config, dry_overrides(config))
  config.model.remat = "none"
  if batch_size:
    config.train.batch_size = batch_size
  return config


def nice_batch(b: float) -> int:
  """Rounds down to a multiple of 8 from 16 up; below that, any whole batch (at least 1)."""
  b = int(b)
  return b // 8 * 8 if b >= 16 else max(b, 1)


def compile_row(config) -> dict[str, Any]:
  """The trainer's step compiled on abstract arrays: compiled, memory, compile time, setup."""
  import jax  # pylint: disable=import-outside-toplevel
  from jaxllm import bench, checkpoint  # pylint: disable=import-outside-toplevel
  from jaxllm.config import validate  # pylint: disable=import-outside-toplevel
  from jaxllm.sharding import batch_sharding, make_mesh  # pylint: disable=import-outside-toplevel
  from jaxllm.state import make_setup  # pylint: disable=import-outside-toplevel
  from jaxllm.train import compile_steps  # pylint: disable=import-outside-toplevel
  model_cfg = validate(config, jax.device_count())
  mesh = make_mesh(config.mesh)
  setup = make_setup(config, model_cfg, mesh)
  jit_train, _ = compile_steps(setup, config, mesh)
  host = bench.random_batch(config.train.batch_size, config.data.seq_len, model_cfg.vocab_size,
                            packing=config.data.packing)
  abstract_state = checkpoint.abstract_with_shardings(setup.abstract_state, setup.state_shardings)
  abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding(mesh))
                    for k, v in host.items()}
  start = time.perf_counter()
  compiled = jit_train.lower(abstract_state, abstract_batch, jax.random.key(0)).compile()
  compile_s = time.perf_counter() - start
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(setup.abstract_state))
  return {"compiled": compiled, "compile_s": compile_s, "memory": bench.step_memory_bytes(compiled),
          "state_bytes": state_bytes, "setup": setup, "mesh": mesh, "host": host, "model_cfg": model_cfg}


def memory_limit(name: str, first_memory: float) -> tuple[float, str]:
  limit = memory_stats().get("bytes_limit")
  if limit:
    return float(limit) * MEMORY_HEADROOM, "allocator bytes_limit x headroom"
  if DRY_RUN and name == "gpt2_124m":  # the CPU has no allocator limit: pretend the first try
    return 0.7 * first_memory, "dry run: 0.7 x the first try's memory"  # is too big, to run the search
  return float("inf"), "none known"


def first_guess(config) -> int:
  """A batch likely to fit, from Korthikanti et al.'s activation count with no flash attention
  (34 + 5 a s / h bytes per hidden unit, token and layer), 10 bytes per logit (f32 logits, their
  gradient, the bf16 product) and 16 bytes per parameter (f32 weights, gradient, two moments)."""
  from jaxllm.models.config import ModelConfig  # pylint: disable=import-outside-toplevel
  limit = memory_stats().get("bytes_limit")
  if not limit:
    return 1 << 30  # no limit known: start at the cap
  m = ModelConfig.from_config(config.model)
  seq = config.data.seq_len
  per_token = m.num_layers * m.d_model * (34 + 5 * m.num_heads * seq / m.d_model) + 10 * m.vocab_size
  fixed = 16 * m.num_params() * 1.1
  return max(nice_batch((limit * MEMORY_HEADROOM - fixed) / (per_token * seq)), 1)


def find_batch(name: str, attempts: list[dict], deadline: float,
               start_batch: int = 0) -> tuple[dict | None, int]:
  """The largest batch whose compiled step fits the memory limit: (compiled row, batch).

  At most MAX_COMPILES compiles, and none that would not leave time (by `deadline`, a
  time.monotonic() value) to run the best one found so far.
  """
  _, _, largest = ROWS[name]
  config = row_config(name)
  seq_len = config.data.seq_len
  cap = nice_batch(min(largest, MAX_TOKENS_PER_STEP // seq_len, DRY_BATCH_CAP if DRY_RUN else largest))
  batch, limit, best = min(start_batch or first_guess(config), cap), None, None
  points: list[tuple[int, float]] = []
  tried: set[int] = set()
  for _ in range(MAX_COMPILES):
    if batch < 1 or batch in tried:
      break
    tried.add(batch)
    try:
      row = compile_row(row_config(name, batch))
    except Exception as e:  # pylint: disable=broad-except
      attempts.append({"batch": batch, "error": error_text(e)})
      if not is_oom(e):
        break
      batch = nice_batch(batch / 2)
      continue
    if limit is None:
      limit, why = memory_limit(name, row["memory"])
      attempts.append({"memory_limit_bytes": finite(limit), "limit_from": why})
    attempts.append({"batch": batch, "compiled_memory_bytes": row["memory"], "compile_s": row["compile_s"]})
    points.append((batch, row["memory"]))
    if row["memory"] <= limit and (best is None or batch > best[1]):
      best = (row, batch)
    if not math.isfinite(limit):
      break
    if len(points) >= 2:  # a line through the two latest tries
      (b0, m0), (b1, m1) = points[-2], points[-1]
      per_row = (m1 - m0) / (b1 - b0)
      fixed = m1 - per_row * b1
    else:  # state + gradients stay; everything else is taken to grow with the batch (an overestimate)
      fixed = row["state_bytes"] * 4 / 3
      per_row = (row["memory"] - fixed) / batch
    predicted = nice_batch(min((limit - fixed) / max(per_row, 1.0), cap))
    if row["memory"] > limit and predicted >= batch:
      predicted = nice_batch(batch / 2)
    next_compile_s = 1.5 * row["compile_s"] + 10
    if best is not None and (predicted <= best[1] or time.monotonic() + next_compile_s > deadline):
      break
    batch = predicted
  return best if best else (None, batch)


def time_row(row: dict, steps: int, warmup: int) -> list[float]:
  import jax  # pylint: disable=import-outside-toplevel
  from jaxllm.sharding import make_global_batch  # pylint: disable=import-outside-toplevel
  holder = {"state": row["setup"].init_fn(jax.random.key(0))}
  batch = make_global_batch(row["host"], row["mesh"])
  rng = jax.random.key(1)
  times = []
  for i in range(warmup + steps):
    start = time.perf_counter()
    holder["state"], metrics = row["compiled"](holder["state"], batch, rng)
    jax.block_until_ready(metrics)
    if i >= warmup:
      times.append(time.perf_counter() - start)
  return times


def torch_peak_flops(device: str) -> tuple[float, str]:
  """The peak the env section found (a torch process keeps JAX off the GPU: JAX_PLATFORMS=cpu),
  else the datasheet figure for the card torch sees."""
  env = read_json(os.path.join(os.environ.get("GPU_CHECK_WORK", "/nonexistent"), "env.json"), {})
  if env.get("peak_flops_for_mfu") and env.get("platform") == ("gpu" if device == "cuda" else "cpu"):
    return env["peak_flops_for_mfu"], env.get("peak_is", "?")
  if device == "cuda":
    import torch  # pylint: disable=import-outside-toplevel
    from jaxllm import hardware  # pylint: disable=import-outside-toplevel
    name = torch.cuda.get_device_name().lower()
    for key, flops in hardware.PEAK_FLOPS.items():
      if key in name:
        return flops, "datasheet dense bf16"
    return float("nan"), "unknown card"
  return peak_flops()


def step_figures(times: list[float], tokens_per_step: int, model_cfg, seq_len: int,
                 peak: tuple[float, str] | None = None) -> dict[str, Any]:
  """Median, spread, tokens/s and MFU counted both ways."""
  peak, peak_what = peak or peak_flops()
  median = statistics.median(times)
  tokens_per_s = tokens_per_step / median
  return {"step_ms_median": median * 1e3, "step_ms_min": min(times) * 1e3, "step_ms_max": max(times) * 1e3,
          "tokens_per_s": tokens_per_s, "peak_flops": peak, "peak_is": peak_what,
          "mfu_6n": tokens_per_s * model_cfg.flops_per_token(seq_len) / peak,
          "mfu_matmul_causal_half": tokens_per_s * model_cfg.matmul_flops_per_token(seq_len) / peak,
          "flops_per_token_6n": model_cfg.flops_per_token(seq_len),
          "flops_per_token_matmul": model_cfg.matmul_flops_per_token(seq_len)}


def jax_row(name: str, out_path: str, deadline: float, start_from: str = "") -> dict:
  """One benchmark row; `start_from` names another row's JSON whose batch is tried first."""
  from gpu_check_common import device_info  # pylint: disable=import-outside-toplevel
  attempts: list[dict] = []
  result: dict[str, Any] = {"row": name, "framework": "jaxllm", "device": device_info(), "attempts": attempts}
  write_json(out_path, result)
  start_batch = int((read_json(start_from, {}) or {}).get("batch_size") or 0) if start_from else 0
  row, batch = find_batch(name, attempts, deadline, start_batch)
  while row is not None:
    config = row_config(name, batch)
    try:
      times = time_row(row, STEPS, WARMUP)
      break
    except Exception as e:  # pylint: disable=broad-except
      attempts.append({"batch": batch, "run_error": error_text(e)})
      if not is_oom(e) or batch == 1:
        row = None
        break
      row, batch = None, nice_batch(batch / 2)
      try:
        row = compile_row(row_config(name, batch))
      except Exception as e2:  # pylint: disable=broad-except
        attempts.append({"batch": batch, "error": error_text(e2)})
  if row is None:
    result["status"] = "FAIL: no batch size ran (see attempts)"
    write_json(out_path, result)
    return result
  model_cfg, seq_len = row["model_cfg"], config.data.seq_len
  result.update(status="ok", batch_size=batch, seq_len=seq_len, packing=config.data.packing,
                tokens_per_step=batch * seq_len, params=model_cfg.num_params(),
                dtype=model_cfg.dtype, param_dtype=model_cfg.param_dtype,
                attention_impl=model_cfg.attention_impl, compile_s=row["compile_s"],
                compiled_memory_bytes=row["memory"], steps=STEPS, warmup=WARMUP, times_s=times,
                peak_bytes_in_use=memory_stats().get("peak_bytes_in_use"),
                **step_figures(times, batch * seq_len, model_cfg, seq_len))
  write_json(out_path, result)
  print(f"bench {name}: batch {batch}, {result['step_ms_median']:.1f} ms, "
        f"{result['tokens_per_s']:,.0f} tokens/s, MFU {result['mfu_6n']:.1%} / "
        f"{result['mfu_matmul_causal_half']:.1%}", flush=True)
  return result


# ---- the same shapes in transformers + PyTorch ----

def hf_model(model_cfg):
  """GPT2LMHeadModel or LlamaForCausalLM with model_cfg's shapes (sdpa attention)."""
  import transformers  # pylint: disable=import-outside-toplevel
  common = dict(vocab_size=model_cfg.vocab_size, tie_word_embeddings=model_cfg.tie_embeddings,
                attn_implementation="sdpa")
  if model_cfg.position == "rotary":
    cfg = transformers.LlamaConfig(
        hidden_size=model_cfg.d_model, intermediate_size=model_cfg.d_ff,
        num_hidden_layers=model_cfg.num_layers, num_attention_heads=model_cfg.num_heads,
        num_key_value_heads=model_cfg.num_kv_heads, head_dim=model_cfg.head_dim,
        max_position_embeddings=model_cfg.max_seq_len, rms_norm_eps=model_cfg.norm_eps,
        rope_theta=model_cfg.rope_theta, attention_bias=False, mlp_bias=False, **common)
    return transformers.LlamaForCausalLM(cfg)
  cfg = transformers.GPT2Config(
      n_positions=model_cfg.max_seq_len, n_embd=model_cfg.d_model, n_layer=model_cfg.num_layers,
      n_head=model_cfg.num_heads, n_inner=model_cfg.d_ff, activation_function="gelu_new",
      layer_norm_epsilon=model_cfg.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
      bos_token_id=0, eos_token_id=0, **common)
  return transformers.GPT2LMHeadModel(cfg)


def torch_trainer(model_cfg, optim_cfg, device: str, use_compile: bool):
  """(model, optimizer, step(inputs, targets, lr=None) -> loss tensor) with bf16 autocast."""
  import torch  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  model = hf_model(model_cfg).to(device)
  model.train()
  decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "wte" not in n and "wpe" not in n
           and "embed_tokens" not in n]
  no_decay = [p for n, p in model.named_parameters() if not any(p is q for q in decay)]
  optimizer = torch.optim.AdamW(
      [{"params": decay, "weight_decay": optim_cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
      lr=optim_cfg.lr, betas=(optim_cfg.b1, optim_cfg.b2), eps=optim_cfg.eps, fused=device == "cuda")
  forward = torch.compile(model) if use_compile else model

  def step(inputs, targets, lr=None):
    if lr is not None:
      for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
      logits = forward(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))
    loss.backward()
    if optim_cfg.grad_clip:
      torch.nn.utils.clip_grad_norm_(model.parameters(), optim_cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()
  return model, optimizer, step


def torch_row(name: str, jax_result_path: str, out_path: str, use_compile: bool) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  from jaxllm import bench  # pylint: disable=import-outside-toplevel
  from jaxllm.models.config import ModelConfig  # pylint: disable=import-outside-toplevel
  device = "cuda" if torch.cuda.is_available() else "cpu"
  jax_result = read_json(jax_result_path, {})
  config = row_config(name)
  model_cfg = ModelConfig.from_config(config.model)
  seq_len = config.data.seq_len
  batch = int(jax_result.get("batch_size") or config.train.batch_size)
  result: dict[str, Any] = {"row": name + ("_compile" if use_compile else ""), "framework": "torch",
                            "torch": torch.__version__, "device": device, "compile": use_compile,
                            "attn_implementation": "sdpa", "autocast": "bfloat16",
                            "fused_adamw": device == "cuda", "attempts": []}
  if device == "cuda":
    result["gpu"] = torch.cuda.get_device_name()
    result["flash_sdp_enabled"] = torch.backends.cuda.flash_sdp_enabled()
  if config.data.packing == "document":
    result["status"] = "not run: packed rows in transformers need flash_attention_2 (varlen), not installed"
    write_json(out_path, result)
    return result
  write_json(out_path, result)
  while batch >= 1:
    try:
      host = bench.random_batch(batch, seq_len, model_cfg.vocab_size)
      inputs = torch.from_numpy(host["inputs"]).long().to(device)
      targets = torch.from_numpy(host["targets"]).long().to(device)
      _, _, step = torch_trainer(model_cfg, config.optim, device, use_compile)
      start = time.perf_counter()
      step(inputs, targets)
      _sync(device)
      first_step_s = time.perf_counter() - start
      times = []
      for i in range(WARMUP + STEPS - 1):
        start = time.perf_counter()
        step(inputs, targets)
        _sync(device)
        if i >= WARMUP - 1:
          times.append(time.perf_counter() - start)
      break
    except torch.OutOfMemoryError as e:
      result["attempts"].append({"batch": batch, "error": error_text(e)})
      step = inputs = targets = None  # drop the model and its optimizer state before retrying
      batch = nice_batch(batch / 2) if batch > 1 else 0
      _free(device)
  else:
    result["status"] = "FAIL: out of memory at every batch"
    write_json(out_path, result)
    return result
  result.update(status="ok", batch_size=batch, seq_len=seq_len, tokens_per_step=batch * seq_len,
                first_step_s=first_step_s, times_s=times,
                peak_memory_bytes=torch.cuda.max_memory_allocated() if device == "cuda" else None,
                **step_figures(times, batch * seq_len, model_cfg, seq_len, torch_peak_flops(device)))
  if jax_result.get("tokens_per_s"):
    result["jaxllm_over_torch_tokens_per_s"] = jax_result["tokens_per_s"] / result["tokens_per_s"]
    result["same_batch_as_jaxllm"] = batch == jax_result.get("batch_size")
  write_json(out_path, result)
  print(f"torch {result['row']}: batch {batch}, {result['step_ms_median']:.1f} ms, "
        f"{result['tokens_per_s']:,.0f} tokens/s; jaxllm/torch "
        f"{result.get('jaxllm_over_torch_tokens_per_s', float('nan')):.2f}x", flush=True)
  return result


def _sync(device: str) -> None:
  import torch  # pylint: disable=import-outside-toplevel
  if device == "cuda":
    torch.cuda.synchronize()


def _free(device: str) -> None:
  import gc  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  gc.collect()
  if device == "cuda":
    torch.cuda.empty_cache()

