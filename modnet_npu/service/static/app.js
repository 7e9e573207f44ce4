// The matting page: one request per photo (the matte); the cutout and every
// composite are made here, on canvases, so changing the background costs no
// request. With "Clean edge colours" the request is for the server's cutout
// with dc=true (the colours estimated at soft edges), and the matte is its
// alpha. Plain script, no libraries: the page must work without internet.
"use strict";

const $ = (id) => document.getElementById(id);

const state = {
  file: null, // the photo's File, asked again when "Clean edge colours" changes
  original: null, // HTMLImageElement of the photo
  matteBlob: null, // the matte as a PNG
  cutout: null, // canvas: the photo with the matte as alpha
  bgImage: null, // HTMLImageElement chosen as background
  name: "photo",
  turn: 0, // the latest request: an answer to an earlier one (the option changed meanwhile) is dropped
};

function setState(name) {
  document.body.dataset.state = name;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
  $("status").textContent = "";
  setState("error");
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

async function loadInfo() {
  try {
    const r = await fetch("api/info");
    const info = await r.json();
    if (info.load_error) {
      showError(`The server could not load its model: ${info.load_error}.`);
      return;
    }
    if (!info.ready) {
      $("server-info").textContent = "The server is still loading its model…";
      setTimeout(loadInfo, 2000);
      return;
    }
    $("server-info").textContent =
      `Server: ${info.backend} on ${info.device} (${info.precision}; ${info.fast_path}), ` +
      `model ${info.model.file} (${info.model.source}), model input ${info.model_size}; ` +
      `batches of up to ${info.batching.max_batch}.`;
    if (info.warning) {
      $("warning").textContent = `Warning: ${info.warning}.`;
      $("warning").hidden = false;
    }
    document.body.dataset.backend = info.backend;
    document.body.dataset.device = info.device;
  } catch (err) {
    $("server-info").textContent = `Could not ask the server what it runs on (${err.message}).`;
  }
}

function imageFrom(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the browser cannot show this image"));
    img.src = src;
  });
}

function canvasOf(width, height) {
  const c = document.createElement("canvas");
  c.width = width;
  c.height = height;
  return c;
}

// The photo with the matte's grey level as its alpha channel.
function makeCutout(photo, matte) {
  const w = photo.naturalWidth;
  const h = photo.naturalHeight;
  const out = canvasOf(w, h);
  const ctx = out.getContext("2d");
  ctx.drawImage(photo, 0, 0);
  const rgba = ctx.getImageData(0, 0, w, h);
  const m = canvasOf(w, h).getContext("2d", { willReadFrequently: true });
  m.drawImage(matte, 0, 0, w, h);
  const alpha = m.getImageData(0, 0, w, h).data;
  for (let i = 3; i < rgba.data.length; i += 4) rgba.data[i] = alpha[i - 3];
  ctx.putImageData(rgba, 0, 0);
  return out;
}

// An image drawn on a canvas of its own size.
function canvasFromImage(img) {
  const out = canvasOf(img.naturalWidth, img.naturalHeight);
  out.getContext("2d").drawImage(img, 0, 0);
  return out;
}

// The matte of a cutout: its alpha as grey levels.
function matteOf(cutout) {
  const w = cutout.width;
  const h = cutout.height;
  const rgba = cutout.getContext("2d").getImageData(0, 0, w, h);
  for (let i = 0; i < rgba.data.length; i += 4) {
    const a = rgba.data[i + 3];
    rgba.data[i] = a;
    rgba.data[i + 1] = a;
    rgba.data[i + 2] = a;
    rgba.data[i + 3] = 255;
  }
  const out = canvasOf(w, h);
  out.getContext("2d").putImageData(rgba, 0, 0);
  return out;
}

function pngOf(canvas) {
  return new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
}

// Scale an image to cover w x h, keeping its aspect, centred (as the server's imaging.cover).
function drawCover(ctx, img, w, h) {
  const iw = img.naturalWidth;
  const ih = img.naturalHeight;
  const scale = Math.max(w / iw, h / ih);
  const dw = iw * scale;
  const dh = ih * scale;
  ctx.drawImage(img, (w - dw) / 2, (h - dh) / 2, dw, dh);
}

function chosenBackground() {
  const choice = document.querySelector('input[name="bg"]:checked').value;
  if (choice === "image" && !state.bgImage) return "none";
  return choice;
}

// The cutout over a background: "none" keeps it transparent; "white" is the composite download's default.
function compose(background) {
  const w = state.cutout.width;
  const h = state.cutout.height;
  const out = canvasOf(w, h);
  const ctx = out.getContext("2d");
  if (background === "colour" || background === "white") {
    ctx.fillStyle = background === "white" ? "#ffffff" : $("bg-colour").value;
    ctx.fillRect(0, 0, w, h);
  } else if (background === "blur") {
    ctx.filter = `blur(${Math.max(2, 0.02 * Math.max(w, h))}px)`; // the server's blur radius
    ctx.drawImage(state.original, 0, 0);
    ctx.filter = "none";
  } else if (background === "image") {
    drawCover(ctx, state.bgImage, w, h);
  }
  ctx.drawImage(state.cutout, 0, 0);
  return out;
}

function renderResult() {
  if (!state.cutout) return;
  const background = chosenBackground();
  const made = compose(background);
  const view = $("result");
  view.width = made.width;
  view.height = made.height;
  const ctx = view.getContext("2d");
  ctx.clearRect(0, 0, view.width, view.height);
  ctx.drawImage(made, 0, 0);
  const names = { none: "Cutout", colour: "Composite (colour)", blur: "Composite (blurred photo)",
                  image: "Composite (image)" };
  $("result-caption").textContent = names[background];
  view.dataset.background = background;
}

async function errorText(response) {
  try {
    const body = await response.json(); // {"detail": "..."}: FastAPI's error body, as rembg's
    if (body && typeof body.detail === "string" && body.detail) return body.detail;
  } catch (_) {
    // not JSON: fall through to the status line
  }
  return response.statusText || "unknown error";
}

const STATUS_WORDS = {
  413: "The photo is too large for this server",
  415: "That file is not an image the server can read",
  422: "The server did not accept a parameter",
  501: "The server cannot do this",
  503: "The server is busy or still starting; try again in a moment",
  504: "The server took too long",
};

async function matte(file) {
  clearError();
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    showError(`“${file.name}” is not an image (it is ${file.type}); choose a photo.`);
    return;
  }
  state.file = file;
  state.name = (file.name || "photo").replace(/\.[^.]*$/, "") || "photo";
  setState("working");
  const clean = $("dc").checked;
  $("status").textContent = clean ? "Matting and cleaning the edge colours…" : "Matting…";
  const form = new FormData();
  form.append("file", file, file.name || "pasted.png");
  const started = performance.now();
  const ask = clean ? "api/matte?mode=cutout&format=png&dc=true" : "api/matte?mode=matte&format=png";
  const turn = ++state.turn;
  let response;
  try {
    response = await fetch(ask, { method: "POST", body: form });
  } catch (err) {
    if (turn === state.turn) showError(`Could not reach the server: ${err.message}.`);
    return;
  }
  if (turn !== state.turn) return;
  if (!response.ok) {
    const words = STATUS_WORDS[response.status] || "The server refused the photo";
    showError(`${words} (HTTP ${response.status}): ${await errorText(response)}.`);
    return;
  }
  const blob = await response.blob();
  if (turn !== state.turn) return;
  const elapsed = performance.now() - started;
  await showResults(file, response, blob, clean, elapsed);
}

// The server's answer: the matte (the cutout is made here), or with clean edge colours its cutout
// (the matte is its alpha).
async function showResults(file, response, blob, clean, elapsed) {
  try {
    const [photo, answer] = await Promise.all([
      imageFrom(URL.createObjectURL(file)),
      imageFrom(URL.createObjectURL(blob)),
    ]);
    state.original = photo;
    $("original").src = photo.src;
    if (clean) {
      state.cutout = canvasFromImage(answer);
      state.matteBlob = await pngOf(matteOf(state.cutout));
      $("matte").src = URL.createObjectURL(state.matteBlob);
    } else {
      state.matteBlob = blob;
      $("matte").src = answer.src;
      state.cutout = makeCutout(photo, answer);
    }
  } catch (err) {
    showError(`The result could not be shown: ${err.message}.`);
    return;
  }
  $("results").hidden = false;
  $("background").disabled = false;
  for (const id of ["dl-matte", "dl-cutout", "dl-composite"]) $(id).disabled = false;
  renderResult();
  const h = response.headers;
  document.body.dataset.clean = clean ? "yes" : "no";
  $("status").textContent =
    `Done in ${elapsed.toFixed(0)} ms${clean ? ", edge colours cleaned" : ""} (inference ${h.get("X-Inference-Ms")} ms, ` +
    `batch of ${h.get("X-Batch-Size")}, model input ${h.get("X-Model-Size")}) on ` +
    `${document.body.dataset.backend || "?"} / ${document.body.dataset.device || "?"}.`;
  setState("done");
}

function download(blob, suffix) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = `${state.name}_${suffix}.png`;
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
}

function downloadCanvas(canvas, suffix) {
  canvas.toBlob((blob) => download(blob, suffix), "image/png");
}

async function setBackgroundImage(file) {
  if (!file) return;
  try {
    state.bgImage = await imageFrom(URL.createObjectURL(file));
  } catch (err) {
    showError(`The background “${file.name}” cannot be used: ${err.message}.`);
    return;
  }
  document.querySelector('input[name="bg"][value="image"]').checked = true;
  renderResult();
}

function wire() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => matte(e.target.files[0]));
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    matte(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    const item = [...e.clipboardData.items].find((it) => it.kind === "file");
    if (item) matte(item.getAsFile());
  });
  for (const radio of document.querySelectorAll('input[name="bg"]')) radio.addEventListener("change", renderResult);
  $("bg-colour").addEventListener("input", () => {
    document.querySelector('input[name="bg"][value="colour"]').checked = true;
    renderResult();
  });
  $("bg-file").addEventListener("change", (e) => setBackgroundImage(e.target.files[0]));
  $("dc").addEventListener("change", () => { if (state.file) matte(state.file); }); // one request, as for a new photo
  $("dl-matte").addEventListener("click", () => download(state.matteBlob, "matte"));
  $("dl-cutout").addEventListener("click", () => downloadCanvas(state.cutout, "cutout"));
  $("dl-composite").addEventListener("click", () => {
    const background = chosenBackground();
    downloadCanvas(compose(background === "none" ? "white" : background), "composite");
  });
}

wire();
loadInfo();
