"""Trains the notebook's GRU on sequential MNIST.

Intentionally flags only: the logic lives in the library
(``pixelrnn_jax.train.train_and_evaluate``), where it is tested.

    python examples/train_mnist.py --workdir runs/notebook --data-dir ../shared/mnist
    python examples/train_mnist.py --workdir runs/row --order row --steps 300 --batch-size 128 --lr 3e-3
"""

import argparse
import logging

from pixelrnn_jax import cli


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="run directory (resumed if it exists)")
  cli.add_config_flags(parser)
  args = parser.parse_args()
  config = cli.config_from_flags(args)
  logging.basicConfig(level=logging.INFO)
  from pixelrnn_jax import train  # after the flags: --devices must be set before JAX starts
  cli._use_cpu_devices(config.devices)  # pylint: disable=protected-access
  train.train_and_evaluate(config, args.workdir)


if __name__ == "__main__":
  main()
