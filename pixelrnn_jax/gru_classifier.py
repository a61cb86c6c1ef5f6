"""A GRU that reads an image one pixel at a time and classifies after every pixel.

The notebook's model: a GRU scanned over the 784 pixels of an MNIST image,
logits from a linear readout after every step, the prediction at the last
step.

    params = gru_classifier.init(jax.random.key(0))      # 13,322 parameters
    logits = gru_classifier.apply(params, images)        # (B, 784, 10)
    loss = gru_classifier.cross_entropy(logits, labels)  # on logits[:, -1]

    model = gru_classifier.load_pretrained("pixel")      # or load("runs/x")
    logits = gru_classifier.apply(model, images)         # images in [0, 1]

A model carries its input contract: ``order`` (a static field) says how
images ``[B, 28, 28]`` or ``[B, 784]`` in [0, 1] become its input sequence
(see ``preprocessing``), and a model loaded from disk has its training-time
standardisation folded into the input projection, so it reads [0, 1] pixels
directly. Sequences ``[B, T, in_dim]`` pass through as given.

``params`` is a pytree named as the notebook's weights::

    {"gates":     {"kernel": [in_dim + units, 2 * units], "bias": [2 * units]},  # (r, u)
     "candidate": {"kernel": [in_dim + units, units],     "bias": [units]},
     "output":    {"kernel": [units, classes],            "bias": [classes]}}

reachable as ``params["gates"]["kernel"]`` or ``params.gates.kernel``. The cell
variant, activation and input order ride along as static (non-array) fields.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from pixelrnn_jax import fused_scan
from pixelrnn_jax import gru_cell
from pixelrnn_jax import model_io
from pixelrnn_jax import preprocessing
from pixelrnn_jax.gru_cell import Dense
from pixelrnn_jax.gru_cell import ResetAfterDense


@struct.dataclass
class Params(gru_cell._FieldMapping):  # noqa: SLF001 (the package's own base class)
  """All weights of the classifier; ``cell``, ``activation`` and ``order`` are static.

  ``order`` is how :func:`apply` turns images in [0, 1] into the input
  sequence: ``"pixel"``, ``"permuted"`` or ``"row"`` (``preprocessing``);
  ``None`` (a fresh :func:`init`) reads images row-major, pixel by pixel for
  ``in_dim`` 1 and row by row for ``in_dim`` 28.
  """

  gates: Dense  # kernel <float>[in_dim + units, 2 * units], bias <float>[2 * units]
  candidate: Dense | ResetAfterDense  # kernel <float>[in_dim + units, units]
  output: Dense  # kernel <float>[units, classes], bias <float>[classes]
  cell: str = struct.field(pytree_node=False, default="tf1")
  activation: str = struct.field(pytree_node=False, default="tanh")
  order: str | None = struct.field(pytree_node=False, default=None)

  def __post_init__(self):
    gru_cell.check_cell(self.cell)
    gru_cell.check_activation(self.activation)
    if self.order is not None:
      preprocessing.check_order(self.order)

  @property
  def num_units(self) -> int:
    return self.output.kernel.shape[0]

  @property
  def in_dim(self) -> int:
    return self.gates.kernel.shape[0] - self.num_units

  @property
  def num_classes(self) -> int:
    return self.output.kernel.shape[1]


NUM_CLASSES = 10  # MNIST digits


def init(
  key: jax.Array,
  *,
  num_units: int = 64,
  num_classes: int = NUM_CLASSES,
  in_dim: int = 1,
  cell: str = "tf1",
  activation: str = "tanh",
  dtype: jnp.dtype = jnp.float32,
  gate_bias_init: str = "constant",
  recurrent_init: str = "glorot",
  max_steps: int = 784,
  order: str | None = None,
) -> Params:
  """Initialises the classifier as the notebook's TF1 defaults.

  GRU kernels Glorot-uniform, gate bias 1.0, candidate bias 0; readout
  kernel truncated-normal (stddev 0.1, cut at 2 stddev), readout bias 0.
  ``gate_bias_init``, ``recurrent_init`` and ``max_steps`` choose other
  initialisations (see ``gru_cell.init_cell``). ``order`` is the input
  order images are read in (see :class:`Params`); it must fit ``in_dim``.

  Raises:
    ValueError: for a key that is no JAX PRNG key (a plain seed such as 0),
      an unknown cell, activation or order, a non-positive size, or an order
      that does not fit ``in_dim``.
  """
  gru_cell.check_cell(cell)
  gru_cell.check_activation(activation)
  for name, value in (("num_units", num_units), ("num_classes", num_classes), ("in_dim", in_dim)):
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name}={value!r}: expected a positive integer")
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"dtype={dtype!r}: expected a floating dtype such as float32")
  if order is not None and preprocessing.sequence_shape(order)[1] != in_dim:
    feeds = preprocessing.sequence_shape(order)[1]
    raise ValueError(
      f"order={order!r} feeds {feeds} value{'s' if feeds != 1 else ''} per step but"
      f" in_dim={in_dim}; pass in_dim={feeds}"
    )
  cell_key, output_key = jax.random.split(_check_key(key))
  cell_params = gru_cell.init_cell(
    cell_key,
    in_dim=in_dim,
    num_units=num_units,
    cell=cell,
    dtype=dtype,
    gate_bias_init=gate_bias_init,
    recurrent_init=recurrent_init,
    max_steps=max_steps,
  )
  output = Dense(
    kernel=jax.nn.initializers.truncated_normal(stddev=0.1)(
      output_key, (num_units, num_classes), dtype
    ),
    bias=jnp.zeros((num_classes,), dtype),
  )
  return Params(**cell_params, output=output, cell=cell, activation=activation, order=order)


def _check_key(key):
  """A JAX PRNG key (``jax.random.key(0)``, or the legacy ``PRNGKey(0)``), else ValueError."""
  typed = isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
  legacy = isinstance(key, jax.Array | np.ndarray) and key.shape == (2,) and key.dtype == np.uint32
  if not (typed or legacy):
    raise ValueError(
      f"key={key!r:.60}: expected a JAX PRNG key such as jax.random.key(0), not a seed"
    )
  return key


def count_params(params) -> int:
  """The number of scalar weights (13,322 for the default model)."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def check_params(params: Params) -> None:
  """Checks that ``params`` form a classifier: GRU cell shapes (``gru_cell.check_weights``),
  a readout ``output.kernel [units, classes]``, ``output.bias [classes]``, one dtype.

  Raises:
    ValueError: naming the shapes or dtypes that do not fit, or a params
      object that is not a ``Params`` (such as a plain dict of weights).
  """
  if not isinstance(params, Params):
    raise ValueError(
      f"params is a {type(params).__name__}, not a gru_classifier.Params: make it with"
      " gru_classifier.init or load, or from a dict of weights with"
      " gru_classifier.from_arrays(arrays, cell=..., activation=..., order=...)"
    )
  _, _, units = gru_cell.check_weights(params)
  kernel, bias = (tuple(params.output.kernel.shape), tuple(params.output.bias.shape))
  if len(kernel) != 2 or kernel[0] != units or bias != kernel[1:]:
    raise ValueError(
      f"params have output.kernel {kernel} and output.bias {bias}: expected"
      f" [{units}, classes] and [classes]"
    )
  params_dtype(params)


def params_dtype(params: Params) -> jnp.dtype:
  """The one floating dtype of all weights; ValueError when they mix dtypes."""
  dtypes = {jnp.dtype(leaf.dtype) for leaf in jax.tree_util.tree_leaves(params)}
  if len(dtypes) != 1:
    raise ValueError(
      f"params mix dtypes {sorted(map(str, dtypes))}: cast them to one,"
      " e.g. jax.tree.map(lambda w: w.astype(jnp.float32), params)"
    )
  return dtypes.pop()


def _shown(value: float) -> str:
  """A pixel value for a message: 3 digits, or as many as show it is outside [0, 1]."""
  text = f"{value:.3g}"
  if 0 <= float(text) <= 1 and not 0 <= value <= 1:
    text = f"{value:.9g}"
  return text


def as_sequence(params: Params, x) -> jax.Array:
  """Validates ``x`` and returns the model's input <float>[batch, T, in_dim].

  Accepted, in [0, 1] pixel units (a loaded model's scaling is folded in):

  - images ``[batch, 28, 28]`` or flat ``[batch, 784]``, put in the model's
    ``order`` (:class:`Params`);
  - sequences ``[batch, T, in_dim]``, used as given (already in order).

  Any floating dtype is accepted and cast to the params' dtype, which the
  whole computation runs in (float16 and bfloat16 images run in float32).

  Raises:
    ValueError: naming the bad shape, dtype or values and the fix: an
      unbatched image (add a batch axis: ``x[None]``), a shape that is neither
      images nor ``[batch, T, in_dim]``, integer pixels, an empty batch or
      sequence; when ``x`` is concrete (not under jit) also NaN or inf, and
      pixels outside [0, 1] in images or in the input of a model with an
      ``order`` (a loaded one), e.g. 0..255 pixels.
  """
  shape = getattr(x, "shape", None)
  dtype = getattr(x, "dtype", None)
  if shape is None or dtype is None:
    raise ValueError(f"x: expected an array, got {type(x).__name__}")
  shape = tuple(shape)
  check_params(params)
  in_dim = params.in_dim
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
      f"x has dtype {dtype}: expected a floating dtype (scale uint8 pixels"
      " to [0, 1] with x.astype(np.float32) / 255)"
    )
  expected = f"images [batch, 28, 28] or [batch, 784], or sequences [batch, T, {in_dim}]"
  if shape in ((28, 28), (784,)):
    raise ValueError(
      f"x has shape {shape}: one unbatched image; add a batch axis: x[None] (expected {expected})"
    )
  if len(shape) == 2 and shape[1] == in_dim and in_dim != 784:
    raise ValueError(
      f"x has shape {shape}: one unbatched sequence? add a batch axis:"
      f" x[None] (expected {expected})"
    )
  if len(shape) not in (2, 3):
    raise ValueError(f"x has shape {shape} (rank {len(shape)}): expected {expected}")
  if shape[0] == 0:
    raise ValueError(f"x has shape {shape}: the batch is empty")
  is_image = shape[1:] in (preprocessing.IMAGE_SHAPE, (preprocessing.NUM_PIXELS,))
  if len(shape) == 3 and shape[2] == in_dim:
    sequence = x  # sequences pass through (row order: identical to the image)
  elif is_image:
    order = params.order or {1: "pixel", 28: "row"}.get(in_dim)
    if order is None or preprocessing.sequence_shape(order)[1] != in_dim:
      raise ValueError(
        f"x has shape {shape}: images, but the model reads {in_dim} values"
        f" per step (order {params.order}); pass sequences [batch, T, {in_dim}]"
      )
    sequence = preprocessing.to_sequences(jnp.asarray(x), order)
  else:
    raise ValueError(f"x has shape {shape}: expected {expected}")
  if sequence.shape[1] == 0:
    raise ValueError(f"x has shape {shape}: the sequence is empty")
  if _is_concrete(x):
    values = np.asarray(x, np.float32)
    if not np.isfinite(values).all():
      raise ValueError(f"x has shape {shape} and contains NaN or inf: expected finite pixels")
    # Images, and any input of a model that knows its order (a loaded one), are
    # [0, 1] pixels; a bare model's sequences may be in any units.
    as_images = sequence is not x or params.order is not None
    # float32 rounding (e.g. an undone standardisation) may overshoot by an ulp or so.
    slack = 1e-6
    if as_images and (values.min() < -slack or values.max() > 1 + slack):
      raise ValueError(
        f"x has pixels in [{_shown(values.min())}, {_shown(values.max())}]: expected"
        " [0, 1] (divide 0..255 pixels by 255; do not standardise them:"
        " a loaded model does that itself)"
      )
  return jnp.asarray(sequence, params_dtype(params))


# "fused": custom_vjp with a hand-written backward (fused_scan.py), the default;
# "scan": autodiff through a plain lax.scan of gru_cell.recurrent_step, the reference.
IMPLS = ("fused", "scan")
DEFAULT_IMPL = "fused"
DEFAULT_UNROLL = 1


def check_impl(impl: str) -> str:
  if impl not in IMPLS:
    raise ValueError(f"unknown impl {impl!r}: expected one of {IMPLS}")
  return impl


def recurrent_dropout_mask(
  key: jax.Array, rate: float, shape: tuple[int, ...], dtype=jnp.float32
) -> jax.Array:
  """Recurrent dropout's mask on the candidate: 0 with probability ``rate``, else 1 / (1 - rate).

  One mask per sequence, the same at every step (Gal & Ghahramani 2016,
  arXiv:1512.05287; on the candidate as in Semeniuta et al. 2016,
  arXiv:1603.05118). Its mean is 1, so the model at test time is the plain
  GRU (no mask).

  Args:
    key: a PRNG key.
    rate: the drop probability, in [0, 1).
    shape: ``(batch, units)``.

  Raises:
    ValueError: ``rate`` outside [0, 1).
  """
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"recurrent_dropout={rate!r}: expected a drop probability in [0, 1)")
  keep = jax.random.bernoulli(key, 1.0 - rate, shape)
  return keep.astype(dtype) / jnp.asarray(1.0 - rate, dtype)


def hidden_states(
  params: Params,
  x: jax.Array,
  *,
  impl: str = DEFAULT_IMPL,
  unroll: int = DEFAULT_UNROLL,
  candidate_mask: jax.Array | None = None,
) -> jax.Array:
  """The hidden state after every step, time-major.

  Args:
    params: from :func:`init`.
    x: <float>[batch, T, in_dim]
    impl: ``"fused"`` (hand-written backward) or ``"scan"`` (autodiff reference).
    unroll: time steps per loop iteration.
    candidate_mask: None, or <float>[batch, units] from
      :func:`recurrent_dropout_mask` (training only).

  Returns:
    <float>[T, batch, units]
  """
  check_impl(impl)
  x = jnp.swapaxes(x, 0, 1)  # (T, B, in_dim)
  in_dim = x.shape[-1]
  weights = gru_cell.recurrent_weights(params, cell=params.cell, in_dim=in_dim)
  if impl == "fused":
    w_x = jnp.concatenate(
      [params.gates.kernel[:in_dim], params.candidate.kernel[:in_dim]], axis=1
    )  # (in_dim, 3 * units)
    b = jnp.concatenate([params.gates.bias, params.candidate.bias])
    try:
      return fused_scan.recurrence(
        params.cell, params.activation, unroll, x, w_x, b, weights, candidate_mask
      )
    except TypeError as error:
      # Forward mode (jax.jvp, jax.jacfwd) cannot enter a custom_vjp: the same
      # values come from autodiff through the plain scan below.
      if "custom_vjp" not in str(error):
        raise
  # Hoisted out of the loop: the input half of every step, for all T at once.
  projected = gru_cell.project_inputs(params, x)  # (T, B, 3 * units)

  def step(h, projected_t):
    h = gru_cell.recurrent_step(
      weights,
      h,
      projected_t,
      cell=params.cell,
      activation=params.activation,
      candidate_mask=candidate_mask,
    )
    return h, h

  h0 = jnp.zeros((x.shape[1], params.num_units), projected.dtype)
  _, hs = jax.lax.scan(step, h0, projected, unroll=unroll)
  return hs


def apply(
  params: Params,
  x,
  *,
  impl: str = DEFAULT_IMPL,
  unroll: int = DEFAULT_UNROLL,
  recurrent_dropout: float = 0.0,
  key: jax.Array | None = None,
) -> jax.Array:
  """Logits after every step, stacked (the notebook's ``logits_list``).

  Args:
    params: from :func:`init`, :func:`load` or :func:`load_pretrained`.
    x: images <float>[batch, 28, 28] or [batch, 784] in [0, 1], read in the
      model's ``order``; or sequences <float>[batch, T, in_dim] as given.
      Computed in the params' dtype (see :func:`as_sequence`).
    impl: ``"fused"`` (default, hand-written backward) or ``"scan"``
      (autodiff through a plain scan, the reference); same values. Forward
      mode (``jax.jvp``, ``jax.jacfwd``) of ``apply`` runs the scan core; a
      function already jit-compiled with the fused core cannot be
      differentiated in forward mode from outside: pass ``impl="scan"``.
    unroll: time steps per loop iteration.
    recurrent_dropout: training only: drop probability of the candidate's
      units (:func:`recurrent_dropout_mask`, one mask per sequence); 0 = the
      plain GRU, as at test time.
    key: the PRNG key of the dropout mask; required when ``recurrent_dropout > 0``.

  Returns:
    <float>[batch, T, num_classes]; ``logits[:, -1]`` is the prediction.

  Raises:
    ValueError: for a bad shape, dtype or value (see :func:`as_sequence`), or
      ``recurrent_dropout > 0`` without ``key``.
  """
  x = as_sequence(params, x)
  check_impl(impl)
  if recurrent_dropout:
    if key is None:
      raise ValueError(f"recurrent_dropout={recurrent_dropout!r} needs key=, a PRNG key")
    if not 0.0 <= recurrent_dropout < 1.0:
      raise ValueError(
        f"recurrent_dropout={recurrent_dropout!r}: expected a drop probability in [0, 1)"
      )
  else:
    key = None
  arguments = (params, x, key, recurrent_dropout)
  if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(arguments)):
    # Inside the caller's jit, grad or jvp: their trace is the one that compiles.
    return _logits(*arguments, impl=impl, unroll=unroll)
  # Called eagerly (a notebook, a service): one compilation per shape, dtype and
  # static setting, instead of a fresh scan trace and executable on every call.
  return _jitted_logits(*arguments, impl=impl, unroll=unroll)


def _logits(params, x, key, recurrent_dropout, *, impl, unroll) -> jax.Array:
  """:func:`apply` on validated sequences <float>[batch, T, in_dim]."""
  mask = None
  if key is not None:
    mask = recurrent_dropout_mask(key, recurrent_dropout, (x.shape[0], params.num_units), x.dtype)
  hs = hidden_states(params, x, impl=impl, unroll=unroll, candidate_mask=mask)  # (T, B, units)
  # Hoisted out of the loop: one readout matmul over all stacked states.
  logits = hs @ params.output.kernel + params.output.bias  # (T, B, classes)
  return jnp.swapaxes(logits, 0, 1)


_jitted_logits = jax.jit(_logits, static_argnames=("recurrent_dropout", "impl", "unroll"))


def check_labels(labels, num_classes: int = NUM_CLASSES, count: int | None = None) -> np.ndarray:
  """Concrete labels as <int32>[N], checked where the data enters (the trainer, ``evaluate``).

  Raises:
    ValueError: naming the shape, dtype or values and what was expected.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or (count is not None and len(labels) != count):
    raise ValueError(
      f"labels have shape {labels.shape}: expected [{count or 'N'}], one integer class per example"
    )
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(
      f"labels have dtype {labels.dtype}: expected integers in"
      f" [0, {num_classes}) (e.g. labels.astype(np.int32))"
    )
  bad = labels[(labels < 0) | (labels >= num_classes)]
  if bad.size:
    raise ValueError(f"labels contain {bad[:5].tolist()}: expected classes in [0, {num_classes})")
  return labels.astype(np.int32)


def _check_labels(logits: jax.Array, labels) -> jax.Array:
  """Validates labels where they enter; returns them as a JAX integer array."""
  if getattr(logits, "ndim", None) != 3:
    raise ValueError(
      f"logits have shape {getattr(logits, 'shape', None)}: expected [batch, T, classes] from apply"
    )
  shape = getattr(labels, "shape", None)
  if shape is None:
    raise ValueError(f"labels: expected an integer array, got {type(labels).__name__}")
  if tuple(shape) != logits.shape[:1]:
    raise ValueError(
      f"labels have shape {tuple(shape)}: expected [{logits.shape[0]}], one"
      " integer class per example"
    )
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(
      f"labels have dtype {labels.dtype}: expected integers in"
      f" [0, {logits.shape[-1]}) (e.g. labels.astype(np.int32))"
    )
  if _is_concrete(labels):
    check_labels(labels, logits.shape[-1])
  return jnp.asarray(labels)


def _losses(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """Per-example cross-entropy; NaN (loss and gradient) for an out-of-range label.

  With ``label_smoothing`` a > 0 the target is ``(1 - a) one_hot + a / classes``
  (Szegedy et al. 2016, "Rethinking the Inception architecture", section 7).
  """
  classes = logits.shape[-1]
  valid = (labels >= 0) & (labels < classes)
  safe = jnp.where(valid, labels, 0)
  if label_smoothing:
    targets = optax.smooth_labels(
      jax.nn.one_hot(safe, classes, dtype=logits.dtype), label_smoothing
    )
    losses = optax.softmax_cross_entropy(logits, targets)
  else:
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
  # A constant NaN factor makes that example's loss and gradient NaN (and
  # only that example's), so a traced training step with a bad label stops
  # at the trainer's non-finite check instead of training on class 0.
  return losses * jnp.where(valid, 1.0, jnp.nan).astype(losses.dtype)


def cross_entropy(logits: jax.Array, labels, *, label_smoothing: float = 0.0) -> jax.Array:
  """Mean softmax cross-entropy on the last step (the notebook's loss).

  Args:
    logits: <float>[batch, T, classes] from :func:`apply`.
    labels: <int>[batch], classes in [0, classes).
    label_smoothing: a in [0, 1): the target puts 1 - a + a / classes on the
      label and a / classes on every other class (Szegedy et al. 2016); 0 =
      the plain cross-entropy (the notebook's).

  Returns:
    <float>[]

  Raises:
    ValueError: for labels of the wrong shape or dtype, or (when concrete)
      out of range. Under ``jit`` the range cannot be checked: an
      out-of-range label makes the loss and its gradient NaN.
  """
  labels = _check_labels(logits, labels)
  return _losses(logits[:, -1], labels, label_smoothing).mean()


STEP_WEIGHTINGS = ("uniform", "linear")


def step_weights(steps: int, weighting: str = "uniform", dtype=jnp.float32) -> jax.Array:
  """<dtype>[steps] weights of the per-step loss, summing to 1.

  ``uniform``: 1 / T each. ``linear``: step t (1-based) weighs t / (T (T + 1) / 2),
  so the answers after most of the image has been read count most.

  Raises:
    ValueError: for an unknown ``weighting`` or ``steps`` < 1.
  """
  if weighting not in STEP_WEIGHTINGS:
    raise ValueError(f"weighting={weighting!r}: expected one of {STEP_WEIGHTINGS}")
  if steps < 1:
    raise ValueError(f"steps={steps!r}: expected >= 1")
  w = jnp.ones(steps, dtype) if weighting == "uniform" else jnp.arange(1, steps + 1, dtype=dtype)
  return w / jnp.sum(w)


def cross_entropy_per_step(
  logits: jax.Array, labels, weighting: str = "uniform", *, label_smoothing: float = 0.0
) -> jax.Array:
  """Softmax cross-entropy of every step's answer, <float>[].

  The mean over examples of ``sum_t w_t * CE(logits[:, t], labels)`` with the
  weights of :func:`step_weights` (``uniform``: the mean over every step and
  example). Labels, ``label_smoothing`` and errors as :func:`cross_entropy`.
  """
  labels = _check_labels(logits, labels)
  labels_t = jnp.broadcast_to(labels[:, None], logits.shape[:2])
  losses = _losses(logits, labels_t, label_smoothing)  # (B, T)
  weights = step_weights(logits.shape[1], weighting, losses.dtype)
  return jnp.mean(losses @ weights)


def distillation_loss(logits: jax.Array, teacher_logits, *, temperature: float = 1.0) -> jax.Array:
  """Knowledge distillation's soft-target term on the last step, <float>[].

  The mean over examples of ``T**2 * KL(softmax(teacher / T) || softmax(student / T))``
  (Hinton, Vinyals and Dean 2015, "Distilling the knowledge in a neural
  network", section 2: the ``T**2`` keeps its gradients' scale as ``T``
  changes). It is 0 where the model's last-step answer equals the teacher's, and
  differs from the cross-entropy with the soft targets by the targets' entropy,
  a constant: the same gradient.

  Args:
    logits: <float>[batch, T, classes] from :func:`apply`.
    teacher_logits: <float>[batch, classes], the teacher's logits or
      log-probabilities (a constant per row cancels); no gradient flows into them.
    temperature: T > 0; 1 = the models' own probabilities.

  Raises:
    ValueError: for shapes that do not match, or ``temperature`` <= 0.
  """
  if not temperature > 0:
    raise ValueError(f"temperature={temperature!r}: expected > 0")
  teacher_logits = jnp.asarray(teacher_logits)
  if logits.ndim != 3 or teacher_logits.shape != (logits.shape[0], logits.shape[2]):
    raise ValueError(
      f"teacher_logits have shape {tuple(teacher_logits.shape)} for logits of shape"
      f" {tuple(logits.shape)}: expected [batch, classes] ="
      f" {[logits.shape[0], logits.shape[-1]] if logits.ndim == 3 else '[batch, T, classes]'}"
    )
  student = jax.nn.log_softmax(logits[:, -1] / temperature)
  teacher = jax.nn.log_softmax(
    jax.lax.stop_gradient(teacher_logits).astype(student.dtype) / temperature
  )
  kl = jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1)
  return temperature**2 * jnp.mean(kl)


def accuracy(logits: jax.Array, labels) -> jax.Array:
  """Top-1 accuracy of the last step's prediction, <float>[].

  Raises:
    ValueError: as :func:`cross_entropy`; under ``jit`` an out-of-range
      label counts as wrong.
  """
  labels = _check_labels(logits, labels)
  return jnp.mean(jnp.argmax(logits[:, -1], axis=-1) == labels)


def accuracy_per_step(logits: jax.Array, labels) -> jax.Array:
  """<float>[T]: top-1 accuracy if the prediction were made after step t (as :func:`accuracy`)."""
  labels = _check_labels(logits, labels)
  return jnp.mean(jnp.argmax(logits, axis=-1) == labels[:, None], axis=0)


def fold_input_scaling(params: Params, *, mean: float, std: float) -> Params:
  """The same model for inputs ``x`` that ``params`` read as ``(x - mean) / std``.

  Every input value enters only through the affine input projection
  ``x_std @ W_x + b``; substituting ``x_std = (x - mean) / std`` gives
  ``x @ (W_x / std) + (b - mean / std * sum_i W_x[i])``, the same logits
  for every input (exact up to rounding). ``W_x`` is the first ``in_dim``
  rows of the gates' and the candidate's kernels; ``b`` their input biases
  (for reset_after ``b_in``; ``b_hn`` is recurrent and unchanged).
  """
  if not std > 0:
    raise ValueError(f"std={std!r}: expected > 0")
  in_dim = params.in_dim

  def fold(dense):
    w_x = dense.kernel[:in_dim]
    kernel = jnp.concatenate([w_x / std, dense.kernel[in_dim:]], axis=0)
    return dense.replace(kernel=kernel, bias=dense.bias - (mean / std) * w_x.sum(axis=0))

  return params.replace(gates=fold(params.gates), candidate=fold(params.candidate))


def from_arrays(
  arrays: dict, *, cell: str = "tf1", activation: str = "tanh", order: str | None = None
) -> Params:
  """Params from a state dict ``{"gates": {"kernel", "bias"}, ...}`` (a checkpoint's).

  Raises:
    ValueError: when the keys or shapes do not fit ``cell``.
  """
  gru_cell.check_cell(cell)
  candidate_keys = {"kernel", "bias"} | ({"recurrent_bias"} if cell == "reset_after" else set())
  try:
    got = {name: set(arrays[name]) for name in ("gates", "candidate", "output")}
  except (KeyError, TypeError) as error:
    raise ValueError(
      f"params have keys {sorted(arrays) if isinstance(arrays, dict) else arrays!r}:"
      " expected gates, candidate and output"
    ) from error
  expected = {
    "gates": {"kernel", "bias"},
    "candidate": candidate_keys,
    "output": {"kernel", "bias"},
  }
  if got != expected:
    raise ValueError(f"params have keys {got}: cell {cell!r} expects {expected}")
  array = lambda v: jnp.asarray(v)
  candidate_type = ResetAfterDense if cell == "reset_after" else Dense
  params = Params(
    gates=Dense(**{k: array(v) for k, v in arrays["gates"].items()}),
    candidate=candidate_type(**{k: array(v) for k, v in arrays["candidate"].items()}),
    output=Dense(**{k: array(v) for k, v in arrays["output"].items()}),
    cell=cell,
    activation=activation,
    order=order,
  )
  check_params(params)
  if order is not None and preprocessing.sequence_shape(order)[1] != params.in_dim:
    raise ValueError(f"order={order!r} does not fit in_dim={params.in_dim}")
  return params


def for_images(params: Params, *, order: str, standardize: bool) -> Params:
  """The trained ``params`` as a model that reads [0, 1] images in ``order``.

  ``standardize``: the params were trained on ``preprocessing.standardize``d
  inputs; the scaling is folded in (:func:`fold_input_scaling`).
  """
  if standardize:
    # The float32 constants preprocessing.standardize (and so training) used.
    params = fold_input_scaling(
      params,
      mean=float(np.float32(preprocessing.TRAIN_MEAN)),
      std=float(np.float32(preprocessing.TRAIN_STD)),
    )
  return params.replace(order=preprocessing.check_order(order))


def from_saved(saved: model_io.SavedModel) -> Params:
  """The model a :class:`model_io.SavedModel` holds, ready for [0, 1] images.

  Raises:
    CheckpointError: params or config that do not make a model.
  """
  config = saved.config
  try:
    params = from_arrays(
      saved.arrays, cell=config.get("cell", "tf1"), activation=config.get("activation", "tanh")
    )
    return for_images(
      params, order=config.get("order", "pixel"), standardize=bool(config.get("standardize", False))
    )
  except ValueError as error:
    raise model_io.CheckpointError(f"{saved.path}: {error}") from error


def load(source: str | os.PathLike) -> Params:
  """A saved model, ready for [0, 1] images: a run directory, a step directory, a
  weights file or ``pretrained:NAME``.

  A run directory gives its best checkpoint on valid (else its newest). The
  returned params read images in the order they were trained on, with any
  training-time standardisation folded in, so ``apply(load(source), images)``
  takes images in [0, 1] as ``data.load_mnist`` returns them. For the
  training config, step and card as well, read the source with
  ``model_io.read`` and build the model with :func:`from_saved`.

  Raises:
    FileNotFoundError: nothing loadable at ``source``.
    CheckpointError: a corrupt or foreign file.
  """
  return from_saved(model_io.read(source))


def load_pretrained(name: str = "pixel") -> Params:
  """Shipped weights by name (``model_io.available()`` lists them): ``"pixel"`` (pixel
  order, 99.02% valid), ``"permuted"`` (psMNIST, 95.60%), ``"anytime"`` (pixel order,
  trained to answer after every pixel, 98.62%), and the earlier ``"pixel-v2"`` (98.88%),
  ``"pixel-v1"`` (98.80%) and ``"permuted-v1"`` (95.42%); the name may also be given as ``"pretrained:pixel"``,
  as the command line and error hints say.

  The same as ``load("pretrained:" + name)``; ``model_io.card(name)`` has their card
  (recipe, step, seed, valid accuracy, SHA-256).

  Raises:
    FileNotFoundError: an unknown name (the message lists the available ones).
  """
  return load(model_io.PREFIX + name.removeprefix(model_io.PREFIX))
