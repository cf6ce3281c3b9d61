// fluxserve playground: plain JavaScript, no build step, no dependencies, same origin only.
"use strict";

// The operator key, entered once in the Train pane: sessionStorage (gone when the tab closes), sent
// as `Authorization: Bearer` with every call (the training API needs it; a facade configured to
// require it on /classify and /generate does too).
const KEY_STORAGE = "fluxserve.apiKey";

const $ = (id) => document.getElementById(id);

// ------------------------------------------------------------------------------ tabs
function setupTabs() {
  const tabs = Array.from(document.querySelectorAll('[role="tab"]'));
  const select = (tab, focus) => {
    for (const t of tabs) {
      const on = t === tab;
      t.setAttribute("aria-selected", String(on));
      t.tabIndex = on ? 0 : -1;
      $(t.getAttribute("aria-controls")).hidden = !on;
    }
    if (focus) tab.focus();
    history.replaceState(null, "", "#" + tab.id.replace("tab-", ""));
  };
  tabs.forEach((tab, i) => {
    tab.addEventListener("click", () => select(tab, false));
    tab.addEventListener("keydown", (e) => {
      const moves = { ArrowRight: 1, ArrowLeft: -1, Home: -i, End: tabs.length - 1 - i };
      if (!(e.key in moves)) return;
      e.preventDefault();
      select(tabs[(i + moves[e.key] + tabs.length) % tabs.length], true);
    });
  });
  const initial = tabs.find((t) => "#" + t.id.replace("tab-", "") === location.hash);
  if (initial) select(initial, false);
}

// ------------------------------------------------------------------------------ HTTP helpers
function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? { Authorization: "Bearer " + key } : {};
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error) return body.error.message || body.error.type;
    return JSON.stringify(body);
  } catch (_) {
    return response.status + " " + response.statusText;
  }
}

// Reads a server-sent event stream from a fetch() response (EventSource cannot POST or send an
// Authorization header). Calls onEvent(name, data) per event; resolves when the stream ends.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) onEvent(name, JSON.parse(data.join("\n")));
    }
  }
}

async function postStream(path, body, signal, onEvent) {
  const response = await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "text/event-stream", ...authHeaders() },
    body: JSON.stringify(body),
    signal,
  });
  if (!response.ok) throw new Error(await errorMessage(response));
  await readEvents(response, onEvent);
}

function setProgress(bar, label, fraction) {
  const pct = Math.round(Math.max(0, Math.min(1, fraction)) * 100);
  bar.value = pct;
  bar.textContent = pct + "%";
  if (label) label.textContent = pct + "%";
}

function showImages(container, answer) {
  const mime = "image/" + answer.output_format;
  answer.images.forEach((b64, i) => {
    const seed = answer.seed + i;
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = "data:" + mime + ";base64," + b64;
    img.alt = "Generated image, seed " + seed + ": " + answer.prompt;
    img.className = "generated";
    const caption = document.createElement("figcaption");
    const facts = document.createElement("span");
    facts.textContent = "seed " + seed + " · model version " + answer.model_version +
      (answer.lora ? " · adapter " + answer.lora.name : "");
    facts.className = "image-facts";
    const link = document.createElement("a");
    link.href = img.src;
    link.download = "fluxserve-seed" + seed + "." + (answer.output_format === "jpeg" ? "jpg" : answer.output_format);
    link.textContent = "Download";
    link.setAttribute("aria-label", "Download image with seed " + seed);
    caption.append(facts, " ", link);
    figure.append(img, caption);
    container.prepend(figure);
  });
}

// ------------------------------------------------------------------------------ Generate
function numberOrNull(input) {
  return input.value === "" ? null : Number(input.value);
}

// The adapter picker, filled from GET /loras. Listing adapters needs the operator key (as reading
// jobs does), so without one the page asks for it instead of calling (a 401 would only be noise).
async function loadAdapters() {
  const select = $("gen-lora");
  const hint = $("gen-lora-hint");
  const chosen = select.value;
  let loras = [];
  if (!sessionStorage.getItem(KEY_STORAGE)) {
    hint.textContent = "Set the operator key (Train pane) to list adapters.";
  } else {
    try {
      const response = await fetch("/loras", { headers: authHeaders() });
      if (!response.ok) throw new Error(await errorMessage(response));
      loras = (await response.json()).loras;
      hint.textContent = loras.length ? "" : "No adapters published yet.";
    } catch (err) {
      hint.textContent = "Adapters unavailable: " + err.message;
    }
  }
  select.replaceChildren(new Option("none: the default model", ""));
  for (const a of loras) {
    const words = a.trigger_words ? " (" + a.trigger_words + ")" : "";
    select.add(new Option(a.name + words, a.name));
  }
  if (loras.some((a) => a.name === chosen)) select.value = chosen;
}

// The chosen adapter as /generate options (nothing when none is chosen).
function adapterOptions() {
  const options = {};
  if ($("gen-lora").value) options.lora = $("gen-lora").value;
  const scale = numberOrNull($("gen-lora-scale"));
  if (options.lora && scale !== null) options.lora_scale = scale;
  return options;
}

function setupGenerate() {
  const form = $("generate-form");
  const bar = $("gen-progress");
  const status = $("gen-status");
  let controller = null;

  $("gen-cancel").addEventListener("click", () => controller && controller.abort());
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    if (!form.reportValidity()) return;
    const body = {
      prompt: $("gen-prompt").value,
      width: Number($("gen-width").value),
      height: Number($("gen-height").value),
      steps: Number($("gen-steps").value),
      guidance: Number($("gen-guidance").value),
      num_images: Number($("gen-count").value),
      ...adapterOptions(),
    };
    const seed = numberOrNull($("gen-seed"));
    if (seed !== null) body.seed = seed;
    controller = new AbortController();
    $("gen-submit").disabled = true;
    $("gen-cancel").disabled = false;
    setProgress(bar, $("gen-percent"), 0);
    status.textContent = "Starting…";
    try {
      let failed = null;
      await postStream("/generate", body, controller.signal, (name, data) => {
        if (name === "progress") {
          setProgress(bar, $("gen-percent"), data.fraction);
          status.textContent = "Image " + (data.image + 1) + ": step " + data.step + " of " + data.total +
            " (" + data.elapsed_s.toFixed(1) + " s)";
        } else if (name === "image") {
          setProgress(bar, $("gen-percent"), 1);
          showImages($("gen-results"), data);
          status.textContent = "Done in " + data.timings.total_s.toFixed(1) + " s · seed " + data.seed +
            " · model version " + data.model_version;
        } else if (name === "error") {
          failed = data.error.message;
        }
      });
      if (failed) status.textContent = "Failed: " + failed;
    } catch (err) {
      status.textContent = err.name === "AbortError" ? "Cancelled." : "Failed: " + err.message;
    } finally {
      $("gen-submit").disabled = false;
      $("gen-cancel").disabled = true;
      controller = null;
    }
  });
}

// ------------------------------------------------------------------------------ Classify + chat
function showClassification(result) {
  $("cls-result").hidden = false;
  $("cls-label").textContent = result.label;
  $("cls-uncertain").textContent = result.uncertain ? "yes: decide with the scores" : "no";
  const img = result.scores.image_request, conv = result.scores.conversation;
  $("cls-score-image").value = img;
  $("cls-score-image-text").textContent = img.toFixed(3);
  $("cls-score-conv").value = conv;
  $("cls-score-conv-text").textContent = conv.toFixed(3);
}

function setupClassify() {
  const form = $("classify-form");
  const status = $("cls-status");
  const chatOnly = () => document.querySelectorAll(".chat-only");
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    if (!form.reportValidity()) return;
    chatOnly().forEach((el) => (el.hidden = true));
    status.textContent = "Classifying…";
    try {
      const response = await fetch("/classify", {
        method: "POST",
        headers: { "Content-Type": "application/json", ...authHeaders() },
        body: JSON.stringify({ text: $("cls-text").value }),
      });
      if (!response.ok) throw new Error(await errorMessage(response));
      showClassification(await response.json());
      status.textContent = "";
    } catch (err) {
      status.textContent = "Failed: " + err.message;
    }
  });
  $("chat-submit").addEventListener("click", async () => {
    if (!form.reportValidity()) return;
    chatOnly().forEach((el) => (el.hidden = false));
    setProgress($("chat-progress"), null, 0);
    status.textContent = "Sending…";
    const generate = {
      width: Number($("gen-width").value), height: Number($("gen-height").value),
      steps: Number($("gen-steps").value), guidance: Number($("gen-guidance").value),
      ...adapterOptions(),
    };
    try {
      let failed = null;
      await postStream("/chat", { message: $("cls-text").value, generate }, undefined, (name, data) => {
        if (name === "classification") {
          showClassification(data.classification);
          $("chat-kind").textContent = data.kind;
          status.textContent = data.kind === "image" ? "Generating…" : "";
        } else if (name === "progress") {
          setProgress($("chat-progress"), null, data.fraction);
        } else if (name === "image") {
          setProgress($("chat-progress"), null, 1);
          showImages($("chat-results"), data);
          status.textContent = "Prompt sent to FLUX: " + data.prompt;
        } else if (name === "error") {
          failed = data.error.message;
        }
      });
      if (failed) status.textContent = "Failed: " + failed;
    } catch (err) {
      status.textContent = "Failed: " + err.message;
    }
  });
}

// ------------------------------------------------------------------------------ Train
function setupTrain() {
  const keyInput = $("api-key");
  const keyStatus = $("key-status");
  const showKeyState = () => {
    const has = !!sessionStorage.getItem(KEY_STORAGE);
    keyStatus.textContent = has ? "A key is set for this tab." : "No key set: training calls go without one.";
    keyInput.placeholder = has ? "•••••••• (set)" : "paste the operator key";
  };
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    if (keyInput.value.trim()) sessionStorage.setItem(KEY_STORAGE, keyInput.value.trim());
    keyInput.value = "";
    showKeyState();
    loadAdapters();
  });
  $("key-forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    showKeyState();
    loadAdapters();
  });
  showKeyState();

  const kind = $("train-kind");
  const publish = $("train-publish");
  const syncKind = () => {
    document.querySelectorAll(".lora-only").forEach((el) => (el.hidden = kind.value !== "flux_lora"));
    document.querySelectorAll(".adapter-only").forEach((el) => (el.hidden ||= publish.value !== "adapter"));
  };
  kind.addEventListener("change", syncKind);
  publish.addEventListener("change", syncKind);
  syncKind();

  const form = $("train-form");
  const status = $("train-status");
  let jobId = null;

  $("train-cancel").addEventListener("click", async () => {
    if (!jobId) return;
    const response = await fetch("/train/" + encodeURIComponent(jobId), { method: "DELETE", headers: authHeaders() });
    if (!response.ok) status.textContent = "Cancel failed: " + (await errorMessage(response));
  });

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    if (!form.reportValidity()) return;
    const data = new FormData();
    data.append("kind", kind.value);
    data.append("steps", $("train-steps").value);
    if (kind.value === "flux_lora") {
      const file = $("train-zip").files[0];
      if (!file) { status.textContent = "Choose a zip of images first."; $("train-zip").focus(); return; }
      if (!$("train-trigger").value.trim()) { status.textContent = "Enter a trigger word."; $("train-trigger").focus(); return; }
      data.append("dataset", file);
      data.append("trigger_word", $("train-trigger").value.trim());
      data.append("resolution", $("train-resolution").value);
      data.append("publish", publish.value);
      if (publish.value === "adapter" && $("train-name").value.trim()) data.append("name", $("train-name").value.trim());
    }
    $("train-submit").disabled = true;
    setProgress($("train-progress"), $("train-percent"), 0);
    $("train-version").textContent = "–";
    status.textContent = "Uploading…";
    try {
      const response = await fetch("/train", { method: "POST", headers: authHeaders(), body: data });
      if (!response.ok) throw new Error(await errorMessage(response));
      jobId = (await response.json()).job_id;
      $("train-job").textContent = jobId;
      $("train-cancel").disabled = false;
      status.textContent = "Queued.";
      await followJob(jobId);
    } catch (err) {
      status.textContent = "Failed: " + err.message;
    } finally {
      $("train-submit").disabled = false;
      $("train-cancel").disabled = true;
    }
  });

  async function followJob(id) {
    const response = await fetch("/train/" + encodeURIComponent(id) + "/events", {
      headers: { Accept: "text/event-stream", ...authHeaders() },
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    await readEvents(response, (_name, job) => showJob(job));
  }

  function showJob(job) {
    $("train-state").textContent = job.status;
    const p = job.progress || {};
    if (p.total_steps) setProgress($("train-progress"), $("train-percent"), (p.step || 0) / p.total_steps);
    if (typeof p.loss === "number") $("train-loss").textContent = p.loss.toFixed(4);
    const publish = (job.result || {}).publish;
    if (publish && publish.status === "running") status.textContent = "Training done; publishing…";
    else if (job.status === "running") status.textContent = "Training: step " + (p.step || 0) + " of " + (p.total_steps || "?");
    if (job.status === "succeeded") {
      setProgress($("train-progress"), $("train-percent"), 1);
      const version = publish && publish.model_version;
      const adapter = publish && publish.adapter;
      if (adapter) {
        $("train-version").textContent = "adapter " + adapter.name;
        status.textContent = "Adapter " + adapter.name + " is ready: pick it in the Generate pane.";
        loadAdapters();
      } else {
        $("train-version").textContent = version ? version : "not published";
        status.textContent = version ? "Version " + version + " is now being served." : "Training succeeded.";
      }
    } else if (job.status === "failed" || job.status === "cancelled") {
      status.textContent = "Job " + job.status + (job.error ? ": " + job.error : ".");
    }
  }
}

document.addEventListener("DOMContentLoaded", () => {
  setupTabs();
  setupGenerate();
  setupClassify();
  setupTrain();
  loadAdapters();
});
