"""Finding and reading a saved model, and the registry of shipped weights.

The one module that reads models from disk; ``gru_classifier.load`` builds
the model from what :func:`read` returns. It knows files, not models: it
imports neither the classifier nor the trainer, so every import points one way.

Accepted sources:

- ``"pretrained:<name>"``: weights shipped in the package
  (``pixelrnn_jax/pretrained/<name>.msgpack`` and its card ``<name>.json``,
  checked against the card's SHA-256);
- a run directory (or its ``checkpoints/``): its best checkpoint on valid,
  else its newest step;
- one step directory (``checkpoints/1500``);
- one weights file written by ``pixelrnn-jax export`` (``.msgpack``; its card,
  when present, is the ``.json`` beside it).

Adding a shipped model is a maintainer's step: ``pixelrnn-jax export RUN --out
pixelrnn_jax/pretrained/NAME.msgpack`` in a source checkout, then commit both
files (docs/design.md).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pixelrnn_jax import checkpoints
from pixelrnn_jax.checkpoints import CheckpointError

PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
PREFIX = "pretrained:"
SUBSET = 1000  # first valid images whose accuracy a card records for a fast check


@dataclasses.dataclass(frozen=True)
class SavedModel:
  """What a saved model holds."""

  arrays: dict[str, Any]  # the params' state dict: {"gates": {"kernel", "bias"}, ...}
  config: dict[str, Any]  # the training config's fields (config.json), as saved
  path: str  # the file or step directory read
  step: int  # optimiser steps the params were trained for
  card: dict[str, Any] | None = None  # the weights' card (shipped or exported), if any


# ---------------------------------------------------------------------------- shipped weights


def available() -> list[str]:
  """Names of the shipped weights (``pretrained:NAME``)."""
  return sorted(p.stem for p in PRETRAINED_DIR.glob("*.json"))


def card(name: str) -> dict:
  """The card of shipped weights: SHA-256, config, source run and step, valid accuracy.

  ``name``: ``"pixel"`` or ``"pretrained:pixel"``, as the error's hint spells it.

  Raises:
    FileNotFoundError: no shipped weights of that name.
  """
  name = name.removeprefix(PREFIX)
  if name not in available():
    close = difflib.get_close_matches(name, available(), n=1, cutoff=0.6)
    hint = f" (did you mean {PREFIX}{close[0]}?)" if close else ""
    raise FileNotFoundError(
      f"no pretrained weights named {name!r}{hint}; available: {available() or 'none'}"
    )
  return json.loads((PRETRAINED_DIR / f"{name}.json").read_text())


def checked_weights(path: Path, expected_sha256: str) -> Path:
  """``path``, after checking its bytes against the SHA-256 its card (``path`` with
  the suffix .json) records.

  Raises:
    CheckpointError: the digest differs, naming both files and the fixes.
  """
  digest = hashlib.sha256(path.read_bytes()).hexdigest()
  if digest != expected_sha256:
    raise CheckpointError(
      f"{path}: SHA-256 {digest[:12]}... does not match the recorded"
      f" {expected_sha256[:12]}... in its card {path.with_suffix('.json')}: the weights or"
      " the card are not the ones exported together (a corrupt or replaced file). Put back"
      " the pair from the same `pixelrnn-jax export`, export again, or for pretrained:NAME"
      " reinstall the package"
    )
  return path


# ---------------------------------------------------------------------------- finding and reading


def _is_step_dir(path: Path) -> bool:
  """A step directory (``checkpoints/1500`` with its ``state`` item)."""
  return path.is_dir() and path.name.isdigit() and (path / "state").is_dir()


def step_sources(run_dir: str | os.PathLike) -> list[Path]:
  """Every step directory of a run directory, oldest first."""
  directory = Path(run_dir) / "checkpoints"
  if not directory.is_dir():
    return []
  return sorted((p for p in directory.iterdir() if _is_step_dir(p)), key=lambda p: int(p.name))


def recorded_source(source: str, saved: SavedModel) -> str:
  """How a run records a model it read: shipped weights by their ``pretrained:NAME``
  (their path is one machine's installation), anything else by the path read."""
  return source if source.startswith(PREFIX) else saved.path


def absolute(source: str) -> str:
  """``source`` with a path made absolute (a run resumed from another directory
  reads the same file); ``pretrained:NAME`` and an empty source as they are."""
  if source.startswith(PREFIX) or not source.strip():
    return source
  return str(Path(source).resolve())


def resolve(source: str | os.PathLike) -> Path:
  """The weights file or step directory a source names (see the module docstring).

  Raises:
    FileNotFoundError: naming the path, when nothing loadable is there.
  """
  if str(source).startswith(PREFIX):
    name = str(source).removeprefix(PREFIX)
    card(name)  # raises for an unknown name
    return PRETRAINED_DIR / f"{name}.msgpack"
  if not str(source).strip():
    raise FileNotFoundError(
      "the checkpoint is empty: name a run directory, a weights file or"
      f" pretrained:NAME (NAME one of {available()})"
    )
  path = Path(source)
  if path.is_dir() and not _is_step_dir(path):
    if (path / "state").exists() or path.name.isdigit() and path.parent.name == "checkpoints":
      raise FileNotFoundError(
        f"{path}: a step directory without a readable checkpoint (its 'state' item is"
        f" {'not a directory' if (path / 'state').exists() else 'missing'}: cut short"
        " or damaged); name another step, or the run directory for its best"
      )
    directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if any(_is_step_dir(p) for p in directory.iterdir()):
      chosen = checkpoints.chosen_step(directory)
      if chosen is not None:
        return chosen
    broken = sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())
    raise FileNotFoundError(
      f"{path}: no checkpoint in this run directory (expected step directories"
      " checkpoints/<step>/; a run stopped before its first checkpoint has none)"
      if not broken
      else f"{path}: none of the checkpoints {broken} can be read (no 'state' directory in"
      " any: cut short or damaged)"
    )
  if not path.exists():
    raise FileNotFoundError(
      f"{path}: no such weights file or run directory (or use pretrained:NAME, NAME one"
      f" of {available()})"
    )
  return path


def _read_card(card_path: Path, weights: Path) -> dict:
  """The card beside ``weights``, a JSON object.

  Raises:
    CheckpointError: naming the card (not the weights) when it is not one.
  """
  try:
    card = json.loads(card_path.read_text())
  except (ValueError, OSError) as error:  # UnicodeDecodeError is a ValueError
    raise CheckpointError(
      f"{card_path}: the card of {weights.name} is not readable JSON ({error}); restore it,"
      " or move it away to load the weights without their card's checks"
    ) from error
  if not isinstance(card, dict):
    raise CheckpointError(f"{card_path}: the card of {weights.name} is not a JSON object")
  return card


def read(source: str | os.PathLike) -> SavedModel:
  """Reads the params' arrays, training config and card of a saved model.

  A step directory of a run that kept an EMA of its weights gives the EMA
  (what the run evaluated and selected).

  Raises:
    FileNotFoundError: nothing loadable at ``source``.
    CheckpointError: a corrupt file, a checksum mismatch, or one without
      params or config.
  """
  path = resolve(source)
  found_card = None
  if path.suffix.lower() == ".json" and path.with_suffix(".msgpack").is_file():
    raise CheckpointError(
      f"{path} is the card of {path.with_suffix('.msgpack')}, not weights: pass the .msgpack"
    )
  try:
    if _is_step_dir(path):
      step, state, meta = checkpoints.read_step(path)
      ema = state.get("ema_params")
      config, arrays = meta["config"], ema if ema is not None else state["params"]
    else:
      card_path = path.with_suffix(".json")
      if card_path.is_file():
        found_card = _read_card(card_path, path)
        if "sha256" in found_card:
          checked_weights(path, found_card["sha256"])
      state_dict = checkpoints.load(path)
      config = json.loads(state_dict["config"])
      arrays = state_dict["state"]["params"]
      step = int(state_dict["state"]["step"])
  except (KeyError, TypeError, ValueError) as error:
    if isinstance(error, CheckpointError):
      raise
    raise CheckpointError(
      f"{path}: not a model checkpoint (no params or readable config: {error})"
    ) from error
  if not isinstance(config, dict):
    raise CheckpointError(f"{path}: its config is not a JSON object")
  return SavedModel(arrays=arrays, config=config, path=str(path), step=step, card=found_card)
