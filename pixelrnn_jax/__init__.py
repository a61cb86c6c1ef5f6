"""pixelrnn_jax: a GRU that classifies MNIST one pixel at a time, in JAX.

    from pixelrnn_jax import gru_classifier
    model = gru_classifier.load_pretrained("pixel")

The documented API is ``__all__``: the model (``gru_classifier``, its cell
``gru_cell`` and one step ``gru_step``), the data (``data``, ``load_mnist``,
``preprocessing``), inference (``inference``: ``evaluate``, ``predict``; ``tta``: answers over
turned copies of each digit), a
user's digit images (``images``), saved models (``model_io``), the trainer
(``training``) and the pictures (``plots``). Submodules are imported when first
used, so ``pixelrnn-jax --help`` and the command's Ctrl-C handling do not wait
for JAX to load.
"""

import importlib

__version__ = "0.4.0"

_MODULES = (
  "gru_cell",
  "gru_classifier",
  "fused_scan",
  "preprocessing",
  "inference",
  "data",
  "idx",
  "images",
  "checkpoints",
  "model_io",
  "plots",
  "diagnostics",
  "tta",
  "training",
)
_NAMES = {  # name -> (module, attribute)
  "gru_step": ("gru_cell", "gru_step"),
  "load_mnist": ("data", "load_mnist"),
  "evaluate": ("inference", "evaluate"),
  "predict": ("inference", "predict"),
  "load": ("gru_classifier", "load"),
  "load_pretrained": ("gru_classifier", "load_pretrained"),
}
__all__ = sorted([*_MODULES, *_NAMES])


def __getattr__(name):
  if name in _NAMES:
    module, attribute = _NAMES[name]
    return getattr(importlib.import_module(f"pixelrnn_jax.{module}"), attribute)
  if name in _MODULES:
    return importlib.import_module(f"pixelrnn_jax.{name}")
  raise AttributeError(f"module 'pixelrnn_jax' has no attribute {name!r}")


def __dir__():
  return __all__
