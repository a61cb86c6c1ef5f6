"""The FastAPI application of ``pixelrnn-jax serve``: the page, the JSON API, its errors.

    app = make_app(models.load_all(["pretrained:pixel"]))

Routes: ``GET /`` (the page), ``POST /api/predict``, ``GET /api/models``,
``GET /healthz``, ``/openapi.json``, and ``/docs``: FastAPI's Swagger UI page,
its scripts served from the fastapi-swagger package, so it works offline
(FastAPI's default loads them from a CDN). Every error
is JSON ``{"error": "..."}`` naming the problem: 4xx for the request's
fault, 500 (without a traceback) for the server's. Image decoding and model
calls run off the event loop, in worker processes (``processes`` > 0, what
``pixelrnn-jax serve`` uses: each holds its own copy of the models, so both
cores work at once) or in threads of this process (``processes=0``), so the
event loop keeps answering ``/healthz`` and the page while predictions queue.
Requests that wait for a worker while all are busy are answered together:
a free worker takes up to ``max_batch`` of them, in arrival order, and runs
one jitted pass per model over their images (:class:`Batches`). A worker
process that dies (killed, out of memory) fails the requests it was
answering with a 503 and only it is started again.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import copy
import difflib
import io
import json
import logging
import math
import mimetypes
import multiprocessing
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import fastapi_swagger
import numpy as np
import orjson
import python_multipart.multipart
from fastapi import FastAPI
from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from fastapi.responses import JSONResponse
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from pixelrnn_jax import images
from pixelrnn_jax.serve import models as models_lib

STATIC_DIR = Path(__file__).parent / "static"
MAX_UPLOAD_MB = 10.0  # a phone photo is 2-8 MB; more is not a digit worth decoding
SIZE = models_lib.IMAGE_SHAPE[0]
# Decoding and model calls at once: one per core. More threads only take turns at the GIL
# in no fair order (measured: p99 4x p50 with 40), while requests waiting in a FIFO
# queue are answered in arrival order.
WORKERS = max(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2)
MAX_BATCH = models_lib.MAX_BATCH  # waiting requests one worker answers in one pass

log = logging.getLogger(__name__)


class RequestError(Exception):
  """A request the API cannot answer: its HTTP status and the one-line reason."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status
    self.message = message

  def __reduce__(self):  # raised in a worker process, re-raised here
    return (RequestError, (self.status, self.message))


class WorkerError(Exception):
  """An unexpected exception while answering one request of a batch (a bug: its
  traceback is in the server's log), named by its type; answered with a 500."""

  def __init__(self, kind: str):
    super().__init__(kind)
    self.kind = kind

  def __reduce__(self):
    return (WorkerError, (self.kind,))


# ---------------------------------------------------------------------------- OpenAPI

_ERROR_SCHEMA = {"type": "object", "properties": {"error": {"type": "string"}}}
_PIXELS_SCHEMA = {
  "type": "array",
  "minItems": SIZE,
  "maxItems": SIZE,
  "items": {
    "type": "array",
    "minItems": SIZE,
    "maxItems": SIZE,
    "items": {"type": "number", "minimum": 0, "maximum": 1},
  },
  "description": "28 rows of 28 values in [0, 1], white digit on black, used as given",
}


def error_examples(names: list[str], limit: int) -> dict[str, tuple[str, str]]:
  """status -> (when, an example answer's ``error``) for ``POST /api/predict``, each
  example the very message this server gives (``names`` loaded, ``limit`` bytes)."""

  def message(check, *args) -> str:
    try:
      check(*args)
    except RequestError as error:
      return error.message
    raise AssertionError(f"{check.__name__}{args} passed")  # pragma: no cover

  return {
    "400": (
      "an empty body, not an image, malformed JSON, an unknown model",
      _unknown_model("seven", names).message,
    ),
    "413": (
      "a body over the upload limit, or an image with too many pixels",
      _too_large(2 * limit, limit),
    ),
    "415": (
      "neither multipart/form-data nor application/json",
      _unsupported_type("text/plain").message,
    ),
    "422": (
      "pixels of the wrong shape or values, or an image with no digit",
      message(check_pixels, [0.0] * SIZE * SIZE),
    ),
    "503": ("the server is stopping, or a worker process died", _stopping().message),
  }


def _predict_docs(names: list[str], limit: int) -> dict:
  """``POST /api/predict``'s request and answers in OpenAPI, its ``model`` field an
  enum of the loaded ``names`` with the first (the default) as its default, so that
  /docs's "Try it out" sends a real name (it sent the placeholder "string"); each
  error status with its own example (``error_examples``)."""
  docs = copy.deepcopy(_PREDICT_DOCS)
  docs["responses"].update(
    {
      status: {
        "description": when,
        "content": {"application/json": {"schema": _ERROR_SCHEMA, "example": {"error": example}}},
      }
      for status, (when, example) in error_examples(names, limit).items()
    }
  )
  for content in docs["requestBody"]["content"].values():
    content["schema"]["properties"]["model"] = {
      "type": "string",
      "enum": names,
      "default": names[0],
      "description": f"a loaded model's name; the default is the first, {names[0]}",
    }
  return docs


_PREDICT_DOCS = {
  "requestBody": {
    "required": True,
    "content": {
      "multipart/form-data": {
        "schema": {
          "type": "object",
          "required": ["file"],
          "properties": {
            "file": {
              "type": "string",
              "format": "binary",
              "description": "a digit image (PNG, JPEG, ...; any size, either polarity):"
              " made MNIST-like as `pixelrnn-jax predict` does",
            },
            "model": {"type": "string", "description": "a loaded model's name"},
          },
        }
      },
      "application/json": {
        "schema": {
          "type": "object",
          "required": ["pixels"],
          "properties": {
            "pixels": _PIXELS_SCHEMA,
            "model": {"type": "string", "description": "a loaded model's name"},
          },
        }
      },
    },
  },
  "responses": {
    "200": {
      "description": "the answer, and every class's probability after every pixel read",
      "content": {
        "application/json": {
          "schema": {
            "type": "object",
            "properties": {
              "label": {"type": "integer"},
              "probability": {"type": "number"},
              "top3": {
                "type": "array",
                "items": {
                  "type": "object",
                  "properties": {"label": {"type": "integer"}, "probability": {"type": "number"}},
                },
              },
              "probabilities": {
                "type": "array",
                "description": "[784][10]: after the i-th pixel read, in reading order",
                "items": {"type": "array", "items": {"type": "number"}},
              },
              "pixels": _PIXELS_SCHEMA | {"description": "the 28x28 image the model read"},
              "pixels_read": {"type": "integer", "description": "784, or fewer on early exit"},
              "order": {
                "type": "array",
                "items": {"type": "integer"},
                "description": "the 784 row-major pixel indices in the order read",
              },
              "model": {"type": "string"},
              "warning": {
                "type": "string",
                "description": "an upload that looks like several digits side by side"
                " (a number), read as one digit; absent otherwise",
              },
            },
          }
        }
      },
    },
  },
}


# ---------------------------------------------------------------------------- the app


def make_app(
  served: list[models_lib.ServedModel],
  *,
  max_upload_mb: float = MAX_UPLOAD_MB,
  workers: int = WORKERS,
  max_batch: int = MAX_BATCH,
  pool: WorkerProcesses | None = None,
) -> FastAPI:
  """The application answering with ``served`` (the first is the default model).

  Args:
    served: loaded models (``models.load_all``), names unique.
    max_upload_mb: bodies larger than this get 413 before they are parsed.
    workers: batches answered at once; more requests wait in arrival order.
    max_batch: waiting requests a free worker takes at once (1: one at a time).
    pool: answer in these worker processes (:class:`WorkerProcesses` of the
      same sources; started here if not yet, stopped at shutdown); None:
      in threads of this process, with ``served``.

  Raises:
    ValueError: no models, ``max_upload_mb`` not positive, or ``workers`` or
      ``max_batch`` below 1.
  """
  if not served:
    raise ValueError("serve needs at least one model")
  # python-multipart logs each malformed body it meets ("Did not find CR at end of
  # boundary") as a WARNING on the server's console; the client gets the 400 already.
  logging.getLogger("python_multipart").setLevel(logging.ERROR)
  for flag, value in (("--workers", workers), ("--max-batch", max_batch)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{flag} {value!r}: expected a whole number >= 1")
  if not (max_upload_mb > 0 and math.isfinite(max_upload_mb)):
    raise ValueError(f"--max-upload-mb {max_upload_mb}: expected a positive, finite size in MB")
  by_name = {model.name: model for model in served}
  limit = int(max_upload_mb * 2**20)

  @contextlib.asynccontextmanager
  async def lifespan(app: FastAPI):
    if pool is not None:  # the worker process answers with the models it loaded
      app.state.batches = Batches(
        lambda jobs: pool.run(_answer_jobs, None, jobs), workers, max_batch
      )
    else:
      app.state.batches = Batches(
        lambda jobs: run_in_threadpool(_answer_jobs, served, jobs), workers, max_batch
      )
    if pool is not None and not pool.started:
      await asyncio.get_running_loop().run_in_executor(None, pool.start)
    elif pool is None:
      await run_in_threadpool(warm_up_reader)
    try:
      yield
    finally:
      app.state.batches.close()
      if pool is not None:  # requests are answered or cancelled by now: nothing to wait for
        pool.kill(wait=True)

  app = FastAPI(
    title="pixelrnn-jax",
    summary="A GRU that reads a 28x28 digit one pixel at a time, and its answer after each",
    version=_version(),
    lifespan=lifespan,
    docs_url=None,  # served below, without a CDN
    swagger_ui_oauth2_redirect_url=None,
    redoc_url=None,  # ReDoc has no offline bundle here
  )
  app.state.models = by_name
  app.add_middleware(HeadAsGet)

  # Errors: always {"error": "..."}, never a traceback in the body.
  @app.exception_handler(RequestError)
  async def request_error(request: Request, error: RequestError) -> JSONResponse:
    del request
    return JSONResponse({"error": error.message}, status_code=error.status)

  @app.exception_handler(HTTPException)
  async def http_error(request: Request, error: HTTPException) -> JSONResponse:
    where = f"{request.method} {request.url.path}"
    message = str(error.detail)
    if error.status_code == 405:
      allowed = (error.headers or {}).get("Allow", "another method")
      message = f"{where}: method not allowed; use {allowed} (the API: /docs)"
    elif error.status_code == 404:
      message = f"{where}: no such page; the page is /, the API /api/predict (see /docs)"
    return JSONResponse({"error": message}, status_code=error.status_code, headers=error.headers)

  @app.exception_handler(WorkerError)
  async def worker_error(request: Request, error: WorkerError) -> JSONResponse:
    del request
    return JSONResponse(
      {"error": f"internal server error ({error.kind}); see the server's log"}, status_code=500
    )

  @app.exception_handler(RequestValidationError)
  async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    del request
    return JSONResponse({"error": f"invalid request: {error.errors()}"}, status_code=422)

  @app.exception_handler(Exception)
  async def server_error(request: Request, error: Exception) -> JSONResponse:
    # The traceback goes to the server's log, where the operator looks; the client
    # gets the exception's type only (its text may hold paths or data).
    log.error("%s %s failed", request.method, request.url.path, exc_info=error)
    return JSONResponse(
      {"error": f"internal server error ({type(error).__name__}); see the server's log"},
      status_code=500,
    )

  app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
  # /docs: FastAPI's Swagger UI page with Swagger UI's files served from here
  # (fastapi-swagger), where FastAPI's own would load them from a CDN.
  fastapi_swagger.patch_fastapi(app, redirect_from_root_to_docs=False, title=f"{app.title} API")

  @app.get("/", include_in_schema=False)
  async def page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

  @app.get("/healthz", summary="liveness: answers while predictions queue")
  async def healthz() -> dict[str, str]:
    return {"status": "ok"}

  @app.get("/api/models", summary="the loaded models with their cards; the first is the default")
  async def list_models() -> dict[str, Any]:
    return {"default": served[0].name, "models": [model.describe() for model in served]}

  @app.post(
    "/api/predict",
    summary="classify one digit: an image file (multipart field `file`) or JSON pixels",
    openapi_extra=_predict_docs([model.name for model in served], limit),
    response_class=Response,
  )
  async def predict(request: Request) -> Response:
    body = await _read_body(request, limit)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
      upload, model_name = await _read_form(request, body)
      if model_name is None:
        model_name = request.query_params.get("model")
      model = _choose(by_name, model_name, served)
      data = await upload.read()
      job = (_read_upload, (model.name, data, upload.filename or "", upload.content_type or ""))
    elif kind == "application/json" or kind.endswith("+json"):
      job = (_read_json, (body, request.query_params.get("model")))
    else:
      raise _unsupported_type(kind)
    return Response(await app.state.batches.submit(job), media_type="application/json")

  return app


class HeadAsGet:
  """ASGI middleware: a HEAD request is answered as its GET, without the body (RFC 9110,
  9.3.2). Health and link checkers send HEAD; FastAPI's GET routes answer it 405."""

  def __init__(self, app):
    self.app = app

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http" or scope["method"] != "HEAD":
      await self.app(scope, receive, send)
      return

    async def headers_only(message):
      if message["type"] == "http.response.body":
        message = {**message, "body": b""}
      await send(message)

    await self.app({**scope, "method": "GET"}, receive, headers_only)


def _version() -> str:
  from pixelrnn_jax import __version__  # noqa: PLC0415 (the package's __init__ imports JAX)

  return __version__


# ---------------------------------------------------------------------------- reading requests


async def _read_body(request: Request, limit: int) -> bytes:
  """The whole body, refused (413) as soon as it passes ``limit`` bytes, so a large or
  endless upload is never held in memory; refused (400) when empty."""
  declared = request.headers.get("content-length", "")
  kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
  if declared.isdigit() and int(declared) > limit:
    raise RequestError(413, _too_large(int(declared), limit, kind=kind))
  chunks, size = [], 0
  try:
    async for chunk in request.stream():
      size += len(chunk)
      if size > limit:
        raise RequestError(413, _too_large(size, limit, at_least=True, kind=kind))
      chunks.append(chunk)
  except ClientDisconnect as error:  # nobody to answer: no log, no traceback
    raise RequestError(400, "the client disconnected before sending its whole body") from error
  if size == 0:
    raise RequestError(
      400,
      "empty body: send an image file (multipart field 'file') or JSON"
      ' {"pixels": [[...28 rows of 28 values in [0, 1]...]]}',
    )
  return b"".join(chunks)


def _unsupported_type(kind: str) -> RequestError:
  return RequestError(
    415,
    f"content type {kind or '(none)'}: send an image as multipart/form-data (field 'file')"
    ' or JSON {"pixels": [[...28 rows of 28 values in [0, 1]...]]}',
  )


def _unknown_model(name: str, loaded) -> RequestError:
  close = [known for known in loaded if known.lower() == name.lower()]
  close = close or difflib.get_close_matches(name, list(loaded), n=1, cutoff=0.6)
  hint = f"; did you mean {close[0]!r}?" if close else ""
  return RequestError(400, f"unknown model {name!r}{hint} (loaded: {', '.join(loaded)})")


def _megabytes(size: int) -> str:
  """A byte count in MB as people write it: 0.0098, 2.5, 95,367 (never 9.54e+04)."""
  mb = size / 2**20
  if mb >= 100:
    return f"{mb:,.0f}"
  return f"{mb:.3g}" if mb >= 1 else f"{mb:.4f}".rstrip("0").rstrip(".")


def _too_large(size: int, limit: int, *, at_least: bool = False, kind: str = "") -> str:
  more = "at least " if at_least else ""
  advice = (
    "28 rows of 28 pixels take about 5 KB of JSON"
    if kind == "application/json"
    else "scale the image down"
  )
  return (
    f"body of {more}{_megabytes(size)} MB is over the {_megabytes(limit)} MB upload limit"
    f" (--max-upload-mb); a digit needs far less: {advice}"
  )


async def _read_form(request: Request, body: bytes) -> tuple[UploadFile, str | None]:
  """The upload and the optional model name of a multipart body (already read)."""
  sent = False

  async def receive() -> dict[str, Any]:
    nonlocal sent
    if sent:
      return {"type": "http.disconnect"}
    sent = True
    return {"type": "http.request", "body": body, "more_body": False}

  try:
    form = await Request(request.scope, receive).form(max_files=1, max_fields=4)
  except HTTPException as error:  # Starlette's text for a multipart body it refuses
    raise RequestError(400, _multipart_refused(str(error.detail))) from error
  upload, model_name = form.get("file"), form.get("model")
  if isinstance(upload, str):  # e.g. curl -F 'file=<seven.png': the bytes as a text field
    raise RequestError(
      400,
      "multipart field 'file' is text, not a file: send the image as a file part"
      " (curl -F file=@seven.png)",
    )
  if not isinstance(upload, UploadFile):
    closing = _closing_delimiter(request.headers.get("content-type", ""))
    if closing and closing not in body:  # a part is only kept once the next delimiter comes
      raise RequestError(
        400,
        f"multipart body of {len(body):,} bytes ends before its closing delimiter"
        f" {closing.decode('latin-1')!r}: it was cut short (a dropped connection or a"
        " Content-Length smaller than the body?); send the whole file again",
      )
    fields = ", ".join(sorted(form.keys())) or "none"
    raise RequestError(400, f"multipart body without a file in field 'file' (fields: {fields})")
  if model_name is not None and not isinstance(model_name, str):
    raise RequestError(400, "multipart field 'model' must be text, a loaded model's name")
  _check_keys("multipart field", list(form.keys()), FORM_FIELDS)
  if len(form.getlist("model")) > 1:
    raise RequestError(400, "multipart field 'model' is given more than once: give it once")
  return upload, model_name


FORM_FIELDS = ("file", "model")  # what a multipart body may hold
JSON_KEYS = ("pixels", "model")  # what a JSON body may hold


def _check_keys(what: str, keys: list[str], known: tuple[str, ...], status: int = 400) -> None:
  """Refuses (``status``) a field or key the API does not take (a misspelt 'model' would
  otherwise be ignored, and the default model answer), naming the closest known one."""
  for key in keys:
    if key not in known:
      close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
      hint = f": did you mean {close[0]!r}?" if close else ""
      raise RequestError(
        status,
        f"{what} {_short(key)} is not one the API takes{hint} (it takes {', '.join(known)})",
      )


def _multipart_refused(detail: str) -> str:
  """Starlette's reason for refusing a multipart body, with what to send instead."""
  build = "let the HTTP client build the body (curl -F file=@digit.png)"
  if detail.startswith("Too many files"):
    return "multipart body with more than one file: send one image, in field 'file'"
  if detail.startswith("Too many fields"):
    return "multipart body with too many fields: send field 'file' and, if need be, 'model'"
  if "boundary" in detail.lower():
    return f"multipart/form-data without its boundary=... in Content-Type: {build}"
  return f"malformed multipart body ({detail.rstrip('.')}): {build}"


def _closing_delimiter(content_type: str) -> bytes | None:
  """``--BOUNDARY--``, the line that ends a multipart body (RFC 2046, 5.1.1), or None."""
  _, options = python_multipart.multipart.parse_options_header(content_type)
  boundary = options.get(b"boundary")
  return b"--" + boundary + b"--" if boundary else None


def _choose(
  by_name: dict[str, models_lib.ServedModel],
  name: str | None,
  served: list[models_lib.ServedModel],
) -> models_lib.ServedModel:
  if name is None:
    return served[0]
  if name == "":
    raise RequestError(
      400, f"model is empty: give a loaded model's name ({', '.join(by_name)}) or leave it out"
    )
  if name not in by_name:
    raise _unknown_model(name, by_name)
  return by_name[name]


# ---------------------------------------------------------------------------- batches


class Batches:
  """Requests waiting for a worker, answered in arrival order, several at a time.

  At most ``workers`` batches are in flight. A request that finds a worker
  free goes at once, alone (nothing waits for a batch to fill); requests
  that arrive while every worker is busy wait in one FIFO queue, and the
  next free worker takes up to ``max_batch`` of them. ``answer(jobs)`` is
  awaited per batch and returns one result per job: the answer's bytes, or
  the exception to raise for that request alone; if it raises, every
  request of the batch gets that error.
  """

  def __init__(self, answer, workers: int, max_batch: int):
    self._answer, self._free, self._max_batch = answer, workers, max_batch
    self._waiting: collections.deque = collections.deque()
    self._running: dict[asyncio.Task, list] = {}  # batches in flight (held: tasks are weak)
    self._loop: asyncio.AbstractEventLoop | None = None
    self._closed = False

  async def submit(self, job) -> bytes:
    """The bytes answering ``job``, once a worker has answered its batch.

    Raises:
      RequestError, WorkerError: this request's; or the batch's error; 503 once
        the server is stopping.
    """
    if self._closed:
      raise _stopping()
    self._loop = asyncio.get_running_loop()
    future = self._loop.create_future()
    self._waiting.append((job, future))
    self._dispatch()
    return await future  # a client that disconnects cancels it: it is skipped

  def stop_soon(self, grace_s: float) -> None:
    """From a signal handler: the server is stopping. Requests still waiting get a
    503 now; those being answered get ``grace_s`` seconds, then a 503 (before the
    server cancels them, which would answer a plain-text 500)."""
    if self._loop is not None and not self._loop.is_closed():
      self._loop.call_soon_threadsafe(self.close, grace_s)

  def close(self, grace_s: float = 0.0) -> None:
    """Refuses new requests and fails waiting ones (503); in-flight ones after ``grace_s``."""
    self._closed = True
    while self._waiting:
      _, future = self._waiting.popleft()
      if not future.done():
        future.set_exception(_stopping())
    if grace_s > 0:
      asyncio.get_running_loop().call_later(grace_s, self._fail_running)
    else:
      self._fail_running()

  def _fail_running(self) -> None:
    for batch in self._running.values():
      for _, future in batch:
        if not future.done():
          future.set_exception(_stopping())

  def _dispatch(self) -> None:
    while self._free and self._waiting:
      batch = []
      while self._waiting and len(batch) < self._max_batch:
        job, future = self._waiting.popleft()
        if not future.done():
          batch.append((job, future))
      if batch:
        self._free -= 1
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._running[task] = batch
        task.add_done_callback(self._running.pop)

  async def _run(self, batch: list) -> None:
    try:
      results = await self._answer([job for job, _ in batch])
      if len(results) != len(batch):  # never leave a request waiting for ever
        raise RuntimeError(f"{len(results)} answers for a batch of {len(batch)}")
    except Exception as error:  # noqa: BLE001 (every request of the batch gets it)
      results = [error] * len(batch)
    finally:
      self._free += 1
    for (_, future), result in zip(batch, results, strict=True):
      if future.done():  # its client went away
        continue
      if isinstance(result, RequestError):  # one instance per request (tracebacks)
        future.set_exception(RequestError(result.status, result.message))
      elif isinstance(result, BaseException):
        future.set_exception(result)
      else:
        future.set_result(result)
    self._dispatch()


def _stopping() -> RequestError:
  return RequestError(503, "the server is stopping; send the request again once it is back")


# ---------------------------------------------------------------------------- worker processes

# A worker process's models, the default first, loaded by its initializer.
_MODELS: list[models_lib.ServedModel] = []


class WorkerProcesses:
  """``processes`` spawned worker processes, each with the models of ``sources`` loaded.

  Each worker is its own one-process executor, and a request goes to a free
  worker (in arrival order), so a worker that dies fails only the request it
  was answering (503, at once) and only that worker is started again, while
  the others keep answering. ``start`` blocks until every worker has loaded
  and warmed up its models; ``run`` is awaitable; ``stop`` ends the workers
  and ``kill`` kills them (for a stop during ``start``).
  """

  def __init__(self, sources: list[str], processes: int):
    self.sources, self.processes = list(sources), processes
    self._workers: list[concurrent.futures.ProcessPoolExecutor] = []
    self._free: asyncio.Queue[int] | None = None  # made on the server's loop

  @property
  def started(self) -> bool:
    return bool(self._workers)

  def start(self) -> None:
    workers = [self._spawn() for _ in range(self.processes)]
    self._workers = workers
    for worker in workers:  # the processes load in parallel; wait for all
      worker.submit(os.getpid).result()

  def _spawn(self) -> concurrent.futures.ProcessPoolExecutor:
    """One worker process, started now. SIGINT is blocked while it starts, and the
    child inherits the mask: a Ctrl-C at the terminal (sent to the whole process
    group) is the server's to handle, never a traceback from a half-started worker."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
      worker = concurrent.futures.ProcessPoolExecutor(
        1,
        mp_context=multiprocessing.get_context("spawn"),  # no fork of a process running JAX
        initializer=_start_worker,
        initargs=(self.sources,),
      )
      worker.submit(int)  # starts the process (executors start theirs on demand)
    finally:
      signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    return worker

  async def run(self, function, *args):
    if self._free is None:
      self._free = asyncio.Queue()
      for index in range(len(self._workers)):
        self._free.put_nowait(index)
    loop = asyncio.get_running_loop()
    while True:
      index = await self._free.get()
      worker = self._workers[index]
      try:
        future = loop.run_in_executor(worker, function, *args)
        break
      except concurrent.futures.process.BrokenProcessPool:  # it died while idle
        log.error("worker process %d died; starting it again", index)
        loop.create_task(self._replace(index, worker))  # and ask another
    try:
      result = await future
    except concurrent.futures.process.BrokenProcessPool as error:
      log.error("worker process %d died while answering; starting it again", index)
      loop.create_task(self._replace(index, worker))
      raise RequestError(
        503, "a worker process died while answering (out of memory?); send the request again"
      ) from error
    self._free.put_nowait(index)
    return result

  async def _replace(self, index: int, broken) -> None:
    """Starts worker ``index`` again (seconds: imports and models), then frees it."""
    broken.shutdown(wait=False, cancel_futures=True)
    loop = asyncio.get_running_loop()
    worker = await loop.run_in_executor(None, self._spawn)
    await loop.run_in_executor(None, lambda: worker.submit(os.getpid).result())
    self._workers[index] = worker
    self._free.put_nowait(index)

  def stop(self) -> None:
    workers, self._workers = self._workers, []
    for worker in workers:
      worker.shutdown(wait=True, cancel_futures=True)

  def kill(self, *, wait: bool = False) -> None:
    """Kills every worker process (also half-started ones), then stops; ``wait``: until
    the pools have noticed and released their queues (no leaked semaphores at exit)."""
    for child in multiprocessing.active_children():
      child.kill()
    workers, self._workers = self._workers, []
    for worker in workers:
      worker.shutdown(wait=wait, cancel_futures=True)


def _start_worker(sources: list[str]) -> None:
  """A worker process's initializer: Ctrl-C is the server's to handle (ignored, then
  unblocked: see ``WorkerProcesses._spawn``); load the models and warm up."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
  _die_with_parent()
  _MODELS[:] = models_lib.load_all(sources)
  warm_up_reader()


def warm_up_reader() -> None:
  """Reads one small drawn digit, so that the first request does not wait for the image
  libraries to import (Pillow, SciPy, scikit-image: about a second)."""
  from PIL import Image  # noqa: PLC0415 (as image_pixels)
  from PIL import ImageDraw  # noqa: PLC0415

  image = Image.new("L", (56, 56), 0)
  ImageDraw.Draw(image).line([(14, 10), (42, 10), (24, 48)], fill=255, width=4)
  buffer = io.BytesIO()
  image.save(buffer, "PNG")
  image_pixels(buffer.getvalue(), "warm-up.png")


def _die_with_parent() -> None:
  """Linux: the kernel sends SIGTERM to this process when the server's process ends,
  even by SIGKILL, so no worker outlives it (elsewhere the pool's shutdown does it)."""
  try:
    import ctypes  # noqa: PLC0415 (Linux only)

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass  # not Linux: the pool's shutdown ends the workers


def _model(served: list[models_lib.ServedModel] | None, name: str | None):
  """The model ``name`` of ``served`` (None: this worker process's models)."""
  served = _MODELS if served is None else served
  return _choose({model.name: model for model in served}, name, served)


# ---------------------------------------------------------------------------- answering (workers)


def _answer_jobs(served, jobs: list) -> list[bytes | Exception]:
  """Answers a batch of requests: each job ``(read, args)`` is read to (model, pixels)
  by ``read(served, *args)``, then one jitted pass per model answers its images.

  Returns:
    Per job, in order: the answer's JSON bytes, its RequestError (bad input),
    or a WorkerError (an unexpected exception, logged here with its traceback).
  """
  results: list[bytes | Exception | None] = [None] * len(jobs)
  by_model: dict[str, tuple[models_lib.ServedModel, list[tuple[int, np.ndarray]]]] = {}
  for index, (read, args) in enumerate(jobs):
    try:
      model, pixels, *notes = read(served, *args)  # an upload adds its notes (a warning)
    except RequestError as error:
      results[index] = error
    except Exception as error:
      log.error("reading a request failed", exc_info=error)
      results[index] = WorkerError(type(error).__name__)
    else:
      by_model.setdefault(model.name, (model, []))[1].append((index, pixels, *notes))
  for model, items in by_model.values():
    answers = model.answer_batch(np.stack([item[1] for item in items]))
    for (index, _, *notes), answer in zip(items, answers, strict=True):
      results[index] = _encode(answer | (notes[0] if notes else {}))
  return results


def _read_upload(served, name: str, data: bytes, filename: str, kind: str):
  """An uploaded image through ``pixelrnn-jax predict``'s reader: (model ``name``, pixels,
  notes), the notes holding ``predict``'s warning of a number, if any."""
  digit = image_digit(data, filename, kind)
  warning = images.number_warning(digit)
  return _model(served, name), digit.pixels, {"warning": warning} if warning else {}


def image_pixels(data: bytes, filename: str = "", content_type: str = "") -> np.ndarray:
  """<float32>[28, 28] in [0, 1]: :func:`image_digit`'s pixels."""
  return image_digit(data, filename, content_type).pixels


def image_digit(data: bytes, filename: str = "", content_type: str = "") -> images.Digit:
  """An uploaded image's bytes as the model sees them, as ``pixelrnn-jax predict`` reads files.

  The bytes go through ``images.read_image`` (which takes a path: a temporary
  file with the upload's suffix) and ``images.prepare``.

  Args:
    data: the file's bytes.
    filename: the upload's name, for its suffix and the error messages.
    content_type: the upload's type, for a suffix when the name has none.

  Returns:
    An ``images.Digit``: pixels <float32>[28, 28] in [0, 1], white digit on black,
    and ``pieces`` (2+: a number).

  Raises:
    RequestError: empty (400), not an image (400), too many pixels (413), no digit (422).
  """
  name = Path(filename).name or "upload"
  if not data:
    raise RequestError(400, f"{name}: empty file")
  suffix = Path(name).suffix.lower()[:8]
  if not suffix:  # the reader goes by the suffix; Pillow then goes by the bytes
    suffix = mimetypes.guess_extension(content_type.split(";")[0].strip()) or ".png"

  with tempfile.TemporaryDirectory(prefix="pixelrnn-serve-") as directory:
    path = os.path.join(directory, "upload" + suffix)
    with open(path, "wb") as file:
      file.write(data)
    try:
      grey = images.read_image(path)
    except images.ImageError as error:  # names the file: ours, renamed as the upload
      status = 413 if isinstance(error, images.ImageTooLarge) else 400
      raise RequestError(status, str(error).replace(path, name)) from error
  try:
    return images.prepare(grey)
  except images.ImageError as error:  # read, but no digit in it (no ink, specks)
    raise RequestError(422, f"{name}: {error}") from error


def _read_json(served, body: bytes, query_model: str | None):
  """A JSON body ``{"pixels": [[...]], "model": NAME}``, checked: (model, pixels)."""
  try:
    payload = json.loads(body)
  except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
    if "integer string conversion" in str(error):  # Python's advice is for servers, not clients
      raise RequestError(
        422,
        f"body holds an integer of more than {sys.get_int_max_str_digits():,} digits;"
        " pixel values are numbers in [0, 1]",
      ) from error
    raise RequestError(400, f"body is not valid JSON ({error})") from error
  if not isinstance(payload, dict):
    raise RequestError(422, f'JSON body is {_a(payload)}; expected an object {{"pixels": [[...]]}}')
  name = payload.get("model", query_model)
  if name is not None and not isinstance(name, str):
    raise RequestError(422, f"model must be a string, a loaded model's name (got {_short(name)})")
  model = _model(served, name)
  if "pixels" not in payload:
    raise RequestError(422, f"JSON body has no 'pixels' (keys: {', '.join(payload) or 'none'})")
  _check_keys("JSON key", list(payload), JSON_KEYS, status=422)
  return model, check_pixels(payload["pixels"])


def check_pixels(pixels: Any) -> np.ndarray:
  """JSON pixels as <float32>[28, 28], used as given once checked.

  Raises:
    RequestError (422): not 28 lists of 28 numbers, or a value not finite or
      outside [0, 1] (integers of any size, NaN and infinities included).
  """
  if isinstance(pixels, list) and pixels and all(_is_number(v) for v in pixels):
    raise RequestError(
      422,
      f"pixels is a flat list of {len(pixels)} values; expected {SIZE} rows of {SIZE} (a list"
      f" of {SIZE} lists: [[row 0], [row 1], ...])",
    )
  if not isinstance(pixels, list) or len(pixels) != SIZE:
    what = _count(len(pixels), "row") if isinstance(pixels, list) else _a(pixels)
    raise RequestError(422, f"pixels is {what}; expected {SIZE} rows of {SIZE} values in [0, 1]")
  for r, row in enumerate(pixels):
    if not isinstance(row, list) or len(row) != SIZE:
      what = f"has {_count(len(row), 'value')}" if isinstance(row, list) else f"is {_a(row)}"
      raise RequestError(422, f"pixels row {r} {what}; expected {SIZE} values in [0, 1]")
    for c, value in enumerate(row):
      if not _is_number(value):
        raise RequestError(422, f"pixels[{r}][{c}] is {_a(value)}; expected a number in [0, 1]")
      if not 0 <= value <= 1:  # also NaN, infinities and integers too large for a float
        hint = "; for 0..255 values, divide each by 255" if 1 < value <= 255 else ""
        raise RequestError(
          422, f"pixels[{r}][{c}] = {_short(value)}; expected a number in [0, 1]{hint}"
        )
  array = np.asarray(pixels, np.float32)
  if array.max() - array.min() < images.MIN_CONTRAST:  # the same bar as an image's ink
    raise RequestError(
      422,
      f"no ink: every pixel is within {images.MIN_CONTRAST} of {array.min():.2f}; draw a"
      " digit (white on black, values in [0, 1])",
    )
  return array


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _a(value: Any) -> str:
  """``a list``, ``an int``, ``a string 'x'``: a JSON value's kind, for an error."""
  if isinstance(value, str):
    return f"a string {_short(value)}"
  kind = {dict: "object", type(None): "null", bool: "boolean"}.get(type(value))
  kind = kind or type(value).__name__
  return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def _count(n: int, noun: str) -> str:
  return f"{n} {noun}{'' if n == 1 else 's'}"


def _short(value: Any) -> str:
  """``repr(value)``, at most 40 characters (a 400-digit integer is not repeated)."""
  text = repr(value)
  return text if len(text) <= 40 else f"{text[:37]}..."


def _encode(answer: dict[str, Any]) -> bytes:
  """Compact JSON bytes, made in the worker (orjson: 0.2 ms for 7,840 probabilities,
  where the standard library's json took 9 ms holding the GIL). NumPy float32 arrays
  are written in their shortest float32 form (0.12346, not 0.12346000224351883):
  half the bytes to send and parse."""
  return orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY)
