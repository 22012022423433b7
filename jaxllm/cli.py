"""What every command shares: a problem the user can fix is one `error:` line and exit status 2.

Commands (train, bench, generate, convert, tokenizer, fill_mask) parse their flags with
`ArgumentParser` or, for those that take `--config`, `define_config_flag` + `parse_flags`,
and run their work through `run_command`. A bad flag, an unknown or ill-typed config key, a
missing path and every `jaxllm.errors.UserError` end the same way; anything else is a bug and
keeps its traceback. This module imports no command and nothing heavy (no JAX).
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Callable, NoReturn

from jaxllm.errors import USER_ERRORS

USAGE_EXIT_CODE = 2

__all__ = ["ArgumentParser", "USAGE_EXIT_CODE", "USER_ERRORS", "define_config_flag", "fail",
           "parse_flags", "report", "run_command"]


def report(problem: object) -> None:
  """Prints the one line a user sees for a problem they can fix (a message or a user error)."""
  print(f"error: {one_line(problem)}", file=sys.stderr, flush=True)


def fail(problem: object) -> NoReturn:
  """`report`, then exit status 2: for problems found while parsing flags."""
  report(problem)
  sys.exit(USAGE_EXIT_CODE)


def run_command(work: Callable[[], object]) -> int:
  """Runs a command's work; returns its exit status: 0, or 2 after the `error:` line of a user error.

  Every command's main returns this (the `__main__` block passes it to sys.exit).
  """
  try:
    work()
  except USER_ERRORS as e:
    report(e)
    return USAGE_EXIT_CODE
  return 0


def one_line(problem: object) -> str:
  lines = [line.strip() for line in str(problem).splitlines() if line.strip()]
  return " ".join(lines) or type(problem).__name__


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
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  app.define_help_flags()  # --help, --helpfull: absl defines them in app.run, which comes later
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
    text = one_line(e)
    required = re.search(r"Flag (--\w+) must have a value other than None", text)
    if required:
      text = f"{required.group(1)} is required"
    fail(f"bad command line: {text}; see `{_prog(argv)} --help`.")
  return rest


def _prog(argv: list[str]) -> str:
  """How the running command was called: `python -m jaxllm.bench` rather than .../bench.py."""
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  return f"python -m {spec.name}" if spec and spec.name else (argv[0] if argv else "the command")


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
  return (f"unknown config key {name}{hint}; the keys and their defaults are in jaxllm/config_types.py "
          "(and the README's config table) and the --config file.")
