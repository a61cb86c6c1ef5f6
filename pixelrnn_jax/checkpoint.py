"""Single-file, self-checking msgpack checkpoints: shipped weights and runs of 0.2.

Shipped weights (``pixelrnn_jax/pretrained/*.msgpack``, written by
``export``) are one ~160 kB file each, and run directories written by
pixelrnn_jax 0.2 hold ``ckpt_<step>.msgpack`` and ``best.msgpack``; both are
read here. Training runs now checkpoint through orbax (``run_checkpoints``).

File layout: ``msgpack({"sha256": hex, "payload": bytes})`` where payload is
the msgpack of the checkpoint's state dict; a flipped or missing byte fails
the checksum instead of loading silently wrong weights. A file is written to
a temporary name, fsynced and renamed, so it is atomic on POSIX.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any

import msgpack
from flax import serialization

log = logging.getLogger(__name__)

_STEP_FILE = re.compile(r"^ckpt_(\d{8})\.msgpack$")
BEST = "best.msgpack"


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
  """Writes ``tree`` (any flax-serialisable pytree of arrays/scalars) atomically."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  payload = serialization.msgpack_serialize(serialization.to_state_dict(tree))
  blob = msgpack.packb(
      {"sha256": hashlib.sha256(payload).hexdigest(), "payload": payload}
  )
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
  except Exception as error:  # pylint: disable=broad-except
    raise CheckpointError(
        f"{path}: not a pixelrnn_jax checkpoint or truncated ({error})"
    ) from error
  if hashlib.sha256(payload).hexdigest() != digest:
    raise CheckpointError(f"{path}: checksum mismatch, the file is corrupt")
  return serialization.msgpack_restore(payload)


def step_path(directory: str | os.PathLike, step: int) -> Path:
  return Path(directory) / f"ckpt_{step:08d}.msgpack"


def step_of(path: str | os.PathLike) -> int:
  """The step in a step checkpoint's file name (``ckpt_00001500.msgpack`` -> 1500)."""
  match = _STEP_FILE.match(Path(path).name)
  if match is None:
    raise ValueError(f"{path} is not a step checkpoint (expected ckpt_NNNNNNNN.msgpack)")
  return int(match.group(1))


def step_checkpoints(directory: str | os.PathLike) -> list[Path]:
  """Step checkpoints in ``directory``, oldest first."""
  directory = Path(directory)
  if not directory.is_dir():
    return []
  return sorted(p for p in directory.iterdir() if _STEP_FILE.match(p.name))


def load_latest(directory: str | os.PathLike) -> tuple[Path, dict] | None:
  """The newest readable step checkpoint; corrupt newer ones are skipped with a warning."""
  for path in reversed(step_checkpoints(directory)):
    try:
      return path, load(path)
    except CheckpointError as error:
      log.warning("skipping unusable checkpoint: %s; falling back to an older one", error)
  return None
