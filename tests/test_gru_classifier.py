"""Forward maths of both cells against independent references."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixelrnn_jax import gru_cell
from pixelrnn_jax import gru_classifier


def _sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def numpy_tf1_logits(params, x):
  """TF1 GRUCell written from its equations in NumPy; x: [B, T, in_dim]."""
  w_g = np.asarray(params["gates"]["kernel"])
  b_g = np.asarray(params["gates"]["bias"])
  w_c = np.asarray(params["candidate"]["kernel"])
  b_c = np.asarray(params["candidate"]["bias"])
  w_o = np.asarray(params["output"]["kernel"])
  b_o = np.asarray(params["output"]["bias"])
  units = w_o.shape[0]
  h = np.zeros((x.shape[0], units))
  logits = []
  for t in range(x.shape[1]):
    xt = x[:, t]
    gates = _sigmoid(np.concatenate([xt, h], axis=1) @ w_g + b_g)
    r, u = gates[:, :units], gates[:, units:]
    c = np.tanh(np.concatenate([xt, r * h], axis=1) @ w_c + b_c)
    h = u * h + (1 - u) * c
    logits.append(h @ w_o + b_o)
  return np.stack(logits, axis=1)


def _random_params(key, *, cell="tf1", units=8, in_dim=1, classes=10):
  """Params with every weight random (biases too), so no term hides behind 0 or 1."""
  params = gru_classifier.init(
    key,
    num_units=units,
    in_dim=in_dim,
    num_classes=classes,
    cell=cell,
    dtype=jnp.float64,
  )
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(99), len(leaves))
  leaves = [0.5 * jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)]
  return jax.tree_util.tree_unflatten(treedef, leaves)


def test_tf1_forward_matches_numpy_reference():
  params = _random_params(jax.random.key(0), units=8, in_dim=3)
  x = np.random.default_rng(0).normal(size=(4, 37, 3))
  expected = numpy_tf1_logits(params, x)
  actual = jax.jit(gru_classifier.apply)(params, jnp.asarray(x))
  assert actual.shape == (4, 37, 10)
  np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-10)


def test_tf1_forward_matches_numpy_on_images():
  params = _random_params(jax.random.key(1), units=6)
  images = np.random.default_rng(1).uniform(size=(3, 28, 28))
  expected = numpy_tf1_logits(params, images.reshape(3, 784, 1))
  np.testing.assert_allclose(
    gru_classifier.apply(params, jnp.asarray(images)), expected, atol=1e-10
  )
  np.testing.assert_allclose(
    gru_classifier.apply(params, jnp.asarray(images.reshape(3, 784))),
    expected,
    atol=1e-10,
  )


def test_reset_after_matches_flax_gru_cell():
  units, in_dim = 8, 3
  params = _random_params(jax.random.key(2), cell="reset_after", units=units, in_dim=in_dim)
  w_g, b_g = params.gates.kernel, params.gates.bias
  w_c = params.candidate.kernel
  flax_params = {
    "params": {
      "cell": {
        "ir": {"kernel": w_g[:in_dim, :units], "bias": b_g[:units]},
        "iz": {"kernel": w_g[:in_dim, units:], "bias": b_g[units:]},
        "hr": {"kernel": w_g[in_dim:, :units]},
        "hz": {"kernel": w_g[in_dim:, units:]},
        "in": {"kernel": w_c[:in_dim], "bias": params.candidate.bias},
        "hn": {"kernel": w_c[in_dim:], "bias": params.candidate.recurrent_bias},
      }
    }
  }
  rnn = nn.RNN(nn.GRUCell(units, param_dtype=jnp.float64, dtype=jnp.float64))
  x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 29, in_dim)))
  hs = rnn.apply(flax_params, x)  # (B, T, units)
  expected = hs @ params.output.kernel + params.output.bias
  np.testing.assert_allclose(gru_classifier.apply(params, x), expected, atol=1e-10)


def test_cells_differ():
  """Guards the reference tests: the two variants are not the same function."""
  tf1 = _random_params(jax.random.key(3), units=8)
  ra = _random_params(jax.random.key(3), cell="reset_after", units=8)
  ra = ra.replace(candidate=ra.candidate.replace(recurrent_bias=jnp.zeros(8)))
  x = jnp.ones((2, 20, 1))
  assert not np.allclose(gru_classifier.apply(tf1, x), gru_classifier.apply(ra, x))


@pytest.mark.parametrize("cell", gru_cell.CELLS)
def test_scan_equals_python_loop_of_gru_step(cell):
  params = _random_params(jax.random.key(4), cell=cell, units=5, in_dim=2)
  x = jnp.asarray(np.random.default_rng(4).normal(size=(3, 25, 2)))
  h = jnp.zeros((3, 5))
  expected = []
  for t in range(x.shape[1]):
    h = gru_cell.gru_step(params, h, x[:, t], cell=cell)
    expected.append(h @ params.output.kernel + params.output.bias)
  np.testing.assert_allclose(gru_classifier.apply(params, x), jnp.stack(expected, 1), atol=1e-12)


def test_gru_step_is_batch_agnostic_and_vmappable():
  params = _random_params(jax.random.key(5), units=4, in_dim=2)
  h = jnp.asarray(np.random.default_rng(5).normal(size=(6, 4)))
  x = jnp.asarray(np.random.default_rng(6).normal(size=(6, 2)))
  batched = gru_cell.gru_step(params, h, x)
  single = jnp.stack([gru_cell.gru_step(params, h[i], x[i]) for i in range(6)])
  vmapped = jax.vmap(gru_cell.gru_step, in_axes=(None, 0, 0))(params, h, x)
  np.testing.assert_allclose(batched, single, atol=1e-14)
  np.testing.assert_allclose(batched, vmapped, atol=1e-14)


def test_gru_step_accepts_plain_dicts():
  params = _random_params(jax.random.key(6), units=4)
  as_dicts = {name: dict(params[name]) for name in ("gates", "candidate")}
  h, x = jnp.ones((2, 4)), jnp.ones((2, 1))
  np.testing.assert_array_equal(gru_cell.gru_step(as_dicts, h, x), gru_cell.gru_step(params, h, x))


def test_activation_is_configurable():
  params = _random_params(jax.random.key(7), units=4)
  relu = params.replace(activation="relu")
  x = jnp.asarray(np.random.default_rng(7).normal(size=(2, 10, 1)))
  assert not np.allclose(gru_classifier.apply(params, x), gru_classifier.apply(relu, x))
  # One step from h = 0 by hand: h' = (1 - u) * relu(x @ W_cx + b_c).
  h = gru_cell.gru_step(relu, jnp.zeros((2, 4)), x[:, 0], activation="relu")
  u = jax.nn.sigmoid(x[:, 0] @ relu.gates.kernel[:1] + relu.gates.bias)[:, 4:]
  c = jax.nn.relu(x[:, 0] @ relu.candidate.kernel[:1] + relu.candidate.bias)
  np.testing.assert_allclose(h, (1 - u) * c, atol=1e-14)


def test_default_model_has_notebook_parameter_count():
  params = gru_classifier.init(jax.random.key(0))
  assert gru_classifier.count_params(params) == 13_322
  assert params["gates"]["kernel"].shape == (65, 128)
  assert params.gates.kernel is params["gates"]["kernel"]
  assert params["candidate"]["kernel"].shape == (65, 64)
  assert params["output"]["kernel"].shape == (64, 10)
  assert set(params) == {"gates", "candidate", "output"}
  assert params.gates.kernel.dtype == jnp.float32


def test_init_follows_tf1_defaults():
  params = gru_classifier.init(jax.random.key(0), num_units=64)
  np.testing.assert_array_equal(params.gates.bias, 1.0)
  np.testing.assert_array_equal(params.candidate.bias, 0.0)
  np.testing.assert_array_equal(params.output.bias, 0.0)
  limit = np.sqrt(6.0 / (65 + 128))  # Glorot-uniform bound of the gate kernel
  kernel = np.asarray(params.gates.kernel)
  assert np.abs(kernel).max() <= limit and np.abs(kernel).max() > 0.95 * limit
  np.testing.assert_allclose(kernel.std(), limit / np.sqrt(3), rtol=0.05)
  readout = np.asarray(params.output.kernel)
  assert np.abs(readout).max() <= 0.2  # truncated at 2 stddev
  np.testing.assert_allclose(readout.std(), 0.088, rtol=0.1)  # 0.1 * 0.88 after cut


def test_logits_shapes_and_metrics():
  params = gru_classifier.init(jax.random.key(0), num_units=4)
  logits = gru_classifier.apply(params, jnp.zeros((5, 28, 28), jnp.float32))
  chex.assert_shape(logits, (5, 784, 10))
  labels = jnp.argmax(logits[:, -1], -1)
  assert gru_classifier.accuracy(logits, labels) == 1.0
  per_step = gru_classifier.accuracy_per_step(logits, labels)
  chex.assert_shape(per_step, (784,))
  assert per_step[-1] == 1.0
  wrong = (labels + 1) % 10
  assert gru_classifier.accuracy(logits, wrong) == 0.0
  expected_ce = -jax.nn.log_softmax(logits[:, -1])[jnp.arange(5), labels].mean()
  np.testing.assert_allclose(gru_classifier.cross_entropy(logits, labels), expected_ce, rtol=1e-6)


def test_no_recompilation_on_second_call():
  params = gru_classifier.init(jax.random.key(0), num_units=4)
  apply = jax.jit(chex.assert_max_traces(gru_classifier.apply, n=1))
  x = jnp.ones((2, 30, 1), jnp.float32)
  apply(params, x).block_until_ready()
  apply(params, x + 1.0).block_until_ready()
  new_params = jax.tree_util.tree_map(lambda p: p * 2, params)
  apply(new_params, x).block_until_ready()


@pytest.mark.parametrize(
  "x, match",
  [
    (np.zeros((2, 3, 4, 5), np.float32), r"shape \(2, 3, 4, 5\) \(rank 4\)"),
    (np.zeros((2,), np.float32), r"rank 1"),
    (np.zeros((2, 10, 3), np.float32), r"\(2, 10, 3\): expected .*sequences \[batch, T, 2\]"),
    (np.zeros((2, 7), np.float32), r"\(2, 7\): expected .*sequences \[batch, T, 2\]"),
    (np.zeros((2, 10, 2), np.int32), r"dtype int32: expected a floating"),
    (np.zeros((2, 10, 2), np.uint8), r"dtype uint8"),
    (np.zeros((0, 10, 2), np.float32), r"batch is empty"),
    (np.zeros((2, 0, 2), np.float32), r"sequence is empty"),
    ([[0.0, 1.0]], r"expected an array, got list"),
  ],
)
def test_bad_input_raises_clear_value_error(x, match):
  params = gru_classifier.init(jax.random.key(0), num_units=4, in_dim=2)
  with pytest.raises(ValueError, match=match):
    gru_classifier.apply(params, x)
  with pytest.raises(ValueError, match=match):
    jax.jit(gru_classifier.apply)(params, x)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(cell="lstm"), r"unknown cell 'lstm': expected one of \('tf1', 'reset_after'\)"),
    (dict(activation="gelu"), r"unknown activation 'gelu'"),
    (dict(num_units=0), r"num_units=0: expected a positive integer"),
    (dict(dtype=jnp.int32), r"expected a floating dtype"),
  ],
)
def test_bad_init_arguments_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    gru_classifier.init(jax.random.key(0), **kwargs)


def test_unknown_cell_in_gru_step_raises():
  params = gru_classifier.init(jax.random.key(0), num_units=4)
  with pytest.raises(ValueError, match="unknown cell 'gru'"):
    gru_cell.gru_step(params, jnp.zeros((1, 4)), jnp.zeros((1, 1)), cell="gru")


def test_bad_labels_raise():
  logits = jnp.zeros((3, 5, 10))
  with pytest.raises(ValueError, match=r"labels have shape \(4,\): expected \[3\]"):
    gru_classifier.cross_entropy(logits, jnp.zeros((4,), jnp.int32))
  with pytest.raises(ValueError, match="labels have dtype float32"):
    gru_classifier.accuracy(logits, jnp.zeros((3,), jnp.float32))


@pytest.mark.parametrize("key", [0, "0", np.zeros(3, np.float32), None])
def test_init_names_a_seed_given_for_a_key(key):
  with pytest.raises(ValueError, match=r"expected a JAX PRNG key such as jax.random.key\(0\)"):
    gru_classifier.init(key)
  # Both key kinds JAX makes are taken.
  typed, legacy = jax.random.key(0), jax.random.PRNGKey(0)
  assert gru_classifier.init(typed).num_units == gru_classifier.init(legacy).num_units == 64
