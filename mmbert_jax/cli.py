"""What every absl command line of the project shares: flags defined on demand, no stray positional arguments,
quiet library logs, bad input reported as one line (`error: <what, and what to run or set>`: an unknown flag, a
value of the wrong type, a missing required flag, a `ConfigError` or `app.UsageError` from `main`) with exit status
2, and the exit codes of `data_pipeline.cli` (the argparse commands of the data pipeline behave the same):

Exit codes: 0 complete, 1 failed (a write failed, non-finite steps, a bug), 2 bad input (config, flags, files),
75 preempted (SIGTERM: a checkpoint was saved; run the same command again to resume).
"""

from __future__ import annotations

import re
import signal
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from absl import app, flags, logging

from data_pipeline.cli import EXIT_BAD_INPUT, EXIT_COMPLETE, EXIT_FAILED, EXIT_PREEMPTED  # noqa: F401
from mmbert_jax import early_sigterm, host_memory, storage


class ConfigError(ValueError):
  """A command that cannot start as given; its message is one line naming the flag, key or file and the fix."""


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


_sigterm = early_sigterm  # one flag from the first import on (see mmbert_jax/__init__.py)


def _on_sigterm(signum, frame) -> None:
  _sigterm["received"] = True  # only a flag: a write in progress is never interrupted, nor by a second SIGTERM


def handle_sigterm() -> None:
  """From process start, a SIGTERM (preemption notice) is a flag the command reads at safe points (`preempted`):
  it stops after the write in progress and exits 75; the same command resumes. The training loop installs its own
  handler for its steps and passes the signal on to this one."""
  signal.signal(signal.SIGTERM, _on_sigterm)


def preempted() -> bool:
  """Whether a SIGTERM arrived since `handle_sigterm`."""
  return _sigterm["received"]


def start(argv: Sequence[str]) -> None:
  """Call first in `main(argv)`: rejects positional arguments; orbax and grain log every save and restore at
  INFO, so logs are WARNING and up unless --verbosity is given; where JAX will run on the CPU, the C allocator keeps
  freed memory for the next step (`host_memory`, before JAX starts a backend)."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  try:
    host_memory.configure()
  except ValueError as e:
    raise ConfigError(str(e)) from None


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl flag parsing where a bad command line (an unknown `--config.` key, a value of the wrong type, a config
  file that rejects its argument) is one `error:` line instead of a traceback."""
  try:
    return flags.FLAGS(list(argv))
  except SystemExit as e:  # absl's --help prints the usage and exits 1: asking for it is no failure
    sys.exit(EXIT_COMPLETE if e.code == 1 and set(argv[1:]) & {"--help", "-h", "-?", "--helpshort"} else e.code)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    fail(flag_error(e, argv))


def flag_error(error: Exception, argv: Sequence[str]) -> str:
  """One line for a flag parsing error; an unknown config key names the flag (and the closest key, if known)."""
  if isinstance(error, flags.UnrecognizedFlagError) and error.flagname.startswith("config."):
    return (
      f"--{error.flagname}: the config has no value {error.flagname.rsplit('.', 1)[1]!r} to set (a section "
      "is set key by key)"
    )
  while error.args and isinstance(error.args[0], Exception):  # AttributeError(KeyError(message))
    error = error.args[0]
  text = str(error.args[0]) if error.args else str(error)
  lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
  if "Traceback (most recent call last):" in lines:  # a config file raised: its own message is the last line
    return f"{lines[0]} {lines[-1]}"
  if isinstance(error, (AttributeError, KeyError)) and lines:
    key = lines[0].strip("'\"")
    flag = next(
      (a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.") and key in a.split("=", 1)[0].split(".")),
      f"--config.…{key}",
    )
    hint = next((line for line in lines[1:] if line.startswith("Did you mean")), "")
    hint = hint.strip("'\"").replace("Did you mean", "did you mean").replace('"', "")
    return f"{flag}: the config has no key {key!r}" + (f" ({hint})" if hint else "")
  if lines and "must have a value other than None" in lines[0]:  # a required flag that is missing
    return f"{lines[0].split()[1].split('=')[0]} is required"
  return lines[0] if lines else type(error).__name__


def run(main: Callable[[Sequence[str]], None], define_flags: Callable[[], None]) -> None:
  """`python -m module`: defines the module's flags (importing a module defines none) and runs `main`; bad flags
  and a `ConfigError` or `app.UsageError` from `main` end the command with one `error:` line and exit status 2, a
  failed write (a full disk, a read-only one) with one line naming the path and exit status 1, and so does a bucket
  that did not answer (`data_pipeline.filesystem.StorageUnavailableError`)."""
  define_flags()

  def checked_main(argv):
    try:
      main(argv)
    except (ConfigError, app.UsageError) as e:  # absl would print the whole usage for a UsageError
      fail(e)
    except storage.WriteError as e:
      fail(storage.unavailable(e) or e, EXIT_FAILED)
    except Exception as e:  # OSError, or a library's error that carries the C library's text
      if down := storage.unavailable(e):  # a bucket that did not answer for config.storage_timeout_s
        fail(down, EXIT_FAILED)
      if not storage.is_storage_error(e):
        raise
      fail(storage.failed_write(e), EXIT_FAILED)

  app.run(checked_main, flags_parser=parse_flags)
