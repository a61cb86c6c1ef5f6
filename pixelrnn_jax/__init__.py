"""pixelrnn_jax: a GRU that classifies MNIST one pixel at a time, in JAX.

    from pixelrnn_jax import gru_classifier
    model = gru_classifier.load_pretrained("pixel")

Submodules are imported when first used, so ``pixelrnn-jax --help`` and the
command's Ctrl-C handling do not wait for JAX to load.
"""

import importlib

__version__ = "0.3.0"
__all__ = ["gru_cell", "gru_classifier", "gru_step"]


def __getattr__(name):
  if name == "gru_step":
    return importlib.import_module("pixelrnn_jax.gru_cell").gru_step
  if name in ("gru_cell", "gru_classifier"):
    return importlib.import_module(f"pixelrnn_jax.{name}")
  raise AttributeError(f"module 'pixelrnn_jax' has no attribute {name!r}")
