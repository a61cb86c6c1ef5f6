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
  check (at twice that) would abort it with a C++ stack trace.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

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
  """Whether the run spans processes: flags say so, or a multi-task cluster job does."""
  if config.num_processes is not None or config.coordinator_address is not None:
    return (config.num_processes or 2) > 1
  return cluster_process_count() > 1


def _ended_by_timeout(config: config_lib.Config) -> None:
  who = (f"process {config.process_id} of {config.num_processes}"
         if None not in (config.process_id, config.num_processes) else "this process")
  role = ("waited as the coordinator for the other processes" if config.process_id == 0
          else "could not join the coordinator")
  where = config.coordinator_address or "the address the cluster environment names"
  print(f"pixelrnn-jax: error: {who} {role} at {where} for {config.distributed_timeout} s:"
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
  # Collectives between CPU processes go through gloo (TCP); GPUs use NCCL regardless.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  timeout = config.distributed_timeout
  watchdog = threading.Timer(timeout, _ended_by_timeout, args=(config,))
  watchdog.daemon = True
  watchdog.start()
  try:
    jax.distributed.initialize(
        coordinator_address=config.coordinator_address,
        num_processes=config.num_processes,
        process_id=config.process_id,
        # JAX's own deadlines come after ours (the join watchdog here, the
        # progress watchdog of the loop), so that ours end a wait with a clear line.
        initialization_timeout=timeout + 60,
        heartbeat_timeout_seconds=2 * timeout,
        shutdown_timeout_seconds=2 * timeout,
    )
  except (ValueError, TypeError, RuntimeError) as error:
    raise ValueError(
        f"cannot start a multi-process run (num_processes={config.num_processes},"
        f" process_id={config.process_id}, coordinator_address="
        f"{config.coordinator_address!r}): {error}; give all three flags, or run as the"
        " tasks of a SLURM or Open MPI job") from error
  finally:
    watchdog.cancel()
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


def peer_error(error: Exception, step: int, last_checkpoint: str) -> PeerError:
  """The error for a collective that failed mid-run, naming where to resume from."""
  first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  return PeerError(
      f"process {jax.process_index()} of {jax.process_count()}: step {step}'s exchange with"
      f" the other processes failed ({first_line}); a peer process has stopped or lost its"
      f" connection. The last complete checkpoint is {last_checkpoint}; start every process"
      " again with the same command to resume from it")


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
    while not self._done.wait(1.0):
      silent = time.monotonic() - self._last
      if silent > self.timeout:
        print(f"pixelrnn-jax: error: process {jax.process_index()} of {jax.process_count()}"
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
    self._done.set()
    if self.enabled:
      self._thread.join()
