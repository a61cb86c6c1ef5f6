"""Multi-process training on localhost: N processes x D devices == 1 process x N*D devices.

Every run here is real: separate Python processes joined by
``jax.distributed`` (gloo collectives on CPU) through the ``train`` command,
each with a timeout so that a hung peer fails the test rather than CI.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest

from pixelrnn_jax import checkpoints
from pixelrnn_jax import cli
from pixelrnn_jax.training import batches as batches_lib
from pixelrnn_jax.training import config as config_lib
from pixelrnn_jax.training import distributed
from pixelrnn_jax.training import peers
from tests.helpers import synthetic_digits as _synthetic
from tests.helpers import write_fake_idx as _write_fake_idx

TIMEOUT_S = 120  # per run; a hang fails the test
# --distributed-timeout of the tests that wait for the watchdog: it must exceed the run's
# start (loading, joining, the first step's compilation), which took over 10 s on 2
# busy cores beside a training.
SLOW_START_TIMEOUT = 20
FLAGS = [
  "--no-verify-data",
  "--order",
  "row",
  "--units",
  "8",
  "--batch-size",
  "32",
  "--log-every",
  "5",
  "--eval-every",
  "10",
  "--checkpoint-every",
  "5",
  "--eval-batch-size",
  "200",
  "--no-progress",
]


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


def _env(tmp_path):
  return {**os.environ, "PIXELRNN_JAX_CACHE": str(tmp_path / "cache")}


def _start(tmp_path, workdir, *, processes, devices, steps, extra=(), only=None):
  """Starts the ``train`` command as ``processes`` processes (or just ranks ``only``)."""
  port = _free_port()
  command = [
    sys.executable,
    "-m",
    "pixelrnn_jax",
    "train",
    "--workdir",
    str(workdir),
    "--data-dir",
    str(tmp_path),
    *FLAGS,
    "--steps",
    str(steps),
    "--devices",
    str(devices),
    *extra,
  ]
  if processes == 1:
    ranks, flags = [0], lambda rank: []
  else:
    ranks = range(processes) if only is None else only
    flags = lambda rank: [
      "--num-processes",
      str(processes),
      "--process-id",
      str(rank),
      "--coordinator-address",
      f"localhost:{port}",
    ]
  return [
    subprocess.Popen(
      command + flags(rank),
      env=_env(tmp_path),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for rank in ranks
  ]


def _finish(procs, timeout=TIMEOUT_S):
  """(return codes, stderr texts); kills everything on timeout and fails."""
  deadline = time.monotonic() + timeout
  results = []
  for proc in procs:
    try:
      _, stderr = proc.communicate(timeout=max(1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      pytest.fail(f"a process hung past {timeout} s")
    results.append((proc.returncode, stderr))
  return [code for code, _ in results], [err for _, err in results]


def _run(tmp_path, workdir, **kwargs):
  codes, errors = _finish(_start(tmp_path, workdir, **kwargs))
  assert codes == [0] * len(codes), "\n".join(e[-3000:] for e in errors)
  return errors


def _state(workdir, step=None):
  manager = checkpoints.RunCheckpoints(workdir / "checkpoints", read_only=True)
  state, meta = manager.restore(manager.latest_step() if step is None else step)
  manager.close()
  return state, meta


def _assert_same_params(a, b, *, exact):
  for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"]), strict=True):
    if exact:
      np.testing.assert_array_equal(x, y)
    else:  # the same run up to float32 rounding of the all-reduce's summation order
      np.testing.assert_allclose(x, y, rtol=2e-6, atol=2e-7)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """1 process x 2 devices and 2 processes x 1 device, 20 steps each, same data."""
  tmp_path = tmp_path_factory.mktemp("distributed")
  _write_fake_idx(tmp_path)
  _run(tmp_path, tmp_path / "one", processes=1, devices=2, steps=20)
  _run(tmp_path, tmp_path / "two", processes=2, devices=1, steps=20)
  return tmp_path


def test_two_processes_equal_one_process_with_two_devices(runs):
  one, one_meta = _state(runs / "one", 20)
  two, two_meta = _state(runs / "two", 20)
  assert int(one["step"]) == int(two["step"]) == 20
  _assert_same_params(one, two, exact=False)
  assert one_meta["data_position"] == two_meta["data_position"]
  assert json.loads((runs / "two" / "config.json").read_text())["num_processes"] == 2


def test_evaluate_of_both_run_directories_gives_the_same_loss(runs, capsys):
  results = []
  for name in ("one", "two"):
    step_dir = runs / name / "checkpoints" / "20"  # the run directory would give its best
    assert (
      cli.main(
        [
          "evaluate",
          "--checkpoint",
          str(step_dir),
          "--data-dir",
          str(runs),
          "--no-verify-data",
          "--split",
          "valid",
          "--json",
        ]
      )
      == 0
    )
    results.append(json.loads(capsys.readouterr().out))
  assert results[0]["step"] == results[1]["step"] == 20
  np.testing.assert_allclose(results[0]["loss"], results[1]["loss"], rtol=1e-6)
  assert results[0]["accuracy"] == results[1]["accuracy"]


def test_two_processes_of_two_devices_follow_one_process_of_four(runs, tmp_path):
  """With two devices a process, gloo's all-reduce adds in another order than one
  process's: the runs agree to float32 rounding step by step. (Adam turns rounding
  differences in near-zero gradients into steps of up to the learning rate, so the
  parameters themselves drift apart by up to about steps x lr.)"""
  for name, processes, devices in (("one", 1, 4), ("two", 2, 2)):
    _run(
      runs,
      tmp_path / name,
      processes=processes,
      devices=devices,
      steps=10,
      extra=["--log-every", "1"],
    )
  records = [
    [
      json.loads(line)
      for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
      if "grad_norm" in line
    ]
    for name in ("one", "two")
  ]
  assert [r["step"] for r in records[0]] == [r["step"] for r in records[1]] == list(range(1, 11))
  for a, b in zip(*records):
    np.testing.assert_allclose([a["loss"], a["grad_norm"]], [b["loss"], b["grad_norm"]], rtol=1e-5)


def test_only_process_zero_writes_the_run_files(runs):
  lines = [json.loads(l) for l in (runs / "two" / "metrics.jsonl").read_text().splitlines()]
  steps = [l["step"] for l in lines if "split" not in l]
  assert steps == sorted(set(steps)) == [5, 10, 15, 20]  # once each, not once per process


def test_resume_of_a_two_process_run_equals_the_uninterrupted_run(runs, tmp_path):
  workdir = tmp_path / "resumed"
  _run(runs, workdir, processes=2, devices=1, steps=10)
  _run(runs, workdir, processes=2, devices=1, steps=20)
  resumed, meta = _state(workdir, 20)
  straight, straight_meta = _state(runs / "two", 20)
  _assert_same_params(resumed, straight, exact=True)
  for x, y in zip(jax.tree.leaves(resumed["opt_state"]), jax.tree.leaves(straight["opt_state"])):
    np.testing.assert_array_equal(x, y)
  for key in ("data_position", "data_key", "best_valid_accuracy"):
    assert meta[key] == straight_meta[key]


@pytest.mark.parametrize("rank", [0, 1])
def test_a_peer_that_never_joins_fails_within_the_timeout_naming_the_coordinator(tmp_path, rank):
  _write_fake_idx(tmp_path)
  start = time.monotonic()
  procs = _start(
    tmp_path,
    tmp_path / "run",
    processes=2,
    devices=1,
    steps=5,
    only=[rank],
    extra=["--distributed-timeout", "4"],
  )
  (code,), (stderr,) = _finish(procs, timeout=60)
  assert code == peers.PEER_FAILURE_EXIT, stderr[-2000:]
  assert time.monotonic() - start < 40
  port = procs[0].args[procs[0].args.index("--coordinator-address") + 1]
  assert f"process {rank} of 2" in stderr and port in stderr
  assert "Check failure stack trace" not in stderr  # ours, not JAX's abort


def _wait_for_metrics(workdir, procs, lines=1):
  deadline = time.monotonic() + TIMEOUT_S
  path = workdir / "metrics.jsonl"
  while not (path.exists() and len(path.read_text().splitlines()) >= lines):
    assert all(p.poll() is None for p in procs), _finish(procs)[1]
    assert time.monotonic() < deadline, "no metrics written in time"
    time.sleep(0.2)


def test_a_signal_to_one_process_stops_the_whole_run_with_a_checkpoint(tmp_path):
  _write_fake_idx(tmp_path)
  workdir = tmp_path / "run"
  procs = _start(
    tmp_path,
    workdir,
    processes=2,
    devices=1,
    steps=100_000,
    extra=["--checkpoint-every", "1000000", "--eval-every", "1000000"],
  )
  _wait_for_metrics(workdir, procs)
  procs[1].send_signal(signal.SIGINT)
  codes, errors = _finish(procs, timeout=60)
  assert codes == [130, 130], "\n".join(e[-2000:] for e in errors)
  assert all("Traceback" not in e for e in errors)
  stopped = [int(e.split("stopped by SIGINT at step ")[1].split(";")[0]) for e in errors]
  assert stopped[0] == stopped[1] > 5  # both at the same step
  state, _ = _state(workdir)
  assert int(state["step"]) == stopped[0]


def test_a_peer_that_dies_ends_the_others_and_the_run_resumes(tmp_path):
  _write_fake_idx(tmp_path)
  workdir = tmp_path / "run"
  procs = _start(
    tmp_path,
    workdir,
    processes=2,
    devices=1,
    steps=100_000,
    extra=["--distributed-timeout", str(SLOW_START_TIMEOUT), "--checkpoint-every", "5"],
  )
  _wait_for_metrics(workdir, procs, lines=2)
  procs[1].kill()
  killed_at = time.monotonic()
  (code, _), (stderr, _) = _finish(procs, timeout=60)
  # The gloo error at once, or the watchdog at SLOW_START_TIMEOUT s.
  assert time.monotonic() - killed_at < SLOW_START_TIMEOUT + 10
  assert code == peers.PEER_FAILURE_EXIT, stderr[-2000:]
  assert re.search("a peer process (has stopped|that died)", stderr), stderr[-2000:]
  assert "Traceback" not in stderr and "Check failure stack trace" not in stderr
  last = int(re.search(r"The last complete checkpoint is \S+/(\d+);", stderr).group(1))
  # The same command resumes from the last complete checkpoint.
  state, _ = _state(workdir)
  steps = int(state["step"]) + 5
  errors = _run(tmp_path, workdir, processes=2, devices=1, steps=steps)
  assert f"resuming from {workdir / 'checkpoints'}" in errors[0]
  assert int(state["step"]) >= last
  assert int(_state(workdir)[0]["step"]) == steps


# ---------------------------------------------------------------------------- in one process


def test_each_process_reads_its_slice_of_the_same_global_batch():
  images, labels = _synthetic(200, 3)
  key = jax.random.key(5)
  kwargs = dict(
    batch_size=24,
    key=key,
    order="row",
    max_shift=2,
    max_rotation=15,
    max_scale=0.1,
    elastic_alpha=9,
  )
  whole = batches_lib.Batches(images, labels, num_devices=4, **kwargs)
  parts = [
    batches_lib.Batches(images, labels, num_devices=2, num_processes=2, process_index=i, **kwargs)
    for i in range(2)
  ]
  for _ in range(10):  # across an epoch boundary (8 batches per epoch)
    x, y = next(whole)
    pieces = [next(p) for p in parts]
    np.testing.assert_array_equal(np.concatenate([p[0] for p in pieces]), x)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in pieces]), y)
  assert parts[0].position == parts[1].position == whole.position


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(num_processes=2, process_id=2), r"process_id=2: expected 0 \.\. num_processes - 1"),
    (dict(coordinator_address="node001"), "expected HOST:PORT"),
    (dict(num_processes=0), "num_processes=0"),
    (dict(num_processes=3, batch_size=32, devices=2), "multiple of 6"),
    (dict(distributed_timeout=0), "distributed_timeout=0"),
  ],
)
def test_bad_process_flags_are_clear_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    config_lib.Config(**kwargs)


def test_a_process_flag_typo_is_an_argparse_error(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["train", "--workdir", "x", "--num-processes", "two"])
  assert exit_info.value.code == 2
  assert "--num-processes: invalid int value: 'two'" in capsys.readouterr().err


def test_without_flags_or_a_cluster_the_run_is_one_process(monkeypatch):
  for name in ("SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "JAX_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(name, raising=False)
  assert not distributed.wanted(config_lib.Config())
  assert distributed.wanted(config_lib.Config(num_processes=2))
  assert not distributed.wanted(config_lib.Config(num_processes=1))
  config = distributed.initialize(config_lib.Config())
  assert (config.num_processes, config.process_id) == (1, 0)


def test_a_slurm_job_with_several_tasks_is_detected(monkeypatch):
  for name, value in {
    "SLURM_JOB_ID": "7",
    "SLURM_STEP_NODELIST": "node[001-002]",
    "SLURM_NTASKS": "4",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "1",
    "SLURM_STEP_NUM_NODES": "2",
  }.items():
    monkeypatch.setenv(name, value)
  assert distributed.cluster_process_count() == 4
  assert distributed.wanted(config_lib.Config())
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert not distributed.wanted(config_lib.Config())


def test_a_stopped_peer_ends_the_others_after_the_timeout(tmp_path):
  _write_fake_idx(tmp_path)
  workdir = tmp_path / "run"
  procs = _start(
    tmp_path,
    workdir,
    processes=2,
    devices=1,
    steps=100_000,
    extra=["--distributed-timeout", str(SLOW_START_TIMEOUT), "--checkpoint-every", "5"],
  )
  _wait_for_metrics(workdir, procs, lines=2)
  procs[1].send_signal(signal.SIGSTOP)  # alive, but silent
  stopped_at = time.monotonic()
  try:
    _, stderr = procs[0].communicate(timeout=60)
  finally:
    procs[1].kill()
    procs[1].communicate()
  assert procs[0].returncode == peers.PEER_FAILURE_EXIT, stderr[-2000:]
  # The watchdog counts from process 0's last finished step, which may come a little
  # before the SIGSTOP (measured: 9.98 s at a timeout of 10 s); and it fires before
  # JAX's own check at twice the timeout.
  assert SLOW_START_TIMEOUT - 1 <= time.monotonic() - stopped_at < 2 * SLOW_START_TIMEOUT - 1
  assert "made no progress for" in stderr and "Check failure stack trace" not in stderr
  assert re.search(r"The last complete checkpoint is \S+/checkpoints/\d+;", stderr)


def _start_pair(tmp_path, per_process, *, steps=20, timeout=20):
  """Processes 0 and 1 with the same flags plus each one's own ``per_process`` flags."""
  port = _free_port()
  command = [
    sys.executable,
    "-m",
    "pixelrnn_jax",
    "train",
    *FLAGS,
    "--steps",
    str(steps),
    "--devices",
    "1",
    "--num-processes",
    "2",
    "--coordinator-address",
    f"localhost:{port}",
    "--distributed-timeout",
    str(timeout),
  ]
  procs = []
  for rank, own in enumerate(per_process):
    flags = {"--workdir": str(tmp_path / "run"), "--data-dir": str(tmp_path), **own}
    procs.append(
      subprocess.Popen(
        command + ["--process-id", str(rank)] + [w for item in flags.items() for w in item],
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
      )
    )
  return procs


@pytest.mark.parametrize("failing", [0, 1])
def test_a_peer_with_bad_data_stops_before_joining_and_the_other_says_it_waits(tmp_path, failing):
  """Local checks (data, workdir, flags) come before joining: the failing process ends at
  once with its own line; the healthy one said at start what it waits for, and ends after
  --distributed-timeout with one line naming the coordinator."""
  _write_fake_idx(tmp_path)
  (tmp_path / "empty").mkdir()
  per_process = [{}, {}]
  per_process[failing] = {"--data-dir": str(tmp_path / "empty")}
  procs = _start_pair(tmp_path, per_process, timeout=8)
  start = time.monotonic()
  failing_code, failing_err = _finish([procs[failing]], timeout=60)
  assert time.monotonic() - start < 15  # at once, without waiting for its peer
  other = 1 - failing
  codes, errors = _finish([procs[other]], timeout=60)
  assert failing_code == [2] and codes == [peers.PEER_FAILURE_EXIT], (failing_err, errors)
  assert "has no train-images-idx3-ubyte" in failing_err[0]
  assert (
    "waiting for 1 more process at" if other == 0 else "joining the run's coordinator at"
  ) in errors[0]
  assert f"process {other} of 2" in errors[0] and "--distributed-timeout" in errors[0]
  assert all(
    "Check failure stack trace" not in e and "Traceback" not in e for e in [*failing_err, *errors]
  )


@pytest.mark.parametrize(
  "own, message",
  [
    ({"--batch-size": "64"}, "--batch-size 64 here but 32 in process 0"),
    ({"--devices": "2"}, "--devices 2 here but 1 in process 0"),
    ({"--lr": "0.05"}, "--learning-rate 0.05 here but 0.001 in process 0"),
    ({"--workdir": "elsewhere"}, "is not the run directory process 0 writes"),
  ],
)
def test_processes_started_with_other_settings_are_refused(tmp_path, own, message):
  _write_fake_idx(tmp_path)
  if own.get("--workdir"):
    own = {"--workdir": str(tmp_path / own["--workdir"])}
  codes, errors = _finish(_start_pair(tmp_path, [{}, own]), timeout=60)
  assert codes == [peers.PEER_FAILURE_EXIT, 2], errors
  assert message in errors[1] and message in errors[0]
  assert not (tmp_path / "run" / "checkpoints").exists() or not any(
    p.name.isdigit() for p in (tmp_path / "run" / "checkpoints").iterdir()
  )


@pytest.mark.parametrize("rank", [0, 1])  # 0 hosts the coordinator, 1 looks for it
def test_ctrl_c_while_waiting_for_peers_ends_at_once(tmp_path, rank):
  _write_fake_idx(tmp_path)
  (proc,) = _start(
    tmp_path,
    tmp_path / "run",
    processes=2,
    devices=1,
    steps=5,
    only=[rank],
    extra=["--distributed-timeout", "60"],
  )
  time.sleep(3)  # joining: the other process never comes
  proc.send_signal(signal.SIGINT)
  sent = time.monotonic()
  _, stderr = proc.communicate(timeout=30)
  assert proc.returncode == 130 and time.monotonic() - sent < 5, stderr[-2000:]
  assert "interrupted (SIGINT)" in stderr and "Check failure stack trace" not in stderr


def test_sigterm_before_the_first_step_stops_every_process(tmp_path):
  _write_fake_idx(tmp_path)
  procs = _start_pair(tmp_path, [{}, {}], steps=100_000)
  for line in procs[1].stderr:  # once it has joined: loading, restoring, compiling
    if "joined the run" in line:
      break
  procs[1].send_signal(signal.SIGTERM)
  codes, errors = _finish(procs, timeout=60)
  assert codes[1] == 143, errors  # not swallowed by JAX's preemption notifier
  assert codes[0] in (peers.PEER_FAILURE_EXIT, 143), errors
  assert all("Check failure stack trace" not in e for e in errors)


def test_process_id_alone_is_a_clear_error(monkeypatch):
  for name in ("SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri"):
    monkeypatch.delenv(name, raising=False)
  with pytest.raises(ValueError, match="needs all three flags"):
    distributed.wanted(config_lib.Config(process_id=1))


def test_a_coordinator_port_in_use_is_a_clear_error():
  with socket.socket() as busy:
    busy.bind(("", 0))
    busy.listen()
    port = busy.getsockname()[1]
    with pytest.raises(ValueError, match=f"port {port} is not free"):
      distributed._check_port_free(f"localhost:{port}")


# 0.05 s: the second Ctrl-C comes before the agreed stop; 0.8 s: after it, while
# process 0 already waits at JAX's shutdown barrier (where JAX used to abort it).
@pytest.mark.parametrize("pause", [0.05, 0.8])
def test_a_second_ctrl_c_to_one_process_ends_every_process_with_one_line(tmp_path, pause):
  _write_fake_idx(tmp_path)
  workdir = tmp_path / "run"
  procs = _start(
    tmp_path, workdir, processes=2, devices=1, steps=100_000, extra=["--distributed-timeout", "20"]
  )
  _wait_for_metrics(workdir, procs)
  procs[1].send_signal(signal.SIGINT)
  time.sleep(pause)
  if procs[1].poll() is None:
    procs[1].send_signal(signal.SIGINT)
  codes, errors = _finish(procs, timeout=60)
  assert codes[1] == 130, errors[1][-2000:]
  # Process 0 hears of it (exit 1, naming process 1's reason), or had already
  # stopped cleanly at the step the first Ctrl-C asked for (exit 130).
  assert codes[0] == 130 or (
    codes[0] == peers.PEER_FAILURE_EXIT
    and ("stops because process 1 failed: interrupted (SIGINT)" in errors[0])
  ), errors[0][-2000:]
  assert all("Traceback" not in e and "Check failure stack trace" not in e for e in errors), (
    "\n---\n".join(e[-4000:] for e in errors)
  )


def test_a_process_started_with_another_num_processes_is_refused(tmp_path):
  """JAX takes process 0's count; the process that asked for another one says so."""
  _write_fake_idx(tmp_path)
  codes, errors = _finish(_start_pair(tmp_path, [{}, {"--num-processes": "4"}]), timeout=90)
  assert codes == [peers.PEER_FAILURE_EXIT, 2], errors
  message = "--num-processes 4 here, but process 0 started the run with --num-processes 2"
  assert message in errors[1] and message in errors[0]


def test_the_port_probe_lets_a_time_wait_port_through_but_not_a_listener():
  import socket

  server = socket.socket()
  # As JAX's coordinator (gRPC) does; on Linux a TIME_WAIT port can be bound again only
  # when both its old socket and the new one set SO_REUSEADDR.
  server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  server.bind(("127.0.0.1", 0))
  server.listen()
  port = server.getsockname()[1]
  client = socket.create_connection(("127.0.0.1", port))
  accepted, _ = server.accept()
  with pytest.raises(ValueError, match=f"port {port} is not free"):
    distributed._check_port_free(f"localhost:{port}")  # a program listens there
  accepted.close()  # the server side closes first: its port sits in TIME_WAIT
  server.close()
  client.close()
  time.sleep(0.5)  # the client's FIN reaches the closed side: TIME_WAIT, nothing else
  distributed._check_port_free(f"localhost:{port}")  # the previous run's leftovers: free


@pytest.mark.parametrize(
  "address, match",
  [
    ("::1:8476", r"an IPv6 address needs brackets, e\.g\. \[::1\]:8476"),
    ("node:99999", "expected HOST:PORT"),
    (":8476", "expected HOST:PORT"),
  ],
)
def test_coordinator_addresses_are_checked_before_joining(address, match):
  with pytest.raises(ValueError, match=match):
    config_lib.Config(num_processes=2, process_id=0, coordinator_address=address)
  config_lib.Config(num_processes=2, process_id=0, coordinator_address="[::1]:8476")


def test_the_watchdog_hears_of_a_failed_peer_without_asking_jax_for_a_backend(monkeypatch, capsys):
  """At exit JAX shuts its backends down while the watchdog still listens for a failed
  peer; ``jax.process_index()`` would then try to start a backend and end the watchdog's
  thread with a traceback, and JAX's heartbeat timeout would abort the process later."""

  class Client:
    def key_value_dir_get(self, prefix):
      return [(f"{prefix}0", "own entry"), (f"{prefix}1", "interrupted (SIGINT)")]

  state = types.SimpleNamespace(client=Client(), process_id=0, num_processes=2)
  monkeypatch.setattr(peers.jax_internals, "coordination_state", lambda: state)
  for name in ("process_index", "process_count"):
    monkeypatch.setattr(jax, name, lambda *a, **k: pytest.fail("asked JAX for a backend"))

  class Exited(Exception):
    pass

  def exit_(code):
    raise Exited(code)

  monkeypatch.setattr(peers.os, "_exit", exit_)
  monkeypatch.setattr(peers.logging, "shutdown", lambda: None)  # pytest's handlers stay open
  assert peers._failed_peer() == (1, "interrupted (SIGINT)")
  with pytest.raises(Exited, match=str(peers.PEER_FAILURE_EXIT)):
    peers._stop_for(peers._failed_peer())
  assert capsys.readouterr().err.splitlines()[-1] == (
    "pixelrnn-jax train: error: process 0 of 2 stops because process 1 failed: interrupted (SIGINT)"
  )


# A process of a two-process run that only joins, runs its watchdog and exits; argv:
# process id, port, what process 1 does before it exits.
_EXIT_PROGRAM = """
import atexit, pathlib, sys, time
import jax
from pixelrnn_jax.training import config as config_lib, distributed, peers

pid, port, scenario, marks = int(sys.argv[1]), sys.argv[2], sys.argv[3], pathlib.Path(sys.argv[4])
distributed.initialize(config_lib.Config(
  num_processes=2, process_id=pid, coordinator_address=f"localhost:{port}",
  distributed_timeout=20))
real = peers._failed_peer
def busy():  # the watchdog's thread is inside a call to the coordinator nearly all the time
  for _ in range(999):
    real()
  return real()
if scenario == "clean":
  peers._failed_peer = busy
def mark(name, linger=0):  # an exit handler that tells the test where this process is
  (marks / f"{name}{pid}").touch()
  time.sleep(linger)
atexit.register(mark, "met", 2)  # runs after the watchdog's own: every process has met
with peers.Watchdog(4 if pid == 0 and scenario == "stalls" else 20, lambda: "no checkpoint"):
  jax.numpy.ones(3).block_until_ready()
  time.sleep(1.5)  # the run: the watchdog's thread starts polling after a second
atexit.register(mark, "exiting")  # runs before the watchdog's: about to meet the others
if pid == 1 and scenario == "fails":
  time.sleep(1)
  peers.announce_failure("bad data")
  peers.leave(1)
if pid == 1 and scenario in ("stalls", "interrupted"):
  time.sleep(60)
"""


def _exit_run(tmp_path, scenario, signal_at=None):
  """Runs _EXIT_PROGRAM's two processes; ``signal_at`` ("exiting" or "met", rank):
  a SIGINT to that process once its exit handler of that name has run."""
  port = _free_port()
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", _EXIT_PROGRAM, str(rank), str(port), scenario, str(tmp_path)],
      env=_env(tmp_path),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for rank in (0, 1)
  ]
  if signal_at is not None:
    name, rank = signal_at
    deadline = time.monotonic() + TIMEOUT_S
    while not (tmp_path / f"{name}{rank}").exists() and time.monotonic() < deadline:
      time.sleep(0.05)
    time.sleep(0.5)  # in the wait for the other process, or in its exit handler
    procs[rank].send_signal(signal.SIGINT)
  if scenario == "stalls":  # process 0 alone is waited for; the stalled one is killed
    try:
      _, error = procs[0].communicate(timeout=TIMEOUT_S)
    finally:
      procs[1].kill()
      procs[1].communicate()
    return [procs[0].returncode], [error]
  return _finish(procs)


def test_a_run_exits_cleanly_while_its_watchdog_is_inside_a_call_to_the_coordinator(tmp_path):
  """A daemon thread inside a coordination-service call when the interpreter finalizes
  aborted the process ("FATAL: exception not rethrown", exit -6) after a run that
  succeeded: 3 of 4 such runs before the watchdog was stopped at exit."""
  for _ in range(2):
    codes, errors = _exit_run(tmp_path, "clean")
    assert codes == [0, 0], "\n".join(e[-2000:] for e in errors)
    assert not any("FATAL" in e or "terminate called" in e for e in errors)


def test_a_peer_that_fails_after_the_other_finished_ends_it_with_one_line(tmp_path):
  codes, errors = _exit_run(tmp_path, "fails")
  assert codes == [1, 1], "\n".join(e[-2000:] for e in errors)
  assert errors[0].strip().splitlines()[-1] == (
    "pixelrnn-jax train: error: process 0 of 2 stops because process 1 failed: bad data"
  )


def test_a_peer_that_never_comes_to_the_end_ends_the_finished_one_after_the_timeout(tmp_path):
  started = time.monotonic()
  codes, errors = _exit_run(tmp_path, "stalls")
  assert codes == [1], errors[0][-2000:]
  last = errors[0].strip().splitlines()[-1]
  assert "process 0 of 2 finished, but the other processes did not come" in last
  assert "within 4 s (--distributed-timeout)" in last
  assert time.monotonic() - started < 40


def test_a_ctrl_c_while_waiting_for_the_others_at_exit_ends_with_one_line_and_tells_them(
  tmp_path,
):
  """Process 0 finished and waits at exit for process 1, which is still busy."""
  started = time.monotonic()
  codes, errors = _exit_run(tmp_path, "interrupted", signal_at=("exiting", 0))
  assert codes == [130, 1], "\n".join(e[-2000:] for e in errors)
  assert errors[0].strip().splitlines()[-1] == "pixelrnn-jax train: interrupted (SIGINT)"
  assert errors[1].strip().splitlines()[-1] == (
    "pixelrnn-jax train: error: process 1 of 2 stops because process 0 failed: interrupted (SIGINT)"
  )
  assert time.monotonic() - started < 40  # not process 1's 60 s


def test_a_ctrl_c_after_every_process_came_to_its_exit_leaves_the_exit_code_alone(tmp_path):
  """Once all processes met at exit, Python's finalizing put SIGINT back to its default
  action: a late second Ctrl-C killed a run stopped by the first (-2, no line; CI)."""
  codes, errors = _exit_run(tmp_path, "clean", signal_at=("met", 1))
  assert codes == [0, 0], "\n".join(e[-2000:] for e in errors)
  assert not any("Traceback" in e or "KeyboardInterrupt" in e for e in errors), errors[1]
