"""A run's best weights to one file the user names, with their card.

    pixelrnn-jax export runs/tuned --out models/pixel.msgpack

writes ``models/pixel.msgpack`` (params, step and config in the single-file
format of ``checkpoints.save``) and its card ``models/pixel.json``: the
config, source and step, the valid accuracy (measured here, over all 5,000
valid images and over the first ``model_io.SUBSET``), the SHA-256 of the
weights file (``sha256``) and of the params' arrays (``params_sha256``,
``checkpoints.state_digest``: the digest a fine-tune from these weights
records in its ``init_from`` event). ``gru_classifier.load("models/pixel.msgpack")``
reads it back and checks the file's digest.

The card also records an early-exit rule (``card["early_exit"]``, read by
``calibration.EarlyExit.from_card``): a per-step temperature fitted on valid
images ``SUBSET`` .. 4999 (``calibration.fit``) and the threshold that reads
fewest pixels there while losing at most ``max_drop`` accuracy against
reading every pixel (``calibration.recommend``); then what that rule
measures on all 5,000 valid images and on the first ``SUBSET``, which the fit
and the choice never saw. The test split is never read.

Everything that can fail (reading the run, the data, the evaluation) happens
before anything is written; both files are then written to temporary names
and renamed, so a failed export leaves any existing files untouched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from pixelrnn_jax import calibration
from pixelrnn_jax import checkpoints
from pixelrnn_jax import data
from pixelrnn_jax import gru_classifier
from pixelrnn_jax import inference
from pixelrnn_jax import model_io
from pixelrnn_jax import outputs
from pixelrnn_jax.training import run_dir
from pixelrnn_jax.training import teachers as teachers_lib

log = logging.getLogger(__name__)

SUFFIX = ".msgpack"


def check_out(out: str | os.PathLike) -> Path:
  """The weights path to write: ends in ``.msgpack``, is not a directory.

  Raises:
    ValueError: naming the path and the fix.
  """
  out = Path(out)
  if out.suffix != SUFFIX:
    raise ValueError(
      f"--out {out}: expected a file name ending in {SUFFIX} (its card is"
      f" written beside it as {out.stem}.json)"
    )
  if out.is_dir():
    raise ValueError(f"--out {out}: is a directory; expected a file name ending in {SUFFIX}")
  outputs.make_dir(out.parent, f"--out {out}", "for the weights and their card")
  card = out.with_suffix(".json")
  if card.exists() and not _is_card(card):
    raise ValueError(
      f"--out {out}: its card would replace {card}, which is not a weights card (a run's"
      f" config.json or eval.json?); choose another name"
    )
  return out


def _is_card(path: Path) -> bool:
  try:
    record = json.loads(path.read_text())
  except (OSError, ValueError):
    return False
  return isinstance(record, dict) and {"sha256", "source", "config"} <= set(record)


def _provenance(saved: model_io.SavedModel) -> dict:
  """The checkpoint and step; for a fine-tuned run, also what it started from
  (its ``metrics.jsonl`` record: source, source step, params SHA-256); for a
  distilled run, its teachers (each's source, step, params SHA-256)."""
  provenance = {"checkpoint": saved.path, "step": saved.step}
  path = Path(saved.path)
  if path.parent.name != "checkpoints":
    return provenance
  started = run_dir.init_from_record(path.parent.parent)
  if started is not None:
    provenance["init_from"] = started
  taught = teachers_lib.recorded(run_dir.metrics_records(path.parent.parent))
  if taught is not None:
    provenance["distill_from"] = taught
  return provenance


def export(
  source: str | os.PathLike,
  out: str | os.PathLike,
  *,
  data_dir: str | None = None,
  notes: str | None = None,
  wall_time_s: float | None = None,
  early_exit: bool = True,
  max_drop: float = 0.0025,
) -> dict:
  """Writes a run's best weights (a run directory, a step or a weights file) to ``out``.

  The params are stored as trained (loading folds the input scaling in); the
  accuracy is measured on the loaded model, not copied.

  Args:
    source: what ``model_io.read`` accepts.
    out: the weights file to write, ``*.msgpack``; the card goes to ``*.json``.
    data_dir: MNIST IDX files for the valid evaluation (default: the run's).
    notes: free text for the card (e.g. the command that trained the run);
      None = the source card's, if it has one.
    wall_time_s: the run's training time, for the card; None = the source card's.
    early_exit: fit and record the early-exit rule (see the module's doc).
    max_drop: the rule's allowed accuracy loss on the fit images, a fraction
      in [0, 1) (0.0025 = a quarter of a point).

  Returns:
    The card written.

  Raises:
    ValueError, FileNotFoundError, CheckpointError: naming what is wrong;
      nothing is written then.
  """
  out = check_out(out)
  if not 0 <= max_drop < 1:
    raise ValueError(f"max_drop={max_drop!r}: expected a fraction in [0, 1), e.g. 0.0025")
  saved = model_io.read(source)
  source_card = saved.card or {}
  notes = source_card.get("notes", "") if notes is None else notes
  wall_time_s = source_card.get("wall_time_s") if wall_time_s is None else wall_time_s
  model = gru_classifier.from_saved(saved)
  config = run_dir.saved_config(saved)
  images, labels = data.load_mnist(
    "valid", data_dir=data_dir or config.data_dir, verify=config.verify_data
  )
  rule = None
  if early_exit:
    log.info(
      "fitting the per-step temperature and the early-exit rule on %d valid digits, then"
      " measuring: a minute on 2 CPU cores",
      len(labels) - model_io.SUBSET,
    )
    fit_part = slice(model_io.SUBSET, None)
    logits = inference.all_logits(model, images[fit_part])
    fitted = calibration.fit(logits, labels[fit_part])
    rule, _ = calibration.recommend(logits, labels[fit_part], fitted, max_drop=max_drop)
    del logits
  measure = {
    "early_exit_thresholds": () if rule is None else (rule.threshold,),
    "calibration": None if rule is None else rule.calibration,
  }
  full = inference.evaluate(model, images, labels, **measure)
  subset = inference.evaluate(
    model, images[: model_io.SUBSET], labels[: model_io.SUBSET], **measure
  )
  config = config.replace(data_dir=None)  # a path on the training machine means nothing here
  out.parent.mkdir(parents=True, exist_ok=True)
  weights_partial = out.with_name(f".{out.name}.partial")
  checkpoints.save(
    weights_partial,
    {"state": {"params": saved.arrays, "step": saved.step}, "config": config.to_json()},
  )
  card = {
    "name": out.stem,
    "sha256": hashlib.sha256(weights_partial.read_bytes()).hexdigest(),
    # Of the arrays, not the file: what a fine-tune's init_from record gives.
    "params_sha256": checkpoints.state_digest(saved.arrays),
    # Re-exporting exported weights (to add an early-exit rule) keeps their provenance.
    "source": source_card.get("source", _provenance(saved)),
    "config": json.loads(config.to_json()),
    "valid_accuracy": full["accuracy"],
    "valid_loss": full["loss"],
    f"valid_first_{model_io.SUBSET}_accuracy": subset["accuracy"],
    "wall_time_s": wall_time_s,
    "notes": notes,
  }
  if rule is not None:
    card["early_exit"] = {
      **rule.to_dict(),
      "chosen_on": f"valid images {model_io.SUBSET}-{len(labels) - 1}",
      "max_drop": max_drop,
      "valid": {**full["early_exit"][0], "read_all_accuracy": full["accuracy"]},
      f"valid_first_{model_io.SUBSET}": {
        **subset["early_exit"][0],
        "read_all_accuracy": subset["accuracy"],
      },
      "calibration_error": full["calibration_error"],
    }
  card_path = out.with_suffix(".json")
  card_partial = card_path.with_name(f".{card_path.name}.partial")
  card_partial.write_text(json.dumps(card, indent=1) + "\n")
  os.replace(weights_partial, out)
  os.replace(card_partial, card_path)
  return card
