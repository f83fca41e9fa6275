"""Runs entry points' command lines in forked children of one process (each import once, flags defined afresh per
child): reads [[module, args], ...] as JSON on stdin, prints [[exit status, stdout, stderr], ...] as JSON."""

import importlib
import json
import os
import sys
import tempfile

from data_pipeline import cli as data_cli
from mmbert_jax import cli


def _run_in_child(module: str, args: list[str]) -> None:
  """Never returns: the child's exit status is the command's."""
  mod = importlib.import_module(module)
  sys.argv = [module, *args]
  try:
    if hasattr(mod, "define_flags"):  # an absl command line
      cli.run(mod.main, mod.define_flags)
    else:
      mod.main(args)
    code = 0
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else data_cli.EXIT_FAILED)
    if isinstance(e.code, str):
      print(e.code, file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def main() -> None:
  cases = json.load(sys.stdin)
  modules = {module for module, _ in cases}
  for module in modules:  # imported once, before the forks (importing defines no flags)
    importlib.import_module(module)
  results = []
  for module, args in cases:
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
      pid = os.fork()
      if pid == 0:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.stdout, sys.stderr = os.fdopen(1, "w"), os.fdopen(2, "w")
        _run_in_child(module, args)
      _, status = os.waitpid(pid, 0)
      out.seek(0)
      err.seek(0)
      results.append([os.waitstatus_to_exitcode(status), out.read(), err.read()])
  print(json.dumps(results))


if __name__ == "__main__":
  main()
