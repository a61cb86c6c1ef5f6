"""The fast recurrence: a ``jax.custom_vjp`` over the whole sequence.

Autodiff through ``lax.scan`` keeps every intermediate of every step and
replays the step's whole computation graph backwards. Here the backward is
written by hand (equations in ``_recurrence_bwd``) and both loops are kept
small and in cache:

* **forward scan**: the step's input projection (for in_dim 1 a broadcast
  multiply-add, cheaper than reading a hoisted ``[T, B, 3u]`` array), the
  recurrent matmuls (tf1: two; reset_after: one fused
  ``h @ [W_hr | W_hz | W_hn]``) and the gates. **Stored** for the backward:
  the hidden states (the output itself) and one ``[T, B, 3u]`` array of gate
  activations (``r, u, c``; reset_after adds ``W_hn h + b_hn``, 4u).
  Nothing else.
* **backward scan**: reads ``h_{t-1}`` and the step's gates, computes the
  pre-activation gradients with no transcendental function (the derivatives
  are written in terms of the stored activations), the gradient for
  ``h_{t-1}`` (tf1: two matmuls; reset_after: one) and accumulates the
  weight gradients in the loop carry.
* **Why accumulate in the loop, not one big GEMM after it**: both were
  measured on a 2-core CPU when this core was written. Emitting every
  step's ``[B, 3u]`` gradient and contracting ``H_prev^T @ d_pre`` over all
  ``T x B`` rows after the scan was about 1.5x slower per train step: the
  ``[T, B, 3u]`` array (308 MB at batch 512) must be written and read back,
  and at that CPU's memory bandwidth that costs more than 784 small GEMMs
  on data already in cache. Likewise, recomputing the gates in bulk instead
  of storing them was slower.
* The step's forward equations are ``gru_cell.activations``, shared with the
  reference path. Its ``optimization_barrier`` after each sigmoid stops
  XLA:CPU from fusing the sigmoid into each consumer and recomputing it
  (it more than halved reset_after's forward).

The readout stays outside (one matmul over all steps), so autodiff handles it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pixelrnn_jax import gru_cell

# d act(z) / dz written in terms of the output y = act(z).
_ACTIVATION_GRADIENT = {
  "tanh": lambda y: 1.0 - y * y,
  "relu": lambda y: (y > 0).astype(y.dtype),
  "softsign": lambda y: jnp.square(1.0 - jnp.abs(y)),
  "hard_tanh": lambda y: (jnp.abs(y) < 1.0).astype(y.dtype),
}


def _project(x, w_x, b):
  """x @ w_x + b for x <[..., in_dim]>; a broadcast multiply-add when in_dim is 1."""
  if x.shape[-1] == 1:
    return x * w_x[0] + b
  return x @ w_x + b


def _forward(cell, activation, unroll, x, w_x, b, weights, mask, *, keep_gates=False):
  """The forward scan: hs <[T, B, u]> and, if keep_gates, the gates of every step."""
  units = w_x.shape[-1] // 3

  def step(h, x_t):  # h: (B, u), x_t: (B, in_dim)
    r, u, c, hn = gru_cell.activations(
      weights, h, _project(x_t, w_x, b), cell=cell, activation=activation
    )
    h_new = u * h + (1.0 - u) * (c if mask is None else c * mask)
    if not keep_gates:
      return h_new, h_new
    kept = (r, u, c) if cell == "tf1" else (r, u, c, hn)
    return h_new, (h_new, jnp.concatenate(kept, axis=-1))  # (B, 3u) or (B, 4u)

  h0 = jnp.zeros(x.shape[1:-1] + (units,), x.dtype)
  _, out = jax.lax.scan(step, h0, x, unroll=unroll)
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def recurrence(
  cell: str,
  activation: str,
  unroll: int,
  x: jax.Array,
  w_x: jax.Array,
  b: jax.Array,
  weights: tuple,
  mask: jax.Array | None = None,
) -> jax.Array:
  """All hidden states of the GRU.

  Args:
    cell: ``"tf1"`` or ``"reset_after"``.
    activation: a name in ``gru_cell.ACTIVATIONS``.
    unroll: steps per loop iteration of the scans.
    x: <float>[T, batch, in_dim], time-major.
    w_x: <float>[in_dim, 3 * units]: the input rows of the gate and candidate kernels.
    b: <float>[3 * units]: the gate and candidate biases.
    weights: ``gru_cell.recurrent_weights(params, ...)``.
    mask: None, or <float>[batch, units]: recurrent dropout's mask on the
      candidate, the same at every step (``gru_cell.recurrent_step``); no
      gradient flows to it.

  Returns:
    hs: <float>[T, batch, units]
  """
  return _forward(cell, activation, unroll, x, w_x, b, weights, mask)


def _recurrence_fwd(cell, activation, unroll, x, w_x, b, weights, mask=None):
  hs, gates = _forward(cell, activation, unroll, x, w_x, b, weights, mask, keep_gates=True)
  return hs, (x, w_x, b, weights, mask, hs, gates)


def _shift(hs: jax.Array) -> jax.Array:
  """[h_1..h_T] -> [h_0..h_{T-1}] with h_0 = 0."""
  return jnp.concatenate([jnp.zeros_like(hs[:1]), hs[:-1]], axis=0)


def _recurrence_bwd(cell, activation, unroll, residuals, d_hs):
  x, w_x, b, weights, mask, hs, gates = residuals
  d_act = _ACTIVATION_GRADIENT[activation]
  units = hs.shape[-1]
  in_dim = x.shape[-1]
  weights_t = tuple(w.T for w in weights if w.ndim == 2)  # (2u, u), (u, u) or (3u, u)

  def step(carry, inputs):
    d_h_next, d_weights, d_w_x, d_b = carry
    d_h_out, h, x_t, g = inputs  # h = h_{t-1}: (B, u); g: this step's gates
    r, u, c = g[:, :units], g[:, units : 2 * units], g[:, 2 * units : 3 * units]
    d_h = d_h_next + d_h_out  # (B, u)
    d_c_pre = d_h * (1.0 - u) * d_act(c)  # (B, u)
    c_used = c
    if mask is not None:  # h' = u h + (1 - u) (c * mask)
      d_c_pre, c_used = d_c_pre * mask, c * mask
    d_u_pre = d_h * (h - c_used) * u * (1.0 - u)
    if cell == "tf1":
      d_rh = d_c_pre @ weights_t[1]  # through (r * h) @ W_ch
      d_r_pre = d_rh * h * r * (1.0 - r)
      d_gates_pre = jnp.concatenate([d_r_pre, d_u_pre], axis=-1)  # (B, 2u)
      d_h_prev = d_h * u + d_rh * r + d_gates_pre @ weights_t[0]
      d_weights = (d_weights[0] + h.T @ d_gates_pre, d_weights[1] + (r * h).T @ d_c_pre)
    else:
      hn = g[:, 3 * units :]
      d_r_pre = d_c_pre * hn * r * (1.0 - r)
      d_hn = d_c_pre * r
      d_hh = jnp.concatenate([d_r_pre, d_u_pre, d_hn], axis=-1)  # (B, 3u)
      d_h_prev = d_h * u + d_hh @ weights_t[0]
      d_weights = (d_weights[0] + h.T @ d_hh, d_weights[1] + jnp.sum(d_hn, axis=0))
    d_pre = jnp.concatenate([d_r_pre, d_u_pre, d_c_pre], axis=-1)  # (B, 3u)
    if in_dim == 1:
      d_w_x = d_w_x + jnp.sum(x_t * d_pre, axis=0, keepdims=True)
      d_x_t = jnp.sum(d_pre * w_x[0], axis=-1, keepdims=True)
    else:
      d_w_x = d_w_x + x_t.T @ d_pre
      d_x_t = d_pre @ w_x.T
    carry = (d_h_prev, d_weights, d_w_x, d_b + jnp.sum(d_pre, axis=0))
    return carry, d_x_t

  carry = (
    jnp.zeros_like(hs[0]),
    jax.tree.map(jnp.zeros_like, weights),
    jnp.zeros_like(w_x),
    jnp.zeros_like(b),
  )
  xs = (d_hs, _shift(hs), x, gates)
  (_, d_weights, d_w_x, d_b), d_x = jax.lax.scan(step, carry, xs, reverse=True, unroll=unroll)
  return d_x, d_w_x, d_b, d_weights, None if mask is None else jnp.zeros_like(mask)


recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)
