"""Early-exit prediction, the predict/evaluate/plot commands, and bad images."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from pixelrnn_jax import cli
from pixelrnn_jax import commands
from pixelrnn_jax import diagnostics
from pixelrnn_jax import gru_classifier
from pixelrnn_jax import images as images_lib
from pixelrnn_jax import inference
from pixelrnn_jax import plots
from pixelrnn_jax.training import config as config_lib
from pixelrnn_jax.training import loop
from tests import helpers


def _trained_like_params(seed=0, units=6, dtype=jnp.float64):
  """Random params with a large readout, so that confidences spread over (0.1, 1)."""
  params = gru_classifier.init(jax.random.key(seed), num_units=units, dtype=dtype)
  return params.replace(output=params.output.replace(kernel=params.output.kernel * 40))


@pytest.mark.parametrize("threshold", [0.3, 0.6, 0.9, 1.0])
def test_early_exit_equals_full_sequence_prediction_at_the_exit_step(threshold):
  params = _trained_like_params()
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(16, 60, 1)))
  out = inference.predict(params, x, threshold=threshold)
  probs = jax.nn.softmax(gru_classifier.apply(params, x, impl="scan"), axis=-1)  # (B, T, C)
  top = probs.max(-1)
  for i in range(16):
    step = int(out["steps"][i])
    assert 1 <= step <= 60
    assert int(out["label"][i]) == int(jnp.argmax(probs[i, step - 1]))
    np.testing.assert_allclose(out["probability"][i], top[i, step - 1], rtol=1e-12)
    if step < 60:
      assert top[i, step - 1] >= threshold
    assert np.all(top[i, : step - 1] < threshold)  # it did not exit earlier


def test_early_exit_actually_stops_the_loop():
  params = _trained_like_params()
  x = jnp.asarray(np.random.default_rng(1).uniform(size=(4, 300, 1)))
  full = inference.predict(params, x, threshold=1.0)
  assert np.all(full["steps"] == 300)
  early = inference.predict(params, x, threshold=0.05)  # everything is above 0.1
  assert np.all(early["steps"] == 1)


def test_thresholds_are_monotone_in_pixels_read():
  params = _trained_like_params(units=8)
  images = np.random.default_rng(2).uniform(size=(40, 28, 28)).astype(np.float64)
  labels = np.random.default_rng(3).integers(0, 10, 40).astype(np.int32)
  thresholds = (0.2, 0.4, 0.6, 0.8, 0.9, 0.99, 1.0)
  result = inference.evaluate(
    params, images, labels, order="pixel", batch_size=16, early_exit_thresholds=thresholds
  )
  steps = [row["mean_steps"] for row in result["early_exit"]]
  assert steps == sorted(steps) and steps[0] < steps[-1]
  assert result["early_exit"][-1]["mean_steps"] <= 784
  # The evaluation's exit steps agree with the early-exit loop's.
  out = inference.predict(params, jnp.asarray(images.reshape(40, 784, 1)), threshold=0.6)
  np.testing.assert_allclose(result["early_exit"][2]["mean_steps"], float(np.mean(out["steps"])))
  np.testing.assert_allclose(
    result["early_exit"][2]["accuracy"], float(np.mean(np.asarray(out["label"]) == labels))
  )


def test_bad_thresholds_raise():
  params = _trained_like_params()
  with pytest.raises(ValueError, match=r"threshold 1.5: expected a probability"):
    inference.evaluate(
      params,
      np.zeros((2, 28, 28)),
      np.zeros(2, np.int32),
      order="row",
      early_exit_thresholds=(1.5,),
    )


def test_hidden_gradient_norms_against_finite_differences():
  params = _trained_like_params(units=4)
  x = jnp.asarray(np.random.default_rng(4).uniform(size=(1, 12, 1)))
  labels = jnp.array([3])
  norms = diagnostics.hidden_gradient_norms(params, x, labels)
  assert norms.shape == (12,)
  # dL/dh_t by finite differences on an additive perturbation of h_t at t = 5.
  from pixelrnn_jax import gru_cell

  def loss_with(delta, t_perturbed=5):
    h = jnp.zeros((1, 4))
    for t in range(12):
      h = gru_cell.gru_step(params, h, x[:, t])
      if t == t_perturbed:
        h = h + delta
    logits = h @ params.output.kernel + params.output.bias
    return -jax.nn.log_softmax(logits)[0, 3]

  eps = 1e-6
  grad = np.array([(loss_with(eps * e) - loss_with(-eps * e)) / (2 * eps) for e in np.eye(4)])
  np.testing.assert_allclose(norms[5], np.linalg.norm(grad), rtol=1e-6)


# ---------------------------------------------------------------------------- images


def test_read_image_formats_and_errors(tmp_path):
  from PIL import Image

  digit = (np.arange(784) % 256).astype(np.uint8).reshape(28, 28)
  Image.fromarray(digit).save(tmp_path / "d.png")
  Image.fromarray(digit).convert("RGB").save(tmp_path / "rgb.png")
  np.save(tmp_path / "u8.npy", digit)
  np.save(tmp_path / "f.npy", digit.astype(np.float32) / 255)
  np.save(tmp_path / "i64.npy", digit.astype(np.int64))  # np.array([[0, 255], ...])'s dtype
  for name in ("d.png", "rgb.png", "u8.npy", "f.npy", "i64.npy"):
    np.testing.assert_allclose(
      images_lib.read_image(tmp_path / name), digit / 255.0, atol=1e-6, err_msg=name
    )
  Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "big.png")
  np.save(tmp_path / "i16.npy", np.full((28, 28), 4095, np.int16))
  np.save(tmp_path / "range.npy", np.full((28, 28), 3.0))
  np.save(tmp_path / "nan.npy", np.full((28, 28), np.nan))
  (tmp_path / "broken.png").write_bytes(b"not a png")
  (tmp_path / "notes.txt").write_text("hi")
  cases = {
    "big.png": "no ink",
    "i16.npy": r"int16 values must be in 0\.\.255 \(found 4095\.\.4095\)",
    "range.npy": r"in \[0, 1\]",
    "nan.npy": "finite",
    "broken.png": "not a readable image",
    "notes.txt": "unsupported file type .txt",
    "missing.png": "no such file",
  }
  for name, match in cases.items():
    with pytest.raises(images_lib.ImageError, match=match) as info:
      images_lib.load_image(tmp_path / name)
    assert name in str(info.value)


# ---------------------------------------------------------------------------- commands


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A tiny trained run (row order, synthetic data) with checkpoints."""
  from tests.helpers import synthetic_digits as _synthetic

  workdir = tmp_path_factory.mktemp("run")
  splits = {"train": _synthetic(160, 0), "valid": _synthetic(60, 1)}
  original = loop._load_split
  loop._load_split = lambda config, split: splits[split]
  try:
    config = config_lib.Config(
      order="row",
      num_units=8,
      batch_size=16,
      steps=40,
      learning_rate=1e-2,
      log_every=5,
      eval_every=20,
      checkpoint_every=20,
      eval_batch_size=64,
    )
    loop.train_and_evaluate(config, workdir, progress=False)
  finally:
    loop._load_split = original
  return workdir, splits


def test_predict_command_answers_good_files_despite_bad_ones(run_dir, tmp_path, capsys):
  workdir, splits = run_dir
  # Standing up: a toy digit's bright row, read through prepare, is a dash (refused).
  images = splits["valid"][0].transpose(0, 2, 1)
  np.save(tmp_path / "a.npy", images[0])
  np.save(tmp_path / "b.npy", images[1])
  np.save(tmp_path / "bad.npy", np.zeros((10, 10), np.float32))
  code = cli.main(
    [
      "predict",
      "--checkpoint",
      str(workdir),
      "--json",
      "--confidence",
      "0.9",
      str(tmp_path / "a.npy"),
      str(tmp_path / "bad.npy"),
      str(tmp_path / "b.npy"),
    ]
  )
  assert code == 1
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [Path(row["input"]).name for row in rows] == ["a.npy", "bad.npy", "b.npy"]  # in order
  assert "no ink" in rows[1]["error"]
  answers = {row["input"]: row for row in rows if "error" not in row}
  assert len(answers) == 2
  for row in answers.values():
    assert 28 <= row["pixels_read"] <= 784 and row["pixels_read"] % 28 == 0  # whole rows
    assert 0 <= row["label"] <= 9
  # With confidence 1.0 every pixel row is read, and the label is the full-sequence one.
  capsys.readouterr()
  assert cli.main(["predict", "--checkpoint", str(workdir), "--json", str(tmp_path / "a.npy")]) == 0
  row = json.loads(capsys.readouterr().out)
  params, _, _ = helpers.load_model(workdir)
  logits = gru_classifier.apply(params, images_lib.to_mnist(images[0])[None])
  assert row["pixels_read"] == 784 and row["label"] == int(jnp.argmax(logits[0, -1]))


def test_evaluate_early_exit_flag(run_dir, monkeypatch, capsys):
  workdir, splits = run_dir
  from pixelrnn_jax import data

  monkeypatch.setattr(data, "load_mnist", lambda split, **kw: splits["valid"])
  assert (
    cli.main(["evaluate", "--checkpoint", str(workdir), "--json", "--early-exit", "0.5,0.9,1.0"])
    == 0
  )
  result = json.loads(capsys.readouterr().out)
  rows = result["early_exit"]
  assert [r["threshold"] for r in rows] == [0.5, 0.9, 1.0]
  assert rows[0]["mean_steps"] <= rows[1]["mean_steps"] <= rows[2]["mean_steps"] <= 28
  assert cli.main(["evaluate", "--checkpoint", str(workdir), "--early-exit", "2"]) == 2
  assert "must be a probability in (0, 1]" in capsys.readouterr().err


def test_plot_command_writes_valid_pngs(run_dir, monkeypatch, tmp_path, capsys):
  workdir, splits = run_dir
  from pixelrnn_jax import data

  monkeypatch.setattr(data, "load_mnist", lambda split, **kw: splits["valid"])
  assert cli.main(["plot", str(workdir), "--out", str(tmp_path), "--examples", "40"]) == 0
  names = {"learning_curves.png", "accuracy_per_pixel.png", "early_exit.png", "gradient_norms.png"}
  assert {p.name for p in tmp_path.iterdir()} == names
  from PIL import Image

  for name in names:
    path = tmp_path / name
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000
    with Image.open(path) as image:
      image.verify()


def test_plot_of_a_non_run_is_a_clear_error(tmp_path, capsys):
  assert cli.main(["plot", str(tmp_path)]) == 2
  assert "no checkpoint in this run directory" in capsys.readouterr().err
  assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("given", ["step", "run"])
def test_a_damaged_step_directory_is_named_as_one(given, tmp_path, capsys):
  """A step directory whose ``state`` is a stray file was called "no checkpoint in this
  run directory" when named itself, and the run holding it too."""
  step = tmp_path / "checkpoints" / "100"
  step.mkdir(parents=True)
  (step / "state").write_bytes(b"\x00garbage")
  assert cli.main(["evaluate", "--checkpoint", str(step if given == "step" else tmp_path)]) == 2
  err = capsys.readouterr().err
  if given == "step":
    assert f"{step}: a step directory without a readable checkpoint (its 'state' item is not" in err
  else:
    assert f"{tmp_path}: none of the checkpoints [100] can be read" in err


def test_plot_early_exit_compares_models(run_dir, monkeypatch, tmp_path, capsys):
  workdir, splits = run_dir
  from PIL import Image

  from pixelrnn_jax import data

  monkeypatch.setattr(data, "load_mnist", lambda split, **kw: splits["valid"])
  out = tmp_path / "cmp"
  argv = ["plot", "--early-exit", str(workdir), "--early-exit", str(workdir), "--out", str(out)]
  assert cli.main(argv) == 0
  path = out / "early_exit_comparison.png"
  assert capsys.readouterr().out.strip() == str(path)
  with Image.open(path) as image:
    assert image.size == (1100, 500)
  assert cli.main(["plot", str(workdir), "--early-exit", str(workdir), "--out", str(out)]) == 2
  assert "without RUN_DIR" in capsys.readouterr().err
  assert cli.main(["plot", "--early-exit", str(workdir)]) == 2
  assert "--early-exit needs --out DIR" in capsys.readouterr().err
  assert cli.main(["plot"]) == 2
  assert "plot needs RUN_DIR" in capsys.readouterr().err


_PROBABILITIES = st.lists(
  st.floats(min_value=0, max_value=1, exclude_min=True), min_size=1, max_size=5
)


@given(_PROBABILITIES, st.sampled_from(["", " "]))
def test_early_exit_thresholds_parse_in_order(values, space):
  text = ",".join(f"{space}{v!r}" for v in values)
  assert commands.parse_thresholds(text) == tuple(values)


@given(_PROBABILITIES, st.data())
def test_an_empty_or_bad_threshold_is_refused_naming_its_place(values, data):
  parts = [repr(v) for v in values]
  position = data.draw(st.integers(0, len(parts)))
  bad = data.draw(st.sampled_from(["", " ", "x", "0", "1.5", "-0.2", "nan", "inf", "0.9 0.99"]))
  parts.insert(position, bad)
  text = ",".join(parts)
  with pytest.raises(ValueError, match=f"--early-exit .*element {position + 1} "):
    commands.parse_thresholds(text)


@pytest.mark.parametrize(("first_loss", "log_scale"), [(2.3, False), (0.05, True)])
def test_learning_curves_of_a_fine_tune_get_a_log_loss_axis(
  tmp_path, monkeypatch, first_loss, log_scale
):
  from pixelrnn_jax import plots

  lines = [
    {"step": s, "loss": first_loss / (1 + s / 100), "accuracy": 0.98 + s / 1e5}
    for s in (50, 100, 150, 200)
  ]
  lines.append({"step": 200, "split": "valid", "accuracy": 0.985, "loss": 0.05})
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
  figures = []
  monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
  plots.learning_curves(tmp_path, tmp_path)
  loss_ax, acc_ax, _ = figures[0].axes
  assert (loss_ax.get_yscale() == "log") is log_scale
  has_chance = any(line.get_label().endswith("(chance)") for line in loss_ax.get_lines())
  assert has_chance is not log_scale
  assert (acc_ax.get_ylim() == (0, 1)) is not log_scale


@settings(max_examples=30, deadline=None)
@given(low=st.floats(-4, 2), decades=st.floats(0.05, 2.7))  # with the margins: <= 3
def test_a_log_axis_of_up_to_3_decades_gets_plain_number_ticks_inside_it(low, decades):
  """The fine-tune's loss (0.02-0.06) and error (0.5-2%) axes used to show one tick label,
  '4 x 10^-2' or '10^0', or none at all."""
  from pixelrnn_jax import plots

  plt = plots._pyplot()
  fig, ax = plt.subplots()
  ax.semilogy([0, 1], [10**low, 10 ** (low + decades)])
  plots.readable_log_ticks(ax)
  fig.canvas.draw()
  lo, hi = ax.get_ylim()
  shown = [
    (tick.get_loc(), tick.label1.get_text())
    for tick in ax.yaxis.get_major_ticks()
    if lo <= tick.get_loc() <= hi and tick.label1.get_text()
  ]
  plt.close(fig)
  assert len(shown) >= 2, (lo, hi, shown)
  for value, text in shown:
    assert float(text) == pytest.approx(value, rel=1e-5), text  # '0.03', not '3 x 10^-2'


@given(
  st.lists(
    st.tuples(st.sampled_from([200.0, 350.5, 784.0]), st.sampled_from([0.5, 0.9, 0.98])),
    min_size=1,
    max_size=8,
  )
)
def test_thresholds_that_land_on_one_point_share_one_label(points):
  """An untrained model never gets sure: every threshold reads all 784 pixels, and the
  labels used to overprint each other at that one point."""
  rows = [
    {"threshold": t, "mean_steps": x, "accuracy": y}
    for t, (x, y) in zip(np.linspace(0.5, 1.0, len(points)).round(3), points, strict=True)
  ]
  labels = plots.threshold_labels(rows)
  assert set(labels) == set(points)  # one label per distinct point
  for (x, y), label in labels.items():
    here = [r["threshold"] for r in rows if (r["mean_steps"], r["accuracy"]) == (x, y)]
    assert label == (f"{here[0]:g}" if len(here) == 1 else f"{min(here):g}-{max(here):g}")


@settings(max_examples=25, deadline=None)
@given(
  st.lists(
    st.tuples(st.floats(1.0, 784.0), st.floats(0.0, 1.0)), min_size=1, max_size=12, unique=True
  )
)
def test_threshold_labels_never_overlap_each_other_or_leave_the_axes(points):
  """Thresholds whose points lie close together (e.g. 0.99, 0.991, 0.992) used to
  print their labels over each other."""
  plt = plots._pyplot()
  fig, ax = plt.subplots(figsize=(7, 4))
  ax.plot(*zip(*points, strict=True), "o-")
  fig.tight_layout()
  note = ax.text(0.99, 0.02, "at each point: the exit threshold p", transform=ax.transAxes)
  labels = {point: f"0.{n:03d}" for n, point in enumerate(points)}
  left_out = plots.place_labels(ax, labels, avoid=[note])
  renderer = fig.canvas.get_renderer()
  frame = ax.get_window_extent(renderer)
  drawn = [t for t in ax.texts if t is not note]
  assert sorted([*left_out, *(t.get_text() for t in drawn)]) == sorted(labels.values())
  boxes = [t.get_window_extent(renderer) for t in [*drawn, note]]
  markers = ax.transData.transform(points)
  for i, box in enumerate(boxes[:-1]):
    assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 <= box.y1 <= frame.y1
    # Apart by a gap (labels that touched read as one number: "0.50.552") ...
    apart = box.padded(plots.LABEL_GAP - 0.5)
    assert not any(apart.overlaps(other) for other in boxes[i + 1 :]), drawn[i].get_text()
    # ... and off every point's marker.
    assert not any(apart.contains(px, py) for px, py in markers), drawn[i].get_text()
  if len(points) == 1:
    assert left_out == []  # a lone point always has room
  plt.close(fig)


def test_the_default_thresholds_of_a_spread_curve_are_all_labelled(tmp_path):
  points = [(220, 0.65), (275, 0.8), (306, 0.86), (360, 0.92), (403, 0.956), (487, 0.978)]
  points += [(604, 0.978), (784, 0.978)]
  rows = [
    {"threshold": t, "mean_steps": x, "accuracy": y}
    for t, (x, y) in zip([0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0], points, strict=True)
  ]
  plt = plots._pyplot()
  fig, ax = plt.subplots(figsize=(7, 4))
  ax.plot(*zip(*points, strict=True), "o-")
  fig.tight_layout()
  assert plots.place_labels(ax, plots.threshold_labels(rows)) == []
  assert sorted(t.get_text() for t in ax.texts) == sorted(f"{r['threshold']:g}" for r in rows)
  plt.close(fig)
  path = plots.early_exit_tradeoff(rows, 784, tmp_path, "spread")
  assert path.exists()


@pytest.mark.parametrize("count", [1, 2, 29, 30, 200])
def test_a_short_run_s_training_curves_have_a_marker_on_each_point(tmp_path, monkeypatch, count):
  """A 40-step run logs one training line: drawn without markers it was an empty panel.
  Fewer than SPARSE_POINTS points get a marker each; longer curves stay plain lines."""
  from pixelrnn_jax import plots

  lines = [{"step": 10 * (s + 1), "loss": 2.3 - s / 1e3, "accuracy": 0.1} for s in range(count)]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
  figures = []
  monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
  plots.learning_curves(tmp_path, tmp_path)
  train = [
    line
    for ax in figures[0].axes
    for line in ax.get_lines()
    if len(line.get_xdata()) == count and not line.get_label().endswith("(chance)")
  ]
  assert len(train) == 3  # loss, accuracy, error rate
  for line in train:
    assert (line.get_marker() not in ("None", None, "")) is (count < plots.SPARSE_POINTS)
