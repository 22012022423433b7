"""From a config to a tokenizer, a training dataset, a fixed validation set and data counts.

`data.sources` (optional) names several sources to mix; each entry overrides the
top-level data keys (source, path, field, ...) and adds a `weight`. Without it the
top-level keys describe the one source.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import grain
import jax

from jaxllm.config_types import DataConfig, RunConfig, SourceConfig
from jaxllm.errors import ConfigError
from jaxllm.data.packing import PACKING_MODES
from jaxllm.data.pipeline import DocumentsFn, PackSpec, lm_batches, memory_documents, num_data_shards, take_batches
from jaxllm.data.documents import load_documents
from jaxllm.data.sources import DataError, DataStats, train_val_split
from jaxllm.data.stream import StreamDataset, spec_from_config
from jaxllm.data.tokenizers import prepare_tokenizer

@dataclasses.dataclass
class LMData:
  """What training needs from the data: `train` is an endless grain dataset of this host's batches."""
  tokenizer: Any
  train: grain.IterDataset
  val_batches: list
  stats: dict[str, DataStats]

  def summary(self) -> str:
    return " | ".join(f"{name}: {s.summary()}" for name, s in self.stats.items())


def source_configs(data_cfg: DataConfig | Any) -> dict[str, SourceConfig]:
  """name -> the resolved config of each source (top-level keys overridden by `data.sources.NAME`)."""
  return DataConfig.of(data_cfg).resolved_sources()


class _Source:
  """One configured source: its training and validation documents for any logical shard."""

  def __init__(self, cfg: SourceConfig, seed: int, shuffle_buffer: int):
    self.cfg, self.seed, self.shuffle_buffer = cfg, seed, shuffle_buffer
    self.stats = DataStats(cfg.on_bad_record)
    self.val_fraction = 0.0 if cfg.val_path else cfg.val_fraction
    if not 0 <= self.val_fraction < 1:
      raise DataError(f"data.val_fraction={self.val_fraction} must be in [0, 1).")
    if cfg.is_stream:
      self.spec = spec_from_config(cfg)
      self.val_spec = spec_from_config(cfg, cfg.val_path) if cfg.val_path else None
    else:
      docs = load_documents(cfg, self.stats)
      if cfg.val_path:
        self.train_docs, self.val_docs = docs, load_documents(cfg, DataStats(self.stats.on_bad_record), cfg.val_path)
      else:
        self.train_docs, self.val_docs = train_val_split(docs, self.val_fraction, seed)

  @property
  def has_val(self) -> bool:
    return bool(self.cfg.val_path) or self.val_fraction > 0

  def train(self) -> DocumentsFn:
    if not self.cfg.is_stream:
      return memory_documents(self.train_docs, seed=self.seed)
    split = "train" if self.val_fraction > 0 else "all"

    def make(shard_index: int, num_shards: int) -> grain.IterDataset:
      docs = StreamDataset(self.spec, self.stats, seed=self.seed, shard_index=shard_index, num_shards=num_shards,
                           split=split, val_fraction=self.val_fraction)
      if self.shuffle_buffer > 1:
        docs = grain.experimental.WindowShuffleIterDataset(docs, window_size=self.shuffle_buffer, seed=self.seed)
      return docs
    return make

  def val(self) -> DocumentsFn:
    if not self.cfg.is_stream:
      return memory_documents(self.val_docs, seed=self.seed, shuffle=False, repeat=False)
    spec, split = (self.val_spec, "all") if self.val_spec else (self.spec, "val")
    return lambda s, n: StreamDataset(spec, DataStats(self.stats.on_bad_record), seed=self.seed, shard_index=s,
                                      num_shards=n, shuffle_files=False, repeat=False, split=split,
                                      val_fraction=self.val_fraction)

  def sample(self, max_chars: int) -> Sequence[str]:
    """Training documents to fit a tokenizer on (at most about max_chars characters; 0 = all)."""
    if not self.cfg.is_stream:
      if not max_chars:
        return self.train_docs
      docs, total = [], 0
      for i in range(len(self.train_docs)):
        docs.append(self.train_docs[i])
        total += len(docs[-1])
        if total >= max_chars:
          break
      return docs
    docs, total = [], 0
    for doc in StreamDataset(self.spec, DataStats(self.stats.on_bad_record), seed=self.seed, shuffle_files=False,
                             repeat=False, split="train" if self.val_fraction > 0 else "all",
                             val_fraction=self.val_fraction):
      docs.append(doc)
      total += len(doc)
      if total >= (max_chars or 20_000_000):
        break
    if not docs:
      raise self.stats.nothing_error(f"stream {self.spec.name!r}")
    return docs


def check_data_config(data: DataConfig) -> None:
  """The pipeline's own keys, checked before any file is read."""
  if data.packing not in PACKING_MODES:
    raise ConfigError(f"data.packing={data.packing!r}; use one of {PACKING_MODES}.")
  for key, low in (("seq_len", 1), ("pack_bins", 1), ("tokenize_batch", 1), ("tokenize_threads", -1),
                   ("shuffle_buffer", 0),
                   ("prefetch", 0), ("num_shards", 0)):
    if getattr(data, key) < low:
      raise ConfigError(f"data.{key}={getattr(data, key)} must be at least {low}.")


def build_lm_data(config: RunConfig | Any, workdir: str) -> LMData:
  """The tokenizer, this host's endless training batches and the fixed validation batches."""
  config = RunConfig.of(config)
  data = config.data
  if data.packing == "windows":  # nanoGPT-style: split by position, random windows (data/windows.py)
    from jaxllm.data.windows import window_data  # pylint: disable=import-outside-toplevel
    return LMData(*window_data(config, workdir, prepare_tokenizer))
  check_data_config(data)
  configs = source_configs(data)
  sources = {name: _Source(cfg, data.seed + 7919 * i, data.shuffle_buffer)
             for i, (name, cfg) in enumerate(configs.items())}
  weights = {name: float(cfg.weight or 1.0) for name, cfg in configs.items()}
  sample = lambda: [doc for s in sources.values() for doc in s.sample(data.tokenizer_train_chars)]  # noqa: E731
  tokenizer = prepare_tokenizer(config, workdir, sample)
  spec = PackSpec(tokenizer, tokenizer.eos_token_id, data.seq_len, data.packing, data.pack_bins,
                  data.tokenize_batch, data.seed, data.tokenize_threads)
  num_shards = num_data_shards(config)
  batch_size = config.train.batch_size
  common = dict(num_shards=num_shards, process_index=jax.process_index(), process_count=jax.process_count())
  train = lm_batches({n: s.train() for n, s in sources.items()}, spec, batch_size, weights=weights,
                     prefetch=data.prefetch, row_shuffle=data.row_shuffle, **common)
  val_batches = []
  if config.train.eval_steps > 0 and all(s.has_val for s in sources.values()):
    val = lm_batches({n: s.val() for n, s in sources.items()}, spec, batch_size, weights=weights, **common)
    val_batches = take_batches(val, config.train.eval_steps)
    if not val_batches:
      raise DataError(f"the validation split is shorter than one batch of {batch_size // num_shards} x "
                      f"{data.seq_len} tokens per data shard; raise data.val_fraction or give data.val_path.")
  return LMData(tokenizer, train, val_batches, {n: s.stats for n, s in sources.items()})
