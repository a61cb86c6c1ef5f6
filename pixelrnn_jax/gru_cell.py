"""The GRU cell as pure functions: parameters in, new hidden state out.

Two variants share one parameter layout (named as the original notebook's
TF1 weights) and differ only in where the reset gate acts:

``"tf1"`` (default), TensorFlow 1 ``tf.nn.rnn_cell.GRUCell``::

    r, u = sigmoid([x, h] @ W_g + b_g)          # W_g: [in_dim + units, 2 * units]
    c    = act([x, r * h] @ W_c + b_c)          # W_c: [in_dim + units, units]
    h'   = u * h + (1 - u) * c

``"reset_after"``, cuDNN / ``torch.nn.GRU`` / ``flax.linen.GRUCell``::

    r, z = sigmoid([x, h] @ W_g + b_g)
    n    = act(x @ W_c[:in_dim] + b_c + r * (h @ W_c[in_dim:] + b_hn))
    h'   = z * h + (1 - z) * n

The reset-after form applies ``r`` after the recurrent matmul, so the three
recurrent products ``h @ [W_hr | W_hz | W_hn]`` fuse into one matmul per step.

Each step is split into the part that depends on ``x`` only
(:func:`project_inputs`, hoisted out of the time loop by the classifier) and
the recurrent part (:func:`recurrent_step`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

CELLS = ("tf1", "reset_after")

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
  "tanh": jnp.tanh,  # the notebook's (TF1 GRUCell default)
  "relu": jax.nn.relu,
  "softsign": jax.nn.soft_sign,
  "hard_tanh": jax.nn.hard_tanh,
}


class _FieldMapping(Mapping):
  """Read-only mapping view of a struct dataclass: ``p["kernel"] is p.kernel``."""

  def _keys(self) -> tuple[str, ...]:
    return tuple(
      field.name for field in dataclasses.fields(self) if field.metadata.get("pytree_node", True)
    )

  def __getitem__(self, name: str) -> Any:
    if name not in self._keys():
      raise KeyError(f"{name!r}: expected one of {self._keys()}")
    return getattr(self, name)

  def __iter__(self):
    return iter(self._keys())

  def __len__(self) -> int:
    return len(self._keys())


@struct.dataclass
class Dense(_FieldMapping):
  """An affine map ``y = x @ kernel + bias``."""

  kernel: jax.Array  # <float>[in_features, out_features]
  bias: jax.Array  # <float>[out_features]


@struct.dataclass
class ResetAfterDense(_FieldMapping):
  """The reset-after candidate: a second bias inside ``r * (h @ W + b_hn)``."""

  kernel: jax.Array  # <float>[in_dim + units, units]
  bias: jax.Array  # <float>[units], b_in: added to the input projection
  recurrent_bias: jax.Array  # <float>[units], b_hn: gated by r


def check_cell(cell: str) -> str:
  if cell not in CELLS:
    raise ValueError(f"unknown cell {cell!r}: expected one of {CELLS}")
  return cell


def check_activation(activation: str) -> str:
  if activation not in ACTIVATIONS:
    raise ValueError(f"unknown activation {activation!r}: expected one of {tuple(ACTIVATIONS)}")
  return activation


GATE_BIAS_INITS = ("constant", "chrono", "uniform")
RECURRENT_INITS = ("glorot", "orthogonal")


def init_cell(
  key: jax.Array,
  *,
  in_dim: int,
  num_units: int,
  cell: str = "tf1",
  dtype: jnp.dtype = jnp.float32,
  gate_bias_init: str = "constant",
  recurrent_init: str = "glorot",
  max_steps: int = 784,
) -> dict[str, Dense | ResetAfterDense]:
  """Initial cell weights; the defaults are TF1 ``GRUCell``'s.

  TF1: Glorot-uniform kernels, gate bias 1.0 (r ~ u ~ 0.73 at the start),
  candidate bias 0.

  Args:
    gate_bias_init: the update-gate bias (the reset-gate bias stays 1.0):
      ``"constant"`` 1.0 (TF1); ``"chrono"`` ``log(U[1, max_steps - 1])``
      (Tallec & Ollivier 2018: the gate keeps memory over a spread of time
      scales up to the sequence length); ``"uniform"`` ``logit(U[1/max_steps,
      1 - 1/max_steps])`` (the uniform gate initialisation of Gu et al. 2020).
    recurrent_init: the ``h`` rows of the kernels: ``"glorot"`` (TF1, one
      Glorot-uniform draw over the whole ``[in_dim + units, ...]`` kernel) or
      ``"orthogonal"`` (one orthogonal ``[units, units]`` block per gate).
    max_steps: the sequence length the gate initialisations aim at.

  Returns:
    ``{"gates": Dense, "candidate": Dense | ResetAfterDense}``.
  """
  check_cell(cell)
  if gate_bias_init not in GATE_BIAS_INITS:
    raise ValueError(
      f"unknown gate_bias_init {gate_bias_init!r}: expected one of {GATE_BIAS_INITS}"
    )
  if recurrent_init not in RECURRENT_INITS:
    raise ValueError(
      f"unknown recurrent_init {recurrent_init!r}: expected one of {RECURRENT_INITS}"
    )
  if max_steps < 3:
    raise ValueError(f"max_steps={max_steps}: expected at least 3")
  gates_key, candidate_key, bias_key, orthogonal_key = jax.random.split(key, 4)
  glorot = jax.nn.initializers.glorot_uniform()
  rows = in_dim + num_units
  gates_kernel = glorot(gates_key, (rows, 2 * num_units), dtype)
  kernel = glorot(candidate_key, (rows, num_units), dtype)
  if recurrent_init == "orthogonal":
    orthogonal = jax.nn.initializers.orthogonal()
    blocks = [
      orthogonal(k, (num_units, num_units), dtype) for k in jax.random.split(orthogonal_key, 3)
    ]  # r, u, c
    gates_kernel = gates_kernel.at[in_dim:].set(jnp.concatenate(blocks[:2], axis=1))
    kernel = kernel.at[in_dim:].set(blocks[2])
  reset_bias = jnp.ones((num_units,), dtype)
  if gate_bias_init == "constant":
    update_bias = jnp.ones((num_units,), dtype)
  elif gate_bias_init == "chrono":
    update_bias = jnp.log(jax.random.uniform(bias_key, (num_units,), dtype, 1.0, max_steps - 1.0))
  else:
    p = jax.random.uniform(bias_key, (num_units,), dtype, 1.0 / max_steps, 1.0 - 1.0 / max_steps)
    update_bias = jnp.log(p) - jnp.log1p(-p)
  gates = Dense(kernel=gates_kernel, bias=jnp.concatenate([reset_bias, update_bias]))
  bias = jnp.zeros((num_units,), dtype)
  if cell == "tf1":
    candidate = Dense(kernel=kernel, bias=bias)
  else:
    candidate = ResetAfterDense(kernel=kernel, bias=bias, recurrent_bias=bias)
  return {"gates": gates, "candidate": candidate}


def project_inputs(params: Mapping, x: jax.Array) -> jax.Array:
  """The part of a step that depends on ``x`` alone, for any leading dims.

  Args:
    params: a mapping with ``gates`` and ``candidate`` (each ``kernel``, ``bias``).
    x: <float>[..., in_dim]

  Returns:
    <float>[..., 3 * units]: ``x @ W_g[:in_dim] + b_g`` then ``x @ W_c[:in_dim] + b_c``.
  """
  in_dim = x.shape[-1]
  kernel = jnp.concatenate(
    [params["gates"]["kernel"][:in_dim], params["candidate"]["kernel"][:in_dim]],
    axis=1,
  )  # (in_dim, 3 * units)
  bias = jnp.concatenate([params["gates"]["bias"], params["candidate"]["bias"]])
  return x @ kernel + bias


def recurrent_weights(params: Mapping, *, cell: str, in_dim: int) -> tuple:
  """The recurrent weights in the layout :func:`recurrent_step` wants (hoistable)."""
  gates_h = params["gates"]["kernel"][in_dim:]  # (units, 2 * units)
  candidate_h = params["candidate"]["kernel"][in_dim:]  # (units, units)
  if check_cell(cell) == "tf1":
    return (gates_h, candidate_h)
  fused = jnp.concatenate([gates_h, candidate_h], axis=1)  # (units, 3 * units)
  return (fused, params["candidate"]["recurrent_bias"])


def activations(
  weights: tuple,
  h: jax.Array,
  projected_x: jax.Array,
  *,
  cell: str,
  activation: str = "tanh",
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
  """The gate and candidate activations of one step (any leading dims).

  Args:
    weights: from :func:`recurrent_weights`.
    h: <float>[..., units], the previous state.
    projected_x: <float>[..., 3 * units] from :func:`project_inputs`.

  Returns:
    ``(r, u, c, hn)``, each <float>[..., units]: reset gate, update gate,
    candidate, and for reset_after ``hn = h @ W_hn + b_hn`` (None for tf1).
  """
  act = ACTIVATIONS[check_activation(activation)]
  units = h.shape[-1]
  x_gates, x_candidate = projected_x[..., : 2 * units], projected_x[..., 2 * units :]
  # The barrier materialises the gates once: without it XLA:CPU fuses the
  # sigmoid into each consumer and recomputes it (the reset_after forward
  # took over twice as long; see fused_scan's docstring).
  if check_cell(cell) == "tf1":
    gates_h, candidate_h = weights
    gates = jax.lax.optimization_barrier(jax.nn.sigmoid(x_gates + h @ gates_h))
    r, u = gates[..., :units], gates[..., units:]
    return r, u, act(x_candidate + (r * h) @ candidate_h), None
  fused, recurrent_bias = weights
  hh = h @ fused  # (..., 3 * units): one matmul for r, z and n
  gates = jax.lax.optimization_barrier(jax.nn.sigmoid(x_gates + hh[..., : 2 * units]))
  r, u = gates[..., :units], gates[..., units:]
  hn = hh[..., 2 * units :] + recurrent_bias
  return r, u, act(x_candidate + r * hn), hn


def recurrent_step(
  weights: tuple,
  h: jax.Array,
  projected_x: jax.Array,
  *,
  cell: str,
  activation: str = "tanh",
  candidate_mask: jax.Array | None = None,
) -> jax.Array:
  """The recurrent part of one step: ``h' = u * h + (1 - u) * c``.

  With ``candidate_mask`` m (recurrent dropout, Semeniuta et al. 2016,
  "Recurrent Dropout without Memory Loss", arXiv:1603.05118, eq. 9 for the
  GRU), ``h' = u * h + (1 - u) * (c * m)``: only the new information is
  dropped, never the memory ``h``.

  Args:
    weights: from :func:`recurrent_weights`.
    h: <float>[..., units]
    projected_x: <float>[..., 3 * units] from :func:`project_inputs`.
    candidate_mask: None, or <float>[..., units] (0 or 1 / keep probability).

  Returns:
    h_new: <float>[..., units]
  """
  _, u, c, _ = activations(weights, h, projected_x, cell=cell, activation=activation)
  if candidate_mask is not None:
    c = c * candidate_mask
  return u * h + (1.0 - u) * c


def cell_of(params: Mapping) -> str:
  """The cell a params mapping is laid out for: ``"reset_after"`` when the
  candidate has a ``recurrent_bias``, else ``"tf1"``; a ``Params`` says its own.

  Raises:
    ValueError: when ``gates`` / ``candidate`` are missing or have other keys.
  """
  declared = getattr(params, "cell", None)
  try:
    gates, candidate = set(params["gates"]), set(params["candidate"])
  except (KeyError, TypeError) as error:
    keys = sorted(params) if isinstance(params, Mapping) else type(params).__name__
    raise ValueError(
      f"params have keys {keys}: expected a mapping with 'gates' and"
      " 'candidate', each with 'kernel' and 'bias'"
    ) from error
  layouts = {"tf1": {"kernel", "bias"}, "reset_after": {"kernel", "bias", "recurrent_bias"}}
  found = [cell for cell, keys in layouts.items() if candidate == keys]
  if gates != {"kernel", "bias"} or not found:
    raise ValueError(
      f"params have gates keys {sorted(gates)} and candidate keys"
      f" {sorted(candidate)}: expected gates (kernel, bias) and candidate"
      " (kernel, bias) for tf1 or (kernel, bias, recurrent_bias) for reset_after"
    )
  if declared is not None and declared != found[0]:
    raise ValueError(f"params say cell {declared!r} but hold {found[0]!r} weights")
  return found[0]


def check_weights(params: Mapping) -> tuple[str, int, int]:
  """Checks the cell weights' keys and shapes; returns ``(cell, in_dim, units)``.

  Raises:
    ValueError: naming the keys or shapes that do not form a GRU cell.
  """
  cell = cell_of(params)
  shapes = {
    f"{group}.{name}": tuple(getattr(params[group][name], "shape", ()))
    for group in ("gates", "candidate")
    for name in params[group]
  }
  kernel = shapes["gates.kernel"]
  units = kernel[1] // 2 if len(kernel) == 2 else 0
  rows = kernel[0] if len(kernel) == 2 else 0
  expected = {
    "gates.kernel": (rows, 2 * units),
    "gates.bias": (2 * units,),
    "candidate.kernel": (rows, units),
    "candidate.bias": (units,),
  }
  if cell == "reset_after":
    expected["candidate.recurrent_bias"] = (units,)
  if units < 1 or rows <= units or shapes != expected:
    raise ValueError(
      f"params have shapes {shapes}: a {cell} GRU cell needs gates.kernel"
      " [in_dim + units, 2 * units], gates.bias [2 * units], candidate.kernel"
      " [in_dim + units, units] and [units] biases"
    )
  return cell, rows - units, units


def gru_step(
  params: Mapping,
  h: jax.Array,
  x: jax.Array,
  *,
  cell: str | None = None,
  activation: str | None = None,
) -> jax.Array:
  """One GRU step (see the module docstring for the equations).

  Args:
    params: a mapping with ``gates`` and ``candidate`` (e.g. the classifier's
      ``Params``); the cell is read from it (:func:`cell_of`).
    h: <float>[..., units]
    x: <float>[..., in_dim]
    cell: optional check: ``"tf1"`` or ``"reset_after"``; must match the params.
    activation: name in :data:`ACTIVATIONS` for the candidate; defaults to
      the params' own (a ``Params``), else tanh.

  Returns:
    h_new: <float>[..., units]

  Raises:
    ValueError: when the params' keys do not fit the cell, or ``h`` / ``x``
      do not fit the kernel's shape.
  """
  found, in_dim, units = check_weights(params)
  if cell is not None and check_cell(cell) != found:
    raise ValueError(
      f"cell={cell!r} but the params hold {found!r} weights"
      f" ({'with' if found == 'reset_after' else 'without'} a candidate"
      " recurrent_bias); drop cell= or pass matching params"
    )
  activation = activation or getattr(params, "activation", "tanh")
  h, x = jnp.asarray(h), jnp.asarray(x)
  if h.shape[-1:] != (units,) or x.shape[-1:] != (in_dim,) or h.shape[:-1] != x.shape[:-1]:
    raise ValueError(
      f"h has shape {h.shape} and x {x.shape}: the params expect"
      f" h [..., {units}] and x [..., {in_dim}] with the same leading dims"
    )
  for name, value in (("h", h), ("x", x)):
    if not jnp.issubdtype(value.dtype, jnp.floating):
      raise ValueError(f"{name} has dtype {value.dtype}: expected a floating dtype")
  weights = recurrent_weights(params, cell=found, in_dim=x.shape[-1])
  return recurrent_step(weights, h, project_inputs(params, x), cell=found, activation=activation)
