"""What every command line of the project shares: absl flags defined on demand, no stray positional arguments,
quiet library logs, bad input reported as one line, and the exit codes.

Exit codes: 0 complete, 1 failed (a write failed, non-finite steps, a bug), 2 bad input (config, flags, files),
75 preempted (SIGTERM: a checkpoint was saved; run the same command again to resume).
"""
from __future__ import annotations

import re
import sys
from typing import Callable, NoReturn, Sequence

from absl import app, flags, logging

EXIT_COMPLETE, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_PREEMPTED = 0, 1, 2, 75


def one_line(error: BaseException | str) -> str:
  """An error message on one line: ml_collections quotes key errors and puts "Did you mean" on a second line;
  a config file that raises comes with its traceback, of which the last line says what went wrong."""
  text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
  text = str(text).replace("\\n", "\n").replace("\\'", "'")
  if "Traceback (most recent call last)" in text:
    head, last = text.split("Traceback (most recent call last)")[0], text.strip().splitlines()[-1]
    text = f"{head} {re.sub(r'^[A-Za-z]+: ', '', last.strip())}"
  if isinstance(error, (KeyError, AttributeError)):
    text = re.sub(r"^'*([^'\s]+)'*", r"\1", text.strip().strip("\"'"))
    text = text.replace("\nDid you mean", " (did you mean").replace(" Did you mean", " (did you mean")
    text = text + ")" if "(did you mean" in text else text
  return " ".join(text.split())


def report(error: BaseException | str) -> None:
  print(f"error: {one_line(error)}", file=sys.stderr, flush=True)


def fail(error: BaseException | str, code: int = EXIT_BAD_INPUT) -> NoReturn:
  report(error)
  sys.exit(code)


def start(argv: Sequence[str]) -> None:
  """Call first in `main(argv)`: rejects positional arguments; orbax and grain log every save and restore at
  INFO, so logs are WARNING and up unless --verbosity is given."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def _parse_flags(argv: list[str]) -> list[str]:
  # A bad flag or --config override (unknown key, wrong type) is one line and exit 2, not a traceback.
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:   # ml_collections: an override of a key the config does not have
    fail(f"no such config key: {one_line(e)}")
  except (flags.Error, TypeError, ValueError) as e:
    fail(e)


def run(main: Callable[[Sequence[str]], None], define_flags: Callable[[], None]) -> None:
  """`python -m module`: defines the module's flags (importing a module defines none) and runs `main`."""
  define_flags()
  app.run(main, flags_parser=_parse_flags)
