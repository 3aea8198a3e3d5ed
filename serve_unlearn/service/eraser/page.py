"""The ``/erase`` page: upload a photo, paint the mask (mouse, pen or finger), erase, compare, download.

Plain HTML and JavaScript in one string (no build step, no external files): the mask is painted at the photo's own
resolution on a hidden canvas (white on black) and sent with the photo as multipart to ``/v1/images/erase``.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>serve-unlearn: erase an object</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
  h1 { font-size: 1.3rem; margin: 0 0 .8rem; }
  .controls { display: flex; flex-wrap: wrap; gap: .8rem 1.2rem; align-items: center; margin-bottom: 1rem; }
  .controls label { display: flex; gap: .4rem; align-items: center; }
  .controls input[type=number] { width: 5.5rem; }
  .panes { display: flex; flex-wrap: wrap; gap: 1rem; }
  .pane { flex: 1 1 320px; max-width: 640px; }
  .pane h2 { font-size: .95rem; margin: .2rem 0; }
  .stack { position: relative; line-height: 0; border: 1px solid #ccc; background: #f4f4f4; min-height: 120px; }
  .stack canvas { width: 100%; height: auto; }
  #overlay { position: absolute; left: 0; top: 0; cursor: crosshair; touch-action: none; opacity: .55; }
  #result { width: 100%; height: auto; border: 1px solid #ccc; background: #f4f4f4; min-height: 120px; }
  button { padding: .45rem 1.1rem; font-size: 1rem; }
  #status { min-height: 1.3rem; margin: .6rem 0; }
  .error { color: #b00020; }
</style>
</head>
<body>
<h1>Remove an object (Attentive Eraser)</h1>
<div class="controls">
  <input id="file" type="file" accept="image/png,image/jpeg,image/webp,image/bmp,image/gif,image/tiff">
  <label>brush <input id="brush" type="range" min="2" max="120" value="24"> <span id="brushval">24</span> px</label>
  <button id="clear" type="button">clear mask</button>
  <label>steps <input id="steps" type="number" min="1" max="1000" placeholder="default"></label>
  <label>seed <input id="seed" type="number" min="0" placeholder="random"></label>
  <label><input id="pasteback" type="checkbox" checked> keep pixels outside the mask</label>
  <button id="erase" type="button" disabled>Erase</button>
</div>
<div id="status">Choose a photo, paint over the object to remove, then press Erase.</div>
<div class="panes">
  <div class="pane"><h2>original + mask</h2>
    <div class="stack"><canvas id="photo" width="0" height="0"></canvas><canvas id="overlay"></canvas></div></div>
  <div class="pane"><h2>result <a id="download" download="erased.png" hidden>download</a></h2>
    <img id="result" alt=""></div>
</div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const photo = $("photo"), overlay = $("overlay"), mask = document.createElement("canvas");
let file = null, painting = false, last = null, painted = false;

function setStatus(text, error) { $("status").textContent = text; $("status").className = error ? "error" : ""; }
function brush() { return Number($("brush").value) * photo.width / Math.max(1, photo.getBoundingClientRect().width); }
$("brush").oninput = () => { $("brushval").textContent = $("brush").value; };

$("file").onchange = () => {
  file = $("file").files[0];
  if (!file) return;
  const img = new Image();
  img.onload = () => {
    for (const c of [photo, overlay, mask]) { c.width = img.naturalWidth; c.height = img.naturalHeight; }
    photo.getContext("2d").drawImage(img, 0, 0);
    clearMask();
    $("erase").disabled = false;
    setStatus(`${img.naturalWidth}x${img.naturalHeight}: paint over what to remove.`);
    URL.revokeObjectURL(img.src);
  };
  img.onerror = () => setStatus("This browser cannot show that file; try a PNG or JPEG.", true);
  img.src = URL.createObjectURL(file);
};

function clearMask() {
  const m = mask.getContext("2d");
  m.fillStyle = "#000"; m.fillRect(0, 0, mask.width, mask.height);
  overlay.getContext("2d").clearRect(0, 0, overlay.width, overlay.height);
  painted = false;
}
$("clear").onclick = clearMask;

function point(ev) {
  const r = overlay.getBoundingClientRect();
  return [(ev.clientX - r.left) * overlay.width / r.width, (ev.clientY - r.top) * overlay.height / r.height];
}
function stroke(a, b) {
  for (const [ctx, colour] of [[mask.getContext("2d"), "#fff"], [overlay.getContext("2d"), "#e00"]]) {
    ctx.strokeStyle = colour; ctx.fillStyle = colour; ctx.lineCap = "round"; ctx.lineJoin = "round";
    ctx.lineWidth = brush();
    ctx.beginPath(); ctx.moveTo(a[0], a[1]); ctx.lineTo(b[0], b[1]); ctx.stroke();
    ctx.beginPath(); ctx.arc(b[0], b[1], brush() / 2, 0, 2 * Math.PI); ctx.fill();
  }
  painted = true;
}
overlay.addEventListener("pointerdown", (ev) => {
  if (!file) return;
  painting = true; overlay.setPointerCapture(ev.pointerId); last = point(ev); stroke(last, last); ev.preventDefault();
});
overlay.addEventListener("pointermove", (ev) => {
  if (!painting) return;
  const p = point(ev); stroke(last, p); last = p; ev.preventDefault();
});
for (const type of ["pointerup", "pointercancel", "pointerleave"]) overlay.addEventListener(type, () => { painting = false; });

$("erase").onclick = async () => {
  if (!file) return;
  if (!painted) { setStatus("Paint over the object first (the mask is empty).", true); return; }
  $("erase").disabled = true;
  setStatus("Erasing...");
  const started = performance.now();
  try {
    const maskBlob = await new Promise((resolve) => mask.toBlob(resolve, "image/png"));
    const form = new FormData();
    form.append("image", file);
    form.append("mask", maskBlob, "mask.png");
    if ($("steps").value !== "") form.append("num_inference_steps", $("steps").value);
    if ($("seed").value !== "") form.append("seed", $("seed").value);
    form.append("paste_back", $("pasteback").checked ? "true" : "false");
    const res = await fetch("/v1/images/erase", { method: "POST", body: form });
    if (!res.ok) {
      let message = res.statusText;
      try { message = (await res.json()).error.message; } catch (e) { /* not JSON */ }
      const retry = res.headers.get("Retry-After");
      throw new Error(`${res.status}: ${message}` + (retry ? ` (retry in ${retry} s)` : ""));
    }
    const url = URL.createObjectURL(await res.blob());
    $("result").src = url;
    $("download").href = url; $("download").hidden = false;
    const secs = ((performance.now() - started) / 1000).toFixed(1);
    setStatus(`Done in ${secs} s (seed ${res.headers.get("X-Seed")}, ${res.headers.get("X-Steps")} steps).`);
  } catch (err) {
    setStatus(String(err.message || err), true);
  } finally {
    $("erase").disabled = false;
  }
};
</script>
</body>
</html>
"""
