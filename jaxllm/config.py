"""The default config every recipe starts from, and the checks that turn bad values into one clear line."""

from __future__ import annotations

from typing import Any

import ml_collections

from jaxllm.errors import ConfigError
from jaxllm.models.config import DEFAULT_LORA_TARGETS, ModelConfig


def default_config() -> ml_collections.ConfigDict:
  """Every key a recipe may set, with its default. Recipes override what they need."""
  c = ml_collections.ConfigDict()
  # causal_lm | sft (instruction tuning: docs/sft.md) | mlm (masked-LM, model.family='bert': docs/bert.md)
  c.task = "causal_lm"
  c.init_from = ""            # a jaxllm checkpoint/workdir to start from (continued training)

  c.model = ml_collections.ConfigDict(dict(
      vocab_size=50304, d_model=768, num_layers=12, num_heads=12, num_kv_heads=0, head_dim=0,
      d_ff=0, max_seq_len=1024, family="gpt", position="learned", norm="layernorm", norm_eps=1e-5,
      activation="gelu_tanh", use_bias=True, tie_embeddings=True, embed_norm=False,
      rope_theta=10000.0, dropout_rate=0.0, init_std=0.02, dtype="float32", param_dtype="float32",
      remat="none", attention_impl="auto", type_vocab_size=2, use_pooler=False,
      matmul_impl="auto",     # auto (cpu_vjp on the CPU backend only) | xla | cpu_vjp: docs/performance.md
      scan_layers=True,       # blocks under nn.scan, parameters stacked [num_layers, ...] as layers/...
      scan_unroll=0,          # layers per scanned-loop iteration; 0 = auto (all <= 12 on CPU, else 1)
      num_virtual_tokens=0,   # prompt tuning: learned embeddings prepended to every input (docs/prompt_tuning.md)
      # LoRA (docs/lora.md): rank (0 = off), scale lora_alpha / rank, dropout on the adapter's input,
      # and a regex over module paths ("layers/attn/query") choosing the linear layers that get one
      lora_rank=0, lora_alpha=16.0, lora_dropout=0.0, lora_targets=DEFAULT_LORA_TARGETS))

  c.data = ml_collections.ConfigDict(dict(
      source="stdlib",        # stdlib | text | jsonl | parquet | hf_disk (save_to_disk dir) | hf (streaming)
      path="",                # file, folder or glob (data files for hf); the dir for hf_disk
      field="text",           # JSON field / Parquet or datasets column holding the document
      text_unit="file",       # text: one document per file or per line
      max_chars=0,            # cap on characters read (0 = all)
      streaming=False,        # text/jsonl/parquet: stream with datasets instead of reading into memory
      hf_name="",             # source=hf: load_dataset name (json, text, parquet or a dataset id)
      hf_config="",           # source=hf: dataset config name
      hf_split="train",       # source=hf / hf_disk: split to read
      sources=ml_collections.ConfigDict(),  # mixture: NAME=dict(source=..., path=..., weight=...); see docs/data.md
      tokenizer="",           # HF tokenizer dir; empty = train a byte-level BPE into WORKDIR/tokenizer;
                              # "char" = one token per character (nanoGPT shakespeare_char)
      tokenizer_vocab_size=0,  # for a tokenizer trained here; 0 = model.vocab_size
      tokenizer_train_chars=0,  # characters of training text to fit that tokenizer on (0 = all; streams: 20M)
      seq_len=1024,
      # concat (join + cut) | document (first-fit rows with segment_ids, positions); for task='sft':
      # document = several examples per row, anything else = one padded example per row
      # windows = nanoGPT style: the text split by position (val_fraction = its tail), rows at
      # random offsets (jaxllm/data/windows.py)
      packing="concat",
      pack_bins=128,          # document packing: rows filled at once (more = fuller rows)
      val_fraction=0.05,      # documents held out for evaluation (streams: by a hash of the text)
      val_path="",            # a separate validation source (same kind as source); overrides val_fraction
      shuffle_buffer=10_000,  # streams: documents shuffled together (files are shuffled too)
      num_shards=0,           # logical data shards; 0 = one per process. Fix it to make batches host-count free
      row_shuffle=0,          # training rows shuffled in windows of this many after packing (0 = off)
      prefetch=2,             # batches prepared ahead in a background thread (0 = none)
      tokenize_batch=128,     # documents per tokenizer call
      tokenize_threads=-1,    # batches tokenized at once in a thread pool; -1 = one per core (<= 16), 0 = inline
      on_bad_record="skip",   # skip (counted, logged) | error: unusable records (no field, bad UTF-8/JSON, empty)
      seed=0,
      # task='sft' only (docs/sft.md): data.path is an Alpaca/chat .json/.jsonl file or a datasets dir.
      template="alpaca",      # alpaca | human_assistant | chat_template (the tokenizer's own)
      train_on_prompt=False,  # also put loss on prompt tokens (default: response + EOS only)
      pad_multiple=16,        # padded batches: width rounded up to this (bounds recompiles)
      bucket_batches=16))     # padded batches: sort by length within windows of this many batches

  c.train = ml_collections.ConfigDict(dict(
      steps=1000, batch_size=8, grad_accum=1, log_every=10, eval_every=200, eval_steps=10,
      checkpoint_every=500, keep_checkpoints=3, seed=0, async_checkpoint=True,
      trainable="",           # regex over parameter paths that train; empty = all ("^prompt/": prompt tuning)
      prompt_init_text="",    # prompt tuning: init the prompt from this text's token embeddings ("" = random)
      frozen_dtype="",        # dtype the frozen parameters are held in ("bfloat16" halves them; "" = as is)
      frozen_quant="",        # "int8": frozen linear kernels in int8, one scale per output channel (QLoRA idea)
      memory_report=False,    # with `trainable`: log the step memory beside full fine-tuning's (compiles both)
      sample_prompt="",       # text to complete with the trained model at the end ("" = none)
      sample_tokens=64, sample_temperature=0.8, sample_top_k=40,
      peak_flops=0.0,         # device peak FLOP/s for MFU; 0 = looked up (or measured on CPU)
      # causal LM: the training cross-entropy from features, this many positions of float32
      # logits at a time (jaxllm/losses.py); 0 = all the logits at once
      loss_chunk_size=0,
      tensorboard=True, progress=True,
      # Weights & Biases (pip install 'jaxllm[wandb]'): the metrics.jsonl scalars and this config,
      # into one W&B run per workdir (resumed with it); empty project = off. jaxllm/wandb_run.py
      wandb_project="", wandb_entity="",  # entity "" = the W&B account's default
      wandb_run_name="",      # "" = the workdir's name
      wandb_tags="",          # comma-separated, e.g. "quickstart,cpu"
      # Held-out files (text, .jsonl or datasets dirs) scored at every eval step with the
      # sliding-window perplexity of `python -m jaxllm.eval perplexity` (window data.seq_len,
      # stride half of it): metrics eval_data/<name>_ppl and _bpb. At most eval_data_max_chars
      # characters of each are read, so the cost is bounded (0 = all).
      eval_data=(), eval_data_max_chars=50_000,
      # A step with non-finite gradients (or loss) never updates the parameters; it is counted
      # (metrics nonfinite_in_a_row / nonfinite_total). "skip": go on, but stop (exit 3) after
      # max_nonfinite_in_a_row such steps in a row (0 = never); "stop": stop at the first one.
      nonfinite_policy="skip", max_nonfinite_in_a_row=10))

  c.optim = ml_collections.ConfigDict(dict(
      lr=3e-4, warmup_steps=100, min_lr=3e-5, weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8,
      grad_clip=1.0,
      decay_steps=0,          # where the cosine ends; 0 = train.steps
      decay_embeddings=False, # also weight-decay the token/position embeddings (nanoGPT does)
  ))

  # Instruction tuning (task='sft'; docs/sft.md). The data keys (template, ...) are under data.
  c.sft = ml_collections.ConfigDict(dict(
      prefix_lm=False))       # the prompt attends to itself both ways, the response stays causal

  # Masked-LM (task='mlm'): BERT masking, done in the input pipeline (jaxllm/data/mlm.py).
  c.mlm = ml_collections.ConfigDict(dict(
      probability=0.15,       # share of non-special tokens chosen for the loss
      mask_fraction=0.8,      # of the chosen: replaced by [MASK]
      random_fraction=0.1,    # of the chosen: replaced by a random token (the rest stay as they are)
      whole_word=False,       # choose whole words (all their ## pieces) instead of single tokens
      lowercase=True,         # the WordPiece tokenizer trained here lowercases
      seed=0))                # masking RNG (validation uses seed + 1, fixed across evaluations)

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  return c


def validate(config: Any, num_devices: int) -> ModelConfig:
  """Checks values against each other and the hardware; returns the ModelConfig."""
  from jaxllm import faults, optim  # pylint: disable=import-outside-toplevel
  from jaxllm.sharding import mesh_shape  # pylint: disable=import-outside-toplevel
  try:
    model_cfg = ModelConfig.from_config(config.model)
  except (ValueError, TypeError) as e:
    raise ConfigError(str(e)) from e
  data, fsdp, _ = mesh_shape(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, num_devices)
  t = config.train
  if t.steps <= 0:
    raise ConfigError(f"train.steps={t.steps} must be positive.")
  if t.grad_accum <= 0 or t.batch_size % t.grad_accum:
    raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}.")
  micro = t.batch_size // t.grad_accum
  if micro % (data * fsdp):
    raise ConfigError(
        f"train.batch_size={t.batch_size} / grad_accum={t.grad_accum} = {micro} sequences per micro-batch "
        f"is not divisible by the mesh's data x fsdp = {data * fsdp}; use a multiple of {data * fsdp}.")
  if config.data.seq_len > model_cfg.max_seq_len and model_cfg.position == "learned":
    raise ConfigError(f"data.seq_len={config.data.seq_len} exceeds model.max_seq_len={model_cfg.max_seq_len}.")
  num_virtual = model_cfg.num_virtual_tokens
  if num_virtual and config.data.get("packing", "") == "document":
    raise ConfigError("prompt tuning (model.num_virtual_tokens) cannot be combined with data.packing="
                      "'document': each example needs the prompt before it; use task='sft' with "
                      "data.packing='concat' (one padded example per row).")
  if num_virtual and config.task != "sft":
    raise ConfigError("prompt tuning (model.num_virtual_tokens) needs task='sft' (one example per "
                      "row, prompt before each); concatenated pretraining rows cannot carry it.")
  if num_virtual and model_cfg.position == "learned" and config.data.seq_len + num_virtual > model_cfg.max_seq_len:
    raise ConfigError(f"data.seq_len={config.data.seq_len} + model.num_virtual_tokens={num_virtual} exceeds "
                      f"model.max_seq_len={model_cfg.max_seq_len}; lower data.seq_len.")
  if config.train.get("prompt_init_text", "") and not num_virtual:
    raise ConfigError("train.prompt_init_text is set but model.num_virtual_tokens=0; set it (e.g. 20).")
  if config.sft.prefix_lm:
    if config.task != "sft":
      raise ConfigError(f"sft.prefix_lm=True needs task='sft' (the prefix is each instruction's prompt); "
                        f"task is {config.task!r}.")
    if config.data.train_on_prompt:
      raise ConfigError("sft.prefix_lm=True with data.train_on_prompt=True: the prompt attends both ways, so "
                        "each prompt token would see the token it is trained to predict; turn one off.")
  frozen_quant = t.get("frozen_quant", "")
  if frozen_quant not in ("", "int8"):
    raise ConfigError(f"train.frozen_quant={frozen_quant!r} is not one of '', 'int8'.")
  if frozen_quant and not optim.trainable_pattern(config):
    raise ConfigError("train.frozen_quant='int8' quantizes the frozen weights, but nothing is frozen; "
                      "set model.lora_rank or train.trainable.")
  if frozen_quant and not config.init_from:
    raise ConfigError("train.frozen_quant='int8' quantizes a base model's frozen weights; set init_from "
                      "to the model directory to fine-tune (a random base is not worth quantizing).")
  faults.validate(t)
  for key in ("log_every", "eval_every", "checkpoint_every"):
    if t[key] <= 0:
      raise ConfigError(f"train.{key}={t[key]} must be positive.")
  return model_cfg


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """Sets dotted keys ("train.steps") on a ConfigDict, as --config.train.steps=... would."""
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config
