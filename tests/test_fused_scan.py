"""The fast custom_vjp core against autodiff through the plain scan (the reference)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from pixelrnn_jax import gru_cell
from pixelrnn_jax import gru_classifier


def _setup(cell, *, units=5, in_dim=1, steps=40, activation="tanh", seed=0):
  params = gru_classifier.init(
    jax.random.key(seed),
    num_units=units,
    in_dim=in_dim,
    cell=cell,
    activation=activation,
    dtype=jnp.float64,
  )
  params = jax.tree.map(
    lambda p: p + 0.3 * jax.random.normal(jax.random.key(seed + 1), p.shape, p.dtype), params
  )
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(3, steps, in_dim)))
  weights = jnp.asarray(rng.normal(size=(3, steps, 10)))
  return params, x, weights


@pytest.mark.parametrize("cell", gru_cell.CELLS)
@pytest.mark.parametrize("in_dim", [1, 3])
@pytest.mark.parametrize("activation", sorted(gru_cell.ACTIVATIONS))
def test_fused_forward_and_gradients_match_autodiff_of_the_scan(cell, in_dim, activation):
  params, x, weights = _setup(cell, in_dim=in_dim, activation=activation)

  def loss(params, x, impl):
    return jnp.sum(weights * gru_classifier.apply(params, x, impl=impl))

  np.testing.assert_allclose(
    gru_classifier.apply(params, x, impl="fused"),
    gru_classifier.apply(params, x, impl="scan"),
    atol=1e-12,
  )
  grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
  fused, reference = grad(params, x, "fused"), grad(params, x, "scan")
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(fused), jax.tree.leaves(reference)):
    scale = np.abs(b).max()
    assert scale > 0, path
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * scale, err_msg=str(path))


@pytest.mark.parametrize("cell", gru_cell.CELLS)
def test_fused_check_grads_last_step_loss_full_length(cell):
  params, x, _ = _setup(cell, units=3, steps=784)
  labels = jnp.array([1, 5, 9])
  loss = jax.jit(
    lambda p, x: gru_classifier.cross_entropy(gru_classifier.apply(p, x, impl="fused"), labels)
  )
  check_grads(loss, (params, x), order=1, modes=("rev",), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_unroll_does_not_change_results():
  params, x, weights = _setup("tf1")
  loss = lambda p, unroll: jnp.sum(weights * gru_classifier.apply(p, x, unroll=unroll))
  a, b = jax.grad(loss)(params, 1), jax.grad(loss)(params, 4)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(u, v, rtol=1e-12, atol=1e-14)


def test_unknown_impl_raises():
  params, x, _ = _setup("tf1")
  with pytest.raises(ValueError, match=r"unknown impl 'cuda': expected one of \('fused', 'scan'\)"):
    gru_classifier.apply(params, x, impl="cuda")
