"""Inference: exact, batched evaluation over a split, and prediction with early exit.

**Evaluation** (:func:`evaluate`): loss, top-1 accuracy and the accuracy after
every step over a whole split, jitted, in padded batches (one compilation),
optionally split across devices; with early-exit thresholds also the
accuracy and mean pixels read at each.

**Early exit** (:func:`predict`): the classifier emits logits after every
pixel. With a confidence threshold, each example stops at the first step
whose softmax probability reaches it and answers with that step's
prediction; the loop itself stops once every example in the batch has
exited, so fewer pixels are actually read. The answer at the exit step is
the same one the full-sequence pass gives at that step (the step function is
the same). With a :class:`~pixelrnn_jax.calibration.Calibration` the
confidence of the answer after step t is that of ``softmax(logits_t / T_t)``:
the answers are the same, only where each example stops changes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pixelrnn_jax import calibration as calibration_lib
from pixelrnn_jax import gru_cell
from pixelrnn_jax import gru_classifier


def _batch_sums(params, x, labels, mask, thresholds, temperatures, report_steps):
  """Sums over the real (mask = 1) examples of one padded batch.

  Args:
    x: <float>[batch, T, in_dim], the model's input sequences
    labels: <int32>[batch]
    mask: <float32>[batch], 0 for padding.
    thresholds: <float32>[K] early-exit confidence thresholds (K may be 0).
    temperatures: <float32>[T] per-step temperatures (ones: as trained).
    report_steps: <int32>[S] step indices whose calibration is reported.
  """
  logits = gru_classifier.apply(params, x)  # (B, T, classes)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, -1], labels)
  correct = jnp.argmax(logits, axis=-1) == labels[:, None]  # (B, T)
  top = jnp.max(jax.nn.softmax(logits / temperatures[:, None], axis=-1), axis=-1)  # (B, T)
  exits = calibration_lib.first_reached(top, thresholds)  # (K, B)
  correct_at_exit = jnp.take_along_axis(correct[None], exits[..., None], axis=-1)[..., 0]
  top_at_exit = jnp.take_along_axis(top[None], exits[..., None], axis=-1)[..., 0]  # (K, B)

  def bins(confidence, hit):  # (..., B) -> (3, ..., bins), padding weighs 0
    return jnp.stack(calibration_lib.bin_sums(confidence, hit, weight=mask))

  return {
    "loss": jnp.sum(losses * mask),
    "correct": jnp.sum(correct[:, -1] * mask),
    "correct_per_step": jnp.sum(correct * mask[:, None], axis=0),  # (T,)
    "exit_correct": jnp.sum(correct_at_exit * mask, axis=-1),  # (K,)
    "exit_steps": jnp.sum((exits + 1) * mask, axis=-1),  # (K,)
    "exit_bins": bins(top_at_exit, correct_at_exit),  # (3, K, bins)
    "step_bins": bins(top[:, report_steps].T, correct[:, report_steps].T),  # (3, S, bins)
  }


_jitted_batch_sums = jax.jit(_batch_sums)


@functools.cache
def _pmapped_batch_sums(devices: int):
  """Each of this process's first ``devices`` devices scores its slice of the batch
  (local ones only, also in a multi-process run); params and thresholds are broadcast."""
  return jax.pmap(
    _batch_sums, in_axes=(None, 0, 0, 0, None, None, None), devices=jax.local_devices()[:devices]
  )


def _temperatures(calibration, steps: int) -> np.ndarray:
  """<float32>[steps] of a Calibration (None: ones).

  Raises:
    ValueError: anything else (an EarlyExit: pass its ``.calibration``), or a
      calibration for another number of steps.
  """
  if calibration is None:
    return np.ones(steps, np.float32)
  if not isinstance(calibration, calibration_lib.Calibration):
    raise ValueError(
      f"calibration={calibration!r:.60}: expected a calibration.Calibration (of an"
      " EarlyExit rule: rule.calibration) or None"
    )
  return calibration.temperatures(steps)


def check_thresholds(thresholds) -> tuple[float, ...]:
  """Early-exit thresholds (a sequence or an array) as a tuple of floats in (0, 1].

  Raises:
    ValueError: naming a threshold that is not a probability in (0, 1], NaN
      included, or a value that is not a flat sequence of numbers.
  """
  try:
    values = np.asarray(thresholds, np.float64).reshape(-1)
  except (TypeError, ValueError) as error:
    raise ValueError(
      f"early-exit thresholds {thresholds!r}: expected numbers in (0, 1], e.g. (0.9, 0.99)"
    ) from error
  for threshold in values:
    if not 0 < threshold <= 1:  # NaN fails too
      raise ValueError(f"early-exit threshold {threshold}: expected a probability in (0, 1]")
  return tuple(float(v) for v in values)


def _check_positive(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name}={value!r}: expected a positive integer")
  return int(value)


def evaluate(
  params: gru_classifier.Params,
  images: np.ndarray,
  labels: np.ndarray,
  *,
  order: str | None = None,
  batch_size: int = 1000,
  early_exit_thresholds: tuple[float, ...] = (),
  calibration: calibration_lib.Calibration | None = None,
  devices: int = 1,
) -> dict:
  """Loss, top-1 accuracy and accuracy after every step over all of a split.

  The last batch is padded to ``batch_size`` and masked, so every example
  counts once and there is one compilation. With ``devices > 1`` each batch
  is split across that many devices (``jax.pmap``).

  Args:
    params: a model (``gru_classifier.load``, ``load_pretrained`` or ``init``).
    images: <float>[N, 28, 28] or [N, 784] in [0, 1] (``data.load_mnist``),
      read in the model's order; or sequences [N, T, in_dim] as given.
    labels: <int>[N] in [0, num_classes), checked here once.
    order: read the images in this order instead of the model's own.
    calibration: per-step temperatures for the confidences (early exit and
      ECE); None = as trained. Accuracies after t steps do not depend on it.
    batch_size, devices: positive integers.

  Returns:
    ``{"accuracy": float, "loss": float, "accuracy_per_step": list[float] (T),
    "num_examples": int, "calibration_error": {t: ECE}}`` (the expected
    calibration error, a fraction, of the answer after t steps for t = T/2,
    3T/4 and T, as strings of t), plus with thresholds ``"early_exit"``: one
    ``{"threshold", "accuracy", "mean_steps", "ece"}`` per threshold (each
    example answered at the first step whose top probability reaches the
    threshold; ``ece`` of those answers).

  Raises:
    ValueError: naming a bad image shape or dtype, label, size or threshold.
  """
  batch_size = _check_positive("batch_size", batch_size)
  devices = _check_positive("devices", devices)
  if order is not None:
    params = params.replace(order=order)
  n = len(images) if hasattr(images, "__len__") else 0
  if n == 0:
    raise ValueError("no images: expected a non-empty [N, 28, 28] array")
  labels = gru_classifier.check_labels(labels, params.num_classes, count=n)
  if devices > jax.local_device_count():
    raise ValueError(f"devices={devices} but JAX sees {jax.local_device_count()} device(s)")
  batch_size = min(batch_size, n)
  batch_size = -(-batch_size // devices) * devices  # a multiple of the devices
  early_exit_thresholds = check_thresholds(early_exit_thresholds)
  # One more threshold than asked (1.0, dropped below): a zero-size operand in a
  # multi-device pmap crashed XLA's CPU compiler (segfault, seen with jaxlib 0.11.2).
  thresholds = np.asarray([*early_exit_thresholds, 1.0], np.float32)
  total_steps = gru_classifier.as_sequence(params, np.asarray(images[:1])).shape[1]
  report = sorted({max(total_steps // 2, 1), max(3 * total_steps // 4, 1), total_steps})
  report_steps = np.asarray(report, np.int32) - 1
  temperatures = _temperatures(calibration, total_steps)
  # Validates the shape, dtype and values once, and puts the images in order.
  sequences = np.asarray(gru_classifier.as_sequence(params, np.asarray(images)))
  totals = None
  for start in range(0, n, batch_size):
    x = sequences[start : start + batch_size]
    y = labels[start : start + batch_size]
    real = len(y)
    mask = np.zeros(batch_size, np.float32)
    mask[:real] = 1.0
    if real < batch_size:  # pad to the one compiled shape
      x = np.concatenate([x, np.zeros((batch_size - real, *x.shape[1:]), x.dtype)])
      y = np.concatenate([y, np.zeros(batch_size - real, y.dtype)])
    if devices == 1:
      sums = _jitted_batch_sums(params, x, y, mask, thresholds, temperatures, report_steps)
    else:
      split = lambda a: a.reshape(devices, batch_size // devices, *a.shape[1:])
      sums = jax.tree.map(
        lambda s: s.sum(0),
        _pmapped_batch_sums(devices)(
          params, split(x), split(y), split(mask), thresholds, temperatures, report_steps
        ),
      )
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  result = {
    "accuracy": float(totals["correct"]) / n,
    "loss": float(totals["loss"]) / n,
    "accuracy_per_step": (np.asarray(totals["correct_per_step"]) / n).tolist(),
    "num_examples": n,
    "calibration_error": {
      str(t): float(e)
      for t, e in zip(report, calibration_lib.ece_from_sums(*totals["step_bins"], n=n))
    },
  }
  if len(early_exit_thresholds):
    eces = calibration_lib.ece_from_sums(*totals["exit_bins"], n=n)
    result["early_exit"] = [
      {"threshold": float(t), "accuracy": float(c) / n, "mean_steps": float(s) / n, "ece": float(e)}
      for t, c, s, e in zip(
        early_exit_thresholds, totals["exit_correct"], totals["exit_steps"], eces
      )
    ]
  return result


def all_logits(params: gru_classifier.Params, images, *, batch_size: int = 500) -> np.ndarray:
  """<float32>[N, T, classes]: every step's logits for every image, as NumPy.

  In padded batches of ``batch_size`` (one compilation); images as
  :func:`evaluate` takes them. 5,000 images x 784 steps are 157 MB.
  """
  batch_size = _check_positive("batch_size", batch_size)
  sequences = np.asarray(gru_classifier.as_sequence(params, np.asarray(images)))
  n = len(sequences)
  batch_size = min(batch_size, n)
  out = []
  for start in range(0, n, batch_size):
    x = sequences[start : start + batch_size]
    real = len(x)
    if real < batch_size:
      x = np.concatenate([x, np.zeros((batch_size - real, *x.shape[1:]), x.dtype)])
    out.append(np.asarray(gru_classifier.apply(params, x))[:real])
  return np.concatenate(out)


# ----------------------------------------------------------------------------
# Early exit


def predict(
  params: gru_classifier.Params,
  x,
  *,
  threshold: float = 1.0,
  calibration: calibration_lib.Calibration | None = None,
) -> dict:
  """Reads each sequence until its top softmax probability reaches ``threshold``.

  Args:
    params: from ``gru_classifier.init``, ``load`` or ``load_pretrained``.
    x: images in [0, 1] or sequences, as ``gru_classifier.apply`` takes.
    threshold: in (0, 1]; 1.0 reads every step unless a probability rounds
      to exactly 1. A traced threshold (under ``jit``) cannot raise: one
      outside (0, 1] or NaN gives ``label`` -1 and NaN probabilities for
      every example, never a plausible answer.
    calibration: per-step temperatures: the confidence after step t is that
      of ``softmax(logits_t / T_t)`` (the answer is the same); None = as
      trained. A card's recorded threshold is meant with its calibration:
      ``rule = calibration.EarlyExit.from_card(model_io.read(source).card)``,
      then ``threshold=rule.threshold, calibration=rule.calibration``.

  Returns:
    ``{"label": <int32>[batch], "probability": <float>[batch],
    "probabilities": <float>[batch, classes], "steps": <int32>[batch]}``:
    the answer, its probability and every class's at the exit step; steps
    read, 1..T.

  Raises:
    ValueError: for a bad ``x`` (see ``gru_classifier.as_sequence``) or a
      threshold outside (0, 1].
  """
  if not isinstance(threshold, jax.core.Tracer):
    if np.ndim(threshold) != 0 or not 0 < float(threshold) <= 1:  # NaN fails too
      raise ValueError(f"threshold={threshold!r}: expected a probability in (0, 1]")
  x = gru_classifier.as_sequence(params, x)
  temperatures = _temperatures(calibration, x.shape[1])
  return _predict(params, x, threshold, jnp.asarray(temperatures, x.dtype))


@jax.jit
def _predict(params: gru_classifier.Params, x: jax.Array, threshold, temperatures) -> dict:
  batch, total, in_dim = x.shape
  x = jnp.swapaxes(x, 0, 1)  # (T, B, in_dim)
  weights = gru_cell.recurrent_weights(params, cell=params.cell, in_dim=in_dim)
  units = params.num_units

  def cond(carry):
    t, _, done, *_ = carry
    return (t < total) & ~jnp.all(done)

  def body(carry):
    t, h, done, label, probability, probabilities, steps = carry
    projected = gru_cell.project_inputs(params, x[t])  # (B, 3u)
    h_new = gru_cell.recurrent_step(
      weights, h, projected, cell=params.cell, activation=params.activation
    )
    probs = jax.nn.softmax((h_new @ params.output.kernel + params.output.bias) / temperatures[t])
    top = jnp.max(probs, axis=-1)
    last = t == total - 1
    exits = ~done & ((top >= threshold) | last)
    label = jnp.where(exits, jnp.argmax(probs, axis=-1).astype(jnp.int32), label)
    probability = jnp.where(exits, top, probability)
    probabilities = jnp.where(exits[:, None], probs, probabilities)
    steps = jnp.where(exits, t + 1, steps)
    h = jnp.where(done[:, None], h, h_new)  # exited examples keep their state
    return t + 1, h, done | exits, label, probability, probabilities, steps

  classes = params.num_classes
  init = (
    jnp.int32(0),
    jnp.zeros((batch, units), x.dtype),
    jnp.zeros(batch, bool),
    jnp.zeros(batch, jnp.int32),
    jnp.zeros(batch, x.dtype),
    jnp.zeros((batch, classes), x.dtype),
    jnp.full(batch, total, jnp.int32),
  )
  _, _, _, label, probability, probabilities, steps = jax.lax.while_loop(cond, body, init)
  # A threshold outside (0, 1] (NaN included) can only be traced here: no answer.
  valid = (threshold > 0) & (threshold <= 1)
  label = jnp.where(valid, label, -1)
  probability = jnp.where(valid, probability, jnp.nan)
  probabilities = jnp.where(valid, probabilities, jnp.nan)
  return {
    "label": label,
    "probability": probability,
    "probabilities": probabilities,
    "steps": steps,
  }


def exit_steps(logits: jax.Array, thresholds: jax.Array, temperatures=None) -> jax.Array:
  """Index of the first step whose top probability reaches each threshold.

  Args:
    logits: <float>[batch, T, classes], every step's logits.
    thresholds: <float>[K]
    temperatures: <float>[T] per step (``Calibration.temperatures``); None = ones.

  Returns:
    <int32>[K, batch]: the exit step index (T - 1 when never reached).
  """
  if temperatures is not None:
    logits = logits / jnp.asarray(temperatures)[:, None]
  top = jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1)
  return calibration_lib.first_reached(top, jnp.asarray(thresholds))
