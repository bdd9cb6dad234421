"""The search page (`/ui`): choose or drop a photo (or pick one of the index's images), see the ranked results as thumbnails, open one to see
the query and the result side by side with the verified correspondences drawn. Three same-origin assets,
no external CDN, no inline script (the content-security policy forbids both)."""

CSP = ("default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self'; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ilr search</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="/ui/app.css"></head>
<body>
<header><h1>ilr — search</h1><span id="live" aria-live="polite"></span></header>
<main>
<form id="form">
  <label id="drop" for="file" tabindex="0">Drop a photo here, or choose one
    <input id="file" name="image" type="file" accept="image/*"></label>
  <label>results <input id="topk" type="number" min="1" max="100" value="10"></label>
  <label><input id="rerank" type="checkbox" checked> re-rank with local features</label>
  <button id="go" type="submit">Search</button>
</form>
<section id="examples-box" hidden aria-label="examples from the index">
  <h2>…or pick one of the index's images</h2><ul id="examples"></ul></section>
<p id="error" role="alert" hidden></p>
<p id="timings"></p>
<ol id="results" aria-label="results"></ol>
<section id="detail" hidden aria-label="matches">
  <h2 id="detail-title"></h2>
  <p>green: verified inliers · red: rejected putative matches</p>
  <canvas id="canvas" width="960" height="400"></canvas>
</section>
</main>
<script src="/ui/app.js"></script>
</body></html>
"""

STYLE = """
body{font:14px system-ui,sans-serif;margin:0;color:#222}
header{display:flex;gap:16px;align-items:baseline;padding:10px 20px;border-bottom:1px solid #ddd}
h1{font-size:18px;margin:0} #live{color:#666;font-size:12px}
main{padding:16px 20px}
form{display:flex;gap:16px;align-items:center;flex-wrap:wrap}
#drop{border:2px dashed #999;padding:18px 24px;border-radius:8px;cursor:pointer}
#drop.over,#drop:focus{border-color:#2a7;outline:none}
#error{color:#b00;font-weight:600}
#results{display:flex;flex-wrap:wrap;gap:12px;list-style:none;padding:0}
#results button{display:flex;flex-direction:column;align-items:center;gap:4px;border:1px solid #ccc;
  border-radius:6px;background:#fff;padding:6px;cursor:pointer;width:180px;font:12px system-ui}
#results button:focus,#results button.sel{border-color:#2a7;box-shadow:0 0 0 2px #2a7}
#results img{max-width:168px;max-height:130px}
canvas{border:1px solid #ddd;max-width:100%}
h2{font-size:14px;margin:14px 0 6px}
#examples{display:flex;flex-wrap:wrap;gap:6px;list-style:none;padding:0;margin:0}
#examples button{border:1px solid #ccc;border-radius:4px;background:#fff;padding:2px;cursor:pointer}
#examples button:focus,#examples button.sel{border-color:#2a7;box-shadow:0 0 0 2px #2a7}
#examples img{height:64px;display:block}
"""

SCRIPT = r"""
"use strict";
const $ = (id) => document.getElementById(id);
let query = null, last = null;

function showError(msg) { const e = $("error"); e.textContent = msg; e.hidden = !msg; }

async function live() {
  try {
    const h = await (await fetch("/healthz")).json();
    $("live").textContent = h.status === "ok" ? `model ${h.model} · index ${h.index} · ${h.images} images` : h.message;
  } catch (e) { $("live").textContent = ""; }
}

const thumb = (id) => `/v1/index/images/${encodeURIComponent(id)}/thumbnail`;

// the query: {file} (a chosen or dropped photo) or {id} (an index image, searched with its stored features)
function pick(q) {
  query = q;
  if (q && q.id) $("file").value = "";
  $("drop").firstChild.textContent = !q ? "Drop a photo here, or choose one " : q.file ? q.file.name + " " : `example ${q.id} `;
  document.querySelectorAll("#examples button").forEach((b) => b.classList.toggle("sel", !!q && b.dataset.id === q.id));
}

async function examples() {
  try {
    const r = await fetch("/v1/index/images?limit=12");
    if (!r.ok) return;
    const list = $("examples");
    (await r.json()).images.forEach((im) => {
      const li = document.createElement("li"), b = document.createElement("button"), img = document.createElement("img");
      b.type = "button"; b.dataset.id = im.image_id; b.title = `${im.image_id} [${im.label}]`;
      img.src = thumb(im.image_id); img.alt = `example ${im.image_id} (${im.label})`;
      b.append(img); b.addEventListener("click", () => { pick({id: im.image_id}); search(); });
      li.append(b); list.append(li);
    });
    $("examples-box").hidden = !list.children.length;
  } catch (e) { /* no live index yet: no examples */ }
}

async function search(ev) {
  if (ev) ev.preventDefault();
  showError(""); $("results").textContent = ""; $("detail").hidden = true; $("timings").textContent = "";
  $("canvas").dataset.drawn = "0";
  if (!query) { showError("choose an image first"); return; }
  const form = new FormData();
  if (query.file) form.append("image", query.file); else form.append("image_id", query.id);
  form.append("top_k", $("topk").value);
  form.append("rerank", $("rerank").checked ? "true" : "false");
  form.append("return_matches", "true");
  $("go").disabled = true;
  try {
    const r = await fetch("/v1/search", {method: "POST", body: form});
    const body = await r.json();
    if (!r.ok) { showError(body.error ? body.error.message : `HTTP ${r.status}`); return; }
    last = body; render(body);
  } catch (e) { showError(String(e)); }
  finally { $("go").disabled = false; }
}

function render(body) {
  $("timings").textContent = "timings (ms): " + Object.entries(body.timings_ms).map(([k, v]) => `${k.replace("_ms", "")} ${Math.round(v)}`).join(", ");
  const list = $("results");
  body.results.forEach((r, i) => {
    const li = document.createElement("li"), b = document.createElement("button");
    b.type = "button"; b.className = "result"; b.dataset.index = i;
    const img = document.createElement("img");
    img.src = thumb(r.image_id); img.alt = r.image_id;
    const t = document.createElement("span");
    t.textContent = `#${r.rank} ${r.label}`;
    const s = document.createElement("span");
    s.textContent = `global ${r.global_score.toFixed(3)} · inliers ${r.inliers ?? "-"} · score ${r.score.toFixed(3)}`;
    b.append(img, t, s); b.addEventListener("click", () => detail(i)); li.append(b); list.append(li);
  });
  if (body.results.length && body.results[0].matches) detail(0);
}

function loadImage(src) { return new Promise((ok, fail) => { const i = new Image(); i.onload = () => ok(i); i.onerror = fail; i.src = src; }); }

async function detail(i) {
  const r = last.results[i];
  document.querySelectorAll("#results button").forEach((b) => b.classList.toggle("sel", Number(b.dataset.index) === i));
  $("detail").hidden = false;
  $("detail-title").textContent = `#${r.rank} ${r.image_id} [${r.label}] — inliers ${r.inliers ?? "-"}`;
  const canvas = $("canvas"), ctx = canvas.getContext("2d"), H = 360, gap = 16;
  const [qi, ti] = await Promise.all([loadImage(query.file ? URL.createObjectURL(query.file) : thumb(query.id)),
    loadImage(thumb(r.image_id))]);
  const qs = H / qi.height, ts = H / ti.height, qw = qi.width * qs, tw = ti.width * ts;
  canvas.width = qw + gap + tw; canvas.height = H;
  ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, canvas.width, H);
  ctx.drawImage(qi, 0, 0, qw, H); ctx.drawImage(ti, qw + gap, 0, tw, H);
  if (!r.matches) { canvas.dataset.drawn = "0"; return; }
  const [qW, qH] = last.query_size, [rW, rH] = r.size || [ti.width, ti.height];
  const qk = H / qH, rk = H / rH;
  let drawn = 0;
  for (const [kind, colour, width] of [["outliers", "rgb(230,60,50)", 1], ["inliers", "rgb(40,200,90)", 2]]) {
    ctx.strokeStyle = colour; ctx.lineWidth = width;
    for (const [qx, qy, cx, cy] of r.matches[kind]) {
      ctx.beginPath(); ctx.moveTo(qx * qk, qy * qk); ctx.lineTo(qw + gap + cx * rk, cy * rk); ctx.stroke();
      if (kind === "inliers") drawn++;
    }
  }
  canvas.dataset.drawn = String(drawn);
}

const drop = $("drop");
["dragenter", "dragover"].forEach((e) => drop.addEventListener(e, (ev) => { ev.preventDefault(); drop.classList.add("over"); }));
["dragleave", "drop"].forEach((e) => drop.addEventListener(e, () => drop.classList.remove("over")));
drop.addEventListener("drop", (ev) => { ev.preventDefault(); if (ev.dataTransfer.files.length) { pick({file: ev.dataTransfer.files[0]}); search(); } });
drop.addEventListener("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); $("file").click(); } });
$("file").addEventListener("change", () => { const f = $("file").files[0]; pick(f ? {file: f} : null); if (f) search(); });
$("form").addEventListener("submit", search);
live();
examples();
"""
