"""The playground page served at ``/``: one static HTML file that calls the public endpoints.

Prompt → images (``POST v1/generate``), upload → caption in the chosen language (``POST
v1/caption``: auto / English / Chinese; both with an optional best-of-n count), and the served model version (``GET v1/model``). An optional bearer token field is sent as ``Authorization``.
"""

import html
import json

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>visgen playground</title>
<style>
 body { font: 15px/1.4 system-ui, sans-serif; max-width: 52rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
 h1 { font-size: 1.4rem; } section { border: 1px solid #ddd; border-radius: 6px; padding: 1rem; margin: 1rem 0; }
 input[type=text] { width: 100%; box-sizing: border-box; padding: .4rem; font-size: 1rem; }
 #images img { width: 128px; height: 128px; image-rendering: pixelated; margin: 4px; border: 1px solid #ccc; }
 .error { color: #b00020; } .muted { color: #666; font-size: .9rem; }
 label { margin-right: 1rem; }
</style>
</head>
<body>
<h1>visgen playground</h1>
<p class="muted">Model: <span id="model">loading…</span></p>

<section>
 <h2>Text → image</h2>
 <form id="gen-form">
  <input type="text" id="prompt" maxlength="__MAX_PROMPT__" placeholder="a red circle left of a blue square / 两个绿色的三角形" required>
  <p>
   <label>images <input type="number" id="n" min="1" max="__MAX_N__" value="4"></label>
   <label>seed <input type="number" id="seed" min="0" value="0"></label>
   <label title="draw this many per image and keep the one the model judges best; empty: the model's default">best of
    <input type="number" id="gen-candidates" min="1" max="__MAX_CANDIDATES__" placeholder="default"></label>
   <button type="submit" id="gen-button">Generate</button>
  </p>
 </form>
 <div id="images"></div>
 <p id="gen-status" class="muted"></p>
</section>

<section>
 <h2>Image → text</h2>
 <form id="cap-form">
  <input type="file" id="file" accept="image/png,image/jpeg,image/webp" required>
  <label>language <select id="cap-language">
   <option value="auto" selected>auto (the model chooses)</option>
   <option value="en">English</option>
   <option value="zh">中文 (Chinese)</option>
  </select></label>
  <label title="write this many captions and keep the one the model judges best; empty: the model's default">best of
   <input type="number" id="cap-candidates" min="1" max="__MAX_CANDIDATES__" placeholder="default"></label>
  <button type="submit" id="cap-button">Caption</button>
 </form>
 <p>Caption: <strong id="caption"></strong></p>
 <p id="cap-status" class="muted"></p>
</section>

<details><summary class="muted">Access token</summary>
 <input type="text" id="token" placeholder="bearer token, if the server requires one" autocomplete="off">
</details>

<script>
const BASE = __BASE__;  // the app's route prefix, ending with '/'
const $ = (id) => document.getElementById(id);

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const t = $("token").value.trim();
  if (t) h["Authorization"] = "Bearer " + t;
  return h;
}

async function call(path, options) {
  const res = await fetch(BASE + path, options);
  const body = await res.json().catch(() => ({}));
  if (!res.ok) {
    const e = body.error || {};
    throw new Error((e.message || res.statusText) + (body.request_id ? " (request " + body.request_id + ")" : ""));
  }
  return body;
}

async function loadModel() {
  try {
    const m = await call("v1/model", {headers: headers()});
    const scores = Object.entries(m.eval || {}).map(([k, v]) => k + " " + v).join(", ");
    $("model").textContent = m.name + " version " + m.version + (scores ? " — " + scores : "");
  } catch (err) {
    $("model").textContent = "unavailable: " + err.message;
  }
}

$("gen-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  $("gen-status").textContent = "drawing…"; $("gen-status").className = "muted";
  const t0 = performance.now();
  try {
    const body = {prompt: $("prompt").value, n: parseInt($("n").value, 10), seed: parseInt($("seed").value, 10)};
    if ($("gen-candidates").value) body.candidates = parseInt($("gen-candidates").value, 10);
    const r = await call("v1/generate", {method: "POST", headers: headers({"Content-Type": "application/json"}),
                                         body: JSON.stringify(body)});
    $("images").replaceChildren(...r.images.map((im) => {
      const img = document.createElement("img");
      img.src = "data:image/png;base64," + im.png_base64; img.alt = body.prompt + " (seed " + im.seed + ")";
      img.className = "generated";
      return img;
    }));
    $("gen-status").textContent = r.images.length + " image(s) from version " + r.version + " in " +
      Math.round(performance.now() - t0) + " ms";
  } catch (err) {
    $("gen-status").textContent = err.message; $("gen-status").className = "error";
  }
});

$("cap-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  $("cap-status").textContent = "reading…"; $("cap-status").className = "muted";
  try {
    const form = new FormData();
    form.append("image", $("file").files[0]);
    form.append("language", $("cap-language").value);
    if ($("cap-candidates").value) form.append("candidates", $("cap-candidates").value);
    const r = await call("v1/caption", {method: "POST", headers: headers(), body: form});
    $("caption").textContent = r.caption;
    $("cap-status").textContent = "version " + r.version;
  } catch (err) {
    $("cap-status").textContent = err.message; $("cap-status").className = "error";
  }
});

$("token").addEventListener("change", loadModel);  // a server with a token answers v1/model only with it
loadModel();
</script>
</body>
</html>
"""


def playground_html(route_prefix: str, max_prompt_chars: int = 500, max_n: int = 8, max_candidates: int = 16) -> str:
    """The page, with the endpoints resolved against ``route_prefix`` (so it works under any prefix)."""
    base = route_prefix.rstrip("/") + "/"
    return (PAGE.replace("__BASE__", json.dumps(base))
            .replace("__MAX_PROMPT__", html.escape(str(max_prompt_chars)))
            .replace("__MAX_N__", html.escape(str(max_n)))
            .replace("__MAX_CANDIDATES__", html.escape(str(max_candidates))))
