"""pixelrnn_jax: a GRU that classifies MNIST one pixel at a time, in JAX."""

from pixelrnn_jax import gru_cell
from pixelrnn_jax import gru_classifier
from pixelrnn_jax.gru_cell import gru_step

__all__ = ["gru_cell", "gru_classifier", "gru_step"]
__version__ = "0.1.0"
