"""The import graph of `mmbert_jax` and `data_pipeline`, read from the source: it has no cycle, modules import
at the top (a function imports only a heavy optional dependency), and the layers point one way."""

import ast
import graphlib
import pathlib

import pytest
from helpers import ROOT

PACKAGES = ("mmbert_jax", "data_pipeline")
# (module, imported top-level package) pairs allowed inside a function, and why.
LAZY_ALLOWED = {
  ("mmbert_jax.export", "tokenizers"): "optional: the fast tokenizer needs the `test` extra",
  ("mmbert_jax.export", "transformers"): "optional: the fast tokenizer needs the `test` extra",
  ("data_pipeline.prepare", "tensorflow_datasets"): "heavy: only for the TFDS source format",
  ("data_pipeline.prepare", "pyarrow"): "only for the parquet source format",
  ("data_pipeline.tokenizer", "tokenizers"): "only for tokenizer.json files",
  ("data_pipeline.pipeline", "jax"): "the data package runs without jax; only process defaults ask it",
  ("data_pipeline.pipeline", "absl"): "grain's worker processes read absl flags",
  ("mmbert_jax.metrics", "wandb"): "optional: W&B only when config.wandb.project is set",
  ("mmbert_jax.metrics", "tensorboardX"): "heavy: imports torch when installed; only the writing process needs it",
  ("mmbert_jax.report", "matplotlib"): "heavy: only when plots are drawn, not for every entry-point start",
  ("data_pipeline.tasks", "pyarrow"): "only for parquet task files",
  ("data_pipeline.tasks", "tensorflow_datasets"): "heavy: only for TFDS task data",
  ("data_pipeline.filesystem", "gcsfs"): "only for gs:// paths: the first one sets its retries",
  ("data_pipeline.filesystem", "aiohttp"): "gcsfs's HTTP client: only for gs:// paths",
  **{
    ("mmbert_jax.benchmarks.versus_torch", package): "each side runs in a child that pins its cores first: the"
    " parent only alternates the children, and torch needs the `test` extra"
    for package in ("jax", "numpy", "torch", "transformers", "mmbert_jax")
  },
}
# Lower layers never import higher ones (modules not listed may sit anywhere the graph allows).
LAYERS = (
  ("mmbert_jax.sharding", "mmbert_jax.kernels.splash", "mmbert_jax.kernels.flash_gpu"),
  ("mmbert_jax.attention",),
  ("mmbert_jax.model",),
  ("mmbert_jax.checkpoint", "mmbert_jax.hf", "mmbert_jax.flops", "mmbert_jax.optim"),
  ("mmbert_jax.train",),
  ("mmbert_jax.evaluate", "mmbert_jax.merge", "mmbert_jax.export", "mmbert_jax.aot", "mmbert_jax.finetune"),
  ("mmbert_jax.phases",),
  ("mmbert_jax.main",),
)


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for package in PACKAGES:
    for path in sorted((ROOT / package).rglob("*.py")):
      parts = path.relative_to(ROOT).with_suffix("").parts
      out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return out


def _imports(path: pathlib.Path, module: str, modules=()):
  """(imported module, inside a function?) for every import statement of the file. `from package import
  submodule` imports the submodule (the package's `__init__` is its parent, not what the code uses)."""
  tree = ast.parse(path.read_text(), str(path))
  functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
  nested = {id(n) for f in functions for n in ast.walk(f) if n is not f}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative import
        base = ".".join(module.split(".")[: -node.level] + ([base] if base else []))
      names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    else:
      continue
    for name in names:
      yield name, id(node) in nested


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  graph = {m: set() for m in modules}
  for module, path in modules.items():
    for name, _ in _imports(path, module, modules):
      if name in modules and name != module:
        graph[module].add(name)
  return graph


def test_import_graph_has_no_cycle():
  graph = _graph()
  assert {"mmbert_jax.train", "mmbert_jax.model", "data_pipeline.pipeline"} <= set(graph)  # the walk found them
  try:
    order = list(graphlib.TopologicalSorter(graph).static_order())
  except graphlib.CycleError as e:
    pytest.fail(f"import cycle: {' → '.join(e.args[1])}")
  assert set(order) == set(graph)


def test_cycle_detection_sees_a_cycle():
  graph = _graph()
  graph["mmbert_jax.model"].add("mmbert_jax.train")  # what `from mmbert_jax import train` in model.py would add
  with pytest.raises(graphlib.CycleError):
    list(graphlib.TopologicalSorter(graph).static_order())


def test_layers_import_downwards_only():
  graph = _graph()
  layer = {m: i for i, names in enumerate(LAYERS) for m in names}
  assert set(layer) <= set(graph), sorted(set(layer) - set(graph))
  upward = [
    f"{m} (layer {layer[m]}) imports {d} (layer {layer[d]})"
    for m, deps in graph.items()
    if m in layer
    for d in deps
    if d in layer and layer[d] > layer[m]
  ]
  assert not upward, upward


def test_imports_inside_functions_are_optional_dependencies_only():
  found = []
  for module, path in _modules().items():
    for name, lazy in _imports(path, module):
      if lazy and name and (module, name.split(".")[0]) not in LAZY_ALLOWED:
        found.append(f"{module}: {name}")
  assert not found, f"imports inside functions: {sorted(set(found))}"
