"""Every path the packages read or write goes through `data_pipeline.filesystem` (etils.epath), so a gs:// path
works wherever a local one does: read from the source, no module but that one calls the local-only file functions
(`os.path.*`, builtin `open`, `os.makedirs`, `glob`, `shutil`, ...). A call that must stay local (a library that only
opens local files, a local temporary folder) says why in a `# local-only: <reason>` comment on its line or the line
above."""

import ast
import re

import pytest
from helpers import ROOT

PACKAGES = ("mmbert_jax", "data_pipeline")
LAYER = "data_pipeline/filesystem.py"
OS_CALLS = ("makedirs", "mkdir", "listdir", "scandir", "walk", "rename", "replace", "remove", "unlink", "rmdir")
LOCAL_MODULES = ("glob", "shutil", "pathlib", "os.path")
MARKER = re.compile(r"#\s*local-only:\s*\S")


def _dotted(node: ast.AST) -> str | None:
  """ "os.path.join" for the expression os.path.join; None for anything but a chain of names."""
  parts = []
  while isinstance(node, ast.Attribute):
    parts.append(node.attr)
    node = node.value
  if not isinstance(node, ast.Name):
    return None
  return ".".join([node.id, *reversed(parts)])


def violations(source: str) -> list[tuple[int, str]]:
  """(line, what) for every local-only file call or import of `source` not marked `# local-only: <reason>`."""
  lines = source.splitlines()
  found = []
  for node in ast.walk(ast.parse(source)):
    what = None
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "open":
      what = "open("
    elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
      name = _dotted(node)
      if node.value.id == "os" and node.attr == "path":
        what = "os.path"
      elif node.value.id == "os" and node.attr in OS_CALLS:
        what = name
      elif node.value.id in ("glob", "shutil", "pathlib"):
        what = name
    elif isinstance(node, ast.ImportFrom) and node.module in LOCAL_MODULES:
      what = f"from {node.module} import"
    if what is None:
      continue
    here = lines[node.lineno - 1]
    above = lines[node.lineno - 2] if node.lineno > 1 else ""
    if not (MARKER.search(here) or (above.strip().startswith("#") and MARKER.search(above))):
      found.append((node.lineno, what))
  return sorted(set(found))


def _sources():
  for package in PACKAGES:
    for path in sorted((ROOT / package).rglob("*.py")):
      yield path.relative_to(ROOT).as_posix(), path


@pytest.mark.parametrize(
  "source, expected",
  [
    ("import os\nos.path.join('a', 'b')\n", [(2, "os.path")]),
    ("from os.path import join\n", [(1, "from os.path import")]),
    ("f = open('x')\n", [(1, "open(")]),
    ("import os\nos.makedirs('d')\nos.replace('a', 'b')\n", [(2, "os.makedirs"), (3, "os.replace")]),
    ("import glob, shutil\nglob.glob('*')\nshutil.copy('a', 'b')\n", [(2, "glob.glob"), (3, "shutil.copy")]),
    ("import pathlib\npathlib.Path('x')\n", [(2, "pathlib.Path")]),
    ("p.open('w')\nos.fspath(p)\nos.environ.get('X')\n", []),  # epath's open, not the builtin
    ("open('x')  # local-only: sentencepiece reads local files\n", []),
    ("# local-only: a local temporary folder\nshutil.rmtree(d)\n", []),
    ("open('x')  # local-only:\n", [(1, "open(")]),  # a marker must give its reason
  ],
)
def test_the_check_finds_local_file_calls(source, expected):
  assert violations(source) == expected


def test_every_path_goes_through_the_filesystem_layer():
  found = {name: violations(path.read_text()) for name, path in _sources() if name != LAYER}
  found = {name: v for name, v in found.items() if v}
  assert not found, (
    "local-only file calls outside data_pipeline/filesystem.py (use `fs`/epath, or mark them "
    "`# local-only: <reason>`): " + "; ".join(f"{n}:{line} {what}" for n, v in found.items() for line, what in v)
  )
