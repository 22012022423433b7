"""What every command shares: a problem the user can fix is one `error:` line and exit status 2.

Commands (train, bench, generate, convert, tokenizer, fill_mask) parse their flags with
`ArgumentParser` or, for those that take `--config`, `define_config_flag` + `parse_flags`,
and run their work inside `user_errors()`. A bad flag, an unknown or ill-typed config key, a
missing path and every `jaxllm.errors.UserError` end the same way; anything else is a bug and
keeps its traceback. This module imports no command and nothing heavy (no JAX).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Iterator, NoReturn

from jaxllm.errors import USER_ERRORS

USAGE_EXIT_CODE = 2

__all__ = ["ArgumentParser", "USAGE_EXIT_CODE", "USER_ERRORS", "define_config_flag", "fail",
           "parse_flags", "user_errors"]


def fail(message: str) -> NoReturn:
  """The one line a user sees for a problem they can fix; exit status 2."""
  print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
  sys.exit(USAGE_EXIT_CODE)


def one_line(message: object) -> str:
  lines = [line.strip() for line in str(message).splitlines() if line.strip()]
  return " ".join(lines) or type(message).__name__


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
  """Turns a user error raised inside the block into its `error:` line and exit status 2."""
  try:
    yield
  except USER_ERRORS as e:
    fail(one_line(e) if str(e) else type(e).__name__)


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose usage errors (unknown flag, bad value, missing argument) are one `error:`
  line and exit status 2, like every other user error. Subcommand parsers inherit this."""

  def error(self, message: str) -> NoReturn:
    fail(f"{message}; see `{self.prog} --help`.")


def define_config_flag() -> None:
  """Defines --config FILE (and with it every --config.KEY=VALUE override), locked against typos."""
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/NAME.py).",
                                  lock_config=True)


def parse_flags(argv: list[str]) -> list[str]:
  """Parses the absl flags defined so far and loads --config; returns the positional arguments.

  A missing config file, an unknown flag or config key and a value of the wrong type each
  become one `error:` line.
  """
  from absl import flags  # pylint: disable=import-outside-toplevel
  try:
    rest = flags.FLAGS(argv)
    if "config" in flags.FLAGS and flags.FLAGS["config"].present:
      flags.FLAGS.config.get("train")  # the config file loads lazily: surface its errors here
  except OSError as e:
    detail = [line.strip() for line in str(e).splitlines() if line.strip()]
    fail(f"cannot load the config file given by --config: {detail[-1] if detail else e}")
  except Exception as e:  # pylint: disable=broad-except
    # absl and ml_collections raise several types (flags.Error, AttributeError or KeyError for
    # an unknown key, ValueError/TypeError for a bad value); all are the user's to fix.
    if isinstance(e, (AttributeError, KeyError)):
      fail(_unknown_key_message(e, argv))
    fail(f"bad command line: {one_line(e)}")
  return rest


def _unknown_key_message(e: BaseException, argv: list[str]) -> str:
  """Names the --config.KEY override whose key does not exist (ml_collections names only its last part)."""
  inner: object = e
  while isinstance(inner, BaseException) and inner.args:
    inner = inner.args[0]
  first, *hints = [line.strip() for line in str(inner).splitlines() if line.strip()]
  part = first.strip("'\"")
  overrides = [arg[2:].split("=", 1)[0] for arg in argv if arg.startswith("--config.")]
  name = next((o for o in overrides if part in o.split(".")[1:]), part)
  hint = f" ({' '.join(hints)})" if hints else ""
  return (f"unknown config key {name}{hint}; the keys and their defaults are in jaxllm/config.py "
          "(default_config) and the --config file.")
