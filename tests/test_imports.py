"""The package graph: the input pipeline runs without JAX, no import cycles, no function-local
project imports, and the layers import only downwards (host-only, no JAX in this process)."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("anysat_jax", "input_pipeline", "configs")
DEVICE_LIBS = ("jax", "jaxlib", "flax", "optax", "orbax", "clu", "tensorflow", "torch")

def _modules() -> dict[str, pathlib.Path]:
  """Dotted name → file of every module of the project's packages."""
  out = {}
  for package in PACKAGES:
    for path in sorted((REPO / package).rglob("*.py")):
      parts = path.relative_to(REPO).with_suffix("").parts
      out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return out


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom | ast.Import) -> list[str]:
  """The modules an import statement of ``module`` names (absolute; submodules resolved)."""
  if isinstance(node, ast.Import):
    return [a.name for a in node.names]
  base = node.module or ""
  if node.level:
    is_pkg = MODULES.get(module, pathlib.Path()).name == "__init__.py"
    parent = module.split(".")[:len(module.split(".")) - node.level + is_pkg]
    base = ".".join(parent + ([base] if base else []))
  names = [f"{base}.{a.name}" for a in node.names]
  return [n if n in MODULES else base for n in names]


def _imports(module: str) -> tuple[set[str], set[str]]:
  """(module-level, function-level) imported module names of ``module``."""
  tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
  top, local = set(), set()

  def visit(node: ast.AST, in_function: bool) -> None:
    for child in ast.iter_child_nodes(node):
      if isinstance(child, ast.Import | ast.ImportFrom):
        (local if in_function else top).update(_resolve(module, child))
      visit(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef
                                                       | ast.Lambda))

  visit(tree, False)
  return top, local


IMPORTS = {m: _imports(m) for m in MODULES}


def _project(name: str) -> bool:
  return name.split(".")[0] in PACKAGES


def _with_parents(name: str) -> list[str]:
  """``a.b.c`` → the modules importing it runs: ``a``, ``a.b``, ``a.b.c`` (those that exist)."""
  parts = name.split(".")
  return [m for m in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if m in MODULES]


def _graph() -> dict[str, set[str]]:
  return {m: {p for n in top if _project(n) for p in _with_parents(n) if p != m}
          for m, (top, _) in IMPORTS.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle of ``graph`` as a list of modules, or None."""
  state: dict[str, int] = {}
  stack: list[str] = []

  def dfs(m: str) -> list[str] | None:
    state[m] = 1
    stack.append(m)
    for n in sorted(graph[m]):
      if state.get(n) == 1:
        return stack[stack.index(n):] + [n]
      if n not in state and (found := dfs(n)):
        return found
    stack.pop()
    state[m] = 2
    return None

  for m in sorted(graph):
    if m not in state and (found := dfs(m)):
      return found
  return None


def test_graph_parser_sees_imports_and_cycles():
  top, local = IMPORTS["input_pipeline.mixture"]
  assert {"input_pipeline.loader", "anysat_jax.core.streams", "grain"} <= top and not local
  assert {"anysat_jax.io.torch_pickle.reader"} <= IMPORTS["input_pipeline.datasets.treesatai_ts"][0]
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
  assert _cycle(_graph()) is None, f"import cycle: {' -> '.join(_cycle(_graph()))}"


def test_no_function_local_project_imports():
  found = {(m, n) for m, (_, local) in IMPORTS.items() for n in local if _project(n)}
  assert found == set(), "function-local project imports"


def _allowed(module: str, name: str) -> bool:
  """The layering rule: may ``module`` import ``name`` at module level?"""
  layer = module.split(".")
  if name.split(".")[0] in DEVICE_LIBS:
    return not (module.startswith(("anysat_jax.core", "anysat_jax.io", "input_pipeline"))
                or layer[0] == "configs")
  if not _project(name):
    return True
  if module.startswith("anysat_jax.core"):
    return name.startswith("anysat_jax.core")
  if module.startswith("anysat_jax.io"):
    return name.startswith(("anysat_jax.core", "anysat_jax.io"))
  if layer[0] == "input_pipeline":
    return name.startswith(("anysat_jax.core", "anysat_jax.io", "input_pipeline"))
  if layer[0] == "configs":
    return name.startswith(("configs", "anysat_jax.core", "input_pipeline.datasets"))
  return True


def test_layers_import_only_downwards():
  found = {(m, n) for m, (top, _) in IMPORTS.items() for n in top if not _allowed(m, n)}
  assert found == set(), "imports against the layering"
  assert not _allowed("input_pipeline.loader", "jax")
  assert not _allowed("anysat_jax.core.dates", "anysat_jax.models.encoder")
  assert _allowed("anysat_jax.tasks.pretrain", "input_pipeline.loader")


_NO_DEVICE_LIBS = f"""
import importlib, sys
class Refuse:
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in {DEVICE_LIBS!r}:
      raise ImportError("refused: " + name)
    return None
sys.meta_path.insert(0, Refuse())
names = sys.argv[1:]
for name in names:
  importlib.import_module(name)
from input_pipeline.datasets import registry
for dataset in registry.names():
  registry.get_spec(dataset)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {DEVICE_LIBS!r})
print("loaded:", loaded)
"""


def test_input_pipeline_imports_without_jax():
  """With JAX, Flax, TensorFlow and the rest refused at import, every module of the input
  pipeline, core, io, and the GeoPlex configs imports, and so does every dataset reader (the
  .pth ones read with anysat_jax.io.torch_pickle). (Grain imports ``jax.profiler`` when JAX
  is installed; refusing it is what a host without JAX sees.)"""
  names = sorted(m for m in MODULES if m.startswith(
      ("input_pipeline", "anysat_jax.core", "anysat_jax.io"))) + ["configs.common",
                                                                   "configs.geoplex"]
  out = subprocess.run([sys.executable, "-c", _NO_DEVICE_LIBS, *names], cwd=REPO,
                       capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
  assert out.returncode == 0, out.stderr[-3000:]
  assert "loaded: []" in out.stdout, out.stdout


def test_loader_leaves_flax_out():
  """With everything installed, the loader and the mixture load no Flax (nor TensorFlow)."""
  out = subprocess.run([sys.executable, "-c", "import sys, input_pipeline.loader, "
                        "input_pipeline.mixture; print(sorted(m for m in ('flax', 'tensorflow') "
                        "if m in sys.modules))"], cwd=REPO, capture_output=True, text=True,
                       timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip() == "[]"
