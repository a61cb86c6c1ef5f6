"""The processes of one run: joining JAX's multi-controller runtime, and failing cleanly.

A run of N processes (``--num-processes N --process-id I --coordinator-address
HOST:PORT``, the arguments of ``jax.distributed.initialize``) is one
data-parallel run over every device of every process: each process drives its
own ``--devices`` local devices, reads its slice of each global batch
(``batches.Batches``) and takes part in the pmapped step's ``lax.pmean``,
which in this JAX spans processes (gloo collectives on CPU). Without those
flags a SLURM or Open MPI job with more than one task (JAX's cluster
detection) is joined the same way; otherwise the run is one process.

Failure is bounded in time, never a hang:

- a process that cannot join (the coordinator is not there, or a peer never
  starts) ends after ``distributed_timeout`` seconds with a message naming the
  coordinator; JAX itself would abort the process with a C++ stack trace;
- a peer that dies mid-run breaks the next collective: the others raise
  :class:`PeerError` at once, naming the last complete checkpoint;
- a peer that dies while the others wait at a checkpoint's barrier, or that
  stops answering without dying, leaves them without progress: the loop's
  :class:`Watchdog` ends a process that has made no progress for
  ``distributed_timeout`` seconds with one line, before JAX's own heartbeat
  check (at twice that) would abort it with a C++ stack trace;
- a process that fails with an error (bad data, other settings than process
  0's, a signal before the first step) leaves its message in the
  coordination service's key-value store before it exits
  (:func:`announce_failure`); every other process's Watchdog finds it within
  a second and ends with ``process J of N stops because process I failed``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

import jax

from pixelrnn_jax import config as config_lib

log = logging.getLogger(__name__)

# Exit code of a process that could not join its peers, or lost them.
PEER_FAILURE_EXIT = 1


class PeerError(RuntimeError):
  """A collective with the other processes of the run failed: a peer died or lost its connection."""


# The cluster environments detected without being named: a batch scheduler's job
# variables say unambiguously how many tasks there are. (JAX also knows Kubernetes
# and Cloud TPU, which need their client libraries or a metadata server; there,
# pass the three flags.)
DETECTED_CLUSTERS = ("slurm", "ompi")


def cluster_process_count() -> int:
  """Tasks of the SLURM or Open MPI job this process runs in, 1 if none.

  Uses JAX's own detection, the one ``jax.distributed.initialize()`` applies
  when it is given no arguments.
  """
  from jax._src import clusters  # pylint: disable=import-outside-toplevel
  for env in clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
    if env.name not in DETECTED_CLUSTERS or not env.is_env_present():
      continue
    try:
      return int(env.get_process_count())
    except (KeyError, ValueError, TypeError):
      continue
  return 1


def wanted(config: config_lib.Config) -> bool:
  """Whether the run spans processes: flags say so, or a multi-task cluster job does.

  Raises:
    ValueError: ``--process-id`` alone, outside a cluster job.
  """
  if config.num_processes is not None or config.coordinator_address is not None:
    return (config.num_processes or 2) > 1
  if cluster_process_count() > 1:
    return True
  if config.process_id is not None:
    raise ValueError(f"process_id={config.process_id} without num_processes and"
                     " coordinator_address: a multi-process run needs all three flags"
                     " (--num-processes, --process-id, --coordinator-address)")
  return False


def _check_port_free(address: str) -> None:
  """Process 0 serves the coordinator on ``address``'s port: a port in use is a clear
  error here rather than a crash in JAX's coordination service."""
  port = int(address.rpartition(":")[2])
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
    try:
      probe.bind(("", port))
    except OSError as error:
      raise ValueError(f"coordinator_address={address!r}: port {port} is not free on this"
                       f" machine ({error.strerror}); choose another port for every"
                       " process") from error


def _ended_by_timeout(config: config_lib.Config) -> None:
  who = (f"process {config.process_id} of {config.num_processes}"
         if None not in (config.process_id, config.num_processes) else "this process")
  role = ("waited as the coordinator for the other processes" if config.process_id == 0
          else "could not join the coordinator")
  where = config.coordinator_address or "the address the cluster environment names"
  print(f"pixelrnn-jax train: error: {who} {role} at {where} for {config.distributed_timeout} s:"
        " every process must start with the same --num-processes and --coordinator-address"
        " (HOST:PORT of process 0, reachable from all of them) and its own --process-id;"
        " raise --distributed-timeout if they start far apart", file=sys.stderr, flush=True)
  os._exit(PEER_FAILURE_EXIT)  # pylint: disable=protected-access


def initialize(config: config_lib.Config) -> config_lib.Config:
  """Joins the run's processes (when ``wanted``) before JAX starts; returns the config
  with the effective ``num_processes`` and ``process_id``.

  Must run before any JAX computation. A process that has not joined within
  ``config.distributed_timeout`` seconds prints one line naming the
  coordinator and exits with code 1 (JAX would abort it with a stack trace).

  Raises:
    ValueError: flags that do not describe a run (a missing coordinator
      address, a process id out of range), or JAX already started.
  """
  if jax.distributed.is_initialized():  # the caller joined already
    return config.replace(num_processes=jax.process_count(), process_id=jax.process_index())
  if not wanted(config):
    return config.replace(num_processes=1, process_id=0)
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  if xla_bridge.backends_are_initialized():
    raise ValueError("a multi-process run must join its peers before JAX starts computing;"
                     " call train_and_evaluate (or jax.distributed.initialize) first in a"
                     " fresh process")
  if config.process_id == 0 and config.coordinator_address is not None:
    _check_port_free(config.coordinator_address)
  # Collectives between CPU processes go through gloo (TCP); GPUs use NCCL regardless.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # JAX's preemption notifier takes over SIGTERM at the C level; the trainer's
  # own handler (checkpoint, then stop every process) is the one wanted here.
  jax.config.update("jax_enable_preemption_service", False)
  timeout = config.distributed_timeout
  outcome = {}

  def join() -> None:
    try:
      jax.distributed.initialize(
          coordinator_address=config.coordinator_address,
          num_processes=config.num_processes,
          process_id=config.process_id,
          # JAX's own deadlines come after ours (the join deadline here, the
          # progress watchdog of the loop), so that ours end a wait with a clear line.
          initialization_timeout=timeout + 60,
          heartbeat_timeout_seconds=2 * timeout,
          shutdown_timeout_seconds=2 * timeout,
      )
    except BaseException as error:  # pylint: disable=broad-except  # re-raised below
      outcome["error"] = error

  # The join blocks in C++; in a thread of its own it leaves the main thread free
  # to run signal handlers (Ctrl-C ends a process that is still waiting at once).
  joiner = threading.Thread(target=join, name="pixelrnn_jax-join", daemon=True)
  joiner.start()
  deadline = time.monotonic() + timeout
  while joiner.is_alive():
    joiner.join(0.2)
    if joiner.is_alive() and time.monotonic() > deadline:
      _ended_by_timeout(config)
  error = outcome.get("error")
  if error is None:
    _joined.set()
  else:
    raise ValueError(
        f"cannot start a multi-process run (num_processes={config.num_processes},"
        f" process_id={config.process_id}, coordinator_address="
        f"{config.coordinator_address!r}): {error}; give all three flags, or run as the"
        " tasks of a SLURM or Open MPI job") from error
  log.info("process %d of %d joined the run (coordinator %s)", jax.process_index(),
           jax.process_count(), config.coordinator_address or "from the cluster environment")
  return config.replace(num_processes=jax.process_count(), process_id=jax.process_index())


def training_devices(devices_per_process: int) -> list:
  """The devices of the pmapped step: the first ``devices_per_process`` of every process, in
  process order, so the global device axis reads process 0's devices first."""
  chosen = []
  for process in range(jax.process_count()):
    local = sorted((d for d in jax.devices() if d.process_index == process), key=lambda d: d.id)
    chosen.extend(local[:devices_per_process])
  return chosen


def is_primary() -> bool:
  """Process 0 writes the run's files (config, metrics, final evaluation); every process
  takes part in checkpoints (orbax coordinates them)."""
  return jax.process_index() == 0


# How a collective or barrier fails when a peer is gone: gloo's TCP errors, and
# the coordination service's status codes.
_PEER_FAILURE_SIGNS = ("Gloo", "Connection closed", "Connection reset", "UNAVAILABLE",
                       "DEADLINE_EXCEEDED", "heartbeat", "Barrier")


def is_peer_failure(error: BaseException) -> bool:
  """Whether an exception raised during a collective or barrier says a peer is gone."""
  return jax.process_count() > 1 and any(sign in str(error) for sign in _PEER_FAILURE_SIGNS)


def leave(code: int) -> None:
  """Ends a process of a multi-process run that failed, at once: a normal exit would
  first wait at JAX's shutdown barrier for peers that may be gone (and then abort)."""
  if jax.distributed.is_initialized():
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)  # pylint: disable=protected-access


def peer_error(error: Exception, last_checkpoint: str) -> PeerError:
  """The error for a collective that failed mid-run, naming where to resume from
  (and the peer's own message, when it announced its failure before leaving)."""
  failed = _failed_peer()
  if failed is not None:
    return PeerError(
        f"process {jax.process_index()} of {jax.process_count()} stops because process"
        f" {failed[0]} failed: {failed[1]}. The last complete checkpoint is"
        f" {last_checkpoint}; start every process again with the same command to resume"
        " from it")
  first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  return PeerError(
      f"process {jax.process_index()} of {jax.process_count()}: an exchange with"
      f" the other processes failed ({first_line[:200]}); a peer process has stopped or lost"
      f" its connection. The last complete checkpoint is {last_checkpoint}; start every"
      " process again with the same command to resume from it")


# ----------------------------------------------------------------------------
# Telling the other processes: a failing process leaves word in the coordination
# service's key-value store; every other process's Watchdog looks for it.

_FAILED = "pixelrnn_jax/failed/"
_joined = threading.Event()  # set once this process's join has completed
_RUN = "pixelrnn_jax/run"


def _client():
  from jax._src import distributed as jax_distributed  # pylint: disable=import-outside-toplevel
  return jax_distributed.global_state.client


def joined() -> bool:
  """Whether this process has completed joining a multi-process run."""
  return _joined.is_set()


def announce_failure(message: str) -> None:
  """Tells the other processes of the run that this one is ending with ``message``.

  Process 0 hosts the key-value store, so it stays for two watchdog polls
  before it may exit. Best effort: nothing is raised.
  """
  from jax._src import distributed as jax_distributed  # pylint: disable=import-outside-toplevel
  state = jax_distributed.global_state  # not jax.process_index(): it would start a backend
  # Not while still joining: a client that is not connected yet makes JAX abort.
  if not _joined.is_set() or state.client is None or (state.num_processes or 1) < 2:
    return
  try:  # fails while still joining, or once the service is gone: then there is no one to tell
    state.client.key_value_set(f"{_FAILED}{state.process_id}", " ".join(message.split())[:500])
  except Exception:  # pylint: disable=broad-except
    return
  if state.process_id == 0:
    time.sleep(2.5)


def _stop_for(failed: tuple[int, str]) -> None:
  print(f"pixelrnn-jax train: error: process {jax.process_index()} of {jax.process_count()}"
        f" stops because process {failed[0]} failed: {failed[1]}", file=sys.stderr, flush=True)
  os._exit(PEER_FAILURE_EXIT)  # pylint: disable=protected-access


def _wait_for_key(key: str, timeout: float) -> str:
  """The value of ``key`` once some process sets it, polled from Python so that signal
  handlers run meanwhile; ends this process when another one announces a failure.

  Raises:
    TimeoutError: nothing set within ``timeout`` seconds.
  """
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    try:
      return _client().key_value_try_get(key)
    except Exception:  # pylint: disable=broad-except  # not set yet
      pass
    failed = _failed_peer()
    if failed is not None:
      _stop_for(failed)
    time.sleep(0.05)
  raise TimeoutError(f"process {jax.process_index()} of {jax.process_count()}: no word from"
                     f" the other processes ({key}) within {timeout:.0f} s")


def _failed_peer() -> tuple[int, str] | None:
  """(process, message) of another process that announced its failure, if any."""
  try:
    entries = _client().key_value_dir_get(_FAILED)
  except Exception:  # pylint: disable=broad-except
    return None
  for key, message in entries:
    process = int(key.rsplit("/", 1)[1])
    if process != jax.process_index():
      return process, message
  return None


# Config fields that may differ between the processes of one run.
_PER_PROCESS_FIELDS = ("process_id", "data_dir", "verify_data", "distributed_timeout")


def check_same_run(config: config_lib.Config, workdir: os.PathLike) -> None:
  """Checks that every process runs the same config in the same run directory.

  Process 0 publishes its config and writes a fresh token into ``workdir``;
  every other process compares the config and reads the token back, which
  proves that the run directory is shared.

  Raises:
    ValueError: naming the fields that differ from process 0's, or a run
      directory that is not the one process 0 writes.
  """
  if jax.process_count() < 2:
    return
  workdir = Path(workdir)
  token_file = workdir / ".pixelrnn_jax-run"
  mine = {k: v for k, v in json.loads(config.to_json()).items() if k not in _PER_PROCESS_FIELDS}
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    token_file.write_text(token)
    _client().key_value_set(_RUN, json.dumps({"config": mine, "token": token,
                                              "workdir": str(workdir.absolute())}))
    for process in range(1, jax.process_count()):  # each one's verdict, or its failure
      _wait_for_key(f"{_RUN}/checked/{process}", config.distributed_timeout)
    return
  theirs = json.loads(_wait_for_key(_RUN, config.distributed_timeout))
  changed = sorted(k for k in mine if mine[k] != theirs["config"].get(k))
  if changed:
    details = ", ".join(f"--{k.replace('_', '-')} {mine[k]} here but {theirs['config'].get(k)}"
                        " in process 0" for k in changed)
    raise ValueError(f"process {jax.process_index()} was started with other settings than"
                     f" process 0 ({details}): start every process with the same flags"
                     " (only --process-id and --data-dir may differ)")
  try:
    found = token_file.read_text()
  except OSError:
    found = None
  if found != theirs["token"]:
    raise ValueError(
        f"--workdir {workdir} is not the run directory process 0 writes ({theirs['workdir']}"
        " on its machine): every process needs the same run directory, on a file system"
        " they all see")
  _client().key_value_set(f"{_RUN}/checked/{jax.process_index()}", "ok")


class Watchdog:
  """Ends this process with one line when the run makes no progress for ``timeout`` s.

  The training loop calls :meth:`progress` after each step, evaluation and
  checkpoint; a longer silence in a multi-process run means a peer is gone
  or stuck and this process is waiting for it at a collective or a barrier.
  Used as a context manager; ``timeout`` must exceed the longest legitimate
  pause (the first step's compilation, an evaluation).
  """

  def __init__(self, timeout: float, where_to_resume, *, enabled: bool = True):
    self.timeout, self.enabled = timeout, enabled
    self._where_to_resume = where_to_resume  # () -> str: the last complete checkpoint
    self._last = time.monotonic()
    self._done = threading.Event()
    self._thread = threading.Thread(target=self._watch, name="pixelrnn_jax-watchdog",
                                    daemon=True)

  def progress(self) -> None:
    self._last = time.monotonic()

  def _watch(self) -> None:
    while True:
      time.sleep(1.0)
      failed = _failed_peer()
      if failed is not None:
        _stop_for(failed)
      if self._done.is_set():  # after the loop: still listening for a failed peer
        continue
      silent = time.monotonic() - self._last
      if silent > self.timeout:
        print(f"pixelrnn-jax train: error: process {jax.process_index()} of {jax.process_count()}"
              f" made no progress for {silent:.0f} s (--distributed-timeout {self.timeout}):"
              " it is waiting for a peer process that died, was stopped or lost its"
              f" connection. The last complete checkpoint is {self._where_to_resume()};"
              " start every process again with the same command to resume from it",
              file=sys.stderr, flush=True)
        os._exit(PEER_FAILURE_EXIT)  # pylint: disable=protected-access

  def __enter__(self):
    if self.enabled:
      self._thread.start()
    return self

  def __exit__(self, *exc):
    # The progress checks end; the thread (a daemon) goes on listening for a peer's
    # failure until this process exits, through the final evaluation and JAX's
    # shutdown barrier, where a peer that leaves abruptly would make JAX abort.
    self._done.set()
