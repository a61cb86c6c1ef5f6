"""The models a server answers with: loaded once by source, asked one image at a time.

    models = [load("pretrained:pixel"), load("runs/tuned")]
    answer = models[0].answer(pixels)   # pixels: <float32>[28, 28] in [0, 1]

Standard library, NumPy and JAX only, so the answers are testable without
the web extra.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from pixelrnn_jax import calibration
from pixelrnn_jax import gru_classifier
from pixelrnn_jax import inference
from pixelrnn_jax import model_io
from pixelrnn_jax import preprocessing

IMAGE_SHAPE = preprocessing.IMAGE_SHAPE  # (28, 28): what every loaded model reads
DIGITS = 5  # decimals of the per-step probabilities sent: 1e-5 is below a chart's pixel


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

  @property
  def early_exit_threshold(self) -> float | None:
    return None if self.early_exit is None else self.early_exit.threshold

  def describe(self) -> dict[str, Any]:
    """The JSON of ``GET /api/models`` for this model."""
    card = self.card or {}
    return {
      "name": self.name,
      "source": self.source,
      "order": self.order,
      "valid_accuracy": card.get("valid_accuracy"),
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
      "probabilities": [784][10], "pixels": [28][28], "pixels_read", "order": [784],
      "model"}``. ``probabilities[i]`` is every class's probability after the
      i-th pixel read (in reading order); a row-order model answers once per
      row, so its 28 answers are repeated for the row's 28 pixels. The answer
      is the one after ``pixels_read`` pixels: all 784, or fewer where the
      card records an early-exit rule and the model reached its threshold;
      with a rule, every probability is calibrated by its per-step temperature.
    """
    x = np.asarray(pixels, np.float32)[None]  # (1, 28, 28)
    logits = np.asarray(gru_classifier.apply(self.params, x)[0])  # (T, 10)
    steps, in_dim = logits.shape[0], preprocessing.NUM_PIXELS // logits.shape[0]
    if self.early_exit is not None:  # the exit rule of inference.evaluate, on this pass
      temperatures = self.early_exit.calibration.temperatures(steps)
      threshold = np.float32([self.early_exit.threshold])
      steps = int(inference.exit_steps(logits[None], threshold, temperatures)[0, 0]) + 1
      logits = logits / temperatures[:, None]
    per_step = np.asarray(jax.nn.softmax(logits, axis=-1))
    final = per_step[steps - 1]
    top3 = np.argsort(-final, kind="stable")[:3]
    return {
      "label": int(top3[0]),
      "probability": float(final[top3[0]]),
      "top3": [{"label": int(c), "probability": float(final[c])} for c in top3],
      "probabilities": np.repeat(per_step, in_dim, axis=0).round(DIGITS).tolist(),
      "pixels": np.asarray(pixels, np.float32).round(4).tolist(),
      "pixels_read": steps * in_dim,
      "order": list(self.reading_order),
      "model": self.name,
    }


def name_of(source: str) -> str:
  """``pretrained:pixel`` -> ``pixel``; any other source is its own name."""
  return source.removeprefix(model_io.PREFIX)


def reading_order(order: str) -> tuple[int, ...]:
  """The row-major indices of the 784 pixels in the order a model reads them."""
  if preprocessing.check_order(order) == "permuted":
    return tuple(int(i) for i in preprocessing.permutation())
  return tuple(range(preprocessing.NUM_PIXELS))  # pixel and row order read row by row


def load(source: str, *, warm_up: bool = True) -> ServedModel:
  """One model by its source: ``pretrained:NAME``, a run directory, a step directory or
  a weights file (as ``--checkpoint`` elsewhere).

  Args:
    source: where the weights are.
    warm_up: answer a blank image once, so that the first request does not
      wait for the compilation (seconds).

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
  )
  if warm_up:
    model.answer(np.zeros(IMAGE_SHAPE, np.float32))
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
