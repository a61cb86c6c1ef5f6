"""``python -m pixelrnn_jax`` is the ``pixelrnn-jax`` command."""

from pixelrnn_jax.cli import run

run()
