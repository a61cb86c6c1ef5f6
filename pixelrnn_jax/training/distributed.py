"""The processes of one run: joining JAX's multi-controller runtime, and failing cleanly.

A run of N processes (``--num-processes N --process-id I --coordinator-address
HOST:PORT``, the arguments of ``jax.distributed.initialize``) is one
data-parallel run over every device of every process: each process drives its
own ``--devices`` local devices, reads its slice of each global batch
(``batches.Batches``) and takes part in the pmapped step's ``lax.pmean``,
which in this JAX spans processes (gloo collectives on CPU). Without those
flags a SLURM or Open MPI job with more than one task (JAX's cluster
detection) is joined the same way; otherwise the run is one process.

Joining is bounded in time, never a hang: a process that cannot join (the
coordinator is not there, or a peer never starts) ends after
``distributed_timeout`` seconds with a message naming the coordinator; JAX
itself would abort the process with a C++ stack trace. After joining,
:func:`check_same_run` compares every process's config and run directory with
process 0's. What happens when a peer fails later is in ``peers``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import jax

from pixelrnn_jax.training import config as config_lib
from pixelrnn_jax.training import jax_internals
from pixelrnn_jax.training import peers

log = logging.getLogger(__name__)
_RUN = "pixelrnn_jax/run"

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
  for env in jax_internals.cluster_environments():
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
    raise ValueError(
      f"process_id={config.process_id} without num_processes and"
      " coordinator_address: a multi-process run needs all three flags"
      " (--num-processes, --process-id, --coordinator-address)"
    )
  return False


def _check_port_free(address: str) -> None:
  """Process 0 serves the coordinator on ``address``'s port: a port in use is a clear
  error here rather than a crash in JAX's coordination service.

  The probe sets ``SO_REUSEADDR`` as a server does, so a port held only by a
  closed connection in TIME_WAIT (after the previous run of the same command)
  counts as free; a port with a listener does not.
  """
  host, port = config_lib.check_address(address)
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  with socket.socket(family, socket.SOCK_STREAM) as probe:
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      probe.bind(("", port))
    except OSError as error:
      raise ValueError(
        f"--coordinator-address {address}: port {port} is not free on this"
        f" machine ({error.strerror}); choose another port for every"
        " process"
      ) from error


def _ended_by_timeout(config: config_lib.Config) -> None:
  who = (
    f"process {config.process_id} of {config.num_processes}"
    if None not in (config.process_id, config.num_processes)
    else "this process"
  )
  role = (
    "waited as the coordinator for the other processes"
    if config.process_id == 0
    else "could not join the coordinator"
  )
  where = config.coordinator_address or "the address the cluster environment names"
  peers.abort(
    f"{who} {role} at {where} for {config.distributed_timeout} s: every process"
    " must start with the same --num-processes and --coordinator-address (HOST:PORT"
    " of process 0, reachable from all of them) and its own --process-id; raise"
    " --distributed-timeout if they start far apart"
  )


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
  if jax_internals.backends_are_initialized():
    raise ValueError(
      "a multi-process run must join its peers before JAX starts computing;"
      " call train_and_evaluate (or jax.distributed.initialize) first in a"
      " fresh process"
    )
  if config.process_id == 0 and config.coordinator_address is not None:
    _check_port_free(config.coordinator_address)
  # Collectives between CPU processes go through gloo (TCP); GPUs use NCCL regardless.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # JAX's preemption notifier takes over SIGTERM at the C level; the trainer's
  # own handler (checkpoint, then stop every process) is the one wanted here.
  jax.config.update("jax_enable_preemption_service", False)
  timeout = config.distributed_timeout
  where = config.coordinator_address or "the address the cluster environment names"
  if config.process_id == 0 and config.num_processes:
    others = config.num_processes - 1
    log.info(
      "waiting for %d more process%s at %s (--distributed-timeout %d s)",
      others,
      "" if others == 1 else "es",
      where,
      timeout,
    )
  else:
    log.info("joining the run's coordinator at %s (--distributed-timeout %d s)", where, timeout)
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
    except BaseException as error:  # noqa: BLE001 (re-raised in the main thread below)
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
    peers.mark_joined()
  else:
    raise ValueError(
      f"cannot start a multi-process run (num_processes={config.num_processes},"
      f" process_id={config.process_id}, coordinator_address="
      f"{config.coordinator_address!r}): {str(error).rstrip('.')}; give all three flags, or run as the"
      " tasks of a SLURM or Open MPI job"
    ) from error
  if config.num_processes is not None and config.num_processes != jax.process_count():
    raise ValueError(
      f"--num-processes {config.num_processes} here, but process 0 started the run with"
      f" --num-processes {jax.process_count()}: start every process with the same"
      " --num-processes"
    )
  log.info(
    "process %d of %d joined the run (coordinator %s)",
    jax.process_index(),
    jax.process_count(),
    config.coordinator_address or "from the cluster environment",
  )
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
  mine = config_lib.run_identity(config)
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    token_file.write_text(token)
    peers.client().key_value_set(
      _RUN, json.dumps({"config": mine, "token": token, "workdir": str(workdir.absolute())})
    )
    for process in range(1, jax.process_count()):  # each one's verdict, or its failure
      peers.wait_for_key(f"{_RUN}/checked/{process}", config.distributed_timeout)
    return
  theirs = json.loads(peers.wait_for_key(_RUN, config.distributed_timeout))
  changed = sorted(k for k in mine if mine[k] != theirs["config"].get(k))
  if changed:
    details = ", ".join(
      f"--{k.replace('_', '-')} {mine[k]} here but {theirs['config'].get(k)} in process 0"
      for k in changed
    )
    raise ValueError(
      f"process {jax.process_index()} was started with other settings than"
      f" process 0 ({details}): start every process with the same flags"
      " (only --process-id and --data-dir may differ)"
    )
  try:
    found = token_file.read_text()
  except OSError:
    found = None
  if found != theirs["token"]:
    raise ValueError(
      f"--workdir {workdir} is not the run directory process 0 writes ({theirs['workdir']}"
      " on its machine): every process needs the same run directory, on a file system"
      " they all see"
    )
  peers.client().key_value_set(f"{_RUN}/checked/{jax.process_index()}", "ok")
