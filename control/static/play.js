// Key presses become model steps. A press queues one step, so a quick tap is never lost; while a
// key is held the loop keeps stepping, one request at a time: the model's own rate.
"use strict";
const KEYS = {ArrowLeft: "LEFT", ArrowRight: "RIGHT", " ": "FIRE", ArrowDown: "NOOP"};
const queue = [];
let held = null;
let running = false;
const stamps = [];

function show(state) {
  document.getElementById("frame").src = state.frame;
  document.getElementById("step").textContent = state.step;
  document.getElementById("action").textContent = state.action;
  const t = state.timing_ms;
  document.getElementById("timing").textContent =
    `controller ${t.controller.toFixed(1)} ms, decoder ${t.decoder.toFixed(1)} ms, png ${t.png.toFixed(1)} ms`;
  const now = performance.now();
  stamps.push(now);
  while (stamps.length > 1 && now - stamps[0] > 2000) stamps.shift();
  if (stamps.length > 1) {
    document.getElementById("fps").textContent =
      ((stamps.length - 1) * 1000 / (now - stamps[0])).toFixed(1);
  }
}

function showError(message) {
  const box = document.getElementById("error");
  box.textContent = message;
  box.hidden = false;
}

async function call(method, path, body) {
  const response = await fetch(path, {method, headers: {"Content-Type": "application/json"},
                                      body: body === undefined ? undefined : JSON.stringify(body)});
  const payload = await response.json();
  if (!response.ok) throw new Error(payload.error || response.statusText);
  return payload;
}

async function pump() {
  if (running) return;
  running = true;
  try {
    for (;;) {
      const auto = document.getElementById("run").checked;
      const action = queue.length ? queue.shift() : (held || (auto ? "NOOP" : null));
      if (action === null) break;
      show(await call("POST", "/api/step", {action}));
    }
  } catch (error) {
    showError(error.message);
  } finally {
    running = false;
  }
}

document.addEventListener("keydown", (event) => {
  const action = KEYS[event.key];
  if (action === undefined) return;
  event.preventDefault();
  if (event.repeat) return;          // the held-key loop already runs at the model's rate
  held = action;
  queue.push(action);
  pump();
});

document.addEventListener("keyup", (event) => {
  if (KEYS[event.key] === held) held = null;
});

// space is FIRE: a focused button or checkbox must not take it as a click
document.getElementById("run").addEventListener("change", (event) => { event.target.blur(); pump(); });

document.getElementById("restart").addEventListener("click", async (event) => {
  event.currentTarget.blur();
  try {
    queue.length = 0;
    show(await call("POST", "/api/restart"));
  } catch (error) {
    showError(error.message);
  }
});

call("GET", "/api/state").then(show).catch((error) => showError(error.message));
