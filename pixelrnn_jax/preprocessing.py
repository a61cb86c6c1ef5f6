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
