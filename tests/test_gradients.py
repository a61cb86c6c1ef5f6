"""Autodiff gradients of the scan against finite differences in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from pixelrnn_jax import gru_cell
from pixelrnn_jax import gru_classifier


def _setup(cell, *, units, steps, seed=0, impl=gru_classifier.DEFAULT_IMPL):
  params = gru_classifier.init(jax.random.key(seed), num_units=units, cell=cell, dtype=jnp.float64)
  # Nudge the zero-initialised biases so their gradients are generic.
  params = jax.tree_util.tree_map(
    lambda p: p + 0.1 * jax.random.normal(jax.random.key(seed + 1), p.shape, p.dtype),
    params,
  )
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.uniform(size=(3, steps, 1)))
  labels = jnp.asarray(rng.integers(0, 10, size=3))
  weights = jnp.asarray(rng.normal(size=(3, steps, 10)))

  @jax.jit
  def loss(params, x):
    logits = gru_classifier.apply(params, x, impl=impl)
    # Last-step loss (the notebook's) plus a term on every step's logits.
    return gru_classifier.cross_entropy(logits, labels) + 1e-2 * jnp.mean(weights * logits)

  return loss, params, x


@pytest.mark.parametrize("impl", gru_classifier.IMPLS)
@pytest.mark.parametrize("cell", gru_cell.CELLS)
@pytest.mark.parametrize("steps, units", [(784, 3), (12, 6)])
def test_check_grads_every_leaf_and_input(cell, steps, units, impl):
  loss, params, x = _setup(cell, units=units, steps=steps, impl=impl)
  check_grads(loss, (params, x), order=1, modes=("rev",), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("cell", gru_cell.CELLS)
def test_every_leaf_gets_a_nonzero_gradient(cell):
  loss, params, x = _setup(cell, units=4, steps=20)
  grads = jax.grad(loss, argnums=(0, 1))(params, x)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(g)), path
    assert np.abs(g).max() > 0, path


def test_check_grads_per_leaf_directions():
  """check_grads probes one random direction of all leaves together; also probe each leaf alone."""
  loss, params, x = _setup("tf1", units=3, steps=50)
  leaves, treedef = jax.tree_util.tree_flatten(params)
  grads = jax.tree_util.tree_leaves(jax.grad(loss)(params, x))
  eps = 1e-6
  for i, (leaf, g) in enumerate(zip(leaves, grads)):
    direction = jax.random.normal(jax.random.key(i), leaf.shape, leaf.dtype)

    def shifted(sign):
      moved = list(leaves)
      moved[i] = leaf + sign * eps * direction
      return loss(jax.tree_util.tree_unflatten(treedef, moved), x)

    numeric = (shifted(1) - shifted(-1)) / (2 * eps)
    np.testing.assert_allclose(jnp.vdot(g, direction), numeric, rtol=1e-6, atol=1e-9)
