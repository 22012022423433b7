"""What `convert to-hf` writes beside the weights: a README.md model card and generation_config.json.

The card states what a reader of the Hugging Face directory wants to know without the workdir:
the architecture and size, what the model was trained on and for how many tokens, the last eval
metrics, and the jaxllm version and command that wrote it. It is built from the run's
config.json and metrics.jsonl. generation_config.json carries the tokenizer's EOS and pad ids,
so `pipeline("text-generation", ...)` and `generate` stop where jaxllm's generate stops.
"""

from __future__ import annotations

import os
from typing import Any

from jaxllm import __version__
from jaxllm.config_types import DataConfig, RunConfig, SourceConfig
from jaxllm.convert.base import Architecture
from jaxllm.metrics import read_records
from jaxllm.models import ModelConfig

CAUSAL = "AutoModelForCausalLM"
# `python -m jaxllm.generate`'s defaults, written explicitly: without them the text-generation
# pipeline samples with its own (temperature 0.7, top-k 50, 256 new tokens).
GENERATE_DEFAULTS = dict(max_new_tokens=128, do_sample=True, temperature=0.8, top_k=0, top_p=1.0,
                         repetition_penalty=1.0)


def saved_step(model_dir: str, step: int | None) -> int | None:
  """The checkpoint step `to_hf` exports: `step`, or the latest under model_dir/checkpoints."""
  if step is not None:
    return step
  directory = os.path.join(model_dir, "checkpoints")
  steps = [int(d) for d in os.listdir(directory) if d.isdigit()] if os.path.isdir(directory) else []
  return max(steps, default=None)


def special_ids(tokenizer: Any, vocab_size: int) -> dict[str, int | None]:
  """bos/eos/pad ids of the tokenizer that exist in the model's vocabulary (pad falls back to
  EOS, as for GPT-2, so batched generation needs no extra argument)."""
  ids = {}
  for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
    value = getattr(tokenizer, key, None) if tokenizer is not None else None
    ids[key] = value if value is not None and value < vocab_size else None
  if ids["pad_token_id"] is None:
    ids["pad_token_id"] = ids["eos_token_id"]
  return ids


def write_generation_config(hf_dir: str, tokenizer: Any, cfg: ModelConfig) -> dict[str, int | None]:
  from transformers import GenerationConfig  # pylint: disable=import-outside-toplevel
  ids = special_ids(tokenizer, cfg.vocab_size)
  settings = dict(GENERATE_DEFAULTS)
  # The length is a cap on the whole sequence (the context the model trained on), never
  # max_new_tokens: transformers lets a saved max_new_tokens win over the max_length a caller
  # passes (lm-eval's hf backend does), so a saved one would override every caller's length.
  del settings["max_new_tokens"]
  settings["max_length"] = cfg.max_seq_len
  GenerationConfig(**ids, **settings).save_pretrained(hf_dir)
  return ids


def describe_data(data: DataConfig) -> str:
  """One line for config.data: where the training documents came from."""
  if data.sources:
    parts = [f"{name} ({describe_source(source)}, weight {source.weight:g})"
             for name, source in data.resolved_sources().items()]
    return "a mixture of " + "; ".join(parts)
  return describe_source(data)


def describe_source(data: SourceConfig | DataConfig) -> str:
  """Where one source's documents came from."""
  source, path = data.source, data.path
  if source == "stdlib":
    return "the Python standard library's source files (`data.source=stdlib`)"
  if source == "hf":
    extra = ", ".join(x for x in (data.hf_config, f"split {data.hf_split}") if x)
    return f"the Hugging Face dataset `{data.hf_name}` ({extra}{', files ' + path if path else ''})"
  field = f", field `{data.field}`" if source in ("jsonl", "parquet", "hf_disk") and data.field else ""
  return f"`{path}` (`data.source={source}`{field})"


def last_eval(model_dir: str, step: int | None) -> dict[str, Any] | None:
  """The last metrics.jsonl record with eval metrics at or before `step`."""
  path = os.path.join(model_dir, "metrics.jsonl")
  if not os.path.isfile(path):
    return None
  evals = [r for r in read_records(path) if "eval_loss" in r and (step is None or r["step"] <= step)]
  return evals[-1] if evals else None


def convert_command(model_dir: str, hf_dir: str, step: int | None, dtype: str, max_shard_size: Any) -> str:
  """The `convert to-hf` command line that does what this call did."""
  words = ["python -m jaxllm.convert to-hf", model_dir, hf_dir]
  words += [f"--step {step}"] if step is not None else []
  words += [f"--dtype {dtype}"] if dtype != "float32" else []
  words += [f"--max-shard-size {max_shard_size}"] if str(max_shard_size) != "2GB" else []
  return " ".join(words)


def _table(rows: list[tuple[str, Any]]) -> str:
  return "\n".join(["| | |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows])


def card_text(run_config: dict[str, Any], model_dir: str, hf_dir: str, arch: Architecture, cfg: ModelConfig,
              tokenizer: Any, step: int | None, command: str) -> str:
  saved = RunConfig.from_config(run_config, strict=False)  # keys an older run lacks: their defaults
  train, data, optim = saved.train, saved.data, saved.optim
  causal = arch.auto_class == CAUSAL
  trained = step is not None and (step > 0 or os.path.isfile(os.path.join(model_dir, "metrics.jsonl")))
  name = os.path.basename(os.path.normpath(hf_dir))
  heads = f"{cfg.num_heads}" + (f" ({cfg.num_kv_heads} key/value)" if cfg.num_kv_heads != cfg.num_heads else "")
  model_rows = [
      ("architecture", f"`{arch.name}` (jaxllm `model.family={cfg.family}`)"),
      ("parameters", f"{cfg.num_params() / 1e6:.2f}M ({cfg.num_params():,})"),
      ("layers, d_model, heads", f"{cfg.num_layers}, {cfg.d_model}, {heads}"),
      ("feed-forward width", cfg.d_ff),
      ("vocabulary", cfg.vocab_size),
      ("context length", cfg.max_seq_len),
      ("positions, norm, activation", f"{cfg.position}, {cfg.norm}, {cfg.activation}"),
  ]
  lines = ["---", "library_name: transformers",
           f"pipeline_tag: {'text-generation' if causal else 'fill-mask'}", "tags:", "- jaxllm", "---", "",
           f"# {name}", "",
           f"A {arch.name} written by jaxllm {__version__} `convert to-hf` "
           f"from `{model_dir}`{f' at step {step}' if step is not None else ''}.", "",
           "## Model", "", _table(model_rows), ""]
  lines += ["## Training", ""]
  if trained:
    batch, seq_len = train.batch_size, data.seq_len
    tokens = step * batch * seq_len
    training_rows = [
        ("task", f"`{saved.task}`"),
        ("data", describe_data(data)),
        ("started from", f"`{saved.init_from}`" if saved.init_from else "random initialisation"),
        *([("fine-tuning", f"LoRA rank {cfg.lora_rank}, alpha {cfg.lora_alpha} on `{cfg.lora_targets}`, "
                            "merged into these weights")] if cfg.lora_rank else []),
        ("steps", f"{step} (of {train.steps} planned)"),
        ("tokens", f"{tokens:,} ({step} steps x {batch} sequences x {seq_len} tokens, padding included)"),
        ("optimizer", f"AdamW, lr {optim.lr} (warmup {optim.warmup_steps} steps, cosine to "
                      f"{optim.min_lr}), weight decay {optim.weight_decay}"),
    ]
    lines += [_table(training_rows), ""]
  else:
    lines += ["Not trained with jaxllm: this directory holds weights imported with "
              "`python -m jaxllm.convert from-hf`.", ""]
  lines += ["## Evaluation", ""]
  evaluation = last_eval(model_dir, step)
  if evaluation:
    rows = [(key, f"{evaluation[key]:.4f}") for key in ("eval_loss", "eval_ppl", "eval_accuracy") if key in evaluation]
    held_out = (f"`{data.val_path}`" if data.val_path else f"{data.val_fraction:g} of the documents, held out")
    lines += [f"On the validation data ({held_out}) at step {evaluation['step']}:", "", _table(rows), ""]
  else:
    lines += ["No evaluation recorded (the run's metrics.jsonl has no eval step).", ""]
  lines += ["## Use", "", "```python", "from transformers import pipeline", ""]
  if causal:
    ids = special_ids(tokenizer, cfg.vocab_size)
    eos = ids["eos_token_id"]
    lines += [f'generator = pipeline("text-generation", model="{hf_dir}")',
              'print(generator("Hello", max_new_tokens=64)[0]["generated_text"])', "```", "",
              (f"`generation_config.json` sets EOS id {eos} (`{tokenizer.convert_ids_to_tokens(eos)}`) and "
               f"pad id {ids['pad_token_id']}, so generation stops where jaxllm's generate stops, and "
               "the sampling defaults of `python -m jaxllm.generate` (temperature 0.8, no top-k or top-p, "
               f"{min(128, cfg.max_seq_len // 2) if cfg.position == 'learned' else 128} new tokens); pass `do_sample=False` for greedy text."
               if eos is not None else "The tokenizer has no EOS token: generation runs to its length limit.")]
  else:
    lines += [f'fill = pipeline("fill-mask", model="{hf_dir}")', "```"]
  lines += ["", "## How it was made", "", f"jaxllm {__version__}:", "", "```bash", command, "```", "",
            "The training run's resolved config is `config.json` in the source workdir.", ""]
  return "\n".join(lines)


def write(hf_dir: str, *, model_dir: str, target: str, arch: Architecture, cfg: ModelConfig,
          run_config: dict[str, Any], tokenizer: Any, step: int | None, dtype: str, max_shard_size: Any) -> None:
  """README.md (and, for a causal LM, generation_config.json) into hf_dir, the directory being
  written; `target` is where it will end up."""
  exported = saved_step(model_dir, step)
  command = convert_command(model_dir, target, step, dtype, max_shard_size)
  if arch.auto_class == CAUSAL:
    write_generation_config(hf_dir, tokenizer, cfg)
  with open(os.path.join(hf_dir, "README.md"), "w", encoding="utf-8") as f:
    f.write(card_text(run_config, model_dir, target, arch, cfg, tokenizer, exported, command))
