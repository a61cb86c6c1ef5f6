// pixelrnn-jax serve: draw a digit, send it to /api/predict, show how the GRU read it.
// Plain browser JavaScript, no build step and nothing fetched from elsewhere.
"use strict";

const SIZE = 28;
const PIXELS = SIZE * SIZE;
const STROKE = 20; // px on the 280 px canvas: MNIST's strokes are 2-3 of 28 pixels
const SEND_EVERY_MS = 150; // while drawing, at most one request per this long
const PLAY_PIXELS_PER_S = 160; // a whole reading replays in about 5 s
// d3's category10, with near-black for its grey (a grey answer reads as disabled):
// ten hues that stay apart on white.
const COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                 "#8c564b", "#e377c2", "#222222", "#bcbd22", "#17becf"];

const $ = (id) => document.getElementById(id);
const canvas = $("canvas");
const pen = canvas.getContext("2d");
const seen = $("seen");
const chart = $("chart");

const state = {
  models: {},        // name -> the /api/models entry
  strokes: [],       // each a list of [x, y] canvas points, for undo
  stroke: null,      // the stroke being drawn
  background: null,  // a chosen image (ImageBitmap), drawn under the strokes
  paper: "#000",     // the chosen image's paper colour (fills around it), else black
  ink: "#fff",       // strokes: white on the black canvas, the image's ink over an image
  file: null,        // the chosen file itself: sent as it is until a stroke is added
  result: null,      // the last answer of /api/predict
  rank: null,        // rank[pixel index] = its position in the reading order
  cursor: PIXELS,    // pixels read, 1..784, shown in the 28x28 view and the chart
  playing: false,
  timer: null,       // the pending send while drawing
  inFlight: false,   // one request at a time; a change meanwhile sends again after it
  again: false,
};

// ---------------------------------------------------------------- models

async function loadModels() {
  const response = await fetch("/api/models");
  const body = await response.json();
  const select = $("model");
  for (const model of body.models) {
    state.models[model.name] = model;
    const option = document.createElement("option");
    option.value = model.name;
    const accuracy = model.valid_accuracy == null ? "" :
      ` (${(100 * model.valid_accuracy).toFixed(2)}% valid)`;
    option.textContent = `${model.name}${accuracy}`;
    select.append(option);
  }
  select.value = body.default;
  describeModel();
}

function describeModel() {
  const model = state.models[$("model").value];
  if (!model) return;
  const order = {
    pixel: "reads pixels row by row",
    row: "reads one row of 28 pixels per step",
    permuted: "reads pixels in a fixed random order (psMNIST)",
  }[model.order] || `order ${model.order}`;
  $("model-info").textContent = `${model.name}: ${order}`;
}

// ---------------------------------------------------------------- drawing

function redraw() {
  pen.fillStyle = state.paper;
  pen.fillRect(0, 0, canvas.width, canvas.height);
  if (state.background) {
    const image = state.background;
    const scale = Math.min(canvas.width / image.width, canvas.height / image.height);
    const w = image.width * scale, h = image.height * scale;
    pen.drawImage(image, (canvas.width - w) / 2, (canvas.height - h) / 2, w, h);
  }
  for (const stroke of state.strokes) drawStroke(stroke);
  if (state.stroke) drawStroke(state.stroke);
}

function drawStroke(points) {
  pen.strokeStyle = state.ink;
  pen.fillStyle = state.ink;
  pen.lineWidth = STROKE;
  pen.lineCap = "round";
  pen.lineJoin = "round";
  if (points.length === 1) { // a tap is a dot
    pen.beginPath();
    pen.arc(points[0][0], points[0][1], STROKE / 2, 0, 2 * Math.PI);
    pen.fill();
    return;
  }
  pen.beginPath();
  pen.moveTo(points[0][0], points[0][1]);
  for (const [x, y] of points.slice(1)) pen.lineTo(x, y);
  pen.stroke();
}

function canvasPoint(event) {
  const box = canvas.getBoundingClientRect();
  return [(event.clientX - box.left) * canvas.width / box.width,
          (event.clientY - box.top) * canvas.height / box.height];
}

canvas.addEventListener("pointerdown", (event) => {
  if (event.button !== 0) return;
  event.preventDefault();
  canvas.setPointerCapture(event.pointerId);
  state.stroke = [canvasPoint(event)];
  state.file = null; // from now on the canvas is the input
  stopPlaying();
  redraw();
});

canvas.addEventListener("pointermove", (event) => {
  if (!state.stroke) return;
  // Coalesced events: a fast pen or finger moves several points per frame.
  const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
  for (const e of (events.length ? events : [event])) state.stroke.push(canvasPoint(e));
  redraw();
  sendSoon();
});

function endStroke() {
  if (!state.stroke) return;
  state.strokes.push(state.stroke);
  state.stroke = null;
  redraw();
  sendSoon();
}
canvas.addEventListener("pointerup", endStroke);
canvas.addEventListener("pointercancel", endStroke);

$("undo").addEventListener("click", undo);
$("clear").addEventListener("click", clear);
document.addEventListener("keydown", (event) => {
  if ((event.ctrlKey || event.metaKey) && event.key === "z") { event.preventDefault(); undo(); }
});

function undo() {
  if (!state.strokes.length) { clear(); return; } // the chosen image goes, answer and all
  state.strokes.pop();
  if (!state.strokes.length && state.background) state.file = state.chosen;
  redraw();
  sendSoon();
}

function clear() {
  state.strokes = [];
  state.background = null;
  state.file = null;
  state.paper = "#000";
  state.ink = "#fff";
  redraw();
  sendSoon();
}

// The paper's colour of an image: the median of its border's pixels, channel by
// channel (on a 32x32 copy), transparent ones over the background the server puts
// under them (white under dark strokes, black under light: images._composite).
// Strokes over the image take the ink's shade, black on light paper and white on
// dark, so that they add to the digit instead of erasing it.
function paperOf(image) {
  const side = 32;
  const small = new OffscreenCanvas(side, side).getContext("2d");
  small.drawImage(image, 0, 0, side, side);
  const data = small.getImageData(0, 0, side, side).data;
  const grey = (i) => 0.299 * data[i] + 0.587 * data[i + 1] + 0.114 * data[i + 2];
  let inked = 0, opacity = 0;
  for (let i = 0; i < data.length; i += 4) { inked += grey(i) * data[i + 3]; opacity += data[i + 3]; }
  const under = opacity && inked / opacity < 127.5 ? 255 : 0;
  const channels = [[], [], []];
  for (let i = 0; i < side * side; i++) {
    const x = i % side, y = Math.floor(i / side);
    if (x > 0 && y > 0 && x < side - 1 && y < side - 1) continue;
    const alpha = data[4 * i + 3] / 255;
    for (let c = 0; c < 3; c++) channels[c].push(data[4 * i + c] * alpha + under * (1 - alpha));
  }
  const [r, g, b] = channels.map((v) => v.sort((p, q) => p - q)[v.length >> 1]);
  const light = 0.299 * r + 0.587 * g + 0.114 * b > 127.5;
  return { paper: `rgb(${r}, ${g}, ${b})`, ink: light ? "#000" : "#fff" };
}

// ---------------------------------------------------------------- image files

async function useFile(file) {
  if (!file) return;
  state.strokes = [];
  state.file = file;
  state.chosen = file;
  try {
    state.background = await createImageBitmap(file);
    Object.assign(state, paperOf(state.background));
  } catch {
    state.background = null; // e.g. a .npy array: the server reads it, the browser cannot
    Object.assign(state, { paper: "#000", ink: "#fff" });
  }
  redraw();
  send();
}

$("file").addEventListener("change", (event) => useFile(event.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  useFile(event.dataTransfer.files[0]);
});

// ---------------------------------------------------------------- asking the server

// body[data-busy] is "true" while an answer is still to come: a request in flight or
// one scheduled, so that "false" means the answer shown is the one for what is drawn.
function markBusy() {
  document.body.dataset.busy = String(state.inFlight || state.again || state.timer !== null);
}

function sendSoon() {
  if (state.timer === null) {
    state.timer = setTimeout(() => { state.timer = null; send(); }, SEND_EVERY_MS);
  }
  markBusy();
}

function isEmpty() {
  return !state.strokes.length && !state.stroke && !state.background && !state.file;
}

async function send() {
  if (state.inFlight) { state.again = true; markBusy(); return; }
  if (isEmpty()) { showNothing(); markBusy(); return; }
  state.inFlight = true;
  markBusy();
  try {
    const form = new FormData();
    if (state.file) {
      form.append("file", state.file, state.file.name);
    } else {
      const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
      form.append("file", blob, "drawing.png");
    }
    form.append("model", $("model").value);
    const response = await fetch("/api/predict", { method: "POST", body: form });
    let body;
    try { body = await response.json(); } catch { body = { error: `HTTP ${response.status}` }; }
    if (state.again) return; // the input changed meanwhile: only the newest answer counts
    if (!response.ok) showError(body.error || `HTTP ${response.status}`);
    else show(body);
  } catch (error) {
    if (!state.again) showError(`cannot reach the server (${error.message})`);
  } finally {
    state.inFlight = false;
    if (state.again) { state.again = false; send(); }
    markBusy();
  }
}

$("model").addEventListener("change", () => { describeModel(); send(); });

// ---------------------------------------------------------------- showing the answer

function percent(p) { return `${(100 * p).toFixed(1)}%`; }

function showNothing() {
  state.result = null;
  $("answer").innerHTML = '<span class="muted">draw a digit</span>';
  delete $("answer").dataset.label;
  $("top3").innerHTML = "";
  $("error").hidden = true;
  $("early-exit").hidden = true;
  $("order-info").innerHTML = "&nbsp;";
  $("step").innerHTML = "&nbsp;";
  $("play").disabled = $("scrub").disabled = true;
  $("scrub").value = state.cursor = PIXELS;  // the next answer starts at its end
  stopPlaying();
  drawSeen();
  drawChart();
}

function showError(message) {
  showNothing();
  $("answer").innerHTML = '<span class="muted">no answer</span>';
  $("error").textContent = message;
  $("error").hidden = false;
}

function show(result) {
  state.result = result;
  state.rank = new Int32Array(PIXELS);
  result.order.forEach((pixel, position) => { state.rank[pixel] = position; });
  state.cursor = result.pixels_read;
  $("error").hidden = true;

  const answer = $("answer");
  answer.dataset.label = String(result.label);
  answer.innerHTML = "";
  const digit = document.createElement("span");
  digit.className = "digit";
  digit.style.color = COLOURS[result.label];
  digit.textContent = result.label;
  const text = document.createElement("span");
  text.innerHTML = `<span class="prob">p = ${result.probability.toFixed(3)}</span><br>` +
    `<span class="muted small">after ${result.pixels_read} of ${PIXELS} pixels, model ` +
    `${result.model}</span>`;
  answer.append(digit, text);

  const top3 = $("top3");
  top3.innerHTML = "";
  for (const { label, probability } of result.top3) {
    const item = document.createElement("li");
    item.innerHTML = `<span class="label" style="color:${COLOURS[label]}">${label}</span>` +
      `<span class="bar"><span style="width:${(100 * probability).toFixed(1)}%;` +
      `background:${COLOURS[label]}"></span></span><span class="value">${percent(probability)}</span>`;
    top3.append(item);
  }

  const warning = $("warning");
  warning.textContent = result.warning ? `Warning: ${result.warning}.` : "";
  warning.hidden = !result.warning;

  const model = state.models[result.model] || {};
  const early = $("early-exit");
  if (model.early_exit_threshold != null) {
    const p = Number(model.early_exit_threshold).toPrecision(4);
    const kind = model.calibrated ? "calibrated " : "";
    early.textContent = result.pixels_read < PIXELS
      ? `Early exit at ${kind}p \u2265 ${p} (the model's recorded threshold): ` +
        `answered after ${result.pixels_read} of ${PIXELS} pixels.`
      : `Early exit at ${kind}p \u2265 ${p}: never that sure, so all ${PIXELS} pixels were read.`;
    early.hidden = false;
  } else {
    early.hidden = true;
  }
  $("order-info").textContent = model.order === "permuted"
    ? "Bright: read so far, in the psMNIST order; red: the pixel being read."
    : "Bright: read so far, row by row; red: the pixel being read.";

  const scrub = $("scrub");
  scrub.disabled = $("play").disabled = false;
  scrub.max = PIXELS;
  scrub.value = state.cursor;
  moveCursor(state.cursor);
}

// ---------------------------------------------------------------- the 28x28 view

const seenPen = seen.getContext("2d");
const cell = document.createElement("canvas"); // 28x28, scaled up without smoothing
cell.width = cell.height = SIZE;
const cellPen = cell.getContext("2d");

function drawSeen() {
  seenPen.fillStyle = "#000";
  seenPen.fillRect(0, 0, seen.width, seen.height);
  const result = state.result;
  if (!result) return;
  const image = cellPen.createImageData(SIZE, SIZE);
  for (let i = 0; i < PIXELS; i++) {
    const value = result.pixels[Math.floor(i / SIZE)][i % SIZE];
    const read = state.rank[i] < state.cursor;
    // Read pixels in grey levels as the model got them; unread ones dimmed and blue,
    // so the reading order shows as the cursor moves.
    const grey = Math.round(255 * value);
    image.data.set(read ? [grey, grey, grey, 255]
                        : [Math.round(grey * 0.3), Math.round(grey * 0.35) + 18,
                           Math.round(grey * 0.55) + 34, 255], 4 * i);
  }
  cellPen.putImageData(image, 0, 0);
  seenPen.imageSmoothingEnabled = false;
  seenPen.drawImage(cell, 0, 0, seen.width, seen.height);
  // The pixel being read.
  const scale = seen.width / SIZE;
  const pixel = result.order[Math.max(state.cursor - 1, 0)];
  seenPen.strokeStyle = "#ff3b30";
  seenPen.lineWidth = 3;
  seenPen.strokeRect((pixel % SIZE) * scale + 1.5, Math.floor(pixel / SIZE) * scale + 1.5,
                     scale - 3, scale - 3);
}

// ---------------------------------------------------------------- the chart

// The plot's margins in CSS px; left and right are style.css's, which the scrubber follows.
const chartStyle = getComputedStyle(chart);
const MARGIN = {
  left: parseFloat(chartStyle.getPropertyValue("--chart-left")) || 44,
  right: parseFloat(chartStyle.getPropertyValue("--chart-right")) || 14,
  top: 12,
  bottom: 30,
};

function chartGeometry() {
  const dpr = window.devicePixelRatio || 1;
  const width = chart.clientWidth || 1120, height = chart.clientHeight || 260;
  if (chart.width !== Math.round(width * dpr) || chart.height !== Math.round(height * dpr)) {
    chart.width = Math.round(width * dpr);
    chart.height = Math.round(height * dpr);
  }
  const ctx = chart.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  const plotW = width - MARGIN.left - MARGIN.right, plotH = height - MARGIN.top - MARGIN.bottom;
  return {
    ctx, width, height,
    x: (step) => MARGIN.left + plotW * step / PIXELS,
    y: (p) => MARGIN.top + plotH * (1 - p),
    step: (px) => Math.round((px - MARGIN.left) / plotW * PIXELS),
  };
}

function drawChart() {
  const g = chartGeometry();
  const { ctx } = g;
  ctx.clearRect(0, 0, g.width, g.height);
  ctx.font = "12px system-ui, sans-serif";
  ctx.lineWidth = 1;
  // Axes and grid: probability 0..1, pixels read 0..784 (every 4 rows).
  ctx.strokeStyle = "#e3e7ee";
  ctx.fillStyle = "#667085";
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (const p of [0, 0.25, 0.5, 0.75, 1]) {
    ctx.beginPath(); ctx.moveTo(g.x(0), g.y(p)); ctx.lineTo(g.x(PIXELS), g.y(p)); ctx.stroke();
    ctx.fillText(p.toFixed(2), g.x(0) - 6, g.y(p));
  }
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  for (let step = 0; step <= PIXELS; step += 112) {
    ctx.beginPath(); ctx.moveTo(g.x(step), g.y(0)); ctx.lineTo(g.x(step), g.y(1)); ctx.stroke();
    ctx.fillText(String(step), g.x(step), g.y(0) + 5);
  }
  ctx.fillText("pixels read", g.x(PIXELS / 2), g.y(0) + 17);
  const result = state.result;
  if (!result) {
    chart.dataset.drawn = "false";
    return;
  }
  const early = (state.models[result.model] || {}).early_exit_threshold;
  chart.dataset.exitLabel = "none";  // (for the tests)
  if (early != null && result.pixels_read < PIXELS) { // where early exit stopped, if it did
    ctx.save();
    ctx.setLineDash([5, 4]);
    ctx.strokeStyle = "#444";
    ctx.beginPath(); ctx.moveTo(g.x(result.pixels_read), g.y(0));
    ctx.lineTo(g.x(result.pixels_read), g.y(1)); ctx.stroke();
    ctx.fillStyle = "#444";
    const label = `early exit (p \u2265 ${Number(early).toPrecision(4)})`;
    // Right of the line, or left of it where the label would run off the chart.
    const room = g.width - (g.x(result.pixels_read) + 4);
    const right = ctx.measureText(label).width <= room;
    chart.dataset.exitLabel = right ? "right" : "left";  // of the line (for the tests)
    ctx.textAlign = right ? "left" : "right";
    // Half-way up: past the exit the curves keep to 1 (the answer) and 0 (the rest).
    ctx.textBaseline = "middle";
    ctx.fillText(label, g.x(result.pixels_read) + (right ? 4 : -4), g.y(0.5));
    ctx.restore();
  }
  // One line per class; the answer's on top and thicker.
  const classes = [...Array(10).keys()].filter((c) => c !== result.label).concat([result.label]);
  for (const c of classes) {
    ctx.strokeStyle = COLOURS[c];
    ctx.lineWidth = c === result.label ? 2.5 : 1.3;
    ctx.globalAlpha = c === result.label ? 1 : 0.8;
    ctx.beginPath();
    result.probabilities.forEach((row, i) => {
      const x = g.x(i + 1), y = g.y(row[c]);
      if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
    });
    ctx.stroke();
  }
  ctx.globalAlpha = 1;
  // The cursor, linked to the 28x28 view and the scrubber.
  const x = g.x(state.cursor);
  ctx.strokeStyle = "#ff3b30";
  ctx.lineWidth = 1.5;
  ctx.beginPath(); ctx.moveTo(x, g.y(0)); ctx.lineTo(x, g.y(1)); ctx.stroke();
  const row = result.probabilities[state.cursor - 1];
  for (let c = 0; c < 10; c++) {
    ctx.fillStyle = COLOURS[c];
    ctx.beginPath(); ctx.arc(x, g.y(row[c]), 3, 0, 2 * Math.PI); ctx.fill();
  }
  chart.dataset.drawn = "true";
  chart.dataset.steps = String(result.probabilities.length);
  chart.dataset.read = String(result.pixels_read);
}

function drawLegend() {
  $("legend").innerHTML = COLOURS.map((colour, c) =>
    `<span><i style="background:${colour}"></i>${c}</span>`).join("");
}

// ---------------------------------------------------------------- cursor, scrub and play

function moveCursor(pixels) {
  const result = state.result;
  if (!result) return;
  state.cursor = Math.min(Math.max(Math.round(pixels), 1), PIXELS);
  $("scrub").value = state.cursor;
  const pixel = result.order[state.cursor - 1];
  const row = result.probabilities[state.cursor - 1];
  let leader = 0;
  for (let c = 1; c < 10; c++) if (row[c] > row[leader]) leader = c;
  // Classes level with the leader as shown (to 0.1%): at first all ten are at 10.0%.
  const level = row.filter((p) => percent(p) === percent(row[leader])).length;
  const leading = level > 1 ? `${level} digits level at ${percent(row[leader])}`
    : `leading ${leader} at ${percent(row[leader])}`;
  $("step").textContent = `${state.cursor} of ${PIXELS} pixels read (now row ` +
    `${Math.floor(pixel / SIZE)}, column ${pixel % SIZE}): ${leading}`;
  drawSeen();
  drawChart();
}

$("scrub").addEventListener("input", (event) => { stopPlaying(); moveCursor(+event.target.value); });

function chartPointer(event) {
  if (!state.result) return;
  stopPlaying();
  const box = chart.getBoundingClientRect();
  moveCursor(chartGeometry().step(event.clientX - box.left));
}
chart.addEventListener("pointerdown", (event) => {
  chart.setPointerCapture(event.pointerId);
  chartPointer(event);
});
chart.addEventListener("pointermove", (event) => {
  if (chart.hasPointerCapture(event.pointerId)) chartPointer(event);
});

$("play").addEventListener("click", () => (state.playing ? stopPlaying() : play()));

function play() {
  if (!state.result) return;
  if (state.cursor >= PIXELS) moveCursor(1);
  state.playing = true;
  $("play").innerHTML = "&#10074;&#10074; Pause";
  let last = performance.now();
  const frame = (now) => {
    if (!state.playing) return;
    moveCursor(state.cursor + Math.max(1, (now - last) * PLAY_PIXELS_PER_S / 1000));
    last = now;
    if (state.cursor >= PIXELS) stopPlaying();
    else requestAnimationFrame(frame);
  };
  requestAnimationFrame(frame);
}

function stopPlaying() {
  state.playing = false;
  $("play").innerHTML = "&#9654; Play";
}

window.addEventListener("resize", drawChart);

// ---------------------------------------------------------------- start

redraw();
drawLegend();
showNothing();
loadModels().then(() => { document.body.dataset.ready = "true"; }).catch((error) => {
  showError(`cannot load the models (${error.message})`);
});
