"""The library called in a loop (a notebook, a service): one compilation per
shape, thresholds as arrays, traced thresholds, and the early-exit boundary."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixelrnn_jax import gru_classifier
from pixelrnn_jax import inference


class CompileCounter:
  """Counts XLA backend compilations through JAX's monitoring events."""

  EVENT = "/jax/core/compile/backend_compile_duration"

  def __init__(self):
    self.count = 0
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event, duration, **kwargs):
    del duration, kwargs
    if event == self.EVENT:
      self.count += 1


COUNTER = CompileCounter()


def _model(units=6):
  return gru_classifier.init(jax.random.key(0), num_units=units)


@pytest.mark.parametrize(
  "entry",
  [
    lambda model, x, y: gru_classifier.apply(model, x),
    lambda model, x, y: gru_classifier.apply(model, x, impl="scan"),
    lambda model, x, y: gru_classifier.accuracy_per_step(gru_classifier.apply(model, x), y),
    lambda model, x, y: inference.predict(model, x, threshold=0.9),
    lambda model, x, y: inference.evaluate(model, x, y, early_exit_thresholds=(0.9,)),
  ],
  ids=["apply", "apply-scan", "accuracy_per_step", "predict", "evaluate"],
)
def test_a_public_entry_called_eagerly_compiles_once_per_shape(entry):
  model = _model()
  rng = np.random.default_rng(0)
  y = np.arange(3) % 10
  entry(model, rng.uniform(size=(3, 12, 1)).astype(np.float32), y)  # compiles
  before = COUNTER.count
  for _ in range(15):  # new values, same shape and dtype
    out = entry(model, rng.uniform(size=(3, 12, 1)).astype(np.float32), y)
  jax.block_until_ready(out)
  assert COUNTER.count == before, f"{COUNTER.count - before} compilations in 15 calls"
  entry(model, rng.uniform(size=(5, 12, 1)).astype(np.float32), np.arange(5))  # a new shape
  assert COUNTER.count > before


def test_eager_apply_equals_the_traced_one_and_forward_mode_still_works():
  model = _model()
  x = np.random.default_rng(1).uniform(size=(2, 9, 1)).astype(np.float32)
  eager = gru_classifier.apply(model, x)
  np.testing.assert_allclose(jax.jit(gru_classifier.apply)(model, x), eager, rtol=1e-6)
  primal, _ = jax.jvp(lambda p: gru_classifier.apply(p, x), (model,), (model,))
  np.testing.assert_allclose(primal, eager, rtol=1e-5, atol=1e-6)


def test_evaluate_takes_thresholds_as_an_array_and_refuses_nan():
  model = _model()
  x = np.random.default_rng(2).uniform(size=(4, 10, 1)).astype(np.float32)
  y = np.arange(4)
  as_tuple = inference.evaluate(model, x, y, early_exit_thresholds=(0.2, 0.9))
  as_array = inference.evaluate(model, x, y, early_exit_thresholds=np.array([0.2, 0.9]))
  assert as_array["early_exit"] == as_tuple["early_exit"]
  for bad in (np.array([0.5, np.nan]), [0.0], [1.5]):
    with pytest.raises(ValueError, match="expected a probability in"):
      inference.evaluate(model, x, y, early_exit_thresholds=bad)


@pytest.mark.parametrize("threshold", [float("nan"), 0.0, -1.0, 2.0])
def test_a_traced_bad_threshold_gives_no_answer(threshold):
  model = _model()
  x = np.random.default_rng(3).uniform(size=(3, 8, 1)).astype(np.float32)
  out = jax.jit(lambda t: inference.predict(model, x, threshold=t))(threshold)
  assert (np.asarray(out["label"]) == -1).all()
  assert np.isnan(out["probability"]).all()
  good = jax.jit(lambda t: inference.predict(model, x, threshold=t))(0.5)
  assert (np.asarray(good["label"]) >= 0).all()


def _uniform_model(steps_dim=1):
  """Every weight 0: after every step the logits are 0 and each class has exactly 0.1."""
  model = gru_classifier.init(jax.random.key(0), num_units=4, in_dim=steps_dim)
  return jax.tree.map(jnp.zeros_like, model)


def test_early_exit_fires_when_the_probability_is_exactly_the_threshold():
  model = _uniform_model()
  x = np.full((2, 7, 1), 0.5, np.float32)
  assert float(jax.nn.softmax(jnp.zeros(10))[0]) == np.float32(0.1)  # exactly representable
  out = inference.predict(model, x, threshold=np.float32(0.1))
  np.testing.assert_array_equal(out["steps"], [1, 1])  # reached at step 1: >=, not >
  result = inference.evaluate(model, x, np.zeros(2, np.int64), early_exit_thresholds=(0.1,))
  assert result["early_exit"][0]["mean_steps"] == 1.0
  above = inference.predict(model, x, threshold=np.float32(0.1000001))
  np.testing.assert_array_equal(above["steps"], [7, 7])  # never reached: reads everything
