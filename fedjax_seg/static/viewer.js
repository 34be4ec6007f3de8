// fedjax_seg segmentation viewer: three linked planes over the JSON API of fedjax_seg/serve.py.
// Data from the server (patient ids above all) only ever reaches the page as text (textContent).
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const PLANES = ["axial", "coronal", "sagittal"];
  const DISPLAY = 280;  // longest side of a plane on screen, CSS pixels
  const S = {
    info: null, study: null, pos: [0, 0, 0],  // pos = [z, y, x]
    channel: 0, overlay: true, opacity: 0.45, window: 255, level: 128,
    cache: new Map(), pending: new Map(), searchTimer: null,
  };

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }

  async function api(url, opts) {
    const r = await fetch(url, opts);
    let body = null;
    try { body = await r.json(); } catch (e) { body = null; }
    if (!r.ok) {
      const msg = body && body.error ? body.error : `HTTP ${r.status} ${r.statusText}`;
      throw new Error(msg);
    }
    return body;
  }

  // ---- upload
  function buildForm() {
    const box = $("modality-inputs");
    box.textContent = "";
    S.info.modalities.forEach((m, i) => {
      const lab = el("label", m + " ");
      const inp = document.createElement("input");
      inp.type = "file"; inp.className = "modality-file"; inp.accept = ".nii,.gz";
      inp.dataset.channel = String(i); inp.id = "file-" + m;
      lab.appendChild(inp);
      box.appendChild(lab);
    });
    if (S.info.modalities.length <= 1) box.parentElement.hidden = true;
    $("upload-form").addEventListener("submit", upload);
  }

  function showError(msg) {
    const e = $("upload-error");
    e.textContent = msg || "";
    e.hidden = !msg;
  }

  async function upload(ev) {
    ev.preventDefault();
    showError("");
    const fd = new FormData();
    fd.append("patient_id", $("patient-id").value);
    const single = $("single-file").files;
    const per = Array.from(document.querySelectorAll(".modality-file"));
    if (single.length) {
      fd.append("files", single[0]);
    } else {
      const chosen = per.filter((i) => i.files.length);
      if (!chosen.length) { showError("choose the files to upload"); return; }
      per.forEach((i) => { if (i.files.length) fd.append("files", i.files[0]); });
    }
    let total = 0;
    for (const [k, v] of fd.entries()) if (k === "files") total += v.size;
    const limit = S.info.max_upload_mb * 1048576;
    if (total > limit) {  // the server would answer 413; say so without sending the data
      showError(`upload too large: ${(total / 1048576).toFixed(1)} MB, the limit is ${S.info.max_upload_mb} MB`);
      return;
    }
    $("upload-btn").disabled = true;
    $("job-box").hidden = false;
    setJob({ progress: 0, stage: "uploading" });
    try {
      const res = await api("/api/studies", { method: "POST", body: fd });
      await poll(res.job.id);
    } catch (e) {
      $("job-box").hidden = true;
      showError(e.message);
    } finally {
      $("upload-btn").disabled = false;
    }
  }

  function setJob(j) {
    $("job-progress").value = j.progress || 0;
    $("job-status").textContent = `${j.stage} (${Math.round(100 * (j.progress || 0))} %)`;
  }

  async function poll(jobId) {
    for (;;) {
      const j = await api("/api/jobs/" + encodeURIComponent(jobId));
      setJob(j);
      if (j.status === "done") {
        await refreshList();
        await openStudy(j.study_id);
        return;
      }
      if (j.status === "failed") throw new Error("segmentation failed: " + (j.error || "unknown error"));
      await new Promise((r) => setTimeout(r, 300));
    }
  }

  // ---- study list
  function fmt(v) { return v >= 10 ? v.toFixed(1) : v.toFixed(2); }

  async function refreshList() {
    const q = $("search").value.trim();
    const res = await api("/api/studies" + (q ? "?patient=" + encodeURIComponent(q) : ""));
    const body = $("study-list");
    body.textContent = "";
    res.studies.forEach((s) => {
      const tr = el("tr");
      tr.dataset.study = s.id;
      if (S.study && S.study.id === s.id) tr.className = "current";
      tr.appendChild(el("td", s.patient_id, "patient"));
      tr.appendChild(el("td", s.created.replace("T", " ").replace("Z", ""), "created"));
      tr.appendChild(el("td", s.volumes.map((v) => `${v.region} ${fmt(v.cm3)}`).join(" \u00b7 "), "vols"));
      tr.addEventListener("click", () => openStudy(s.id));
      body.appendChild(tr);
    });
    if (!res.studies.length) {
      const tr = el("tr"); const td = el("td", q ? "no study matches" : "no study yet", "muted");
      td.colSpan = 3; tr.appendChild(td); body.appendChild(tr);
    }
  }

  // ---- viewer
  async function openStudy(id) {
    const s = await api("/api/studies/" + encodeURIComponent(id));
    S.study = s; S.cache.clear();
    S.pos = s.shape.map((n) => Math.floor(n / 2));
    if (s.focus && s.focus.length === 3) S.pos = s.focus.slice();  // tumour centre of mass
    S.channel = Math.min(S.channel, s.modalities.length - 1);
    $("empty").hidden = true; $("viewer").hidden = false;
    $("study-title").textContent = `Patient ${s.patient_id}, ${s.created.replace("T", " ").replace("Z", " UTC")}` +
      ` - ${s.shape.join("\u00d7")} voxels (z, y, x), ${s.spacing.map((v) => v.toFixed(2)).join("\u00d7")} mm`;
    const sel = $("modality"); sel.textContent = "";
    s.modalities.forEach((m, i) => { const o = el("option", m); o.value = String(i); sel.appendChild(o); });
    sel.value = String(S.channel);
    const rows = $("volume-rows"); rows.textContent = "";
    s.volumes.forEach((v) => {
      const tr = el("tr"); tr.appendChild(el("td", v.region)); tr.appendChild(el("td", fmt(v.cm3)));
      tr.appendChild(el("td", v.voxels)); rows.appendChild(tr);
    });
    $("mask-link").href = `/api/studies/${encodeURIComponent(s.id)}/mask.nii.gz`;
    PLANES.forEach((p, a) => { const sl = $("slider-" + p); sl.max = String(s.shape[a] - 1); });
    sizeCanvases();
    document.querySelectorAll("#study-list tr").forEach((tr) => {
      tr.className = tr.dataset.study === s.id ? "current" : "";
    });
    await drawAll();
    document.body.dataset.study = s.id;
  }

  function planeDims(p) {  // [rows, cols, row spacing, col spacing] of a plane in array order
    const [Z, Y, X] = S.study.shape, [dz, dy, dx] = S.study.spacing;
    if (p === "axial") return [Y, X, dy, dx];
    if (p === "coronal") return [Z, X, dz, dx];
    return [Z, Y, dz, dy];
  }

  function sizeCanvases() {
    PLANES.forEach((p) => {
      const [r, c, sr, sc] = planeDims(p);
      const h = r * sr, w = c * sc, k = DISPLAY / Math.max(h, w);
      const cv = $("view-" + p);
      cv.width = Math.max(1, Math.round(w * k)); cv.height = Math.max(1, Math.round(h * k));
    });
  }

  async function getSlice(kind, plane, index) {
    const ch = kind === "image" ? S.channel : 0;
    const key = `${S.study.id}/${kind}/${plane}/${index}/${ch}`;
    if (S.cache.has(key)) return S.cache.get(key);
    if (S.pending.has(key)) return S.pending.get(key);
    const url = `/api/studies/${encodeURIComponent(S.study.id)}/${kind}/${plane}/${index}` +
      (kind === "image" ? `?channel=${ch}` : "");
    const pr = fetch(url).then(async (r) => {
      if (!r.ok) throw new Error(`slice ${plane} ${index}: HTTP ${r.status}`);
      const [rows, cols] = r.headers.get("X-Shape").split(",").map(Number);
      const data = new Uint8Array(await r.arrayBuffer());
      const v = { rows, cols, data };
      S.cache.set(key, v); S.pending.delete(key);
      if (S.cache.size > 600) S.cache.delete(S.cache.keys().next().value);
      return v;
    });
    S.pending.set(key, pr);
    return pr;
  }

  const AXIS = { axial: 0, coronal: 1, sagittal: 2 };

  async function draw(plane) {
    const a = AXIS[plane], idx = S.pos[a];
    const [img, msk] = await Promise.all([getSlice("image", plane, idx), getSlice("mask", plane, idx)]);
    if (S.pos[a] !== idx) return;  // moved on meanwhile
    const { rows, cols } = img, flip = plane !== "axial";  // coronal / sagittal: superior up
    const off = document.createElement("canvas"); off.width = cols; off.height = rows;
    const octx = off.getContext("2d"); const id = octx.createImageData(cols, rows); const px = id.data;
    const lo = S.level - S.window / 2, scale = 255 / S.window, al = S.opacity, colours = S.info.colours;
    for (let r = 0; r < rows; r++) {
      const src = (flip ? rows - 1 - r : r) * cols;
      for (let c = 0; c < cols; c++) {
        let g = (img.data[src + c] - lo) * scale; g = g < 0 ? 0 : g > 255 ? 255 : g;
        let R = g, G = g, B = g;
        const k = msk.data[src + c];
        if (S.overlay && k > 0) {
          const col = colours[Math.min(k, colours.length - 1)];
          R = (1 - al) * g + al * col[0]; G = (1 - al) * g + al * col[1]; B = (1 - al) * g + al * col[2];
        }
        const o = 4 * (r * cols + c); px[o] = R; px[o + 1] = G; px[o + 2] = B; px[o + 3] = 255;
      }
    }
    octx.putImageData(id, 0, 0);
    const cv = $("view-" + plane), ctx = cv.getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(off, 0, 0, cv.width, cv.height);
    // crosshair at the other two planes' positions
    const [z, y, x] = S.pos, sx = cv.width / cols, sy = cv.height / rows;
    let cx, cy;
    if (plane === "axial") { cx = x; cy = y; }
    else if (plane === "coronal") { cx = x; cy = rows - 1 - z; }
    else { cx = y; cy = rows - 1 - z; }
    ctx.strokeStyle = "rgba(255, 220, 0, 0.8)"; ctx.lineWidth = 1;
    ctx.beginPath();
    ctx.moveTo((cx + 0.5) * sx, 0); ctx.lineTo((cx + 0.5) * sx, cv.height);
    ctx.moveTo(0, (cy + 0.5) * sy); ctx.lineTo(cv.width, (cy + 0.5) * sy);
    ctx.stroke();
    $("slider-" + plane).value = String(idx);
    $("pos-" + plane).textContent = `${"zyx"[a]} = ${idx} / ${S.study.shape[a] - 1}`;
  }

  async function drawAll() {
    if (!S.study) return;
    $("wl-value").textContent = `W ${S.window} / L ${S.level}`;
    await Promise.all(PLANES.map(draw));
    document.body.dataset.drawn = String((Number(document.body.dataset.drawn) || 0) + 1);
  }

  function click(plane, ev) {
    const cv = $("view-" + plane), [rows, cols] = planeDims(plane);
    const rect = cv.getBoundingClientRect();
    const c = Math.min(cols - 1, Math.max(0, Math.floor((ev.clientX - rect.left) / rect.width * cols)));
    let r = Math.min(rows - 1, Math.max(0, Math.floor((ev.clientY - rect.top) / rect.height * rows)));
    if (plane !== "axial") r = rows - 1 - r;
    if (plane === "axial") { S.pos[1] = r; S.pos[2] = c; }
    else if (plane === "coronal") { S.pos[0] = r; S.pos[2] = c; }
    else { S.pos[0] = r; S.pos[1] = c; }
    drawAll();
  }

  function wire() {
    PLANES.forEach((p, a) => {
      $("slider-" + p).addEventListener("input", (e) => { S.pos[a] = Number(e.target.value); drawAll(); });
      $("view-" + p).addEventListener("click", (e) => click(p, e));
    });
    $("overlay").addEventListener("change", (e) => { S.overlay = e.target.checked; drawAll(); });
    $("opacity").addEventListener("input", (e) => { S.opacity = Number(e.target.value) / 100; drawAll(); });
    $("window").addEventListener("input", (e) => { S.window = Number(e.target.value); drawAll(); });
    $("level").addEventListener("input", (e) => { S.level = Number(e.target.value); drawAll(); });
    $("modality").addEventListener("change", (e) => { S.channel = Number(e.target.value); drawAll(); });
    $("search").addEventListener("input", () => {
      clearTimeout(S.searchTimer); S.searchTimer = setTimeout(refreshList, 200);
    });
  }

  function legend() {
    const box = $("legend"); box.textContent = "";
    S.info.classes.forEach((name, k) => {
      if (k === 0) return;
      const col = S.info.colours[Math.min(k, S.info.colours.length - 1)];
      const item = el("span"); const sw = el("span", null, "swatch");
      sw.style.background = `rgb(${col[0]}, ${col[1]}, ${col[2]})`;
      item.appendChild(sw); item.appendChild(document.createTextNode(name));
      box.appendChild(item);
    });
  }

  async function init() {
    S.info = await api("/api/info");
    $("run-info").textContent = `run ${S.info.run}, checkpoint step ${S.info.step}, ${S.info.layout} ` +
      `(${S.info.modalities.join(", ")}); uploads up to ${S.info.max_upload_mb} MB`;
    buildForm(); wire(); legend();
    await refreshList();
    document.body.dataset.ready = "1";
  }

  init().catch((e) => showError("cannot reach the server: " + e.message));
})();
