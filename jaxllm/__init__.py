"""jaxllm: train language models in JAX/Flax, from a laptop CPU to TPU pods and GPU clusters."""

import logging as _logging

__version__ = "0.1.0"


class _NoTorchNotice(_logging.Filter):
  """transformers announces at import that without PyTorch "Models won't be available". jaxllm
  uses transformers for tokenizers and configs only, so to its users that line is noise; every
  other transformers message still shows. Installed here, before any jaxllm module imports
  transformers, because the line is logged while transformers itself is being imported."""

  def filter(self, record: _logging.LogRecord) -> bool:
    return not str(record.msg).startswith("PyTorch was not found.")


if not any(isinstance(f, _NoTorchNotice) for f in _logging.getLogger("transformers").filters):
  _logging.getLogger("transformers").addFilter(_NoTorchNotice())


def _running_a_command() -> bool:
  """Whether this process is `python -m jaxllm.<command>` (decided before any command module runs)."""
  import sys  # pylint: disable=import-outside-toplevel
  argv = list(getattr(sys, "orig_argv", ()))
  return "-m" in argv[:-1] and argv[argv.index("-m") + 1].startswith("jaxllm.")


if _running_a_command():
  # Before numpy or JAX start any thread: glibc binds each thread to a malloc arena on its
  # first allocation (jaxllm/cpu_runtime.py). Commands only, never a library import.
  from jaxllm import cpu_runtime as _cpu_runtime
  _cpu_runtime.reuse_freed_host_memory()
