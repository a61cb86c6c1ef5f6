"""How a 28x28 MNIST image in [0, 1] becomes the sequence a model reads.

The one place that knows the pixel orders and the input scaling:

- ``"pixel"``: the 784 pixels in row-major (reading) order, one per step,
  ``<float>[batch, 784, 1]`` (the notebook's sequential MNIST);
- ``"permuted"``: the same 784 pixels in one fixed random order (psMNIST; Le,
  Jaitly and Hinton 2015, arXiv 1504.00941), ``<float>[batch, 784, 1]``;
- ``"row"``: one row of 28 pixels per step, ``<float>[batch, 28, 28]``.

Standardisation ``(x - TRAIN_MEAN) / TRAIN_STD`` is a training-time option;
a loaded model has it folded into its input projection
(``gru_classifier.fold_input_scaling``), so every loaded model reads plain
[0, 1] pixels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

ORDERS = ("pixel", "permuted", "row")
IMAGE_SHAPE = (28, 28)
NUM_PIXELS = 784

# psMNIST: one fixed permutation of the 784 pixels, the same for every split and run.
PERMUTATION_SEED = 92916
# Pixel mean and std of the 55,000 `train` images in [0, 1] (measured; see tests).
TRAIN_MEAN = 0.13070
TRAIN_STD = 0.30816


def check_order(order: str) -> str:
  """Returns ``order``; raises ValueError naming it when it is not in ORDERS."""
  if order not in ORDERS:
    raise ValueError(f"unknown order {order!r}: expected one of {ORDERS}")
  return order


@functools.cache
def _permutation() -> np.ndarray:
  permutation = np.random.default_rng(PERMUTATION_SEED).permutation(NUM_PIXELS)
  permutation.setflags(write=False)
  return permutation


def permutation() -> np.ndarray:
  """<int64>[784]: the fixed psMNIST pixel permutation (seed PERMUTATION_SEED)."""
  return _permutation().copy()


def sequence_shape(order: str) -> tuple[int, int]:
  """(T, in_dim) of an order: pixel/permuted (784, 1), row (28, 28)."""
  check_order(order)
  return (28, 28) if order == "row" else (NUM_PIXELS, 1)


def standardize(images):
  """``(images - TRAIN_MEAN) / TRAIN_STD``, the training-time input scaling."""
  return (images - np.float32(TRAIN_MEAN)) / np.float32(TRAIN_STD)


def to_sequences(images, order: str):
  """Images <float>[N, 28, 28] (or flat [N, 784]) -> sequences [N, T, in_dim].

  NumPy in, NumPy out; JAX arrays (also traced ones) in, JAX arrays out.

  Raises:
    ValueError: for an unknown order or a shape that is not [N, 28, 28] / [N, 784].
  """
  check_order(order)
  xp = np if isinstance(images, np.ndarray) else jnp
  if not isinstance(images, (np.ndarray, jax.Array)):
    images, xp = np.asarray(images), np
  if images.shape[1:] not in (IMAGE_SHAPE, (NUM_PIXELS,)) or images.ndim not in (2, 3):
    raise ValueError(f"images have shape {tuple(images.shape)}: expected [N, 28, 28] or [N, 784]")
  n = images.shape[0]
  if order == "row":
    return xp.reshape(images, (n, 28, 28))
  flat = xp.reshape(images, (n, NUM_PIXELS))
  if order == "permuted":
    flat = flat[:, _permutation()]
  return flat[:, :, None]


def rotate_and_scale(
  images: np.ndarray, degrees, scales, background: float = 0.0, displacements=None
) -> np.ndarray:
  """``images`` <float>[..., H, W] each rotated by its ``degrees`` (counter-clockwise
  as displayed with row 0 on top) and scaled by its ``scales`` (arrays of the
  leading shape, or scalars), about the centre ``((H - 1) / 2, (W - 1) / 2)``:
  bilinear, with ``background`` outside the image. One SciPy
  ``ndimage.map_coordinates`` call for the whole batch. Returns the same shape
  and dtype.

  ``displacements`` <float>[..., 2, H, W] (optional; e.g. from
  :func:`elastic_displacements`) moves where each output pixel reads: output
  pixel ``(r, c)`` reads the rotated and scaled source point plus
  ``displacements[..., :, r, c]`` (rows, cols), in pixels.
  """
  from scipy import ndimage  # noqa: PLC0415 (SciPy loads on first use)

  images = np.asarray(images)
  lead, (height, width) = images.shape[:-2], images.shape[-2:]
  flat = images.reshape(-1, height, width).astype(np.float64)
  theta = np.deg2rad(np.broadcast_to(np.asarray(degrees, np.float64), lead).reshape(-1, 1, 1))
  scale = np.broadcast_to(np.asarray(scales, np.float64), lead).reshape(-1, 1, 1)
  # Output pixel o reads the input at centre + R(-theta) (o - centre) / scale, in
  # (row, col) coordinates with rows pointing down, where a counter-clockwise turn
  # on screen by theta is [[cos, -sin], [sin, cos]].
  rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
  dr, dc = rows - (height - 1) / 2, cols - (width - 1) / 2
  cos, sin = np.cos(theta), np.sin(theta)
  source_rows = (height - 1) / 2 + (cos * dr + sin * dc) / scale
  source_cols = (width - 1) / 2 + (-sin * dr + cos * dc) / scale
  if displacements is not None:
    moved = np.asarray(displacements, np.float64)
    if moved.shape != (*lead, 2, height, width):
      raise ValueError(
        f"displacements of shape {moved.shape}: expected {(*lead, 2, height, width)},"
        f" a (row, col) pair of fields per image"
      )
    moved = moved.reshape(-1, 2, height, width)
    source_rows, source_cols = source_rows + moved[:, 0], source_cols + moved[:, 1]
  index = np.broadcast_to(np.arange(len(flat), dtype=np.float64).reshape(-1, 1, 1), flat.shape)
  out = ndimage.map_coordinates(
    flat,
    [index, source_rows, source_cols],
    order=1,
    mode="grid-constant",  # the image padded with the background, then interpolated
    cval=float(background),
  )
  return out.reshape(images.shape).astype(images.dtype)
