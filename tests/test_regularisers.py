"""Regularisers of the trainer, each against its definition: recurrent dropout,
decoupled weight decay (AdamW), SAM, label smoothing, shift-then-permute, and the
weights' EMA."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import skimage.transform
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from pixelrnn_jax import checkpoints
from pixelrnn_jax import gru_classifier
from pixelrnn_jax import preprocessing
from pixelrnn_jax.training import batches as batches_lib
from pixelrnn_jax.training import config as config_lib
from pixelrnn_jax.training import loop
from pixelrnn_jax.training import step as step_lib
from tests import helpers
from tests.helpers import SMALL as SMALL_RUN


def _restore(workdir, pick):
  manager = checkpoints.RunCheckpoints(workdir / "checkpoints", read_only=True)
  try:
    return manager.restore(pick(manager))
  finally:
    manager.close()


def _best_step(workdir):
  return _restore(workdir, lambda manager: manager.best_step())


def _latest_step(workdir):
  return _restore(workdir, lambda manager: manager.latest_step())


def _float64_model(cell="tf1", units=6, seed=0):
  params = gru_classifier.init(jax.random.key(seed), num_units=units, cell=cell)
  return jax.tree.map(lambda a: a.astype(jnp.float64), params)


def _numpy_masked_gru(params, x, mask):
  """NumPy, from the equations: h' = u h + (1 - u) (c * m), TF1 cell, then the readout."""
  p = jax.tree.map(np.asarray, params)
  sigmoid = lambda z: 1.0 / (1.0 + np.exp(-z))
  h = np.zeros((x.shape[0], p.num_units))
  logits = []
  for t in range(x.shape[1]):
    xh = np.concatenate([x[:, t], h], axis=-1)
    r, u = np.split(sigmoid(xh @ p.gates.kernel + p.gates.bias), 2, axis=-1)
    c = np.tanh(np.concatenate([x[:, t], r * h], axis=-1) @ p.candidate.kernel + p.candidate.bias)
    h = u * h + (1.0 - u) * (c * mask)
    logits.append(h @ p.output.kernel + p.output.bias)
  return np.stack(logits, axis=1)


@pytest.mark.parametrize("impl", ["fused", "scan"])
def test_recurrent_dropout_masks_the_candidate_as_in_numpy(impl):
  params = _float64_model()
  x = np.random.default_rng(0).uniform(size=(4, 15, 1))
  key = jax.random.key(3)
  got = gru_classifier.apply(params, x, impl=impl, recurrent_dropout=0.5, key=key)
  mask = np.asarray(gru_classifier.recurrent_dropout_mask(key, 0.5, (4, 6), jnp.float64))
  assert set(np.unique(mask)) == {0.0, 2.0}  # dropped, or kept and scaled by 1 / (1 - p)
  np.testing.assert_allclose(got, _numpy_masked_gru(params, x, mask), rtol=1e-10, atol=1e-12)
  # Not the plain GRU: the mask did something.
  assert not np.allclose(got, gru_classifier.apply(params, x, impl=impl))


def test_recurrent_dropout_at_rate_0_is_the_plain_gru():
  params = _float64_model()
  x = np.random.default_rng(1).uniform(size=(3, 12, 1))
  np.testing.assert_array_equal(
    gru_classifier.apply(params, x, recurrent_dropout=0.0, key=jax.random.key(0)),
    gru_classifier.apply(params, x),
  )


@pytest.mark.parametrize("rate", [0.1, 0.25, 0.5])
def test_recurrent_dropout_mask_has_mean_1_and_drops_a_fraction_p(rate):
  mask = np.asarray(gru_classifier.recurrent_dropout_mask(jax.random.key(7), rate, (2000, 64)))
  # 128,000 Bernoulli draws: the standard error of the dropped fraction is < 0.0015.
  assert abs(np.mean(mask == 0) - rate) < 0.006
  assert abs(mask.mean() - 1.0) < 0.006 / (1 - rate)
  assert set(np.unique(mask)) == {0.0, np.float32(1 / (1 - rate))}


@pytest.mark.parametrize("cell", ["tf1", "reset_after"])
def test_fused_backward_with_dropout_matches_finite_differences(cell):
  params = _float64_model(cell=cell, units=4)
  x = np.random.default_rng(2).uniform(size=(2, 10, 1))
  labels = np.array([1, 7])
  key = jax.random.key(5)

  @jax.jit
  def loss(params):
    logits = gru_classifier.apply(params, x, recurrent_dropout=0.3, key=key)
    return gru_classifier.cross_entropy(logits, labels)

  check_grads(loss, (params,), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_recurrent_dropout_needs_a_key_and_a_rate_below_1():
  params = _float64_model()
  x = np.zeros((1, 3, 1))
  with pytest.raises(ValueError, match="needs key="):
    gru_classifier.apply(params, x, recurrent_dropout=0.2)
  with pytest.raises(ValueError, match=r"recurrent_dropout=1.0"):
    gru_classifier.apply(params, x, recurrent_dropout=1.0, key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"recurrent_dropout=-0.1"):
    config_lib.Config(recurrent_dropout=-0.1)


def test_dropout_masks_differ_per_device_and_step_and_follow_the_seed():
  config = config_lib.Config(order="row", num_units=4, batch_size=4, recurrent_dropout=0.5)
  optimizer = step_lib.make_optimizer(config)
  state = step_lib.init_train_state(config, jax.random.key(0), optimizer)
  x = np.ones((2, 2, 28, 28), np.float32)  # the same images on both devices
  y = np.zeros((2, 2), np.int32)

  def losses(seed, state):
    step = step_lib.make_train_step(optimizer, recurrent_dropout=0.5, seed=seed)
    _, metrics = step(step_lib.replicate(state, 2), x, y)
    return metrics["loss"]

  a, b = losses(0, state), losses(0, state)
  np.testing.assert_array_equal(a, b)  # same seed, same masks
  assert not np.array_equal(a, losses(1, state))  # the seed sets the masks
  # metrics are pmeaned, so compare per-device losses through the step's grads instead:
  key0 = jax.random.fold_in(jax.random.fold_in(step_lib.dropout_key(0), 0), 0)
  key1 = jax.random.fold_in(jax.random.fold_in(step_lib.dropout_key(0), 0), 1)
  assert not np.array_equal(
    gru_classifier.recurrent_dropout_mask(key0, 0.5, (2, 4)),
    gru_classifier.recurrent_dropout_mask(key1, 0.5, (2, 4)),
  )


# ---------------------------------------------------------------- weight decay


def test_weight_decay_is_decoupled_adamw_as_written_in_numpy():
  """AdamW's first step (Loshchilov & Hutter 2019, Alg. 2): m_hat = g, v_hat = g^2,
  so p' = p - lr * (g / (|g| + eps) + wd * p); clipping on, with two gradients of
  different norm so the clip and the decay both show."""
  config = config_lib.Config(learning_rate=1e-2, weight_decay=0.1, clip_norm=1.0)
  optimizer = step_lib.make_optimizer(config)
  params = {"w": jnp.array([1.0, -2.0, 3.0])}
  state = optimizer.init(params)
  grads = {"w": jnp.array([0.3, 0.0, -4.0])}  # norm 4.01 > 1: clipped to norm 1
  updates, _ = optimizer.update(grads, state, params)
  g = np.array([0.3, 0.0, -4.0]) / np.linalg.norm([0.3, 0.0, -4.0])
  expected = -1e-2 * (g / (np.abs(g) + 1e-8) + 0.1 * np.array([1.0, -2.0, 3.0]))
  np.testing.assert_allclose(updates["w"], expected, rtol=1e-5)
  without = step_lib.make_optimizer(config.replace(weight_decay=0.0))
  plain, _ = without.update(grads, without.init(params), params)
  np.testing.assert_allclose(plain["w"], -1e-2 * g / (np.abs(g) + 1e-8), rtol=1e-5)


# ---------------------------------------------------------------- shifts before the order


def _shift(image, dy, dx, background):
  out = np.full_like(image, background)
  h, w = image.shape
  out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = image[
    max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
  ]
  return out


def test_shifts_apply_to_the_image_before_the_psmnist_permutation():
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(16, 28, 28)).astype(np.float32)
  labels = np.arange(16, dtype=np.int32)
  batches = batches_lib.Batches(
    images, labels, batch_size=8, key=jax.random.key(1), order="permuted", max_shift=2
  )
  shifts = batches.shifts(*batches.position)
  x, y = next(batches)
  background = images.min()
  x, y = x.reshape(8, 784), y.reshape(8)
  assert np.abs(shifts).max() > 0
  permutation = preprocessing.permutation()
  for got, label, (dy, dx) in zip(x, y, shifts):
    shifted = _shift(images[label], dy, dx, background)
    np.testing.assert_array_equal(got, shifted.reshape(784)[permutation])
    # Shifting the permuted sequence as if it were an image is something else.
    after = _shift(
      images[label].reshape(784)[permutation].reshape(28, 28), dy, dx, background
    ).reshape(784)
    if (dy, dx) != (0, 0):
      assert not np.array_equal(got, after)


# ---------------------------------------------------------------- rotations and scales


@settings(deadline=None, max_examples=25)
@given(
  st.floats(-180, 180),
  st.floats(-1, 0.5),
  st.integers(0, 2**32 - 1),
)
def test_rotation_equals_scikit_image_at_any_angle(degrees, background, seed):
  image = np.random.default_rng(seed).uniform(size=(28, 28))
  want = skimage.transform.rotate(
    image, degrees, order=1, mode="constant", cval=background, clip=False
  )
  got = batches_lib.rotate_and_scale(image, degrees, 1.0, background)
  np.testing.assert_allclose(got, want, atol=1e-12)


def test_a_quarter_turn_is_numpys_counter_clockwise_rot90():
  image = np.random.default_rng(0).uniform(size=(28, 28)).astype(np.float32)
  np.testing.assert_array_equal(batches_lib.rotate_and_scale(image, 90, 1.0), np.rot90(image))
  np.testing.assert_array_equal(batches_lib.rotate_and_scale(image, 0, 1.0), image)


@settings(deadline=None, max_examples=25)
@given(st.floats(0.6, 1.4), st.floats(-3, 3), st.floats(-3, 3))
def test_scaling_moves_the_centre_of_mass_away_from_the_centre_by_the_factor(scale, dy, dx):
  # A smooth blob centred at (13.5 + dy, 13.5 + dx) on a zero background.
  rows, cols = np.mgrid[0:28, 0:28]
  blob = np.exp(-((rows - 13.5 - dy) ** 2 + (cols - 13.5 - dx) ** 2) / (2 * 2.0**2))
  got = batches_lib.rotate_and_scale(blob, 0.0, scale)
  mass = got.sum()
  centre = ((rows * got).sum() / mass - 13.5, (cols * got).sum() / mass - 13.5)
  np.testing.assert_allclose(centre, (scale * dy, scale * dx), atol=0.04)
  # Its area grows as the square of the factor.
  assert mass / blob.sum() == pytest.approx(scale**2, rel=0.04)


def test_batches_rotate_and_scale_each_image_by_its_recorded_draw_before_the_shift():
  rng = np.random.default_rng(0)
  images = rng.uniform(0.3, 1.0, (16, 28, 28)).astype(np.float32)
  images[:, :4] = -0.4  # background: the smallest value
  labels = np.arange(16, dtype=np.int32)
  kwargs = dict(batch_size=8, key=jax.random.key(1), order="permuted", max_shift=1)
  plain = batches_lib.Batches(images, labels, **kwargs)
  warped = batches_lib.Batches(images, labels, max_rotation=20, max_scale=0.15, **kwargs)
  draws = np.concatenate([warped.warps(0, 0), warped.warps(0, 1)])
  shifts = warped.shifts(0, 0)
  np.testing.assert_array_equal(shifts, plain.shifts(0, 0))  # a stream of their own
  x, y = next(warped)
  x, y = x.reshape(8, 784), y.reshape(8)
  for got, label, (degrees, scale), (dy, dx) in zip(x, y, draws[:8], shifts):
    want = batches_lib.rotate_and_scale(images[label], degrees, scale, images.min())
    want = _shift(want, dy, dx, images.min())
    np.testing.assert_array_equal(got, want.reshape(784)[preprocessing.permutation()])
  assert np.abs(draws[:, 0]).max() <= 20 and np.abs(draws[:, 0]).max() > 10
  assert np.all(np.abs(draws[:, 1] - 1) <= 0.15) and len(set(draws[:, 1])) == 16
  # At zero rotation and scale, the batches are the unwarped ones, bit for bit.
  same = batches_lib.Batches(images, labels, max_rotation=0.0, max_scale=0.0, **kwargs)
  plain = batches_lib.Batches(images, labels, **kwargs)
  for _ in range(3):
    np.testing.assert_array_equal(next(same)[0], next(plain)[0])


# ---------------------------------------------------------------- elastic distortions


@settings(deadline=None, max_examples=25)
@given(st.integers(-3, 3), st.integers(-3, 3), st.floats(-1, 0.5), st.integers(0, 2**32 - 1))
def test_a_constant_whole_pixel_displacement_is_a_shift(dy, dx, background, seed):
  # Output pixel o reads the input at o + d: the digit moves by -d.
  image = np.random.default_rng(seed).uniform(size=(28, 28))
  field = np.stack([np.full((28, 28), float(dy)), np.full((28, 28), float(dx))])
  got = batches_lib.rotate_and_scale(image, 0.0, 1.0, background, field)
  np.testing.assert_allclose(got, _shift(image, -dy, -dx, background), atol=1e-12)


@settings(deadline=None, max_examples=10)
@given(st.floats(-45, 45), st.floats(0.7, 1.3), st.integers(0, 2**32 - 1))
def test_zero_displacements_leave_the_rotation_and_scaling_as_they_were(degrees, scale, seed):
  images = np.random.default_rng(seed).uniform(size=(3, 28, 28)).astype(np.float32)
  zeros = np.zeros((3, 2, 28, 28))
  np.testing.assert_array_equal(
    batches_lib.rotate_and_scale(images, degrees, scale, 0.0, zeros),
    batches_lib.rotate_and_scale(images, degrees, scale, 0.0),
  )
  with pytest.raises(ValueError, match=r"displacements of shape \(2, 28, 28\): expected"):
    batches_lib.rotate_and_scale(images, degrees, scale, 0.0, zeros[0])


@pytest.mark.parametrize("alpha, sigma", [(34.0, 4.0), (8.0, 2.5), (1.0, 1.5)])
def test_the_elastic_field_of_one_noise_impulse_is_a_gaussian_of_sigma_and_mass_alpha(alpha, sigma):
  # Simard et al. (2003): the field is the noise convolved with a normalised
  # Gaussian of standard deviation sigma, times alpha. One unit impulse in
  # the middle of a large grid gives that Gaussian itself.
  noise = np.zeros((2, 61, 61))
  noise[0, 30, 30] = 1.0
  field = batches_lib.elastic_displacements(noise, alpha, sigma)
  assert np.all(field[1] == 0)  # the column field's noise was zero
  rows = np.arange(61) - 30
  assert field[0].sum() == pytest.approx(alpha, rel=1e-3)
  for axis_profile in (field[0].sum(axis=1), field[0].sum(axis=0)):
    assert (rows**2 * axis_profile).sum() / alpha == pytest.approx(sigma**2, rel=0.02)
  # Rows and columns are smoothed alike, and each image's fields on their own.
  assert np.allclose(field[0], field[0].T)
  pair = batches_lib.elastic_displacements(np.stack([noise, 2 * noise]), alpha, sigma)
  np.testing.assert_allclose(pair, np.stack([field, 2 * field]), atol=1e-12)


def test_batches_apply_each_recorded_elastic_field_with_the_warp_then_the_shift():
  rng = np.random.default_rng(0)
  images = rng.uniform(0.3, 1.0, (16, 28, 28)).astype(np.float32)
  images[:, :4] = -0.4  # background: the smallest value
  labels = np.arange(16, dtype=np.int32)
  kwargs = dict(batch_size=8, key=jax.random.key(1), order="permuted", max_shift=1)
  warped = batches_lib.Batches(images, labels, max_rotation=20, max_scale=0.15, **kwargs)
  elastic = batches_lib.Batches(
    images, labels, max_rotation=20, max_scale=0.15, elastic_alpha=20, elastic_sigma=3, **kwargs
  )
  # Streams of their own: adding the distortion leaves the other draws as they were.
  np.testing.assert_array_equal(elastic.warps(0, 0), warped.warps(0, 0))
  np.testing.assert_array_equal(elastic.shifts(0, 0), warped.shifts(0, 0))
  fields = elastic.displacements(0, 0)
  assert fields.shape == (8, 2, 28, 28)
  assert not np.allclose(fields, elastic.displacements(0, 1))
  assert 0.3 < fields.std() < 5  # pixels: about alpha * sqrt(1/3 / (4 pi sigma^2)) = 1.1
  x, y = next(elastic)
  x, y = x.reshape(8, 784), y.reshape(8)
  draws, shifts = elastic.warps(0, 0), elastic.shifts(0, 0)
  for i, (got, label) in enumerate(zip(x, y)):
    (degrees, scale), (dy, dx) = draws[i], shifts[i]
    want = batches_lib.rotate_and_scale(images[label], degrees, scale, images.min(), fields[i])
    want = _shift(want, dy, dx, images.min())
    np.testing.assert_array_equal(got, want.reshape(784)[preprocessing.permutation()])
  assert not np.array_equal(x, next(warped)[0].reshape(8, 784))


# ---------------------------------------------------------------- EMA


def test_ema_decay_follows_tensorflows_warm_up_formula():
  for step, decay in [(0, 0.999), (5, 0.999), (100, 0.99), (10_000, 0.999)]:
    expected = min(decay, (1 + step) / (10 + step))
    np.testing.assert_allclose(step_lib.ema_decay_at(step, decay), expected, rtol=1e-6)
  ema = {"w": jnp.array([1.0, 2.0])}
  params = {"w": jnp.array([3.0, -2.0])}
  d = min(0.9, 51 / 60)
  np.testing.assert_allclose(
    step_lib.update_ema(ema, params, 50, 0.9)["w"],
    d * np.array([1.0, 2.0]) + (1 - d) * np.array([3.0, -2.0]),
    rtol=1e-6,
  )


def test_train_step_keeps_the_ema_of_the_weights_it_takes():
  config = config_lib.Config(
    order="row", num_units=4, batch_size=4, ema_decay=0.8, learning_rate=1e-2
  )
  optimizer = step_lib.make_optimizer(config)
  state = step_lib.init_train_state(config, jax.random.key(0), optimizer)
  step = step_lib.make_train_step(optimizer, ema_decay=0.8)
  rng = np.random.default_rng(0)
  ema = jax.tree.map(np.asarray, state.params)
  replicated = step_lib.replicate(state, 1)
  for t in range(4):
    x = rng.uniform(size=(1, 4, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, (1, 4)).astype(np.int32)
    replicated, _ = step(replicated, x, y)
    now = step_lib.unreplicate(replicated)
    d = min(0.8, (1 + t) / (10 + t))
    ema = jax.tree.map(lambda e, p, d=d: d * e + (1 - d) * np.asarray(p), ema, now.params)
    chex.assert_trees_all_close(now.ema_params, ema, rtol=1e-6, atol=1e-8)
  assert now.model_params is now.ema_params
  assert not np.allclose(now.ema_params.output.kernel, now.params.output.kernel)


def test_a_run_with_an_ema_evaluates_and_loads_the_ema(tmp_path, toy_data):
  config = config_lib.Config(**{**SMALL_RUN, "ema_decay": 0.9})
  summary = loop.train_and_evaluate(config, tmp_path, progress=False)
  state, meta = _best_step(tmp_path)
  model, _, info = helpers.load_model(tmp_path)
  np.testing.assert_array_equal(model.output.kernel, state["ema_params"]["output"]["kernel"])
  assert not np.array_equal(model.output.kernel, state["params"]["output"]["kernel"])
  assert summary["best_valid_accuracy"] == meta["best_valid_accuracy"]


# ---------------------------------------------------------------- SAM


def test_sam_takes_adams_step_with_the_gradient_at_the_ascended_weights_as_in_numpy():
  """Foret et al. 2021, eq. 2-3, on f(w) = sum(a w^2) / 2: g = a w, e = rho g / |g|_2,
  and Adam's first step (m_hat = g_sam, v_hat = g_sam^2) uses g_sam = a (w + e)."""
  rho, lr = 0.3, 1e-2
  optimizer = step_lib.make_optimizer(config_lib.Config(learning_rate=lr, sam_rho=rho))
  a = np.array([1.0, 4.0, 0.5], np.float32)
  w = np.array([1.0, -2.0, 3.0], np.float32)

  def update(params):
    grads = jax.tree.map(lambda p: a * p, params)
    grad_fn = lambda p, _: jax.tree.map(lambda q: a * q, p)
    return optimizer.update(grads, optimizer.init(params), params, grad_fn=grad_fn)

  updates, state = jax.pmap(update, axis_name=step_lib.AXIS)({"w": w[None]})
  g = a * w
  g_sam = a * (w + rho * g / np.linalg.norm(g))
  np.testing.assert_allclose(updates["w"][0], -lr * g_sam / (np.abs(g_sam) + 1e-8), rtol=1e-6)
  np.testing.assert_allclose(optax.tree_utils.tree_get(state, "mu")["w"][0], 0.1 * g_sam, rtol=1e-6)
  assert not np.allclose(g_sam, g)


def test_the_sam_train_step_ascends_along_the_gradient_of_the_whole_batch_over_devices():
  """The train step with SAM on two devices: Adam's first moment after one step is
  (1 - b1) g_sam, where g_sam is the gradient of the whole batch's loss at
  w + rho g / |g|_2 and g the whole batch's gradient at w (computed here in float64)."""
  config = config_lib.Config(order="row", num_units=4, batch_size=8, sam_rho=0.5)
  optimizer = step_lib.make_optimizer(config)
  state = step_lib.init_train_state(config, jax.random.key(0), optimizer)
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(8, 28, 28)).astype(np.float32)
  y = rng.integers(0, 10, 8).astype(np.int32)
  train_step = step_lib.make_train_step(optimizer, impl="scan", sam=True)
  new, metrics = train_step(step_lib.replicate(state, 2), x.reshape(2, 4, 28, 28), y.reshape(2, 4))

  with jax.enable_x64(True):
    w = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), state.params)
    batch_loss = lambda p: gru_classifier.cross_entropy(
      gru_classifier.apply(p, jnp.asarray(x, jnp.float64), impl="scan"), y
    )
    g = jax.grad(batch_loss)(w)
    norm = np.sqrt(sum(float(jnp.sum(leaf**2)) for leaf in jax.tree.leaves(g)))
    g_sam = jax.grad(batch_loss)(jax.tree.map(lambda p, d: p + 0.5 * d / norm, w, g))
    loss = float(batch_loss(w))
  mu = optax.tree_utils.tree_get(step_lib.unreplicate(new).opt_state, "mu")
  chex.assert_trees_all_close(mu, jax.tree.map(lambda d: 0.1 * d, g_sam), rtol=2e-4, atol=1e-7)
  np.testing.assert_allclose(metrics["loss"][0], loss, rtol=1e-5)  # of the weights before
  np.testing.assert_allclose(metrics["grad_norm"][0], norm, rtol=1e-4)
  assert np.linalg.norm(np.asarray(g_sam.output.kernel - g.output.kernel)) > 1e-3


def test_sam_at_rho_0_is_the_plain_optimizer():
  plain = step_lib.make_optimizer(config_lib.Config())
  params = {"w": jnp.array([1.0, -2.0])}
  chex.assert_trees_all_equal_structs(
    step_lib.make_optimizer(config_lib.Config(sam_rho=0.0)).init(params), plain.init(params)
  )
  with_sam = step_lib.make_optimizer(config_lib.Config(sam_rho=0.1)).init(params)
  assert jax.tree.structure(with_sam) != jax.tree.structure(plain.init(params))


# ---------------------------------------------------------------- label smoothing


def _numpy_smoothed_cross_entropy(logits, labels, a):
  """Szegedy et al. 2016, section 7: q' = (1 - a) one_hot + a / K, loss = -sum q' log p."""
  z = logits - logits.max(axis=-1, keepdims=True)
  log_p = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
  classes = logits.shape[-1]
  target = np.full(logits.shape, a / classes)
  np.put_along_axis(target, labels[..., None], 1 - a + a / classes, axis=-1)
  return -(target * log_p).sum(axis=-1)


@settings(max_examples=25, deadline=None)
@given(
  a=st.floats(0.0, 0.95),
  seed=st.integers(0, 2**16),
  scale=st.floats(0.1, 30.0),
)
def test_label_smoothing_is_the_cross_entropy_with_the_smoothed_target(a, seed, scale):
  rng = np.random.default_rng(seed)
  logits = scale * rng.standard_normal((5, 3, 10))
  labels = rng.integers(0, 10, size=5)
  want = _numpy_smoothed_cross_entropy(logits[:, -1], labels, a).mean()
  got = gru_classifier.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), label_smoothing=a)
  np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-5)
  per_step = gru_classifier.cross_entropy_per_step(
    jnp.asarray(logits), jnp.asarray(labels), "uniform", label_smoothing=a
  )
  want_steps = _numpy_smoothed_cross_entropy(logits, np.repeat(labels[:, None], 3, 1), a)
  np.testing.assert_allclose(float(per_step), want_steps.mean(), rtol=1e-5, atol=1e-5)


def test_label_smoothing_at_0_is_the_plain_loss_and_its_minimum_is_the_smoothed_target():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.standard_normal((4, 2, 10)), jnp.float32)
  labels = jnp.asarray([0, 3, 9, 5])
  plain = gru_classifier.cross_entropy(logits, labels)
  assert float(gru_classifier.cross_entropy(logits, labels, label_smoothing=0.0)) == float(plain)
  # The smoothed loss is smallest where softmax equals the target: its gradient
  # with respect to the logits is softmax - target, zero there.
  a = 0.1
  target = jnp.full((4, 10), a / 10).at[jnp.arange(4), labels].add(1 - a)
  at_target = jnp.broadcast_to(jnp.log(target)[:, None], (4, 2, 10))
  grad = jax.grad(lambda z: gru_classifier.cross_entropy(z, labels, label_smoothing=a))(at_target)
  np.testing.assert_allclose(grad, 0.0, atol=1e-7)
  # An out-of-range label still makes the loss NaN, as without smoothing.
  bad = gru_classifier._losses(logits[:, -1], jnp.asarray([0, 3, 10, 5]), a)
  assert np.isnan(bad[2]) and np.isfinite(np.delete(np.asarray(bad), 2)).all()


def test_the_train_step_reports_the_smoothed_loss_it_descends():
  config = config_lib.Config(**{**SMALL_RUN, "devices": 1, "label_smoothing": 0.2})
  optimizer = step_lib.make_optimizer(config)
  state = step_lib.init_train_state(config, jax.random.key(0), optimizer)
  rng = np.random.default_rng(1)
  x = rng.random((1, 4, 28, 28), dtype=np.float32)
  labels = rng.integers(0, 10, size=(1, 4)).astype(np.int32)
  step = step_lib.make_train_step(optimizer, label_smoothing=0.2)
  _, metrics = step(step_lib.replicate(state, 1), x, labels)
  logits = gru_classifier.apply(state.params, x[0])
  want = _numpy_smoothed_cross_entropy(np.asarray(logits[:, -1], np.float64), labels[0], 0.2)
  np.testing.assert_allclose(float(metrics["loss"][0]), want.mean(), rtol=1e-4)


# ---------------------------------------------------------------- in the recipes and runs


def test_every_regulariser_is_off_in_the_notebook_recipe():
  notebook = config_lib.RECIPES["notebook"]
  assert (
    notebook.recurrent_dropout,
    notebook.weight_decay,
    notebook.max_shift,
    notebook.max_rotation,
    notebook.max_scale,
    notebook.elastic_alpha,
    notebook.label_smoothing,
    notebook.ema_decay,
    notebook.sam_rho,
  ) == (0.0, 0.0, 0, 0.0, 0.0, 0.0, 0.0, None, 0.0)


def test_resume_is_bit_exact_with_every_regulariser_on(tmp_path, toy_data):
  config = config_lib.Config(
    **{
      **SMALL_RUN,
      "steps": 10,
      "checkpoint_every": 4,
      "devices": 2,
      "recurrent_dropout": 0.3,
      "weight_decay": 0.05,
      "max_shift": 2,
      "max_rotation": 10.0,
      "max_scale": 0.1,
      "elastic_alpha": 8.0,
      "label_smoothing": 0.1,
      "ema_decay": 0.9,
      "sam_rho": 0.05,
    }
  )
  straight = loop.train_and_evaluate(config, tmp_path / "straight", progress=False)
  loop.train_and_evaluate(config.replace(steps=4), tmp_path / "resumed", progress=False)
  resumed = loop.train_and_evaluate(config, tmp_path / "resumed", progress=False)
  a, _ = _latest_step(tmp_path / "straight")
  b, _ = _latest_step(tmp_path / "resumed")
  assert "ema_params" in a
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
  assert straight["valid"] == resumed["valid"]
