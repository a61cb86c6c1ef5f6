"""A GRU that reads an image one pixel at a time and classifies after every pixel.

The notebook's model: a GRU scanned over the 784 pixels of an MNIST image,
logits from a linear readout after every step, the prediction at the last
step.

    params = gru_classifier.init(jax.random.key(0))      # 13,322 parameters
    logits = gru_classifier.apply(params, images)        # (B, 784, 10)
    loss = gru_classifier.cross_entropy(logits, labels)  # on logits[:, -1]

``params`` is a pytree named as the notebook's weights::

    {"gates":     {"kernel": [in_dim + units, 2 * units], "bias": [2 * units]},  # (r, u)
     "candidate": {"kernel": [in_dim + units, units],     "bias": [units]},
     "output":    {"kernel": [units, classes],            "bias": [classes]}}

reachable as ``params["gates"]["kernel"]`` or ``params.gates.kernel``. The cell
variant and activation ride along as static (non-array) fields.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from pixelrnn_jax import fused_scan
from pixelrnn_jax import gru_cell
from pixelrnn_jax.gru_cell import Dense, ResetAfterDense  # noqa: F401 (re-export)


@struct.dataclass
class Params(gru_cell._FieldMapping):  # pylint: disable=protected-access
  """All weights of the classifier; ``cell`` and ``activation`` are static."""

  gates: Dense  # kernel <float>[in_dim + units, 2 * units], bias <float>[2 * units]
  candidate: Dense | ResetAfterDense  # kernel <float>[in_dim + units, units]
  output: Dense  # kernel <float>[units, classes], bias <float>[classes]
  cell: str = struct.field(pytree_node=False, default="tf1")
  activation: str = struct.field(pytree_node=False, default="tanh")

  @property
  def num_units(self) -> int:
    return self.output.kernel.shape[0]

  @property
  def in_dim(self) -> int:
    return self.gates.kernel.shape[0] - self.num_units

  @property
  def num_classes(self) -> int:
    return self.output.kernel.shape[1]


def init(
    key: jax.Array,
    *,
    num_units: int = 64,
    num_classes: int = 10,
    in_dim: int = 1,
    cell: str = "tf1",
    activation: str = "tanh",
    dtype: jnp.dtype = jnp.float32,
    gate_bias_init: str = "constant",
    recurrent_init: str = "glorot",
    max_steps: int = 784,
) -> Params:
  """Initialises the classifier as the notebook's TF1 defaults.

  GRU kernels Glorot-uniform, gate bias 1.0, candidate bias 0; readout
  kernel truncated-normal (stddev 0.1, cut at 2 stddev), readout bias 0.
  ``gate_bias_init``, ``recurrent_init`` and ``max_steps`` choose other
  initialisations (see ``gru_cell.init_cell``).

  Raises:
    ValueError: for an unknown cell or activation, or a non-positive size.
  """
  gru_cell.check_cell(cell)
  gru_cell.check_activation(activation)
  for name, value in (("num_units", num_units), ("num_classes", num_classes),
                      ("in_dim", in_dim)):
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name}={value!r}: expected a positive integer")
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"dtype={dtype!r}: expected a floating dtype such as float32")
  cell_key, output_key = jax.random.split(key)
  cell_params = gru_cell.init_cell(
      cell_key, in_dim=in_dim, num_units=num_units, cell=cell, dtype=dtype,
      gate_bias_init=gate_bias_init, recurrent_init=recurrent_init, max_steps=max_steps,
  )
  output = Dense(
      kernel=jax.nn.initializers.truncated_normal(stddev=0.1)(
          output_key, (num_units, num_classes), dtype
      ),
      bias=jnp.zeros((num_classes,), dtype),
  )
  return Params(**cell_params, output=output, cell=cell, activation=activation)


def count_params(params) -> int:
  """The number of scalar weights (13,322 for the default model)."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))


def as_sequence(x, in_dim: int) -> jax.Array:
  """Validates ``x`` and returns it as <float>[batch, T, in_dim].

  Accepts ``[batch, T, in_dim]``; with ``in_dim == 1`` also images
  ``[batch, H, W]`` and flat ``[batch, H * W]``, read row-major pixel by pixel
  (the notebook's order). A ``[batch, L]`` input with ``in_dim > 1`` is read as
  ``L / in_dim`` steps of ``in_dim`` values (e.g. rows of 28).

  Raises:
    ValueError: naming the bad shape or dtype and what was expected.
  """
  shape = getattr(x, "shape", None)
  dtype = getattr(x, "dtype", None)
  if shape is None or dtype is None:
    raise ValueError(f"x: expected an array, got {type(x).__name__}")
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
        f"x has dtype {dtype}: expected a floating dtype (scale uint8 pixels"
        " to [0, 1] with x.astype(np.float32) / 255)"
    )
  if len(shape) not in (2, 3):
    raise ValueError(
        f"x has shape {tuple(shape)} (rank {len(shape)}): expected"
        f" [batch, T, {in_dim}], [batch, 28, 28] or [batch, 784]"
    )
  if shape[0] == 0:
    raise ValueError(f"x has shape {tuple(shape)}: the batch is empty")
  batch = shape[0]
  if len(shape) == 3 and shape[2] == in_dim:
    sequence = x
  elif len(shape) == 3 and in_dim == 1:
    sequence = jnp.reshape(x, (batch, shape[1] * shape[2], 1))
  elif len(shape) == 2 and shape[1] % in_dim == 0:
    sequence = jnp.reshape(x, (batch, shape[1] // in_dim, in_dim))
  else:
    raise ValueError(
        f"x has shape {tuple(shape)}: its last dimension does not match the"
        f" model's in_dim={in_dim}; expected [batch, T, {in_dim}]"
    )
  if sequence.shape[1] == 0:
    raise ValueError(f"x has shape {tuple(shape)}: the sequence is empty")
  return sequence


# "fused": custom_vjp with a hand-written backward (fused_scan.py), the default;
# "scan": autodiff through a plain lax.scan of gru_cell.recurrent_step, the reference.
IMPLS = ("fused", "scan")
DEFAULT_IMPL = "fused"
DEFAULT_UNROLL = 1


def check_impl(impl: str) -> str:
  if impl not in IMPLS:
    raise ValueError(f"unknown impl {impl!r}: expected one of {IMPLS}")
  return impl


def hidden_states(params: Params, x: jax.Array, *, impl: str = DEFAULT_IMPL,
                  unroll: int = DEFAULT_UNROLL) -> jax.Array:
  """The hidden state after every step, time-major.

  Args:
    params: from :func:`init`.
    x: <float>[batch, T, in_dim]
    impl: ``"fused"`` (hand-written backward) or ``"scan"`` (autodiff reference).
    unroll: time steps per loop iteration.

  Returns:
    <float>[T, batch, units]
  """
  check_impl(impl)
  x = jnp.swapaxes(x, 0, 1)  # (T, B, in_dim)
  in_dim = x.shape[-1]
  weights = gru_cell.recurrent_weights(params, cell=params.cell, in_dim=in_dim)
  if impl == "fused":
    w_x = jnp.concatenate([params.gates.kernel[:in_dim], params.candidate.kernel[:in_dim]],
                          axis=1)  # (in_dim, 3 * units)
    b = jnp.concatenate([params.gates.bias, params.candidate.bias])
    return fused_scan.recurrence(params.cell, params.activation, unroll, x, w_x, b, weights)
  # Hoisted out of the loop: the input half of every step, for all T at once.
  projected = gru_cell.project_inputs(params, x)  # (T, B, 3 * units)

  def step(h, projected_t):
    h = gru_cell.recurrent_step(
        weights, h, projected_t, cell=params.cell, activation=params.activation
    )
    return h, h

  h0 = jnp.zeros((x.shape[1], params.num_units), projected.dtype)
  _, hs = jax.lax.scan(step, h0, projected, unroll=unroll)
  return hs


def apply(params: Params, x, *, impl: str = DEFAULT_IMPL,
          unroll: int = DEFAULT_UNROLL) -> jax.Array:
  """Logits after every step, stacked (the notebook's ``logits_list``).

  Args:
    params: from :func:`init`.
    x: <float>[batch, T, in_dim]; with in_dim 1 also [batch, 28, 28] or
      [batch, 784] images, read row-major pixel by pixel.
    impl: ``"fused"`` (default, hand-written backward) or ``"scan"``
      (autodiff through a plain scan, the reference); same values.
    unroll: time steps per loop iteration.

  Returns:
    <float>[batch, T, num_classes]; ``logits[:, -1]`` is the prediction.

  Raises:
    ValueError: for a bad shape or dtype (see :func:`as_sequence`).
  """
  x = as_sequence(x, params.in_dim)
  hs = hidden_states(params, x, impl=impl, unroll=unroll)  # (T, B, units)
  # Hoisted out of the loop: one readout matmul over all stacked states.
  logits = hs @ params.output.kernel + params.output.bias  # (T, B, classes)
  return jnp.swapaxes(logits, 0, 1)


def _check_labels(logits: jax.Array, labels: jax.Array) -> None:
  if logits.ndim != 3:
    raise ValueError(
        f"logits have shape {logits.shape}: expected [batch, T, classes] from apply"
    )
  if labels.shape != logits.shape[:1]:
    raise ValueError(
        f"labels have shape {labels.shape}: expected [{logits.shape[0]}], one"
        " integer class per example"
    )
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels have dtype {labels.dtype}: expected integers")


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy on the last step (the notebook's loss)."""
  _check_labels(logits, labels)
  return optax.softmax_cross_entropy_with_integer_labels(
      logits[:, -1], labels
  ).mean()


def cross_entropy_per_step(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy over every step and example."""
  _check_labels(logits, labels)
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, labels[:, None]
  ).mean()


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Top-1 accuracy of the last step's prediction."""
  _check_labels(logits, labels)
  return jnp.mean(jnp.argmax(logits[:, -1], axis=-1) == labels)


def accuracy_per_step(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """<float>[T]: top-1 accuracy if the prediction were made after step t."""
  _check_labels(logits, labels)
  return jnp.mean(jnp.argmax(logits, axis=-1) == labels[:, None], axis=0)


def load_pretrained(name: str = "pixel") -> Params:
  """Shipped trained weights (``pixelrnn_jax/pretrained/<name>.*``), checksum-verified.

  The config they were trained with (order, standardisation) is in
  ``pixelrnn_jax.pretrained.metadata(name)``.
  """
  from pixelrnn_jax import pretrained, train  # pylint: disable=import-outside-toplevel
  params, _, _ = train.load_model(pretrained.PREFIX + name)
  return params
