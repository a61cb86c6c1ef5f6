"""A model answers for its own input, and the public API checks what it is given."""

import json
from pathlib import Path

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixelrnn_jax import cli
from pixelrnn_jax import gru_cell
from pixelrnn_jax import gru_classifier
from pixelrnn_jax import inference
from pixelrnn_jax import model_io
from pixelrnn_jax import preprocessing
from pixelrnn_jax.training import config as config_lib
from pixelrnn_jax.training import loop

PACKAGE = Path(gru_classifier.__file__).parent


def _images(n, seed=0, dtype=np.float32):
  return np.random.default_rng(seed).uniform(size=(n, 28, 28)).astype(dtype)


# ----------------------------------------------------------------------------
# Folding and order


@pytest.mark.parametrize("cell", ["tf1", "reset_after"])
@pytest.mark.parametrize("order", ["pixel", "row"])
def test_folded_model_on_plain_pixels_equals_trained_model_on_standardised(cell, order):
  in_dim = preprocessing.sequence_shape(order)[1]
  params = gru_classifier.init(
    jax.random.key(1), num_units=5, in_dim=in_dim, cell=cell, dtype=jnp.float64
  )
  images = _images(3, dtype=np.float64)
  x = preprocessing.to_sequences(images, order)
  expected = gru_classifier.apply(params, preprocessing.standardize(x))
  model = gru_classifier.for_images(params, order=order, standardize=True)
  np.testing.assert_allclose(gru_classifier.apply(model, images), expected, atol=1e-10, rtol=0)
  # Not folding reads [0, 1] pixels as if standardised: clearly different.
  assert np.abs(gru_classifier.apply(params, x) - expected).max() > 1e-3


def test_permuted_model_permutes_images_itself():
  params = gru_classifier.init(jax.random.key(2), num_units=4, dtype=jnp.float64)
  images = _images(2, dtype=np.float64)
  model = params.replace(order="permuted")
  by_hand = images.reshape(2, 784)[:, preprocessing.permutation()][:, :, None]
  np.testing.assert_allclose(
    gru_classifier.apply(model, images), gru_classifier.apply(params, by_hand), rtol=1e-12
  )
  np.testing.assert_allclose(
    gru_classifier.apply(model, images.reshape(2, 784)),
    gru_classifier.apply(params, by_hand),
    rtol=1e-12,
  )
  # Sequences pass through as given.
  np.testing.assert_allclose(
    gru_classifier.apply(model, by_hand), gru_classifier.apply(params, by_hand), rtol=1e-12
  )


@pytest.mark.parametrize("order, standardize", [("permuted", True), ("row", False)])
def test_checkpoint_written_by_train_reads_plain_images(tmp_path, monkeypatch, order, standardize):
  rng = np.random.default_rng(0)
  splits = {
    s: (rng.uniform(size=(48, 28, 28)).astype(np.float32), rng.integers(0, 10, 48).astype(np.int32))
    for s in ("train", "valid")
  }
  monkeypatch.setattr(loop, "_load_split", lambda config, split: splits[split])
  config = config_lib.Config(
    order=order,
    standardize=standardize,
    num_units=6,
    batch_size=16,
    steps=3,
    eval_every=3,
    checkpoint_every=3,
    eval_batch_size=48,
  )
  loop.train_and_evaluate(config, tmp_path, progress=False)
  model = gru_classifier.load(tmp_path)
  assert model.order == order
  images, labels = splits["valid"]
  logged = json.loads((tmp_path / "eval.json").read_text())
  logits = gru_classifier.apply(model, images)
  np.testing.assert_allclose(
    float(gru_classifier.cross_entropy(logits, labels)), logged["loss"], rtol=1e-5
  )
  # The raw checkpoint, standardised and ordered by hand, gives the same logits.
  saved = model_io.read(tmp_path)
  raw = gru_classifier.from_arrays(saved.arrays)
  x = preprocessing.to_sequences(images, order)
  if standardize:
    x = preprocessing.standardize(x)
  np.testing.assert_allclose(logits, gru_classifier.apply(raw, x), atol=2e-5)


# ----------------------------------------------------------------------------
# Labels


@pytest.mark.parametrize("bad", [10, -1, 99])
@pytest.mark.parametrize(
  "fn",
  [
    gru_classifier.cross_entropy,
    gru_classifier.accuracy,
    gru_classifier.accuracy_per_step,
    gru_classifier.cross_entropy_per_step,
  ],
)
def test_out_of_range_labels_raise(bad, fn):
  logits = jnp.zeros((3, 5, 10))
  with pytest.raises(ValueError, match=rf"labels contain \[{bad}\]: expected classes in \[0, 10\)"):
    fn(logits, jnp.array([1, bad, 2]))


def test_out_of_range_label_under_jit_makes_loss_and_gradient_nan():
  logits = jax.random.normal(jax.random.key(0), (3, 4, 10))
  loss = jax.jit(gru_classifier.cross_entropy)
  grad = jax.jit(jax.grad(gru_classifier.cross_entropy))
  for bad in (10, -1):
    labels = jnp.array([1, bad, 2])
    assert np.isnan(loss(logits, labels))
    g = np.asarray(grad(logits, labels))
    assert np.isnan(g[1]).any() and np.isfinite(g[[0, 2]]).all()
  assert np.isfinite(loss(logits, jnp.array([1, 9, 0])))


def test_evaluate_refuses_out_of_range_labels():
  params = gru_classifier.init(jax.random.key(0), num_units=4)
  with pytest.raises(ValueError, match=r"labels contain \[10\]"):
    inference.evaluate(params, _images(2), np.array([3, 10]))
  with pytest.raises(ValueError, match=r"labels have dtype float"):
    inference.evaluate(params, _images(2), np.array([3.0, 1.0]))


# ----------------------------------------------------------------------------
# Shapes and dtypes


@pytest.mark.parametrize(
  "shape, match",
  [
    ((28, 28), r"one unbatched image; add a batch axis: x\[None\]"),
    ((784,), r"add a batch axis: x\[None\]"),
    ((2, 28, 27), r"\(2, 28, 27\): expected images \[batch, 28, 28\]"),
    ((2, 783), r"\(2, 783\): expected images"),
  ],
)
def test_images_must_be_batched_28x28(shape, match):
  params = gru_classifier.load_pretrained("pixel")
  with pytest.raises(ValueError, match=match):
    gru_classifier.apply(params, np.zeros(shape, np.float32))
  with pytest.raises(ValueError, match=match):
    inference.predict(params, np.zeros(shape, np.float32))


def test_nan_pixels_are_refused_when_concrete():
  params = gru_classifier.init(jax.random.key(0), num_units=4)
  images = _images(2)
  images[1, 3, 4] = np.nan
  with pytest.raises(ValueError, match="NaN or inf"):
    gru_classifier.apply(params, images)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("impl", ["fused", "scan"])
def test_half_precision_images_run_in_the_params_dtype(dtype, impl):
  params = gru_classifier.init(jax.random.key(0), num_units=4)
  images = jnp.asarray(_images(2)).astype(dtype)
  logits = gru_classifier.apply(params, images, impl=impl)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(
    logits, gru_classifier.apply(params, images.astype(jnp.float32), impl=impl), rtol=1e-6
  )


@pytest.mark.parametrize("params_dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("x_dtype", [jnp.float32, jnp.float64])
def test_every_float_combination_runs_under_x64(params_dtype, x_dtype):
  assert jax.config.jax_enable_x64
  params = gru_classifier.init(jax.random.key(0), num_units=4, dtype=params_dtype)
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 9, 1)), x_dtype)
  labels = jnp.array([1, 2])
  logits = gru_classifier.apply(params, x)
  assert logits.dtype == params_dtype
  grads = jax.grad(lambda p: gru_classifier.cross_entropy(gru_classifier.apply(p, x), labels))(
    params
  )
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  out = inference.predict(params, x, threshold=0.5)
  assert out["probability"].dtype == params_dtype


def test_mixed_dtype_params_name_the_mismatch():
  params = gru_classifier.init(jax.random.key(0), num_units=4, dtype=jnp.float64)
  mixed = params.replace(output=params.output.replace(bias=params.output.bias.astype(jnp.float32)))
  with pytest.raises(ValueError, match=r"params mix dtypes \['float32', 'float64'\]"):
    gru_classifier.apply(mixed, jnp.zeros((1, 3, 1)))


# ----------------------------------------------------------------------------
# gru_step knows its cell


def test_gru_step_reads_the_cell_from_reset_after_params():
  params = gru_classifier.init(
    jax.random.key(0), num_units=4, cell="reset_after", dtype=jnp.float64
  )
  h = jax.random.normal(jax.random.key(1), (2, 4), jnp.float64)
  x = jax.random.normal(jax.random.key(2), (2, 1), jnp.float64)
  # The independent reference: flax.linen.GRUCell with the same weights.
  w_hr, w_hz = params.gates.kernel[1:, :4], params.gates.kernel[1:, 4:]
  flax_params = {
    "params": {
      "ir": {"kernel": params.gates.kernel[:1, :4], "bias": params.gates.bias[:4]},
      "iz": {"kernel": params.gates.kernel[:1, 4:], "bias": params.gates.bias[4:]},
      "in": {"kernel": params.candidate.kernel[:1], "bias": params.candidate.bias},
      "hr": {"kernel": w_hr},
      "hz": {"kernel": w_hz},
      "hn": {"kernel": params.candidate.kernel[1:], "bias": params.candidate.recurrent_bias},
    }
  }
  expected, _ = nn.GRUCell(features=4, param_dtype=jnp.float64).apply(flax_params, h, x)
  np.testing.assert_allclose(gru_cell.gru_step(params, h, x), expected, rtol=1e-12)
  as_dict = jax.tree.map(lambda a: a, {k: dict(params[k]) for k in params})
  np.testing.assert_allclose(gru_cell.gru_step(as_dict, h, x), expected, rtol=1e-12)


def test_gru_step_cell_mismatch_is_a_value_error():
  tf1 = gru_classifier.init(jax.random.key(0), num_units=4)
  reset_after = gru_classifier.init(jax.random.key(0), num_units=4, cell="reset_after")
  h, x = jnp.zeros((1, 4)), jnp.zeros((1, 1))
  with pytest.raises(ValueError, match="cell='tf1' but the params hold 'reset_after'"):
    gru_cell.gru_step(reset_after, h, x, cell="tf1")
  with pytest.raises(ValueError, match="cell='reset_after' but the params hold 'tf1'"):
    gru_cell.gru_step(tf1, h, x, cell="reset_after")
  with pytest.raises(ValueError, match="candidate keys"):
    gru_cell.gru_step({"gates": dict(tf1["gates"]), "candidate": {"kernel": 1}}, h, x)
  with pytest.raises(ValueError, match="expected a mapping with 'gates'"):
    gru_cell.gru_step({"weights": 1}, h, x)
  with pytest.raises(ValueError, match=r"h has shape \(1, 5\)"):
    gru_cell.gru_step(tf1, jnp.zeros((1, 5)), x)


# ----------------------------------------------------------------------------
# Forward-mode autodiff


def test_forward_mode_through_the_default_core_equals_scan():
  params = gru_classifier.init(jax.random.key(0), num_units=3, dtype=jnp.float64)
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 7, 1)))
  tangent = jnp.ones_like(x)
  fused = jax.jvp(lambda v: gru_classifier.apply(params, v), (x,), (tangent,))
  scan = jax.jvp(lambda v: gru_classifier.apply(params, v, impl="scan"), (x,), (tangent,))
  np.testing.assert_allclose(fused[1], scan[1], rtol=1e-12)
  jac = jax.jacfwd(lambda v: gru_classifier.apply(params, v)[:, -1])(x)
  np.testing.assert_allclose(
    jac, jax.jacrev(lambda v: gru_classifier.apply(params, v)[:, -1])(x), rtol=1e-10, atol=1e-14
  )


# ----------------------------------------------------------------------------
# CLI flags


@pytest.mark.parametrize(
  "flags, match",
  [
    (["--batch-size", "0"], "--batch-size 0: expected a positive integer"),
    (["--batch-size", "-5"], "--batch-size -5: expected a positive integer"),
    (["--devices", "0"], "--devices 0: expected a positive integer"),
    (["--early-exit", "2"], "element 1 (2) must be a probability in (0, 1]"),
    (["--early-exit", "0.9,,0.99"], "element 2 is empty"),
  ],
)
def test_evaluate_flags_are_validated(flags, match, capsys):
  assert cli.main(["evaluate", "--checkpoint", "pretrained:pixel", *flags]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and match in err[0]


@pytest.mark.parametrize(
  "flags, match",
  [
    (["--confidence", "0"], "--confidence 0.0: expected a probability in (0, 1]"),
    (["--confidence", "1.5"], "--confidence 1.5"),
    (["--data-dir", "/x"], "--data-dir /x is only read with --split: pass --split valid"),
  ],
)
def test_predict_flags_are_validated(flags, match, capsys, tmp_path):
  image = tmp_path / "a.npy"
  np.save(image, np.zeros((28, 28), np.uint8))
  assert cli.main(["predict", "--checkpoint", "pretrained:pixel", str(image), *flags]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and match in err[0]


def test_a_missing_file_named_by_a_number_is_pointed_to_split(capsys, tmp_path, monkeypatch):
  """``predict 0`` (an example's index, without --split) said only "no such file"."""
  monkeypatch.chdir(tmp_path)
  assert cli.main(["predict", "--checkpoint", "pretrained:pixel", "0", "nofile.png"]) == 1
  out = capsys.readouterr().err.splitlines()
  assert (
    out[0].startswith("0: error: no such file; to read example N") and "--split valid 0" in out[0]
  )
  assert out[1] == "nofile.png: error: no such file"


def test_pixels_outside_0_1_are_refused_for_images_and_loaded_models():
  model = gru_classifier.load_pretrained("pixel")
  with pytest.raises(ValueError, match=r"pixels in \[[0-9.]+, 255\]: expected \[0, 1\] \(divide"):
    gru_classifier.apply(model, _images(2) * 255)
  with pytest.raises(ValueError, match=r"expected \[0, 1\]"):
    gru_classifier.apply(model, (_images(2) * 255).reshape(2, 784, 1))  # its sequences too
  bare = gru_classifier.init(jax.random.key(0), num_units=3)
  gru_classifier.apply(bare, np.full((1, 5, 1), 3.0, np.float32))  # a bare model's units


@pytest.mark.parametrize(
  "surgery, match",
  [
    (lambda p: p.replace(gates=p.gates.replace(kernel=p.gates.kernel[1:])), "gates.kernel"),
    (
      lambda p: p.replace(candidate=p.candidate.replace(bias=p.candidate.bias[:3])),
      "candidate.bias",
    ),
    (lambda p: p.replace(output=p.output.replace(bias=p.output.bias[:9])), "output.bias"),
  ],
)
def test_malformed_params_are_a_value_error_everywhere(surgery, match):
  params = surgery(gru_classifier.init(jax.random.key(0), num_units=4, in_dim=2))
  x = jnp.zeros((1, 3, 2))
  with pytest.raises(ValueError, match=match):
    gru_classifier.apply(params, x)
  with pytest.raises(ValueError, match=match):
    inference.predict(params, x)
  if match != "output.bias":
    with pytest.raises(ValueError, match=match):
      gru_cell.gru_step(params, jnp.zeros((1, 4)), jnp.zeros((1, 2)))


def test_gru_step_needs_matching_leading_dims_and_float_inputs():
  params = gru_classifier.init(jax.random.key(0), num_units=4)
  with pytest.raises(ValueError, match="same leading dims"):
    gru_cell.gru_step(params, jnp.zeros((3, 4)), jnp.zeros((2, 1)))
  with pytest.raises(ValueError, match="x has dtype int32"):
    gru_cell.gru_step(params, jnp.zeros((2, 4)), jnp.zeros((2, 1), jnp.int32))


def test_evaluate_in_another_order_warns(caplog, capsys, mnist_dir):
  code = cli.main(
    [
      "evaluate",
      "--checkpoint",
      "pretrained:pixel",
      "--order",
      "permuted",
      "--data-dir",
      mnist_dir,
      "--batch-size",
      "5000",
      "--json",
    ]
  )
  assert code == 0
  assert "trained on pixel order in permuted order" in caplog.text


def test_a_plain_dict_of_weights_is_a_clear_error():
  params = gru_classifier.init(jax.random.key(0), num_units=4)
  arrays = flax.serialization.to_state_dict(params)
  with pytest.raises(ValueError, match="not a gru_classifier.Params.*from_arrays"):
    gru_classifier.apply(arrays, np.zeros((1, 28, 28), np.float32))
  rebuilt = gru_classifier.from_arrays(arrays, order=params.order)
  np.testing.assert_array_equal(
    gru_classifier.apply(rebuilt, np.zeros((1, 28, 28), np.float32)),
    gru_classifier.apply(params, np.zeros((1, 28, 28), np.float32)),
  )


@pytest.mark.parametrize("order, feeds", [("pixel", 1), ("row", 28)])
def test_an_order_that_feeds_another_width_names_the_in_dim_to_pass(order, feeds):
  values = "value" if feeds == 1 else "values"
  with pytest.raises(
    ValueError, match=rf"feeds {feeds} {values} per step but in_dim=5; pass in_dim={feeds}$"
  ):
    gru_classifier.init(jax.random.key(0), in_dim=5, order=order)
