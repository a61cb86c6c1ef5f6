"""Test-time augmentation by rotation: a model's answer averaged over turned copies.

A model trained with random rotations (``--max-rotation``) answers a digit
turned by a few degrees about as well as the digit itself, and not always in
the same way; the mean of its log-probabilities over the digit and its turned
copies is a better answer than any one of them (on the valid split,
``pretrained:pixel-v2`` scores 98.88% alone and 99.06% over 0 and +-3 degrees: see
docs/results.md). It costs one read of the whole sequence per view. It is used
by ``evaluate --tta-rotations`` and, for distillation's teachers, by
``train --distill-rotations`` (``training/teachers.py``).

A rotation of a 28x28 image (bilinear, black outside, about the centre, as in
:func:`preprocessing.rotate_and_scale`) is linear in the pixels, so each view
is one fixed <float32>[784, 784] matrix; for the permuted order (psMNIST) it is
the same matrix with its rows and columns in the order's permutation, so a
view turns the *image* whatever order the model reads it in.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from pixelrnn_jax import gru_classifier
from pixelrnn_jax import preprocessing

UNTRAINED_WARNING = (
  "%s was trained without --max-rotation: turned views are digits it has not learned"
  " and may lower its accuracy (pretrained:permuted scores 95.60%% alone and 90.66%% over"
  " 0 and +-3 degrees; pretrained:anytime 98.62%% and 98.46%%)"
)


@functools.lru_cache(maxsize=32)
def _image_rotation(degrees: float) -> np.ndarray:
  # Row i is where input pixel i lands: the rotation of the i-th basis image.
  basis = np.eye(preprocessing.NUM_PIXELS, dtype=np.float64)
  turned = preprocessing.rotate_and_scale(
    basis.reshape(-1, *preprocessing.IMAGE_SHAPE), degrees, 1.0
  )
  matrix = turned.reshape(preprocessing.NUM_PIXELS, preprocessing.NUM_PIXELS)
  matrix.setflags(write=False)
  return matrix


def check_degrees(degrees) -> tuple[float, ...]:
  """The views' angles as floats.

  Raises:
    ValueError: no angle, or one that is not a finite number, naming it.
  """
  items = np.atleast_1d(np.asarray(degrees, dtype=object)).ravel()
  # Not text: float("66") would read the string "66" as one view of 66 degrees.
  if not all(isinstance(d, numbers.Real) and not isinstance(d, bool) for d in items):
    raise ValueError(f"degrees={degrees!r}: expected numbers, e.g. (0, -3, 3)")
  angles = tuple(float(d) for d in items)
  if not angles:
    raise ValueError(f"degrees={degrees!r}: expected at least one view, e.g. (0, -3, 3)")
  bad = [d for d in angles if not np.isfinite(d)]
  if bad:
    raise ValueError(f"degrees={degrees!r}: {bad[0]} is not a finite angle in degrees")
  return angles


def rotation_matrix(degrees: float, order: str) -> np.ndarray:
  """<float32>[784, 784] ``M`` such that ``flat_sequence @ M`` is the sequence of
  the image turned by ``degrees`` (counter-clockwise as displayed; any finite
  angle, though models are trained on small ones), for sequences of ``order``
  flattened to [N, 784] (``preprocessing.to_sequences`` then reshape).

  Raises:
    ValueError: an unknown order or an angle that is not finite.
  """
  preprocessing.check_order(order)
  (degrees,) = check_degrees((degrees,))
  matrix = _image_rotation(degrees)
  if order == "permuted":
    permutation = preprocessing.permutation()
    matrix = matrix[permutation][:, permutation]
  return np.asarray(matrix, np.float32)


def view_matrices(degrees, order: str) -> np.ndarray:
  """<float32>[views, 784, 784]: :func:`rotation_matrix` of each nonzero angle (the
  unturned view needs none); [0, 784, 784] when all are 0."""
  turned = [rotation_matrix(d, order) for d in check_degrees(degrees) if d != 0]
  size = preprocessing.NUM_PIXELS
  return np.stack(turned) if turned else np.zeros((0, size, size), np.float32)


def views(x: jax.Array, matrices, *, with_identity: bool = True) -> list[jax.Array]:
  """The views of a batch of sequences: itself (``with_identity``), then one per matrix.

  Args:
    x: <float32>[batch, T, in_dim] sequences of [0, 1] pixels, T * in_dim = 784
      (black = 0 is what a rotation brings in at the corners).
    matrices: <float32>[views, 784, 784] from :func:`view_matrices`.

  Raises:
    ValueError: ``x`` is not a batch of 784-pixel sequences.
  """
  if len(x.shape) != 3 or x.shape[1] * x.shape[2] != preprocessing.NUM_PIXELS:
    raise ValueError(
      f"x has shape {tuple(x.shape)}: expected sequences [batch, T, in_dim] of"
      f" {preprocessing.NUM_PIXELS} pixels (preprocessing.to_sequences)"
    )
  flat = x.reshape(x.shape[0], -1)
  turned = [(flat @ m).reshape(x.shape) for m in matrices]
  return ([x] if with_identity else []) + turned


def log_probs(models, x: jax.Array, degrees, order: str) -> jax.Array:
  """The models' answer over the rotated views, <float32>[batch, classes].

  Args:
    models: one ``gru_classifier.Params`` or a sequence of them (an ensemble),
      each reading [0, 1] pixels in ``order``.
    x: images <float>[batch, 28, 28] or [batch, 784] in [0, 1] (read in
      ``order``), or their sequences <float>[batch, T, in_dim] in ``order``
      (``preprocessing.to_sequences``).
    degrees: the views' angles, e.g. ``(0, -3, 3)``; 0 is the batch as it is.

  Returns:
    log-softmax of the mean over models and views of their last-step
    log-probabilities (a normalised geometric mean of their probabilities, as
    ``benchmarks/ensembles.py`` averages models).

  Raises:
    ValueError: no views or an angle that is not finite, an input of another
      shape, or a model that reads another order than ``order``.
  """
  degrees = check_degrees(degrees)
  preprocessing.check_order(order)
  if isinstance(models, gru_classifier.Params):
    models = [models]
  for model in models:
    if model.order not in (None, order):
      raise ValueError(
        f"a model of order {model.order!r} and order={order!r}: each model must read"
        " the views in the order they are made for"
      )
  if len(x.shape) == 2 or tuple(x.shape[1:]) == preprocessing.IMAGE_SHAPE:
    x = preprocessing.to_sequences(x, order)  # images (row order: the same array)
  matrices = jnp.asarray(view_matrices(degrees, order))
  inputs = views(x, matrices, with_identity=0.0 in degrees)
  answers = [jax.nn.log_softmax(gru_classifier.apply(m, v)[:, -1]) for m in models for v in inputs]
  return jax.nn.log_softmax(jnp.mean(jnp.stack(answers), axis=0))


def evaluate(params, images, labels, degrees, *, order: str, batch_size: int = 1000) -> dict:
  """Accuracy and loss of :func:`log_probs` over ``images``.

  Args:
    params: a loaded model (it reads [0, 1] pixels; ``gru_classifier.load``).
    images: <float32>[N, 28, 28] in [0, 1]; labels: <int>[N].
    degrees: the views' angles (``config.rotation_views``).

  Returns:
    ``{"rotations": [...], "accuracy": fraction, "loss": mean cross-entropy in
    nats, "num_examples": N}``.

  Raises:
    ValueError: bad angles, no images, labels of another length or outside the
      classes, a batch size below 1, or as :func:`log_probs`.
  """
  degrees = check_degrees(degrees)
  images, labels = np.asarray(images), np.asarray(labels)
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size={batch_size!r}: expected a positive integer")
  if len(images) == 0 or labels.shape != (len(images),):
    raise ValueError(
      f"images of shape {images.shape} and labels of shape {labels.shape}: expected"
      " N >= 1 images [N, 28, 28] and N labels"
    )
  if labels.min() < 0 or labels.max() >= params.num_classes:
    raise ValueError(
      f"labels in [{labels.min()}, {labels.max()}]: expected classes 0..{params.num_classes - 1}"
    )
  run = jax.jit(lambda p, x: log_probs(p, x, degrees, order))
  answers = np.concatenate(
    [
      np.asarray(run(params, preprocessing.to_sequences(images[i : i + batch_size], order)))
      for i in range(0, len(images), batch_size)
    ]
  )
  return {
    "rotations": [float(d) for d in degrees],
    "accuracy": float(np.mean(answers.argmax(axis=1) == labels)),
    "loss": float(-np.mean(answers[np.arange(len(labels)), labels])),
    "num_examples": len(labels),
  }
