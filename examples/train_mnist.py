"""Trains the notebook's GRU on sequential MNIST.

Intentionally flags only: this is ``pixelrnn-jax train`` (the same flags, the
same one-line errors and exit codes); the logic lives in the library
(``pixelrnn_jax.training.loop.train_and_evaluate``), where it is tested.

    python examples/train_mnist.py --workdir runs/notebook
    python examples/train_mnist.py --workdir runs/row --order row --steps 300 --batch-size 128 --lr 3e-3
"""

import sys

from pixelrnn_jax import cli

if __name__ == "__main__":
  cli.run(["train", *sys.argv[1:]])
