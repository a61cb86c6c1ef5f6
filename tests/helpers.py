"""Shared test helpers (not tests): toy data and small configs."""

import numpy as np

# A run small enough for the suite: row order, 8 units, a few steps.
SMALL = dict(order="row", num_units=8, batch_size=16, steps=6, log_every=2,
             eval_every=3, checkpoint_every=2, eval_batch_size=64)


def synthetic_digits(n, seed):
  """Learnable toy digits: the label is written as a bright row."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 10, n).astype(np.int32)
  images = rng.uniform(0, 0.2, (n, 28, 28)).astype(np.float32)
  images[np.arange(n), 2 * labels + 3, :] = 1.0
  return images, labels
