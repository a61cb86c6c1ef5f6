"""``pixelrnn-jax export``: a run's best weights and their card to a file the user
names, read back by every loader; a failed export leaves existing files alone."""

import json
import logging

import numpy as np
import pytest

from pixelrnn_jax import cli
from pixelrnn_jax import gru_classifier
from pixelrnn_jax import model_io
from pixelrnn_jax.checkpoints import CheckpointError
from pixelrnn_jax.training import config as config_lib
from pixelrnn_jax.training import loop
from tests.helpers import SMALL


@pytest.fixture
def run(tmp_path, toy_data):
  workdir = tmp_path / "run"
  loop.train_and_evaluate(config_lib.Config(**SMALL), workdir, progress=False)
  return workdir


def test_export_writes_weights_and_card_that_load_as_the_run(
  run, tmp_path, mnist_dir, capsys, caplog
):
  out = tmp_path / "models" / "toy.msgpack"
  with caplog.at_level(logging.INFO, logger="pixelrnn_jax.training.export"):
    assert cli.main(["export", str(run), "--out", str(out), "--data-dir", mnist_dir]) == 0
  assert "fitting the per-step temperature and the early-exit rule on 4000" in caplog.text
  assert str(out) in capsys.readouterr().out
  card = json.loads(out.with_suffix(".json").read_text())
  assert card["source"]["step"] == model_io.read(run).step
  assert card["config"]["num_units"] == 8 and card["config"]["data_dir"] is None
  assert 0 <= card["valid_accuracy"] <= 1 and len(card["sha256"]) == 64
  x = np.random.default_rng(0).uniform(size=(3, 28, 28)).astype(np.float32)
  np.testing.assert_array_equal(
    gru_classifier.apply(gru_classifier.load(out), x),
    gru_classifier.apply(gru_classifier.load(run), x),
  )
  assert model_io.read(out).card == card
  assert sorted(p.name for p in out.parent.iterdir()) == ["toy.json", "toy.msgpack"]
  # The recorded early-exit rule: chosen on valid 1000.., measured on all and the first 1000.
  early = card["early_exit"]
  assert early["chosen_on"] == "valid images 1000-4999" and early["max_drop"] == 0.0025
  assert 0 < early["threshold"] <= 1 and len(early["calibration"]["knots"]) >= 2
  assert 1 <= early["valid"]["mean_steps"] <= 28  # row order: 28 steps
  assert set(early["calibration_error"]) == {"14", "21", "28"}
  image = tmp_path / "digit.npy"
  np.save(image, np.random.default_rng(1).uniform(size=(28, 28)).astype(np.float32))
  capsys.readouterr()
  assert cli.main(["predict", "--checkpoint", str(out), "--early", "--json", str(image)]) == 0
  row = json.loads(capsys.readouterr().out)
  assert 1 <= row["pixels_read"] <= 784
  argv = ["evaluate", "--checkpoint", str(out), "--data-dir", mnist_dir, "--early-exit", "0.9"]
  assert cli.main(argv) == 0
  printed = capsys.readouterr().out
  assert "calibrated confidence: the card's per-step temperature" in printed
  assert "recommended early-exit threshold" in printed and ", ECE 0." in printed
  assert cli.main([*argv, "--raw-confidence"]) == 0
  assert "confidence as trained" in capsys.readouterr().out


def test_a_failed_export_leaves_the_existing_files_untouched(run, tmp_path, capsys):
  out = tmp_path / "keep.msgpack"
  out.write_bytes(b"the user's earlier export")
  out.with_suffix(".json").write_text('{"sha256": "0", "source": {}, "config": {}}')
  code = cli.main(["export", str(run), "--out", str(out), "--data-dir", str(tmp_path / "none")])
  assert code == 2
  assert "none" in capsys.readouterr().err
  assert out.read_bytes() == b"the user's earlier export"
  assert out.with_suffix(".json").read_text() == '{"sha256": "0", "source": {}, "config": {}}'
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("name", ["weights.json", "weights", "dir"])
def test_export_names_are_checked_before_any_work(run, tmp_path, capsys, name):
  out = tmp_path / name
  if name == "dir":
    out = tmp_path / "dir.msgpack"
    out.mkdir()
  assert cli.main(["export", str(run), "--out", str(out)]) == 2
  assert "--out" in capsys.readouterr().err


def test_a_tampered_export_fails_its_card_checksum(run, tmp_path, mnist_dir):
  out = tmp_path / "w.msgpack"
  assert cli.main(["export", str(run), "--out", str(out), "--data-dir", mnist_dir]) == 0
  blob = bytearray(out.read_bytes())
  blob[-3] ^= 0x01
  out.write_bytes(bytes(blob))
  with pytest.raises(CheckpointError, match="does not match the recorded") as error:
    gru_classifier.load(out)
  assert f"in its card {out.with_suffix('.json')}" in str(error.value)
  assert "export again" in str(error.value)


@pytest.mark.parametrize(
  "flags, message",
  [
    (["--max-drop", "-1"], "--max-drop -1.0: expected accuracy points in [0, 100)"),
    (["--max-drop", "nan"], "--max-drop nan"),
    (["--wall-time-s", "nan"], "--wall-time-s nan: expected seconds >= 0"),
    (["--wall-time-s", "-5"], "--wall-time-s -5.0"),
    (["--no-early-exit", "--max-drop", "1"], "--max-drop 1.0 chooses the early-exit threshold"),
  ],
)
def test_bad_export_numbers_are_named_before_any_work(tmp_path, capsys, flags, message):
  out = tmp_path / "m.msgpack"
  assert cli.main(["export", str(tmp_path / "no-run"), "--out", str(out), *flags]) == 2
  assert message in capsys.readouterr().err
  assert not out.exists()
