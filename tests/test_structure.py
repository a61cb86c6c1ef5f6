"""The package's shape: imports point one way, the config is a leaf, the CLI
loads no JAX, only `train` imports the loop, the public API resolves, and no
test file imports another."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import pixelrnn_jax

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pixelrnn_jax"


def _module_name(path: Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, *, top_level_only: bool = False) -> dict[str, list[str]]:
  """Package modules a file imports -> the functions that import them ("" = module level)."""
  tree = ast.parse(path.read_text())
  found: dict[str, list[str]] = {}

  def add(name, where):
    while name and name not in MODULES:  # pixelrnn_jax.training.config.Config -> the module
      name = name.rpartition(".")[0]
    if name and name != _module_name(path):
      found.setdefault(name, []).append(where)

  def walk(node, where):
    for child in ast.iter_child_nodes(node):
      inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else where
      if top_level_only and inner:
        continue
      if isinstance(child, ast.ImportFrom) and (child.module or "").startswith("pixelrnn_jax"):
        for alias in child.names:
          full = f"{child.module}.{alias.name}"
          add(full if full in MODULES else child.module, inner)
      elif isinstance(child, ast.Import):
        for alias in child.names:
          if alias.name.startswith("pixelrnn_jax"):
            add(alias.name, inner)
      walk(child, inner)

  walk(tree, "")
  return found


def test_package_imports_form_no_cycle():
  graph = {name: set(_imports(path)) - {"pixelrnn_jax"} for name, path in MODULES.items()}
  done, path = set(), []

  def visit(module):
    if module in path:
      raise AssertionError(f"import cycle: {' -> '.join(path[path.index(module) :] + [module])}")
    if module in done:
      return
    path.append(module)
    for dependency in sorted(graph[module]):
      visit(dependency)
    path.pop()
    done.add(module)

  for module in sorted(graph):
    visit(module)
  # Loading lives below the model and the trainer.
  assert "pixelrnn_jax.model_io" in graph["pixelrnn_jax.gru_classifier"]
  assert not {
    m
    for m in graph["pixelrnn_jax.model_io"]
    if m.endswith("gru_classifier") or ".training" in m or m.endswith("cli")
  }
  assert not {m for m in graph["pixelrnn_jax.gru_classifier"] if ".training" in m}


def test_training_config_is_a_leaf():
  assert set(_imports(MODULES["pixelrnn_jax.training.config"])) <= {"pixelrnn_jax"}


def test_only_the_train_command_imports_the_training_loop():
  importers = {
    name: where
    for name, path in MODULES.items()
    for imported, where in _imports(path).items()
    if imported == "pixelrnn_jax.training.loop"
  }
  outside = {
    name: where for name, where in importers.items() if not name.startswith("pixelrnn_jax.training")
  }
  assert outside == {"pixelrnn_jax.commands": ["train"]}


def test_cli_imports_no_jax_at_module_load():
  code = (
    "import sys, pixelrnn_jax.cli; pixelrnn_jax.cli.build_parser();"
    " print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'numpy', 'flax')))"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"


def test_loading_and_predicting_never_import_the_trainer():
  image = ROOT / "examples" / "seven.png"
  code = (
    "import sys; from pixelrnn_jax import cli;"
    f" code = cli.main(['predict', '--checkpoint', 'pretrained:pixel', {str(image)!r}]);"
    " print(code, [m for m in sys.modules if m.startswith('pixelrnn_jax.training.')"
    " and m != 'pixelrnn_jax.training.config' and not m.endswith('run_dir')"
    " and not m.endswith('step')])"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip().splitlines()[-1] == "0 []"


def test_the_public_api_resolves():
  for name in pixelrnn_jax.__all__:
    assert getattr(pixelrnn_jax, name) is not None, name
  assert pixelrnn_jax.load_pretrained is pixelrnn_jax.gru_classifier.load_pretrained
  with pytest.raises(AttributeError, match="no attribute 'train'"):
    pixelrnn_jax.train  # noqa: B018 (the old module is gone)


def test_no_test_file_imports_another():
  for path in (ROOT / "tests").glob("test_*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module:
        assert not node.module.startswith("tests.test_"), f"{path.name} imports {node.module}"
        if node.module == "tests":
          assert not any(a.name.startswith("test_") for a in node.names), path.name
