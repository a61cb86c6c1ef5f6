"""Calibration of every step's answer: expected calibration error and a per-step temperature.

A classifier that answers after every pixel can stop early once its answer
is confident enough (``inference.predict``), but only if its confidence means
what it says. Two tools for that:

* :func:`expected_calibration_error` (ECE): the gap between confidence and
  accuracy, averaged over equal-width confidence bins (Naeini et al. 2015,
  "Obtaining Well Calibrated Probabilities Using Bayesian Binning";
  Guo et al. 2017, "On Calibration of Modern Neural Networks", eq. 3).
* :class:`Calibration` and :func:`fit`: temperature scaling (Guo et al. 2017,
  section 4.2) with one temperature per step: the answer after step t is
  ``softmax(logits_t / T_t)``. ``log T_t`` is piecewise linear in t between a
  few knots (9 by default), so a model's calibration is a few scalars, fitted
  by minimising the mean over steps of the negative log-likelihood on held-out
  data (never the test split). Dividing by ``T_t > 0`` keeps every step's
  top class, so accuracy after t steps is unchanged; only when early exit
  stops changes.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

BINS = 15  # Guo et al. 2017's choice


def expected_calibration_error(probabilities, labels, *, bins: int = BINS) -> float:
  """ECE of top-1 answers: ``sum_b |B_b| / N * |accuracy(B_b) - confidence(B_b)|``.

  Args:
    probabilities: <float>[N, classes], each row a distribution.
    labels: <int>[N]
    bins: equal-width bins over (0, 1]; a confidence c falls in bin
      ``ceil(c * bins) - 1``.

  Returns:
    ECE in [0, 1] (a fraction, not percent).

  Raises:
    ValueError: for mismatched shapes, no examples or bins < 1.
  """
  probabilities = np.asarray(probabilities, np.float64)
  labels = np.asarray(labels)
  if probabilities.ndim != 2 or labels.shape != probabilities.shape[:1] or not len(labels):
    raise ValueError(
      f"probabilities {probabilities.shape}, labels {labels.shape}: expected [N, classes] and [N],"
      " N >= 1"
    )
  confidence = probabilities.max(axis=1)
  correct = probabilities.argmax(axis=1) == labels
  return ece_from_sums(*bin_sums(confidence, correct, bins=bins), n=len(labels))


def bin_sums(confidence, correct, *, weight=None, bins: int = BINS):
  """Per-bin (count, sum of confidence, sum of correct), each <float>[..., bins].

  ``confidence`` and ``correct`` are [..., N] (NumPy or jax); ``weight``
  [N] (e.g. 0 for padding) scales each example. Sums add up across batches;
  :func:`ece_from_sums` turns them into the ECE.
  """
  if bins < 1:
    raise ValueError(f"bins={bins!r}: expected >= 1")
  xp = jnp if isinstance(confidence, jax.Array) else np
  index = xp.clip(xp.ceil(confidence * bins).astype(xp.int32) - 1, 0, bins - 1)
  one_hot = (index[..., None] == xp.arange(bins)).astype(confidence.dtype)  # (..., N, bins)
  if weight is not None:
    one_hot = one_hot * weight[:, None].astype(confidence.dtype)
  return (
    one_hot.sum(-2),
    (one_hot * confidence[..., None]).sum(-2),
    (one_hot * correct[..., None].astype(confidence.dtype)).sum(-2),
  )


def ece_from_sums(count, confidence_sum, correct_sum, *, n: int | None = None):
  """ECE from :func:`bin_sums` (over the last axis); ``n`` defaults to the total count."""
  count, confidence_sum, correct_sum = (
    np.asarray(a, np.float64) for a in (count, confidence_sum, correct_sum)
  )
  n = count.sum(-1) if n is None else n
  return np.abs(correct_sum - confidence_sum).sum(-1) / n


@dataclasses.dataclass(frozen=True)
class Calibration:
  """A per-step temperature: ``log T_t`` linear between ``(knots[i], log_temperatures[i])``.

  ``knots`` are step indices 0 .. T - 1 in increasing order (0-based: knot 0 is
  the answer after the first pixel); steps outside them take the nearest
  knot's value. Stored in a weights card as ``{"knots": [...],
  "log_temperatures": [...]}``.
  """

  knots: tuple[int, ...]
  log_temperatures: tuple[float, ...]

  def __post_init__(self):
    knots = tuple(int(k) for k in self.knots)
    logs = tuple(float(v) for v in self.log_temperatures)
    if not knots or len(knots) != len(logs):
      raise ValueError(
        f"calibration knots {knots} and log_temperatures {logs}: expected the same non-zero length"
      )
    if any(b <= a for a, b in zip(knots, knots[1:])) or knots[0] < 0:
      raise ValueError(f"calibration knots {knots}: expected increasing step indices >= 0")
    if not all(np.isfinite(logs)):
      raise ValueError(f"calibration log_temperatures {logs}: expected finite numbers")
    object.__setattr__(self, "knots", knots)
    object.__setattr__(self, "log_temperatures", logs)

  def temperatures(self, steps: int) -> np.ndarray:
    """<float32>[steps]: ``T_t`` for t = 0 .. steps - 1, all > 0.

    Raises:
      ValueError: a calibration fitted for another number of steps (its last
        knot is not ``steps - 1``), e.g. a pixel model's used on a row model.
    """
    if len(self.knots) > 1 and self.knots[-1] != steps - 1:
      raise ValueError(
        f"a calibration for {self.knots[-1] + 1} steps (knots {self.knots[0]}..{self.knots[-1]})"
        f" used on a model that reads {steps}: fit one for this model (pixelrnn-jax export)"
      )
    return np.exp(np.interp(np.arange(steps), self.knots, self.log_temperatures)).astype(np.float32)

  def to_dict(self) -> dict:
    return {"knots": list(self.knots), "log_temperatures": list(self.log_temperatures)}

  @classmethod
  def from_dict(cls, record: dict) -> Calibration:
    """Raises ValueError naming what is missing or wrong."""
    try:
      return cls(tuple(record["knots"]), tuple(record["log_temperatures"]))
    except (KeyError, TypeError, ValueError) as error:
      raise ValueError(
        f"calibration {record!r}: expected {{'knots': [...], 'log_temperatures': [...]}}"
      ) from error


def identity() -> Calibration:
  """T_t = 1 at every step, for any number of steps: the model as trained."""
  return Calibration((0,), (0.0,))


def default_knots(steps: int, count: int = 9) -> tuple[int, ...]:
  """``count`` evenly spaced step indices from 0 to ``steps - 1`` (fewer if steps is small)."""
  return tuple(sorted({int(round(k)) for k in np.linspace(0, steps - 1, count)}))


def _interpolation_matrix(knots, steps: int) -> np.ndarray:
  """<float32>[steps, K]: row t holds the weights of ``np.interp`` at t over the knots."""
  eye = np.eye(len(knots))
  return np.stack([np.interp(np.arange(steps), knots, eye[k]) for k in range(len(knots))], 1)


def mean_nll(logits, labels, log_temperatures_per_step):
  """Mean over steps and examples of ``-log softmax(logits_t / T_t)[label]``.

  logits <float>[N, T, C], labels <int>[N], log_temperatures_per_step <float>[T].
  """
  scaled = logits / jnp.exp(log_temperatures_per_step)[None, :, None]
  # A one-hot product, not a gather: the gather's gradient is a scatter that XLA
  # tries to constant-fold for minutes.
  target = jnp.sum(scaled * jax.nn.one_hot(labels, logits.shape[-1])[:, None], axis=-1)
  return jnp.mean(jax.nn.logsumexp(scaled, axis=-1) - target)


GRADIENT_TOLERANCE = 1e-6  # of the mean NLL's gradient in the log temperatures: converged


def fit(
  logits, labels, *, knots: tuple[int, ...] | None = None, iterations: int = 50
) -> Calibration:
  """The per-step temperature that minimises the mean NLL of every step's answer.

  Args:
    logits: <float>[N, T, classes], every step's logits on held-out data.
    labels: <int>[N]
    knots: step indices of the free parameters (default :func:`default_knots`).
    iterations: at most this many L-BFGS iterations (optax.lbfgs); the problem
      is smooth, with a few parameters, and converges in far fewer. It stops
      once the gradient's norm is under GRADIENT_TOLERANCE or an iteration no
      longer lowers the NLL: a converged line search then tries dozens of steps
      per iteration (an untrained model's export took minutes).

  Returns:
    The fitted :class:`Calibration`.
  """
  dtype = jnp.result_type(float)  # float32, or float64 under jax_enable_x64 (optax's own)
  logits = jnp.asarray(logits, dtype)
  labels = jnp.asarray(labels, jnp.int32)
  steps = logits.shape[1]
  knots = default_knots(steps) if knots is None else tuple(knots)
  basis = jnp.asarray(_interpolation_matrix(knots, steps), dtype)  # (T, K)

  solver = optax.lbfgs()
  # The data are arguments, not closed-over constants: XLA would constant-fold them.
  update = _lbfgs_update(solver)
  log_t = jnp.zeros(len(knots), dtype)
  state = solver.init(log_t)
  best = math.inf
  for _ in range(iterations):
    log_t, state = update(log_t, state, logits, labels, basis)
    value = float(otu.tree_get(state, "value"))
    if value >= best or float(otu.tree_norm(otu.tree_get(state, "grad"))) < GRADIENT_TOLERANCE:
      break
    best = value
  return Calibration(knots, tuple(np.asarray(log_t, np.float64).tolist()))


def _lbfgs_update(solver):
  @jax.jit
  def update(log_t, state, logits, labels, basis):
    def objective(log_t):
      return mean_nll(logits, labels, basis @ log_t)

    value, grad = optax.value_and_grad_from_state(objective)(log_t, state=state)
    updates, state = solver.update(grad, state, log_t, value=value, grad=grad, value_fn=objective)
    return optax.apply_updates(log_t, updates), state

  return update


# ----------------------------------------------------------------------------
# Early exit: a recommended threshold with its calibration

# Candidate thresholds for a recommendation: 0.5 .. 0.9, then 1 - 10^-k for
# k = 1.05 .. 5 in steps of 0.05 (0.911 .. 0.99999).
THRESHOLD_GRID = (0.5, 0.6, 0.7, 0.8, 0.9) + tuple(
  float(1 - 10 ** (-k / 20)) for k in range(21, 101)
)


@dataclasses.dataclass(frozen=True)
class EarlyExit:
  """A recorded early-exit rule: stop once ``softmax(logits_t / T_t)`` reaches ``threshold``.

  Stored in a weights card as ``card["early_exit"]`` (``to_dict``), beside
  what it measured when it was chosen.
  """

  threshold: float
  calibration: Calibration

  def __post_init__(self):
    number = isinstance(self.threshold, (int, float, np.floating)) and not isinstance(
      self.threshold, bool
    )
    if not number or not 0 < float(self.threshold) <= 1:  # NaN fails too
      raise ValueError(f"early-exit threshold {self.threshold!r}: expected a probability in (0, 1]")
    if not isinstance(self.calibration, Calibration):
      raise ValueError(f"early-exit calibration {self.calibration!r:.60}: expected a Calibration")
    object.__setattr__(self, "threshold", float(self.threshold))

  def to_dict(self) -> dict:
    return {"threshold": self.threshold, "calibration": self.calibration.to_dict()}

  @classmethod
  def from_card(cls, card: dict | None) -> EarlyExit | None:
    """The card's recorded rule; None when the card (or its ``early_exit``) is absent.

    Raises:
      ValueError: a recorded rule that is malformed, naming what is wrong.
    """
    record = (card or {}).get("early_exit")
    if record is None:
      return None
    if not isinstance(record, dict) or "threshold" not in record:
      raise ValueError(f"card early_exit {record!r}: expected {{'threshold', 'calibration'}}")
    calibration = record.get("calibration")
    return cls(
      record["threshold"],
      identity() if calibration is None else Calibration.from_dict(calibration),
    )


def first_reached(top, thresholds):
  """<int32>[K, N]: each example's first step with ``top >= threshold``, else the last.

  The early-exit rule, one definition for NumPy and jax arrays (``inference``
  uses it inside jit). ``top`` is <float>[N, T], ``thresholds`` <float>[K].
  """
  xp = jnp if isinstance(top, jax.Array) or isinstance(thresholds, jax.Array) else np
  steps = top.shape[-1]
  reached = (top[None] >= thresholds[:, None, None]) | (xp.arange(steps) == steps - 1)
  return xp.argmax(reached, axis=-1).astype(xp.int32)


def early_exit_table(top, correct, thresholds) -> list[dict]:
  """Accuracy and mean steps read when each example stops at its first ``top >= threshold``.

  Args:
    top: <float>[N, T] top (calibrated) probability after each step.
    correct: <bool>[N, T] whether the answer after each step is right.
    thresholds: probabilities in (0, 1].

  Returns:
    One ``{"threshold", "accuracy", "mean_steps"}`` per threshold, in order
    (the same numbers ``inference.evaluate`` reports).
  """
  top, correct = np.asarray(top), np.asarray(correct)
  n = top.shape[0]
  rows = []
  for threshold in thresholds:  # one at a time: [K, N, T] of a whole grid is gigabytes
    (exits,) = first_reached(top, np.float32([threshold]))
    rows.append(
      {
        "threshold": float(threshold),
        "accuracy": float(correct[np.arange(n), exits].mean()),
        "mean_steps": float((exits + 1).mean()),
      }
    )
  return rows


def recommend(
  logits, labels, calibration: Calibration, *, max_drop: float, thresholds=THRESHOLD_GRID
) -> tuple[EarlyExit, list[dict]]:
  """The threshold that reads fewest steps while losing at most ``max_drop`` accuracy.

  Args:
    logits: <float>[N, T, classes] on held-out data (not the test split).
    labels: <int>[N]
    calibration: applied to the confidences (the answers do not change).
    max_drop: allowed accuracy loss against reading every step, a fraction
      (0.0025 = a quarter of a point).
    thresholds: the candidates.

  Returns:
    (the rule, the table of every candidate on these data).
  """
  logits = np.asarray(logits, np.float32)
  labels = np.asarray(labels)
  temperatures = calibration.temperatures(logits.shape[1])
  top = np.asarray(jax.nn.softmax(logits / temperatures[:, None], axis=-1).max(axis=-1))
  correct = logits.argmax(axis=-1) == labels[:, None]
  rows = early_exit_table(top, correct, thresholds)
  floor = correct[:, -1].mean() - max_drop
  # Float rounding of the last step's accuracy must not exclude reading everything.
  allowed = [r for r in rows if r["accuracy"] >= floor - 1e-9] or rows[-1:]
  best = min(allowed, key=lambda r: (r["mean_steps"], -r["accuracy"]))
  return EarlyExit(best["threshold"], calibration), rows
