"""Trains the notebook's GRU on sequential MNIST.

Intentionally flags only: the logic lives in the library
(``pixelrnn_jax.train.train_and_evaluate``), where it is tested.

    python examples/train_mnist.py --workdir runs/notebook
    python examples/train_mnist.py --workdir runs/row --order row --steps 300 --batch-size 128 --lr 3e-3
"""

import argparse
import sys

from pixelrnn_jax import cli


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
  cli.add_train_flags(parser)  # exactly the flags of `pixelrnn-jax train`
  args = parser.parse_args()
  cli.setup_logging(args.verbose)
  try:
    return cli.run_training(args)
  except (ValueError, FileNotFoundError) as error:  # bad flag values, data or files
    print(f"{parser.prog}: error: {error}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:  # before training starts (training itself saves and stops)
    print(f"{parser.prog}: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
