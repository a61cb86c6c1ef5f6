"""The on-disk formats: orbax run checkpoints, and single-file weights.

**Run checkpoints** (:class:`RunCheckpoints`, an orbax ``CheckpointManager``
keeping the newest K and the best): ``<workdir>/checkpoints/<step>/`` with two items,

- ``state``: the train state as a flax state dict of arrays (params, optimiser
  moments, step, and the weights' EMA when the run keeps one), written by
  orbax's ``StandardSave``;
- ``meta``: JSON with the config, the data position and key, the best
  valid accuracy so far, and the SHA-256 of ``state``'s arrays, checked on
  restore: a flipped byte fails loudly instead of loading wrong weights;

and, for a step where the run evaluated on valid, orbax's metrics
``{"valid_accuracy", "step"}``. Preservation keeps the ``keep`` newest steps
and the one with the best valid accuracy (the earliest among ties).

Orbax writes a step into a temporary directory and renames it when every
item is complete, so a reader sees whole checkpoints only. In a multi-process
run every process calls :meth:`RunCheckpoints.save` at the same steps with the
same (replicated) state; process 0 writes and the others wait at orbax's
barriers. The directory must be one that every process sees (a shared file
system when the processes are on several machines).

**Single-file weights** (:func:`save`, :func:`load`): shipped weights and
``pixelrnn-jax export``'s output, ``msgpack({"sha256": hex, "payload":
bytes})`` where payload is the msgpack of a state dict ``{"state": {"params",
"step"}, "config": json}``; a flipped or missing byte fails the checksum
instead of loading silently wrong weights. A file is written to a temporary
name, fsynced and renamed, so it is atomic on POSIX.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import msgpack
import numpy as np
from flax import serialization

log = logging.getLogger(__name__)


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (a full disk, a write limit).

  The failed write's tensorstore callbacks then find orbax's event loop closed and
  print "Event loop is closed" tracebacks from C++, which Python cannot catch; ``cli``
  lets them pass, then prints its one line last and whole, and ends the process. (A
  restore captures stderr and drops them; a save does not, so that a second Ctrl-C
  during it still prints its line.)"""


FREE_SPACE_MARGIN = 1.05  # a save is refused unless the disk has this times its size free
FREE_SPACE_SLACK = 32 * 1024  # ... and this many bytes more (orbax's metadata: ~20 KB)


def _bytes_under(path: Path) -> int:
  return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


_CLOSED_MESSAGE = "Event loop is closed"
# The pieces of those tracebacks. Several threads print them at once, and their writes
# interleave even within a line, so the pieces go one by one, not as lines or blocks.
# The last line's type and message are separate writes too: another thread's text
# may land between "RuntimeError" and ": Event loop is closed".
_CLOSED_LOOP_PIECES = re.compile(
  r'File "[^"\n]*asyncio[/\\]base_events\.py", line \d+, in (?:call_soon_threadsafe|_check_closed)'
  r"|self\._check_closed\(\)"
  r"|raise RuntimeError\('Event loop is closed'\)"
  r"|(?:RuntimeError)?: Event loop is closed"
  r"|RuntimeError(?![:(])"  # a bare type name, its message gone elsewhere
)
_TRACEBACK = "Traceback (most recent call last):"


def drop_closed_loop_tracebacks(text: str) -> str:
  """``text`` without the tracebacks that end in ``RuntimeError: Event loop is closed``
  (what tensorstore's callbacks of a failed read or write print from several threads
  at once, once orbax's event loop is gone). Other lines are kept, in order, except
  blank ones; a "Traceback" header cannot say whose it is, so the first as many as
  there are closed-loop errors go (a traceback of another kind printed before them,
  in the same few milliseconds, would lose its header)."""
  closed = text.count(_CLOSED_MESSAGE) - text.count(f"('{_CLOSED_MESSAGE}')")
  if closed <= 0:
    return text
  text = _CLOSED_LOOP_PIECES.sub("", text).replace(_TRACEBACK, "", closed)
  return "".join(line for line in text.splitlines(keepends=True) if line.strip())


@contextlib.contextmanager
def _quiet_closed_loop_tracebacks(settle_s: float = 0.3):
  """Runs the block with file descriptor 2 captured, then writes back what it printed
  without tensorstore's closed-loop tracebacks (printed from C++ threads: Python cannot
  catch them). On failure it waits ``settle_s`` for the late ones first.

  Only in a single-process run: in a multi-process one, the watchdog's thread may end
  the process mid-save with its one line, which must reach the terminal."""
  try:
    saved = os.dup(2) if jax.process_count() == 1 else None
  except OSError:  # no stderr to capture: nothing to tidy
    saved = None
  if saved is None:
    yield
    return
  sys.stderr.flush()
  with tempfile.TemporaryFile() as capture:
    os.dup2(capture.fileno(), 2)
    try:
      yield
    except BaseException:
      time.sleep(settle_s)
      raise
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      capture.seek(0)
      kept = drop_closed_loop_tracebacks(capture.read().decode(errors="replace"))
      if kept:
        sys.stderr.write(kept)
        sys.stderr.flush()


class _OwnFailedReads(logging.Filter):
  """Drops asyncio's "Task exception was never retrieved" records about this run's own
  checkpoint files: orbax leaves the tasks of a failed read behind, and ``restore``
  has already reported that read, in one line."""

  def __init__(self, directory: Path):
    super().__init__()
    self.directory = str(directory)

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    if not message.startswith("Task exception was never retrieved"):
      return True
    error = record.exc_info[1] if record.exc_info else None
    return self.directory not in message + str(error)


class CheckpointError(ValueError):
  """A checkpoint file is unreadable, corrupt or not a checkpoint."""


def _write_atomic(path: Path, blob: bytes) -> None:
  partial = path.with_name(f".{path.name}.partial")
  with open(partial, "wb") as handle:
    handle.write(blob)
    handle.flush()
    os.fsync(handle.fileno())
  os.replace(partial, path)  # atomic: readers see the old file or the new one
  directory = os.open(path.parent, os.O_RDONLY)
  try:
    os.fsync(directory)
  finally:
    os.close(directory)


def save(path: str | os.PathLike, tree: Any) -> Path:
  """Writes ``tree`` (any flax-serialisable pytree of arrays/scalars) to one file, atomically."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  payload = serialization.msgpack_serialize(serialization.to_state_dict(tree))
  blob = msgpack.packb({"sha256": hashlib.sha256(payload).hexdigest(), "payload": payload})
  _write_atomic(path, blob)
  return path


def load(path: str | os.PathLike) -> dict:
  """Reads a checkpoint's state dict, verifying its checksum.

  Raises:
    CheckpointError: naming the file, when it is missing, truncated or corrupt.
  """
  path = Path(path)
  try:
    blob = path.read_bytes()
  except OSError as error:
    raise CheckpointError(f"{path}: cannot read checkpoint ({error})") from error
  try:
    outer = msgpack.unpackb(blob)
    payload, digest = outer["payload"], outer["sha256"]
  except Exception as error:  # msgpack raises many kinds on bad bytes
    raise CheckpointError(
      f"{path}: not a pixelrnn_jax weights file, or a truncated one (msgpack: {error});"
      " give a run directory, one of its checkpoints/STEP, a .msgpack written by"
      " `pixelrnn-jax export`, or pretrained:NAME"
    ) from error
  if hashlib.sha256(payload).hexdigest() != digest:
    raise CheckpointError(f"{path}: checksum mismatch, the file is corrupt")
  return serialization.msgpack_restore(payload)


# ----------------------------------------------------------------------------
# Run checkpoints (orbax)

METRIC = "valid_accuracy"
UNREADABLE = "unreadable"  # where unreadable step directories are moved, next to checkpoints/


class _OrbaxNoise(logging.Filter):
  """Drops two orbax log records: the warning at every save without metrics (here only
  evaluated steps have metrics, by design), and the traceback of its barrier thread
  when a peer process is gone (the trainer reports that itself, in one line)."""

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not (
      message.startswith("Requested `tracked_metric`")
      or "_SignalingThread.run() raised an exception" in message
    )


def _orbax():
  """orbax.checkpoint, imported on first use: reading shipped weights does not pay for it."""
  import orbax.checkpoint as ocp  # noqa: PLC0415

  if not any(isinstance(f, _OrbaxNoise) for f in logging.getLogger("absl").filters):
    logging.getLogger("absl").addFilter(_OrbaxNoise())
  return ocp


def state_digest(state: dict) -> str:
  """SHA-256 over every array of a state dict: its path, dtype, shape and bytes."""
  digest = hashlib.sha256()
  for path, leaf in sorted(
    jax.tree_util.tree_flatten_with_path(state)[0], key=lambda item: jax.tree_util.keystr(item[0])
  ):
    leaf = np.ascontiguousarray(leaf)
    digest.update(f"{jax.tree_util.keystr(path)}:{leaf.dtype.str}:{leaf.shape}".encode())
    digest.update(leaf.tobytes())
  return digest.hexdigest()


def _rank(metrics: dict) -> tuple[float, int]:
  """Higher is better: the valid accuracy, then the earlier step among ties."""
  return metrics[METRIC], -metrics["step"]


def shorten(text: str, limit: int) -> str:
  """``text`` on one line, at most about ``limit`` characters: its head and its tail
  (where orbax and tensorstore give the cause) cut at spaces, joined by an ellipsis;
  a single word longer than that is cut inside."""
  text = " ".join(text.split())
  if len(text) <= limit:
    return text
  head, tail = text[: 2 * limit // 3], text[len(text) - limit // 3 :]
  head = head.rsplit(" ", 1)[0] if " " in head else head
  tail = tail.split(" ", 1)[1] if " " in tail else tail
  return f"{head} \u2026 {tail}"


class RunCheckpoints:
  """The checkpoints of one run directory (see the module docstring).

  Args:
    directory: ``<workdir>/checkpoints``.
    keep: newest steps kept besides the best; ``None`` with ``read_only``.
    read_only: for evaluating or plotting a run: nothing is created or deleted.
  """

  def __init__(
    self, directory: str | os.PathLike, *, keep: int | None = None, read_only: bool = False
  ):
    self.directory = Path(directory).absolute()
    ocp = _orbax()
    managers = ocp.checkpoint_managers
    policy = (
      None
      if read_only
      else managers.AnyPreservationPolicy(
        [
          managers.LatestN(n=keep),
          managers.BestN(get_metric_fn=_rank, n=1, keep_checkpoints_without_metrics=False),
        ]
      )
    )
    options = ocp.CheckpointManagerOptions(
      save_interval_steps=0 if read_only else 1,
      preservation_policy=policy,
      best_fn=_rank,
      best_mode="max",
      enable_async_checkpointing=False,  # a save is ~50 ms here; simpler to reason about
      create=not read_only,
      read_only=read_only,
      cleanup_tmp_directories=not read_only,
    )
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    if read_only:  # orbax warns that a read-only manager is read-only
      absl_log.setLevel(logging.ERROR)
    try:
      self._manager = ocp.CheckpointManager(self.directory, options=options)
    finally:
      absl_log.setLevel(level)
    self._quiet = _OwnFailedReads(self.directory)
    logging.getLogger("asyncio").addFilter(self._quiet)

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The step with the best valid accuracy; None when no saved step was evaluated."""
    evaluated = [s for s in self.steps() if self._manager.metrics(s) is not None]
    return self._manager.best_step() if evaluated else None

  def path(self, step: int) -> Path:
    return self.directory / str(step)

  def save(self, step: int, state: dict, meta: dict, *, valid_accuracy: float | None = None):
    """Writes step ``step`` (every process of the run calls this at the same step).

    Args:
      state: a state dict of arrays (``flax.serialization.to_state_dict`` of the train state).
      meta: JSON-serialisable run facts (config, data position, ...).
      valid_accuracy: the valid accuracy of this state, when it was evaluated;
        the best one is preserved.
    """
    metrics = None if valid_accuracy is None else {METRIC: float(valid_accuracy), "step": step}
    meta = {**meta, "state_sha256": state_digest(state)}
    self._check_free_space(step, state)
    ocp = _orbax()
    try:  # (stderr is not captured here: a second Ctrl-C mid-save must print its line)
      self._manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        metrics=metrics,
      )
    except Exception as error:
      if jax.process_count() > 1:  # maybe a peer is gone: the trainer tells which
        raise
      reason = " ".join(str(error).split())
      reason = reason.rsplit(": ", 1)[-1] if ": " in reason else reason
      raise self._write_error(step, shorten(reason, 160)) from error

  def _write_error(self, step: int, reason: str) -> CheckpointWriteError:
    kept = [s for s in self.steps() if s != step]
    return CheckpointWriteError(
      f"could not write checkpoint step {step} in {self.directory} ({reason}): free"
      " disk space or choose another --workdir; the last complete checkpoint is "
      + (str(self.path(kept[-1])) if kept else "none (nothing saved yet)")
    )

  def _check_free_space(self, step: int, state: dict) -> None:
    """Refuses a save that would not fit on the disk, before it starts: a write that
    fails half-way leaves tensorstore's "Event loop is closed" tracebacks from C++
    (see CheckpointWriteError). The size expected is the largest checkpoint kept,
    else the state's bytes (a GRU-64's: 241 KB on disk for 222 KB of arrays), times
    FREE_SPACE_MARGIN, plus FREE_SPACE_SLACK."""
    sizes = [_bytes_under(self.path(s)) for s in self.steps()]
    leaves = jax.tree.leaves(state)  # .nbytes of device arrays: no copy to the host
    arrays = sum(getattr(leaf, "nbytes", None) or np.asarray(leaf).nbytes for leaf in leaves)
    need = int(max(sizes, default=arrays) * FREE_SPACE_MARGIN) + FREE_SPACE_SLACK
    free = shutil.disk_usage(self.directory).free
    if free < need:
      raise self._write_error(
        step, f"{free:,} bytes free on its disk, a checkpoint takes about {need:,} bytes"
      )

  def restore(self, step: int) -> tuple[dict, dict]:
    """(state dict, meta) of ``step``.

    Raises:
      CheckpointError: naming the directory, when it is missing or unreadable.
    """
    ocp = _orbax()
    try:
      with _quiet_closed_loop_tracebacks():
        restored = self._manager.restore(
          step,
          args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()),
        )
    except Exception as error:  # orbax/tensorstore raise many kinds
      # tensorstore appends its whole JSON spec after the cause: dropped
      message = shorten(str(error).split(" [tensorstore_spec=")[0], 300)
      raise CheckpointError(
        f"{self.path(step)}: unreadable checkpoint ({type(error).__name__}: {message})"
      ) from error
    state, meta = restored.state, dict(restored.meta)
    if meta.pop("state_sha256", None) != state_digest(state):
      raise CheckpointError(f"{self.path(step)}: checksum mismatch, the checkpoint is corrupt")
    return state, meta

  def restore_latest(self) -> tuple[int, dict, dict] | None:
    """The newest readable step as (step, state dict, meta); None when there is none.

    Newer steps that cannot be read are moved to ``<workdir>/unreadable/`` with a
    warning, so the resumed run can write those steps again.

    Raises:
      CheckpointError: when steps exist but none can be read (nothing is moved then).
    """
    steps = self.steps()
    failures = []
    for step in reversed(steps):
      try:
        state, meta = self.restore(step)
      except CheckpointError as error:
        log.warning("skipping %s", error)
        failures.append(step)
        continue
      if failures:
        self._set_aside(failures)
      return step, state, meta
    if steps:
      raise CheckpointError(
        f"{self.directory}: none of the checkpoints {steps} can be read (see the warnings"
        " above); move the directory away to start afresh, or choose another --workdir"
      )
    return None

  def _set_aside(self, steps: list[int]) -> None:
    aside = self.directory.parent / UNREADABLE
    if jax.process_index() == 0:
      aside.mkdir(exist_ok=True)
      for step in steps:
        target = aside / str(step)
        if target.exists():
          shutil.rmtree(target)
        self.path(step).rename(target)
        log.warning("moved the unreadable checkpoint %s to %s", self.path(step), target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # noqa: PLC0415 (multi-process runs only)

      multihost_utils.sync_global_devices("pixelrnn_jax: unreadable checkpoints set aside")
    self._manager.reload()

  def close(self) -> None:
    self._manager.close()
    logging.getLogger("asyncio").removeFilter(self._quiet)


def read_step(path: str | os.PathLike) -> tuple[int, dict, dict]:
  """(step, state dict, meta) of one step directory, ``<workdir>/checkpoints/<step>``."""
  path = Path(path)
  manager = RunCheckpoints(path.parent, read_only=True)
  try:
    state, meta = manager.restore(int(path.name))
  except CheckpointError as error:  # the fix: the newest of the run's other steps that reads
    others = [step for step in manager.steps() if step != int(path.name)]
    readable = next((step for step in reversed(others) if _reads(manager, step)), None)
    if readable is not None:
      hint = (
        f"load another of the run's checkpoints, e.g. --checkpoint {manager.path(readable)}, or"
      )
    elif others:
      hint = f"its other checkpoints ({', '.join(map(str, others))}) cannot be read either:"
    else:
      hint = "the run has no other checkpoint:"
    raise CheckpointError(
      f"{error}; {hint} train the run again (train sets unreadable checkpoints aside)"
    ) from error
  finally:
    manager.close()
  return int(path.name), state, meta


def _reads(manager: RunCheckpoints, step: int) -> bool:
  try:
    manager.restore(step)
  except CheckpointError:
    return False
  return True


def chosen_step(directory: str | os.PathLike) -> Path | None:
  """The step directory a run is loaded from: the best on valid, else the newest."""
  manager = RunCheckpoints(directory, read_only=True)
  try:
    step = manager.best_step()
    step = manager.latest_step() if step is None else step
  finally:
    manager.close()
  return None if step is None else manager.path(step)
