"""What every command line of the project shares (`mmbert_jax.cli` builds its absl layer on this): the exit codes,
and an argparse parser whose bad input (an unknown or missing flag, a value of the wrong type) is one
`error: <flag>: <what was expected>` line and exit status 2 instead of a usage dump. `--help` prints the usage.

Exit codes: 0 complete, 1 failed (a write failed, non-finite steps, a bug), 2 bad input (config, flags, files),
75 preempted (SIGTERM: a checkpoint was saved; run the same command again to resume).
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

EXIT_COMPLETE, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_PREEMPTED = 0, 1, 2, 75


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
  """One `error:` line on stderr, then exit `code`."""
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
  sys.exit(code)


def error_line(error: BaseException) -> str:
  """The first line of an exception's message (its type when it has none)."""
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


class ArgumentParser(argparse.ArgumentParser):
  """argparse with one-line errors (subcommands' parsers are of the same class); an unknown flag is named before
  the required ones that are missing."""

  def parse_known_args(self, args=None, namespace=None):
    args = sys.argv[1:] if args is None else list(args)
    for arg in args:
      if arg == "--" or (not arg.startswith("-") and self._subparsers is not None):
        break  # what follows is a subcommand's
      if arg.startswith("-") and not self._negative_number_matcher.match(arg):
        name = arg.split("=", 1)[0]
        if not any(option.startswith(name) for option in self._option_string_actions):  # argparse takes prefixes
          self.error(f"unrecognized argument {name}")
    return super().parse_known_args(args, namespace)

  def error(self, message: str) -> NoReturn:
    fail(f"{self.prog}: {message}")
