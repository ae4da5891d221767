"""The web page of the service: upload an image, see its PCA feature map, its CLS attention map,
its classes (a fine-tuned model) and nearest neighbours; upload frames (or an animated
GIF/PNG/WebP), see their PCA video.

Plain HTML and JavaScript in one string (no CDN, no build step, no package data to ship): it
calls ``/v1/pca``, ``/v1/attention``, ``/v1/classify`` (when ``/healthz`` names classes),
``/v1/neighbours``, ``/v1/index/items/{id}/image`` and ``/v1/pca-video`` of the same process.
Element ids the browser test relies on: ``file``, ``pca``, ``attention``, ``attention-caption``,
``attention-heads``, ``classes`` (an ``li`` per class: its name, then its probability), ``neighbours``,
``frames``, ``pca-video``, ``status``; an image that has finished loading gets ``data-ready``.
"""

PAGE_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>dinoflow serve</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; }
  .row { display: flex; gap: 1.5rem; flex-wrap: wrap; align-items: flex-start; }
  figure { margin: 0; text-align: center; font-size: 0.8rem; }
  img.big { width: 224px; height: 224px; object-fit: cover; image-rendering: pixelated; border: 1px solid #ccc; }
  img.thumb { width: 112px; height: 112px; object-fit: cover; border: 1px solid #ccc; }
  #status { color: #a00; min-height: 1.2rem; }
  code { background: #f3f3f3; padding: 0 0.2rem; }
</style>
</head>
<body>
<h1>dinoflow serve</h1>
<p id="model"></p>
<p><input type="file" id="file" accept="image/*"> k = <input type="number" id="k" value="5" min="1" max="100"
   style="width: 4rem"></p>
<p id="status"></p>
<div class="row">
  <figure><img id="input" class="big" alt=""><figcaption>input</figcaption></figure>
  <figure><img id="pca" class="big" alt=""><figcaption>PCA of the patch features (RGB = first 3 components)</figcaption></figure>
  <figure><img id="attention" class="big" alt=""><figcaption id="attention-caption">CLS attention (last block, mean
    of the heads)</figcaption></figure>
</div>
<figure><img id="attention-heads" alt="" style="height: 112px; image-rendering: pixelated; border: 1px solid #ccc">
  <figcaption>CLS attention of each head (each stretched alone)</figcaption></figure>
<div id="classes-section" hidden><h2>Classes</h2><ol id="classes"></ol></div>
<h2>Nearest images</h2>
<div class="row" id="neighbours"></div>
<h2>PCA video</h2>
<p>Frames (several images, or an animated GIF/PNG/WebP), one PCA basis for all of them:
   <input type="file" id="frames" accept="image/*" multiple> fps = <input type="number" id="fps" value="4"
   min="0.5" max="30" step="0.5" style="width: 4rem"></p>
<div class="row">
  <figure><img id="pca-video" class="big" alt=""><figcaption id="pca-video-caption">PCA video</figcaption></figure>
</div>
<script>
const statusLine = document.getElementById("status");
async function detail(response) {
  try { return (await response.json()).detail; } catch (e) { return response.statusText; }
}
function show(img, blob) {  // data-ready once the picture is decoded (the browser test waits for it)
  img.removeAttribute("data-ready");
  img.onload = () => img.setAttribute("data-ready", "1");
  img.src = URL.createObjectURL(blob);
}
let classCount = 0;  // a fine-tuned model's classes (0: a backbone alone)
fetch("healthz").then(r => r.json()).then(h => {
  classCount = h.classes === null ? 0 : h.classes.length;
  document.getElementById("classes-section").hidden = classCount === 0;
  document.getElementById("model").innerHTML = "model <code>" + h.model + "</code>" +
    (h.model_version === null ? "" : " (version " + h.model_version + ")") + ", image size " + h.image_size +
    ", index " + (h.index_size === null ? "none (start with --index)" : h.index_size + " images") +
    (classCount ? ", " + classCount + " classes" : "");
});
document.getElementById("file").addEventListener("change", async (event) => {
  const file = event.target.files[0];
  if (!file) return;
  statusLine.textContent = "";
  document.getElementById("input").src = URL.createObjectURL(file);
  const form = () => { const f = new FormData(); f.append("images", file); return f; };
  const pca = await fetch("v1/pca", { method: "POST", body: form() });
  if (!pca.ok) { statusLine.textContent = "PCA: " + await detail(pca); return; }
  show(document.getElementById("pca"), await pca.blob());
  const looked = await fetch("v1/attention", { method: "POST", body: form() });
  if (!looked.ok) { statusLine.textContent = "attention: " + await detail(looked); return; }
  document.getElementById("attention-caption").textContent = "CLS attention (last block, mean of the heads); " +
    looked.headers.get("X-High-Norm-Tokens") + " high-norm patch tokens";
  show(document.getElementById("attention"), await looked.blob());
  const heads = await fetch("v1/attention?heads=true", { method: "POST", body: form() });
  if (!heads.ok) { statusLine.textContent = "attention heads: " + await detail(heads); return; }
  show(document.getElementById("attention-heads"), await heads.blob());
  const k = document.getElementById("k").value;
  if (classCount > 0) {
    const ranked = document.getElementById("classes");
    ranked.replaceChildren();
    const top = Math.min(Number(k), classCount);
    const classified = await fetch("v1/classify?k=" + top, { method: "POST", body: form() });
    if (!classified.ok) { statusLine.textContent = "classes: " + await detail(classified); return; }
    for (const hit of (await classified.json()).results[0]) {
      const item = document.createElement("li");
      item.textContent = hit.class + "  " + (100 * hit.probability).toFixed(1) + " %";
      ranked.append(item);
    }
  }
  const list = document.getElementById("neighbours");
  list.replaceChildren();
  const found = await fetch("v1/neighbours?k=" + encodeURIComponent(k), { method: "POST", body: form() });
  if (!found.ok) { statusLine.textContent = "neighbours: " + await detail(found); return; }
  for (const hit of (await found.json()).results[0]) {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.className = "thumb";
    img.src = "v1/index/items/" + hit.id + "/image";
    const caption = document.createElement("figcaption");
    caption.textContent = "#" + (hit.rank + 1) + "  " + hit.score.toFixed(3);
    caption.title = hit.key;
    figure.append(img, caption);
    list.append(figure);
  }
});
document.getElementById("frames").addEventListener("change", async (event) => {
  const files = Array.from(event.target.files);
  if (!files.length) return;
  statusLine.textContent = "";
  const form = new FormData();
  for (const file of files) form.append("images", file);
  const fps = document.getElementById("fps").value;
  const video = await fetch("v1/pca-video?fps=" + encodeURIComponent(fps), { method: "POST", body: form });
  if (!video.ok) { statusLine.textContent = "PCA video: " + await detail(video); return; }
  document.getElementById("pca-video-caption").textContent =
    "PCA video, " + video.headers.get("X-Frame-Count") + " frames (one basis for all)";
  show(document.getElementById("pca-video"), await video.blob());
});
</script>
</body>
</html>
"""
