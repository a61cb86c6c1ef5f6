"""Property-based tests of the public API: any input gives a documented result or a ValueError.

Hypothesis draws shapes (valid and not), dtypes, label values and x64 on or
off. Every call must either return finite values of the documented shape or
raise ``ValueError``; any other exception, a wrong shape or a NaN fails.
"""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from pixelrnn_jax import checkpoints
from pixelrnn_jax import gru_cell
from pixelrnn_jax import gru_classifier
from pixelrnn_jax import inference

SETTINGS = settings(
  max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)

FLOAT_DTYPES = ["float16", "bfloat16", "float32", "float64"]
ANY_DTYPES = FLOAT_DTYPES + ["int32", "uint8", "bool"]


@st.composite
def models(draw):
  return dict(
    num_units=draw(st.integers(1, 4)),
    in_dim=draw(st.sampled_from([1, 2, 28])),
    cell=draw(st.sampled_from(["tf1", "reset_after"])),
    dtype=draw(st.sampled_from(["float32", "float64"])),
    order=draw(st.sampled_from([None, "pixel", "permuted", "row"])),
  )


@st.composite
def inputs(draw, in_dim):
  """Sequences, images and wrong shapes alike."""
  shape = draw(
    st.one_of(
      st.tuples(st.integers(0, 3), st.integers(0, 5), st.just(in_dim)),  # sequences
      st.tuples(st.integers(1, 3), st.just(28), st.just(28)),  # images
      st.tuples(st.integers(1, 3), st.just(784)),  # flat images
      st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple),  # anything
      st.sampled_from([(28, 28), (784,), (2, 28, 27)]),
    )
  )
  dtype = draw(st.sampled_from(ANY_DTYPES))
  values = np.random.default_rng(draw(st.integers(0, 2**16))).uniform(size=shape)
  return np.asarray(values).astype(jnp.dtype(dtype))


def _build(spec, x64):
  order = spec["order"]
  if order is not None and {"row": 28}.get(order, 1) != spec["in_dim"]:
    with pytest.raises(ValueError, match="order="):
      gru_classifier.init(jax.random.key(0), **spec)
    order = None
  return gru_classifier.init(jax.random.key(0), **{**spec, "order": order})


def _run(x64, fn):
  with jax.enable_x64(x64), warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # float64 truncated when x64 is off
    return fn()


def _finite(tree):
  return all(np.isfinite(np.asarray(leaf, np.float64)).all() for leaf in jax.tree.leaves(tree))


@SETTINGS
@given(spec=models(), data=st.data(), x64=st.booleans())
def test_apply_and_early_exit_return_documented_shapes_or_value_error(spec, data, x64):
  x = data.draw(inputs(spec["in_dim"]))

  def body():
    params = _build(spec, x64)
    try:
      logits = gru_classifier.apply(params, x)
    except ValueError:
      with pytest.raises(ValueError):
        inference.predict(params, x)
      return
    batch, steps = logits.shape[:2]
    assert logits.shape == (x.shape[0], steps, 10) and steps >= 1
    assert logits.dtype == params.output.kernel.dtype and _finite(logits)
    out = inference.predict(params, x, threshold=0.5)
    assert out["label"].shape == (batch,) and _finite(out)
    assert np.all((1 <= out["steps"]) & (out["steps"] <= steps))

  _run(x64, body)


@st.composite
def labels(draw, batch):
  shape = draw(st.sampled_from([(batch,), (batch + 1,), (batch, 1), ()]))
  dtype = draw(st.sampled_from(["int32", "int64", "uint8", "float32", "bool"]))
  values = draw(
    st.lists(st.integers(-3, 12), min_size=int(np.prod(shape)), max_size=int(np.prod(shape)))
  )
  return (
    np.asarray(values).reshape(shape).astype(dtype)
    if dtype != "uint8"
    else (np.abs(np.asarray(values)).reshape(shape).astype(dtype))
  )


@SETTINGS
@given(
  batch=st.integers(1, 4),
  steps=st.integers(1, 5),
  data=st.data(),
  x64=st.booleans(),
  dtype=st.sampled_from(FLOAT_DTYPES),
)
def test_losses_and_accuracies_return_finite_scalars_or_value_error(batch, steps, data, x64, dtype):
  y = data.draw(labels(batch))
  logits = np.random.default_rng(0).normal(size=(batch, steps, 10)).astype(jnp.dtype(dtype))
  functions = {
    gru_classifier.cross_entropy: (),
    gru_classifier.cross_entropy_per_step: (),
    gru_classifier.accuracy: (),
    gru_classifier.accuracy_per_step: (steps,),
  }

  def body():
    for fn, shape in functions.items():
      try:
        value = fn(jnp.asarray(logits), y)
      except ValueError:
        continue
      assert value.shape == shape and _finite(value), fn.__name__
      if fn is gru_classifier.cross_entropy:
        grad = jax.grad(fn)(jnp.asarray(logits, jnp.float32), y)
        assert _finite(grad)

  _run(x64, body)


@SETTINGS
@given(
  spec=models(),
  n=st.integers(1, 5),
  batch_size=st.integers(-1, 4),
  label_high=st.sampled_from([10, 11]),
  x64=st.booleans(),
  dtype=st.sampled_from(FLOAT_DTYPES + ["uint8"]),
)
def test_evaluate_returns_an_exact_result_or_value_error(
  spec, n, batch_size, label_high, x64, dtype
):
  images = np.random.default_rng(n).uniform(size=(n, 28, 28)).astype(jnp.dtype(dtype))
  labels = np.random.default_rng(n).integers(0, label_high, n)

  def body():
    params = _build(spec, x64)
    try:
      result = inference.evaluate(params, images, labels, batch_size=batch_size)
    except ValueError:
      return
    assert result["num_examples"] == n and 0 <= result["accuracy"] <= 1
    assert np.isfinite(result["loss"]) and len(result["accuracy_per_step"]) >= 1

  _run(x64, body)


@SETTINGS
@given(
  spec=models(),
  h_units=st.integers(1, 5),
  x_dim=st.integers(1, 3),
  lead=st.lists(st.integers(1, 3), max_size=2),
  cell=st.sampled_from([None, "tf1", "reset_after"]),
  x64=st.booleans(),
)
def test_gru_step_returns_the_state_shape_or_value_error(spec, h_units, x_dim, lead, cell, x64):
  def body():
    params = _build({**spec, "in_dim": x_dim if spec["in_dim"] != 28 else 28, "order": None}, x64)
    h = jnp.zeros((*lead, h_units), params.output.kernel.dtype)
    x = jnp.ones((*lead, x_dim), params.output.kernel.dtype)
    try:
      h_new = gru_cell.gru_step(params, h, x, cell=cell)
    except ValueError:
      return
    assert h_new.shape == h.shape and _finite(h_new)

  _run(x64, body)


@SETTINGS
@given(overshoot=st.sampled_from([1e-7, 5e-7, 1e-5, 1e-3, 0.5]), low=st.booleans())
def test_a_loaded_model_allows_float32_rounding_of_its_01_pixels_and_no_more(overshoot, low):
  """An undone standardisation lands an ulp or so outside [0, 1]; a real overshoot is refused."""
  params = gru_classifier.init(jax.random.key(0), num_units=2, in_dim=1, order="pixel")
  x = np.full((1, 28, 28), 0.5, np.float32)
  x[0, 3, 4] = -overshoot if low else 1 + overshoot
  if overshoot <= 1e-6:
    assert gru_classifier.apply(params, x).shape == (1, 784, 10)
  else:
    with pytest.raises(ValueError, match=r"x has pixels in \[.*\]: expected \[0, 1\]") as error:
      gru_classifier.apply(params, x)
    shown = re.search(r"pixels in \[([^,]+), ([^\]]+)\]", str(error.value)).group(1 if low else 2)
    assert (float(shown) < 0) if low else (float(shown) > 1)  # the message shows why


@SETTINGS
@given(blob=st.binary(max_size=64))
def test_any_file_that_is_not_weights_is_refused_naming_what_to_give(blob, tmp_path_factory):
  from pixelrnn_jax import checkpoints

  path = tmp_path_factory.mktemp("junk") / "weights.msgpack"
  path.write_bytes(blob)
  with pytest.raises(checkpoints.CheckpointError, match="not a pixelrnn_jax weights file") as error:
    checkpoints.load(path)
  assert "pretrained:NAME" in str(error.value) and "pixelrnn-jax export" in str(error.value)


@settings(max_examples=200, deadline=None)
@given(
  words=st.lists(st.text(st.characters(exclude_categories=("Z", "C")), min_size=1, max_size=12)),
  limit=st.integers(40, 400),
)
def test_a_long_error_is_shortened_at_word_boundaries_keeping_its_head_and_tail(words, limit):
  """A corrupt checkpoint's cause was cut mid-word ("... Requested byte ra)"): the
  message keeps whole words from its start and its end (where the cause is)."""
  message = " ".join(words)
  shown = checkpoints.shorten(message, limit)
  if len(message) <= limit:
    assert shown == message
    return
  assert len(shown) <= limit + 3 and shown.count("\u2026") >= 1
  tokens = shown.split(" ")
  assert tokens[0] == words[0] and tokens[-1] == words[-1]
  assert set(tokens) - {"\u2026"} <= set(words)
