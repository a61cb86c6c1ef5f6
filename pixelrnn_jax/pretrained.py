"""Trained weights shipped with the package, loadable with one call.

    params = gru_classifier.load_pretrained("pixel")
    pixelrnn-jax evaluate --checkpoint pretrained:pixel

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


def export(source: str | Path, name: str, *, data_dir: str | None = None,
           notes: str = "") -> dict:
  """Copies a run's best params (and config) into the package, with metadata.

  Evaluates on the valid split (all of it, and the first SUBSET images) so the
  shipped accuracy is measured, not copied.
  """
  from pixelrnn_jax import data, evaluation, train  # pylint: disable=import-outside-toplevel
  params, config, info = train.load_model(source)
  data_dir = data_dir or config.data_dir
  config = config.replace(data_dir=None)  # a path on the training machine means nothing here
  DIRECTORY.mkdir(exist_ok=True)
  weights = DIRECTORY / f"{name}.msgpack"
  checkpoint.save(weights, {"state": {"params": params, "step": info["step"]},
                            "config": config.to_json()})
  images, labels = data.load_mnist("valid", data_dir=data_dir,
                                   verify=config.verify_data, standardize=config.standardize)
  full = evaluation.evaluate(params, images, labels, order=config.order)
  subset = evaluation.evaluate(params, images[:SUBSET], labels[:SUBSET], order=config.order)
  record = {
      "name": name,
      "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
      "source": {"checkpoint": info["path"], "step": info["step"]},
      "config": json.loads(config.to_json()),
      "valid_accuracy": full["accuracy"],
      "valid_loss": full["loss"],
      f"valid_first_{SUBSET}_accuracy": subset["accuracy"],
      "notes": notes,
  }
  (DIRECTORY / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
  return record
