"""Early-exit prediction: stop reading pixels once the classifier is sure.

The classifier emits logits after every pixel. With a confidence threshold,
each example stops at the first step whose softmax probability reaches it
and answers with that step's prediction; the loop itself stops once every
example in the batch has exited, so fewer pixels are actually read. The
answer at the exit step is the same one the full-sequence pass gives at that
step (the step function is the same).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pixelrnn_jax import gru_cell
from pixelrnn_jax import gru_classifier


def predict(params: gru_classifier.Params, x, *, threshold: float = 1.0) -> dict:
  """Reads each sequence until its top softmax probability reaches ``threshold``.

  Args:
    params: from ``gru_classifier.init``, ``load`` or ``load_pretrained``.
    x: images in [0, 1] or sequences, as ``gru_classifier.apply`` takes.
    threshold: in (0, 1]; 1.0 reads every step unless a probability rounds
      to exactly 1.

  Returns:
    ``{"label": <int32>[batch], "probability": <float>[batch],
    "probabilities": <float>[batch, classes], "steps": <int32>[batch]}``:
    the answer, its probability and every class's at the exit step; steps
    read, 1..T.

  Raises:
    ValueError: for a bad ``x`` (see ``gru_classifier.as_sequence``) or a
      threshold outside (0, 1].
  """
  if not isinstance(threshold, jax.core.Tracer) and not 0 < float(threshold) <= 1:
    raise ValueError(f"threshold={threshold!r}: expected a probability in (0, 1]")
  x = gru_classifier.as_sequence(params, x)
  return _predict(params, x, threshold)


@jax.jit
def _predict(params: gru_classifier.Params, x: jax.Array, threshold) -> dict:
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
    h_new = gru_cell.recurrent_step(weights, h, projected, cell=params.cell,
                                    activation=params.activation)
    probs = jax.nn.softmax(h_new @ params.output.kernel + params.output.bias)  # (B, C)
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
  init = (jnp.int32(0), jnp.zeros((batch, units), x.dtype), jnp.zeros(batch, bool),
          jnp.zeros(batch, jnp.int32), jnp.zeros(batch, x.dtype),
          jnp.zeros((batch, classes), x.dtype), jnp.full(batch, total, jnp.int32))
  _, _, _, label, probability, probabilities, steps = jax.lax.while_loop(cond, body, init)
  return {"label": label, "probability": probability, "probabilities": probabilities,
          "steps": steps}


def exit_steps(logits: jax.Array, thresholds: jax.Array) -> jax.Array:
  """Index of the first step whose top probability reaches each threshold.

  Args:
    logits: <float>[batch, T, classes], every step's logits.
    thresholds: <float>[K]

  Returns:
    <int32>[K, batch]: the exit step index (T - 1 when never reached).
  """
  top = jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1)  # (B, T)
  reached = top[None] >= thresholds[:, None, None]  # (K, B, T)
  reached = reached.at[..., -1].set(True)
  return jnp.argmax(reached, axis=-1).astype(jnp.int32)
