"""One interface over the three training tasks' data: causal LM, instruction tuning, masked LM.

The training loop needs the same four things whatever the task: the tokenizer, this
host's endless iterator of batches, the fixed validation batches, and a line saying
what the data holds. A task that can be sampled from at the end (not masked-LM) also
says how a sample prompt becomes token ids: an instruction goes through the template.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import grain

from jaxllm.config_types import RunConfig

TASKS = ("causal_lm", "sft", "mlm")


@dataclasses.dataclass
class TaskData:
  tokenizer: Any
  train: grain.IterDataset
  val_batches: list
  summary: str                                      # what the data holds, for the start-up log
  prompt_ids: Callable[[str], list[int]] | None     # sample prompt -> ids; None: nothing to sample
  read_so_far: Callable[[], str] | None = None      # counts of what the run has read (streams grow)


def build_task_data(config: RunConfig | Any, workdir: str) -> TaskData:
  """The data of `config.task`, built from the config (the tokenizer trained or loaded into workdir)."""
  # pylint: disable=import-outside-toplevel
  config = RunConfig.of(config)
  if config.task not in TASKS:
    from jaxllm.errors import ConfigError
    raise ConfigError(f"task={config.task!r} is not known; use one of {TASKS}.")
  if config.task == "sft":
    from jaxllm.data import sft
    data = sft.build_sft_data(config, workdir)
    return TaskData(data.tokenizer, data.train, data.val_batches, data.summary,
                    lambda text: sft.prompt_ids(data.tokenizer, data.template, text))
  if config.task == "mlm":
    from jaxllm.data.mlm import build_mlm_data
    tokenizer, train, val_batches = build_mlm_data(config, workdir)
    return TaskData(tokenizer, train, val_batches, "", None)
  from jaxllm.data.build import build_lm_data
  data = build_lm_data(config, workdir)
  tokenizer = data.tokenizer
  return TaskData(tokenizer, data.train, data.val_batches, f"data: {data.summary()}",
                  lambda text: tokenizer(text, add_special_tokens=False)["input_ids"],
                  lambda: f"data read (this run): {data.summary()}")
