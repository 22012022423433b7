"""The training CLI and loop.

  python -m jaxllm.train --config configs/quickstart.py --workdir runs/quick [--config.train.steps=100]

Builds everything from the config, resumes from the latest checkpoint in the
workdir if there is one, trains, evaluates, checkpoints and logs metrics.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import time
from typing import Any

import jax
import numpy as np

from jaxllm import checkpoint, distributed, faults, hardware, peft, preemption
from jaxllm.config import ConfigError, validate
from jaxllm.data.build import build_lm_data
from jaxllm.data.pipeline import restore_iterator
from jaxllm.data import sft
from jaxllm.data.mlm import build_mlm_data
from jaxllm.data.sources import DataError
from jaxllm.generate import SamplingConfig, fit_prompt, generate
from jaxllm.metrics import MetricsWriter, perplexity
from jaxllm.optim import merge_params
from jaxllm.sharding import ConfigError as MeshConfigError, make_global_batch, make_mesh, replicated
from jaxllm.state import Setup, make_setup, abstract_params_of, param_shardings_of
from jaxllm.step import eval_step, train_step

USER_ERRORS = (ConfigError, MeshConfigError, DataError, checkpoint.CheckpointError, FileNotFoundError,
               OSError)  # OSError: a disk or path problem outside checkpoints (full, read-only, gone)
# Exit status: 0 done, 2 bad input (USER_ERRORS), 3 diverged (non-finite steps beyond the policy),
# preemption.PREEMPTED_EXIT_CODE (75) preempted after a checkpoint: rerun to resume.
DIVERGED_EXIT_CODE = 3


def compile_steps(setup: Setup, config: Any, mesh):
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  step_fn = functools.partial(train_step, apply_fn=setup.apply_fn, optimizer=setup.optimizer,
                              schedule=setup.schedule, grad_accum=config.train.grad_accum, mesh=mesh,
                              loss_fn=setup.loss_fn)
  jit_train = jax.jit(step_fn, in_shardings=(setup.state_shardings, batch_sharding, replicated(mesh)),
                      out_shardings=(setup.state_shardings, replicated(mesh)), donate_argnums=(0,))
  jit_eval = jax.jit(functools.partial(eval_step, apply_fn=setup.apply_fn),
                     in_shardings=(setup.state_shardings, batch_sharding),
                     out_shardings=replicated(mesh))
  return jit_train, jit_eval


def memory_report(config: Any, model_cfg, mesh, setup: Setup, jit_train) -> str:
  """Compiled per-device memory of this step beside that of full fine-tuning of the same model."""
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  shape = (config.train.batch_size, config.data.seq_len)
  keys = ("inputs", "targets") + (("positions", "segment_ids") if config.data.get("packing") == "document" else ())
  batch = {k: jax.ShapeDtypeStruct(shape, np.int32, sharding=batch_sharding) for k in keys}
  batch["weights"] = jax.ShapeDtypeStruct(shape, np.float32, sharding=batch_sharding)
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated(mesh))
  state = checkpoint.abstract_with_shardings(setup.abstract_state, setup.state_shardings)
  mine = peft.step_memory_bytes(jit_train, state, batch, rng)
  full_config = config.copy_and_resolve_references()
  with full_config.unlocked():
    full_config.train.trainable = ""
    full_config.train.frozen_dtype = ""
  full_setup = make_setup(full_config, model_cfg, mesh)
  full_state = checkpoint.abstract_with_shardings(full_setup.abstract_state, full_setup.state_shardings)
  full = peft.step_memory_bytes(compile_steps(full_setup, full_config, mesh)[0], full_state, batch, rng)
  return (f"step memory per device: {mine / 2**20:.1f} MiB (full fine-tuning: {full / 2**20:.1f} MiB, "
          f"{full / max(mine, 1):.1f}x)")


def evaluate(jit_eval, state, val_batches, mesh) -> dict[str, float]:
  sums = [jit_eval(state, make_global_batch(b, mesh)) for b in val_batches]
  sums = jax.device_get(sums)
  weight = max(sum(float(s["weight_sum"]) for s in sums), 1.0)
  loss = sum(float(s["loss_sum"]) for s in sums) / weight
  accuracy = sum(float(s["correct_sum"]) for s in sums) / weight
  return {"eval_loss": loss, "eval_ppl": perplexity(loss), "eval_accuracy": accuracy}


# Keys of config.model that say how to run a model, not what it is: with init_from they stay the
# recipe's; every other model key comes from the init_from directory's config.json.
RUNTIME_MODEL_KEYS = ("dropout_rate", "init_std", "dtype", "param_dtype", "remat", "attention_impl",
                      "matmul_impl", "scan_layers", "num_virtual_tokens")  # an adapter on the base, not the base's architecture


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


def run(config: Any, workdir: str, watcher: preemption.Watcher | None = None) -> dict[str, float]:
  """Trains as configured; returns the last logged metrics.

  `watcher` (already entered) lets the caller listen for preemption from before setup;
  without one, run listens from the first step on.
  """
  adopted = adopt_init_from_architecture(config)
  model_cfg = validate(config, jax.device_count())
  mesh = make_mesh(config.mesh)
  checkpoint.ensure_writable(workdir)
  if jax.process_index() == 0:
    checkpoint.write_json(os.path.join(workdir, "config.json"), config.to_dict())

  sft_data = sft.build_sft_data(config, workdir) if config.task == "sft" else None
  lm_data = None
  if sft_data is not None:
    tokenizer, train_ds, val_batches = sft_data.tokenizer, sft_data.train, sft_data.val_batches
  elif config.task == "mlm":
    tokenizer, train_ds, val_batches = build_mlm_data(config, workdir)
  else:
    lm_data = build_lm_data(config, workdir)
    tokenizer, train_ds, val_batches = lm_data.tokenizer, lm_data.train, lm_data.val_batches
  train_iter = iter(train_ds)

  setup = make_setup(config, model_cfg, mesh)
  manager = checkpoint.make_manager(workdir, config.train.keep_checkpoints, config.train.async_checkpoint)
  abstract = checkpoint.abstract_with_shardings(setup.abstract_state, setup.state_shardings)
  # Fine-tuning part of a model (train.trainable) from init_from: checkpoints hold only what
  # trains; the frozen rest is re-read from init_from.
  by_reference = peft.frozen_by_reference(config)
  restored = checkpoint.restore(manager, abstract.replace(frozen={}) if by_reference else abstract)
  rng = jax.random.key(config.train.seed)
  if restored is not None:
    state, data_state, start_step = restored
    if by_reference:
      state = state.replace(frozen=peft.load_frozen(config, setup))
    if data_state:
      restore_iterator(train_iter, data_state)
  else:
    init_rng = jax.random.fold_in(rng, 1)
    params = peft.initial_params(config, setup, tokenizer, init_rng)
    state = setup.init_fn(init_rng) if params is None else setup.init_fn(init_rng, params)
    start_step = 0

  jit_train, jit_eval = compile_steps(setup, config, mesh)
  total_steps = config.train.steps
  tokens_per_step = config.train.batch_size * config.data.seq_len
  flops_per_token = model_cfg.flops_per_token(config.data.seq_len)
  peak = hardware.peak_flops_per_device(config.train.peak_flops) * jax.device_count()
  writer = MetricsWriter(workdir, total_steps, start_step, config.train.tensorboard, config.train.progress)
  num_params = model_cfg.num_params()
  if adopted:
    writer.text(f"model architecture from init_from={config.init_from}: {'; '.join(adopted)}")
  writer.text(f"model: {num_params / 1e6:.2f}M parameters; mesh {dict(mesh.shape)}; "
              f"{tokens_per_step} tokens/step; start at step {start_step} of {total_steps}")
  if config.train.get("trainable", "") and start_step == 0:
    writer.text(peft.parameter_report(setup) + "; " + memory_report(config, model_cfg, mesh, setup, jit_train))
  if sft_data is not None:
    writer.text(sft_data.summary)
  elif lm_data is not None:
    writer.text(f"data: {lm_data.summary()}")

  pending: list[dict[str, Any]] = []  # metrics of steps first_pending, ..., step; on device until fetched
  first_pending = start_step + 1
  last: dict[str, float] = {}
  window_start, window_steps = time.perf_counter(), 0
  step, preempted = start_step, False
  with contextlib.nullcontext(watcher) if watcher else preemption.Watcher() as watcher:
    try:
      while step < total_steps and not preempted:
        local_batch = next(train_iter)
        state, metrics = jit_train(state, make_global_batch(local_batch, mesh), rng)
        pending.append(metrics)
        step += 1
        window_steps += 1
        preempted = watcher.reached(step)
        is_last = step == total_steps or preempted
        save_now = step % config.train.checkpoint_every == 0 or is_last
        eval_now = bool(val_batches) and (step % config.train.eval_every == 0 or step == total_steps)
        # An eval step is a log step too, so eval_every need not be a multiple of log_every.
        log_now = step % config.train.log_every == 0 or eval_now or is_last
        if not (log_now or save_now):
          continue
        # The only host sync: once per log interval, and before a save so that the fault
        # policy has seen every step whose state is about to be written.
        pending[:] = jax.device_get(pending)
        fault = faults.violation(pending, first_pending, config.train)
        if log_now or fault:
          elapsed = time.perf_counter() - window_start
          tokens_per_s = window_steps * tokens_per_step / elapsed
          last = {"loss": float(np.mean([m["loss"] for m in pending])),
                  "grad_norm": float(pending[-1]["grad_norm"]), "lr": float(pending[-1]["lr"]),
                  "tokens_per_s": tokens_per_s, "mfu": tokens_per_s * flops_per_token / peak}
          last.update({k: int(pending[-1][k]) for k in faults.COUNTERS if k in pending[-1]})
          pending.clear()
          first_pending = step + 1
          if eval_now and not fault:
            last.update(evaluate(jit_eval, state, val_batches, mesh))
          writer.write(step, last)
          writer.advance(step)
          window_start, window_steps = time.perf_counter(), 0
        if fault:
          raise faults.NonFiniteError(fault)
        if save_now:
          checkpoint.save(manager, step, state.replace(frozen={}) if by_reference else state,
                          train_iter.get_state(), force=is_last)
    finally:
      # Saves in flight become durable whether the loop ended, was preempted or failed.
      checkpoint.wait(manager)
      manager.close()
      if hasattr(train_iter, "close"):
        train_iter.close()  # stops the prefetch thread
      if lm_data is not None:
        writer.text(f"data read (this run): {lm_data.summary()}")
      writer.close()
  if preempted:
    raise preemption.Preempted(step)

  # every process runs the sharded decode; process 0 prints. A masked-LM has fill_mask instead.
  if config.train.sample_prompt and config.task != "mlm":
    prompt_ids = tokenizer(config.train.sample_prompt, add_special_tokens=False)["input_ids"]
    if sft_data is not None:  # the sample prompt is an instruction: show it as the template does
      prompt_ids = sft.prompt_ids(tokenizer, sft_data.template, config.train.sample_prompt)
    prompt_ids, max_new = fit_prompt(prompt_ids, config.train.sample_tokens, model_cfg)
    sampling = SamplingConfig(max_new_tokens=max_new, temperature=config.train.sample_temperature,
                              top_k=config.train.sample_top_k, eos_id=tokenizer.eos_token_id)
    [completion] = generate(model_cfg, merge_params(state.params, state.frozen), [prompt_ids],
                            sampling, mesh=mesh, seed=config.train.seed)
    if jax.process_index() == 0:
      print("\n--- sample ---\n" + tokenizer.decode(prompt_ids) + tokenizer.decode(completion.tokens) +
            "\n--------------", flush=True)
  return last


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


def fail(message: str) -> None:
  """The one line a user sees for a problem they can fix; exit status 2."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def parse_flags(argv: list[str]) -> None:
  """Parses --config/--workdir/--config.x.y=v; a typo or bad value becomes one `error:` line."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/NAME.py).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the resolved config.")
  flags.mark_flags_as_required(["config", "workdir"])
  try:
    flags.FLAGS(argv)
    flags.FLAGS.config.get("train")  # the config file loads lazily: surface its errors here
  except OSError as e:
    detail = [l.strip() for l in str(e).splitlines() if l.strip()]
    fail(f"cannot load the config file given by --config: {detail[-1]}")
  except Exception as e:  # pylint: disable=broad-except
    # absl and ml_collections raise several types (flags.Error, AttributeError for an unknown
    # key, ValueError/TypeError for a bad value); all are the user's to fix.
    text = " ".join(str(e).replace("\\n", " ").replace("\\'", "").split()).strip("'\"")
    kind = "unknown config key" if isinstance(e, (AttributeError, KeyError)) else "bad command line"
    fail(f"{kind}: {text}")


def cli():
  from absl import app  # pylint: disable=import-outside-toplevel
  parse_flags(sys.argv)
  app.run(main, argv=sys.argv, flags_parser=lambda argv: argv)


if __name__ == "__main__":
  cli()
