"""The models a server answers with: loaded once by source, asked one or more images at once.

    models = [load("pretrained:pixel"), load("runs/tuned")]
    answer = models[0].answer(pixels)   # pixels: <float32>[28, 28] in [0, 1]
    answers = models[0].answer_batch(stack)   # stack: <float32>[n, 28, 28], one jitted pass

Standard library, NumPy and JAX only, so the answers are testable without
the web extra.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pixelrnn_jax import calibration
from pixelrnn_jax import gru_classifier
from pixelrnn_jax import model_io
from pixelrnn_jax import preprocessing

IMAGE_SHAPE = preprocessing.IMAGE_SHAPE  # (28, 28): what every loaded model reads
DIGITS = 5  # decimals of the per-step probabilities sent: 1e-5 is below a chart's pixel
# Batches are padded to the next power of two up to this (each size compiles once, at load).
MAX_BATCH = 16


@jax.jit
def _read(params, images, temperatures, threshold):
  """Every step's (calibrated) class probabilities and the steps read, in one XLA call.

  Args:
    params: the model's :class:`gru_classifier.Params`.
    images: <float32>[n, 28, 28] in [0, 1].
    temperatures: <float32>[T] per-step temperature (ones: uncalibrated).
    threshold: <float32>[] early-exit threshold (above 1: read every pixel).

  Returns:
    (<float32>[n, T, classes] softmax of logits / temperature, <int32>[n] steps
    read: the first step whose top probability reaches ``threshold``, else T),
    the rule of ``inference.exit_steps`` on this one pass.
  """
  logits = gru_classifier.apply(params, images) / temperatures[:, None]
  probabilities = jax.nn.softmax(logits, axis=-1)
  top = jnp.max(probabilities, axis=-1)
  return probabilities, calibration.first_reached(top, threshold[None])[0] + 1


@dataclasses.dataclass(frozen=True)
class ServedModel:
  """A loaded model with what the page shows about it."""

  name: str  # "pixel" for pretrained:pixel, else the source as given
  source: str  # what --checkpoint said
  params: gru_classifier.Params  # reads [batch, 28, 28] images in [0, 1] in its own order
  order: str  # "pixel", "permuted" or "row"
  reading_order: tuple[int, ...]  # the 784 pixel indices (row-major) in the order read
  card: dict[str, Any] | None  # the weights' card, if any
  early_exit: calibration.EarlyExit | None  # the card's rule; None reads every pixel
  valid_accuracy: float | None  # the card's, or the run's record of this step

  @property
  def early_exit_threshold(self) -> float | None:
    return None if self.early_exit is None else self.early_exit.threshold

  def describe(self) -> dict[str, Any]:
    """The JSON of ``GET /api/models`` for this model."""
    return {
      "name": self.name,
      "source": self.source,
      "order": self.order,
      "valid_accuracy": self.valid_accuracy,
      "early_exit_threshold": self.early_exit_threshold,
      "calibrated": self.early_exit is not None,
      "card": self.card,
    }

  def answer(self, pixels: np.ndarray) -> dict[str, Any]:
    """The model's reading of one image, as ``POST /api/predict`` returns it.

    Args:
      pixels: <float32>[28, 28] in [0, 1], white digit on black (checked by the caller).

    Returns:
      ``{"label", "probability", "top3": [{"label", "probability"}] * 3,
      "probabilities": <float32>[784, 10], "pixels": <float32>[28, 28], "pixels_read",
      "order": [784], "model"}`` (arrays as NumPy: ``orjson`` with
      ``OPT_SERIALIZE_NUMPY`` writes them as nested lists). ``probabilities[i]``
      is every class's probability after the i-th pixel read (in reading
      order), rounded to DIGITS decimals; a row-order model answers once per
      row, so its 28 answers are repeated for the row's 28 pixels. The answer
      is the one after ``pixels_read`` pixels: all 784, or fewer where the
      card records an early-exit rule and the model reached its threshold;
      with a rule, every probability is calibrated by its per-step temperature.
    """
    return self.answer_batch(np.asarray(pixels, np.float32)[None])[0]

  def answer_batch(self, pixels: np.ndarray) -> list[dict[str, Any]]:
    """:meth:`answer` for each of <float32>[n, 28, 28] images, from one jitted pass.

    The batch is padded with blank images to the next power of two (at most
    MAX_BATCH per pass), so that a server compiles a few sizes only.
    """
    pixels = np.asarray(pixels, np.float32)
    n = pixels.shape[0]
    answers = []
    for start in range(0, n, MAX_BATCH):
      chunk = pixels[start : start + MAX_BATCH]
      size = padded_size(len(chunk))
      padded = np.zeros((size, *IMAGE_SHAPE), np.float32)
      padded[: len(chunk)] = chunk
      probabilities, steps = _read(self.params, padded, *self._rule)
      probabilities, steps = np.asarray(probabilities), np.asarray(steps)
      answers += [
        self._format(chunk[i], probabilities[i], int(steps[i])) for i in range(len(chunk))
      ]
    return answers

  @functools.cached_property
  def _rule(self) -> tuple[np.ndarray, np.ndarray]:
    """(temperatures <float32>[T], threshold <float32>[]) for :func:`_read`."""
    steps = preprocessing.NUM_PIXELS // self.params.in_dim
    if self.early_exit is None:
      return np.ones(steps, np.float32), np.float32(np.inf)
    temperatures = np.asarray(self.early_exit.calibration.temperatures(steps), np.float32)
    return temperatures, np.float32(self.early_exit.threshold)

  def _format(self, pixels: np.ndarray, per_step: np.ndarray, steps: int) -> dict[str, Any]:
    in_dim = preprocessing.NUM_PIXELS // per_step.shape[0]
    final = per_step[steps - 1]
    top3 = np.argsort(-final, kind="stable")[:3]
    return {
      "label": int(top3[0]),
      "probability": float(final[top3[0]]),
      "top3": [{"label": int(c), "probability": float(final[c])} for c in top3],
      "probabilities": np.repeat(per_step, in_dim, axis=0).round(DIGITS),
      "pixels": pixels.round(4),
      "pixels_read": steps * in_dim,
      "order": self.reading_order,
      "model": self.name,
    }


def padded_size(n: int) -> int:
  """The batch size a pass of ``n`` images runs at: the next power of two, <= MAX_BATCH."""
  return min(MAX_BATCH, 1 << max(0, n - 1).bit_length())


def name_of(source: str) -> str:
  """``pretrained:pixel`` -> ``pixel``; any other source is its own name."""
  return source.removeprefix(model_io.PREFIX)


def reading_order(order: str) -> tuple[int, ...]:
  """The row-major indices of the 784 pixels in the order a model reads them."""
  if preprocessing.check_order(order) == "permuted":
    return tuple(int(i) for i in preprocessing.permutation())
  return tuple(range(preprocessing.NUM_PIXELS))  # pixel and row order read row by row


def _recorded_accuracy(saved: model_io.SavedModel) -> float | None:
  """The valid accuracy a run recorded for this checkpoint (``metrics.jsonl`` of the run
  whose ``checkpoints/STEP`` it is); None for anything else."""
  from pixelrnn_jax.training import run_dir  # noqa: PLC0415 (only for a run's checkpoint)

  step_dir = Path(saved.path)
  run = step_dir.parent.parent
  if step_dir.parent.name != run_dir.CHECKPOINTS or saved.step is None:
    return None
  try:
    evaluations = run_dir.read_metrics(run)[1]
  except (OSError, ValueError):
    return None
  found = [r["accuracy"] for r in evaluations if r.get("step") == saved.step]
  return found[-1] if found else None


def load(source: str, *, warm_up: bool = True) -> ServedModel:
  """One model by its source: ``pretrained:NAME``, a run directory, a step directory or
  a weights file (as ``--checkpoint`` elsewhere).

  Args:
    source: where the weights are.
    warm_up: answer blank images once per padded batch size, so that no
      request waits for a compilation (about a second each).

  Raises:
    FileNotFoundError: nothing loadable at ``source``.
    CheckpointError: a corrupt or foreign file.
    ValueError: a card whose early-exit rule is malformed (naming the source).
  """
  saved = model_io.read(source)
  card = saved.card
  if card is None and source.startswith(model_io.PREFIX):
    card = model_io.card(name_of(source))
  try:
    rule = calibration.EarlyExit.from_card(card)
  except ValueError as error:
    raise ValueError(f"{source}: {error}") from error
  order = saved.config.get("order", "pixel")
  model = ServedModel(
    name=name_of(source),
    source=source,
    params=gru_classifier.from_saved(saved),
    order=order,
    reading_order=reading_order(order),
    card=card,
    early_exit=rule,
    valid_accuracy=card.get("valid_accuracy") if card else _recorded_accuracy(saved),
  )
  if warm_up:  # compiles every padded batch size now, not on a request
    size = 1
    while size <= MAX_BATCH:
      model.answer_batch(np.zeros((size, *IMAGE_SHAPE), np.float32))
      size *= 2
  return model


def load_all(sources: list[str], *, warm_up: bool = True) -> list[ServedModel]:
  """Every source's model, in order.

  Raises:
    ValueError: two sources with the same name (the page and API select models by name).
    FileNotFoundError, CheckpointError: as :func:`load`.
  """
  names = [name_of(source) for source in sources]
  repeated = sorted({name for name in names if names.count(name) > 1})
  if repeated:
    raise ValueError(f"--checkpoint: {', '.join(repeated)} given more than once")
  return [load(source, warm_up=warm_up) for source in sources]
