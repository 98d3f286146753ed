// The playground: this server's own API, from the browser, with the user's key. No build step.
const $ = (selector) => document.querySelector(selector);
const KEY = "steerserve-key";
const MODES = { feature: ["add", "clamp", "ablate", "scale"], vector: ["add", "clamp", "ablate", "cap"] };
const UNITS = { feature: ["max_act", "raw", "calibrated"], vector: ["raw", "norm"] };
const state = {
  key: sessionStorage.getItem(KEY),
  models: [], // GET /v1/models cards
  interventions: [],
  cards: new Map(), // "sae/index" -> a feature's card
  columns: { default: [], steered: [] }, // each column's own chat history
  busy: false,
  reads: true, // whether this engine reads features (readouts are refused on GPU engines, for now)
};

// ---- the API, with the key asked for once when the server wants one ----
let asking = null;
function askKey() {
  asking ??= new Promise((resolve) => {
    const dialog = $("#key-dialog");
    dialog.addEventListener("close", () => {
      state.key = $("#key").value.trim();
      sessionStorage.setItem(KEY, state.key);
      asking = null;
      resolve();
    }, { once: true });
    dialog.showModal();
  });
  return asking;
}

async function api(path, body, signal) {
  for (;;) {
    const headers = { "Content-Type": "application/json" };
    if (state.key) headers.Authorization = `Bearer ${state.key}`;
    const response = await fetch(path, { method: body ? "POST" : "GET", headers, body: body && JSON.stringify(body), signal });
    if (response.status !== 401) return response;
    await askKey();
  }
}

async function json(path, body) {
  const response = await api(path, body);
  const data = await response.json();
  if (!response.ok) throw apiError(data);
  return data;
}

function apiError(data) {
  const error = new Error(data?.error?.message ?? "request failed");
  error.param = data?.error?.param ?? null;
  return error;
}

// ---- models, SAEs and vectors ----
async function loadServer() {
  const [models, saes, vectors] = await Promise.all([json("/v1/models"), json("/v1/saes"), json("/v1/vectors")]);
  state.models = models.data;
  $("#model").replaceChildren(...models.data.map((m) => new Option(m.parent ? `${m.id} (preset of ${m.parent})` : m.id, m.id)));
  $("#sae").replaceChildren(...saes.data.filter((s) => s.has_catalogue).map((s) => new Option(`${s.id} (layer ${s.layer})`, s.id)));
  $("#vector").replaceChildren(new Option("(a loaded vector)", ""), ...vectors.data.map((v) => new Option(`${v.id} (layers ${v.layers.join(", ")})`, v.id)));
}

const baseModel = () => {
  const card = state.models.find((m) => m.id === $("#model").value);
  return card?.parent ?? card?.id;
};

// ---- finding features ----
async function search(promise) {
  $("#search-error").textContent = "";
  $("#search-note").textContent = "";
  try {
    const listing = await promise;
    showResults(listing.data);
    $("#search-note").textContent = listing.message ?? ""; // nothing close enough to the query: not an error
  } catch (error) {
    $("#search-error").textContent = error.message;
  }
}

function showResults(features) {
  const sae = $("#sae").value;
  $("#results").replaceChildren(...features.map((f) => {
    const item = document.createElement("li");
    const details = document.createElement("details");
    const summary = document.createElement("summary");
    summary.textContent = `#${f.index} ${f.label ?? ""}`;
    if (f.explanation) summary.title = f.explanation;
    details.append(summary);
    details.addEventListener("toggle", () => details.open && showCard(details, sae, f.index), { once: true });
    const add = button("Add", () => addIntervention({ kind: "feature", sae, index: f.index, label: f.label, max_act: f.max_act, calibration: f.calibration }));
    add.setAttribute("aria-label", `Add feature ${f.index}`);
    const facts = document.createElement("span");
    facts.className = "facts";
    const similarity = f.similarity !== undefined ? `similarity ${num(f.similarity)} · ` : "";
    // A calibrated feature's effect: what steering it did at its recommended strength.
    const effect = f.calibration ? ` · calibrated, effect ${num(f.calibration.effect)}` : "";
    facts.textContent = `${similarity}max ${num(f.max_act)} · density ${num(f.density)}${effect}`;
    item.append(add, details, facts);
    return item;
  }));
}

async function card(sae, index) {
  const id = `${sae}/${index}`;
  if (!state.cards.has(id)) {
    const loading = json(`/v1/saes/${encodeURIComponent(sae)}/features/${index}`);
    loading.catch(() => state.cards.delete(id)); // a failure is tried again next time
    state.cards.set(id, loading);
  }
  return state.cards.get(id);
}

async function showCard(details, sae, index) {
  let c;
  try {
    c = await card(sae, index);
  } catch (error) {
    details.append(Object.assign(document.createElement("p"), { className: "error", textContent: error.message }));
    return;
  }
  const body = document.createElement("div");
  body.className = "card";
  const facts = document.createElement("p");
  facts.textContent = `density ${num(c.density)} · max act ${num(c.max_act)} · promotes ${c.promoted_tokens.map((t) => JSON.stringify(t)).join(" ")}`;
  const contexts = document.createElement("ul");
  for (const ctx of c.top_contexts.slice(0, 6)) {
    const li = document.createElement("li");
    // The activating token is marked «like this» in the catalogue.
    for (const [n, part] of ctx.text.split(/[«»]/).entries()) li.append(n % 2 ? mark(part) : part);
    li.append(` (${num(ctx.activation)})`);
    contexts.append(li);
  }
  if (c.explanation) {
    const explained = document.createElement("p");
    explained.textContent = `${c.explanation} (by ${c.labeller}, label score ${num(c.label_score)})`;
    body.append(explained);
  }
  body.append(facts, contexts);
  details.append(body);
}

// ---- steering ----
function addIntervention(target) {
  const kind = target.kind;
  // A calibrated feature starts at its recommendation (strength 1 in unit "calibrated").
  const start = target.calibration ? { mode: target.calibration.mode, unit: "calibrated", strength: 1 }
    : { mode: kind === "feature" ? "clamp" : "add", unit: UNITS[kind][0], strength: kind === "feature" ? 2 : 4 };
  state.interventions.push({ ...target, ...start, tokens: "all" });
  renderInterventions();
}

function renderInterventions() {
  $("#no-interventions").hidden = state.interventions.length > 0;
  const colour = $("#colour").value;
  const features = state.interventions.filter((iv) => iv.kind === "feature");
  const value = (iv) => JSON.stringify([iv.sae, iv.index]); // an SAE id may hold any character
  $("#colour").replaceChildren(new Option("(none)", ""), ...features.map((iv) => new Option(`#${iv.index} (${iv.sae})`, value(iv))));
  $("#colour").value = features.some((iv) => value(iv) === colour) ? colour : "";
  $("#interventions").replaceChildren(...state.interventions.map((iv, n) => {
    const item = document.createElement("li");
    item.className = "intervention";
    const title = document.createElement("strong");
    title.textContent = iv.kind === "feature" ? `${iv.sae} #${iv.index} ${iv.label ?? ""}` : `vector ${iv.vector}`;
    const mode = select(MODES[iv.kind], iv.mode, (v) => (iv.mode = v), "mode");
    const unit = select(UNITS[iv.kind], iv.unit, (v) => (iv.unit = v), "unit");
    const tokens = select(["all", "prompt", "completion"], iv.tokens, (v) => (iv.tokens = v), "tokens");
    const slider = input("range", iv.strength, (v) => { iv.strength = v; number.value = v; }, { min: -10, max: 10, step: 0.25 });
    slider.setAttribute("aria-label", `strength of intervention ${n + 1}`);
    const number = input("number", iv.strength, (v) => { iv.strength = v; slider.value = v; });
    number.step = "any";
    number.setAttribute("aria-label", `strength of intervention ${n + 1}, exact`);
    number.className = "strength";
    const more = document.createElement("details");
    more.append(Object.assign(document.createElement("summary"), { textContent: "when and which tokens" }),
      labelled("tokens", tokens),
      labelled("after_n", optional(iv, "after_n")), labelled("first_n", optional(iv, "first_n")),
      labelled("when SAE", text(iv, "whenSae", $("#sae").value)), labelled("feature", optional(iv, "whenIndex")),
      labelled("above (max_act)", optional(iv, "whenAbove")));
    const remove = button("Remove", () => {
      state.interventions.splice(n, 1);
      renderInterventions();
    });
    const error = document.createElement("p");
    error.className = "error";
    error.id = `intervention-error-${n}`;
    error.setAttribute("role", "alert");
    item.append(title, labelled("mode", mode), labelled("unit", unit), labelled("strength", slider), number, remove, more, error);
    return item;
  }));
}

function steering() {
  const features = state.interventions.map((iv) => {
    const target = iv.kind === "feature" ? { sae: iv.sae, index: iv.index } : { vector: iv.vector };
    const spec = { ...target, mode: iv.mode, strength: iv.strength, unit: iv.unit };
    if (iv.tokens !== "all") spec.tokens = iv.tokens;
    if (iv.after_n !== undefined) spec.after_n = iv.after_n;
    if (iv.first_n !== undefined) spec.first_n = iv.first_n;
    if (iv.whenIndex !== undefined) spec.when = { sae: iv.whenSae || $("#sae").value, index: iv.whenIndex, above: iv.whenAbove ?? 0, unit: "max_act" };
    return spec;
  });
  const promptScale = Number($("#prompt-scale").value);
  return features.length ? { features, ...(promptScale !== 1 ? { prompt_scale: promptScale } : {}) } : null;
}

function showSteeringError(error) {
  for (const node of document.querySelectorAll(".intervention .error, #steering-error")) node.textContent = "";
  const match = /^steering\.features\[(\d+)\]/.exec(error.param ?? "");
  const slot = match && $(`#intervention-error-${match[1]}`);
  (slot ?? $("#steering-error")).textContent = error.param ? `${error.param}: ${error.message}` : error.message;
}

// ---- comparing: both columns streamed, same seed and sampling, each with its own history ----
function sampling() {
  return { seed: Number($("#seed").value), temperature: Number($("#temperature").value), max_tokens: Number($("#max-tokens").value) };
}

function requestBody(column) {
  const body = { model: column === "default" ? baseModel() : $("#model").value, messages: state.columns[column], ...sampling() };
  const steer = column === "steered" ? steering() : null;
  if (steer) body.steering = steer;
  return body;
}

function readoutFor() {
  const [sae, index] = $("#colour").value ? JSON.parse($("#colour").value) : [];
  const fallback = state.interventions.find((iv) => iv.kind === "feature")?.sae ?? $("#sae").value;
  return sae ? { sae, top_k: 5, features: [Number(index)] } : fallback ? { sae: fallback, top_k: 5 } : null;
}

async function send(text) {
  state.busy = true;
  $("#send").disabled = $("#clear").disabled = true;
  for (const node of document.querySelectorAll(".intervention .error, #steering-error")) node.textContent = "";
  try {
    const readout = readoutFor();
    const asked = {};
    for (const column of ["default", "steered"]) {
      state.columns[column].push({ role: "user", content: text });
      asked[column] = requestBody(column);
      bubble(column, "user").textContent = text;
    }
    await Promise.allSettled(["default", "steered"].map((column) => stream(column, asked[column], readout)));
  } finally {
    state.busy = false;
    $("#send").disabled = $("#clear").disabled = false;
  }
}

// One column's answer, streamed; any failure (refused, network, an error event) shows in its place.
async function stream(column, body, readout) {
  const answer = bubble(column, "assistant");
  const log = answer.parentElement;
  answer.dataset.state = "streaming";
  log.setAttribute("aria-busy", "true");
  let text = "";
  let tokens = [];
  try {
    let response = await api("/v1/chat/completions", { ...body, stream: true, ...(readout && state.reads ? { readout } : {}) });
    if (!response.ok) {
      const error = apiError(await response.json().catch(() => ({})));
      if (!(readout && state.reads && error.param?.startsWith("readout"))) throw error;
      state.reads = false; // this engine reads no features (a GPU engine, for now): answers alone from here on
      response = await api("/v1/chat/completions", { ...body, stream: true });
      if (!response.ok) throw apiError(await response.json().catch(() => ({})));
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let pending = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      pending += decoder.decode(value, { stream: true });
      const events = pending.split("\n\n");
      pending = events.pop();
      for (const event of events) {
        if (!event.startsWith("data: {")) continue;
        const data = JSON.parse(event.slice(6));
        if (data.error) throw apiError(data);
        const choice = data.choices?.[0];
        if (!choice) continue;
        text += choice.delta?.content ?? "";
        tokens = tokens.concat(choice.readout?.tokens ?? []);
        answer.textContent = text;
      }
    }
  } catch (error) {
    state.columns[column].pop(); // the turn did not happen: the user may send it again
    answer.dataset.state = "error";
    answer.textContent = error.message;
    if (column === "steered") showSteeringError(error);
    return;
  } finally {
    log.removeAttribute("aria-busy");
  }
  state.columns[column].push({ role: "assistant", content: text });
  answer.dataset.text = text;
  if (tokens.length) showTokens(answer, text, tokens, readout);
  answer.dataset.state = "done";
}

function bubble(column, role) {
  const node = document.createElement("div");
  node.className = `message ${role}`;
  $(`#${column}-column .log`).append(node);
  return node;
}

// The answer as tokens: each read token a focusable span holding its features; what no readout
// covers (the last token is never fed back, so never read) stays plain text.
function showTokens(answer, text, tokens, readout) {
  answer.replaceChildren();
  let at = 0;
  const colourBy = readout.features?.[0];
  const scale = colourBy !== undefined ? state.interventions.find((iv) => iv.index === colourBy && iv.sae === readout.sae)?.max_act || 1 : 1;
  for (const token of tokens) {
    if (!text.startsWith(token.token, at)) break;
    const span = document.createElement("span");
    span.className = "token";
    span.tabIndex = answer.querySelector(".token") ? -1 : 0; // one tab stop per answer; arrows move within it
    span.textContent = token.token;
    span.dataset.top = JSON.stringify(token.top);
    span.dataset.sae = readout.sae;
    if (colourBy !== undefined) {
      const value = token.features[String(colourBy)] ?? 0;
      span.style.backgroundColor = `rgba(255, 140, 0, ${Math.min(1, Math.max(0, value / scale)).toFixed(3)})`;
      span.dataset.value = value;
    }
    answer.append(span);
    at += token.token.length;
  }
  answer.append(text.slice(at));
}

async function showTooltip(span) {
  const tip = $("#tooltip");
  const top = JSON.parse(span.dataset.top);
  tip.replaceChildren(...top.map(({ index, activation: value }) => {
    const line = document.createElement("div");
    line.textContent = `#${index} ${num(value)}`;
    card(span.dataset.sae, index).then((c) => (line.textContent = `#${index} ${c.label ?? ""} ${num(value)}`)).catch(() => {});
    return line;
  }));
  if (!top.length) tip.textContent = "no feature active";
  const box = span.getBoundingClientRect();
  tip.style.left = `${Math.min(window.scrollX + box.left, window.scrollX + window.innerWidth - 260)}px`;
  tip.style.top = `${window.scrollY + box.bottom + 4}px`;
  span.setAttribute("aria-describedby", "tooltip");
  tip.hidden = false;
}

// ---- copying the current steering, in forms that paste and work unchanged ----
function lastTurn() {
  // The steered column's history up to its last message from the user: the turn to reproduce.
  const messages = state.columns.steered;
  const end = messages.map((m) => m.role).lastIndexOf("user");
  return end >= 0 ? messages.slice(0, end + 1) : [{ role: "user", content: $("#prompt").value || "Hello!" }];
}

async function copied(kind) {
  const body = { model: $("#model").value, messages: lastTurn(), ...sampling() };
  const steer = steering();
  if (steer) body.steering = steer;
  const origin = window.location.origin;
  if (kind === "curl") {
    const auth = state.key ? ` -H ${shell(`Authorization: Bearer ${state.key}`)}` : "";
    return `curl -sg ${shell(`${origin}/v1/chat/completions`)} -H 'Content-Type: application/json'${auth} -d ${shell(JSON.stringify(body))}`;
  }
  if (kind === "python") {
    const { steering: extra, model, messages, ...rest } = body;
    const args = Object.entries(rest).map(([k, v]) => `    ${k}=${JSON.stringify(v)},`).join("\n");
    return [
      "from openai import OpenAI",
      "",
      `client = OpenAI(base_url=${JSON.stringify(`${origin}/v1`)}, api_key=${JSON.stringify(state.key || "unused")})`,
      "reply = client.chat.completions.create(",
      `    model=${JSON.stringify(model)},`,
      `    messages=${pyLiteral(messages)},`,
      args,
      `    extra_body=${pyLiteral(extra ? { steering: extra } : {})},`,
      ")",
      "print(reply.choices[0].message.content)",
    ].join("\n");
  }
  // A preset chosen as the model steers first, with the page's steering added (as the server does).
  const chosen = $("#model").value;
  const base = chosen !== baseModel() ? await json(`/v1/presets/${encodeURIComponent(chosen)}`) : { features: [] };
  const features = [...base.features, ...(steer?.features ?? [])];
  if (!features.length) return "# nothing to save: add a feature or a vector first";
  const promptScale = steer?.prompt_scale ?? base.prompt_scale;
  // Flow style, as the example presets file writes features.
  const lines = ["presets:", "  - name: my-preset", "    description: made in the playground", `    model: ${yaml(baseModel())}`, "    features:"];
  lines.push(...features.map((f) => `      - ${yaml(f)}`));
  if (promptScale !== undefined) lines.push(`    prompt_scale: ${yaml(promptScale)}`);
  return lines.join("\n");
}

// YAML in flow style: JSON's, except that a number is written so YAML reads a number (1e-7 is a
// string to YAML 1.1; 1.0e-7 is a float).
function yaml(value) {
  if (typeof value === "number") return String(value).replace(/^(-?\d+)e/, "$1.0e");
  if (Array.isArray(value)) return `[${value.map(yaml).join(", ")}]`;
  if (value && typeof value === "object") return `{${Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}: ${yaml(v)}`).join(", ")}}`;
  return JSON.stringify(value);
}

const shell = (text) => `'${text.replaceAll("'", `'\\''`)}'`;
// Python literals: JSON's, with its three constants spelled as Python spells them.
const pyLiteral = (value) => JSON.stringify(value).replace(/"(?:[^"\\]|\\.)*"|\b(true|false|null)\b/g, (m, word) =>
  word ? { true: "True", false: "False", null: "None" }[word] : m);

// ---- small DOM helpers ----
function button(text, onClick) {
  const node = document.createElement("button");
  node.type = "button";
  node.textContent = text;
  node.addEventListener("click", onClick);
  return node;
}

function select(options, value, onChange, name) {
  const node = document.createElement("select");
  node.name = name;
  node.append(...options.map((o) => new Option(o, o, false, o === value)));
  node.addEventListener("change", () => onChange(node.value));
  return node;
}

function input(type, value, onInput, limits = {}) {
  const node = document.createElement("input");
  node.type = type;
  Object.assign(node, limits); // before the value, which a range input clamps to its limits
  node.value = value;
  node.addEventListener("input", () => onInput(Number(node.value)));
  return node;
}

// A number field that may be left empty (then the request leaves the field out).
function optional(owner, field) {
  const node = document.createElement("input");
  node.type = "number";
  node.step = "any";
  node.value = owner[field] ?? "";
  node.addEventListener("input", () => (owner[field] = node.value === "" ? undefined : Number(node.value)));
  return node;
}

function text(owner, field, placeholder) {
  const node = document.createElement("input");
  node.value = owner[field] ?? "";
  node.placeholder = placeholder;
  node.addEventListener("input", () => (owner[field] = node.value.trim() || undefined));
  return node;
}

function labelled(text, control) {
  const label = document.createElement("label");
  label.append(`${text} `, control);
  return label;
}

function mark(text) {
  const node = document.createElement("mark");
  node.textContent = text;
  return node;
}

const num = (x) => (x === undefined || x === null ? "?" : Math.abs(x) >= 0.01 || x === 0 ? x.toFixed(2) : x.toExponential(1));

// ---- wiring ----
$("#search-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const q = $("#query").value.trim();
  if (q) search(json(`/v1/saes/${encodeURIComponent($("#sae").value)}/features?${new URLSearchParams({ q, limit: 12 })}`));
});
$("#text-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("#text").value.trim();
  if (text) search(json(`/v1/saes/${encodeURIComponent($("#sae").value)}/features/search`, { text, top_k: 12 }));
});
$("#add-vector").addEventListener("click", () => {
  const vector = $("#vector").value;
  if (vector) addIntervention({ kind: "vector", vector });
});
$("#send-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("#prompt").value.trim();
  if (!text || state.busy) return;
  $("#prompt").value = "";
  send(text);
});
$("#prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("#send-form").requestSubmit();
  }
});
$("#clear").addEventListener("click", () => {
  state.columns = { default: [], steered: [] };
  for (const log of document.querySelectorAll(".log")) log.replaceChildren();
});
$("#change-key").addEventListener("click", () => askKey().then(loadServer));
for (const copy of document.querySelectorAll("[data-copy]")) {
  copy.addEventListener("click", async () => {
    let text;
    try {
      text = await copied(copy.dataset.copy);
    } catch (error) {
      text = `# ${error.message}`;
    }
    $("#copied").value = text;
    await navigator.clipboard?.writeText(text).catch(() => {}); // the box above holds it either way
  });
}
for (const kind of ["mouseover", "focusin"]) {
  document.addEventListener(kind, (event) => event.target.classList?.contains("token") && showTooltip(event.target));
}
for (const kind of ["mouseout", "focusout"]) {
  document.addEventListener(kind, (event) => event.target.classList?.contains("token") && ($("#tooltip").hidden = true));
}
document.addEventListener("keydown", (event) => {
  const token = event.target.classList?.contains("token") ? event.target : null;
  if (event.key === "Escape") $("#tooltip").hidden = true;
  if (!token || !["ArrowLeft", "ArrowRight"].includes(event.key)) return;
  const next = event.key === "ArrowRight" ? token.nextElementSibling : token.previousElementSibling;
  if (next?.classList.contains("token")) {
    event.preventDefault();
    next.focus();
  }
});

renderInterventions();
loadServer().then(
  () => ($("#status").textContent = "ready"),
  (error) => ($("#status").textContent = `could not reach the server: ${error.message}`),
);
