"""The README and docs are executed: the Python example runs, every command parses."""

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from pixelrnn_jax import cli
from pixelrnn_jax import model_io

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
# Shell lines in the README that are not this package's commands.
OTHER_COMMANDS = ("python3.12 -m venv", "pip install", "python -m pytest")


def _blocks(text, language):
  return re.findall(rf"```{language}\n(.*?)```", text, re.DOTALL)


def _package_commands(text):
  """Every `pixelrnn-jax ...` command: shell-block lines and inline code."""
  commands = [
    line
    for block in _blocks(text, "bash")
    for line in block.splitlines()
    if line.startswith("pixelrnn-jax")
  ]
  for code in re.findall(r"`([^`\n]*pixelrnn-jax [^`\n]*)`", text):
    command = code[code.index("pixelrnn-jax") :]
    if len(command.split()) > 2:  # not a bare name such as `pixelrnn-jax plot` in prose
      commands.append(command)
  return commands


def test_readme_shape():
  lines = README.read_text().splitlines()
  assert len(lines) <= 250
  assert any(line == "## Quickstart" for line in lines[:40])
  headings = [line for line in lines if line.startswith("## ")]
  assert headings == [
    "## Quickstart",
    "## Train",
    "## Use as a library",
    "## Results",
    "## Speed",
    "## Data",
    "## Tests",
  ]


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_text_speaks_of_the_software_not_its_development(path):
  text = path.read_text()
  for pattern in (
    r"\bissues? \d",
    r"\bsessions?\b",
    r"\bour (goal|aim)\b",
    r"project's (goal|aim)",
    r"PERMUTED_",
  ):
    assert not re.search(pattern, text, re.IGNORECASE), (path.name, pattern)


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_relative_links_exist(path):
  for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", path.read_text()):
    assert (path.parent / target).exists(), (path.name, target)


def test_every_shell_line_of_the_readme_is_known():
  for block in _blocks(README.read_text(), "bash"):
    for line in block.splitlines():
      assert line.startswith(("pixelrnn-jax", *OTHER_COMMANDS)), line


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_every_command_parses_into_a_valid_config(path):
  commands = _package_commands(path.read_text())
  if path == README:
    assert len(commands) >= 8
  for command in commands:
    argv = shlex.split(command, comments=True)[1:]
    try:
      args = cli.build_parser().parse_args(argv)
    except SystemExit as error:
      if error.code == 0:  # --help
        continue
      raise AssertionError(f"{path.name}: {command!r} does not parse") from error
    if args.command == "train":
      cli.config_from_flags(args)  # a recipe and flag values that validate
    for word in argv:
      if word.endswith((".png", ".jpg")) and not word.startswith("$"):
        assert (ROOT / word).exists() or "/" not in word, (command, word)


def test_readme_python_example_runs(mnist_dir, monkeypatch):
  (code,) = _blocks(README.read_text(), "python")
  monkeypatch.setenv("PIXELRNN_JAX_MNIST_DIR", mnist_dir)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(code, "README.md", "exec"), {})
  printed = out.getvalue().splitlines()
  claimed = re.search(r"labels\[:1000\]\)\)  # ([\d.]+), as recorded with the weights", code)
  recorded = model_io.card("pixel")["valid_first_1000_accuracy"]
  assert float(claimed.group(1)) == pytest.approx(recorded, abs=1e-6)  # the comment's claim
  assert float(printed[0]) == pytest.approx(recorded, abs=1e-6)
  assert printed[-1].endswith("(65, 128)")
