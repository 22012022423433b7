"""The config's sections as frozen dataclasses: every key, its default and what it means, in one place.

`default_config()` (config.py) builds its ConfigDict from these defaults, so recipes, command-line
overrides and the locked-config typo check work on the ConfigDict as before; a run builds the
typed view once (`RunConfig.from_config(config)`) and the library reads attributes, never
`.get(key, default)`. A key missing from the section (a config.json written by an older
version) takes the field's default; a key no field names is a `ConfigError` unless
`strict=False` (reading back a run's config.json, which a newer version may have written).
`model` is `ModelConfig` (models/config.py), which keeps ignoring keys it does not know: an
init_from directory's architecture keys are copied over the recipe's as they are.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, ClassVar, Mapping

from jaxllm.errors import ConfigError
from jaxllm.models.config import ModelConfig


def _items(section: Any) -> dict[str, Any]:
  """A ConfigDict section or a dict (from JSON) as a plain dict of its top-level keys."""
  if section is None:
    return {}
  return {k: section[k] for k in section.keys()}


def _plain(value: Any) -> Any:
  return value.to_dict() if hasattr(value, "to_dict") else dict(value)


class Section:
  """What every section shares: built from its ConfigDict section, defaults for what is missing."""
  name: ClassVar[str]  # the section's key in the config ("train")

  @classmethod
  def from_config(cls, section: Any = None, *, strict: bool = True):
    values = _items(section)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown and strict:
      close = difflib.get_close_matches(unknown[0], names, n=1)
      hint = f"did you mean {cls.name}.{close[0]}?" if close else f"known keys: {', '.join(names)}."
      raise ConfigError(f"{cls.name}.{unknown[0]} is not a config key; {hint}")
    return cls(**{k: v for k, v in values.items() if k in names})

  @classmethod
  def of(cls, section: Any):
    """`section` if it is already typed, else built from the ConfigDict section."""
    return section if isinstance(section, cls) else cls.from_config(section)

  @classmethod
  def defaults(cls) -> dict[str, Any]:
    """Key -> default, the section default_config() holds."""
    return {f.name: (f.default_factory() if f.default is dataclasses.MISSING else f.default)
            for f in dataclasses.fields(cls)}


@dataclasses.dataclass(frozen=True)
class _SourceKeys(Section):
  """The keys that say where one source's documents come from (shared by data and its mixture entries)."""
  name: ClassVar[str] = "data"
  source: str = "stdlib"        # stdlib | text | jsonl | parquet | hf_disk (save_to_disk dir) | hf (streaming)
  path: str = ""                # file, folder or glob (data files for hf); the dir for hf_disk
  field: str = "text"           # JSON field / Parquet or datasets column holding the document
  text_unit: str = "file"       # text: one document per file or per line
  max_chars: int = 0            # cap on characters read (0 = all)
  streaming: bool = False       # text/jsonl/parquet: stream with datasets instead of reading into memory
  hf_name: str = ""             # source=hf: load_dataset name (json, text, parquet or a dataset id)
  hf_config: str = ""           # source=hf: dataset config name
  hf_split: str = "train"       # source=hf / hf_disk: split to read
  val_path: str = ""            # a separate validation source (same kind as source); overrides val_fraction
  val_fraction: float = 0.05    # documents held out for evaluation (streams: by a hash of the text)
  on_bad_record: str = "skip"   # skip (counted, logged) | error: unusable records (no field, bad UTF-8/JSON, empty)

  @property
  def is_stream(self) -> bool:
    return self.source == "hf" or bool(self.streaming)


# What a `data.sources.NAME` entry may set (besides its weight); on_bad_record stays the data section's.
SOURCE_KEYS = tuple(f.name for f in dataclasses.fields(_SourceKeys) if f.name != "on_bad_record")


@dataclasses.dataclass(frozen=True)
class SourceConfig(_SourceKeys):
  """One source resolved: the top-level data keys, or a `data.sources.NAME` entry over them
  (jaxllm/data/build.py)."""
  weight: float = 1.0           # the source's share of a mixture


@dataclasses.dataclass(frozen=True)
class DataConfig(_SourceKeys):
  """`config.data`: the source keys above (or a mixture), the tokenizer, packing and the input pipeline."""
  # mixture: NAME=dict(source=..., path=..., weight=...) over the keys above; see docs/data.md
  sources: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
  # HF tokenizer dir; empty = train a byte-level BPE into WORKDIR/tokenizer;
  # "char" = one token per character (nanoGPT shakespeare_char)
  tokenizer: str = ""
  tokenizer_vocab_size: int = 0   # for a tokenizer trained here; 0 = model.vocab_size
  tokenizer_train_chars: int = 0  # characters of training text to fit that tokenizer on (0 = all; streams: 20M)
  seq_len: int = 1024
  # concat (join + cut) | document (first-fit rows with segment_ids, positions); for task='sft':
  # document = several examples per row, anything else = one padded example per row
  # windows = nanoGPT style: the text split by position (val_fraction = its tail), rows at
  # random offsets (jaxllm/data/windows.py)
  packing: str = "concat"
  pack_bins: int = 128          # document packing: rows filled at once (more = fuller rows)
  shuffle_buffer: int = 10_000  # streams: documents shuffled together (files are shuffled too)
  num_shards: int = 0           # logical data shards; 0 = one per process. Fix it to make batches host-count free
  row_shuffle: int = 0          # training rows shuffled in windows of this many after packing (0 = off)
  prefetch: int = 2             # batches prepared ahead in a background thread (0 = none)
  tokenize_batch: int = 128     # documents per tokenizer call
  tokenize_threads: int = -1    # batches tokenized at once in a thread pool; -1 = one per core (<= 16), 0 = inline
  seed: int = 0
  # task='sft' only (docs/sft.md): data.path is an Alpaca/chat .json/.jsonl file or a datasets dir.
  template: str = "alpaca"      # alpaca | human_assistant | chat_template (the tokenizer's own)
  train_on_prompt: bool = False  # also put loss on prompt tokens (default: response + EOS only)
  pad_multiple: int = 16        # padded batches: width rounded up to this (bounds recompiles)
  bucket_batches: int = 16      # padded batches: sort by length within windows of this many batches

  def __post_init__(self):
    object.__setattr__(self, "sources", {name: _plain(entry) for name, entry in _items(self.sources).items()})

  def source_config(self, **overrides: Any) -> SourceConfig:
    """The top-level source keys (with `overrides`, a `data.sources.NAME` entry) as one source."""
    values = {k: getattr(self, k) for k in SOURCE_KEYS}
    values.update(overrides, on_bad_record=self.on_bad_record)
    return SourceConfig(**values)

  def resolved_sources(self) -> dict[str, SourceConfig]:
    """name -> each source: the top-level keys ("main"), or each `data.sources.NAME` entry over them."""
    if not self.sources:
      return {"main": self.source_config()}
    resolved = {}
    for name, entry in self.sources.items():
      unknown = set(entry) - set(SOURCE_KEYS) - {"weight"}
      if unknown:
        raise ConfigError(f"data.sources.{name}: unknown keys {sorted(unknown)}; use {SOURCE_KEYS + ('weight',)}.")
      resolved[name] = self.source_config(**entry)
      if float(resolved[name].weight) <= 0:
        raise ConfigError(f"data.sources.{name}.weight must be positive.")
    return resolved


@dataclasses.dataclass(frozen=True)
class TrainConfig(Section):
  """`config.train`: the loop, checkpoints, logging, what trains, sampling and the fault policy."""
  name: ClassVar[str] = "train"
  steps: int = 1000
  batch_size: int = 8
  grad_accum: int = 1
  log_every: int = 10
  eval_every: int = 200
  eval_steps: int = 10
  checkpoint_every: int = 500
  keep_checkpoints: int = 3
  seed: int = 0
  async_checkpoint: bool = True
  trainable: str = ""           # regex over parameter paths that train; empty = all ("^prompt/": prompt tuning)
  prompt_init_text: str = ""    # prompt tuning: init the prompt from this text's token embeddings ("" = random)
  frozen_dtype: str = ""        # dtype the frozen parameters are held in ("bfloat16" halves them; "" = as is)
  frozen_quant: str = ""        # "int8": frozen linear kernels in int8, one scale per output channel (QLoRA idea)
  memory_report: bool = False   # with `trainable`: log the step memory beside full fine-tuning's (compiles both)
  sample_prompt: str = ""       # text to complete with the trained model at the end ("" = none)
  sample_tokens: int = 64
  sample_temperature: float = 0.8
  sample_top_k: int = 40
  peak_flops: float = 0.0       # device peak FLOP/s for MFU; 0 = looked up (or measured on CPU)
  # causal LM: the training cross-entropy from features, this many positions of float32
  # logits at a time (jaxllm/losses.py); 0 = all the logits at once
  loss_chunk_size: int = 0
  tensorboard: bool = True
  progress: bool = True
  # Weights & Biases (pip install 'jaxllm[wandb]'): the metrics.jsonl scalars and this config,
  # into one W&B run per workdir (resumed with it); empty project = off. jaxllm/wandb_run.py
  wandb_project: str = ""
  wandb_entity: str = ""        # "" = the W&B account's default
  wandb_run_name: str = ""      # "" = the workdir's name
  wandb_tags: str = ""          # comma-separated, e.g. "quickstart,cpu"
  # Held-out files (text, .jsonl or datasets dirs) scored at every eval step with the
  # sliding-window perplexity of `python -m jaxllm.eval perplexity` (window data.seq_len,
  # stride half of it): metrics eval_data/<name>_ppl and _bpb. At most eval_data_max_chars
  # characters of each are read, so the cost is bounded (0 = all).
  eval_data: tuple[str, ...] = ()
  eval_data_max_chars: int = 50_000
  # A step with non-finite gradients (or loss) never updates the parameters; it is counted
  # (metrics nonfinite_in_a_row / nonfinite_total). "skip": go on, but stop (exit 3) after
  # max_nonfinite_in_a_row such steps in a row (0 = never); "stop": stop at the first one.
  nonfinite_policy: str = "skip"
  max_nonfinite_in_a_row: int = 10

  def __post_init__(self):
    object.__setattr__(self, "eval_data", tuple(self.eval_data))


@dataclasses.dataclass(frozen=True)
class OptimConfig(Section):
  """`config.optim`: AdamW with warmup-cosine, clipping and masked weight decay (jaxllm/optim.py)."""
  name: ClassVar[str] = "optim"
  lr: float = 3e-4
  warmup_steps: int = 100
  min_lr: float = 3e-5
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  grad_clip: float = 1.0
  decay_steps: int = 0            # where the cosine ends; 0 = train.steps
  decay_embeddings: bool = False  # also weight-decay the token/position embeddings (nanoGPT does)


@dataclasses.dataclass(frozen=True)
class SftConfig(Section):
  """Instruction tuning (task='sft'; docs/sft.md). The data keys (template, ...) are under data."""
  name: ClassVar[str] = "sft"
  prefix_lm: bool = False       # the prompt attends to itself both ways, the response stays causal


@dataclasses.dataclass(frozen=True)
class MlmConfig(Section):
  """Masked-LM (task='mlm'): BERT masking, done in the input pipeline (jaxllm/data/mlm.py)."""
  name: ClassVar[str] = "mlm"
  probability: float = 0.15     # share of non-special tokens chosen for the loss
  mask_fraction: float = 0.8    # of the chosen: replaced by [MASK]
  random_fraction: float = 0.1  # of the chosen: replaced by a random token (the rest stay as they are)
  whole_word: bool = False      # choose whole words (all their ## pieces) instead of single tokens
  lowercase: bool = True        # the WordPiece tokenizer trained here lowercases
  seed: int = 0                 # masking RNG (validation uses seed + 1, fixed across evaluations)


@dataclasses.dataclass(frozen=True)
class MeshConfig(Section):
  """`config.mesh`: devices along each mesh axis; -1 = all the devices the others leave."""
  name: ClassVar[str] = "mesh"
  data: int = -1
  fsdp: int = 1
  tensor: int = 1


# The recipe default differs from ModelConfig's (GPT-2's 50257): padded to a multiple of 64, as
# nanoGPT does, for faster matmuls; a tokenizer trained here is still fitted to data.tokenizer_vocab_size.
RECIPE_MODEL_DEFAULTS = {"vocab_size": 50304}
SECTIONS = {"data": DataConfig, "train": TrainConfig, "optim": OptimConfig, "sft": SftConfig,
            "mlm": MlmConfig, "mesh": MeshConfig}


def model_defaults() -> dict[str, Any]:
  """config.model's defaults: ModelConfig's fields, with the recipe's vocab_size."""
  return {**{f.name: f.default for f in dataclasses.fields(ModelConfig)}, **RECIPE_MODEL_DEFAULTS}


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """The whole config, typed: what a run reads. Built once (`from_config`) from the ConfigDict."""
  # causal_lm | sft (instruction tuning: docs/sft.md) | mlm (masked-LM, model.family='bert': docs/bert.md)
  task: str = "causal_lm"
  init_from: str = ""           # a jaxllm checkpoint/workdir to start from (continued training)
  model: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(**model_defaults()))
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
  sft: SftConfig = dataclasses.field(default_factory=SftConfig)
  mlm: MlmConfig = dataclasses.field(default_factory=MlmConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)

  @classmethod
  def from_config(cls, config: Any, *, strict: bool = True) -> "RunConfig":
    """From the ConfigDict (or a run's config.json as a dict); a bad model is a ConfigError."""
    values = _items(config)
    unknown = [k for k in values if k not in ("task", "init_from", "model", *SECTIONS)]
    if unknown and strict:
      raise ConfigError(f"{unknown[0]} is not a config key; the config has task, init_from, model, "
                        f"{', '.join(SECTIONS)}.")
    try:
      model = ModelConfig.from_config({**model_defaults(), **_items(values.get("model"))})
    except (ValueError, TypeError) as e:
      raise ConfigError(str(e)) from e
    sections = {name: section.from_config(values.get(name), strict=strict) for name, section in SECTIONS.items()}
    return cls(task=values.get("task", cls.task), init_from=values.get("init_from", cls.init_from), model=model,
               **sections)

  @classmethod
  def of(cls, config: Any) -> "RunConfig":
    """`config` if it is already typed, else built from the ConfigDict (library entry points take either)."""
    return config if isinstance(config, RunConfig) else cls.from_config(config)
