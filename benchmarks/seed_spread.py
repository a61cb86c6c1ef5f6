r"""Seed spread of a recipe: the first N steps of its exact schedule, for several seeds.

Each seed trains with the recipe unchanged (the same schedule as the full
run) and is stopped with SIGINT once its valid evaluation at step N is
logged; the run directories stay resumable. Prints one row per seed and the
spread (max - min) of the valid accuracy at step N.

    python benchmarks/seed_spread.py --recipe tuned-permuted --seeds 1 2 --at-step 2000 \
        --devices 2 --runs runs/seeds

A seed whose run directory already holds the evaluation at step N is not
trained again, so the seed-0 row can come from the full run (``--reuse
SEED=RUN_DIR``).
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from pixelrnn_jax import cli
from pixelrnn_jax.training import config as config_lib


def valid_at(run_dir: Path, step: int) -> float | None:
  metrics = run_dir / "metrics.jsonl"
  if not metrics.exists():
    return None
  for line in metrics.read_text().splitlines():
    record = json.loads(line)
    if record.get("split") == "valid" and record.get("step") == step:
      return record["accuracy"]
  return None


def run_seed(args, seed: int, run_dir: Path) -> float:
  accuracy = valid_at(run_dir, args.at_step)
  if accuracy is not None:
    return accuracy
  command = [
    sys.executable,
    "-m",
    "pixelrnn_jax",
    "train",
    "--recipe",
    args.recipe,
    "--seed",
    str(seed),
    "--workdir",
    str(run_dir),
    "--devices",
    str(args.devices),
    "--no-progress",
    "--eval-every",
    str(args.eval_every),
  ]
  if args.data_dir:
    command += ["--data-dir", args.data_dir]
  start = time.monotonic()
  with open(run_dir.with_suffix(".log"), "a") as log:
    process = subprocess.Popen(command, stdout=log, stderr=log)
    while (accuracy := valid_at(run_dir, args.at_step)) is None:
      if process.poll() is not None:
        raise SystemExit(
          f"seed {seed}: the run ended (code {process.returncode}) before"
          f" step {args.at_step}; see {run_dir.with_suffix('.log')}"
        )
      time.sleep(2)
    process.send_signal(signal.SIGINT)  # saves a checkpoint, then exits 130
    process.wait()
  print(f"seed {seed}: {time.monotonic() - start:.0f} s", file=sys.stderr)
  return accuracy


def _reuse(text: str) -> tuple[str, str]:
  """``SEED=RUN_DIR`` -> (seed, run directory), for --reuse."""
  seed, _, run_dir = text.partition("=")
  if not (seed.isdigit() and run_dir):
    raise argparse.ArgumentTypeError(f"expected SEED=RUN_DIR (e.g. 0=runs/tuned), got {text!r}")
  if not Path(run_dir).is_dir():
    raise argparse.ArgumentTypeError(f"{run_dir}: no such run directory")
  return str(int(seed)), run_dir


def main(argv: list[str] | None = None) -> int:
  parser = cli.OneLineParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--recipe", required=True, choices=sorted(config_lib.RECIPES))
  parser.add_argument("--seeds", type=cli.number(0), nargs="+", required=True)
  parser.add_argument(
    "--at-step",
    type=cli.number(1),
    required=True,
    help="compare the valid accuracy at this step (a multiple of --eval-every)",
  )
  parser.add_argument("--eval-every", type=cli.number(1), default=500)
  parser.add_argument("--runs", default="runs/seeds", help="parent of the run directories")
  parser.add_argument(
    "--reuse",
    action="append",
    default=[],
    metavar="SEED=RUN_DIR",
    type=_reuse,
    help="take this seed's accuracy from an existing run directory",
  )
  parser.add_argument("--data-dir", default=None)
  parser.add_argument("--devices", type=cli.number(1), default=1)
  args = parser.parse_args(argv)
  if args.at_step % args.eval_every:
    parser.error(f"--at-step {args.at_step} is not a multiple of --eval-every {args.eval_every}")
  if len(set(args.seeds)) < len(args.seeds):
    parser.error(f"--seeds {' '.join(map(str, args.seeds))}: a seed is repeated")
  reused = dict(args.reuse)
  rows = {}
  for seed in sorted(set(args.seeds) | {int(s) for s in reused}):
    run_dir = Path(reused.get(str(seed), Path(args.runs) / f"{args.recipe}-seed{seed}"))
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    rows[seed] = run_seed(args, seed, run_dir)
  print(f"recipe {args.recipe}, valid accuracy at step {args.at_step}:")
  for seed, accuracy in rows.items():
    print(f"  seed {seed}: {accuracy:.4f}")
  values = list(rows.values())
  print(f"  mean {statistics.mean(values):.4f}, spread (max - min) {max(values) - min(values):.4f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
