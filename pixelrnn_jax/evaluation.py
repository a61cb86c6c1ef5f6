"""Exact, batched, jitted evaluation over a whole split."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pixelrnn_jax import data
from pixelrnn_jax import gru_classifier


@jax.jit
def _batch_sums(params, x, labels, mask):
  """Sums over the real (mask = 1) examples of one padded batch.

  Args:
    x: <float>[batch, T, in_dim]
    labels: <int32>[batch]
    mask: <float32>[batch], 0 for padding.
  """
  logits = gru_classifier.apply(params, x)  # (B, T, classes)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, -1], labels)
  correct = jnp.argmax(logits, axis=-1) == labels[:, None]  # (B, T)
  return {
      "loss": jnp.sum(losses * mask),
      "correct": jnp.sum(correct[:, -1] * mask),
      "correct_per_step": jnp.sum(correct * mask[:, None], axis=0),  # (T,)
  }


def evaluate(
    params: gru_classifier.Params,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    order: str,
    batch_size: int = 1000,
) -> dict:
  """Loss, top-1 accuracy and accuracy after every step over all of a split.

  The last batch is padded to ``batch_size`` and masked, so every example
  counts once and there is one compilation.

  Returns:
    ``{"accuracy": float, "loss": float, "accuracy_per_step": list[float] (T),
    "num_examples": int}``.
  """
  if len(images) != len(labels) or len(images) == 0:
    raise ValueError(f"{len(images)} images and {len(labels)} labels: expected"
                     " the same non-zero number")
  batch_size = min(batch_size, len(images))
  totals = None
  for start in range(0, len(images), batch_size):
    x = data.to_sequences(images[start : start + batch_size], order)
    y = labels[start : start + batch_size]
    real = len(y)
    mask = np.zeros(batch_size, np.float32)
    mask[:real] = 1.0
    if real < batch_size:  # pad to the one compiled shape
      x = np.concatenate([x, np.zeros((batch_size - real, *x.shape[1:]), x.dtype)])
      y = np.concatenate([y, np.zeros(batch_size - real, y.dtype)])
    sums = _batch_sums(params, x, y, mask)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  n = len(images)
  return {
      "accuracy": float(totals["correct"]) / n,
      "loss": float(totals["loss"]) / n,
      "accuracy_per_step": (np.asarray(totals["correct_per_step"]) / n).tolist(),
      "num_examples": n,
  }
