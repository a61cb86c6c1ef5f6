"""Shipping a run's best weights in the package (``pixelrnn_jax/pretrained/``).

    python -c "from pixelrnn_jax import export; export.export('runs/x', 'pixel')"
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pixelrnn_jax import checkpoint
from pixelrnn_jax import data
from pixelrnn_jax import evaluation
from pixelrnn_jax import model_io
from pixelrnn_jax import pretrained
from pixelrnn_jax import train


def export(source: str | Path, name: str, *, data_dir: str | None = None,
           notes: str = "") -> dict:
  """Copies a run's best params (and config) into the package, with metadata.

  The params are stored as trained (the checkpoint format); loading folds
  the scaling in. The accuracy is measured, not copied: the loaded model is
  evaluated on [0, 1] valid images, all of them and the first
  ``pretrained.SUBSET`` (which the tests reproduce).

  Returns:
    The metadata written to ``pretrained/<name>.json``.
  """
  saved = model_io.read(source)
  model, config, info = train.load_model(source)
  data_dir = data_dir or config.data_dir
  config = config.replace(data_dir=None)  # a path on the training machine means nothing here
  pretrained.DIRECTORY.mkdir(exist_ok=True)
  weights = pretrained.DIRECTORY / f"{name}.msgpack"
  checkpoint.save(weights, {"state": {"params": saved.arrays, "step": saved.step},
                            "config": config.to_json()})
  images, labels = data.load_mnist("valid", data_dir=data_dir, verify=config.verify_data)
  full = evaluation.evaluate(model, images, labels)
  subset = evaluation.evaluate(model, images[:pretrained.SUBSET], labels[:pretrained.SUBSET])
  record = {
      "name": name,
      "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
      "source": {"checkpoint": info["path"], "step": info["step"]},
      "config": json.loads(config.to_json()),
      "valid_accuracy": full["accuracy"],
      "valid_loss": full["loss"],
      f"valid_first_{pretrained.SUBSET}_accuracy": subset["accuracy"],
      "notes": notes,
  }
  (pretrained.DIRECTORY / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
  return record
