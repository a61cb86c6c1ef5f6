"""Running the app: the socket bound first (a busy port is one clear error), then uvicorn.

sock = bind("127.0.0.1", 8000)        # OSError naming the address when it is taken
run(app, sock)                        # until Ctrl-C or SIGTERM
"""

from __future__ import annotations

import errno
import socket

import uvicorn
from fastapi import FastAPI

SHUTDOWN_SECONDS = 5  # requests in flight get this long to finish after Ctrl-C / SIGTERM


def bind(host: str, port: int) -> socket.socket:
  """A listening socket on ``host:port`` (port 0: a free one, see ``getsockname()``).

  Binding here, before uvicorn starts, turns a taken port into one line
  instead of uvicorn's log and exit code 1.

  Raises:
    OSError: naming the address: in use, not this machine's, or not allowed.
  """
  try:
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
  except socket.gaierror as error:
    raise OSError(f"--host {host}: not an address of this machine ({error.strerror})") from error
  sock = socket.socket(family, socket.SOCK_STREAM)
  # As uvicorn does: a restart may reuse the port at once (TIME_WAIT), while a port
  # that another server listens on still fails to bind.
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((host, port))
    sock.listen(2048)
  except OSError as error:
    sock.close()
    if error.errno == errno.EADDRINUSE:
      raise OSError(
        f"{host}:{port} is already in use (another server?); choose another --port"
      ) from error
    raise OSError(f"cannot listen on {host}:{port}: {error.strerror}") from error
  sock.set_inheritable(True)
  return sock


def address(sock: socket.socket) -> str:
  """``http://HOST:PORT`` of a bound socket (IPv6 hosts in brackets)."""
  host, port = sock.getsockname()[:2]
  return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class _Server(uvicorn.Server):
  """uvicorn's server, telling the app's request queue (``app.state.batches``) at the
  first SIGINT / SIGTERM, so that queued requests get a 503 at once and those being
  answered get a JSON 503 before the grace period ends."""

  def handle_exit(self, sig, frame) -> None:
    batches = getattr(self.config.app.state, "batches", None)
    if batches is not None and not self.should_exit:
      batches.stop_soon(SHUTDOWN_SECONDS - 1)
    super().handle_exit(sig, frame)


def run(app: FastAPI, sock: socket.socket) -> None:
  """Serves ``app`` on ``sock`` until SIGINT or SIGTERM.

  uvicorn handles the signal (it stops accepting, lets requests in flight
  finish for SHUTDOWN_SECONDS) and then raises it again for the handler
  that was installed before, the CLI's, which prints its one line and exits
  130 / 143. Requests that waited for a worker get a 503 at once, and those
  still being answered a second before the end get a 503 too.
  """
  config = uvicorn.Config(
    app,
    log_level="warning",  # no access log: one line per request buries the start line
    timeout_graceful_shutdown=SHUTDOWN_SECONDS,
    # Clients under load reuse connections; a short idle timeout races their next request.
    timeout_keep_alive=30,
    server_header=False,
  )
  _Server(config).run(sockets=[sock])
