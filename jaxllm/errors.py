"""The errors a user can fix: one hierarchy, below every other jaxllm module.

A `UserError` carries a one-line message that names what is wrong, where, and what to do;
every command prints it as its `error:` line and exits with status 2 (see `jaxllm.cli`).
Anything else that escapes a command is a bug and keeps its traceback.

The subclasses also derive from the builtin type each one replaced, so code that catches
`ValueError` (or `RuntimeError` for checkpoints) keeps working.
"""

from __future__ import annotations


class UserError(Exception):
  """Input that cannot work: a setting, a file, a checkpoint or a request; the message says the fix."""


class ConfigError(UserError, ValueError):
  """A setting that cannot work: a config value or a command's flag."""


class DataError(UserError, ValueError):
  """Input data that cannot be used; the message names the file/record and the fix."""


class CheckpointError(UserError, RuntimeError):
  """A checkpoint or model directory that cannot be used; the message says why and what to do."""


class GenerationError(UserError, ValueError):
  """An inference request (generate, fill-mask) that cannot work; the message says which value."""


class ConvertError(UserError, ValueError):
  """A model that cannot be converted (to or from Hugging Face or PEFT) as asked."""


# OSError: a path that is missing (FileNotFoundError), taken (FileExistsError), unreadable,
# read-only or on a full disk; the message names the path.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, OSError)
