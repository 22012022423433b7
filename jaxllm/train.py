"""The training CLI and loop.

  python -m jaxllm.train --config configs/quickstart.py --workdir runs/quick [--config.train.steps=100]

Builds everything from the config, resumes from the latest checkpoint in the
workdir if there is one, trains, evaluates, checkpoints and logs metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import (checkpoint, distributed, faults, hardware, killpoints, optim, peft, preemption,
                    wandb_run)
from jaxllm import workdir as workdir_lib
from jaxllm.cli import USER_ERRORS, define_config_flag, fail, parse_flags
from jaxllm.config import validate
from jaxllm.config_types import RunConfig
from jaxllm.data.pipeline import restore_iterator, saved_position
from jaxllm.data.task import TaskData, build_task_data
from jaxllm.eval import sliding_window
from jaxllm.eval.scoring import Scorer
from jaxllm.generate import SamplingConfig, fit_prompt, generate
from jaxllm.metrics import MetricsWriter, perplexity
from jaxllm.models.attention import AttentionFeatures, resolve_impl
from jaxllm.optim import merge_params
from jaxllm.plot import write_loss_curve_or_warn
from jaxllm.sharding import make_global_batch, make_mesh
from jaxllm.state import Setup, compile_steps, make_setup

# Exit status: 0 done, 2 bad input (USER_ERRORS), 3 diverged (non-finite steps beyond the policy),
# preemption.PREEMPTED_EXIT_CODE (75) preempted after a checkpoint: rerun to resume.
DIVERGED_EXIT_CODE = 3


def evaluate(jit_eval, state, val_batches, mesh) -> dict[str, float]:
  sums = []
  for batch in val_batches:
    sums.append(jit_eval(state, make_global_batch(batch, mesh)))
    killpoints.reached("eval")
  sums = jax.device_get(sums)
  weight = max(sum(float(s["weight_sum"]) for s in sums), 1.0)
  loss = sum(float(s["loss_sum"]) for s in sums) / weight
  accuracy = sum(float(s["correct_sum"]) for s in sums) / weight
  return {"eval_loss": loss, "eval_ppl": perplexity(loss), "eval_accuracy": accuracy}


@dataclasses.dataclass
class HeldOut:
  """`train.eval_data`: the files' windows, made once at start, and the scorer they go through."""
  scorer: Scorer
  windows: dict[str, sliding_window.Windows]  # metric name -> windows

  @staticmethod
  def read(config: RunConfig) -> dict[str, Any]:
    """Metric name -> documents of each file, read first: a bad path fails before any work."""
    paths = list(config.train.eval_data)
    return {name: sliding_window.load_eval_documents(path, config.data.field, flag="train.eval_data:")
            for name, path in zip(sliding_window.source_names(paths), paths)}

  @classmethod
  def build(cls, config: RunConfig, model_cfg: Any, mesh: jax.sharding.Mesh, tokenizer: Any,
            documents: dict[str, Any]) -> "HeldOut":
    seq_len = config.data.seq_len
    return cls(Scorer(model_cfg, mesh, config.train.batch_size),
               {name: sliding_window.prepare(tokenizer, docs, seq_len, max(seq_len // 2, 1),
                                             config.train.eval_data_max_chars)
                for name, docs in documents.items()})

  def evaluate(self, params: Any) -> dict[str, float]:
    metrics = {}
    for name, windows in self.windows.items():
      result = sliding_window.evaluate(self.scorer, params, windows)
      metrics[f"eval_data/{name}_ppl"] = result.perplexity
      metrics[f"eval_data/{name}_bpb"] = result.bits_per_byte
    return metrics


# Keys of config.model that say how to run a model, not what it is: with init_from they stay the
# recipe's; every other model key comes from the init_from directory's config.json.
# num_virtual_tokens, lora_*: a prompt or LoRA adapters are added to the base, not its architecture.
RUNTIME_MODEL_KEYS = workdir_lib.RUNTIME_MODEL_KEYS + ("num_virtual_tokens", "lora_rank", "lora_alpha",
                                                       "lora_dropout", "lora_targets")


def adopt_init_from_architecture(config: Any) -> list[str]:
  """Sets config.model's architecture keys from init_from's config.json (a converted HF model or a
  run's workdir); returns "key: recipe -> checkpoint" for each value that changed."""
  if not config.init_from or not os.path.isfile(os.path.join(config.init_from, "config.json")):
    return []
  source = checkpoint.read_run_config(config.init_from).get("model", {})
  changed = []
  with config.unlocked():
    for key, value in source.items():
      if key in RUNTIME_MODEL_KEYS or config.model.get(key) == value:
        continue
      if key in config.model:
        changed.append(f"{key}: {config.model[key]!r} -> {value!r}")
      config.model[key] = value
  return changed


@dataclasses.dataclass
class Run:
  """A started run: everything built from the config, and the state resumed or initialised."""
  config: RunConfig         # the typed sections, built once from the ConfigDict
  model_cfg: Any
  mesh: jax.sharding.Mesh
  data: TaskData
  setup: Setup
  manager: Any              # orbax CheckpointManager
  train_iter: Any           # this host's batches, positioned after the last trained step
  state: Any                # TrainState
  start_step: int
  by_reference: bool        # checkpoints hold only the trainable part (the rest is init_from's)
  held_out: HeldOut | None = None  # train.eval_data

  def checkpointable(self, state):
    return state.replace(frozen={}) if self.by_reference else state

  def close(self) -> None:
    self.manager.close()
    if hasattr(self.train_iter, "close"):
      self.train_iter.close()  # stops the prefetch thread


def start(config: Any, workdir: str) -> Run:
  """Builds the run and resumes it from the workdir's latest checkpoint (or initialises it).

  Nothing in the workdir changes until the run is known to start there: a failed start
  (bad data, a checkpoint of another model) leaves the old run's files as they were.
  `config` is the ConfigDict (written to config.json); the library reads its typed sections.
  """
  typed = RunConfig.from_config(config)
  model_cfg = validate(typed, jax.device_count())
  wandb_run.require_installed(typed.train)
  mesh = make_mesh(typed.mesh)
  workdir_lib.check_resumable(config, workdir)
  with workdir_lib.StartGuard(workdir):
    checkpoint.ensure_writable(workdir)
    held_out_docs = HeldOut.read(typed) if typed.train.eval_data else {}
    data = build_task_data(typed, workdir)
    held_out = HeldOut.build(typed, model_cfg, mesh, data.tokenizer, held_out_docs) if held_out_docs else None
    setup = make_setup(typed, model_cfg, mesh)
    manager = checkpoint.make_manager(workdir, typed.train.keep_checkpoints, typed.train.async_checkpoint)
    run = Run(typed, model_cfg, mesh, data, setup, manager, iter(data.train), None, 0,
              peft.frozen_by_reference(typed), held_out)
    try:
      abstract = checkpoint.abstract_with_shardings(setup.abstract_state, setup.state_shardings)
      restored = checkpoint.restore(manager, run.checkpointable(abstract))
      if restored is not None:
        run.state, data_state, run.start_step = restored
        if run.by_reference:
          run.state = run.state.replace(frozen=peft.load_frozen(typed, setup))
        if data_state:
          restore_iterator(run.train_iter, data_state)
      else:
        init_rng = jax.random.fold_in(jax.random.key(typed.train.seed), 1)
        params = peft.initial_params(typed, setup, data.tokenizer, init_rng)
        run.state = setup.init_fn(init_rng) if params is None else setup.init_fn(init_rng, params)
      if jax.process_index() == 0:  # the last thing a start writes: the run now is this config
        checkpoint.write_json(os.path.join(workdir, "config.json"), config.to_dict())
    except BaseException:
      run.close()
      raise
  return run


def run(config: Any, workdir: str, watcher: preemption.Watcher | None = None) -> dict[str, float]:
  """Trains as configured; returns the last logged metrics.

  `watcher` (already entered) lets the caller listen for preemption from before setup;
  without one, run listens from the first step on.
  """
  adopted = adopt_init_from_architecture(config)
  r = start(config, workdir)
  t = r.config.train
  with contextlib.nullcontext(watcher) if watcher else preemption.Watcher() as watcher:
    tracker, writer, exit_code = None, None, 1  # 1: the exit status W&B records if anything below raises
    try:
      if t.wandb_project and jax.process_index() == 0:
        tracker = wandb_run.WandbRun.open(config, workdir)  # the W&B run's config: the ConfigDict's keys
      writer = MetricsWriter(workdir, t.steps, r.start_step, t.tensorboard, t.progress, wandb=tracker)
      announce(r, writer, adopted)
      state, step, last = train_loop(r, writer, watcher)
      exit_code = 0 if step >= t.steps else preemption.PREEMPTED_EXIT_CODE
    except faults.NonFiniteError:
      exit_code = DIVERGED_EXIT_CODE
      raise
    finally:
      # Saves in flight become durable whether the loop ended, was preempted or failed.
      checkpoint.wait(r.manager)
      r.close()
      if writer is not None:
        if r.data.read_so_far is not None:
          writer.text(r.data.read_so_far())
        writer.close(exit_code)  # finishes the W&B run too
      elif tracker is not None:
        tracker.finish(exit_code)
  if jax.process_index() == 0:  # WORKDIR/loss_curve.png; a drawing error is a warning, never a failure
    write_loss_curve_or_warn(workdir)
  if step < t.steps:
    raise preemption.Preempted(step)
  if t.sample_prompt and r.data.prompt_ids is not None:
    print_sample(r, state)
  return last


def announce(r: Run, writer: MetricsWriter, adopted: list[str]) -> None:
  """The lines a run starts with: the model, the mesh, the attention kernel, the data."""
  config = r.config
  if adopted:
    writer.text(f"model architecture from init_from={config.init_from}: {'; '.join(adopted)}")
  writer.text(f"model: {r.model_cfg.num_params() / 1e6:.2f}M parameters; mesh {dict(r.mesh.shape)}; "
              f"{config.train.batch_size * config.data.seq_len} tokens/step; "
              f"start at step {r.start_step} of {config.train.steps}")
  writer.text(attention_line(config, r.model_cfg))
  if optim.trainable_pattern(config) and r.start_step == 0:
    report = peft.parameter_report(r.setup)
    if config.train.memory_report:  # compiles a full fine-tuning step too, only for this line
      report += "; " + peft.memory_report(config, r.model_cfg, r.mesh, r.setup)
    writer.text(report)
  if r.data.summary:
    writer.text(r.data.summary)


def train_loop(r: Run, writer: MetricsWriter, watcher: preemption.Watcher) -> tuple[Any, int, dict]:
  """Steps from r.start_step to train.steps (or a preemption); returns (state, step, last metrics)."""
  config, mesh, state = r.config, r.mesh, r.state
  jit_train, jit_eval = compile_steps(r.setup, config, mesh)
  rng = jax.random.key(config.train.seed)
  tokens_per_step = config.train.batch_size * config.data.seq_len
  flops_per_token = r.model_cfg.flops_per_token(config.data.seq_len)
  peak = hardware.peak_flops_per_device(config.train.peak_flops) * jax.device_count()
  pending: list[dict[str, Any]] = []  # metrics of steps first_pending, ..., step; on device until fetched
  first_pending = r.start_step + 1
  last: dict[str, float] = {}
  window_start, window_steps = time.perf_counter(), 0
  step, preempted = r.start_step, False
  while step < config.train.steps and not preempted:
    local_batch = next(r.train_iter)
    if step == r.start_step:
      killpoints.reached("train.compile")
    state, metrics = jit_train(state, make_global_batch(local_batch, mesh), rng)
    pending.append(metrics)
    step += 1
    window_steps += 1
    preempted = watcher.reached(step)
    is_last = step == config.train.steps or preempted
    save_now = step % config.train.checkpoint_every == 0 or is_last
    eval_now = (bool(r.data.val_batches) or r.held_out is not None) and (
        step % config.train.eval_every == 0 or step == config.train.steps)
    # An eval step is a log step too, so eval_every need not be a multiple of log_every.
    log_now = step % config.train.log_every == 0 or eval_now or is_last
    if not (log_now or save_now):
      continue
    # The only host sync: once per log interval, and before a save so that the fault
    # policy has seen every step whose state is about to be written.
    pending[:] = jax.device_get(pending)
    fault = faults.violation(pending, first_pending, config.train)
    if log_now or fault:
      tokens_per_s = window_steps * tokens_per_step / (time.perf_counter() - window_start)
      last = {"loss": float(np.mean([m["loss"] for m in pending])),
              "grad_norm": float(pending[-1]["grad_norm"]), "lr": float(pending[-1]["lr"]),
              "tokens_per_s": tokens_per_s, "mfu": tokens_per_s * flops_per_token / peak}
      last.update({k: int(pending[-1][k]) for k in faults.COUNTERS if k in pending[-1]})
      pending.clear()
      first_pending = step + 1
      if eval_now and not fault and r.data.val_batches:
        last.update(evaluate(jit_eval, state, r.data.val_batches, mesh))
      if eval_now and not fault and r.held_out is not None:
        last.update(r.held_out.evaluate(merge_params(state.params, state.frozen)))
      writer.write(step, last)
      writer.advance(step)
      window_start, window_steps = time.perf_counter(), 0
    if fault:
      raise faults.NonFiniteError(fault)
    if save_now:
      checkpoint.save(r.manager, step, r.checkpointable(state), saved_position(r.train_iter), force=is_last)
  return state, step, last


def attention_line(config: RunConfig, model_cfg: Any) -> str:
  """Which attention kernel the step runs and why (what `model.attention_impl=auto` picked)."""
  packed = config.data.packing == "document" or model_cfg.family == "bert"
  features = AttentionFeatures(segment_ids=packed, prefix_lm=config.sft.prefix_lm,
                               bias=model_cfg.position == "alibi",
                               dtype=jnp.dtype(model_cfg.compute_dtype).name, head_dim=model_cfg.head_dim)
  kernel, reason = resolve_impl(model_cfg.attention_impl, jax.default_backend(), features)
  return f"attention: {kernel} (model.attention_impl={model_cfg.attention_impl}: {reason})"


def print_sample(r: Run, state: Any) -> None:
  """Completes train.sample_prompt; every process runs the sharded decode, process 0 prints."""
  config, tokenizer = r.config, r.data.tokenizer
  prompt_ids, max_new = fit_prompt(r.data.prompt_ids(config.train.sample_prompt), config.train.sample_tokens,
                                   r.model_cfg)
  sampling = SamplingConfig(max_new_tokens=max_new, temperature=config.train.sample_temperature,
                            top_k=config.train.sample_top_k, eos_id=tokenizer.eos_token_id)
  killpoints.reached("sample")
  [completion] = generate(r.model_cfg, merge_params(state.params, state.frozen), [prompt_ids],
                          sampling, mesh=r.mesh, seed=config.train.seed, prefix_lm=config.sft.prefix_lm)
  if jax.process_index() == 0:
    print("\n--- sample ---\n" + tokenizer.decode(prompt_ids) + tokenizer.decode(completion.tokens) +
          "\n--------------", flush=True)


def main(argv):
  del argv
  from absl import flags, logging  # pylint: disable=import-outside-toplevel
  logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
  config = flags.FLAGS.config
  try:
    distributed.initialize()  # a no-op unless the environment describes a multi-process job
    # Listen from the start: a SIGTERM during setup still ends in a checkpoint and exit 75.
    with preemption.Watcher() as watcher:
      run(config, flags.FLAGS.workdir, watcher)
  except USER_ERRORS as e:
    fail(str(e))
  except faults.NonFiniteError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(DIVERGED_EXIT_CODE)
  except preemption.Preempted as e:
    print(e, file=sys.stderr, flush=True)
    sys.exit(preemption.PREEMPTED_EXIT_CODE)


def cli():
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  define_config_flag()
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the resolved config.")
  flags.mark_flags_as_required(["config", "workdir"])
  parse_flags(sys.argv)
  app.run(main, argv=sys.argv, flags_parser=lambda argv: argv)


if __name__ == "__main__":
  cli()
