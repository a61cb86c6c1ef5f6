"""``pixelrnn-jax serve`` under load: many concurrent clients against a real server.

    python benchmarks/serve_load.py --clients 64 --requests 640

Starts ``pixelrnn-jax serve`` in a subprocess on a free loopback port, then,
for each kind of request (a 280x280 PNG of a drawn 7 as a multipart upload;
the same digit's 28x28 pixels as JSON), ``--requests`` requests from
``--clients`` concurrent keep-alive connections (each kind stops early at
``--time-limit`` seconds). Reports requests/s, p50 and p99 latency, errors,
the server's resident memory (``VmRSS`` of its process and its worker
processes) before and after, and the load generator's own CPU time per
request (it shares the cores with the server: ``--client raw``, HTTP/1.1
on asyncio streams, costs a tenth of ``--client httpx``); then the same work (decode, model, JSON)
in a plain single-thread loop in this process, without HTTP, and the ratio of
the two rates. Once per ``--modes``: ``processes`` (the default server:
``--workers`` worker processes) and ``threads`` (``serve --threads``).
Targets on 2 cores: no errors, flat memory, p99 <= 1 s at 64 clients.

Needs the ``serve`` extra (``pip install -e '.[serve]'``).
"""

import asyncio
import io
import json
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from PIL import ImageDraw

from pixelrnn_jax import cli
from pixelrnn_jax import model_io

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
  """The server on a free port, and its address; its stderr goes to a temporary file,
  shown only if it fails (its "terminated (SIGTERM)" line at the end is expected)."""
  log = tempfile.TemporaryFile("w+")
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
    stderr=log,
    text=True,
    cwd=ROOT,
  )
  process.log = log
  line = process.stdout.readline()
  match = re.search(r"on (http://\S+) ", line)
  if match is None:
    process.kill()
    process.wait()
    raise RuntimeError(f"the server did not start: {line!r}; its stderr:\n{server_stderr(process)}")
  return process, match.group(1)


def server_stderr(process: subprocess.Popen) -> str:
  process.log.seek(0)
  return process.log.read()


def stop_server(process: subprocess.Popen) -> None:
  """SIGTERM, as a service manager stops it; its stderr is shown if it did not exit 143."""
  process.terminate()
  code = process.wait(timeout=30)
  if code not in (143, -signal.SIGTERM):
    print(f"the server exited {code}; its stderr:\n{server_stderr(process)}", file=sys.stderr)


def request_bytes(url: str, body: dict) -> bytes:
  """One ``POST /api/predict`` as HTTP/1.1 bytes (keep-alive), built once with httpx."""
  request = httpx.Request("POST", url + "/api/predict", **body)
  request.read()
  head = [f"POST {request.url.raw_path.decode()} HTTP/1.1"]
  head += [f"{name}: {value}" for name, value in request.headers.items()]
  return ("\r\n".join(head) + "\r\n\r\n").encode() + request.content


async def raw_client(url: str, request: bytes, count, record) -> None:
  """Sends ``request`` on one keep-alive connection while ``count()`` allows; reads
  each answer by its Content-Length. A lean client: on 2 cores the load generator
  shares the CPU with the server, and httpx costs ~4 ms of CPU per request."""
  host, port = httpx.URL(url).host, httpx.URL(url).port
  reader, writer = await asyncio.open_connection(host, port)
  try:
    while count():
      started = time.perf_counter()
      try:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
        content = await reader.readexactly(length)
        record(started, status, content)
      except (OSError, asyncio.IncompleteReadError) as error:
        record(started, None, repr(error).encode())
        reader, writer = await asyncio.open_connection(host, port)
  finally:
    writer.close()


async def load(
  url: str, kind: str, body: dict, *, clients: int, total: int, limit_s: float, client: str
):
  """``total`` requests from ``clients`` concurrent connections; latencies and errors.

  ``client``: ``raw`` (asyncio streams, see :func:`raw_client`) or ``httpx``
  (``AsyncClient``). The client's own CPU time per request is reported."""
  latencies, errors = [], []
  issued = 0
  deadline = time.perf_counter() + limit_s

  def count() -> bool:
    nonlocal issued
    issued += 1
    return issued <= total and time.perf_counter() < deadline

  def record(started: float, status: int | None, content: bytes) -> None:
    # The answer's first key, without parsing its 7,840 probabilities here (this
    # process shares the server's cores).
    if status != 200 or not content.startswith(b'{"label":7,'):
      errors.append(f"{status} {content[:80]!r}")
    latencies.append(time.perf_counter() - started)

  async def httpx_client(http: httpx.AsyncClient) -> None:
    while count():
      started = time.perf_counter()
      try:
        response = await http.post("/api/predict", **body)
        record(started, response.status_code, response.content)
      except httpx.HTTPError as error:
        record(started, None, repr(error).encode())

  cpu, started = time.process_time(), time.perf_counter()
  if client == "raw":
    request = request_bytes(url, body)
    await asyncio.gather(*(raw_client(url, request, count, record) for _ in range(clients)))
  else:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
      await asyncio.gather(*(httpx_client(http) for _ in range(clients)))
  elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
  return {
    "kind": kind,
    "client": client,
    "requests": len(latencies),
    "seconds": elapsed,
    "rps": len(latencies) / elapsed,
    "p50_ms": 1000 * float(np.percentile(latencies, 50)),
    "p99_ms": 1000 * float(np.percentile(latencies, 99)),
    "errors": len(errors),
    "first_error": errors[0] if errors else None,
    "client_cpu_ms": 1000 * cpu / max(1, len(latencies)),
  }


def plain_loop(checkpoint: str, png: bytes, pixels_body: bytes, count: int) -> dict[str, float]:
  """The same work per request (decode or check, model, JSON) in one Python thread: the
  server's own function, one request at a time."""
  from pixelrnn_jax.serve import app as app_lib
  from pixelrnn_jax.serve import models

  model = models.load(checkpoint)
  answer = app_lib._answer_jobs  # noqa: SLF001 (the server's own code: the same work)
  jobs = {
    "image": [(app_lib._read_upload, (model.name, png, "seven.png", "image/png"))],  # noqa: SLF001
    "json": [(app_lib._read_json, (pixels_body, None))],  # noqa: SLF001
  }
  work = {kind: (lambda job=job: answer([model], job)) for kind, job in jobs.items()}
  rates = {}
  for kind, once in work.items():
    once()
    started = time.perf_counter()
    for _ in range(count):
      once()
    rates[kind] = count / (time.perf_counter() - started)
  return rates


def main(argv=None) -> dict:
  parser = cli.OneLineParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--clients", type=cli.number(1), default=64, help="concurrent connections")
  parser.add_argument("--requests", type=cli.number(1), default=640, help="requests per kind")
  parser.add_argument(
    "--time-limit", type=cli.number(1, kind=float), default=300.0, help="seconds per kind, at most"
  )
  parser.add_argument(
    "--loop", type=cli.number(1), default=200, help="iterations of the plain loop"
  )
  parser.add_argument("--checkpoint", default="pretrained:pixel")
  parser.add_argument(
    "--modes",
    nargs="+",
    choices=("processes", "threads"),
    default=["processes", "threads"],
    help="server modes to measure: worker processes (the default server) and --threads",
  )
  parser.add_argument(
    "--max-batch",
    nargs="+",
    type=cli.number(1),
    default=[16, 1],
    help="serve --max-batch values to measure (1: no batching of waiting requests)",
  )
  parser.add_argument(
    "--client",
    nargs="+",
    choices=("raw", "httpx"),
    default=["raw"],
    help="load generators: raw HTTP/1.1 on asyncio streams (lean) and/or httpx.AsyncClient",
  )
  args = parser.parse_args(argv)
  with parser.refusing_bad_inputs():  # before a server starts: its error was a traceback here
    model_io.read(args.checkpoint)

  png = drawn_seven()
  rows = []
  pixels_body = None
  servers = [(mode, batch) for mode in args.modes for batch in args.max_batch]
  for mode, batch in servers:
    flags = ["--max-batch", str(batch), *(["--threads"] if mode == "threads" else [])]
    process, url = start_server(args.checkpoint, *flags)
    try:
      pixels = httpx.post(
        url + "/api/predict", files={"file": ("seven.png", png, "image/png")}, timeout=60
      ).json()["pixels"]
      pixels_body = json.dumps({"pixels": pixels}).encode()
      bodies = {
        "image": {"files": {"file": ("seven.png", png, "image/png")}},
        "json": {"content": pixels_body, "headers": {"content-type": "application/json"}},
      }
      for client in args.client:
        for kind, body in bodies.items():
          before = rss_mb(process.pid)
          row = asyncio.run(
            load(
              url,
              kind,
              body,
              clients=args.clients,
              total=args.requests,
              limit_s=args.time_limit,
              client=client,
            )
          )
          row |= {"mode": mode, "max_batch": batch, "rss_before_mb": before}
          row["rss_after_mb"] = rss_mb(process.pid)
          rows.append(row)
    finally:
      stop_server(process)

  rates = plain_loop(args.checkpoint, png, pixels_body, args.loop)
  print(f"{args.clients} clients, {args.requests} requests per kind, model {args.checkpoint}")
  print()
  print(
    "| server | max batch | client | request | requests | requests/s | p50 ms | p99 ms | errors | server RSS"
    " before -> after (MB) | client CPU ms/req | plain loop req/s | server / loop |"
  )
  print("|---|---:|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|")
  for row in rows:
    row["loop_rps"] = rates[row["kind"]]
    row["ratio"] = row["rps"] / row["loop_rps"]
    print(
      f"| {row['mode']} | {row['max_batch']} | {row['client']} | {row['kind']} | {row['requests']} |"
      f" {row['rps']:.1f} | {row['p50_ms']:.0f} | {row['p99_ms']:.0f} | {row['errors']} |"
      f" {row['rss_before_mb']:.0f} -> {row['rss_after_mb']:.0f} | {row['client_cpu_ms']:.2f} |"
      f" {row['loop_rps']:.1f} |"
      f" {row['ratio']:.2f} |"
    )
    if row["first_error"]:
      print(f"  first error ({row['kind']}): {row['first_error']}")
  return {"rows": rows}


if __name__ == "__main__":
  main()
