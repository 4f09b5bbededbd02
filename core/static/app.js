// MedVL-SAM2 web app: three orthogonal views of the file's own voxel array, clicks and boxes in
// file voxel indices (i, j, k), and every model call through the same HTTP API that scripts use.
"use strict";

(() => {
  const app = document.getElementById("app");
  const $ = (sel) => document.querySelector(sel);
  const PALETTE = [[230, 57, 70], [46, 196, 182], [255, 183, 3], [131, 56, 236], [58, 134, 255], [251, 86, 7]];
  const MASK_ALPHA = 0.45;
  // Each view: the RAS axis it slices through and the RAS axes drawn left-right and top-bottom.
  // Screen coordinates run against R and A/S: the patient's right on the left, anterior/superior up.
  const VIEWS = {
    axial: { slice: 2, u: 0, v: 1 },
    coronal: { slice: 1, u: 0, v: 2 },
    sagittal: { slice: 0, u: 1, v: 2 },
  };

  const state = {
    info: null, session: null, meta: null, volume: null, mask: null,
    cursor: [0, 0, 0], window: [0, 1], windowName: "auto", queue: Promise.resolve(),
  };

  // -- HTTP ----------------------------------------------------------------------------------------
  async function api(method, path, body, raw) {
    const options = { method, headers: {} };
    if (raw !== undefined) {
      options.body = raw;
      options.headers["Content-Type"] = "application/octet-stream";
    } else if (body !== undefined) {
      options.body = JSON.stringify(body);
      options.headers["Content-Type"] = "application/json";
    }
    const res = await fetch(path, options);
    if (!res.ok) {
      let message = `${res.status} ${res.statusText}`, field = null;
      try { const err = await res.json(); message = err.error || message; field = err.field; } catch (_) { /* not JSON */ }
      const error = new Error(message);
      error.field = field;
      throw error;
    }
    return res;
  }

  // Model calls run one after another, in the order the user made them.
  function run(label, job) {
    state.queue = state.queue.then(async () => {
      setBusy(label);
      try {
        await job();
        hideError();
      } catch (err) {
        showError(err);
      } finally {
        setBusy(null);
      }
    });
    return state.queue;
  }

  function setBusy(label) {
    const status = $("#status");
    app.dataset.busy = label ? "1" : "0";
    status.classList.toggle("busy", !!label);
    status.textContent = label ? `${label}…` : (state.session ? "Ready" : "Load a volume");
  }

  const FIELD_INPUTS = { text: ["#semantic-text", "#referring-text"], question: ["#question"], filename: ["#upload"], file: ["#upload"], case: ["#demo-select"] };
  function showError(err) {
    const box = $("#error");
    box.textContent = err.message;
    box.hidden = false;
    for (const sel of FIELD_INPUTS[err.field] || []) $(sel).classList.add("field-error");
  }
  function hideError() {
    $("#error").hidden = true;
    document.querySelectorAll(".field-error").forEach((el) => el.classList.remove("field-error"));
  }

  // -- geometry ------------------------------------------------------------------------------------
  // File axis and direction of RAS axis d: canonical c = sign > 0 ? f : n - 1 - f.
  const fileAxis = (d) => state.meta.ras_axes[d];
  const sizeOf = (d) => state.meta.shape[fileAxis(d)];
  const spacingOf = (d) => state.meta.spacing[fileAxis(d)];
  // Screen column/row of a file index along RAS axis d (reversed: R and A/S grow to the left/up).
  const toScreen = (d, f) => (state.meta.ras_signs[d] > 0 ? sizeOf(d) - 1 - f : f);
  const toFile = toScreen; // the mapping is its own inverse

  function voxelIndex(ijk) {
    const [, ny, nz] = state.meta.shape;
    return (ijk[0] * ny + ijk[1]) * nz + ijk[2];
  }

  // -- drawing -------------------------------------------------------------------------------------
  function windowFor(name) {
    if (name === "auto") return state.meta.auto_window;
    return state.info.ct_windows[name];
  }

  function setWindow(name) {
    state.windowName = name;
    state.window = windowFor(name);
    document.querySelectorAll("#window-buttons button").forEach((b) => b.classList.toggle("active", b.dataset.window === name));
    const [lo, hi] = state.window;
    $("#window-info").textContent = `window [${lo.toFixed(0)}, ${hi.toFixed(0)}] · W ${(hi - lo).toFixed(0)} L ${((hi + lo) / 2).toFixed(0)}`;
    drawAll();
  }

  function drawAll() {
    if (!state.volume) return;
    for (const name of Object.keys(VIEWS)) drawView(name);
    $("#volume-info").textContent = `${state.meta.name} · ${state.meta.shape.join("×")} · ${state.meta.spacing.map((s) => s.toFixed(2)).join("×")} mm · ${state.meta.modality} · cursor (${state.cursor.join(", ")})`;
  }

  function layout(name) {
    const view = VIEWS[name];
    const nu = sizeOf(view.u), nv = sizeOf(view.v);
    const box = document.querySelector(`#view-${name} .canvas-box`);
    const width = box.clientWidth - 4, height = box.clientHeight - 4;
    const mmU = nu * spacingOf(view.u), mmV = nv * spacingOf(view.v);
    const scale = Math.min(width / mmU, height / mmV);
    return { nu, nv, w: Math.max(1, Math.round(mmU * scale)), h: Math.max(1, Math.round(mmV * scale)) };
  }

  function drawView(name) {
    const view = VIEWS[name];
    const fig = document.getElementById(`view-${name}`);
    const canvas = fig.querySelector("canvas");
    const { nu, nv, w, h } = layout(name);
    canvas.width = w;
    canvas.height = h;
    const sliceAxis = fileAxis(view.slice), uAxis = fileAxis(view.u), vAxis = fileAxis(view.v);
    const slice = state.cursor[sliceAxis];
    const slider = fig.querySelector("input[type=range]");
    slider.max = String(state.meta.shape[sliceAxis] - 1);
    slider.value = String(slice);
    fig.querySelector(".slice-label").textContent = `${"ijk"[sliceAxis]} = ${slice} / ${state.meta.shape[sliceAxis] - 1}`;

    const image = new ImageData(nu, nv);
    const [lo, hi] = state.window;
    const scale = 255 / Math.max(hi - lo, 1e-6);
    const showMask = state.mask && $("#show-mask").checked;
    const ijk = [0, 0, 0];
    ijk[sliceAxis] = slice;
    for (let y = 0; y < nv; y++) {
      ijk[vAxis] = toFile(view.v, y);
      for (let x = 0; x < nu; x++) {
        ijk[uAxis] = toFile(view.u, x);
        const idx = voxelIndex(ijk);
        let g = (state.volume[idx] - lo) * scale;
        g = g < 0 ? 0 : g > 255 ? 255 : g;
        let r = g, gg = g, b = g;
        if (showMask) {
          const label = state.mask[idx];
          if (label) {
            const c = PALETTE[(label - 1) % PALETTE.length];
            r = g * (1 - MASK_ALPHA) + c[0] * MASK_ALPHA;
            gg = g * (1 - MASK_ALPHA) + c[1] * MASK_ALPHA;
            b = g * (1 - MASK_ALPHA) + c[2] * MASK_ALPHA;
          }
        }
        const o = (y * nu + x) * 4;
        image.data[o] = r; image.data[o + 1] = gg; image.data[o + 2] = b; image.data[o + 3] = 255;
      }
    }
    const native = document.createElement("canvas");
    native.width = nu;
    native.height = nv;
    native.getContext("2d").putImageData(image, 0, 0);
    const ctx = canvas.getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(native, 0, 0, w, h);

    const sx = w / nu, sy = h / nv;
    const px = (f) => (toScreen(view.u, f) + 0.5) * sx;
    const py = (f) => (toScreen(view.v, f) + 0.5) * sy;
    // crosshair at the cursor
    ctx.strokeStyle = "rgba(255, 214, 10, 0.35)";
    ctx.lineWidth = 1;
    ctx.beginPath();
    ctx.moveTo(px(state.cursor[uAxis]), 0); ctx.lineTo(px(state.cursor[uAxis]), h);
    ctx.moveTo(0, py(state.cursor[vAxis])); ctx.lineTo(w, py(state.cursor[vAxis]));
    ctx.stroke();
    // the box, on the slices it spans
    const prompts = state.prompts || { points: [], box: null };
    if (prompts.box && prompts.box[sliceAxis] <= slice && slice <= prompts.box[sliceAxis + 3]) {
      const b = prompts.box;
      const x0 = px(b[uAxis]), x1 = px(b[uAxis + 3]), y0 = py(b[vAxis]), y1 = py(b[vAxis + 3]);
      ctx.strokeStyle = "#ffd60a";
      ctx.lineWidth = 2;
      ctx.strokeRect(Math.min(x0, x1) - sx / 2, Math.min(y0, y1) - sy / 2, Math.abs(x1 - x0) + sx, Math.abs(y1 - y0) + sy);
    }
    // points on this slice: green foreground, blue background
    for (const p of prompts.points) {
      if (p[sliceAxis] !== slice) continue;
      ctx.fillStyle = p[3] ? "#38d430" : "#3a86ff";
      ctx.strokeStyle = "#000";
      ctx.lineWidth = 1;
      ctx.beginPath();
      ctx.arc(px(p[uAxis]), py(p[vAxis]), 5, 0, 2 * Math.PI);
      ctx.fill();
      ctx.stroke();
    }
    if (state.drag && state.drag.view === name && state.drag.moved) {
      const d = state.drag;
      ctx.strokeStyle = "#ffd60a";
      ctx.setLineDash([4, 3]);
      ctx.strokeRect(Math.min(d.x0, d.x1), Math.min(d.y0, d.y1), Math.abs(d.x1 - d.x0), Math.abs(d.y1 - d.y0));
      ctx.setLineDash([]);
    }
  }

  // The file voxel under a mouse event on a view.
  function voxelAt(name, event) {
    const view = VIEWS[name];
    const canvas = document.querySelector(`#view-${name} canvas`);
    const rect = canvas.getBoundingClientRect();
    const { nu, nv } = layout(name);
    const x = Math.min(nu - 1, Math.max(0, Math.floor(((event.clientX - rect.left) / rect.width) * nu)));
    const y = Math.min(nv - 1, Math.max(0, Math.floor(((event.clientY - rect.top) / rect.height) * nv)));
    const ijk = [...state.cursor];
    ijk[fileAxis(view.u)] = toFile(view.u, x);
    ijk[fileAxis(view.v)] = toFile(view.v, y);
    return ijk;
  }

  // -- prompts and results -------------------------------------------------------------------------
  async function applyState(data) {
    state.prompts = { points: data.points || [], box: data.box || null };
    const result = data.result || {};
    if (result.mask_voxels !== undefined) {
      const res = await api("GET", `/api/sessions/${state.session}/mask`);
      state.mask = new Uint8Array(await res.arrayBuffer());
    } else {
      state.mask = null;
    }
    let count = 0;
    if (state.mask) for (let i = 0; i < state.mask.length; i++) if (state.mask[i]) count++;
    app.dataset.maskVoxels = String(count);
    renderObjects(result);
    renderPromptList();
    drawAll();
  }

  function renderObjects(result) {
    const download = $("#download");
    if (!result.objects) {
      $("#objects").textContent = "No mask yet.";
      download.classList.add("disabled");
      download.removeAttribute("href");
      return;
    }
    const rows = result.objects.map((o) => {
      const c = PALETTE[(o.label - 1) % PALETTE.length];
      const score = o.score === null ? "–" : o.score.toFixed(2);
      return `<tr><td><span class="swatch" style="background:rgb(${c.join(",")})"></span>${escapeHtml(o.name)}</td><td>${o.voxels}</td><td>${o.volume_ml} ml</td><td>${score}</td></tr>`;
    }).join("");
    const text = result.text ? `<div class="answer">${escapeHtml(result.text)}</div>` : "";
    $("#objects").innerHTML = `<table><tr><th>${escapeHtml(result.task)}</th><th>voxels</th><th>volume</th><th>score</th></tr>${rows}</table>${text}<div>${result.seconds}s</div>`;
    download.classList.remove("disabled");
    download.href = `/api/sessions/${state.session}/mask.nii.gz`;
  }

  function renderPromptList() {
    const p = state.prompts || { points: [], box: null };
    const items = p.points.map((q) => `${q[3] ? "+" : "−"} (${q.slice(0, 3).join(", ")})`);
    if (p.box) items.push(`box [${p.box.join(", ")}]`);
    $("#prompt-list").textContent = items.length ? items.join(" · ") : "No prompts.";
  }

  function threshold() {
    const value = parseFloat($("#threshold").value);
    return Number.isFinite(value) ? value : 0.5;
  }

  function addPoint(ijk, label) {
    state.cursor = [...ijk];
    drawAll();
    run("Segmenting", async () => {
      const res = await api("POST", `/api/sessions/${state.session}/points`, { point: ijk, label });
      await applyState(await res.json());
    });
  }

  function setBox(name, a, b) {
    const view = VIEWS[name];
    const sliceAxis = fileAxis(view.slice);
    const box = [0, 0, 0, 0, 0, 0];
    for (let axis = 0; axis < 3; axis++) {
      box[axis] = Math.min(a[axis], b[axis]);
      box[axis + 3] = Math.max(a[axis], b[axis]);
    }
    // Through the view, keep the depth of a box drawn before in another view, else this slice only.
    const old = state.prompts && state.prompts.box;
    if (old && old[sliceAxis] <= state.cursor[sliceAxis] && state.cursor[sliceAxis] <= old[sliceAxis + 3]) {
      box[sliceAxis] = old[sliceAxis];
      box[sliceAxis + 3] = old[sliceAxis + 3];
    }
    run("Segmenting", async () => {
      const res = await api("POST", `/api/sessions/${state.session}/box`, { box });
      await applyState(await res.json());
    });
  }

  // -- mouse ---------------------------------------------------------------------------------------
  function bindView(name) {
    const fig = document.getElementById(`view-${name}`);
    const canvas = fig.querySelector("canvas");
    canvas.addEventListener("contextmenu", (e) => e.preventDefault());
    canvas.addEventListener("mousedown", (e) => {
      if (!state.volume) return;
      e.preventDefault();
      const rect = canvas.getBoundingClientRect();
      const x = e.clientX - rect.left, y = e.clientY - rect.top;
      state.drag = { view: name, button: e.button, start: voxelAt(name, e), x0: x, y0: y, x1: x, y1: y, moved: false };
    });
    canvas.addEventListener("mousemove", (e) => {
      const d = state.drag;
      if (!d || d.view !== name) return;
      const rect = canvas.getBoundingClientRect();
      d.x1 = e.clientX - rect.left;
      d.y1 = e.clientY - rect.top;
      if (d.button === 0 && Math.hypot(d.x1 - d.x0, d.y1 - d.y0) > 5) d.moved = true;
      if (d.moved) drawView(name);
    });
    canvas.addEventListener("mouseup", (e) => {
      const d = state.drag;
      state.drag = null;
      if (!d || d.view !== name || !state.session) return;
      if (d.moved) {
        setBox(name, d.start, voxelAt(name, e));
        return;
      }
      if (!state.info.tasks.interactive_seg) {
        state.cursor = voxelAt(name, e);
        drawAll();
        return;
      }
      const background = d.button === 2 || $("#background-mode").checked;
      addPoint(voxelAt(name, e), background ? 0 : 1);
    });
    canvas.addEventListener("wheel", (e) => {
      if (!state.volume) return;
      e.preventDefault();
      moveSlice(name, e.deltaY > 0 ? -1 : 1);
    }, { passive: false });
    fig.querySelector("input[type=range]").addEventListener("input", (e) => {
      if (!state.volume) return;
      state.cursor[fileAxis(VIEWS[name].slice)] = parseInt(e.target.value, 10);
      drawAll();
    });
  }

  function moveSlice(name, step) {
    const axis = fileAxis(VIEWS[name].slice);
    state.cursor[axis] = Math.min(state.meta.shape[axis] - 1, Math.max(0, state.cursor[axis] + step));
    drawAll();
  }

  // -- loading -------------------------------------------------------------------------------------
  async function openSession(meta) {
    if (state.session) api("DELETE", `/api/sessions/${state.session}`).catch(() => {});
    const res = await api("GET", `/api/sessions/${meta.session}/volume`);
    const buffer = await res.arrayBuffer();
    state.volume = meta.volume_dtype === "int16" ? new Int16Array(buffer) : new Float32Array(buffer);
    state.meta = meta;
    state.session = meta.session;
    app.dataset.session = meta.session;
    state.cursor = meta.shape.map((n) => Math.floor(n / 2));
    $("#answer").textContent = "";
    $("#report").textContent = "";
    setWindow(meta.modality === "CT" ? "abdomen" : "auto");
    await applyState(meta);
  }

  function loadDemo() {
    const kase = $("#demo-select").value;
    run("Loading volume", async () => {
      const res = await api("POST", "/api/sessions", { case: kase });
      await openSession(await res.json());
    });
  }

  function upload(file) {
    run("Uploading", async () => {
      const data = await file.arrayBuffer();
      const res = await api("POST", `/api/sessions/upload?filename=${encodeURIComponent(file.name)}`, undefined, data);
      await openSession(await res.json());
    });
  }

  function requireSession() {
    if (!state.session) throw Object.assign(new Error("Load a volume first."), { field: "session" });
  }

  function segmentText(task, input) {
    run("Segmenting", async () => {
      requireSession();
      const res = await api("POST", `/api/sessions/${state.session}/segment`, { task, text: $(input).value, threshold: threshold() });
      await applyState(await res.json());
    });
  }

  function escapeHtml(text) {
    return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  }

  async function init() {
    for (const name of Object.keys(VIEWS)) bindView(name);
    document.querySelectorAll("#window-buttons button").forEach((b) => b.addEventListener("click", () => state.meta && setWindow(b.dataset.window)));
    $("#load-demo").addEventListener("click", loadDemo);
    $("#upload").addEventListener("change", (e) => e.target.files.length && upload(e.target.files[0]));
    $("#undo").addEventListener("click", () => run("Segmenting", async () => {
      requireSession();
      await applyState(await (await api("POST", `/api/sessions/${state.session}/undo`)).json());
    }));
    $("#clear").addEventListener("click", () => run("Clearing", async () => {
      requireSession();
      await applyState(await (await api("POST", `/api/sessions/${state.session}/clear`)).json());
    }));
    $("#semantic-form").addEventListener("submit", (e) => { e.preventDefault(); segmentText("semantic", "#semantic-text"); });
    $("#referring-form").addEventListener("submit", (e) => { e.preventDefault(); segmentText("referring", "#referring-text"); });
    $("#vqa-form").addEventListener("submit", (e) => {
      e.preventDefault();
      run("Answering", async () => {
        requireSession();
        const res = await api("POST", `/api/sessions/${state.session}/ask`, { question: $("#question").value });
        $("#answer").textContent = (await res.json()).answer;
      });
    });
    $("#report-button").addEventListener("click", () => run("Writing report", async () => {
      requireSession();
      const res = await api("POST", `/api/sessions/${state.session}/report`);
      $("#report").textContent = (await res.json()).report;
    }));
    $("#show-mask").addEventListener("change", drawAll);
    window.addEventListener("resize", drawAll);
    window.addEventListener("keydown", (e) => {
      if (!state.volume || e.target.tagName === "INPUT") return;
      if (e.key === "z" && (e.ctrlKey || e.metaKey)) $("#undo").click();
    });

    await run("Loading model info", async () => {
      state.info = await (await api("GET", "/api/info")).json();
      $("#model-name").textContent = state.info.model;
      document.querySelectorAll("section[data-task]").forEach((s) => {
        const offered = state.info.tasks[s.dataset.task];
        s.hidden = !offered;
        s.querySelectorAll("button, input").forEach((el) => { el.disabled = !offered; });
      });
      const select = $("#demo-select");
      select.innerHTML = state.info.demo_cases.map((c) => `<option value="${escapeHtml(c)}">${escapeHtml(c)}</option>`).join("");
      $("#load-demo").disabled = !state.info.demo_cases.length;
    });
  }

  init();
})();
