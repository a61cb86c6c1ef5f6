"""Looking inside a trained classifier: how the loss gradient reaches each step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from pixelrnn_jax import gru_cell
from pixelrnn_jax import gru_classifier


@jax.jit
def hidden_gradient_norms(params: gru_classifier.Params, x, labels) -> jax.Array:
  """Mean over examples of ``||dL/dh_t||`` for every step t.

  ``L`` is each example's last-step cross-entropy (the training loss). A
  zero perturbation ``e_t`` is added to every hidden state and ``dL/de_t`` is
  taken, which is ``dL/dh_t`` including every path through later steps. Its
  decay towards early t is the vanishing gradient behind the notebook's long
  plateau at loss 2.30.

  Args:
    x: <float>[batch, T, in_dim] (or images).
    labels: <int32>[batch]

  Returns:
    <float>[T]
  """
  x = jnp.swapaxes(gru_classifier.as_sequence(params, x), 0, 1)  # (T, B, in)
  projected = gru_cell.project_inputs(params, x)  # (T, B, 3u)
  weights = gru_cell.recurrent_weights(params, cell=params.cell, in_dim=x.shape[-1])

  def loss(perturbation):  # (T, B, u)
    def step(h, inputs):
      projected_t, e_t = inputs
      h = (
        gru_cell.recurrent_step(
          weights, h, projected_t, cell=params.cell, activation=params.activation
        )
        + e_t
      )
      return h, None

    h0 = jnp.zeros(perturbation.shape[1:], perturbation.dtype)
    h_last, _ = jax.lax.scan(step, h0, (projected, perturbation))
    logits = h_last @ params.output.kernel + params.output.bias
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()

  zeros = jnp.zeros(x.shape[:2] + (params.num_units,), projected.dtype)
  grads = jax.grad(loss)(zeros)  # (T, B, u): per example, as the loss is a sum
  return jnp.mean(jnp.linalg.norm(grads, axis=-1), axis=1)
