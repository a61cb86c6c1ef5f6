"""The peers of a multi-process run: telling them of a failure, noticing theirs,
and the one way a process of such a run leaves.

- a process that fails with an error (bad data, other settings than process
  0's, a signal before the first step) leaves its message in the
  coordination service's key-value store before it exits
  (:func:`announce_failure`); every other process's :class:`Watchdog` finds
  it within a second and ends with ``process J of N stops because process I failed``;
- a peer that dies mid-run breaks the next collective: the others raise
  :class:`PeerError` (:func:`peer_error`), naming the last complete checkpoint;
- a peer that dies while the others wait at a checkpoint's barrier, or that
  stops answering without dying, leaves them without progress: the
  :class:`Watchdog` ends a process that has made no progress for
  ``distributed_timeout`` seconds with one line, before JAX's own heartbeat
  check (at twice that) would abort it with a C++ stack trace;
- a process that has finished waits at exit until every other one has
  finished too (:func:`meet_at_exit`), so that JAX's shutdown barrier is only
  entered once all are there; a peer that fails or stalls meanwhile ends it
  with one line, and so does a Ctrl-C or SIGTERM (telling the others). Once
  all are there, these signals are ignored: the run has ended and its exit
  code stands.

Every such end goes through :func:`abort`: one line on stderr, then
``os._exit`` (a normal exit would wait at JAX's shutdown barrier for peers
that may be gone, then abort).
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
import time

import jax

from pixelrnn_jax.training import jax_internals

log = logging.getLogger(__name__)

# Exit code of a process that could not join its peers, or lost them.
PEER_FAILURE_EXIT = 1
COMMAND = "pixelrnn-jax train"  # the prefix of every line a process prints as it leaves


class PeerError(RuntimeError):
  """A collective with the other processes of the run failed: a peer died or lost its connection."""


def abort(message: str, code: int = PEER_FAILURE_EXIT) -> None:
  """Ends this process at once with ``COMMAND: error: message`` on stderr."""
  sys.stdout.flush()
  print(f"{COMMAND}: error: {message}", file=sys.stderr, flush=True)
  logging.shutdown()
  os._exit(code)


_joined = threading.Event()  # set once this process's join has completed


def mark_joined() -> None:
  _joined.set()


def joined() -> bool:
  """Whether this process has completed joining a multi-process run (safe in a signal
  handler: it reads a flag)."""
  return _joined.is_set()


def _me() -> str:
  """``process I of N``, read from the coordination state: unlike ``jax.process_index()``
  it works in the watchdog's thread while JAX shuts down at exit, when asking for a
  backend would try to start a new one (and fail with a traceback)."""
  state = jax_internals.coordination_state()
  return f"process {state.process_id or 0} of {state.num_processes or 1}"


# How a collective or barrier fails when a peer is gone: gloo's TCP errors, and
# the coordination service's status codes.
_PEER_FAILURE_SIGNS = (
  "Gloo",
  "Connection closed",
  "Connection reset",
  "UNAVAILABLE",
  "DEADLINE_EXCEEDED",
  "heartbeat",
  "Barrier",
)


def is_peer_failure(error: BaseException) -> bool:
  """Whether an exception raised during a collective or barrier says a peer is gone."""
  return jax.process_count() > 1 and any(sign in str(error) for sign in _PEER_FAILURE_SIGNS)


def leave(code: int) -> None:
  """Ends a process of a multi-process run that failed (its line already printed), at
  once: a normal exit would first wait at JAX's shutdown barrier for peers that may be
  gone (and then abort)."""
  if jax.distributed.is_initialized():
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def peer_error(error: Exception, last_checkpoint: str) -> PeerError:
  """The error for a collective that failed mid-run, naming where to resume from
  (and the peer's own message, when it announced its failure before leaving)."""
  failed = _failed_peer()
  if failed is not None:
    return PeerError(
      f"{_me()} stops because process"
      f" {failed[0]} failed: {failed[1]}. The last complete checkpoint is"
      f" {last_checkpoint}; start every process again with the same command to resume"
      " from it"
    )
  first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  return PeerError(
    f"{_me()}: an exchange with"
    f" the other processes failed ({first_line[:200]}); a peer process has stopped or lost"
    f" its connection. The last complete checkpoint is {last_checkpoint}; start every"
    " process again with the same command to resume from it"
  )


# ----------------------------------------------------------------------------
# Telling the other processes: a failing process leaves word in the coordination
# service's key-value store; every other process's Watchdog looks for it.

_FAILED = "pixelrnn_jax/failed/"


def client():
  """The coordination service's client of this process."""
  return jax_internals.coordination_state().client


def announce_failure(message: str) -> None:
  """Tells the other processes of the run that this one is ending with ``message``.

  Process 0 hosts the key-value store, so it stays for two watchdog polls
  before it may exit. Best effort: nothing is raised.
  """
  state = jax_internals.coordination_state()
  # Not while still joining: a client that is not connected yet makes JAX abort.
  if not _joined.is_set() or state.client is None or (state.num_processes or 1) < 2:
    return
  try:  # fails while still joining, or once the service is gone: then there is no one to tell
    state.client.key_value_set(f"{_FAILED}{state.process_id}", " ".join(message.split())[:500])
  except Exception:  # noqa: BLE001 (the service is gone: then there is no one to tell)
    return
  if state.process_id == 0:
    time.sleep(2.5)


_EXITING = "pixelrnn_jax/exiting/"


def meet_at_exit(timeout: float) -> None:
  """Waits until every process of the run has come to its exit, listening for a failed
  peer meanwhile, so that JAX's shutdown barrier (which aborts with a C++ stack trace
  when a peer is gone) is only entered once all are there.

  Ends this process with one line when a peer announces its failure, or when the
  others have not come within ``timeout`` seconds.
  """
  state = jax_internals.coordination_state()
  if state.client is None or (state.num_processes or 1) < 2:
    return
  try:
    state.client.key_value_set(f"{_EXITING}{state.process_id or 0}", "1")
  except Exception:  # noqa: BLE001 (the service is gone: there is no one to meet)
    return
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    failed = _failed_peer()
    if failed is not None:
      _stop_for(failed)
    if _everyone_at_exit() is not False:  # all there, or the service is gone
      return
    time.sleep(0.05)
  abort(
    f"{_me()} finished, but the other processes did not come to the end of the run"
    f" within {timeout:.0f} s (--distributed-timeout): a peer died, was stopped or"
    " lost its connection after the last checkpoint"
  )


def _everyone_at_exit() -> bool | None:
  """Whether every process has come to its exit (None: the service is gone, and JAX's
  own shutdown follows)."""
  state = jax_internals.coordination_state()
  try:
    return len(state.client.key_value_dir_get(_EXITING)) >= (state.num_processes or 1)
  except Exception:  # noqa: BLE001
    return None


def _stop_for(failed: tuple[int, str]) -> None:
  abort(f"{_me()} stops because process {failed[0]} failed: {failed[1]}")


def wait_for_key(key: str, timeout: float) -> str:
  """The value of ``key`` once some process sets it, polled from Python so that signal
  handlers run meanwhile; ends this process when another one announces a failure.

  Raises:
    TimeoutError: nothing set within ``timeout`` seconds.
  """
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    try:
      return client().key_value_try_get(key)
    except Exception:  # noqa: BLE001, S110 (not set yet: poll again)
      pass
    failed = _failed_peer()
    if failed is not None:
      _stop_for(failed)
    time.sleep(0.05)
  raise TimeoutError(f"{_me()}: no word from the other processes ({key}) within {timeout:.0f} s")


def _failed_peer() -> tuple[int, str] | None:
  """(process, message) of another process that announced its failure, if any."""
  try:
    entries = client().key_value_dir_get(_FAILED)
  except Exception:  # noqa: BLE001 (the service is gone or not reachable)
    return None
  for key, message in entries:
    process = int(key.rsplit("/", 1)[1])
    if process != (jax_internals.coordination_state().process_id or 0):
      return process, message
  return None


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
    self._closing = threading.Event()  # set at interpreter exit: the thread ends
    self._thread = threading.Thread(target=self._watch, name="pixelrnn_jax-watchdog", daemon=True)

  def progress(self) -> None:
    self._last = time.monotonic()

  def _watch(self) -> None:
    while not self._closing.wait(1.0):
      failed = _failed_peer()
      if failed is not None:
        _stop_for(failed)
      if self._done.is_set():  # after the loop: still listening for a failed peer
        continue
      silent = time.monotonic() - self._last
      if silent > self.timeout:
        abort(
          f"{_me()} made no progress for"
          f" {silent:.0f} s (--distributed-timeout {self.timeout}): it is waiting for a"
          " peer process that died, was stopped or lost its connection. The last"
          f" complete checkpoint is {self._where_to_resume()}; start every process"
          " again with the same command to resume from it"
        )

  def __enter__(self):
    if self.enabled:
      self._thread.start()
      # Registered after JAX's own exit handler, so it runs before JAX shuts down.
      atexit.register(self._close_at_exit)
    return self

  def __exit__(self, *exc):
    # The progress checks end; the thread goes on listening for a peer's failure
    # through the final evaluation, until this process exits.
    self._done.set()

  def _close_at_exit(self) -> None:
    """Stops the thread, then meets the other processes (:func:`meet_at_exit`); a
    Ctrl-C or SIGTERM meanwhile ends this one with one line, and is ignored after.

    A daemon thread still inside a call to the coordination service when the
    interpreter finalizes is unwound through C++ frames that do not allow it,
    and the process aborts ("FATAL: exception not rethrown", exit -6) after a
    run that succeeded. So the thread ends here, before the interpreter and
    JAX shut down, and the main thread listens for a failed peer from then on.
    """
    self._closing.set()
    self._thread.join()
    _set_exit_handlers(_leave_on_signal)
    meet_at_exit(self.timeout)
    # Every process has come to its exit; what is left is local teardown. Python puts
    # its signal handlers back to the default action as it finalizes, so a late
    # Ctrl-C would kill the process without a line or its own exit code (-2 where a
    # first Ctrl-C had already stopped the run with 130). Ignored, the exit code stands.
    _set_exit_handlers(signal.SIG_IGN)


def _set_exit_handlers(handler) -> None:
  for signum in (signal.SIGINT, signal.SIGTERM):
    try:
      signal.signal(signum, handler)
    except ValueError:  # not the main thread: exit handlers normally run there
      return


def _leave_on_signal(signum, frame) -> None:
  """A Ctrl-C or SIGTERM while this finished process waits for the others at exit:
  one line (as the command prints for a signal), the others told, exit 128 + signum.

  Ignored when every process has come to its exit meanwhile: the others may already
  be in JAX's shutdown barrier, where a peer that left would make them abort.
  """
  del frame
  if _everyone_at_exit() is not False:
    return
  what = "interrupted" if signum == signal.SIGINT else "terminated"
  message = f"{what} ({signal.Signals(signum).name})"
  sys.stdout.flush()
  print(f"{COMMAND}: {message}", file=sys.stderr, flush=True)
  announce_failure(message)
  logging.shutdown()
  os._exit(128 + signum)
