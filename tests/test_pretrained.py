"""The weights shipped in pixelrnn_jax/pretrained load and reproduce their recorded accuracy."""

import hashlib
import shutil

import numpy as np
import pytest

from pixelrnn_jax import calibration
from pixelrnn_jax import checkpoints
from pixelrnn_jax import cli
from pixelrnn_jax import data
from pixelrnn_jax import gru_classifier
from pixelrnn_jax import inference
from pixelrnn_jax import model_io

NAMES = model_io.available()


def test_pixel_weights_are_shipped():
  assert "pixel" in NAMES


@pytest.mark.parametrize("name", NAMES)
def test_load_pretrained(name):
  params = gru_classifier.load_pretrained(name)
  meta = model_io.card(name)
  assert params.num_units == meta["config"]["num_units"]
  assert params.cell == meta["config"]["cell"]
  assert gru_classifier.count_params(params) < 20_000


@pytest.mark.parametrize("name", NAMES)
def test_each_card_records_recipe_step_seed_accuracy_wall_time_and_hash(name):
  """What a shipped file's card must say: how it was trained, where it stopped, on
  which seed, what it scores on valid, how long it took, and the weights' SHA-256
  (the hash checked against the file itself)."""
  meta = model_io.card(name)
  assert meta["config"]["steps"] > 0 and meta["config"]["seed"] >= 0 and meta["notes"]
  assert 0 < meta["source"]["step"] <= meta["config"]["steps"]
  assert 0.9 < meta["valid_accuracy"] <= 1.0
  assert isinstance(meta["wall_time_s"], float) and meta["wall_time_s"] > 60, meta["wall_time_s"]
  weights = model_io.PRETRAINED_DIR / f"{name}.msgpack"
  assert hashlib.sha256(weights.read_bytes()).hexdigest() == meta["sha256"]


@pytest.mark.parametrize("name", NAMES)
def test_library_example_reproduces_recorded_accuracy_on_plain_images(name, mnist_dir):
  """The README's library example: default [0, 1] images, no order, no scaling."""
  meta = model_io.card(name)
  images, labels = data.load_mnist("valid", data_dir=mnist_dir)
  images, labels = images[: model_io.SUBSET], labels[: model_io.SUBSET]
  assert 0.0 <= images.min() and images.max() <= 1.0
  model = gru_classifier.load_pretrained(name)
  assert model.order == meta["config"]["order"]
  logits = gru_classifier.apply(model, images)
  expected = meta[f"valid_first_{model_io.SUBSET}_accuracy"]
  np.testing.assert_allclose(float(gru_classifier.accuracy(logits, labels)), expected, atol=1e-9)
  # inference.evaluate takes the same path.
  result = inference.evaluate(model, images, labels)
  np.testing.assert_allclose(result["accuracy"], expected, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_recorded_early_exit_reproduces_on_the_first_valid_digits(name, mnist_dir):
  """The card's threshold and per-step temperature give its recorded accuracy and
  mean pixels on the first 1,000 valid digits, by both early-exit implementations
  (the full pass of ``evaluate`` and the stopping loop of ``predict``)."""
  card = model_io.card(name)
  rule = calibration.EarlyExit.from_card(card)
  assert rule is not None, f"pretrained:{name} records no early-exit rule"
  recorded = card["early_exit"][f"valid_first_{model_io.SUBSET}"]
  images, labels = data.load_mnist("valid", data_dir=mnist_dir)
  images, labels = images[: model_io.SUBSET], labels[: model_io.SUBSET]
  model = gru_classifier.load_pretrained(name)
  result = inference.evaluate(
    model, images, labels, early_exit_thresholds=(rule.threshold,), calibration=rule.calibration
  )
  (row,) = result["early_exit"]
  np.testing.assert_allclose(row["accuracy"], recorded["accuracy"], atol=1e-9)
  np.testing.assert_allclose(row["mean_steps"], recorded["mean_steps"], rtol=1e-9)
  out = inference.predict(model, images, threshold=rule.threshold, calibration=rule.calibration)
  np.testing.assert_allclose(np.mean(np.asarray(out["label"]) == labels), recorded["accuracy"])
  np.testing.assert_allclose(np.mean(out["steps"]), recorded["mean_steps"], rtol=1e-6)
  assert recorded["accuracy"] >= recorded["read_all_accuracy"] - 0.01


def test_corrupted_pretrained_file_is_refused(tmp_path, monkeypatch):
  name = NAMES[0]
  for suffix in (".msgpack", ".json"):
    shutil.copy(model_io.PRETRAINED_DIR / f"{name}{suffix}", tmp_path / f"{name}{suffix}")
  blob = bytearray((tmp_path / f"{name}.msgpack").read_bytes())
  blob[-5] ^= 0x01
  (tmp_path / f"{name}.msgpack").write_bytes(bytes(blob))
  monkeypatch.setattr(model_io, "PRETRAINED_DIR", tmp_path)
  with pytest.raises(checkpoints.CheckpointError, match="does not match the recorded"):
    gru_classifier.load_pretrained(name)


def test_unknown_name_lists_what_is_available(capsys):
  with pytest.raises(FileNotFoundError, match=r"no pretrained weights named 'cifar'"):
    gru_classifier.load_pretrained("cifar")
  assert cli.main(["evaluate", "--checkpoint", "pretrained:cifar"]) == 2
  assert "available" in capsys.readouterr().err
