"""Finding and reading a saved model: a checkpoint file, a run directory, or shipped weights.

The one module that reads models from disk; ``gru_classifier.load`` builds
the model from what it returns, and the trainer, ``evaluation``, the CLI and
the plots go through that. It knows files, not models: it imports neither
the classifier nor the trainer, so every import points one way.

Accepted sources:

- ``"pretrained:<name>"``: weights shipped in the package (checksum-verified);
- a run directory (or its ``checkpoints/``): its best checkpoint on valid,
  else its newest step checkpoint;
- one orbax step directory (``checkpoints/1500``, ``run_checkpoints``);
- one msgpack checkpoint file (``best.msgpack``, ``ckpt_NNNNNNNN.msgpack``:
  shipped weights, and runs of pixelrnn_jax 0.2, whose run directories load
  as before).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from pixelrnn_jax import checkpoint
from pixelrnn_jax import pretrained


@dataclasses.dataclass(frozen=True)
class SavedModel:
  """What a saved model file holds."""

  arrays: dict[str, Any]  # the params' state dict: {"gates": {"kernel", "bias"}, ...}
  config: dict[str, Any]  # the training config's fields (config.json), as saved
  path: str  # the file read
  step: int  # optimiser steps the params were trained for


def _is_step_dir(path: Path) -> bool:
  """An orbax step directory (``checkpoints/1500`` with its ``state`` item)."""
  return path.is_dir() and path.name.isdigit() and (path / "state").is_dir()


def _has_steps(directory: Path) -> bool:
  return directory.is_dir() and any(_is_step_dir(p) for p in directory.iterdir())


def step_sources(run_dir: str | os.PathLike) -> list[Path]:
  """Every step checkpoint of a run directory, oldest first (orbax or 0.2's msgpack)."""
  directory = Path(run_dir) / "checkpoints"
  if not directory.is_dir():
    return []
  steps = sorted((p for p in directory.iterdir() if _is_step_dir(p)), key=lambda p: int(p.name))
  return steps or checkpoint.step_checkpoints(directory)


def step_of(path: Path) -> int:
  """The step of one of ``step_sources``' paths."""
  return int(path.name) if _is_step_dir(path) else checkpoint.step_of(path)


def resolve(source: str | os.PathLike) -> Path:
  """The checkpoint file a source names (see the module docstring).

  Raises:
    FileNotFoundError: naming the path, when nothing loadable is there.
    checkpoint.CheckpointError: for shipped weights whose checksum fails.
  """
  if str(source).startswith(pretrained.PREFIX):
    return pretrained.checked_path(str(source).removeprefix(pretrained.PREFIX))
  path = Path(source)
  if path.is_dir() and not _is_step_dir(path):
    directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if _has_steps(directory):  # orbax, since pixelrnn_jax 0.3
      from pixelrnn_jax import run_checkpoints  # pylint: disable=import-outside-toplevel
      return run_checkpoints.chosen_step(directory)
    if (directory / checkpoint.BEST).is_file():
      return directory / checkpoint.BEST
    latest = checkpoint.step_checkpoints(directory)
    if not latest:
      raise FileNotFoundError(
          f"{path}: no checkpoint in this run directory (expected step directories"
          f" checkpoints/<step>/, or checkpoints/{checkpoint.BEST} of an older run)")
    return latest[-1]
  if not path.exists():
    raise FileNotFoundError(
        f"{path}: no such checkpoint file or run directory (or use pretrained:NAME,"
        f" NAME one of {pretrained.available()})")
  return path


def read(source: str | os.PathLike) -> SavedModel:
  """Reads the params' arrays and training config of a saved model.

  Raises:
    FileNotFoundError: nothing loadable at ``source``.
    checkpoint.CheckpointError: a corrupt file, or one without params or config.
  """
  path = resolve(source)
  try:
    if _is_step_dir(path):
      from pixelrnn_jax import run_checkpoints  # pylint: disable=import-outside-toplevel
      step, state, meta = run_checkpoints.read_step(path)
      # The model is the weights' EMA when the run kept one (Config.ema_decay).
      config, arrays = meta["config"], state.get("ema_params") or state["params"]
    else:
      state_dict = checkpoint.load(path)
      config = json.loads(state_dict["config"])
      arrays = state_dict["state"]["params"]
      step = int(state_dict["state"]["step"])
  except (KeyError, TypeError, ValueError) as error:
    if isinstance(error, checkpoint.CheckpointError):
      raise
    raise checkpoint.CheckpointError(
        f"{path}: not a model checkpoint (no params or readable config: {error})") from error
  if not isinstance(config, dict):
    raise checkpoint.CheckpointError(f"{path}: its config is not a JSON object")
  return SavedModel(arrays=arrays, config=config, path=str(path), step=step)
