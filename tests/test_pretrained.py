"""The weights shipped in pixelrnn_jax/pretrained load and reproduce their recorded accuracy."""

import difflib
import hashlib
import json
import re
import shutil

import jax
import numpy as np
import pytest
from hypothesis import assume
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

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


@settings(max_examples=25, deadline=None)
@given(card=st.text(max_size=30))
def test_a_card_that_is_not_a_json_object_is_named_not_its_weights(tmp_path_factory, card):
  """Before: '{not json' in pixel.json was reported as the .msgpack being 'not a model
  checkpoint'."""
  try:
    assume(not isinstance(json.loads(card), dict))
  except ValueError:
    pass
  folder = tmp_path_factory.mktemp("card")
  shutil.copy(model_io.PRETRAINED_DIR / "pixel.msgpack", folder / "mine.msgpack")
  (folder / "mine.json").write_text(card)
  with pytest.raises(checkpoints.CheckpointError) as error:
    model_io.read(folder / "mine.msgpack")
  assert str(error.value).startswith(f"{folder / 'mine.json'}: the card of mine.msgpack is not")


def test_unknown_name_lists_what_is_available(capsys):
  with pytest.raises(FileNotFoundError, match=r"no pretrained weights named 'cifar'"):
    gru_classifier.load_pretrained("cifar")
  assert cli.main(["evaluate", "--checkpoint", "pretrained:cifar"]) == 2
  assert "available" in capsys.readouterr().err


@settings(deadline=None, max_examples=40)
@given(st.data())
def test_a_misspelt_pretrained_name_is_refused_with_the_name_it_resembles(data):
  """One letter dropped, doubled, swapped or changed: the error names the shipped
  model it came from (when that one is the closest), and never loads anything."""
  name = data.draw(st.sampled_from(model_io.available()))
  i = data.draw(st.integers(0, len(name) - 1))
  edit = data.draw(st.sampled_from(["drop", "double", "swap", "change"]))
  letter = data.draw(st.sampled_from("abcdefghijklmnopqrstuvwxyz"))
  typo = {
    "drop": name[:i] + name[i + 1 :],
    "double": name[:i] + name[i] + name[i:],
    "swap": name[:i] + name[i + 1 : i + 2] + name[i] + name[i + 2 :],
    "change": name[:i] + letter + name[i + 1 :],
  }[edit]
  assume(typo not in model_io.available() and len(typo) > 3)
  with pytest.raises(FileNotFoundError) as error:
    model_io.card(typo)
  message = str(error.value)
  assert f"no pretrained weights named {typo!r}" in message
  assert (
    "available: ['anytime', 'permuted', 'permuted-v1', 'pixel', 'pixel-v1', 'pixel-v2']" in message
  )
  closest = difflib.get_close_matches(typo, model_io.available(), n=1, cutoff=0.6)
  if closest:
    assert f" (did you mean pretrained:{closest[0]}?); available" in message
    # The resemblance is real: one edit from the suggestion, as from the source.
    assert name == closest[0] or _one_edit(typo, closest[0])
  else:
    assert "did you mean" not in message


@pytest.mark.parametrize(
  "name", ["pixel", "permuted", "anytime", "pixel-v1", "pixel-v2", "permuted-v1"]
)
def test_the_hints_spelling_pretrained_name_loads_what_the_bare_name_loads(name):
  """The hint says `did you mean pretrained:pixel?`; the library took only `pixel`."""
  assert model_io.card(f"pretrained:{name}") == model_io.card(name)
  spelled = gru_classifier.load_pretrained(f"pretrained:{name}")
  for a, b in zip(
    jax.tree.leaves(spelled), jax.tree.leaves(gru_classifier.load_pretrained(name)), strict=True
  ):
    np.testing.assert_array_equal(a, b)


def _one_edit(a: str, b: str) -> bool:
  """Whether a and b are at most one insertion, deletion, substitution or swap apart."""
  if abs(len(a) - len(b)) > 1:
    return False
  if len(a) == len(b):
    diff = [k for k in range(len(a)) if a[k] != b[k]]
    return len(diff) <= 1 or (
      len(diff) == 2
      and diff[1] == diff[0] + 1
      and a[diff[0]] == b[diff[1]]
      and a[diff[1]] == b[diff[0]]
    )
  short, long = sorted((a, b), key=len)
  return any(long[:k] + long[k + 1 :] == short for k in range(len(long)))


def test_pixle_suggests_pixel_and_cifar_suggests_nothing():
  with pytest.raises(
    FileNotFoundError, match=r"'pixle' \(did you mean pretrained:pixel\?\); available"
  ):
    model_io.card("pixle")
  with pytest.raises(FileNotFoundError) as error:
    model_io.card("cifar")
  assert "did you mean" not in str(error.value)


@pytest.mark.parametrize("name", model_io.available())
def test_each_card_gives_the_digest_of_its_arrays_that_a_fine_tune_records(name):
  card = model_io.card(name)
  saved = model_io.read(model_io.PREFIX + name)
  assert card["params_sha256"] == checkpoints.state_digest(saved.arrays)
  assert card["params_sha256"] != card["sha256"]  # the arrays', not the file's


def test_the_shipped_pixel_model_names_the_weights_it_was_fine_tuned_from():
  start = model_io.card("pixel")["source"]["init_from"]
  assert start["params_sha256"] == model_io.card("pixel-v1")["params_sha256"]
  assert start["source_step"] == model_io.card("pixel-v1")["source"]["step"] == 14000


def test_the_shipped_permuted_model_names_the_weights_it_was_continued_from():
  start = model_io.card("permuted")["source"]["init_from"]
  assert start["source"] == "pretrained:permuted-v1"
  assert start["params_sha256"] == model_io.card("permuted-v1")["params_sha256"]
  assert start["source_step"] == model_io.card("permuted-v1")["source"]["step"] == 13500
  # Shipped only because it beats what it replaced, on valid.
  assert (
    model_io.card("permuted")["valid_accuracy"] > model_io.card("permuted-v1")["valid_accuracy"]
  )


def test_load_pretrained_names_every_shipped_model_with_its_card_accuracy():
  """Its docstring named only "pixel" and "permuted" while five models shipped."""
  doc = " ".join(gru_classifier.load_pretrained.__doc__.split())
  for name in model_io.available():
    accuracy = f"{100 * model_io.card(name)['valid_accuracy']:.2f}%"
    assert re.search(rf'``"{re.escape(name)}"`` \([^)]*{re.escape(accuracy)}[^)]*\)', doc), name
