"""``pixelrnn-jax serve`` under load: many concurrent clients against a real server.

    python benchmarks/serve_load.py --clients 64 --requests 640

Starts ``pixelrnn-jax serve`` in a subprocess on a free loopback port, then,
for each kind of request (a 280x280 PNG of a drawn 7 as a multipart upload;
the same digit's 28x28 pixels as JSON), ``--requests`` requests from
``--clients`` concurrent httpx ``AsyncClient`` connections (each kind stops
early at ``--time-limit`` seconds). Reports requests/s, p50 and p99 latency,
errors, and the server's resident memory (``VmRSS`` of its process and its
worker processes) before and after; then the same work (decode, model, JSON)
in a plain single-thread loop in this process, without HTTP, and the ratio of
the two rates. Once per ``--modes``: ``processes`` (the default server:
``--workers`` worker processes) and ``threads`` (``serve --threads``).
Targets on 2 cores: no errors, flat memory, p99 <= 1 s at 64 clients.

Needs the ``serve`` extra (``pip install -e '.[serve]'``).
"""

import argparse
import asyncio
import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from PIL import ImageDraw

ROOT = Path(__file__).resolve().parents[1]
SEVEN = [(70, 55), (210, 55), (120, 240)]  # one stroke on a 280x280 canvas, as on the page


def drawn_seven() -> bytes:
  image = Image.new("L", (280, 280), 0)
  ImageDraw.Draw(image).line(SEVEN, fill=255, width=20, joint="curve")
  out = io.BytesIO()
  image.save(out, "PNG")
  return out.getvalue()


def rss_mb(pid: int) -> float:
  """Resident set size in MB of a process and its children (Linux ``/proc``)."""
  total = 0.0
  for process in [pid, *children(pid)]:
    with open(f"/proc/{process}/status") as status:
      total += next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024
  return total


def children(pid: int) -> list[int]:
  """Child processes of ``pid`` started by any of its threads."""
  return [
    int(child)
    for path in Path(f"/proc/{pid}/task").glob("*/children")
    for child in path.read_text().split()
  ]


def start_server(checkpoint: str, *flags: str) -> tuple[subprocess.Popen, str]:
  process = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "pixelrnn_jax",
      "serve",
      "--port",
      "0",
      "--checkpoint",
      checkpoint,
      *flags,
    ],
    stdout=subprocess.PIPE,
    text=True,
    cwd=ROOT,
  )
  line = process.stdout.readline()
  match = re.search(r"on (http://\S+) ", line)
  if match is None:
    process.kill()
    raise RuntimeError(f"the server did not start: {line!r}")
  return process, match.group(1)


async def load(url: str, kind: str, body: dict, *, clients: int, total: int, limit_s: float):
  """``total`` requests from ``clients`` concurrent connections; latencies and errors."""
  latencies, errors = [], []
  issued = 0
  deadline = time.perf_counter() + limit_s
  limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
  async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:

    async def client():
      nonlocal issued
      while issued < total and time.perf_counter() < deadline:
        issued += 1
        started = time.perf_counter()
        try:
          response = await http.post("/api/predict", **body)
          # The answer's first key, without parsing its 7,840 probabilities here (this
          # process shares the server's cores).
          if response.status_code != 200 or not response.content.startswith(b'{"label":7,'):
            errors.append(f"{response.status_code} {response.text[:80]}")
        except httpx.HTTPError as error:
          errors.append(repr(error))
        latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - started
  return {
    "kind": kind,
    "requests": len(latencies),
    "seconds": elapsed,
    "rps": len(latencies) / elapsed,
    "p50_ms": 1000 * float(np.percentile(latencies, 50)),
    "p99_ms": 1000 * float(np.percentile(latencies, 99)),
    "errors": len(errors),
    "first_error": errors[0] if errors else None,
  }


def plain_loop(checkpoint: str, png: bytes, pixels_body: bytes, count: int) -> dict[str, float]:
  """The same work per request (decode or check, model, JSON) in one Python thread."""
  from pixelrnn_jax.serve import app as app_lib
  from pixelrnn_jax.serve import models

  model = models.load(checkpoint)
  encode = app_lib._encode  # noqa: SLF001 (the server's own encoder: the same work)
  work = {
    "image": lambda: encode(model.answer(app_lib.image_pixels(png, "seven.png"))),
    "json": lambda: encode(model.answer(app_lib.check_pixels(json.loads(pixels_body)["pixels"]))),
  }
  rates = {}
  for kind, once in work.items():
    once()
    started = time.perf_counter()
    for _ in range(count):
      once()
    rates[kind] = count / (time.perf_counter() - started)
  return rates


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--clients", type=int, default=64, help="concurrent connections")
  parser.add_argument("--requests", type=int, default=640, help="requests per kind")
  parser.add_argument("--time-limit", type=float, default=300.0, help="seconds per kind, at most")
  parser.add_argument("--loop", type=int, default=200, help="iterations of the plain loop")
  parser.add_argument("--checkpoint", default="pretrained:pixel")
  parser.add_argument(
    "--modes",
    nargs="+",
    choices=("processes", "threads"),
    default=["processes", "threads"],
    help="server modes to measure: worker processes (the default server) and --threads",
  )
  args = parser.parse_args(argv)

  png = drawn_seven()
  rows = []
  pixels_body = None
  for mode in args.modes:
    process, url = start_server(args.checkpoint, *(["--threads"] if mode == "threads" else []))
    try:
      pixels = httpx.post(
        url + "/api/predict", files={"file": ("seven.png", png, "image/png")}, timeout=60
      ).json()["pixels"]
      pixels_body = json.dumps({"pixels": pixels}).encode()
      bodies = {
        "image": {"files": {"file": ("seven.png", png, "image/png")}},
        "json": {"content": pixels_body, "headers": {"content-type": "application/json"}},
      }
      for kind, body in bodies.items():
        before = rss_mb(process.pid)
        row = asyncio.run(
          load(url, kind, body, clients=args.clients, total=args.requests, limit_s=args.time_limit)
        )
        row |= {"mode": mode, "rss_before_mb": before, "rss_after_mb": rss_mb(process.pid)}
        rows.append(row)
    finally:
      process.terminate()
      process.wait(timeout=30)

  rates = plain_loop(args.checkpoint, png, pixels_body, args.loop)
  print(f"{args.clients} clients, {args.requests} requests per kind, model {args.checkpoint}")
  print()
  print(
    "| server | request | requests | requests/s | p50 ms | p99 ms | errors | server RSS"
    " before -> after (MB) | plain loop req/s | server / loop |"
  )
  print("|---|---|---:|---:|---:|---:|---:|---|---:|---:|")
  for row in rows:
    row["loop_rps"] = rates[row["kind"]]
    row["ratio"] = row["rps"] / row["loop_rps"]
    print(
      f"| {row['mode']} | {row['kind']} | {row['requests']} | {row['rps']:.1f} |"
      f" {row['p50_ms']:.0f} | {row['p99_ms']:.0f} | {row['errors']} |"
      f" {row['rss_before_mb']:.0f} -> {row['rss_after_mb']:.0f} | {row['loop_rps']:.1f} |"
      f" {row['ratio']:.2f} |"
    )
    if row["first_error"]:
      print(f"  first error ({row['kind']}): {row['first_error']}")
  return {"rows": rows}


if __name__ == "__main__":
  main()
