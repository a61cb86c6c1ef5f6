"""Draws what training sees: valid digits as they are, then as each augmentation moves them.

    python examples/augmentations.py --data-dir ../shared/mnist --out augmentations.png \
        --max-rotation 10 --max-scale 0.1 --elastic-alpha 8 16 34

Row 1 is the first ``--count`` valid digits as they are; then one row per
``--elastic-alpha`` value, each the batch that ``training.batches.Batches``
makes of those digits with that alpha and the other flags (the same code and
the same kind of draws a run with these flags and ``--seed`` makes, put back
in the digits' order). Look at it before a long run: a flag that
turns a 6 into a 0 teaches the model the wrong label.
"""

from __future__ import annotations

import jax
import numpy as np

from pixelrnn_jax import cli
from pixelrnn_jax import data
from pixelrnn_jax import plots
from pixelrnn_jax.training import batches as batches_lib
from pixelrnn_jax.training import config as config_lib


def rows(digits, config, alphas) -> list:
  """<float>[count, 28, 28] per row: the digits, then each alpha's batch of them.

  ``config`` is a ``training.config.Config``: its augmentations and ``seed``
  make each row as a run of it would (its batch size is the digits' count).
  """
  labels = np.arange(len(digits), dtype=np.int32)
  out = [("as they are", digits, labels)]
  for alpha in alphas:
    row_config = config.replace(elastic_alpha=alpha, batch_size=len(digits), devices=1)
    row_config.validate()  # a flag out of range: the message names it
    batches = batches_lib.Batches.from_config(
      digits, labels, row_config.replace(order="row"), key=jax.random.key(row_config.seed)
    )
    x, y = next(batches)
    back = np.argsort(y.reshape(-1))  # the batch is shuffled: back to the digits' order
    name = f"elastic alpha {alpha:g}" if alpha else "no elastic"
    out.append((name, x.reshape(-1, 28, 28)[back], y.reshape(-1)[back]))
  return out


def main(argv: list[str] | None = None) -> list:
  parser = cli.OneLineParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data-dir", default=None)
  parser.add_argument("--out", required=True, help="the PNG to write")
  parser.add_argument(
    "--count",
    type=cli.number(4, 40),
    default=12,
    help="valid digits 0..count-1 (one row of the picture)",
  )
  parser.add_argument("--seed", type=cli.number(0), default=0)
  parser.add_argument("--max-shift", type=cli.number(0), default=0)
  parser.add_argument("--max-rotation", type=cli.number(kind=float), default=0.0)
  parser.add_argument("--max-scale", type=cli.number(kind=float), default=0.0)
  parser.add_argument(
    "--elastic-alpha", type=cli.number(kind=float), nargs="+", default=[0.0], metavar="A"
  )
  parser.add_argument("--elastic-sigma", type=cli.number(kind=float), default=4.0)
  args = parser.parse_args(argv)
  parser.check_output_file("--out", args.out, ".png")
  try:
    digits, _ = data.load_mnist("valid", data_dir=args.data_dir)
    config = config_lib.Config(
      seed=args.seed,
      max_shift=args.max_shift,
      max_rotation=args.max_rotation,
      max_scale=args.max_scale,
      elastic_sigma=args.elastic_sigma,
    )
    drawn = rows(digits[: args.count], config, args.elastic_alpha)
  except (OSError, ValueError) as error:  # no data, or a flag out of range (Config)
    parser.error(cli.flags_named(str(error)))
  plt = plots._pyplot()  # noqa: SLF001 (the package's headless matplotlib)
  fig, axes = plt.subplots(
    len(drawn), args.count, figsize=(args.count * 0.9, len(drawn) * 1.05), squeeze=False
  )
  for (name, images, _), row in zip(drawn, axes):
    for image, ax in zip(images, row):
      ax.imshow(image, cmap="gray", vmin=0, vmax=1)
      ax.set_xticks([])
      ax.set_yticks([])
    row[0].set_ylabel(name, fontsize=7)
  fig.suptitle(
    f"shift {args.max_shift}, rotation {args.max_rotation:g} deg, scale {args.max_scale:g},"
    f" elastic sigma {args.elastic_sigma:g}",
    fontsize=9,
  )
  fig.tight_layout()
  fig.savefig(args.out, dpi=100)
  plt.close(fig)
  print(f"wrote {args.out}")
  return drawn


if __name__ == "__main__":
  main()
