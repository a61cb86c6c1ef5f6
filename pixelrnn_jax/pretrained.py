"""Trained weights shipped with the package, loadable with one call.

    params = gru_classifier.load_pretrained("pixel")
    pixelrnn-jax evaluate --checkpoint pretrained:pixel

(``pixelrnn_jax.export.export`` writes them from a run.)

Each entry is ``pretrained/<name>.msgpack`` (params and config, in the
checkpoint format) and ``pretrained/<name>.json``: its SHA-256, the config it
was trained with, where it came from, and its valid accuracy, over all 5,000
valid images and over the first ``SUBSET`` (which the tests reproduce).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pixelrnn_jax import checkpoint

DIRECTORY = Path(__file__).resolve().parent / "pretrained"
PREFIX = "pretrained:"
SUBSET = 1000  # first valid images whose accuracy is recorded for a fast check


def available() -> list[str]:
  return sorted(p.stem for p in DIRECTORY.glob("*.json"))


def paths(name: str) -> tuple[Path, Path]:
  if name not in available():
    raise FileNotFoundError(
        f"no pretrained weights named {name!r}; available: {available() or 'none'}")
  return DIRECTORY / f"{name}.msgpack", DIRECTORY / f"{name}.json"


def metadata(name: str) -> dict:
  return json.loads(paths(name)[1].read_text())


def checked_path(name: str) -> Path:
  """The weights file of ``name``, after checking it against its recorded SHA-256."""
  weights, _ = paths(name)
  digest = hashlib.sha256(weights.read_bytes()).hexdigest()
  expected = metadata(name)["sha256"]
  if digest != expected:
    raise checkpoint.CheckpointError(
        f"{weights}: SHA-256 {digest} does not match the recorded {expected};"
        " reinstall the package")
  return weights
