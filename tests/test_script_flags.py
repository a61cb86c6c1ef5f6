"""Every example and benchmark script parses its flags as the ``pixelrnn-jax`` command
does: a numeric flag out of its range, a word, ``inf`` or ``nan`` is one line naming
the flag and the value; a misspelt flag is named with the real one; a negative number
is a value. The flags and their ranges are read from each script's own parser."""

import argparse
import contextlib
import functools
import importlib.util
import io
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from pixelrnn_jax import cli

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(
  p
  for p in [*ROOT.glob("examples/*.py"), *ROOT.glob("benchmarks/*.py")]
  if "argparse" in p.read_text() or "OneLineParser" in p.read_text()
)


class _Parsed(Exception):
  def __init__(self, parser):
    super().__init__()
    self.parser = parser


@functools.cache
def _parser_of(path: Path) -> argparse.ArgumentParser:
  """The script's parser, taken when its ``main`` asks it to parse (nothing runs)."""

  def capture(self, args=None, namespace=None):
    raise _Parsed(self)

  spec = importlib.util.spec_from_file_location(f"script_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  with pytest.MonkeyPatch.context() as monkeypatch, pytest.raises(_Parsed) as parsed:
    monkeypatch.setattr(cli.OneLineParser, "parse_args", capture)
    module.main([])
  return parsed.value.parser


def _numeric_flags(parser):
  return [
    (action.option_strings[-1], action.type)
    for action in parser._actions
    if hasattr(action.type, "minimum")
  ]


def _required(parser) -> list[str]:
  """Values for the required flags, so that only the flag under test can fail."""
  words = []
  for action in parser._actions:
    if action.required and action.option_strings:
      value = action.type.minimum if hasattr(action.type, "minimum") else "x"
      value = sorted(action.choices)[0] if action.choices else value
      words += [action.option_strings[-1], str(value if value is not None else 1)]
  return words


def _refusal(parser, argv, capsys) -> str:
  with pytest.raises(SystemExit) as exit_:
    parser.parse_args(argv)
  assert exit_.value.code == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1, err  # one line
  return err


def test_every_script_with_flags_uses_the_one_line_parser():
  assert len(SCRIPTS) >= 9
  for path in SCRIPTS:
    text = path.read_text()
    assert "argparse.ArgumentParser(" not in text, path.name


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
@settings(
  max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)  # capsys is read (and so emptied) by each example
@given(data=st.data())
def test_a_numeric_flag_out_of_its_range_is_one_line_naming_it(path, data, capsys):
  parser = _parser_of(path)
  flags = _numeric_flags(parser)
  assert flags, f"{path.name} has no numeric flag"
  flag, kind = data.draw(st.sampled_from(flags))
  bad = []
  if kind.minimum is not None:
    bad.append(st.floats(max_value=kind.minimum, exclude_max=True, allow_nan=False))
  if kind.maximum is not None:
    bad.append(st.floats(min_value=kind.maximum, exclude_min=True, allow_nan=False))
  bad.append(st.sampled_from([math.inf, -math.inf, math.nan]))
  value = data.draw(st.one_of(bad))
  text = repr(value) if math.isfinite(value) else str(value)
  word = data.draw(st.sampled_from([text, "ten", ""]))
  err = _refusal(parser, [*_required(parser), flag, word], capsys)
  assert f"argument {flag}: expected" in err and repr(word) in err, err


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_values_in_range_are_taken_and_negative_numbers_are_values(path):
  parser = _parser_of(path)
  for flag, kind in _numeric_flags(parser):
    low = kind.minimum if kind.minimum is not None else -3
    value = kind.kind(low)
    if kind.kind is float and kind.minimum is not None and kind.minimum < 0:
      value = -1e-3  # argparse alone would take "-1e-3" for a flag
    args = parser.parse_args([*_required(parser), flag, str(value)])
    got = getattr(args, parser._option_string_actions[flag].dest)
    assert (got[0] if isinstance(got, list) else got) == value, (flag, got)


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_a_misspelt_flag_is_named_with_the_real_one(path, capsys):
  parser = _parser_of(path)
  for flag in [f for f in parser._option_string_actions if f.startswith("--")]:
    if flag == "--help":
      continue
    typo = flag[:3] + flag[4:]  # one letter dropped
    if typo in parser._option_string_actions:
      continue
    err = _refusal(parser, [typo], capsys)
    assert f"unknown flag {typo}; did you mean" in err and flag in err, err


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_a_value_outside_a_flags_choices_is_one_line_naming_them(path, capsys):
  parser = _parser_of(path)
  for action in parser._actions:
    if action.choices and action.option_strings:
      flag = action.option_strings[-1]
      err = _refusal(parser, [*_required(parser), flag, "nope"], capsys)
      assert f"argument {flag}: invalid choice: 'nope'" in err, err


def _main_of(name: str):
  spec = importlib.util.spec_from_file_location(f"main_{name}", ROOT / "benchmarks" / name)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.main


@pytest.mark.parametrize(
  "argv, said",
  [
    (["--reuse", "foo"], "argument --reuse: expected SEED=RUN_DIR"),
    (["--reuse", "0=/no/such/run"], "argument --reuse: /no/such/run: no such run directory"),
    (["--seeds", "1", "1"], "--seeds 1 1: a seed is repeated"),
  ],
)
def test_seed_spread_checks_its_seeds_and_reused_runs_before_training(argv, said, capsys):
  main = _main_of("seed_spread.py")
  with pytest.raises(SystemExit) as exit_:
    main(["--recipe", "tuned", "--seeds", "1", "--at-step", "1000", *argv])
  assert exit_.value.code == 2
  assert said in capsys.readouterr().err


def test_throughput_refuses_an_only_that_leaves_no_pixelrnn_jax_contestant(capsys):
  main = _main_of("throughput.py")
  with pytest.raises(SystemExit) as exit_:
    main(["--only", "flax", "--rounds", "1", "--no-memory", "--no-scaling", "--devices", "1"])
  assert exit_.value.code == 2
  err = capsys.readouterr().err
  assert (
    "--only flax: no pixelrnn_jax contestant is left" in err
    and "torch" not in err.split("contestants:")[0]
  )


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_two_spellings_of_one_flag_are_refused_not_silently_resolved(data):
  """``--lr 1e-3 --learning-rate 2e-3``: argparse keeps the last; the command says so."""
  commands = cli.build_parser().commands
  name = data.draw(st.sampled_from(sorted(commands)))
  parser = commands[name]
  aliased = [
    a
    for a in parser._actions
    if len(a.option_strings) > 1 and not isinstance(a, argparse._AppendAction)
  ]
  if not aliased:
    return
  action = data.draw(st.sampled_from(aliased))
  first, second = data.draw(st.permutations(action.option_strings))[:2]
  words = [first] if action.nargs == 0 else [first, "1"]
  words += [second] if action.nargs == 0 else [f"{second}=2"]
  err = io.StringIO()
  with pytest.raises(SystemExit) as exit_, contextlib.redirect_stderr(err):
    cli.build_parser().parse_args([name, *words])
  assert exit_.value.code == 2
  assert f"{first} and {second} are the same flag: give it once" in err.getvalue()


@given(data=st.data())
def test_a_library_message_names_the_commands_flags(data):
  """Messages of Config and Batches say ``batch_size=3``; the command says
  ``--batch-size 3``, a flag that ``train`` has."""
  import dataclasses

  from pixelrnn_jax.training import config as config_lib

  fields = [f.name for f in dataclasses.fields(config_lib.Config)]
  first, second = data.draw(st.lists(st.sampled_from(fields), min_size=2, max_size=2))
  value = data.draw(st.integers(-5, 5))
  said = cli.flags_named(f"{first}={value} does not fit {second}={value}; num_devices={value}")
  flag = "--" + first.replace("_", "-")
  other = "--" + second.replace("_", "-")
  assert said == f"{flag} {value} does not fit {other} {value}; num_devices={value}"
  assert {flag, other} <= set(cli.build_parser().commands["train"].flags)


_NAMED_INPUTS = {  # flag -> a value naming something that is not there
  "--checkpoint": "/nonexistent/model.msgpack",
  "--data-dir": "/nonexistent/mnist",
}
_OUTPUT_FILES = {"--json": ".json", "--out": ".png", "--missed": ".png"}  # the rest: .json
_CASES = [
  (path, flag)
  for path in SCRIPTS
  if path.stem != "seed_spread"  # its --data-dir goes to `pixelrnn-jax train` (tested there)
  for flag in [*_NAMED_INPUTS, *_OUTPUT_FILES]
  if flag in _parser_of(path).flags
]


@pytest.mark.parametrize(("path", "flag"), _CASES, ids=lambda c: getattr(c, "name", c))
def test_a_missing_input_or_output_place_is_one_line_before_any_work(
  path, flag, mnist_dir, monkeypatch, capsys, tmp_path
):
  """A script given a model or data that is not there, or told to write its report
  into a directory that is not there, says so in one line (exit 2) before its work:
  it printed a traceback, or ran the whole benchmark before failing to write."""
  monkeypatch.setenv("PIXELRNN_JAX_MNIST_DIR", mnist_dir)
  parser = _parser_of(path)
  if flag in _NAMED_INPUTS:
    value = _NAMED_INPUTS[flag]
  else:
    suffix = ".json" if path.stem in ("throughput", "processes") else _OUTPUT_FILES[flag]
    value = f"/nonexistent/dir/report{suffix}"
  argv = [*_required(parser), flag, value]
  fits = {"--out": str(tmp_path / "picture.png"), "--checkpoint": "pretrained:pixel"}
  argv = [fits.get(a, w) if w == "x" else w for a, w in zip(["", *argv], argv)]
  if "--data-dir" in parser.flags and flag != "--data-dir":
    argv += ["--data-dir", mnist_dir]
  if path.stem == "ensembles":  # two models or more
    argv += ["--checkpoint", "pretrained:anytime"]
  spec = importlib.util.spec_from_file_location(f"run_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  work = []
  monkeypatch.setattr("subprocess.Popen.__init__", lambda *a, **k: work.append(a) or 1 / 0)
  with pytest.raises(SystemExit) as exit_:
    module.main(argv)
  err = capsys.readouterr().err
  assert exit_.value.code == 2 and err.count("\n") == 1 and value in err, err
  assert "Traceback" not in err and work == []
