"""The library called in a loop, as a notebook or a service calls it: compilations
and resident memory over many eager calls of each public entry.

    python benchmarks/library_loop.py --calls 1000

For each of ``gru_classifier.apply``, ``accuracy_per_step``, ``inference.predict``
and ``inference.evaluate`` on the shipped pixel model (a batch of 8 random
[0, 1] images, new values every call, the same shape): the XLA compilations
after the first call (JAX's monitoring event
``/jax/core/compile/backend_compile_duration``), and the resident set size
(``VmRSS``) after the first call, after 10% of the calls and at the end. One
JSON line per entry; a flat memory shows as ``rss_growth_mb`` near 0 between
10% and the end.
"""

import json
import time

import jax
import numpy as np

from pixelrnn_jax import cli
from pixelrnn_jax import gru_classifier
from pixelrnn_jax import inference

EVENT = "/jax/core/compile/backend_compile_duration"


def rss_mb() -> float:
  """This process's resident set size in MB (Linux ``/proc/self/status``)."""
  with open("/proc/self/status") as status:
    for line in status:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  raise RuntimeError("no VmRSS in /proc/self/status")


def main(argv: list[str] | None = None) -> None:
  parser = cli.OneLineParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--calls", type=cli.number(1), default=1000)
  parser.add_argument("--batch", type=cli.number(1), default=8)
  args = parser.parse_args(argv)
  compilations = [0]
  jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: compilations.__setitem__(0, compilations[0] + (event == EVENT))
  )
  model = gru_classifier.load_pretrained("pixel")
  labels = np.arange(args.batch) % 10
  entries = {
    "apply": lambda x: gru_classifier.apply(model, x),
    "accuracy_per_step": lambda x: gru_classifier.accuracy_per_step(
      gru_classifier.apply(model, x), labels
    ),
    "predict": lambda x: inference.predict(model, x, threshold=0.999),
    "evaluate": lambda x: inference.evaluate(model, x, labels, batch_size=args.batch),
  }
  rng = np.random.default_rng(0)
  for name, entry in entries.items():
    images = lambda: rng.uniform(size=(args.batch, 28, 28)).astype(np.float32)
    jax.block_until_ready(entry(images()))
    first_compilations, first_rss = compilations[0], rss_mb()
    start = time.perf_counter()
    for call in range(args.calls):
      jax.block_until_ready(entry(images()))
      if call == args.calls // 10:
        early_rss = rss_mb()
    seconds = time.perf_counter() - start
    print(
      json.dumps(
        {
          "entry": name,
          "calls": args.calls,
          "compilations_after_first_call": compilations[0] - first_compilations,
          "ms_per_call": 1000 * seconds / args.calls,
          "rss_mb_after_first_call": round(first_rss, 1),
          "rss_mb_at_10_percent": round(early_rss, 1),
          "rss_mb_at_end": round(rss_mb(), 1),
          "rss_growth_mb": round(rss_mb() - early_rss, 1),
        }
      ),
      flush=True,
    )


if __name__ == "__main__":
  main()
