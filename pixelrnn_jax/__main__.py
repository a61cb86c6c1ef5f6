"""``python -m pixelrnn_jax`` is the ``pixelrnn-jax`` command."""

import sys

from pixelrnn_jax.cli import main

sys.exit(main())
