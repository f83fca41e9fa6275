"""What every command line of the project shares: absl flags defined on demand, no stray positional arguments,
quiet library logs, and bad input reported as one line."""
from __future__ import annotations

from typing import Callable, Sequence

from absl import app, flags, logging


def start(argv: Sequence[str]) -> None:
  """Call first in `main(argv)`: rejects positional arguments; orbax and grain log every save and restore at
  INFO, so logs are WARNING and up unless --verbosity is given."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def run(main: Callable[[Sequence[str]], None], define_flags: Callable[[], None]) -> None:
  """`python -m module`: defines the module's flags (importing a module defines none) and runs `main`."""
  define_flags()
  app.run(main)
