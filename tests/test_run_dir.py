"""The run directory: one training command at a time, paths the checkpoint
library cannot take, a workdir that is a file, own data too small, and a run
stopped before its first log line."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pixelrnn_jax import checkpoints
from pixelrnn_jax import cli
from pixelrnn_jax.training import config as config_lib
from pixelrnn_jax.training import loop
from pixelrnn_jax.training import run_dir
from tests.helpers import SMALL
from tests.helpers import load_model
from tests.helpers import write_fake_idx

SMALL_FLAGS = [
  "--order",
  "row",
  "--units",
  "8",
  "--batch-size",
  "16",
  "--steps",
  "4",
  "--eval-every",
  "2",
  "--log-every",
  "2",
  "--eval-batch-size",
  "64",
]


def _hold_lock(workdir):
  """A second process that takes the run directory's lock and keeps it."""
  code = (
    "import sys, time; from pixelrnn_jax.training.run_dir import RunLock;"
    f" lock = RunLock({str(workdir)!r}).__enter__(); print('held', flush=True); time.sleep(600)"
  )
  holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "held"
  return holder


def test_a_second_training_on_a_held_run_directory_exits_2_and_touches_nothing(
  tmp_path, toy_data, capsys
):
  workdir = tmp_path / "run"
  holder = _hold_lock(workdir)
  try:
    before = sorted(p.name for p in workdir.iterdir())
    started = time.monotonic()
    code = cli.main(["train", "--workdir", str(workdir), *SMALL_FLAGS])
    assert code == 2 and time.monotonic() - started < 30
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"--workdir {workdir} is in use by another training command" in err[0]
    assert f"PID {holder.pid}" in err[0] and "host " in err[0] and "started 20" in err[0]
    assert sorted(p.name for p in workdir.iterdir()) == before  # no config.json, no metrics
  finally:
    holder.send_signal(signal.SIGKILL)  # dies without releasing anything itself
    holder.wait()
  # The kernel dropped the dead holder's lock: the same command now trains.
  assert cli.main(["train", "--workdir", str(workdir), *SMALL_FLAGS]) == 0
  assert not (workdir / run_dir.LOCK_HOLDER).exists()  # released at the end


def test_the_lock_is_released_after_a_failed_run(tmp_path, toy_data, monkeypatch):
  def broken_prepare(*args, **kwargs):
    raise ValueError("a planted failure")

  monkeypatch.setattr(run_dir, "prepare", broken_prepare)
  config = config_lib.Config(**SMALL)
  with pytest.raises(ValueError, match="planted"):
    loop.train_and_evaluate(config, tmp_path / "run", progress=False)
  with run_dir.RunLock(tmp_path / "run"):  # free again
    pass


@pytest.mark.parametrize("name", ["exp [1]", "a]b", "[x"])
def test_a_workdir_with_glob_brackets_is_refused_before_the_first_step(
  tmp_path, toy_data, capsys, name
):
  workdir = tmp_path / name
  assert cli.main(["train", "--workdir", str(workdir), *SMALL_FLAGS]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "square brackets" in err[0] and str(workdir) in err[0]
  assert not workdir.exists()


@pytest.mark.parametrize("name", ["exp 1", "é", "a*b", "q?", "{a,b}", "#1", "%41"])
def test_other_special_characters_in_a_workdir_train_and_load(tmp_path, toy_data, name):
  workdir = tmp_path / name
  assert cli.main(["train", "--workdir", str(workdir), *SMALL_FLAGS]) == 0
  _, _, info = load_model(workdir)  # its best step is found again
  assert info["step"] in (2, 4)
  assert (
    cli.main(
      [
        "train",
        "--workdir",
        str(workdir),
        *SMALL_FLAGS[:-8],
        "--steps",
        "6",
        "--eval-every",
        "2",
        "--log-every",
        "2",
        "--eval-batch-size",
        "64",
      ]
    )
    == 0
  )
  assert json.loads((workdir / run_dir.EVAL).read_text())["step"] == 6  # resumed to the end


def test_a_workdir_that_is_a_file_names_the_flag(tmp_path, capsys):
  workdir = tmp_path / "run.txt"
  workdir.write_text("not a directory")
  assert cli.main(["train", "--workdir", str(workdir), *SMALL_FLAGS]) == 2
  err = capsys.readouterr().err
  assert f"--workdir {workdir} is a file; expected a directory" in err
  assert workdir.read_text() == "not a directory"


def test_own_data_smaller_than_the_valid_split_says_how_mnist_is_split(tmp_path, capsys):
  own = tmp_path / "own"
  own.mkdir()
  write_fake_idx(own, n=5010)  # 5,000 valid + 10 train
  code = cli.main(
    [
      "train",
      "--workdir",
      str(tmp_path / "run"),
      "--data-dir",
      str(own),
      "--no-verify-data",
      *SMALL_FLAGS,
    ]
  )
  assert code == 2
  err = capsys.readouterr().err
  assert "the train split has 10 images, fewer than --batch-size 16" in err
  assert "first 5000 images are the valid split" in err


def test_plot_draws_a_run_stopped_before_its_first_log_line(tmp_path, toy_data, mnist_dir):
  workdir = tmp_path / "run"
  config = config_lib.Config(**{**SMALL, "steps": 2, "eval_every": 2})
  loop.train_and_evaluate(config, workdir, progress=False)
  (workdir / run_dir.METRICS).unlink()  # as if stopped before the first log line
  assert cli.main(["plot", str(workdir), "--data-dir", mnist_dir, "--examples", "20"]) == 0
  # Its other pictures; no learning curves without a logged step (an empty axis before).
  assert (workdir / "plots" / "accuracy_per_pixel.png").stat().st_size > 1000
  assert not (workdir / "plots" / "learning_curves.png").exists()


def test_read_metrics_of_a_run_without_metrics_is_empty(tmp_path):
  assert run_dir.read_metrics(tmp_path) == ([], [])
  (tmp_path / run_dir.METRICS).write_text(
    json.dumps({"step": 2, "loss": 1.0})
    + "\n"
    + json.dumps({"event": "resume", "step": 2})
    + "\n"
    + json.dumps({"step": 2, "split": "valid", "accuracy": 0.5})
    + "\n"
  )
  train_lines, valid_lines = run_dir.read_metrics(tmp_path)
  assert [line["step"] for line in train_lines] == [2] and valid_lines[0]["accuracy"] == 0.5


def test_lock_holder_file_is_removed_and_pid_is_ours_while_held(tmp_path):
  with run_dir.RunLock(tmp_path):
    holder = json.loads((tmp_path / run_dir.LOCK_HOLDER).read_text())
    assert holder["pid"] == os.getpid()
  assert not (tmp_path / run_dir.LOCK_HOLDER).exists()


def _limit_file_size():
  """In the child: files may not grow past 60 kB (a full disk, for a checkpoint's arrays)."""
  import resource

  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
  resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_keeps_the_last_one(tmp_path):
  own = tmp_path / "data"
  own.mkdir()
  write_fake_idx(own)
  flags = [
    "--data-dir",
    str(own),
    "--no-verify-data",
    "--order",
    "row",
    "--batch-size",
    "16",
    "--checkpoint-every",
    "2",
    "--eval-every",
    "100",
    "--no-progress",
  ]
  workdir = tmp_path / "run"
  command = [sys.executable, "-m", "pixelrnn_jax", "train", "--workdir", str(workdir), *flags]
  subprocess.run([*command, "--steps", "2"], check=True, capture_output=True, timeout=300)
  full = subprocess.run(
    [*command, "--steps", "4"],
    capture_output=True,
    text=True,
    timeout=300,
    preexec_fn=_limit_file_size,
  )
  assert full.returncode == 2
  # tensorstore may print "Event loop is closed" tracebacks from C++ first (not
  # catchable); the command's own line is whole, and last.
  last = full.stderr.strip().splitlines()[-1]
  assert last.startswith("pixelrnn-jax train: error: could not write checkpoint step 4"), (
    full.stderr
  )
  assert f"the last complete checkpoint is {workdir / 'checkpoints' / '2'}" in last
  _, _, info = load_model(workdir)  # step 2 is whole and loads
  assert info["step"] == 2


@pytest.mark.parametrize("workdir", ["", "  "])
def test_an_empty_workdir_is_refused(workdir, capsys):
  assert cli.main(["train", "--workdir", workdir, *SMALL_FLAGS]) == 2
  assert "--workdir is empty" in capsys.readouterr().err


def test_a_workdir_below_a_file_names_the_file(tmp_path, capsys):
  (tmp_path / "afile").write_text("x")
  assert cli.main(["train", "--workdir", str(tmp_path / "afile" / "run"), *SMALL_FLAGS]) == 2
  assert f"{tmp_path / 'afile'} is a file, so no directory can be made in it" in (
    capsys.readouterr().err
  )


def test_export_refuses_to_write_its_card_over_a_runs_config(tmp_path, toy_data, capsys):
  workdir = tmp_path / "run"
  assert cli.main(["train", "--workdir", str(workdir), *SMALL_FLAGS]) == 0
  before = (workdir / "config.json").read_text()
  code = cli.main(["export", str(workdir), "--out", str(workdir / "config.msgpack")])
  assert code == 2 and "not a weights card" in capsys.readouterr().err
  assert (workdir / "config.json").read_text() == before


def test_resuming_past_a_damaged_checkpoint_prints_no_closed_loop_tracebacks(tmp_path):
  """A step whose data files are gone is set aside with a warning; tensorstore's
  callbacks of the failed read used to print ~20 "Event loop is closed" tracebacks."""
  own = tmp_path / "data"
  own.mkdir()
  write_fake_idx(own)
  workdir = tmp_path / "run"
  command = [sys.executable, "-m", "pixelrnn_jax", "train", "--workdir", str(workdir)]
  command += ["--data-dir", str(own), "--no-verify-data", "--order", "row", "--units", "8"]
  command += ["--batch-size", "16", "--checkpoint-every", "2", "--eval-every", "100"]
  subprocess.run([*command, "--steps", "4"], check=True, capture_output=True, timeout=300)
  for path in (workdir / "checkpoints" / "4" / "state").glob("d/*"):
    path.unlink()
  resumed = subprocess.run([*command, "--steps", "6"], capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr
  assert "skipping" in resumed.stderr and "resuming from" in resumed.stderr
  assert "Traceback" not in resumed.stderr, resumed.stderr


_CLOSED = [
  "Traceback (most recent call last):\n",
  '  File "/x/asyncio/base_events.py", line 837, in call_soon_threadsafe\n',
  "    self._check_closed()\n",
  '  File "/x/asyncio/base_events.py", line 539, in _check_closed\n',
  "    raise RuntimeError('Event loop is closed')\n",
  "RuntimeError: Event loop is closed\n",
]
_LINE = (
  st.text(st.characters(codec="ascii", exclude_characters="\n\r\x0b\x0c\x1c\x1d\x1e"), min_size=1)
  .filter(str.strip)
  # (a line beginning with ":" or "(" written right after a bare "RuntimeError" would
  # read as that error's own message or call, and keep it)
  .filter(lambda line: not line.startswith((":", "(")))
)


@given(
  others=st.lists(
    st.one_of(
      _LINE.map(lambda t: t + "\n"),
      st.just('  File "a.py", line 1, in f\n'),
      st.just("ValueError: kept\n"),
    ),
    max_size=10,
  ),
  blocks=st.integers(0, 4),
  order=st.randoms(use_true_random=False),
)
def test_only_the_closed_loop_tracebacks_are_dropped_even_interleaved(others, blocks, order):
  """Threads print them at once: their writes interleave with each other (even within
  a line: indentation and text are separate writes, and so are the last line's
  "RuntimeError" and ": Event loop is closed") and with the rest."""
  pieces = []
  for line in _CLOSED:
    if line.startswith(" "):
      pieces += [line[: len(line) - len(line.lstrip())], line.lstrip()]
    elif line.startswith("RuntimeError: "):
      pieces += ["RuntimeError", line.removeprefix("RuntimeError")]
    else:
      pieces.append(line)
  streams = [list(others)] + [list(pieces) for _ in range(blocks)]
  text = []
  while any(streams):
    stream = order.choice([s for s in streams if s])
    text.append(stream.pop(0))
  got = checkpoints.drop_closed_loop_tracebacks("".join(text))
  # (an indentation written just before another line's text lands in front of it)
  assert [line.strip() for line in got.splitlines()] == [line.strip() for line in others]


def test_a_closed_loop_message_split_from_its_type_by_another_thread_is_dropped():
  """What a resume past a damaged checkpoint printed once in CI (one run in four):
  a bare "RuntimeError", another thread's header, then the message."""
  text = (
    "INFO data read\nRuntimeError    \nTraceback (most recent call last):\n"
    ": Event loop is closed\nWARNING skipping step 4\n"
  )
  assert (
    checkpoints.drop_closed_loop_tracebacks(text) == "INFO data read\nWARNING skipping step 4\n"
  )
  own = "Traceback (most recent call last):\n  raise RuntimeError('boom')\nRuntimeError: boom\n"
  assert checkpoints.drop_closed_loop_tracebacks(own) == own  # no closed loop: untouched


def test_a_traceback_of_its_own_beside_closed_loop_ones_is_kept_whole():
  own = [
    "Traceback (most recent call last):\n",
    '  File "a.py", line 1, in f\n',
    "ValueError: own\n",
  ]
  for text in (
    _CLOSED + _CLOSED + own,  # (printed before them, its header would be taken: see
    # drop_closed_loop_tracebacks)
    _CLOSED[:1] + _CLOSED[:1] + _CLOSED[1:] * 2 + own,
  ):
    assert checkpoints.drop_closed_loop_tracebacks("".join(text)) == "".join(own)


def test_a_save_the_disk_cannot_hold_is_refused_before_it_starts(tmp_path, monkeypatch):
  """Before: a full disk failed the save half-way, and tensorstore printed dozens of
  "Event loop is closed" tracebacks above the one line. Now the free space is checked
  against the last checkpoint's size (the first: the state's bytes) first."""
  import collections

  import numpy as np

  manager = checkpoints.RunCheckpoints(tmp_path / "checkpoints", keep=3)
  state = {"x": np.random.default_rng(0).random(50_000, np.float32)}  # 200,000 bytes
  manager.save(1, state, {"a": 1})
  size = checkpoints._bytes_under(manager.path(1))
  assert 100_000 < size < 200_000 + checkpoints.FREE_SPACE_SLACK  # (compressed a little)
  usage = collections.namedtuple("usage", "total used free")
  need = int(size * checkpoints.FREE_SPACE_MARGIN) + checkpoints.FREE_SPACE_SLACK
  monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda path: usage(0, 0, need - 1))
  with pytest.raises(checkpoints.CheckpointWriteError) as error:
    manager.save(2, state, {"a": 2})
  assert f"({need - 1:,} bytes free on its disk, a checkpoint takes about {need:,} bytes)" in str(
    error.value
  )
  assert str(error.value).endswith(f"the last complete checkpoint is {manager.path(1)}")
  assert manager.steps() == [1] and not manager.path(2).exists()
  monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda path: usage(0, 0, need))
  manager.save(2, state, {"a": 2})
  assert manager.steps() == [1, 2]
  manager.close()


def _flip_bytes(step_dir):
  data = max(
    (f for f in (step_dir / "state").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size
  )
  raw = bytearray(data.read_bytes())
  raw[len(raw) // 2 : len(raw) // 2 + 2] = bytes(
    b ^ 0xFF for b in raw[len(raw) // 2 : len(raw) // 2 + 2]
  )
  data.write_bytes(bytes(raw))


def test_a_corrupt_checkpoint_read_names_the_runs_other_checkpoints(tmp_path):
  """evaluate/predict/export of a run whose chosen step is corrupt: before, the error
  named the damage but no way on."""
  import numpy as np

  manager = checkpoints.RunCheckpoints(tmp_path / "checkpoints", keep=3)
  for step in (1, 2, 3):
    manager.save(step, {"x": np.random.default_rng(step).random(1000, np.float32)}, {"a": step})
  manager.close()
  _flip_bytes(tmp_path / "checkpoints" / "3")
  with pytest.raises(checkpoints.CheckpointError) as error:
    checkpoints.read_step(tmp_path / "checkpoints" / "3")
  assert str(error.value).startswith(str(tmp_path / "checkpoints" / "3"))
  assert str(error.value).endswith(
    f"; load another of the run's checkpoints, e.g. --checkpoint"
    f" {tmp_path / 'checkpoints' / '2'}, or train the run again (train sets unreadable"
    " checkpoints aside)"
  )
  assert checkpoints.read_step(tmp_path / "checkpoints" / "2")[0] == 2  # the others read
  _flip_bytes(tmp_path / "checkpoints" / "2")  # only a readable one is named: 1
  with pytest.raises(checkpoints.CheckpointError, match=r"--checkpoint \S*checkpoints/1, or"):
    checkpoints.read_step(tmp_path / "checkpoints" / "3")
  _flip_bytes(tmp_path / "checkpoints" / "1")  # none reads: no circle of suggestions
  with pytest.raises(checkpoints.CheckpointError) as error:
    checkpoints.read_step(tmp_path / "checkpoints" / "2")
  assert "; its other checkpoints (1, 3) cannot be read either: train the run again" in str(
    error.value
  )


def test_a_save_leaves_stderr_to_the_terminal(tmp_path, monkeypatch):
  """A second Ctrl-C during a save ends the process at once with its line on stderr;
  had the save captured fd 2 (as a restore does), that line would be lost."""
  import numpy as np

  manager = checkpoints.RunCheckpoints(tmp_path / "checkpoints", keep=1)
  before, seen = os.fstat(2), []
  save = manager._manager.save

  def spy(*args, **kwargs):
    seen.append(os.fstat(2))
    return save(*args, **kwargs)

  monkeypatch.setattr(manager._manager, "save", spy)
  manager.save(1, {"x": np.zeros(2, np.float32)}, {"a": 1})
  manager.close()
  assert (seen[0].st_dev, seen[0].st_ino) == (before.st_dev, before.st_ino)


@given(
  records=st.lists(
    st.fixed_dictionaries({"step": st.integers(1, 10**6), "loss": st.floats(0, 10)}),
    min_size=1,
    max_size=6,
  ),
  cut=st.integers(1, 10**6),
)
def test_a_last_metrics_line_cut_short_is_dropped_and_any_other_bad_line_is_named(
  records, cut, tmp_path_factory
):
  """A kill or a full disk in the middle of an append leaves a torn last line: plot and
  resume failed on it with the JSON parser's words ('Expecting ',' delimiter: line 1
  column 26'), naming neither the file nor the line."""
  workdir = tmp_path_factory.mktemp("run")
  whole = "".join(json.dumps(r) + "\n" for r in records)
  last = json.dumps({"step": 10**7, "loss": 0.25})
  torn = last[: 1 + cut % (len(last) - 1)]  # never the whole line
  (workdir / "metrics.jsonl").write_text(whole + torn)
  assert run_dir.metrics_records(workdir) == records
  assert run_dir.read_metrics(workdir)[0] == records
  # The same bytes inside the file, followed by more lines: not a torn append.
  (workdir / "metrics.jsonl").write_text(torn + "\n" + whole)
  with pytest.raises(ValueError, match=r"metrics.jsonl: line 1 is not a JSON record .*delete"):
    run_dir.metrics_records(workdir)


def test_a_run_with_a_torn_metrics_line_resumes_and_plots(tmp_path, toy_data, capsys):
  config = config_lib.Config(**{**SMALL, "log_every": 1})
  loop.train_and_evaluate(config.replace(steps=4), tmp_path, progress=False)
  with open(tmp_path / "metrics.jsonl", "a") as handle:
    handle.write('{"step": 5, "loss": 0.2')  # killed mid-append
  summary = loop.train_and_evaluate(config, tmp_path, progress=False)  # 4 -> 6
  assert summary["step"] == 6
  text = (tmp_path / "metrics.jsonl").read_text()
  assert text.endswith("\n") and '"loss": 0.2\n' not in text
  assert all(json.loads(line) for line in text.splitlines())
  assert cli.main(["plot", str(tmp_path), "--out", str(tmp_path / "pictures")]) == 0
