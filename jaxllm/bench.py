"""Training-step benchmark: step time, tokens/s, model FLOPs, MFU and memory, in one table.

  python -m jaxllm.bench --config configs/NAME.py [--steps 10 --warmup 2 --remat none,dots,full]
      [--compare-hf] [--memory-only --devices 64] [--config.train.batch_size=8 ...]

It times the real train step (the same jitted, donated `train_step` the trainer
runs) after warm-up. Model FLOPs per token are `ModelConfig.flops_per_token`
(6N + 12 L H Q T, the PaLM/nanoGPT formula); the header also gives
`ModelConfig.matmul_flops_per_token` (MaxText's count: causal attention halved).
With `--config.data.packing=document` the batch carries random segment ids and
positions. MFU is against the device's datasheet peak; on CPU the f32 matmul rate is measured in the same run and MFU
is reported against it. `--compare-hf` times the same model, batch and sequence
in transformers' GPT2LMHeadModel (PyTorch: forward, backward, AdamW step) in the
same process, interleaving its steps with ours so both see the same machine load.
`--memory-only` compiles the step against abstract arrays (nothing is allocated)
and reports XLA's per-device memory; with `--devices N` on CPU it simulates N
devices, which is how the per-device memory of big models on big meshes is found.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np

from jaxllm.cli import define_config_flag, parse_flags, run_command
from jaxllm.errors import ConfigError

REMAT_CHOICES = ("none", "dots", "full")
MATMUL_SIZE = 2048
PAUSE_S = 0.2  # between timed steps of different frameworks, so idle OpenMP/Eigen workers settle


@dataclasses.dataclass
class Row:
  """One line of the table: a framework x remat variant."""
  name: str
  times: list[float] = dataclasses.field(default_factory=list)
  memory_bytes: float = float("nan")
  compile_s: float = float("nan")

  def median(self) -> float:
    return statistics.median(self.times) if self.times else float("nan")

  def spread(self) -> tuple[float, float]:
    return (min(self.times), max(self.times)) if self.times else (float("nan"),) * 2


def step_memory_bytes(compiled: Any) -> float:
  """Peak bytes one device needs for a compiled step: live inputs + outputs + XLA temporaries.

  Donated inputs alias outputs, so aliased bytes are counted once.
  """
  stats = compiled.memory_analysis()
  if stats is None:
    return float("nan")
  return float(stats.argument_size_in_bytes + stats.output_size_in_bytes
               - stats.alias_size_in_bytes + stats.temp_size_in_bytes)


def matmul_probes(size: int = 2048) -> list[tuple[str, Callable[[], None]]]:
  """One f32 [size, size] matmul in JAX (compiled as the steps are, jaxllm/cpu_compile.py) and,
  if installed, in PyTorch, as timed callables."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jaxllm import cpu_compile  # pylint: disable=import-outside-toplevel
  host = np.random.default_rng(0).standard_normal((size, size)).astype(np.float32)
  a = jnp.asarray(host)
  matmul = jax.jit(lambda x: x @ x, compiler_options=cpu_compile.step_compiler_options(jax.devices()[:1]))
  probes = [("jax", lambda: matmul(a).block_until_ready())]
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    return probes
  t = torch.from_numpy(host)
  probes.append(("torch", lambda: t @ t))
  return probes


def random_batch(batch_size: int, seq_len: int, vocab_size: int, seed: int = 0,
                 packing: str = "concat") -> dict[str, np.ndarray]:
  """Random tokens; with packing='document' also `segment_ids` and `positions` of documents of
  random lengths (mean seq_len / 4) laid back to back, as the pipeline's packed rows carry."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab_size, (batch_size, seq_len + 1), dtype=np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "weights": np.ones((batch_size, seq_len), np.float32)}
  if packing == "document":
    starts = rng.random((batch_size, seq_len)) < 4 / seq_len  # a document starts here
    starts[:, 0] = True
    segment_ids = np.cumsum(starts, axis=1).astype(np.int32)  # 1, 2, ... per row
    index = np.broadcast_to(np.arange(seq_len), (batch_size, seq_len))
    first = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    batch.update(segment_ids=segment_ids, positions=(index - first).astype(np.int32))
  return batch


def compile_train_step(config: Any, remat: str, mesh: Any):
  """The trainer's train step for `remat`, compiled against abstract state and a random batch's
  shapes: (setup, compiled step, the host batch, compile seconds)."""
  import jax  # pylint: disable=import-outside-toplevel
  from jaxllm import checkpoint  # pylint: disable=import-outside-toplevel
  from jaxllm.config import validate  # pylint: disable=import-outside-toplevel
  from jaxllm.config_types import RunConfig  # pylint: disable=import-outside-toplevel
  from jaxllm.sharding import batch_sharding  # pylint: disable=import-outside-toplevel
  from jaxllm.state import compile_steps, make_setup  # pylint: disable=import-outside-toplevel

  config = config.copy_and_resolve_references()
  config.model.remat = remat
  config = RunConfig.from_config(config)
  model_cfg = validate(config, jax.device_count())
  setup = make_setup(config, model_cfg, mesh)
  jit_train, _ = compile_steps(setup, config, mesh)
  abstract_state = checkpoint.abstract_with_shardings(setup.abstract_state, setup.state_shardings)
  host_batch = random_batch(config.train.batch_size, config.data.seq_len, model_cfg.vocab_size,
                            packing=config.data.packing)
  abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding(mesh))
                    for k, v in host_batch.items()}
  start = time.perf_counter()
  compiled = jit_train.lower(abstract_state, abstract_batch, jax.random.key(0)).compile()
  return setup, compiled, host_batch, time.perf_counter() - start


def jax_variant(config: Any, remat: str, mesh: Any, allocate: bool = True):
  """Compiles the trainer's step for `remat`; returns (row, timed step callable or None)."""
  import jax  # pylint: disable=import-outside-toplevel
  from jaxllm.sharding import make_global_batch  # pylint: disable=import-outside-toplevel

  setup, compiled, host_batch, compile_s = compile_train_step(config, remat, mesh)
  row = Row(f"jaxllm remat={remat}")
  row.compile_s = compile_s
  row.memory_bytes = step_memory_bytes(compiled)
  if not allocate:
    return row, None
  state = setup.init_fn(jax.random.key(0))
  batch = make_global_batch(host_batch, mesh)
  rng = jax.random.key(1)
  holder = {"state": state}

  def step():
    holder["state"], metrics = compiled(holder["state"], batch, rng)
    jax.block_until_ready(metrics)
  return row, step


def hf_gpt2_step(model_cfg: Any, config: Any) -> tuple[Row, Callable[[], None]]:
  """transformers GPT2LMHeadModel with the same shapes: forward, cross-entropy, backward, AdamW."""
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import GPT2Config, GPT2LMHeadModel  # pylint: disable=import-outside-toplevel
  if (model_cfg.norm, model_cfg.position, model_cfg.activation) != ("layernorm", "learned", "gelu_tanh"):
    raise ConfigError("--compare-hf builds a GPT-2; the config's model is not GPT-2 shaped "
                     "(norm=layernorm, position=learned, activation=gelu_tanh).")
  if model_cfg.dtype != "float32":
    raise ConfigError(f"--compare-hf runs PyTorch in float32; set --config.model.dtype=float32 "
                     f"(got {model_cfg.dtype}).")
  torch.manual_seed(0)
  hf_cfg = GPT2Config(vocab_size=model_cfg.vocab_size, n_positions=model_cfg.max_seq_len,
                      n_embd=model_cfg.d_model, n_layer=model_cfg.num_layers, n_head=model_cfg.num_heads,
                      n_inner=model_cfg.d_ff, activation_function="gelu_new",
                      layer_norm_epsilon=model_cfg.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0,
                      attn_pdrop=0.0, tie_word_embeddings=model_cfg.tie_embeddings,
                      bos_token_id=0, eos_token_id=0)
  model = GPT2LMHeadModel(hf_cfg)
  model.train()
  o = config.optim
  optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps,
                                weight_decay=o.weight_decay)
  batch = random_batch(config.train.batch_size, config.data.seq_len, model_cfg.vocab_size)
  inputs = torch.from_numpy(batch["inputs"]).long()
  targets = torch.from_numpy(batch["targets"]).long()

  def step():
    logits = model(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))
    loss.backward()
    if o.grad_clip:
      torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
  attn = getattr(model.config, "_attn_implementation", "?")
  return Row(f"transformers GPT2 (torch {torch.__version__}, attn={attn})"), step


def time_interleaved(steps: list[Callable[[], None]], rows: list[Row], num_steps: int, warmup: int) -> None:
  """Runs each step `warmup` times, then `num_steps` rounds of one timed step each, in turn.

  Interleaving means a change in machine load (other processes) hits every row alike.
  """
  for step in steps:
    for _ in range(warmup):
      step()
  for _ in range(num_steps):
    for step, row in zip(steps, rows):
      time.sleep(PAUSE_S)
      start = time.perf_counter()
      step()
      row.times.append(time.perf_counter() - start)


def format_table(rows: list[Row], tokens_per_step: int, flops_per_token: float,
                 peaks: dict[str, float], num_devices: int) -> str:
  """The benchmark table as GitHub markdown."""
  peak_names = list(peaks)
  head = (["variant", "step ms (median)", "min-max ms", "tokens/s", "model TFLOP/s"]
          + [f"MFU vs {name}" for name in peak_names] + ["memory/device", "compile s"])
  lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
  for row in rows:
    median = row.median()
    lo, hi = row.spread()
    tokens_per_s = tokens_per_step / median
    flops = tokens_per_s * flops_per_token
    cells = [row.name, f"{median * 1e3:.1f}", f"{lo * 1e3:.0f}-{hi * 1e3:.0f}", f"{tokens_per_s:,.0f}",
             f"{flops / 1e12:.4f}"]
    cells += [f"{flops / (peaks[name] * num_devices):.1%}" for name in peak_names]
    cells += [_gib(row.memory_bytes), f"{row.compile_s:.1f}" if row.compile_s == row.compile_s else "-"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _gib(num_bytes: float) -> str:
  if num_bytes != num_bytes:
    return "-"
  return f"{num_bytes / 2**30:.3f} GiB" if num_bytes >= 2**27 else f"{num_bytes / 2**20:.1f} MiB"


def run(config: Any, *, steps: int, warmup: int, remats: list[str], compare_hf: bool,
        memory_only: bool, matmul_size: int = MATMUL_SIZE) -> str:
  """Runs the benchmark; returns the report (a header and the table) as text."""
  import jax  # pylint: disable=import-outside-toplevel
  from jaxllm import hardware  # pylint: disable=import-outside-toplevel
  from jaxllm.config import validate  # pylint: disable=import-outside-toplevel
  from jaxllm.sharding import make_mesh  # pylint: disable=import-outside-toplevel

  model_cfg = validate(config, jax.device_count())
  mesh = make_mesh(config.mesh)
  batch_size, seq_len = config.train.batch_size, config.data.seq_len
  tokens_per_step = batch_size * seq_len
  flops_per_token = model_cfg.flops_per_token(seq_len)
  device = jax.devices()[0]
  header = [f"device: {jax.device_count()} x {device.device_kind} ({device.platform}); "
            f"mesh {dict(mesh.shape)}; jax {jax.__version__}",
            f"model: {model_cfg.num_params() / 1e6:.2f}M params, {model_cfg.num_layers} layers, "
            f"d_model {model_cfg.d_model}, {model_cfg.num_heads} heads, vocab {model_cfg.vocab_size}, "
            f"dtype {model_cfg.dtype}; batch {batch_size} x seq {seq_len} = {tokens_per_step} tokens/step",
            f"model FLOPs/token (6N + 12 L H Q T): {flops_per_token / 1e6:.2f} MFLOP; "
            f"matmul FLOPs/token with causal attention halved (MaxText's count): "
            f"{model_cfg.matmul_flops_per_token(seq_len) / 1e6:.2f} MFLOP"]
  rows, step_fns = [], []
  for remat in remats:
    row, step = jax_variant(config, remat, mesh, allocate=not memory_only)
    rows.append(row)
    step_fns.append(step)
  if memory_only:
    lines = ["| variant | memory/device | compile s |", "| --- | --- | --- |"]
    lines += [f"| {r.name} | {_gib(r.memory_bytes)} | {r.compile_s:.1f} |" for r in rows]
    return "\n".join(header + ["", *lines])
  if compare_hf:
    row, step = hf_gpt2_step(model_cfg, config)
    rows.append(row)
    step_fns.append(step)
  peaks: dict[str, float] = {}
  probe_rows: list[Row] = []
  if device.platform == "cpu":
    # The matmul rate is timed in the same rounds as the steps, so both see the same load.
    for name, probe in matmul_probes(matmul_size):
      probe_rows.append(Row(name))
      step_fns.append(probe)
  else:
    peaks["datasheet peak"] = hardware.peak_flops_per_device(config.train.peak_flops)
  time_interleaved(step_fns, rows + probe_rows, steps, warmup)
  for probe in probe_rows:
    flop = 2 * matmul_size ** 3
    peaks[f"{probe.name} f32 matmul"] = flop / probe.median()
    header.append(f"measured f32 matmul {matmul_size}^2, {probe.name}: median {flop / probe.median() / 1e9:.1f}, "
                  f"best {flop / min(probe.times) / 1e9:.1f} GFLOP/s per device "
                  f"(timed in the same rounds as the steps)")
  if hasattr(os, "getloadavg"):
    header.append(f"load average at the end (other processes skew timings): "
                  f"{', '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
  table = format_table(rows, tokens_per_step, flops_per_token, peaks, jax.device_count())
  lines = header + ["", table]
  if compare_hf:
    ratio = rows[-1].median() / rows[0].median()
    lines.append(f"\njaxllm ({rows[0].name}) / transformers tokens/s: {ratio:.2f}x")
  return "\n".join(lines)


def _normalize_argv(argv: list[str]) -> list[str]:
  """Accepts --compare-hf style spellings of the bench's own flags (absl wants underscores)."""
  out = []
  for arg in argv:
    if arg.startswith("--") and not arg.startswith("--config"):
      name, eq, value = arg[2:].partition("=")
      arg = "--" + name.replace("-", "_") + eq + value
    out.append(arg)
  return out


def main(argv) -> int:
  del argv
  return run_command(_bench)


def _bench() -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  f = flags.FLAGS
  remats = [r.strip() for r in f.remat.split(",") if r.strip()]
  bad = [r for r in remats if r not in REMAT_CHOICES]
  if bad or not remats:
    raise ConfigError(f"--remat={f.remat!r}: use a comma list of {', '.join(REMAT_CHOICES)}.")
  if f.steps <= 0 or f.warmup < 0:
    raise ConfigError(f"--steps={f.steps} must be positive and --warmup={f.warmup} not negative.")
  print(run(f.config, steps=f.steps, warmup=f.warmup, remats=remats, compare_hf=f.compare_hf,
            memory_only=f.memory_only), flush=True)


def cli():
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  define_config_flag()
  flags.DEFINE_integer("steps", 10, "Timed steps per variant (after warm-up).")
  flags.DEFINE_integer("warmup", 2, "Untimed steps per variant first.")
  flags.DEFINE_string("remat", "none", "Comma list of remat policies to compare: none,dots,full.")
  flags.DEFINE_bool("compare_hf", False, "Also time transformers GPT2LMHeadModel (PyTorch, CPU).")
  flags.DEFINE_bool("memory_only", False, "Compile against abstract arrays; report memory only.")
  flags.DEFINE_integer("devices", 0, "Simulate this many CPU devices (set before JAX starts).")
  flags.mark_flags_as_required(["config"])
  argv = _normalize_argv(sys.argv)
  devices = _flag_value(argv, "devices")
  if devices and devices.isdigit() and int(devices):
    # Before parse_flags: loading the config file imports JAX, which reads JAX_PLATFORMS then;
    # XLA reads XLA_FLAGS when the backend starts, later still. A bad value is parse_flags' to report.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={int(devices)}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  parse_flags(argv)
  app.run(main, argv=argv, flags_parser=lambda argv: argv)


def _flag_value(argv: list[str], name: str) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
    if arg == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return None


if __name__ == "__main__":
  cli()
