"""The web page of the service: upload an image, see its PCA feature map and nearest neighbours.

Plain HTML and JavaScript in one string (no CDN, no build step, no package data to ship): it
calls ``/v1/pca``, ``/v1/neighbours`` and ``/v1/index/items/{id}/image`` of the same process.
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
</div>
<h2>Nearest images</h2>
<div class="row" id="neighbours"></div>
<script>
const statusLine = document.getElementById("status");
async function detail(response) {
  try { return (await response.json()).detail; } catch (e) { return response.statusText; }
}
fetch("healthz").then(r => r.json()).then(h => {
  document.getElementById("model").innerHTML = "model <code>" + h.model + "</code>, image size " + h.image_size +
    ", index " + (h.index_size === null ? "none (start with --index)" : h.index_size + " images");
});
document.getElementById("file").addEventListener("change", async (event) => {
  const file = event.target.files[0];
  if (!file) return;
  statusLine.textContent = "";
  document.getElementById("input").src = URL.createObjectURL(file);
  const form = () => { const f = new FormData(); f.append("images", file); return f; };
  const pca = await fetch("v1/pca", { method: "POST", body: form() });
  if (!pca.ok) { statusLine.textContent = "PCA: " + await detail(pca); return; }
  document.getElementById("pca").src = URL.createObjectURL(await pca.blob());
  const list = document.getElementById("neighbours");
  list.replaceChildren();
  const k = document.getElementById("k").value;
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
</script>
</body>
</html>
"""
