"""One run laid out as 1 process x D devices against N processes x D/N devices, same machine.

Both layouts run the same ``pixelrnn-jax train`` command (same data, seed,
model and global batch) back to back, in rounds, and the table reports each
layout's training step time and samples/s (from ``metrics.jsonl``, which
leaves out the first, compiling step and the evaluations) and its ratio to
the one-process layout, plus how far apart the final parameters are.

    python benchmarks/processes.py --data-dir ../shared/mnist
    python benchmarks/processes.py --data-dir ../shared/mnist --order row --steps 200

On one machine the processes share its cores and talk over loopback TCP
(gloo), so this measures the cost of the multi-process machinery, not the
gain of more machines.
"""

from __future__ import annotations

import json
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pixelrnn_jax import cli
from pixelrnn_jax import data
from pixelrnn_jax.training import config as config_lib


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


def run_layout(args, processes: int, devices: int, workdir: Path) -> dict:
  """Trains ``args.steps`` steps as ``processes`` x ``devices``; its speed and final params."""
  command = [
    sys.executable,
    "-m",
    "pixelrnn_jax",
    "train",
    "--workdir",
    str(workdir),
    *(["--data-dir", args.data_dir] if args.data_dir else []),  # else the environment's
    "--order",
    args.order,
    "--recipe",
    args.recipe,
    "--steps",
    str(args.steps),
    "--batch-size",
    str(args.batch_size),
    "--devices",
    str(devices),
    "--log-every",
    str(args.log_every),
    "--eval-every",
    "100000000",
    "--checkpoint-every",
    "100000000",
    "--eval-batch-size",
    "1000",
    "--no-progress",
  ]
  port = _free_port()
  extra = [
    []
    if processes == 1
    else [
      "--num-processes",
      str(processes),
      "--process-id",
      str(rank),
      "--coordinator-address",
      f"localhost:{port}",
    ]
    for rank in range(processes)
  ]
  start = time.perf_counter()
  procs = [
    subprocess.Popen(command + flags, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for flags in extra
  ]
  errors = [proc.communicate(timeout=args.timeout)[1] for proc in procs]
  wall = time.perf_counter() - start
  if any(proc.returncode for proc in procs):
    raise SystemExit(f"{processes} x {devices} failed:\n" + "\n".join(e[-2000:] for e in errors))
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  windows = [r for r in records if "steps_per_s" in r]
  ends = [r["step"] for r in windows]
  lengths = [end - start for start, end in zip([1, *ends[:-1]], ends)]  # step 1 compiles
  steps = sum(lengths)
  seconds = sum(n / r["steps_per_s"] for n, r in zip(lengths, windows))
  from pixelrnn_jax import checkpoints

  manager = checkpoints.RunCheckpoints(workdir / "checkpoints", read_only=True)
  state, _ = manager.restore(manager.latest_step())
  manager.close()
  return {
    "step_ms": 1000 * seconds / steps,
    "samples_per_s": steps * args.batch_size / seconds,
    "wall_s": wall,
    "params": state["params"],
  }


def main(argv=None) -> None:
  parser = cli.OneLineParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--data-dir", default=None, help="MNIST IDX files (default: $PIXELRNN_JAX_MNIST_DIR)"
  )
  parser.add_argument("--recipe", default="notebook", choices=sorted(config_lib.RECIPES))
  parser.add_argument("--order", default="pixel", choices=("pixel", "permuted", "row"))
  parser.add_argument(
    "--steps", type=cli.number(1), default=60, help="steps per run (the first compiles)"
  )
  parser.add_argument("--log-every", type=cli.number(1), default=20)
  parser.add_argument("--batch-size", type=cli.number(1), default=256)
  parser.add_argument("--devices", type=cli.number(1), default=2, help="devices in all (D)")
  parser.add_argument(
    "--processes", type=cli.number(1), default=2, help="processes of the split layout (N)"
  )
  parser.add_argument("--rounds", type=cli.number(1), default=2)
  parser.add_argument(
    "--timeout", type=cli.number(1, kind=float), default=1800, help="seconds per run"
  )
  parser.add_argument("--out", default=None, help="write the report as JSON here")
  args = parser.parse_args(argv)
  if args.devices % args.processes:
    parser.error(f"--devices {args.devices} does not split over --processes {args.processes}")
  if args.out:
    parser.check_output_file("--out", args.out, ".json")
  with parser.refusing_bad_inputs():  # here, not as a child's failure after a run starts
    data.load_mnist("valid", data_dir=args.data_dir)
  layouts = [(1, args.devices), (args.processes, args.devices // args.processes)]
  results = {layout: [] for layout in layouts}
  with tempfile.TemporaryDirectory() as tmp:
    for round_ in range(args.rounds):
      for processes, devices in layouts:
        workdir = Path(tmp) / f"{processes}x{devices}-{round_}"
        results[(processes, devices)].append(run_layout(args, processes, devices, workdir))
  base = statistics.median(r["step_ms"] for r in results[layouts[0]])
  first, second = (results[layout][-1]["params"] for layout in layouts)
  difference = max(
    float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
    for a, b in zip(_leaves(first), _leaves(second), strict=True)
  )
  report = {
    "machine": platform.processor() or platform.machine(),
    "cpu_count": __import__("os").cpu_count(),
    "args": vars(args),
    "layouts": [],
  }
  print(
    f"{args.order} order, {args.recipe} model, global batch {args.batch_size},"
    f" {args.steps} steps, median of {args.rounds} rounds\n"
  )
  print("| layout | step time (ms) | samples/s | step time vs 1 process |")
  print("|---|---|---|---|")
  for processes, devices in layouts:
    rows = results[(processes, devices)]
    step_ms = statistics.median(r["step_ms"] for r in rows)
    samples = statistics.median(r["samples_per_s"] for r in rows)
    name = f"{processes} process{'es' if processes > 1 else ''} x {devices} device{'s' if devices > 1 else ''}"
    print(f"| {name} | {step_ms:.0f} | {samples:.0f} | {step_ms / base:.2f}x |")
    report["layouts"].append(
      {
        "processes": processes,
        "devices": devices,
        "step_ms": step_ms,
        "samples_per_s": samples,
        "step_time_ratio": step_ms / base,
        "rounds": [{k: v for k, v in r.items() if k != "params"} for r in rows],
      }
    )
  print(f"\nlargest parameter difference after {args.steps} steps: {difference:.3g}")
  report["max_param_difference"] = difference
  if args.out:
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


def _leaves(tree):
  if isinstance(tree, dict):
    for key in sorted(tree):
      yield from _leaves(tree[key])
  else:
    yield tree


if __name__ == "__main__":
  main()
