"""``pixelrnn-jax serve``: the JSON API (answers, every bad input, concurrency), the
command (start line, busy port, Ctrl-C / SIGTERM, missing extra) and the page in a real
headless Chromium.

Needs the ``serve`` extra (skipped without it); the browser test also needs
``/usr/bin/chromium`` and the ``browser`` extra (playwright). With
``PIXELRNN_JAX_CI=1`` nothing is skipped: a missing piece fails.
"""

import concurrent.futures
import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

CI = os.environ.get("PIXELRNN_JAX_CI") == "1"
if not CI:
  pytest.importorskip("fastapi", reason="needs the serve extra: pip install -e '.[serve]'")
  pytest.importorskip("httpx", reason="needs the serve extra: pip install -e '.[serve]'")

import httpx  # noqa: E402

with warnings.catch_warnings():  # Starlette 1.x would rather have httpx2; httpx still works
  warnings.simplefilter("ignore")
  from fastapi.testclient import TestClient
from PIL import Image  # noqa: E402
from PIL import ImageDraw  # noqa: E402

from pixelrnn_jax import preprocessing  # noqa: E402
from pixelrnn_jax.serve import app as app_lib  # noqa: E402
from pixelrnn_jax.serve import models as models_lib  # noqa: E402
from tests import helpers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SEVEN = ROOT / "examples" / "seven.png"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--no-first-run",
]
# Digits drawn as a user would on the page's 280x280 canvas: white strokes, 20 px wide.
STROKES = {
  0: [[(140, 40), (200, 80), (215, 140), (200, 200), (140, 240), (80, 200), (65, 140), (80, 80)]]
  + [[(80, 80), (140, 40)]],
  1: [[(140, 40), (140, 240)]],
  2: [[(80, 90), (120, 50), (180, 55), (200, 100), (170, 150), (80, 230), (210, 230)]],
  3: [[(80, 60), (190, 60), (130, 130), (200, 180), (140, 235), (80, 215)]],
  4: [[(170, 40), (70, 170), (220, 170)], [(170, 40), (170, 245)]],
  7: [[(70, 55), (210, 55), (120, 240)]],
}


def drawn_png(digit: int, *, size: int = 280) -> bytes:
  image = Image.new("L", (size, size), 0)
  pen = ImageDraw.Draw(image)
  for stroke in STROKES[digit]:
    pen.line(
      [(x * size / 280, y * size / 280) for x, y in stroke], fill=255, width=20, joint="curve"
    )
  out = io.BytesIO()
  image.save(out, "PNG")
  return out.getvalue()


GRID_FOUR = np.zeros((28, 28), np.float32)
GRID_FOUR[4:24, 10:14] = 1.0  # a stroke: enough ink to pass the contrast check
NPY_HUGE = helpers.npy_claiming((200_000, 200_000))  # 298 GiB claimed in 128 bytes


@pytest.fixture(scope="module")
def served():
  return models_lib.load_all(["pretrained:pixel", "pretrained:permuted"])


@pytest.fixture(scope="module")
def client(served):
  with TestClient(app_lib.make_app(served)) as client:
    yield client


def upload(client, data: bytes, name: str = "digit.png", kind: str = "image/png", **fields):
  return client.post("/api/predict", files={"file": (name, data, kind)}, data=fields)


# ---------------------------------------------------------------------------- answers


def test_an_uploaded_seven_is_read_as_seven_with_every_step(client):
  response = upload(client, SEVEN.read_bytes(), "seven.png")
  assert response.status_code == 200, response.text
  body = response.json()
  assert body["label"] == 7 and body["model"] == "pixel"
  assert body["top3"][0] == {"label": 7, "probability": body["probability"]}
  assert [t["probability"] for t in body["top3"]] == sorted(
    (t["probability"] for t in body["top3"]), reverse=True
  )
  probabilities = np.array(body["probabilities"])
  assert probabilities.shape == (784, 10)
  np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-4)
  assert probabilities[-1].argmax() == 7
  assert np.array(body["pixels"]).shape == (28, 28)
  # Every step's probabilities come back, wherever the card's early-exit rule stopped.
  assert 1 <= body["pixels_read"] <= 784
  assert probabilities[body["pixels_read"] - 1].argmax() == 7
  assert body["order"] == list(range(784))
  # docs/serve.md shows this answer: its numbers are this one's (they had drifted).
  shown = (ROOT / "docs" / "serve.md").read_text().split("/api/predict | head", 1)[1]
  assert f'"pixels_read": {body["pixels_read"]},' in shown
  for top in body["top3"]:
    assert f'{{"label": {top["label"]}, "probability": {str(top["probability"])[:7]}...}}' in shown


def test_the_upload_is_read_as_the_predict_command_reads_the_file(client, served):
  from pixelrnn_jax import images

  expected = images.prepare(images.read_image(SEVEN)).pixels
  body = upload(client, SEVEN.read_bytes(), "seven.png").json()
  np.testing.assert_allclose(np.array(body["pixels"]), expected, atol=1e-4)


def test_an_upload_of_a_number_answers_with_predict_s_warning(client):
  """Two drawn digits side by side: one answer, and the warning ``predict`` prints."""
  from pixelrnn_jax import images

  pair = np.concatenate([np.asarray(Image.open(io.BytesIO(drawn_png(d)))) for d in (1, 7)], axis=1)
  out = io.BytesIO()
  Image.fromarray(pair).save(out, "PNG")
  body = upload(client, out.getvalue(), "17.png").json()
  digit = images.prepare(pair)
  assert digit.pieces == 2 and body["warning"] == images.number_warning(digit)
  assert "warning" not in upload(client, drawn_png(7), "7.png").json()


@pytest.mark.parametrize("digit", sorted(STROKES))
def test_drawn_digits_are_read_as_their_labels_by_both_models(client, digit):
  for model in ("pixel", "permuted"):
    body = upload(client, drawn_png(digit), model=model).json()
    assert (body["label"], body["model"]) == (digit, model)


def test_json_pixels_are_used_as_given_and_the_permuted_model_returns_its_order(client, served):
  pixels = np.array(upload(client, drawn_png(4)).json()["pixels"])
  response = client.post("/api/predict", json={"pixels": pixels.tolist(), "model": "permuted"})
  body = response.json()
  assert response.status_code == 200 and body["label"] == 4
  assert body["order"] == preprocessing.permutation().tolist()
  np.testing.assert_allclose(np.array(body["pixels"]), pixels, atol=1e-4)
  direct = served[1].answer(pixels.astype(np.float32))
  np.testing.assert_allclose(body["probabilities"], direct["probabilities"], atol=1e-5)


@pytest.mark.parametrize(
  "path, status, kind",
  [
    ("/", 200, "text/html"),
    ("/healthz", 200, "application/json"),
    ("/api/models", 200, "application/json"),
    ("/static/app.js", 200, "javascript"),
    ("/nope", 404, "application/json"),
  ],
)
def test_head_is_answered_as_get_without_the_body(client, path, status, kind):
  """Health and link checkers send HEAD (before: 405 on every page but /static)."""
  response = client.head(path)
  get = client.get(path)
  assert (response.status_code, get.status_code) == (status, status)
  assert kind in response.headers["content-type"] and response.content == b""
  assert response.headers.get("content-length") == get.headers.get("content-length")


def test_models_health_page_and_openapi(client):
  assert client.get("/healthz").json() == {"status": "ok"}
  listing = client.get("/api/models").json()
  assert listing["default"] == "pixel"
  assert [(m["name"], m["source"], m["order"]) for m in listing["models"]] == [
    ("pixel", "pretrained:pixel", "pixel"),
    ("permuted", "pretrained:permuted", "permuted"),
  ]
  assert listing["models"][0]["valid_accuracy"] == listing["models"][0]["card"]["valid_accuracy"]
  first = listing["models"][0]
  assert first["early_exit_threshold"] == first["card"]["early_exit"]["threshold"]
  assert first["calibrated"] is True
  page = client.get("/")
  assert page.status_code == 200 and 'id="canvas"' in page.text
  assert "http" not in re.sub(r'href="/[^"]*"', "", page.text)  # nothing from the internet
  for name in ("app.js", "style.css"):
    assert client.get(f"/static/{name}").status_code == 200
  schema = client.get("/openapi.json").json()
  content = schema["paths"]["/api/predict"]["post"]["requestBody"]["content"]
  assert set(content) == {"multipart/form-data", "application/json"}
  # /docs's "Try it out" fills each field from the schema: the model field offers the
  # loaded names, the first by default (it sent the placeholder "string" before).
  for kind in content.values():
    field = kind["schema"]["properties"]["model"]
    assert field["enum"] == ["pixel", "permuted"] and field["default"] == "pixel"
  tried = client.post(
    "/api/predict",
    files={"file": ("seven.png", SEVEN.read_bytes(), "image/png")},
    data={"model": content["multipart/form-data"]["schema"]["properties"]["model"]["default"]},
  )
  assert tried.status_code == 200 and tried.json()["label"] == 7
  docs = client.get("/docs")
  assert docs.status_code == 200 and "SwaggerUIBundle" in docs.text
  # Offline: every script, style sheet and icon of the docs page comes from this server.
  linked = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", docs.text)
  assert linked and all(url.startswith(str(client.base_url)) for url in linked), linked
  for url in linked:
    assert client.get(url).status_code == 200, url
  assert client.get("/redoc").status_code == 404  # ReDoc only comes from a CDN: not offered


def test_each_documented_error_example_is_what_the_server_answers(client):
  """/docs showed one example message ("unknown model 'x'") for every error status."""
  responses = client.get("/openapi.json").json()["paths"]["/api/predict"]["post"]["responses"]
  examples = {
    status: answer["content"]["application/json"]["example"]["error"]
    for status, answer in responses.items()
    if status != "200"
  }
  assert set(examples) == {"400", "413", "415", "422", "503"}
  assert len(set(examples.values())) == len(examples)  # one message each
  limit = int(app_lib.MAX_UPLOAD_MB * 2**20)
  sent = {
    "400": lambda: upload(client, SEVEN.read_bytes(), "seven.png", model="seven"),
    "413": lambda: client.post(
      "/api/predict", content=b"0" * (2 * limit), headers={"content-type": "image/png"}
    ),
    "415": lambda: client.post(
      "/api/predict", content=b"seven", headers={"content-type": "text/plain"}
    ),
    "422": lambda: client.post("/api/predict", json={"pixels": [0.0] * 784}),
  }
  for status, send in sent.items():
    answer = send()
    assert (answer.status_code, answer.json()["error"]) == (int(status), examples[status])
  assert examples["503"] == app_lib._stopping().message  # a stopping server: tested below


def test_an_early_exit_threshold_on_the_card_stops_reading(served):
  import dataclasses

  from pixelrnn_jax import calibration

  # The model's own per-step temperature: raw, the new model is sure of a 0 too early.
  rule = calibration.EarlyExit(0.9, served[0].early_exit.calibration)
  early = dataclasses.replace(served[0], early_exit=rule)
  with TestClient(app_lib.make_app([early])) as client:
    body = upload(client, SEVEN.read_bytes(), "seven.png").json()
    assert body["label"] == 7 and body["pixels_read"] < 784
    assert body["probability"] >= 0.9
    assert client.get("/api/models").json()["models"][0]["early_exit_threshold"] == 0.9


def test_the_shipped_early_exit_rule_stops_where_predict_stops(served):
  """The server's exit step (from its one full pass) is ``inference.predict``'s (a loop
  that stops reading), with the card's threshold and per-step temperature."""
  from pixelrnn_jax import inference

  model = served[0]
  assert model.early_exit is not None  # pretrained:pixel records a rule
  for digit in STROKES:
    pixels = app_lib.image_pixels(drawn_png(digit), "d.png")
    answer = model.answer(pixels)
    out = inference.predict(
      model.params,
      pixels[None],
      threshold=model.early_exit.threshold,
      calibration=model.early_exit.calibration,
    )
    assert answer["pixels_read"] == int(out["steps"][0])
    assert answer["label"] == int(out["label"][0])
    np.testing.assert_allclose(answer["probability"], float(out["probability"][0]), atol=1e-5)


def test_a_batch_answers_each_image_as_numpy_reads_the_logits(served):
  """``answer_batch`` (one jitted pass, padded to a power of two, in chunks of
  MAX_BATCH) against the model's logits put through the equations in NumPy:
  softmax(logits / T_t) per step, the first step whose top probability reaches
  the threshold, the answer there; and each image of a batch as it is alone."""
  from pixelrnn_jax import gru_classifier

  rng = np.random.default_rng(3)
  blank = np.zeros((28, 28), np.float32)
  ink = [app_lib.image_pixels(drawn_png(digit), "d.png") for digit in STROKES]
  for model in served:
    for n in (1, 3, models_lib.MAX_BATCH, models_lib.MAX_BATCH + 3):
      images = np.stack([ink[i % len(ink)] for i in range(n)])
      images[::4] = np.clip(images[::4] + rng.uniform(0, 0.3, (28, 28)), 0, 1)
      if n > 1:
        images[1] = blank
      answers = model.answer_batch(images.astype(np.float32))
      logits = np.asarray(gru_classifier.apply(model.params, images), np.float64)
      temperatures = np.asarray(model.early_exit.calibration.temperatures(784), np.float64)
      z = logits / temperatures[:, None]
      p = np.exp(z - z.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      top = p.max(-1)
      assert len(answers) == n
      for i, answer in enumerate(answers):
        reached = np.flatnonzero(top[i] >= model.early_exit.threshold)
        steps = int(reached[0]) + 1 if reached.size else 784
        assert abs(answer["pixels_read"] - steps) <= 1  # float32 vs float64 at the threshold
        final = p[i, answer["pixels_read"] - 1]
        assert answer["label"] == int(np.argmax(final))
        np.testing.assert_allclose(answer["probability"], final.max(), atol=1e-5)
        assert [t["label"] for t in answer["top3"]] == list(np.argsort(-final)[:3])
        np.testing.assert_allclose(answer["probabilities"], p[i], atol=2e-5)
        np.testing.assert_array_equal(answer["pixels"], images[i].round(4))
        alone = model.answer(images[i])
        assert alone["pixels_read"] == answer["pixels_read"]
        np.testing.assert_allclose(alone["probabilities"], answer["probabilities"], atol=1e-6)


def test_answers_are_json_with_float32_probabilities(client, served):
  """Arrays are written in their shortest float32 form: the values the model computed,
  rounded to DIGITS decimals, in about half the bytes of float64 text."""
  response = upload(client, SEVEN.read_bytes(), "seven.png")
  body = response.json()
  assert np.shape(body["probabilities"]) == (784, 10) and np.shape(body["pixels"]) == (28, 28)
  want = served[0].answer(app_lib.image_pixels(SEVEN.read_bytes(), "seven.png"))
  np.testing.assert_array_equal(np.float32(body["probabilities"]), want["probabilities"])
  assert len(response.content) < 90_000  # 7,840 numbers of at most 7 characters, and more
  arrays = response.content.split(b'"probabilities":')[1].split(b'"pixels_read"')[0]
  assert re.search(rb"\d\.\d{6,}", arrays) is None  # no 0.12346000224351883


def test_requests_waiting_for_a_worker_are_answered_together_in_arrival_order():
  """``Batches``: a request that finds a worker free goes alone; those that arrive
  while every worker is busy wait in one queue, and the next free worker takes up to
  max_batch of them in order. A request's own error fails it alone, an error of the
  whole call fails its batch, and a request whose client left is not answered."""
  import asyncio

  async def scenario():
    calls, gate = [], asyncio.Event()

    async def answer(jobs):
      calls.append(list(jobs))
      await gate.wait()
      if "boom" in jobs:
        raise RuntimeError("the worker broke")
      return [app_lib.RequestError(422, f"bad {j}") if j < 0 else f"answer {j}" for j in jobs]

    batches = app_lib.Batches(answer, workers=1, max_batch=3)
    first = asyncio.ensure_future(batches.submit(0))
    await asyncio.sleep(0)
    waiting = [asyncio.ensure_future(batches.submit(j)) for j in (1, -2, 3, 4, 5)]
    gone = asyncio.ensure_future(batches.submit(6))
    await asyncio.sleep(0)
    gone.cancel()
    await asyncio.sleep(0)
    assert calls == [[0]]  # alone, at once
    gate.set()
    results = await asyncio.gather(first, *waiting, return_exceptions=True)
    assert calls == [[0], [1, -2, 3], [4, 5]]  # in arrival order, 3 at a time, 6 skipped
    assert (
      results[0] == "answer 0"
      and results[1] == "answer 1"
      and results[3:]
      == [
        "answer 3",
        "answer 4",
        "answer 5",
      ]
    )
    assert isinstance(results[2], app_lib.RequestError) and results[2].status == 422
    assert gone.cancelled()

    broken = await asyncio.gather(batches.submit(7), batches.submit("boom"), return_exceptions=True)
    assert [type(r) for r in broken] == [str, RuntimeError]  # 7 went alone first
    both = [asyncio.ensure_future(batches.submit(j)) for j in (8, "boom", 9)]
    out = await asyncio.gather(*both, return_exceptions=True)
    assert out[0] == "answer 8" and all(isinstance(r, RuntimeError) for r in out[1:])

    async def short(jobs):  # a bug: fewer answers than requests
      return ["only one"]

    lossy = app_lib.Batches(short, workers=1, max_batch=4)
    gathered = asyncio.gather(*(lossy.submit(j) for j in range(3)), return_exceptions=True)
    out = await asyncio.wait_for(gathered, timeout=5)  # nobody waits for ever
    assert out[0] == "only one" and all(isinstance(r, RuntimeError) for r in out[1:])

  asyncio.run(scenario())


def test_closing_the_queue_fails_waiting_requests_now_and_running_ones_after_the_grace():
  import asyncio

  async def scenario():
    started = asyncio.Event()

    async def answer(jobs):
      started.set()
      await asyncio.sleep(10)  # a slow batch
      return [f"answer {j}" for j in jobs]

    batches = app_lib.Batches(answer, workers=1, max_batch=4)
    running = asyncio.ensure_future(batches.submit(0))
    await started.wait()
    waiting = asyncio.ensure_future(batches.submit(1))
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    batches.close(grace_s=0.3)
    with pytest.raises(app_lib.RequestError, match="stopping") as error:
      await waiting  # at once
    assert error.value.status == 503 and loop.time() - t0 < 0.1
    with pytest.raises(app_lib.RequestError, match="stopping"):
      await batches.submit(2)  # closed: refused
    with pytest.raises(app_lib.RequestError, match="stopping"):
      await running  # after the grace period, not after the slow batch
    assert 0.25 < loop.time() - t0 < 2

  asyncio.run(scenario())


def test_a_mixed_batch_fails_only_its_bad_requests(served):
  """One worker call with uploads and JSON for two models, bad ones among them."""
  seven, four = (app_lib.image_pixels(drawn_png(d), "d.png") for d in (7, 4))
  jobs = [
    (app_lib._read_upload, ("pixel", drawn_png(7), "7.png", "image/png")),
    (app_lib._read_json, (json_body(four, "permuted"), None)),
    (app_lib._read_json, (b'{"pixels": [[2.0]]}', None)),
    (app_lib._read_upload, ("permuted", b"not an image", "x.png", "image/png")),
    (app_lib._read_json, (json_body(four), None)),
    (app_lib._read_json, (json_body(seven), "permuted")),
  ]
  results = app_lib._answer_jobs(served, jobs)
  error = app_lib.RequestError
  assert [type(r) for r in results] == [bytes, bytes, error, error, bytes, bytes]
  assert results[2].status == 422 and results[3].status == 400
  by_name = {model.name: model for model in served}
  for result, (model, pixels) in zip(
    [results[i] for i in (0, 1, 4, 5)],
    [("pixel", seven), ("permuted", four), ("pixel", four), ("permuted", seven)],
  ):
    body = json.loads(result)
    want = by_name[model].answer(pixels)
    assert (body["model"], body["label"]) == (model, want["label"])
    np.testing.assert_allclose(body["probabilities"], want["probabilities"], atol=1e-5)


def json_body(pixels: np.ndarray, model: str | None = None) -> bytes:
  payload = {"pixels": pixels.tolist()} | ({"model": model} if model else {})
  return json.dumps(payload).encode()


# ---------------------------------------------------------------------------- bad input

WHITE = Image.new("L", (60, 60), 255)
CLICK = Image.new("L", (280, 280), 0)  # one click on the page's canvas: a dot of its pen
ImageDraw.Draw(CLICK).ellipse([130, 130, 149, 149], fill=255)


def _png(image) -> bytes:
  out = io.BytesIO()
  image.save(out, "PNG")
  return out.getvalue()


@pytest.mark.parametrize(
  "request_kwargs, status, text",
  [
    (dict(content=b""), 400, "empty body"),
    (dict(files={"file": ("a.png", b"", "image/png")}), 400, "a.png: empty file"),
    (dict(files={"file": ("a.png", b"%PDF-1.4 hello", "image/png")}), 400, "not a readable image"),
    (dict(files={"file": ("a.txt", b"hello", "text/plain")}), 400, "unsupported file type .txt"),
    (dict(files={"file": ("a.png", _png(WHITE), "image/png")}), 422, "a.png: no ink"),
    (dict(files={"file": ("canvas.png", _png(CLICK), "image/png")}), 422, "filled round blob"),
    (
      dict(files=[("file", ("a.png", b"x", "image/png")), ("file", ("b.png", b"y", "image/png"))]),
      400,
      "multipart body with more than one file: send one image, in field 'file'",
    ),
    (
      dict(content=b"--x\r\n", headers={"content-type": "multipart/form-data"}),
      400,
      "multipart/form-data without its boundary=... in Content-Type: let the HTTP client",
    ),
    (dict(files={"b.png": ("b.png", b"x", "image/png")}), 400, "without a file in field 'file'"),
    (
      dict(content=b"hello", headers={"content-type": "text/plain"}),
      415,
      "content type text/plain",
    ),
    (dict(content=b"{nope", headers={"content-type": "application/json"}), 400, "not valid JSON"),
    (
      dict(
        content=b'{"pixels": ' + b"1" * 5000 + b"}", headers={"content-type": "application/json"}
      ),
      422,
      "body holds an integer of more than 4,300 digits; pixel values are numbers in [0, 1]",
    ),
    (dict(json=[1, 2]), 422, "expected an object"),
    (dict(json={"image": []}), 422, "no 'pixels'"),
    (dict(json={"pixels": [[0.0] * 28] * 27}), 422, "27 rows"),
    (dict(json={"pixels": [[0.0] * 28] * 27 + [[0.0] * 3]}), 422, "row 27 has 3 values"),
    (dict(json={"pixels": "zeros"}), 422, "pixels is a string 'zeros'"),
    (dict(json={"pixels": [[0.0] * 28]}), 422, "pixels is 1 row;"),
    (dict(json={"pixels": [{}] * 28}), 422, "pixels row 0 is an object"),
    (dict(json={"pixels": None}), 422, "pixels is a null"),
    (dict(json=[1, 2]), 422, "JSON body is a list"),
    (dict(json={"pixels": [[0.0] * 28] * 27 + [[0.0] * 27 + [10**400]]}), 422, "[27][27] = 1000"),
    (dict(files={"file": (None, b"\x89PNG...")}), 400, "field 'file' is text, not a file"),
    (
      dict(files={"file": ("big.npy", NPY_HUGE, "application/octet-stream")}),
      413,
      "(200000, 200000)",
    ),
    (dict(json={"pixels": [0.5] * 784}), 422, "pixels is a flat list of 784 values"),
    (dict(json={"pixels": [[0.0] * 28] * 28}), 422, "no ink: every pixel is within 0.1 of 0.00"),
    (dict(json={"pixels": [[0.5] * 28] * 28}), 422, "no ink"),
    (
      dict(json={"pixels": [[0.0] * 28] * 27 + [[0.0] * 27 + [1.5]]}),
      422,
      "pixels[27][27] = 1.5; expected a number in [0, 1]; for 0..255 values, divide each by 255",
    ),
    (
      dict(json={"pixels": [[0.0] * 28] * 27 + [[0.0] * 27 + ["a"]]}),
      422,
      "pixels[27][27] is a string 'a'",
    ),
    (
      dict(
        content=b'{"pixels": [' + b",".join([b"[" + b",".join([b"NaN"] * 28) + b"]"] * 28) + b"]}",
        headers={"content-type": "application/json"},
      ),
      422,
      "pixels[0][0] = nan",
    ),
    (
      dict(json={"pixels": [[0.0] * 28] * 28, "model": "nope"}),
      400,
      "unknown model 'nope' (loaded: pixel, permuted)",
    ),
    (dict(json={"pixels": [[0.0] * 28] * 28, "model": 3}), 422, "model must be a string"),
    (
      dict(files={"file": ("a.png", b"x", "image/png")}, data={"model": "nope"}),
      400,
      "unknown model 'nope'",
    ),
    (
      dict(files={"file": ("bomb.png", helpers.png_claiming(30000, 30000), "image/png")}),
      413,
      "bomb.png",
    ),
    (
      dict(files={"file": ("big.png", helpers.png_claiming(10000, 10000), "image/png")}),
      413,
      "10000x10000 pixels",
    ),
  ],
  ids=lambda value: value if isinstance(value, str) else None,
)
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # then refused
def test_bad_input_is_a_4xx_naming_the_problem(client, request_kwargs, status, text):
  response = client.post("/api/predict", **request_kwargs)
  assert response.status_code == status, response.text
  body = response.json()
  assert set(body) == {"error"} and text in body["error"], body
  assert "Traceback" not in response.text


def _multipart(png: bytes, boundary: bytes = b"b0undary") -> bytes:
  """A whole multipart/form-data body: a 'model' field, then the file 'seven.png'."""
  return (
    b"--" + boundary + b'\r\nContent-Disposition: form-data; name="model"\r\n\r\npixel\r\n'
    b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="seven.png"'
    b"\r\nContent-Type: image/png\r\n\r\n" + png + b"\r\n--" + boundary + b"--\r\n"
  )


@settings(max_examples=40, deadline=None, derandomize=True)
@given(fraction=st.floats(0.0, 1.0, exclude_max=True))
def test_a_multipart_body_cut_short_is_named_as_cut_short(client, fraction):
  """A body cut anywhere before the end of its closing delimiter (a dropped upload)
  is answered with the digit when the file part came whole, else with a 400 that
  says the body was cut short; never 'without a file (fields: none)'."""
  whole = _multipart(SEVEN.read_bytes())
  closing = whole.rindex(b"--b0undary--") + len(b"--b0undary--")
  body = whole[: max(1, int(fraction * closing))]
  response = client.post(
    "/api/predict",
    content=body,
    headers={"content-type": "multipart/form-data; boundary=b0undary"},
  )
  if response.status_code == 200:
    assert response.json()["digit"] == 7 and len(body) > closing - 20
  else:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert "cut short" in error and f"{len(body):,} bytes" in error, error
    assert "'--b0undary--'" in error


@pytest.mark.parametrize(
  "body",
  [
    b"--b0undary garbage\r\n",  # no CR after the boundary
    b"--b0undary\r\nNoColonHeader\r\n\r\nabc\r\n--b0undary--\r\n",  # a header without ':'
    b"hello\r\n--b0undary\r\n",  # a preamble (python-multipart refuses it)
  ],
)
def test_a_malformed_multipart_body_is_one_400_and_no_console_warning(client, body, caplog):
  """The client is told; the server's console does not repeat python-multipart's parse
  warning for every malformed body it meets."""
  with caplog.at_level(logging.DEBUG):
    response = client.post(
      "/api/predict",
      content=body,
      headers={"content-type": "multipart/form-data; boundary=b0undary"},
    )
  assert response.status_code == 400
  assert "malformed multipart body" in response.json()["error"], response.text
  assert not [r for r in caplog.records if r.name.startswith("python_multipart")], caplog.text


@pytest.mark.parametrize(
  "fields, text",
  [
    (
      {"mdoel": "permuted"},
      "multipart field 'mdoel' is not one the API takes: did you mean 'model'?",
    ),
    ({"model": ""}, "model is empty: give a loaded model's name (pixel, permuted) or leave it out"),
    ({"model": ["permuted", "pixel"]}, "multipart field 'model' is given more than once"),
  ],
)
def test_a_misspelt_empty_or_repeated_model_field_is_refused_not_ignored(client, fields, text):
  """Before: each was answered by the default model, 200, the slip seen only in the
  answer's 'model'."""
  response = upload(client, SEVEN.read_bytes(), "seven.png", **fields)
  assert response.status_code == 400 and text in response.json()["error"], response.text[:200]


@settings(max_examples=30, deadline=None, derandomize=True)
@given(key=st.text(min_size=1, max_size=12).filter(lambda k: k not in ("pixels", "model")))
def test_a_json_key_the_api_does_not_take_is_refused(client, key):
  response = client.post("/api/predict", json={"pixels": GRID_FOUR.tolist(), key: "permuted"})
  assert response.status_code == 422, response.text[:200]
  error = response.json()["error"]
  assert error.startswith(f"JSON key {repr(key)[:37]}") and "is not one the API takes" in error


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
  field=st.from_regex(r"[a-z_]{1,10}", fullmatch=True).filter(lambda f: f not in ("file", "model"))
)
def test_a_multipart_field_the_api_does_not_take_is_refused(client, field):
  response = upload(client, SEVEN.read_bytes(), "seven.png", **{field: "permuted"})
  assert response.status_code == 400, response.text[:200]
  assert f"multipart field {field!r} is not one the API takes" in response.json()["error"]


def test_a_misspelt_json_key_and_an_empty_query_model_name_the_fix(client):
  pixels = GRID_FOUR.tolist()
  response = client.post("/api/predict", json={"pixels": pixels, "modle": "permuted"})
  assert "takes: did you mean 'model'? (it takes pixels, model)" in response.json()["error"]
  response = client.post("/api/predict", json={"pixels": pixels, "model": "Permuted"})
  assert "unknown model 'Permuted'; did you mean 'permuted'? (loaded:" in response.json()["error"]
  response = client.post("/api/predict?model=", json={"pixels": pixels})
  assert response.status_code == 400 and "model is empty" in response.json()["error"]
  assert (
    client.post("/api/predict", json={"pixels": pixels, "model": "permuted"}).status_code == 200
  )


def test_a_whole_multipart_body_without_a_file_still_names_its_fields(client):
  body = _multipart(b"").replace(b'name="file"; filename="seven.png"', b'name="picture"')
  response = client.post(
    "/api/predict", content=body, headers={"content-type": "multipart/form-data; boundary=b0undary"}
  )
  assert response.status_code == 400
  assert "without a file in field 'file' (fields: model, picture)" in response.json()["error"]


JSON_VALUES = st.recursive(
  st.none()
  | st.booleans()
  | st.integers(min_value=-(10**500), max_value=10**500)
  | st.floats(allow_nan=True, allow_infinity=True)
  | st.text(max_size=5),
  lambda inner: (
    st.lists(inner, max_size=30) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
  ),
  max_leaves=40,
)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(value=JSON_VALUES, row=st.integers(0, 27), column=st.integers(0, 27), whole=st.booleans())
def test_any_json_pixels_are_answered_or_refused_with_a_422(value, row, column, whole):
  """Any JSON value as the pixels, or in place of one pixel of a drawn 4: a float32
  [28, 28] image in [0, 1], or a RequestError 422 naming the problem in one short line;
  never another exception (an integer too large for a float, NaN, a nested object)."""
  grid = GRID_FOUR.tolist()
  if whole:
    pixels = value
  else:
    grid[row][column] = value
    pixels = grid
  try:
    array = app_lib.check_pixels(pixels)
  except app_lib.RequestError as error:
    assert error.status == 422 and "\n" not in error.message and len(error.message) < 300
    assert "pixels" in error.message or "no ink" in error.message
  else:
    assert array.shape == (28, 28) and array.dtype == np.float32
    assert np.all((array >= 0) & (array <= 1))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(body=st.binary(max_size=200) | JSON_VALUES.map(lambda v: json.dumps({"pixels": v}).encode()))
def test_any_json_body_is_answered_or_refused_with_a_4xx(served, body):
  try:
    model, pixels = app_lib._read_json(served, body, None)
  except app_lib.RequestError as error:
    assert error.status in (400, 422) and "\n" not in error.message
  else:
    assert model is served[0] and pixels.shape == (28, 28)


def test_a_body_over_the_limit_is_refused_before_it_is_read(served):
  with TestClient(app_lib.make_app(served, max_upload_mb=0.01)) as client:
    large = SEVEN.read_bytes() + b"\0" * 20_000
    response = upload(client, large, "seven.png")
    assert response.status_code == 413 and "0.01 MB upload limit" in response.json()["error"]
    assert response.json()["error"].endswith("a digit needs far less: scale the image down")

    def chunks():  # no Content-Length: the limit holds on the stream itself
      for _ in range(20):
        yield b"\0" * 1000

    response = client.post(
      "/api/predict", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413 and "at least" in response.json()["error"]
    assert response.json()["error"].endswith("28 rows of 28 pixels take about 5 KB of JSON")
    assert len(json_body(GRID_FOUR)) < 5 * 1024 * 1.2  # as said
    assert client.get("/healthz").status_code == 200


def test_an_unexpected_failure_is_a_json_500_without_traceback(served):
  import dataclasses

  broken = dataclasses.replace(served[0], params=None)  # the model call fails inside
  app = app_lib.make_app([broken])
  with TestClient(app, raise_server_exceptions=False) as client:
    response = upload(client, SEVEN.read_bytes(), "seven.png")
    assert response.status_code == 500
    assert set(response.json()) == {"error"} and "internal server error" in response.text
    assert "Traceback" not in response.text and "File " not in response.text
    assert client.get("/nowhere").json() == {
      "error": "GET /nowhere: no such page; the page is /, the API /api/predict (see /docs)"
    }
    wrong = client.get("/api/predict")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert wrong.json() == {
      "error": "GET /api/predict: method not allowed; use POST (the API: /docs)"
    }


def test_default_models_and_duplicate_names():
  from pixelrnn_jax import cli

  args = cli.build_parser().parse_args(["serve"])
  assert (args.checkpoint, args.host, args.port, args.max_upload_mb) == (
    None,
    "127.0.0.1",
    8000,
    10,
  )
  with pytest.raises(ValueError, match="pixel given more than once"):
    models_lib.load_all(["pretrained:pixel", "pretrained:pixel"])
  with pytest.raises(FileNotFoundError, match="no pretrained weights named 'nope'"):
    models_lib.load_all(["pretrained:nope"])


# ---------------------------------------------------------------------------- worker processes


def _children(pid: int) -> set[int]:
  """Child processes of ``pid``, started by any of its threads (Linux /proc); a thread
  that ends while it is read has none."""
  found = set()
  for path in Path(f"/proc/{pid}/task").glob("*/children"):
    try:
      found.update(int(child) for child in path.read_text().split())
    except FileNotFoundError:
      pass
  return found


def test_worker_processes_answer_as_threads_and_survive_a_dead_worker(served):
  import asyncio

  pool = app_lib.WorkerProcesses(["pretrained:pixel"], 2)
  with TestClient(app_lib.make_app(served[:1], pool=pool)) as client:
    import multiprocessing

    workers = {child.pid for child in multiprocessing.active_children()}
    assert len(workers) == 2
    body = upload(client, SEVEN.read_bytes(), "seven.png").json()
    want = served[0].answer(app_lib.image_pixels(SEVEN.read_bytes(), "seven.png"))
    assert body["label"] == 7 == want["label"]
    np.testing.assert_allclose(body["probabilities"], want["probabilities"], atol=2e-5)
    bad = client.post("/api/predict", json={"pixels": [[2.0] * 28] * 28})
    assert bad.status_code == 422 and "[0, 1]" in bad.json()["error"]  # raised in a worker
    os.kill(next(iter(workers)), signal.SIGKILL)  # a worker dies between requests
    time.sleep(0.5)
    for _ in range(3):  # the dead one is replaced; the other answers meanwhile
      again = upload(client, SEVEN.read_bytes(), "seven.png")
      assert again.status_code == 200 and again.json()["label"] == 7
  assert not _children(os.getpid()) & workers  # stopped at shutdown

  async def dies_while_answering():
    lonely = app_lib.WorkerProcesses(["pretrained:pixel"], 1)
    lonely.start()
    try:
      with pytest.raises(app_lib.RequestError) as error:
        await lonely.run(os._exit, 3)
      assert error.value.status == 503 and "send the request again" in error.value.message
      assert await lonely.run(os.getpid) != os.getpid()  # new workers answer
    finally:
      lonely.stop()

  asyncio.run(dies_while_answering())


# ---------------------------------------------------------------------------- a real server


def _start(*flags: str) -> tuple[subprocess.Popen, str]:
  """``pixelrnn-jax serve --port 0 FLAGS`` and its address, from its one start line."""
  process = subprocess.Popen(
    [sys.executable, "-m", "pixelrnn_jax", "serve", "--port", "0", *flags],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    cwd=ROOT,
  )
  lines = []
  reader = threading.Thread(target=lambda: lines.append(process.stdout.readline()), daemon=True)
  reader.start()
  reader.join(timeout=120)
  match = re.fullmatch(
    r"serving \d+ models? on (http://127\.0\.0\.1:\d+) \(Ctrl-C to stop\)\n", "".join(lines)
  )
  if match is None:
    process.kill()
    raise AssertionError(f"no start line: {lines!r}; stderr: {process.communicate()[1]}")
  return process, match.group(1)


@pytest.fixture(scope="module")
def server():
  """The command with its default models (pretrained:pixel, anytime and permuted)."""
  process, url = _start()
  yield url
  process.send_signal(signal.SIGINT)
  process.communicate(timeout=30)


def test_concurrent_requests_each_get_their_own_answer(server, served):
  jobs = []  # (kind, digit, model): uploads and JSON pixels, both models, 16 at once
  for i, digit in enumerate(list(STROKES) * 3):
    jobs.append(("file" if i % 2 else "json", digit, ("pixel", "permuted")[i % 3 == 0]))
  jobs = jobs[:16]
  pixels = {digit: app_lib.image_pixels(drawn_png(digit), "d.png") for digit in STROKES}
  by_name = {model.name: model for model in served}
  expected = [by_name[model].answer(pixels[digit]) for _, digit, model in jobs]

  def ask(job):
    kind, digit, model = job
    with httpx.Client(base_url=server, timeout=60) as http:
      if kind == "file":
        return http.post(
          "/api/predict",
          files={"file": (f"{digit}.png", drawn_png(digit), "image/png")},
          data={"model": model},
        ).json()
      return http.post(
        "/api/predict", json={"pixels": pixels[digit].tolist(), "model": model}
      ).json()

  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    answers = list(pool.map(ask, jobs))
  for job, answer, want in zip(jobs, answers, expected):
    assert (answer["label"], answer["model"]) == (job[1], job[2]), job
    assert answer["label"] == want["label"]
    np.testing.assert_allclose(answer["probabilities"], want["probabilities"], atol=2e-5)


def _serve_load():
  import importlib.util

  spec = importlib.util.spec_from_file_location("serve_load", ROOT / "benchmarks/serve_load.py")
  serve_load = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(serve_load)
  return serve_load


def test_the_load_benchmark_keeps_the_servers_stderr_unless_it_fails(capfd):
  """The benchmark's server: its expected "terminated (SIGTERM)" line stays out of the
  benchmark's output; a server that cannot start is an error carrying its stderr."""
  serve_load = _serve_load()
  process, url = serve_load.start_server("pretrained:pixel", "--threads")
  assert url.startswith("http://127.0.0.1:")
  serve_load.stop_server(process)
  assert process.returncode == 143 and capfd.readouterr().err == ""
  with pytest.raises(RuntimeError, match="(?s)the server did not start.*--max-batch 0: expected"):
    serve_load.start_server("pretrained:pixel", "--threads", "--max-batch", "0")


def test_the_load_benchmark_client_counts_answers_and_errors(server):
  """benchmarks/serve_load.py's raw HTTP/1.1 client against a real server: every
  request is counted once, a right answer is no error and a wrong one is."""
  import asyncio

  serve_load = _serve_load()
  seven = app_lib.image_pixels(serve_load.drawn_seven(), "seven.png")
  bodies = {
    "json": {"content": json_body(seven), "headers": {"content-type": "application/json"}},
    "image": {"files": {"file": ("seven.png", serve_load.drawn_seven(), "image/png")}},
    "bad": {"content": b'{"pixels": 1}', "headers": {"content-type": "application/json"}},
  }
  for kind, body in bodies.items():
    for client in ("raw", "httpx"):
      row = asyncio.run(
        serve_load.load(server, kind, body, clients=3, total=7, limit_s=60, client=client)
      )
      assert row["requests"] == 7 and row["client"] == client
      assert row["errors"] == (7 if kind == "bad" else 0), row["first_error"]
      if kind == "bad":
        assert row["first_error"].startswith("422 ")


def test_health_answers_while_predictions_queue(server):

  def ask(_):
    with httpx.Client(base_url=server, timeout=120) as http:
      return http.post(
        "/api/predict", files={"file": ("7.png", drawn_png(7, size=1000), "image/png")}
      ).status_code

  with concurrent.futures.ThreadPoolExecutor(24) as pool:
    queued = pool.map(ask, range(24))
    time.sleep(0.3)
    with httpx.Client(base_url=server, timeout=10) as http:
      started = time.perf_counter()
      assert http.get("/healthz").json() == {"status": "ok"}
      assert http.get("/").status_code == 200
      waited = time.perf_counter() - started
    assert set(queued) == {200}
  assert waited < 2.0, waited


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_stop_it_with_one_line(signum, code):
  process, url = _start("--checkpoint", "pretrained:pixel")
  assert httpx.get(url + "/healthz", timeout=10).json() == {"status": "ok"}
  workers = _children(process.pid)
  assert len(workers) >= 1  # the worker processes (--workers: the cores)
  process.send_signal(signum)
  out, err = process.communicate(timeout=30)
  for _ in range(50):  # no worker outlives the server
    if not any(Path(f"/proc/{pid}").exists() for pid in workers):
      break
    time.sleep(0.1)
  assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
  assert process.returncode == code
  assert err.strip().splitlines() == [
    f"pixelrnn-jax serve: {('interrupted', 'terminated')[code == 143]} ({signal.Signals(signum).name})"
  ]
  assert "Traceback" not in out + err


@pytest.mark.parametrize("mode", [(), ("--threads",)])
def test_a_stop_with_requests_queued_answers_each_with_json(mode):
  """SIGTERM once the first of 24 slow uploads is answered (the others are being read
  or wait, one per worker at a time: --max-batch 1): waiting ones get a JSON 503 at
  once, the ones being read finish or get a JSON 503 before the grace period ends, and
  the server is gone within it with its one line (no CancelledError tracebacks, no
  plain-text 500). A request the server had not started reading may see the
  connection close: it was never answered, so it is not counted as an answer."""
  image = Image.new("L", (5000, 5000), 0)
  ImageDraw.Draw(image).line([(1200, 800), (3800, 800), (2000, 4300)], fill=255, width=330)
  out = io.BytesIO()
  image.save(out, "PNG")
  big = out.getvalue()
  process, url = _start("--checkpoint", "pretrained:pixel", "--max-batch", "1", *mode)
  answers, unanswered, first = [], [], threading.Event()

  def ask():
    try:
      with httpx.Client(timeout=60) as http:
        response = http.post(url + "/api/predict", files={"file": ("big.png", big, "image/png")})
    except httpx.TransportError as error:  # closed before any answer
      unanswered.append(error)
      return
    answers.append((response.status_code, response.headers.get("content-type"), response.text))
    first.set()

  threads = [threading.Thread(target=ask) for _ in range(24)]
  for thread in threads:
    thread.start()
  assert first.wait(timeout=60), unanswered
  stopped = time.monotonic()
  process.send_signal(signal.SIGTERM)
  _, err = process.communicate(timeout=60)
  elapsed = time.monotonic() - stopped
  for thread in threads:
    thread.join(timeout=60)
  assert process.returncode == 143 and elapsed < 8
  assert err.strip().splitlines() == ["pixelrnn-jax serve: terminated (SIGTERM)"]
  assert len(answers) + len(unanswered) == 24
  statuses = sorted(status for status, _, _ in answers)
  assert set(statuses) <= {200, 503} and statuses.count(503) >= 5, (statuses, unanswered)
  for status, kind, text in answers:
    assert kind == "application/json"
    assert status == 200 or "the server is stopping" in text


def test_a_busy_port_is_one_line_and_exit_2():
  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    result = subprocess.run(
      [sys.executable, "-m", "pixelrnn_jax", "serve", "--port", str(port)],
      capture_output=True,
      text=True,
      timeout=120,
      cwd=ROOT,
    )
  assert result.returncode == 2
  assert result.stderr.splitlines() == [
    f"pixelrnn-jax serve: error: 127.0.0.1:{port} is already in use (another server?);"
    " choose another --port"
  ]


def test_without_the_extra_it_says_how_to_install_it():
  code = (
    "import sys; sys.modules['fastapi'] = None; from pixelrnn_jax import cli;"
    " sys.exit(cli.main(['serve']))"
  )
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
  assert result.returncode == 2
  assert result.stderr.splitlines() == [
    "pixelrnn-jax serve needs its extra: pip install -e '.[serve]' (no module 'fastapi')"
  ]


# ---------------------------------------------------------------------------- the page, in Chromium


def _playwright():
  missing = []
  if not os.path.exists(CHROMIUM):
    missing.append(f"{CHROMIUM} (apt-get install chromium)")
  try:
    from playwright.sync_api import sync_playwright
  except ImportError:
    sync_playwright = None
    missing.append("playwright (pip install -e '.[browser]')")
  if missing:
    if CI:
      pytest.fail(f"PIXELRNN_JAX_CI=1 and the browser test lacks {', '.join(missing)}")
    pytest.skip(f"the browser test needs {', '.join(missing)}")
  return sync_playwright


def test_the_page_reads_a_digit_drawn_with_the_mouse(server):
  sync_playwright = _playwright()
  with sync_playwright() as playwright:
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    try:
      page = browser.new_page(viewport={"width": 1200, "height": 900})
      failed = []
      page.on("pageerror", lambda error: failed.append(str(error)))
      page.on("requestfailed", lambda request: failed.append(request.url))
      page.goto(server + "/")
      page.wait_for_selector("body[data-ready='true']", timeout=20_000)
      assert page.locator("#model option").all_text_contents() == [
        "pixel (99.02% valid)",
        "anytime (98.62% valid)",
        "permuted (95.60% valid)",
      ]
      box = page.locator("#canvas").bounding_box()
      scale = box["width"] / 280

      def at(x, y):
        return box["x"] + x * scale, box["y"] + y * scale

      # A 7: along the top, then down to the left, in one stroke.
      (start, *rest) = STROKES[7][0]
      page.mouse.move(*at(*start))
      page.mouse.down()
      for point in rest:
        page.mouse.move(*at(*point), steps=12)
      page.mouse.up()
      page.wait_for_selector("#answer[data-label='7']", timeout=20_000)
      page.wait_for_function("document.body.dataset.busy === 'false'")
      assert page.locator("#top3 li").count() == 3
      assert page.locator("#top3 li .label").first.text_content() == "7"
      assert page.get_attribute("#chart", "data-drawn") == "true"
      assert page.get_attribute("#chart", "data-steps") == "784"
      lit = page.evaluate(
        """() => {
          const c = document.getElementById('seen');
          const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
          let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i] > 128) n++;
          return n; }"""
      )
      assert lit > 1000  # the 28x28 view shows the digit
      assert page.is_hidden("#error")
      # The shipped pixel model records a threshold: where it stopped is said.
      assert re.match(
        r"Early exit at calibrated p ≥ 0\.\d{4} .*(answered after \d+|all 784 pixels)",
        page.locator("#early-exit").text_content(),
      )
      # The scrubber moves the cursor in the chart and the 28x28 view.
      page.locator("#scrub").fill("392")
      assert page.locator("#step").text_content().startswith("392 of 784 pixels read (now row 13,")
      # busy 'false' meant no answer was still to come: none moves the cursor back later.
      page.wait_for_timeout(1_000)
      assert page.locator("#step").text_content().startswith("392 of 784 pixels read")
      assert page.evaluate("document.body.dataset.busy") == "false"
      _check_the_scrubber_runs_under_the_charts_axis(page)
      if os.environ.get("PIXELRNN_JAX_SCREENSHOT"):  # mid-reading: the cursor shows in both
        page.locator("#scrub").fill("300")
        page.screenshot(path=str(ROOT / os.environ["PIXELRNN_JAX_SCREENSHOT"]), full_page=True)
      # Another model answers the same drawing; undo and clear empty the page.
      page.select_option("#model", "permuted")
      page.wait_for_function(
        "document.querySelector('#answer').textContent.includes('model permuted')",
        timeout=20_000,
      )
      assert page.get_attribute("#answer", "data-label") == "7"
      # The early-exit line is drawn where the model stopped, with its label right of
      # it, or left of it near the end (it ran off the right edge); no line where the
      # model was never that sure and read all 784 pixels.
      read = int(page.get_attribute("#chart", "data-read"))
      side = page.get_attribute("#chart", "data-exit-label")
      assert side == ("none" if read == 784 else "left" if read > 700 else "right"), (read, side)
      for stopped, expected in ((300, "right"), (760, "left"), (784, "none")):
        page.evaluate(f"state.result.pixels_read = {stopped}; drawChart();")
        assert page.get_attribute("#chart", "data-exit-label") == expected, stopped
      page.click("#undo")
      page.wait_for_selector("#answer:not([data-label])", timeout=5_000)
      assert page.get_attribute("#chart", "data-drawn") == "false"
      assert page.locator("#scrub").input_value() == "784"  # not left where it was
      assert failed == []
    finally:
      browser.close()


def _check_the_scrubber_runs_under_the_charts_axis(page):
  """A click on the scrubber under the chart's x for v moves the cursor to v (within
  2 of 784), and the thumb drawn there is centred on the chart's red cursor line."""
  chart = page.locator("#chart").bounding_box()
  scrub = page.locator("#scrub").bounding_box()
  for pixels in (100, 700, 784, 1, 392):
    x = chart["x"] + page.evaluate(f"chartGeometry().x({pixels})")
    page.mouse.click(x, scrub["y"] + scrub["height"] / 2)
    value = int(page.locator("#scrub").input_value())
    assert abs(value - pixels) <= 2, (pixels, value)
    step_text = page.locator("#step").text_content()
    assert step_text.startswith(f"{value} of 784 pixels read")
    # "leading D at X%" only when no other digit shows X% too, else "N digits level at X%"
    row = page.evaluate(f"state.result.probabilities[{value - 1}]")
    shown = [f"{100 * p:.1f}%" for p in row]
    top = max(row)
    level = shown.count(f"{100 * top:.1f}%")
    expected = (
      f"leading {row.index(top)} at {100 * top:.1f}%"
      if level == 1
      else f"{level} digits level at {100 * top:.1f}%"
    )
    assert step_text.endswith(expected), (step_text, row)
    shot = np.asarray(
      Image.open(
        io.BytesIO(
          page.screenshot(
            clip={
              "x": chart["x"],
              "y": chart["y"],
              "width": chart["width"],
              "height": scrub["y"] + scrub["height"] - chart["y"],
            }
          )
        )
      ).convert("RGB"),
      dtype=int,
    )
    red = (shot[..., 0] > 200) & (shot[..., 1] < 110) & (shot[..., 2] < 110)  # #ff3b30
    top = int(round(scrub["y"] - chart["y"]))
    thumb = np.flatnonzero(red[top:].any(axis=0))
    line = np.flatnonzero(red[10 : int(chart["height"]) - 40].sum(axis=0) > 50)
    assert thumb.size and line.size, (pixels, thumb, line)
    assert abs((thumb.min() + thumb.max()) / 2 - line.mean()) <= 2.0, (pixels, thumb, line)


def test_the_page_warns_of_a_number_and_the_warning_goes_with_it(server, tmp_path):
  """Two strokes side by side ("11") answer with predict's warning of a number; undoing
  one stroke leaves a digit, and the warning goes."""
  sync_playwright = _playwright()
  with sync_playwright() as playwright:
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    try:
      page = browser.new_page(viewport={"width": 1200, "height": 900})
      page.goto(server + "/")
      page.wait_for_selector("body[data-ready='true']", timeout=20_000)
      box = page.locator("#canvas").bounding_box()
      scale = box["width"] / 280
      for x in (80, 200):
        page.mouse.move(box["x"] + x * scale, box["y"] + 40 * scale)
        page.mouse.down()
        page.mouse.move(box["x"] + x * scale, box["y"] + 240 * scale, steps=12)
        page.mouse.up()
        page.wait_for_function("document.body.dataset.busy === 'false'", timeout=20_000)
      page.wait_for_selector("#warning:not([hidden])", timeout=20_000)
      assert page.locator("#warning").text_content() == (
        "Warning: 2 digit-sized pieces side by side (a number?): the answer reads them as"
        " one digit; crop each digit into its own image."
      )
      page.screenshot(path=str(tmp_path / "number.png"))
      page.click("#undo")
      page.wait_for_selector("#answer[data-label='1']", timeout=20_000)
      page.wait_for_function("document.body.dataset.busy === 'false'")
      assert page.is_hidden("#warning")
    finally:
      browser.close()


def test_strokes_over_a_chosen_image_are_its_ink_and_undo_removes_the_image(server, tmp_path):
  """A black 1 on a wide white page, chosen as a file: the canvas shows it on white
  (not in black bars), a stroke drawn over it is black, ink that adds to the digit
  (a bar to the left of its top: a 7), not white that erases it. Undo takes the
  stroke back (the 1 again), then the image, and its answer with it."""
  one = np.full((280, 420), 255, np.uint8)
  one[50:230, 200:222] = 0
  Image.fromarray(one).save(tmp_path / "one.png")
  sync_playwright = _playwright()
  with sync_playwright() as playwright:
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    try:
      page = browser.new_page(viewport={"width": 1200, "height": 900})
      page.goto(server + "/")
      page.wait_for_selector("body[data-ready='true']", timeout=20_000)
      page.set_input_files("#file", str(tmp_path / "one.png"))
      page.wait_for_selector("#answer[data-label='1']", timeout=20_000)
      box = page.locator("#canvas").bounding_box()
      scale = (
        box["width"] / 280
      )  # the page is shown 280/420 of its size, 47 px bars above and below
      top = 47 + 50 * 280 / 420 + 6
      page.mouse.move(box["x"] + 70 * scale, box["y"] + top * scale)
      page.mouse.down()
      page.mouse.move(box["x"] + 145 * scale, box["y"] + top * scale, steps=12)
      page.mouse.up()
      page.wait_for_selector("#answer[data-label='7']", timeout=20_000)
      page.wait_for_function("document.body.dataset.busy === 'false'")
      shade = page.evaluate(
        """([x, y]) => document.getElementById('canvas').getContext('2d')
          .getImageData(x, y, 1, 1).data[0]""",
        [100, round(top)],
      )
      corner = page.evaluate(
        "() => document.getElementById('canvas').getContext('2d').getImageData(2, 2, 1, 1).data[0]"
      )
      assert shade < 64 and corner > 200, (shade, corner)  # black ink, white paper around
      page.click("#undo")
      page.wait_for_selector("#answer[data-label='1']", timeout=20_000)
      page.click("#undo")
      page.wait_for_selector("#answer:not([data-label])", timeout=20_000)
      corner = page.evaluate(
        "() => document.getElementById('canvas').getContext('2d').getImageData(2, 2, 1, 1).data[0]"
      )
      assert corner == 0  # a blank canvas again, black for white strokes
    finally:
      browser.close()


def test_the_api_docs_page_shows_the_routes_without_the_internet(server):
  """FastAPI's /docs loads Swagger UI from a CDN by default: a blank page offline."""
  sync_playwright = _playwright()
  with sync_playwright() as playwright:
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    try:
      page = browser.new_page()
      failed = []
      page.on("pageerror", lambda error: failed.append(str(error)))
      page.on("requestfailed", lambda request: failed.append(request.url))
      page.on(
        "request", lambda request: request.url.startswith(server) or failed.append(request.url)
      )
      page.goto(server + "/docs")
      page.wait_for_selector(".opblock-summary-path[data-path='/api/predict']", timeout=20_000)
      if os.environ.get("PIXELRNN_JAX_SCREENSHOT_DOCS"):
        page.screenshot(path=os.environ["PIXELRNN_JAX_SCREENSHOT_DOCS"], full_page=True)
      paths = page.locator(".opblock-summary-path").all_text_contents()
      assert {"/api/predict", "/api/models", "/healthz"} <= {p.strip() for p in paths}
      assert failed == []
    finally:
      browser.close()


@pytest.mark.parametrize("size", ["inf", "0", "nan"])
def test_a_bad_upload_limit_is_one_line_and_exit_2(size, capsys):
  from pixelrnn_jax import cli

  assert cli.main(["serve", "--port", "0", "--max-upload-mb", size]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and f"--max-upload-mb {float(size)}" in err[0]


@pytest.mark.parametrize("flag", ["--workers", "--max-batch"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_a_bad_worker_or_batch_count_is_one_line_and_exit_2(flag, value, capsys):
  from pixelrnn_jax import cli

  assert cli.main(["serve", "--port", "0", flag, value]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and f"{flag} {value}" in err[0] and "positive" in err[0]


def test_more_workers_than_memory_holds_is_one_line_before_any_model_loads(capsys):
  """--workers N needs N copies of JAX and the models (~300 MB each): a count this
  machine's free memory cannot hold is refused at once, with the count that fits."""
  from pixelrnn_jax import cli
  from pixelrnn_jax import commands

  free = commands._free_mb()
  if free is None:
    pytest.skip("free memory unknown here (no /proc/meminfo)")
  too_many = int(free // commands.WORKER_MB) + 2
  start = time.perf_counter()
  assert cli.main(["serve", "--port", "0", "--workers", str(too_many)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and f"--workers {too_many}:" in err[0] and "--threads" in err[0], err
  assert time.perf_counter() - start < 5  # before any model is loaded
  commands.check_worker_memory(too_many, None)  # unknown: not checked
  commands.check_worker_memory(3, 3 * commands.WORKER_MB)  # exactly fits
  with pytest.raises(ValueError, match="use at most 3 workers"):
    commands.check_worker_memory(4, 3 * commands.WORKER_MB + 1)


def test_make_app_refuses_a_batch_below_one(served):
  for bad in (0, -1, 1.5, True):
    with pytest.raises(ValueError, match="--max-batch"):
      app_lib.make_app(served, max_batch=bad)


def test_a_served_run_shows_the_valid_accuracy_its_run_recorded(tmp_path, toy_data):
  """A run directory has no card; the page listed it without an accuracy."""
  from pixelrnn_jax.training import config as config_lib
  from pixelrnn_jax.training import loop
  from pixelrnn_jax.training import run_dir

  summary = loop.train_and_evaluate(
    config_lib.Config(**helpers.SMALL), tmp_path / "run", progress=False
  )
  served = models_lib.load(str(tmp_path / "run"), warm_up=False)
  best_step = int(Path(summary["best_checkpoint"]).name)
  recorded = {r["step"]: r["accuracy"] for r in run_dir.read_metrics(tmp_path / "run")[1]}
  assert served.describe()["valid_accuracy"] == recorded[best_step]
  assert served.describe()["valid_accuracy"] == summary["best_valid_accuracy"]
  # Weights with a card keep the card's figure.
  loose = models_lib.load("pretrained:pixel", warm_up=False)
  assert loose.describe()["valid_accuracy"] == loose.card["valid_accuracy"]


@settings(max_examples=200, deadline=None)
@given(size=st.integers(1, 10**13))
def test_an_upload_size_is_written_as_people_write_megabytes(size):
  """It read "body of 9.54e+04 MB"."""
  line = app_lib._too_large(size, 10 * 2**20)
  written = line.split("body of ", 1)[1].split(" MB", 1)[0]
  assert "e" not in written, line
  assert float(written.replace(",", "")) == pytest.approx(size / 2**20, rel=0.05, abs=0.005)
