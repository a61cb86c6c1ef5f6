"""Smoke tests: the benchmarks run at their smallest sizes, so the scripts cannot rot."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pixelrnn_jax import data
from pixelrnn_jax import gru_classifier
from pixelrnn_jax import tta

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "throughput.py"


@pytest.fixture(scope="module")
def throughput():
  spec = importlib.util.spec_from_file_location("throughput", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_quick_smallest_shape_for_pixelrnn_jax(throughput, tmp_path):
  report = throughput.main(
    [
      "--only",
      "pixelrnn_jax",
      "--steps",
      "16",
      "--batch",
      "8",
      "--rounds",
      "1",
      "--iters",
      "1",
      "--devices",
      "1",
      "--no-memory",
      "--no-scaling",
      "--json",
      str(tmp_path / "r.json"),
    ]
  )
  names = set(report["main"]["step_s"])
  assert {"pixelrnn_jax tf1 (fused)", "pixelrnn_jax tf1 (scan)"} <= names
  assert all(t["train"][0] > 0 for t in report["main"]["step_s"].values())
  assert (tmp_path / "r.json").stat().st_size > 100


def test_flop_count_matches_the_hand_count(throughput):
  # GRU-64, T=784, batch 512: 2*512*784*(65*192 + 64*10) forward, x3 for a train step.
  assert throughput.train_step_flops(batch=512, steps=784, units=64) == 3 * 2 * 512 * 784 * (
    65 * 192 + 640
  )


def test_jpeg_digits_reports_accuracy_and_pass_through_per_quality(mnist_dir):
  """benchmarks/jpeg_digits.py on 30 digits: one line per quality, the digits first."""
  out = subprocess.run(
    [sys.executable, str(ROOT / "benchmarks" / "jpeg_digits.py"), "--data-dir", mnist_dir]
    + ["--count", "30", "--qualities", "50"],
    capture_output=True,
    text=True,
    check=True,
  ).stdout.splitlines()
  pattern = r"quality (none|50): accuracy ([\d.]+)%, passed unchanged (\d+)/30"
  rows = [re.fullmatch(pattern, line).groups() for line in out]
  assert [row[0] for row in rows] == ["none", "50"] and rows[0][2] == "30"
  assert all(90 <= float(row[1]) <= 100 for row in rows) and int(rows[1][2]) >= 27


def test_robustness_scores_every_model_on_the_same_transformed_digits(mnist_dir):
  """benchmarks/robustness.py on 40 digits: the identity row is the plain evaluation,
  a half turn ruins it, and each model has its column."""
  spec = importlib.util.spec_from_file_location("robustness", ROOT / "benchmarks" / "robustness.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  table = module.main(
    ["--data-dir", mnist_dir, "--count", "40", "--degrees", "180", "--scales", "1.0"]
    + ["--checkpoint", "pretrained:pixel", "--checkpoint", "pretrained:anytime"]
  )
  assert list(table) == ["as they are", "rotated +180 deg", "scaled x1"]
  assert table["as they are"] == table["scaled x1"]  # scale 1 is the identity
  for source in ("pretrained:pixel", "pretrained:anytime"):
    assert table["as they are"][source] >= 0.9
    assert table["rotated +180 deg"][source] < 0.6


def test_ensembles_of_one_model_twice_score_as_the_model_and_skip_mixed_orders(
  mnist_dir, capsys, tmp_path
):
  """benchmarks/ensembles.py on 40 digits: a model averaged with itself, by weights
  or by log-probabilities, is the model; models of two orders get no weight average."""
  spec = importlib.util.spec_from_file_location("ensembles", ROOT / "benchmarks" / "ensembles.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  common = ["--data-dir", mnist_dir, "--count", "40"]
  table = module.main(common + ["--checkpoint", "pretrained:pixel"] * 2)
  alone = table["pretrained:pixel"]
  assert table["weight average"]["accuracy"] == alone["accuracy"] >= 0.9
  assert table["ensemble"]["accuracy"] == alone["accuracy"]
  assert table["ensemble"]["loss"] == pytest.approx(alone["loss"], rel=1e-4)
  assert table["all wrong"] == round((1 - alone["accuracy"]) * 40)
  # Over turned views, a model twice is the model read over those views (tta.evaluate).
  turned = module.main(common + ["--checkpoint", "pretrained:pixel"] * 2 + ["--tta-rotations", "6"])
  digits, labels = data.load_mnist("valid", data_dir=mnist_dir)
  model = gru_classifier.load("pretrained:pixel")
  views = tta.evaluate(model, digits[:40], labels[:40], (0.0, -6.0, 6.0), order=model.order)
  assert turned["ensemble over views"]["accuracy"] == pytest.approx(views["accuracy"])
  assert turned["ensemble over views"]["loss"] == pytest.approx(views["loss"], rel=1e-4)
  capsys.readouterr()
  mixed = module.main(
    common
    + ["--checkpoint", "pretrained:pixel", "--checkpoint", "pretrained:permuted"]
    + ["--tta-rotations", "3"]
  )
  assert "weight average" not in mixed and "ensemble over views" not in mixed
  out = capsys.readouterr().out
  assert "weight average: skipped (the models differ" in out
  assert "ensemble over turned views: skipped (models of orders permuted, pixel)" in out
  with pytest.raises(SystemExit):
    module.main(common + ["--checkpoint", "pretrained:pixel"] * 2 + ["--tta-rotations", "90"])
  assert "--tta-rotations" in capsys.readouterr().err
  assert mixed["some right"] >= max(
    mixed["pretrained:pixel"]["accuracy"], mixed["pretrained:permuted"]["accuracy"]
  )


def test_augmentations_example_draws_the_digits_and_each_alphas_batch_in_their_order(
  mnist_dir, tmp_path, capsys
):
  """examples/augmentations.py: alpha 0 with no other flag is the digits themselves,
  column for column; a positive alpha moves every digit, and keeps its label."""
  path = ROOT / "examples" / "augmentations.py"
  spec = importlib.util.spec_from_file_location("augmentations", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  png = tmp_path / "aug.png"
  argv = ["--data-dir", mnist_dir, "--out", str(png), "--count", "6"]
  drawn = module.main(argv + ["--elastic-alpha", "0", "20"])
  (name, digits, labels), (_, same, same_labels), (_, moved, moved_labels) = drawn
  assert name == "as they are" and png.stat().st_size > 5000
  np.testing.assert_array_equal(same, digits)
  np.testing.assert_array_equal(same_labels, labels)
  np.testing.assert_array_equal(moved_labels, labels)
  assert all(not np.allclose(a, b) for a, b in zip(moved, digits))
  assert np.abs(moved.sum((1, 2)) / digits.sum((1, 2)) - 1).max() < 0.25  # ink kept
  # A flag out of the trainer's range is refused as `train` refuses it: by its name.
  with pytest.raises(SystemExit) as exit_:
    module.main(argv + ["--max-rotation", "200"])
  assert exit_.value.code == 2
  assert "--max-rotation 200.0: expected a number in [0, 180]" in capsys.readouterr().err


def test_ensembles_refuses_a_bad_path_or_model_in_one_line_before_scoring(
  mnist_dir, tmp_path, capsys
):
  spec = importlib.util.spec_from_file_location("ensembles", ROOT / "benchmarks" / "ensembles.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  models = ["--checkpoint", "pretrained:pixel", "--checkpoint"]
  for argv, said in [
    (["--missed", str(tmp_path / "no" / "m.png"), *models, "pretrained:anytime"], "does not exist"),
    ([*models, "pretrained:pixle"], "did you mean pretrained:pixel?"),
    ([*models, str(tmp_path / "nothing")], "no such weights file"),
    (["--missed", str(tmp_path), *models, "pretrained:anytime"], "ending in .png"),
    (["--missed", "m.xyz", *models, "pretrained:anytime"], "ending in .png"),
    (["--count", "0", *models, "pretrained:anytime"], "argument --count: expected an integer >= 1"),
  ]:
    with pytest.raises(SystemExit) as exit_:
      module.main(["--data-dir", mnist_dir, "--count", "10", *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr()
    assert said in err.err and "valid digits" not in err.out  # nothing was scored
