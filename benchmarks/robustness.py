"""Valid digits turned and resized: accuracy of each model on the same transformed digits.

    python benchmarks/robustness.py --data-dir ../shared/mnist --count 5000 \
        --checkpoint pretrained:pixel --checkpoint runs/ft-affine

Each valid digit 0..count-1 is rotated by each ``--degrees`` (counter-clockwise)
and, separately, scaled by each ``--scales`` about the image centre, bilinear
with a black background (``preprocessing.rotate_and_scale``, the transform
of ``--max-rotation`` / ``--max-scale``), and scored by every ``--checkpoint``
(anything ``--checkpoint`` takes). One line per transform, one column per
model; the first line is the digits as they are. Users' digits are rarely as
upright and as large as MNIST's; this measures how far from that a model holds.
"""

from pixelrnn_jax import cli
from pixelrnn_jax import commands
from pixelrnn_jax import data
from pixelrnn_jax import gru_classifier
from pixelrnn_jax import inference
from pixelrnn_jax.preprocessing import rotate_and_scale


def transforms(degrees: list[float], scales: list[float]) -> list[tuple[str, float, float]]:
  """(name, degrees, scale): the identity, each rotation, then each scaling."""
  return [
    ("as they are", 0.0, 1.0),
    *((f"rotated {d:+g} deg", d, 1.0) for d in degrees),
    *((f"scaled x{s:g}", 0.0, s) for s in scales),
  ]


def main(argv: list[str] | None = None) -> dict:
  parser = cli.OneLineParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data-dir", default=None)
  parser.add_argument("--count", type=cli.number(1), default=5000)
  parser.add_argument(
    "--degrees",
    type=cli.number(-180, 180, kind=float),
    nargs="+",
    default=[-20.0, -10.0, 10.0, 20.0],
    metavar="DEG",
  )
  parser.add_argument(
    "--scales",
    type=cli.number(0.1, 10, kind=float),
    nargs="+",
    default=[0.8, 0.9, 1.1],
    metavar="S",
  )
  parser.add_argument(
    "--checkpoint",
    action="append",
    default=None,
    help="a model (repeat the flag); default pretrained:pixel",
  )
  parser.add_argument("--devices", type=cli.number(1), default=1)
  args = parser.parse_args(argv)
  commands.use_cpu_devices(args.devices)  # host CPU devices, before JAX starts
  checkpoints = args.checkpoint or ["pretrained:pixel"]
  with parser.refusing_bad_inputs():
    digits, labels = data.load_mnist("valid", data_dir=args.data_dir)
    models = {name: gru_classifier.load(name) for name in checkpoints}
  digits, labels = digits[: args.count], labels[: args.count]
  width = max(len(name) for name in checkpoints)
  print(f"{len(digits)} valid digits; columns: valid accuracy of each model", flush=True)
  print(f"{'transform':<18}" + "".join(f"  {name:>{width}}" for name in checkpoints))
  table = {}
  for name, degrees, scale in transforms(args.degrees, args.scales):
    moved = rotate_and_scale(digits, degrees, scale, 0.0)
    row = {
      source: inference.evaluate(model, moved, labels, devices=args.devices)["accuracy"]
      for source, model in models.items()
    }
    table[name] = row
    print(f"{name:<18}" + "".join(f"  {row[s]:>{width}.2%}" for s in checkpoints), flush=True)
  return table


if __name__ == "__main__":
  main()
