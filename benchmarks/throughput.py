"""Train- and eval-step throughput, memory and scaling, side by side with peers.

The notebook's model (GRU-64, T=784, batch 512, float32; logits at every
step, cross-entropy on the last, Adam) as:

* pixelrnn_jax, both cells (and each scan implementation),
* flax.linen ``nn.RNN(nn.GRUCell(64))`` + ``nn.Dense`` with the same optax Adam,
* ``torch.nn.GRU(1, 64)`` + ``nn.Linear`` with ``torch.optim.Adam`` (cuDNN on
  GPU; skipped with a note when torch is not installed: ``pip install -e '.[bench]'``).

All contestants run in one process, interleaved (A, B, C, A, B, C, ...) after
warm-up; compilation is timed apart. The speed-up of pixelrnn_jax over each
peer is computed per round and reported as the median over rounds.

    python benchmarks/throughput.py            # full run: ~12 min on 2 CPU cores
    python benchmarks/throughput.py --quick    # ~1 min smoke run
    python benchmarks/throughput.py --only pixelrnn_jax --steps 16 --batch 8 --rounds 1 --no-memory --no-scaling
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pixelrnn_jax import cli
from pixelrnn_jax import gru_classifier
from pixelrnn_jax.training import config as config_lib
from pixelrnn_jax.training import step as train_lib

CLASSES = 10
IN_DIM = 1


# ----------------------------------------------------------------------------
# FLOPs and the machine's matmul rate


def train_step_flops(
  *, batch: int, steps: int, units: int, in_dim: int = IN_DIM, classes: int = CLASSES
) -> float:
  """FLOPs of one train step, counted from the matmul shapes.

  Per example and step the forward does ``[x, h] @ W`` for the three gates
  ((in_dim + units) x 3 units multiply-adds, both cells) and the readout
  (units x classes); a multiply-add is 2 FLOPs. The backward does two
  matmuls of the same size per forward matmul (input and weight
  gradients), so a train step is 3x the forward. Elementwise work and Adam
  (13k weights) are left out.
  """
  forward = 2 * batch * steps * ((in_dim + units) * 3 * units + units * classes)
  return 3.0 * forward


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
  """This machine's fp32 matmul rate: the best of ``repeats`` n x n jnp matmuls."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  matmul = jax.jit(lambda a: a @ a)
  matmul(a).block_until_ready()
  best = min(_timed(lambda: matmul(a).block_until_ready()) for _ in range(repeats))
  return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


# ----------------------------------------------------------------------------
# Contestants: setup(batch, steps, units) -> (train_step(), eval_step()), each blocking


def _inputs(batch, steps, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.uniform(size=(batch, steps, IN_DIM)).astype(np.float32)
  y = rng.integers(0, CLASSES, size=batch).astype(np.int32)
  return x, y


def pixelrnn_jax_setup(cell: str, impl: str | None = None, devices: int = 1):
  def setup(batch, steps, units):
    extra = {"impl": impl} if impl else {}
    config = config_lib.Config(
      num_units=units, cell=cell, batch_size=batch, devices=devices, order="pixel", **extra
    )
    optimizer = train_lib.make_optimizer(config)
    state = train_lib.replicate(
      train_lib.init_train_state(config, jax.random.key(0), optimizer), devices
    )
    step = train_lib.make_train_step(optimizer, **extra)
    x, y = _inputs(batch, steps)
    x_dev = jax.device_put(x.reshape(devices, batch // devices, steps, IN_DIM))
    y_dev = y.reshape(devices, batch // devices)
    params = train_lib.unreplicate(state).params
    forward = lambda p, x: gru_classifier.apply(p, x, **extra)
    # The eval step is split across the same devices as the train step.
    apply = jax.jit(forward) if devices == 1 else jax.pmap(forward, in_axes=(None, 0))
    x_eval = x_dev[0] if devices == 1 else x_dev
    holder = {"state": state}

    def train_step():
      holder["state"], metrics = step(holder["state"], x_dev, y_dev)
      jax.block_until_ready(metrics)

    def eval_step():
      apply(params, x_eval).block_until_ready()

    def xla_temp_bytes():
      return (
        step.lower(holder["state"], x_dev, y_dev).compile().memory_analysis().temp_size_in_bytes
      )

    train_step.xla_temp_bytes = xla_temp_bytes
    return train_step, eval_step

  return setup


def flax_setup(batch, steps, units):
  import flax.linen as nn

  class FlaxGRU(nn.Module):
    units: int

    @nn.compact
    def __call__(self, x):
      hs = nn.RNN(nn.GRUCell(self.units))(x)  # (B, T, units)
      return nn.Dense(CLASSES)(hs)  # (B, T, classes): logits at every step

  model = FlaxGRU(units)
  x, y = _inputs(batch, steps)
  x, y = jnp.asarray(x), jnp.asarray(y)
  params = model.init(jax.random.key(0), x[:1])
  optimizer = optax.adam(1e-3)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(params):
      logits = model.apply(params, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits[:, -1], y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  apply = jax.jit(model.apply)
  holder = {"params": params, "opt": optimizer.init(params)}

  def train_step():
    holder["params"], holder["opt"], loss = step(holder["params"], holder["opt"], x, y)
    loss.block_until_ready()

  train_step.xla_temp_bytes = lambda: (
    step.lower(holder["params"], holder["opt"], x, y).compile().memory_analysis().temp_size_in_bytes
  )

  def eval_step():
    apply(params, x).block_until_ready()

  return train_step, eval_step


def torch_setup(batch, steps, units):
  import torch

  device = "cuda" if torch.cuda.is_available() else "cpu"

  class TorchGRU(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.gru = torch.nn.GRU(IN_DIM, units, batch_first=True)
      self.out = torch.nn.Linear(units, CLASSES)

    def forward(self, x):
      hs, _ = self.gru(x)  # (B, T, units)
      return self.out(hs)  # (B, T, classes)

  torch.manual_seed(0)
  model = TorchGRU().to(device)
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
  x, y = _inputs(batch, steps)
  x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).long().to(device)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def train_step():
    optimizer.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(x)[:, -1], y)
    loss.backward()
    optimizer.step()
    sync()

  def eval_step():
    with torch.no_grad():
      model(x)
    sync()

  return train_step, eval_step


def torch_available() -> bool:
  try:
    import torch  # noqa: F401 (is torch installed?)

    return True
  except ImportError:
    return False


def contestants(args) -> dict:
  ours = {}
  for cell in ("tf1", "reset_after"):
    for impl in _impls():
      name = f"pixelrnn_jax {cell}" + (f" ({impl})" if impl else "")
      ours[name] = pixelrnn_jax_setup(cell, impl)
  if args.devices > 1:
    for cell in ("tf1", "reset_after"):
      ours[f"pixelrnn_jax {cell} x{args.devices} devices"] = pixelrnn_jax_setup(
        cell, _impls()[0], devices=args.devices
      )
  peers = {"flax.linen nn.RNN(GRUCell)": flax_setup}
  if torch_available():
    peers["torch.nn.GRU"] = torch_setup
  selected = {**ours, **peers}
  if args.only:
    selected = {k: v for k, v in selected.items() if k.startswith(args.only)}
  return selected


def _impls() -> list:
  """The scan implementations the library offers (None: it offers one)."""
  return list(getattr(gru_classifier, "IMPLS", [None]))


# ----------------------------------------------------------------------------
# Measurements


def interleaved(setups: dict, *, batch, steps, units, rounds, iters) -> dict:
  """Compiles every contestant, then times them in interleaved rounds."""
  runners, compile_s = {}, {}
  for name, setup in setups.items():
    train_step, eval_step = setup(batch, steps, units)
    compile_s[name] = {"train": _timed(train_step), "eval": _timed(eval_step)}
    train_step(), eval_step()  # warm-up past the first (compiling) call
    runners[name] = (train_step, eval_step)
    print(
      f"  ready: {name} (first train step {compile_s[name]['train']:.1f} s,"
      f" first eval step {compile_s[name]['eval']:.1f} s)",
      flush=True,
    )
  times = {name: {"train": [], "eval": []} for name in runners}
  for round_index in range(rounds):
    for name, (train_step, eval_step) in runners.items():
      times[name]["train"].append(_timed(lambda: [train_step() for _ in range(iters)]) / iters)
      times[name]["eval"].append(_timed(lambda: [eval_step() for _ in range(iters)]) / iters)
    print(
      f"  round {round_index + 1}/{rounds}: "
      + ", ".join(f"{n} {t['train'][-1]:.3f}s" for n, t in times.items()),
      flush=True,
    )
  return {"compile_s": compile_s, "step_s": times}


def speedups(times: dict) -> dict:
  """For each pixelrnn_jax variant and peer: median over rounds of peer time / ours."""
  ours = [name for name in times if name.startswith("pixelrnn_jax")]
  peers = [name for name in times if not name.startswith("pixelrnn_jax")]
  return {
    mine: {
      peer: {
        kind: statistics.median(p / o for p, o in zip(times[peer][kind], times[mine][kind]))
        for kind in ("train", "eval")
      }
      for peer in peers
    }
    for mine in ours
  }


def _status_bytes(field: str) -> int:
  """A VmRSS/VmHWM line of /proc/self/status, in bytes."""
  for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith(field + ":"):
      return int(line.split()[1]) * 1024
  raise KeyError(field)


def memory_probe(name: str, batch: int, steps: int, units: int, devices: int) -> dict:
  """Runs in a fresh process: how far two train steps raise the resident set.

  After a first (compiling) step, the peak-RSS counter is reset (Linux
  ``clear_refs`` 5) and two more steps run: the result is the peak minus the
  resident set before them, i.e. the step's own transient memory.
  """
  setups = contestants(argparse.Namespace(only=None, devices=devices))
  train_step, _ = setups[name](batch, steps, units)
  train_step()
  gc.collect()
  before = _status_bytes("VmRSS")
  Path("/proc/self/clear_refs").write_text("5")
  train_step()
  train_step()
  result = {"peak_rss_increase_bytes": _status_bytes("VmHWM") - before}
  if hasattr(train_step, "xla_temp_bytes"):
    result["xla_temp_bytes"] = train_step.xla_temp_bytes()
  if jax.default_backend() != "cpu":
    if name.startswith("torch"):
      import torch

      result["device_peak_bytes"] = torch.cuda.max_memory_allocated()
    else:
      stats = jax.local_devices()[0].memory_stats() or {}
      result["device_peak_bytes"] = stats.get("peak_bytes_in_use")
  return result


def memory_table(names, batches, steps, units) -> dict:
  table = {}
  for name in names:
    for batch in batches:
      out = subprocess.run(
        [
          sys.executable,
          __file__,
          "--memory-probe",
          name,
          "--batch",
          str(batch),
          "--steps",
          str(steps),
          "--units",
          str(units),
          "--devices",
          "1",
        ],
        capture_output=True,
        text=True,
        check=False,
      )
      if out.returncode:
        table[f"{name} @ {batch}"] = {"error": out.stderr.strip()[-300:]}
      else:
        table[f"{name} @ {batch}"] = json.loads(out.stdout.strip().splitlines()[-1])
      print(f"  memory {name} batch {batch}: {table[f'{name} @ {batch}']}", flush=True)
  return table


def scaling(setup, lengths, batches, units, iters) -> dict:
  rows = []
  for batch in batches:
    for steps in lengths:
      train_step, _ = setup(batch, steps, units)
      train_step()
      train_step()
      seconds = min(_timed(train_step) for _ in range(iters))
      rows.append({"batch": batch, "steps": steps, "train_step_s": seconds})
      print(f"  scaling batch {batch} T {steps}: {seconds:.3f} s", flush=True)
  return {"rows": rows}


def machine() -> dict:
  model = platform.processor()
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        model = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  versions = {}
  for package in ("jax", "jaxlib", "flax", "optax", "torch"):
    try:
      from importlib.metadata import version

      versions[package] = version(package)
    except Exception:
      versions[package] = None
  return {
    "date": datetime.date.today().isoformat(),
    "cpu": model,
    "cpu_count": os.cpu_count(),
    "backend": jax.default_backend(),
    "devices": [str(d) for d in jax.devices()],
    "python": platform.python_version(),
    "versions": versions,
  }


# ----------------------------------------------------------------------------


def _print_report(report: dict) -> None:
  main = report["main"]
  step_s = main["step_s"]
  batch, steps = report["shape"]["batch"], report["shape"]["steps"]
  flops = report["train_step_flops"]
  print(
    f"\n## Train and eval step, GRU-{report['shape']['units']}, T={steps},"
    f" batch {batch}, float32 ({report['machine']['backend']},"
    f" {report['machine']['cpu']}, {report['machine']['cpu_count']} cores)\n"
  )
  print(
    "| implementation | train step (s) | train samples/s | GFLOP/s | % of matmul peak"
    " | eval step (s) | first train step (s) |"
  )
  print("|---|---|---|---|---|---|---|")
  for name, kinds in step_s.items():
    train_s = statistics.median(kinds["train"])
    eval_s = statistics.median(kinds["eval"])
    print(
      f"| {name} | {train_s:.3f} | {batch / train_s:.0f} | {flops / train_s / 1e9:.1f}"
      f" | {100 * flops / train_s / 1e9 / report['matmul_gflops']:.0f}% | {eval_s:.3f}"
      f" | {main['compile_s'][name]['train']:.1f} |"
    )
  peers = sorted({peer for row in report["speedups"].values() for peer in row})
  if peers:
    print(
      "\n| speed-up (peer time / pixelrnn_jax time), train / eval | " + " | ".join(peers) + " |"
    )
    print("|---|" + "---|" * len(peers))
    for mine, row in report["speedups"].items():
      print(
        f"| {mine} | "
        + " | ".join(f"{row[p]['train']:.2f}x / {row[p]['eval']:.2f}x" for p in peers)
        + " |"
      )
  print(
    f"\nTrain step FLOPs {flops / 1e9:.1f} G (matmuls, from the shapes);"
    f" fp32 matmul peak measured in this run: {report['matmul_gflops']:.0f} GFLOP/s."
    f" Ratios: median over {len(next(iter(step_s.values()))['train'])} interleaved rounds"
    " of peer time / pixelrnn_jax time."
  )
  if report.get("memory"):
    mib = lambda v: "" if v is None else f"{v / 2**20:.0f}"
    print(
      "\n| train step memory @ batch | XLA temp buffers (MiB) | extra peak RSS (MiB)"
      " | device peak (MiB) |\n|---|---|---|---|"
    )
    for name, row in report["memory"].items():
      if "error" in row:
        print(f"| {name} | error: {row['error'][:80]} | | |")
        continue
      print(
        f"| {name} | {mib(row.get('xla_temp_bytes'))} |"
        f" {mib(row.get('peak_rss_increase_bytes'))} | {mib(row.get('device_peak_bytes'))} |"
      )
  if report.get("scaling"):
    rows = report["scaling"]["rows"]
    print(
      "\n| batch | T | train step (s) | s per 1000 steps of T | samples/s |\n|---|---|---|---|---|"
    )
    for row in rows:
      print(
        f"| {row['batch']} | {row['steps']} | {row['train_step_s']:.3f} |"
        f" {1000 * row['train_step_s'] / row['steps']:.3f} |"
        f" {row['batch'] / row['train_step_s']:.0f} |"
      )
    for batch in sorted({row["batch"] for row in rows}):
      mine = sorted((r["steps"], r["train_step_s"]) for r in rows if r["batch"] == batch)
      (t0, s0), (t1, s1) = mine[0], mine[-1]
      print(
        f"batch {batch}: T x{t1 / t0:.0f} ({t0} -> {t1}) costs x{s1 / s0:.1f}"
        " (linear in T would be the same factor)"
      )


def main(argv=None) -> dict:
  parser = cli.OneLineParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--quick", action="store_true", help="a ~1 minute smoke run")
  parser.add_argument("--batch", type=cli.number(1), default=512)
  parser.add_argument("--steps", type=cli.number(1), default=784, help="sequence length T")
  parser.add_argument("--units", type=cli.number(1), default=64)
  parser.add_argument("--rounds", type=cli.number(1), default=None, help="interleaved rounds")
  parser.add_argument("--iters", type=cli.number(1), default=2, help="steps timed per round")
  parser.add_argument(
    "--devices",
    type=cli.number(1),
    default=min(2, os.cpu_count() or 1),
    help="also time pixelrnn_jax pmapped over N host devices (1: off)",
  )
  parser.add_argument("--only", default=None, help="contestants whose name starts so")
  parser.add_argument("--no-memory", action="store_true")
  parser.add_argument("--no-scaling", action="store_true")
  parser.add_argument("--json", default=None, help="write the report here")
  parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.json:  # before minutes of timing, not after them
    parser.check_output_file("--json", args.json, ".json")
  if args.devices > 1:
    jax.config.update("jax_num_cpu_devices", args.devices)

  if args.memory_probe:
    print(
      json.dumps(memory_probe(args.memory_probe, args.batch, args.steps, args.units, args.devices))
    )
    return {}

  if args.quick:
    args.batch, args.steps = min(args.batch, 128), min(args.steps, 196)
    args.rounds = args.rounds or 3
  rounds = args.rounds or 5
  setups = contestants(args)
  ours = next((name for name in setups if name.startswith("pixelrnn_jax")), None)
  if ours is None:  # the ratios are to pixelrnn_jax's time
    every = ", ".join(contestants(argparse.Namespace(**{**vars(args), "only": None})))
    parser.error(
      f"--only {args.only}: no pixelrnn_jax contestant is left (the ratios are to its"
      f" time); contestants: {every}"
    )
  report = {
    "machine": machine(),
    "command": "python benchmarks/throughput.py " + " ".join(argv or sys.argv[1:]),
    "shape": {"batch": args.batch, "steps": args.steps, "units": args.units},
    "train_step_flops": train_step_flops(batch=args.batch, steps=args.steps, units=args.units),
  }
  print(f"machine: {report['machine']}", flush=True)
  if not torch_available():
    print(
      "note: torch is not installed; the torch.nn.GRU column is skipped (pip install -e '.[bench]')"
    )
  report["matmul_gflops"] = matmul_gflops()
  report["main"] = interleaved(
    setups, batch=args.batch, steps=args.steps, units=args.units, rounds=rounds, iters=args.iters
  )
  report["speedups"] = speedups(report["main"]["step_s"])
  if not args.no_memory:
    batches = (128,) if args.quick else (128, 512, 2048)
    single_device = [name for name in setups if "devices" not in name]
    report["memory"] = memory_table(single_device, batches, args.steps, args.units)
  if not args.no_scaling:
    lengths = (49, 98) if args.quick else (98, 196, 392, 784)
    batches = (64,) if args.quick else (64, 256, 512, 1024)
    report["scaling"] = scaling(setups[ours], lengths, batches, args.units, iters=2)
  _print_report(report)
  if args.json:
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
  return report


if __name__ == "__main__":
  main()
