"""Anytime reading: the per-step loss, the expected calibration error, the per-step
temperature and the recorded early-exit rule, against NumPy references."""

import json

import jax
import numpy as np
import pytest
import scipy.special
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from pixelrnn_jax import calibration
from pixelrnn_jax import cli
from pixelrnn_jax import gru_classifier
from pixelrnn_jax import inference
from pixelrnn_jax import model_io
from pixelrnn_jax.training import config as config_lib
from pixelrnn_jax.training import loop
from pixelrnn_jax.training import step as step_lib
from tests.helpers import SMALL


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.mark.parametrize("weighting", ["uniform", "linear"])
def test_per_step_loss_matches_numpy(weighting):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(5, 7, 10)).astype(np.float64)
  labels = rng.integers(0, 10, size=5)
  per_step_ce = -_np_log_softmax(logits)[np.arange(5), :, labels]  # (B, T)
  w = np.ones(7) if weighting == "uniform" else np.arange(1, 8, dtype=np.float64)
  expected = (per_step_ce @ (w / w.sum())).mean()
  got = gru_classifier.cross_entropy_per_step(logits, labels, weighting)  # x64 (conftest)
  np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_training_loss_adds_the_weighted_per_step_term():
  params = gru_classifier.init(jax.random.key(0), num_units=8, in_dim=28)
  rng = np.random.default_rng(1)
  x = rng.uniform(size=(4, 28, 28)).astype(np.float32)
  labels = rng.integers(0, 10, size=4)
  plain, logits = step_lib.loss_fn(params, x, labels)
  linear, _ = step_lib.loss_fn(params, x, labels, per_step_loss=0.5, per_step_weighting="linear")
  ce = -_np_log_softmax(np.asarray(logits, np.float64))[np.arange(4), :, labels]
  w = np.arange(1, 29) / np.arange(1, 29).sum()
  np.testing.assert_allclose(linear - plain, 0.5 * (ce @ w).mean(), rtol=1e-5)


def test_step_weights_refuse_unknown_kinds():
  with pytest.raises(ValueError, match="weighting='quadratic'"):
    gru_classifier.step_weights(4, "quadratic")


def _np_ece(probabilities, labels, bins=15):
  """Guo et al. 2017 eq. 3, one bin at a time."""
  confidence = probabilities.max(1)
  correct = probabilities.argmax(1) == labels
  total = 0.0
  for b in range(bins):
    lo, hi = b / bins, (b + 1) / bins
    inside = (confidence > lo) & (confidence <= hi)
    if inside.any():
      total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
  return total


@settings(max_examples=30, deadline=None)
@given(
  st.integers(1, 60),
  st.integers(2, 10),
  st.floats(0.1, 10.0),
  st.integers(0, 2**31 - 1),
)
def test_ece_matches_the_binned_definition(n, classes, sharpness, seed):
  rng = np.random.default_rng(seed)
  probabilities = np.asarray(jax.nn.softmax(sharpness * rng.normal(size=(n, classes))))
  labels = rng.integers(0, classes, size=n)
  got = calibration.expected_calibration_error(probabilities, labels)
  np.testing.assert_allclose(got, _np_ece(probabilities.astype(np.float64), labels), atol=1e-9)


def test_ece_of_a_perfectly_calibrated_and_of_an_overconfident_model():
  right = np.tile([[1.0, 0.0]], (10, 1))
  assert calibration.expected_calibration_error(right, np.zeros(10, int)) == 0
  # Always 90% sure, right half the time: ECE 0.4.
  sure = np.tile([[0.9, 0.1]], (10, 1))
  labels = np.array([0, 1] * 5)
  np.testing.assert_allclose(calibration.expected_calibration_error(sure, labels), 0.4)
  with pytest.raises(ValueError, match="expected \\[N, classes\\]"):
    calibration.expected_calibration_error(sure, labels[:3])


def _miscalibrated(n=3000, steps=40, classes=10, seed=0):
  """Logits whose right temperature is known at every step.

  y is uniform and z_t = a_t e_y + N(0, I), so p(y | z_t) = softmax(a_t z_t)
  exactly (equal-variance Gaussian classes); the model reports s_t a_t z_t,
  under-confident early (s = 0.5) and over-confident late (s = 3), so the
  right temperature at step t is s_t.
  """
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, classes, size=n)
  a = np.linspace(0.3, 3.0, steps)[None, :, None]
  z = a * np.eye(classes)[labels][:, None] + rng.normal(size=(n, steps, classes))
  scale = np.linspace(0.5, 3.0, steps)
  return (scale[None, :, None] * a * z).astype(np.float32), labels, scale


def test_temperature_fit_lowers_ece_and_nll_on_known_miscalibration():
  logits, labels, scale = _miscalibrated()
  fitted = calibration.fit(logits, labels)
  temperatures = fitted.temperatures(logits.shape[1])
  np.testing.assert_allclose(temperatures, scale, rtol=0.2)
  for t in (0, 39):
    raw = np.asarray(jax.nn.softmax(logits[:, t]))
    scaled = np.asarray(jax.nn.softmax(logits[:, t] / temperatures[t]))
    before = calibration.expected_calibration_error(raw, labels)
    after = calibration.expected_calibration_error(scaled, labels)
    assert after < 0.5 * before, (t, before, after)
    np.testing.assert_array_equal(raw.argmax(1), scaled.argmax(1))  # answers unchanged
  ones = np.zeros(logits.shape[1], np.float32)
  assert calibration.mean_nll(logits, labels, np.log(temperatures)) < calibration.mean_nll(
    logits, labels, ones
  )


def test_calibration_interpolates_log_temperature_between_knots():
  c = calibration.Calibration((0, 10, 20), (0.0, np.log(4.0), np.log(4.0)))
  np.testing.assert_allclose(c.temperatures(21)[[0, 5, 10, 20]], [1.0, 2.0, 4.0, 4.0], rtol=1e-6)
  np.testing.assert_array_equal(calibration.identity().temperatures(7), np.ones(7))
  assert calibration.Calibration.from_dict(json.loads(json.dumps(c.to_dict()))) == c
  with pytest.raises(ValueError, match="increasing"):
    calibration.Calibration((5, 5), (0.0, 0.0))
  with pytest.raises(ValueError, match="finite"):
    calibration.Calibration((0, 5), (0.0, float("nan")))
  with pytest.raises(ValueError, match="knots"):
    calibration.Calibration.from_dict({"knots": [0]})


def test_early_exit_rule_from_a_card():
  assert calibration.EarlyExit.from_card(None) is None
  assert calibration.EarlyExit.from_card({"valid_accuracy": 0.9}) is None
  rule = calibration.EarlyExit(0.99, calibration.identity())
  assert calibration.EarlyExit.from_card({"early_exit": rule.to_dict()}) == rule
  for bad in ({"threshold": 1.5}, {"threshold": float("nan")}, [0.9], {"calibration": {}}):
    with pytest.raises(ValueError):
      calibration.EarlyExit.from_card({"early_exit": bad})


def test_recommend_reads_fewest_steps_within_the_allowed_drop():
  logits, labels, _ = _miscalibrated(n=1000)
  fitted = calibration.fit(logits, labels)
  rule, rows = calibration.recommend(logits, labels, fitted, max_drop=0.02)
  read_all = (logits[:, -1].argmax(-1) == labels).mean()
  allowed = [r for r in rows if r["accuracy"] >= read_all - 0.02]
  chosen = next(r for r in rows if r["threshold"] == rule.threshold)
  assert chosen["mean_steps"] == min(r["mean_steps"] for r in allowed)
  assert chosen["accuracy"] >= read_all - 0.02
  # The table is what inference's exit rule gives on the same logits.
  exits = np.asarray(
    inference.exit_steps(logits, np.float32([rule.threshold]), fitted.temperatures(40))
  )[0]
  np.testing.assert_allclose(chosen["mean_steps"], (exits + 1).mean())


def test_predict_and_evaluate_stop_at_the_same_calibrated_step():
  """The while-loop exit of ``predict`` and the full-pass exit of ``evaluate``
  agree under a calibration (same rule, two implementations)."""
  params = gru_classifier.init(jax.random.key(3), num_units=16, in_dim=28, order="row")
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(64, 28, 28)).astype(np.float32)
  labels = rng.integers(0, 10, size=64)
  fitted = calibration.Calibration((0, 13, 27), (1.5, -2.0, -1.0))
  logits = np.asarray(gru_classifier.apply(params, images))
  top = np.asarray(jax.nn.softmax(logits / fitted.temperatures(28)[:, None]).max(-1))
  threshold = float(np.quantile(top, 0.6))
  out = inference.predict(params, images, threshold=threshold, calibration=fitted)
  result = inference.evaluate(
    params, images, labels, early_exit_thresholds=(threshold,), calibration=fitted
  )
  row = result["early_exit"][0]
  np.testing.assert_allclose(row["mean_steps"], np.mean(out["steps"]), rtol=1e-6)
  np.testing.assert_allclose(row["accuracy"], np.mean(np.asarray(out["label"]) == labels))
  assert 1 < np.mean(out["steps"]) < 28
  probs = np.asarray(out["probabilities"])
  np.testing.assert_allclose(
    row["ece"], calibration.expected_calibration_error(probs, labels), atol=1e-6
  )
  assert set(result["calibration_error"]) == {"14", "21", "28"}


def test_predict_early_needs_a_recorded_rule(tmp_path, toy_data, capsys):
  workdir = tmp_path / "run"
  loop.train_and_evaluate(config_lib.Config(**SMALL), workdir, progress=False)
  image = tmp_path / "x.npy"
  np.save(image, np.zeros((28, 28), np.float32))
  capsys.readouterr()
  assert cli.main(["predict", "--checkpoint", str(workdir), "--early", str(image)]) == 2
  err = capsys.readouterr().err
  assert "records no early-exit threshold" in err and "pixelrnn-jax export" in err
  code = cli.main(
    ["predict", "--checkpoint", str(workdir), "--early", "--confidence", "0.9", str(image)]
  )
  assert code == 2 and "give --early or --confidence" in capsys.readouterr().err


def test_the_fit_stops_once_converged_at_the_optimum_of_each_step(monkeypatch):
  """With one knot per step, each step's temperature is an independent 1-D problem:
  the NLL's minimum over a fine grid of temperatures is the reference. An untrained
  model's export spent minutes in line searches after convergence."""
  logits, labels, _ = _miscalibrated(n=2000, steps=6)
  calls = []
  real = calibration._lbfgs_update

  def counted(solver):
    update = real(solver)
    return lambda *args: (calls.append(1), update(*args))[1]

  monkeypatch.setattr(calibration, "_lbfgs_update", counted)
  steps = logits.shape[1]
  fitted = calibration.fit(logits, labels, knots=tuple(range(steps)), iterations=100)
  assert len(calls) < 100
  grid = np.exp(np.linspace(-2, 2, 801))  # temperatures 0.14 .. 7.4
  best = []
  for t in range(steps):
    scaled = logits[:, t, None, :].astype(np.float64) / grid[None, :, None]
    logp = scaled - scipy.special.logsumexp(scaled, axis=-1, keepdims=True)
    best.append(grid[(-logp[np.arange(len(labels)), :, labels]).mean(axis=0).argmin()])
  np.testing.assert_allclose(fitted.temperatures(steps), best, rtol=0.01)


def test_a_rule_or_calibration_that_does_not_fit_is_a_value_error():
  pixel = calibration.Calibration(calibration.default_knots(784), (0.0,) * 9)
  with pytest.raises(ValueError, match="a calibration for 784 steps .* reads 28"):
    pixel.temperatures(28)
  params = gru_classifier.init(jax.random.key(0), num_units=8, in_dim=28, order="row")
  x = np.zeros((2, 28, 28), np.float32)
  with pytest.raises(ValueError, match="reads 28"):
    inference.predict(params, x, threshold=0.9, calibration=pixel)
  rule = calibration.EarlyExit(0.9, calibration.identity())
  with pytest.raises(ValueError, match="expected a calibration.Calibration"):
    inference.predict(params, x, threshold=0.9, calibration=rule)
  with pytest.raises(ValueError, match="expected a calibration.Calibration"):
    inference.evaluate(params, x, np.zeros(2, int), calibration={"knots": [0]})
  for threshold in (None, "0.8", True, float("inf")):
    with pytest.raises(ValueError, match="expected a probability"):
      calibration.EarlyExit.from_card({"early_exit": {"threshold": threshold}})


def test_predict_shows_calibrated_probabilities_when_the_card_has_them(capsys):
  """Same answer either way; --raw-confidence gives the model's own softmax."""
  from pathlib import Path

  from pixelrnn_jax import images

  seven = str(Path(__file__).resolve().parents[1] / "examples" / "seven.png")
  rows = {}
  for flags in ([], ["--raw-confidence"], ["--early"]):
    assert cli.main(["predict", "--checkpoint", "pretrained:pixel", "--json", *flags, seven]) == 0
    rows[tuple(flags)] = json.loads(capsys.readouterr().out)
  plain, raw, early = rows[()], rows[("--raw-confidence",)], rows[("--early",)]
  assert plain["label"] == raw["label"] == early["label"] == 7
  assert plain["calibrated"] and early["calibrated"] and not raw["calibrated"]
  model = gru_classifier.load_pretrained("pixel")
  pixels = images.prepare(images.read_image(seven)).pixels[None]
  softmax = np.asarray(jax.nn.softmax(gru_classifier.apply(model, pixels)[0, -1]))
  np.testing.assert_allclose(raw["probability"], softmax.max(), rtol=1e-5)
  rule = calibration.EarlyExit.from_card(model_io.card("pixel"))
  scaled = gru_classifier.apply(model, pixels)[0, -1] / rule.calibration.temperatures(784)[-1]
  np.testing.assert_allclose(plain["probability"], np.max(jax.nn.softmax(scaled)), rtol=1e-5)
  assert (
    cli.main(["predict", "--checkpoint", "pretrained:pixel", "--early", "--raw-confidence", seven])
    == 2
  )
  assert "drop --raw-confidence" in capsys.readouterr().err
