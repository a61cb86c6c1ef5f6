"""Test-time augmentation by rotation (``tta.py``, ``evaluate --tta-rotations``,
``train --distill-rotations``): each view against SciPy's rotation of the image read
in the model's order, the answer against the models run on turned images one by
one in NumPy, the teachers' views, and the flags' refusals."""

import json
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from pixelrnn_jax import cli
from pixelrnn_jax import gru_classifier
from pixelrnn_jax import preprocessing
from pixelrnn_jax import tta
from pixelrnn_jax.training import config as config_lib
from pixelrnn_jax.training import loop
from pixelrnn_jax.training import run_dir
from pixelrnn_jax.training import teachers as teachers_lib
from tests import helpers
from tests.helpers import SMALL


def _log_softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


@settings(max_examples=12, deadline=None)
@given(
  degrees=st.floats(-45, 45).filter(lambda d: abs(d) > 1e-3),
  order=st.sampled_from(preprocessing.ORDERS),
  seed=st.integers(0, 2**16),
)
def test_a_view_is_the_image_turned_by_scipy_then_read_in_the_models_order(degrees, order, seed):
  images = np.random.default_rng(seed).random((3, 28, 28), dtype=np.float32)
  x = preprocessing.to_sequences(images, order)
  (got,) = tta.views(jnp.asarray(x), tta.view_matrices((degrees,), order), with_identity=False)
  want = preprocessing.to_sequences(preprocessing.rotate_and_scale(images, degrees, 1.0), order)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-6)


def test_the_unturned_view_needs_no_matrix_and_a_turn_moves_a_corner_pixel():
  assert tta.view_matrices((0.0,), "pixel").shape == (0, 784, 784)
  assert tta.view_matrices((0.0, -3.0, 3.0), "pixel").shape == (2, 784, 784)
  # Turning by 90 degrees counter-clockwise (as displayed) takes the top-right
  # pixel to the top-left.
  image = np.zeros((1, 28, 28), np.float32)
  image[0, 0, 27] = 1.0
  flat = image.reshape(1, -1) @ tta.rotation_matrix(90.0, "pixel")
  assert flat.reshape(28, 28)[0, 0] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
  ("text", "views"),
  [("3", (0.0, -3.0, 3.0)), ("3,6", (0.0, -3.0, 3.0, -6.0, 6.0)), (" 2.5 ", (0.0, -2.5, 2.5))],
)
def test_rotation_views_are_zero_then_minus_and_plus_each_angle(text, views):
  assert config_lib.rotation_views(text) == views


@pytest.mark.parametrize(
  ("text", "match"),
  [
    ("", "element 1 is empty"),
    ("3,", "element 2 is empty"),
    ("three", "'three' is not a number"),
    ("0", r"must be an angle in \(0, 45\]"),
    ("-3", r"must be an angle in \(0, 45\]"),
    ("90", r"must be an angle in \(0, 45\]"),
    ("nan", r"must be an angle in \(0, 45\]"),
    ("3,3", "3 is given twice"),
  ],
)
def test_bad_rotation_views_are_refused_naming_the_element(text, match):
  with pytest.raises(ValueError, match=match):
    config_lib.rotation_views(text)


def test_the_answer_is_the_mean_over_models_and_turned_images_of_their_log_probabilities():
  images = helpers.synthetic_digits(5, 3)[0].astype(np.float32)
  models = [gru_classifier.load("pretrained:pixel"), gru_classifier.load("pretrained:anytime")]
  degrees = (0.0, -4.0, 4.0)
  got = np.asarray(tta.log_probs(models, images, degrees, "pixel"))
  answers = [
    _log_softmax(
      np.asarray(gru_classifier.apply(m, preprocessing.rotate_and_scale(images, d, 1.0))[:, -1])
    )
    for m in models
    for d in degrees
  ]
  np.testing.assert_allclose(got, _log_softmax(np.mean(answers, axis=0)), atol=2e-4)
  # One view of one model is that model's own answer.
  alone = np.asarray(tta.log_probs(models[0], images, (0.0,), "pixel"))
  np.testing.assert_allclose(alone, answers[0], atol=2e-4)


@pytest.mark.parametrize("order", preprocessing.ORDERS)
def test_the_answer_takes_images_or_their_sequences_in_every_order(order):
  """Images are read in the model's order: the same answer as their sequences, and as
  the model run on each turned image (``apply`` reads images in its order itself)."""
  in_dim = preprocessing.sequence_shape(order)[1]
  model = gru_classifier.init(jax.random.key(1), num_units=6, in_dim=in_dim, order=order)
  images = helpers.synthetic_digits(4, 7)[0].astype(np.float32)
  degrees = (0.0, -5.0, 5.0)
  from_images = np.asarray(tta.log_probs(model, images, degrees, order))
  from_sequences = np.asarray(
    tta.log_probs(model, preprocessing.to_sequences(images, order), degrees, order)
  )
  answers = [
    _log_softmax(
      np.asarray(gru_classifier.apply(model, preprocessing.rotate_and_scale(images, d, 1.0)))[:, -1]
    )
    for d in degrees
  ]
  np.testing.assert_allclose(from_images, from_sequences, atol=1e-6)
  np.testing.assert_allclose(from_images, _log_softmax(np.mean(answers, axis=0)), atol=2e-5)


@pytest.mark.parametrize(
  ("call", "match"),
  [
    (lambda m, x: tta.log_probs(m, x, (), "pixel"), "expected at least one view"),
    (lambda m, x: tta.log_probs(m, x, (0, float("nan")), "pixel"), "nan is not a finite angle"),
    (lambda m, x: tta.log_probs(m, x, ("three",), "pixel"), "expected numbers"),
    (lambda m, x: tta.log_probs(m, x, "66", "pixel"), r"degrees='66': expected numbers"),
    (lambda m, x: tta.log_probs(m, x, (0, "3"), "pixel"), "expected numbers"),
    (lambda m, x: tta.log_probs(m, x, (True,), "pixel"), "expected numbers"),
    (lambda m, x: tta.log_probs(m, x[:, :100], (0, 3), "pixel"), r"x has shape \(2, 100, 1\)"),
    (lambda m, x: tta.log_probs(m, x, (0, 3), "permuted"), "a model of order 'pixel'"),
    (lambda m, x: tta.rotation_matrix(float("inf"), "pixel"), "inf is not a finite angle"),
  ],
)
def test_the_library_refuses_bad_views_inputs_and_orders_naming_them(call, match):
  model = gru_classifier.init(jax.random.key(0), num_units=2, order="pixel")
  x = preprocessing.to_sequences(np.zeros((2, 28, 28), np.float32), "pixel")
  with pytest.raises(ValueError, match=match):
    call(model, x)


@pytest.mark.parametrize(
  ("images", "labels", "batch_size", "match"),
  [
    (np.zeros((3, 28, 28)), np.zeros(3, int), 0, "batch_size=0: expected a positive integer"),
    (np.zeros((0, 28, 28)), np.zeros(0, int), 10, "expected N >= 1 images"),
    (np.zeros((3, 28, 28)), np.zeros(2, int), 10, r"labels of shape \(2,\)"),
    (np.zeros((3, 28, 28)), np.array([0, 1, 12]), 10, r"labels in \[0, 12\]: expected classes"),
  ],
)
def test_evaluate_refuses_bad_splits_naming_them(images, labels, batch_size, match):
  model = gru_classifier.init(jax.random.key(0), num_units=2, order="pixel")
  with pytest.raises(ValueError, match=match):
    tta.evaluate(model, images, labels, (0.0, 3.0), order="pixel", batch_size=batch_size)


def test_the_evaluate_flag_scores_the_views_and_refuses_bad_angles_before_loading(
  monkeypatch, capsys, caplog
):
  from pixelrnn_jax import data

  images, labels = helpers.synthetic_digits(12, 4)
  monkeypatch.setattr(data, "load_mnist", lambda split, **kw: (images, labels))
  argv = ["evaluate", "--checkpoint", "pretrained:pixel", "--json", "--batch-size", "5"]
  assert cli.main([*argv, "--tta-rotations", "5"]) == 0
  result = json.loads(capsys.readouterr().out)["tta"]
  params = gru_classifier.load("pretrained:pixel")
  answers = np.mean(
    [
      _log_softmax(
        np.asarray(gru_classifier.apply(params, preprocessing.rotate_and_scale(images, d, 1.0)))[
          :, -1
        ]
      )
      for d in (0.0, -5.0, 5.0)
    ],
    axis=0,
  )
  answers = _log_softmax(answers)
  assert result["rotations"] == [0.0, -5.0, 5.0] and result["num_examples"] == 12
  assert result["accuracy"] == pytest.approx(np.mean(answers.argmax(1) == labels))
  assert result["loss"] == pytest.approx(-answers[np.arange(12), labels].mean(), rel=1e-4)

  # --order reads the model in another order: the views are made for that order.
  assert cli.main([*argv, "--order", "permuted", "--tta-rotations", "5"]) == 0
  assert json.loads(capsys.readouterr().out)["tta"]["num_examples"] == 12
  # A model trained without rotations is warned about; one trained with them is not.
  assert "trained without --max-rotation" not in caplog.text
  with caplog.at_level(logging.WARNING):
    assert cli.main([*argv[:2], "pretrained:anytime", *argv[3:], "--tta-rotations", "5"]) == 0
  assert "pretrained:anytime was trained without --max-rotation" in caplog.text
  capsys.readouterr()

  def no_data(split, **kw):
    raise AssertionError("the data were read")

  monkeypatch.setattr(data, "load_mnist", no_data)
  assert cli.main([*argv, "--tta-rotations", "3,x"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "--tta-rotations '3,x': element 2 'x' is not a number" in err[0]


# ---------------------------------------------------------------- teachers


def test_teachers_with_rotations_answer_as_the_views_of_their_ensemble(tmp_path, toy_data, caplog):
  teacher = tmp_path / "teacher"
  loop.train_and_evaluate(config_lib.Config(**{**SMALL, "seed": 5}), teacher, progress=False)
  images = np.random.default_rng(2).random((6, 28, 28), dtype=np.float32)
  model = gru_classifier.load(teacher)
  want = np.asarray(tta.log_probs(model, images, (0.0, -6.0, 6.0), "row"))
  for standardize in (False, True):
    config = config_lib.Config(
      **{
        **SMALL,
        "standardize": standardize,
        "distill_from": str(teacher),
        "distill_weight": 0.5,
        "distill_rotations": "6",
      }
    )
    with caplog.at_level(logging.WARNING):
      teachers = teachers_lib.read(config)
    assert f"{teacher} was trained without --max-rotation" in caplog.text
    x = preprocessing.to_sequences(images, "row")
    if standardize:
      x = preprocessing.standardize(x)
    got = jax.jit(teachers.ensemble_logits)(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(jax.nn.log_softmax(got)), want, atol=2e-5)
  # A run records the views with its teachers.
  loop.train_and_evaluate(config.replace(steps=2), tmp_path / "student", progress=False)
  (record,) = [
    r for r in run_dir.metrics_records(tmp_path / "student") if r.get("event") == "distill_from"
  ]
  assert record["rotations"] == [0.0, -6.0, 6.0]


def test_distill_rotations_without_teachers_or_with_a_bad_angle_is_refused(capsys):
  with pytest.raises(ValueError, match="with distill_from=None: the rotations are the teachers"):
    config_lib.Config(**{**SMALL, "distill_rotations": "3"})
  with pytest.raises(ValueError, match=r"--distill-rotations '0': element 1 \(0\)"):
    config_lib.Config(
      **{
        **SMALL,
        "distill_from": "pretrained:pixel",
        "distill_weight": 0.5,
        "distill_rotations": "0",
      }
    )
  assert cli.main(["train", "--workdir", "nowhere", "--distill-rotations", "3"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and re.search(r"--distill-rotations '?3'? with --distill-from None", err[0])


@pytest.mark.parametrize("name", ["pixel", "permuted"])
def test_predict_answers_by_the_views_and_refuses_early_exit_with_them(name, capsys, tmp_path):
  # Standing up: a toy digit's bright row, read through prepare, is a dash (refused).
  images = helpers.synthetic_digits(3, 6)[0].transpose(0, 2, 1)
  for i, image in enumerate(images):
    np.save(tmp_path / f"{i}.npy", image)
  inputs = [str(tmp_path / f"{i}.npy") for i in range(3)]
  argv = ["predict", "--checkpoint", f"pretrained:{name}", "--tta-rotations", "3"]
  assert cli.main([*argv, "--json", *inputs]) == 0
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  from pixelrnn_jax import images as images_lib

  pixels = np.stack([images_lib.prepare(image, invert="auto").pixels for image in images])
  model = gru_classifier.load(f"pretrained:{name}")
  # The reference: the model on each turned image (it reads images in its own order).
  turned = [
    _log_softmax(
      np.asarray(gru_classifier.apply(model, preprocessing.rotate_and_scale(pixels, d, 1.0)))[:, -1]
    )
    for d in (0.0, -3.0, 3.0)
  ]
  want = np.exp(_log_softmax(np.mean(turned, axis=0)))
  for row, p in zip(rows, want, strict=True):
    assert row["label"] == int(p.argmax()) and row["probability"] == pytest.approx(
      p.max(), rel=1e-5
    )
    assert row["tta_rotations"] == [0.0, -3.0, 3.0] and row["pixels_read"] == 784
    assert row["calibrated"] is False
  assert cli.main([*argv, inputs[0]]) == 0
  assert "after 784/784 pixels in each of 3 views" in capsys.readouterr().out
  for extra in (["--early"], ["--confidence", "0.9"]):
    assert cli.main([*argv, *extra, inputs[0]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tta-rotations reads every pixel of every view" in err[0]
