"""Test-wide JAX settings: float64 available, two fake CPU devices for pmap."""

import os

import jax

# Must run before JAX initialises its backend (i.e. before any array exists).
jax.config.update("jax_num_cpu_devices", 2)
jax.config.update("jax_enable_x64", True)

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

from tests.helpers import mnist_dir_from  # noqa: E402

# No per-example deadline: the examples run JAX and build parsers, whose time is
# the machine's load, not the code's (one took 258 ms beside a training run and
# failed the default 200 ms). A test that sets its own settings keeps them.
settings.register_profile("pixelrnn_jax", deadline=None)
settings.load_profile("pixelrnn_jax")

MNIST_DIR = mnist_dir_from(os.environ)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
  """Drops JAX's compiled programs after each test module.

  Without it the whole suite, in one process, twice died inside XLA's compiler
  (a segfault, then an abort) in test_train.py, which passes on its own. Each
  compiled program keeps memory mappings of its machine code, and the
  process's count reached 17,900 within test_train.py alone (limit:
  vm.max_map_count, 65,530): the likely cause, not a proven one."""
  yield
  jax.clear_caches()


@pytest.fixture
def mnist_dir():
  """The real MNIST IDX files (../shared/mnist); skips the test when absent."""
  if not os.path.exists(os.path.join(MNIST_DIR, "train-labels-idx1-ubyte.gz")):
    pytest.skip(
      f"real MNIST files not found in {MNIST_DIR}: set $PIXELRNN_JAX_TEST_MNIST (or"
      " $PIXELRNN_JAX_MNIST_DIR) to a directory of the IDX files"
    )
  return os.path.abspath(MNIST_DIR)


@pytest.fixture
def toy_data(monkeypatch):
  """The trainer reads 160 toy train and 40 toy valid digits instead of MNIST."""
  from pixelrnn_jax.training import loop
  from tests.helpers import synthetic_digits

  splits = {"train": synthetic_digits(160, 0), "valid": synthetic_digits(40, 1)}
  monkeypatch.setattr(loop, "_load_split", lambda config, split: splits[split])
  return splits
