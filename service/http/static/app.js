// The demo page: plain JavaScript, no build step, nothing fetched from outside this server.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { models: [], controller: null, energies: [], energyName: "E", pngUrl: null };
const LANGEVIN_FIELDS = ["steps", "step_size", "noise", "temperature"];
const CHAIN_FIELDS = { ebm: LANGEVIN_FIELDS, ddls: LANGEVIN_FIELDS, cnf: ["steps", "temperature"] };  // sent when changed
const MASKS = {  // [x, y, width, height] of the part to fill in, in units of the image side
  top: [0, 0, 1, 0.5], bottom: [0, 0.5, 1, 0.5], left: [0, 0, 0.5, 1], right: [0.5, 0, 0.5, 1],
};

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return `${response.status}: ${typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)}`;
  } catch (_) {
    return `${response.status} ${response.statusText}`;
  }
}

const round = (number) => Number(number.toPrecision(3));
const isNumber = (value) => typeof value === "number" && Number.isFinite(value);
const TRAINING_FIGURES = {  // the figures a trainer records in its checkpoint, by their metrics key
  val_eqm: (value) => `validation EqM loss ${value}`,
  val_cd: (value) => `validation CD loss ${value}`,
  val_e_test: (value) => `validation energy of test images ${value}`,
  val_e_noise: (value) => `validation energy of noise ${value}`,
  val_flow_matching: (value) => `validation flow-matching loss ${value}`,
  test_bits_per_dim: (value) => `test ${value} bits/dim`,
  generator_loss: (value) => `generator loss ${value} (last epoch)`,
  critic_loss: (value) => `critic loss ${value} (last epoch)`,
};
const STARTS = { noise: "noise", buffer: "the replay buffer", image: "an image" };

function chainSteps(record, model) {
  // The steps an evaluation's samples took, in the model's own terms.
  const kind = controlKind(model);
  if (kind === "cnf") return `${record.steps} ${record.solver || "solver"} steps`;
  if (kind === "ddls" || kind === "gan") return record.steps ? `${record.steps} DDLS steps` : "one generator pass";
  const size = isNumber(record.step_size) ? ` of ${record.step_size}` : "";
  if (isNumber(record.mean_steps)) return `at most ${record.steps} steps${size} (mean ${record.mean_steps})`;
  return `${record.steps} steps${size}`;
}

function describeEvaluation(key, record, model) {
  // What `evaluate --record` stored: its figures, then how its samples were drawn (from the record itself).
  const figures = [];
  if (isNumber(record.frechet_distance)) figures.push(`FD ${round(record.frechet_distance)}`);
  if (isNumber(record.precision)) figures.push(`precision ${round(record.precision)}`);
  if (isNumber(record.recall)) figures.push(`recall ${round(record.recall)}`);
  const percent = (share) => `${Math.round(share * 1000) / 10} %`;
  if (isNumber(record.label_accuracy)) figures.push(`label accuracy ${percent(record.label_accuracy)}`);
  if (isNumber(record.test_bits_per_dim)) {
    const error = record.likelihood?.standard_error;
    figures.push(`test ${round(record.test_bits_per_dim)}${isNumber(error) ? ` ± ${round(error)}` : ""} bits/dim`);
  }
  const from = record.init ? ` from ${STARTS[record.init] || record.init}` : "";
  const drawn = [`${isNumber(record.n) ? `${record.n} samples` : "samples"}${from}`];
  if (record.label === "all") drawn.push("each class in turn");
  else if (record.label != null) drawn.push(`label ${record.label}`);
  if (isNumber(record.steps)) drawn.push(chainSteps(record, model));
  if (record.noise) drawn.push(`noise ${record.noise}`);
  if (record.tolerance) drawn.push(`stopped at an RMS move of ${record.tolerance}`);
  if (isNumber(record.guidance)) drawn.push(`guidance ${record.guidance}`);
  if (isNumber(record.temperature)) drawn.push(`temperature ${record.temperature}`);
  const real = record.floor_frechet_distance;
  const floor = isNumber(real) ? `; real images: FD ${round(real)}` : "";
  const ensemble = key.startsWith("evaluate_ensemble") ? "ensemble: " : "";
  return `${ensemble}${figures.join(", ") || "no figures"} (${drawn.join(", ")}${floor})`;
}

function describeMetric(key, value, model) {
  if (value && typeof value === "object") return describeEvaluation(key, value, model);
  const shown = isNumber(value) ? Number(value.toPrecision(4)) : value;
  return key in TRAINING_FIGURES ? TRAINING_FIGURES[key](shown) : `${key.replaceAll("_", " ")} ${shown}`;
}

function currentModel() {
  return state.models.find((model) => model.name === $("model").value);
}

function noiseFrechetDistance(model) {
  const distance = model.metrics?.evaluate_noise?.frechet_distance;
  return typeof distance === "number" && Number.isFinite(distance) ? distance : null;
}

function bestModel(models) {
  // Open on the EBM whose chains from noise scored best (lowest Frechet distance), so that the first
  // Watch shows noise turning into digits; without that figure, the first EBM, then the first model.
  const energies = models.filter((model) => model.family === "ebm");
  const scored = energies.filter((model) => noiseFrechetDistance(model) !== null);
  scored.sort((a, b) => noiseFrechetDistance(a) - noiseFrechetDistance(b));
  return scored[0] || energies[0] || models[0];
}

function controlKind(model) {
  // Which controls apply: an EBM's Langevin chains ("ebm"); a GAN whose checkpoint saved its critic refines
  // its latent z by Langevin steps on E(z) = ||z||^2/2 - d(G(z)) ("ddls", Che et al. 2020); a continuous
  // normalizing flow integrates its ODE in solver steps from its prior ("cnf"); otherwise the family, whose
  // one pass takes none of them.
  if (model.family === "flow" && model.sampler && model.sampler.solver) return "cnf";
  return model.family === "gan" && model.latent_langevin ? "ddls" : model.family;
}

function takesLangevinControls(model) {
  return controlKind(model) in CHAIN_FIELDS;
}

function initChoice(value) {
  return document.querySelector(`input[name=init][value=${value}]`);
}

function applySamplerDefaults(model) {
  const sampler = model.sampler || {};
  for (const field of LANGEVIN_FIELDS) {
    $(field).value = sampler[field] ?? "";
  }
  $("n").max = model.limits.max_n;
  $("steps").max = model.limits.max_steps;
  $("steps").min = controlKind(model) === "ddls" ? 0 : 1;  // a GAN's 0 steps: the plain generator pass
}

function applyInitChoices(model) {
  // A model trained without a replay buffer answers init "buffer" with a 422: offer noise instead.
  const sampler = model.sampler || {};
  const hasBuffer = model.buffer_size != null;
  initChoice("buffer").disabled = !hasBuffer;
  $("buffer-choice").title = hasBuffer ? "" : `${model.name} was trained without a replay buffer`;
  $("noise-name").textContent = sampler.prior === "gaussian" ? "Gaussian noise" : "uniform noise";
  const wanted = sampler.init === "buffer" && hasBuffer ? "buffer" : "noise";
  initChoice(wanted).checked = true;
}

function fillClassPicker(model) {
  const classes = model.classes || [];
  const any = new Option("any", "");
  $("label").replaceChildren(any, ...classes.map((name, index) => new Option(name, String(index))));
  $("class-picker").hidden = !model.classes;
}

function selectedLabel() {
  const model = currentModel();
  const value = $("label").value;
  return model && model.classes && value !== "" ? Number(value) : null;
}

function describeModel(model) {
  const figures = Object.entries(model.metrics || {}).map(([key, value]) => describeMetric(key, value, model));
  const members = model.members.length > 1 ? ` · ensemble of ${model.members.length}` : "";
  const buffer = model.buffer_size != null ? ` · buffer ${model.buffer_size}/${model.buffer_capacity}` : "";
  const classes = model.classes ? ` · ${model.classes.length} classes` : "";
  const ddls = controlKind(model) === "ddls" ? " · latents refined by its critic (DDLS)" : "";
  const ode = controlKind(model) === "cnf" ? ` · CNF: ${model.sampler.solver} ODE steps from its prior` : "";
  return [`${model.family}${members}${buffer}${classes}${ddls}${ode}`, ...figures].join("\n");  // a figure a line
}

function showFamilyControls(model) {
  const kind = controlKind(model);
  for (const element of document.querySelectorAll("[data-family]")) {
    element.hidden = !element.dataset.family.split(" ").includes(kind);
  }
  // Colour models (shape [3, H, W]) take a coloured drawing; grey ones read any drawing as grey.
  $("pen-picker").hidden = model.shape.length !== 3 || model.shape[0] !== 3;
}

function fillDefaults() {
  const model = currentModel();
  if (!model) return;
  applySamplerDefaults(model);
  applyInitChoices(model);
  fillClassPicker(model);
  $("model-info").textContent = describeModel(model);
  showFamilyControls(model);
  updateCurl();
}

async function loadModels() {
  const response = await fetch("/models");
  if (!response.ok) throw new Error(await errorMessage(response));
  state.models = await response.json();
  const select = $("model");
  select.replaceChildren(...state.models.map((model) => {
    const option = document.createElement("option");
    option.value = model.name;
    option.textContent = `${model.name} (${model.family}${model.members.length > 1 ? ", ensemble" : ""})`;
    return option;
  }));
  if (!state.models.length) showError("This server has no models loaded.");
  else select.value = bestModel(state.models).name;
  fillDefaults();
}

function modelSide() {
  const model = currentModel();
  return model ? model.shape[model.shape.length - 1] : 28;
}

function padDataUrl() {
  // Send the drawing at the model's own size: small enough for any upload limit, nothing lost.
  const side = modelSide();
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = side;
  canvas.getContext("2d").drawImage($("pad"), 0, 0, side, side);
  return canvas.toDataURL("image/png");
}

function maskDataUrl(side) {
  const region = MASKS[$("mask").value];
  if (!region) return null;
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = side;
  const context = canvas.getContext("2d");
  context.fillStyle = "#000";
  context.fillRect(0, 0, side, side);
  context.fillStyle = "#fff";
  context.fillRect(region[0] * side, region[1] * side, region[2] * side, region[3] * side);
  return canvas.toDataURL("image/png");
}

function requestBody(extra = {}) {
  const body = { model: $("model").value, n: Number($("n").value) || 1 };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  const label = selectedLabel();
  if (label !== null) body.label = label;
  const model = currentModel();
  if (model && takesLangevinControls(model)) {
    const sampler = model.sampler || {};
    for (const field of CHAIN_FIELDS[controlKind(model)]) {
      const value = $(field).value;
      if (value !== "" && Number(value) !== sampler[field]) body[field] = Number(value);
    }
  }
  if (model && model.family === "ebm") {
    body.init = document.querySelector("input[name=init]:checked").value;
    if (body.init === "image") {
      body.image = padDataUrl();
      const mask = maskDataUrl(modelSide());
      if (mask) body.mask = mask;
    }
  }
  return Object.assign(body, extra);
}

function updateCurl() {
  const body = requestBody({ format: "png" });
  for (const field of ["image", "mask"]) if (body[field]) body[field] = "<base64 PNG>";
  $("curl").textContent = `curl -o samples.png -X POST ${location.origin}/sample \\\n` +
    `  -H 'content-type: application/json' \\\n  -d '${JSON.stringify(body)}'`;
}

function setBusy(busy) {
  for (const id of ["sample", "watch", "download-gif"]) $(id).disabled = busy;
  $("stop").disabled = !busy;
}

function showBlob(blob) {
  if (state.pngUrl) URL.revokeObjectURL(state.pngUrl);
  state.pngUrl = URL.createObjectURL(blob);
  $("result").src = state.pngUrl;
  $("download-png").href = state.pngUrl;
  $("download-png").hidden = false;
}

async function post(body) {
  state.controller = new AbortController();
  const response = await fetch("/sample", {
    method: "POST", headers: { "content-type": "application/json" },
    body: JSON.stringify(body), signal: state.controller.signal,
  });
  if (!response.ok) throw new Error(await errorMessage(response));
  return response;
}

async function run(action) {
  showError("");
  setBusy(true);
  try {
    await action();
  } catch (error) {
    if (error.name !== "AbortError") showError(error.message);
  } finally {
    setBusy(false);
    state.controller = null;
  }
}

function clearEnergyReadout() {
  // The readout and curve belong to the chains on screen: a new request must not show the last one's.
  // A GAN's DDLS chains move z, so their energy is E(z), not an image's E(x).
  const model = currentModel();
  state.energyName = model && controlKind(model) === "ddls" ? "E(z)" : "E";
  state.energies = [];
  $("energy-now").textContent = "";
  drawCurve();
}

async function sample() {
  clearEnergyReadout();
  $("step").textContent = "sampling…";
  const response = await post(requestBody({ format: "png" }));
  showBlob(await response.blob());
  $("step").textContent = `done: ${response.headers.get("x-steps") || ""} steps, seed ${response.headers.get("x-seed")}`;
}

function drawCurve() {
  const canvas = $("curve");
  const context = canvas.getContext("2d");
  context.clearRect(0, 0, canvas.width, canvas.height);
  const points = state.energies;
  if (points.length < 2) return;
  const values = points.map((point) => point[1]);
  const low = Math.min(...values), high = Math.max(...values), span = high - low || 1;
  const last = points[points.length - 1][0] || 1;
  context.strokeStyle = "#2453d4";
  context.lineWidth = 2;
  context.beginPath();
  points.forEach(([step, value], index) => {
    const x = 8 + (canvas.width - 16) * (step / last);
    const y = 8 + (canvas.height - 24) * (1 - (value - low) / span);
    if (index === 0) context.moveTo(x, y); else context.lineTo(x, y);
  });
  context.stroke();
  context.fillStyle = "#5b6470";
  context.font = "11px system-ui";
  const name = state.energyName === "E" ? "energy" : state.energyName;
  context.fillText(`mean ${name}: ${high.toFixed(4)} → ${values[values.length - 1].toFixed(4)}`, 8, canvas.height - 4);
}

function handleEvent(name, data) {
  if (name === "frame") {
    $("result").src = `data:image/png;base64,${data.grid}`;
    // Chains that arrived at their tolerance stop and freeze; say how many, beside the step.
    const stopped = data.stopped && data.stopped.length ? ` · ${data.stopped.length} chains stopped` : "";
    $("step").textContent = `step ${data.step} / ${data.steps}${stopped}`;
    if (data.mean_energy != null) {
      state.energies.push([data.step, data.mean_energy]);
      $("energy-now").textContent = `${state.energyName} = ${data.mean_energy.toFixed(4)}`;
      drawCurve();
    }
  } else if (name === "done") {
    $("result").src = `data:image/png;base64,${data.grid}`;
    const perChain = data.chain_steps || [];
    const mean = perChain.length ? perChain.reduce((sum, steps) => sum + steps, 0) / perChain.length : data.steps;
    const ran = mean < data.steps ? `at most ${data.steps} steps (mean ${mean.toFixed(1)})` : `${data.steps} steps`;
    $("step").textContent = `done: ${ran}, seed ${data.seed}`;
    fetch($("result").src).then((reply) => reply.blob()).then(showBlob);
  } else if (name === "error") {
    throw new Error(`${data.status}: ${data.detail}`);
  }
}

async function watch() {
  clearEnergyReadout();
  $("step").textContent = "waiting for the worker…";
  const response = await post(requestBody({ stream: true }));
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let pending = "";
  let finished = false;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) {
      if (!finished) throw new Error("the stream ended before the samples arrived");
      break;
    }
    pending += value;
    let boundary;
    while ((boundary = pending.indexOf("\n\n")) >= 0) {
      const block = pending.slice(0, boundary);
      pending = pending.slice(boundary + 2);
      const name = (block.match(/^event: (.*)$/m) || [])[1];
      const data = (block.match(/^data: (.*)$/m) || [])[1];
      if (name && data) {
        handleEvent(name, JSON.parse(data));
        finished = finished || name === "done";
      }
    }
  }
}

async function downloadGif() {
  const response = await post(requestBody({ format: "gif" }));
  const url = URL.createObjectURL(await response.blob());
  const link = document.createElement("a");
  link.href = url;
  link.download = "trajectory.gif";
  link.click();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

function setUpDrawing(pad, clearButton, upload, onChange) {
  // A canvas to draw on (white, or the pen's colour where the model is in colour) or to drop an upload into.
  const context = pad.getContext("2d");
  const clear = () => { context.fillStyle = "#000"; context.fillRect(0, 0, pad.width, pad.height); };
  clear();
  let drawing = false;
  const point = (event) => {
    const box = pad.getBoundingClientRect();
    return [(event.clientX - box.left) * pad.width / box.width, (event.clientY - box.top) * pad.height / box.height];
  };
  pad.addEventListener("pointerdown", (event) => {
    drawing = true;
    pad.setPointerCapture(event.pointerId);
    context.beginPath();
    context.moveTo(...point(event));
  });
  pad.addEventListener("pointermove", (event) => {
    if (!drawing) return;
    context.strokeStyle = $("pen-picker").hidden ? "#fff" : $("pen").value;
    context.lineWidth = 16;
    context.lineCap = context.lineJoin = "round";
    context.lineTo(...point(event));
    context.stroke();
  });
  const stop = () => {
    if (!drawing) return;
    drawing = false;
    onChange();
  };
  pad.addEventListener("pointerup", stop);
  pad.addEventListener("pointercancel", stop);
  clearButton.addEventListener("click", () => { clear(); onChange(); });
  upload.addEventListener("change", async () => {
    const file = upload.files[0];
    if (!file) return;
    try {
      const bitmap = await createImageBitmap(file);
      clear();
      context.drawImage(bitmap, 0, 0, pad.width, pad.height);
      onChange();
    } catch (_) {
      showError(`${file.name} is not an image this browser can read`);
    }
  });
}

function setUpPad() {
  setUpDrawing($("pad"), $("clear"), $("upload"), () => {
    document.querySelector("input[name=init][value=image]").checked = true;
    updateCurl();
  });
}

const SCORE_NAMES = { energy: "energy", bits_per_dim: "bits/dim", negative_critic: "critic" };

function scoreText(answer, item) {
  // The family's own number for the image: its energy, its bits/dim (a CNF's with its solver's evaluations), or
  // its critic's value; then, where it differs, the OOD score the verdict is about.
  const parts = [];
  if (isNumber(item.energy)) parts.push(`energy ${round(item.energy)}`);
  if (isNumber(item.bits_per_dim)) parts.push(`${round(item.bits_per_dim)} bits/dim`);
  if (isNumber(item.evaluations)) parts.push(`${item.evaluations} field evaluations`);
  if (isNumber(item.critic)) parts.push(`critic ${round(item.critic)}`);
  if (isNumber(item.ood) && !(answer.ood_score in SCORE_NAMES)) parts.push(`${answer.ood_score} ${round(item.ood)}`);
  return parts.join(", ") || "not finite";
}

function verdict(item) {
  // The p-value in words: the share of the model's own held-out images whose OOD score is at least this one's.
  if (!isNumber(item.ood_p)) return { text: "no reference scores recorded: no verdict", unusual: false };
  const percent = item.ood_p * 100;
  const share = percent >= 1 ? `${Math.round(percent)} %` : percent > 0 ? `${percent.toPrecision(1)} %` : "none";
  const unusual = item.ood_p < 0.01;
  const word = unusual ? "unusual for this model" : item.ood_p < 0.05 ? "borderline" : "typical of its data";
  return { text: `${word}: ${share} of its own held-out images score as high (p = ${round(item.ood_p)})`, unusual };
}

function scorePadImage(model) {
  // The drawing at the model's own size (scoring never resizes on the server: the resize is the page's choice).
  const [height, width] = model.shape.slice(-2);
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  canvas.getContext("2d").drawImage($("score-pad"), 0, 0, width, height);
  return canvas.toDataURL("image/png");
}

async function scoreWith(model) {
  if (![1, 3].includes(model.shape[0]) || model.shape.length !== 3) {
    return { score: "", verdict: { text: `scores ${model.shape[0]}-channel images; the pad draws grey or colour` } };
  }
  const response = await fetch("/score", {
    method: "POST", headers: { "content-type": "application/json" },
    body: JSON.stringify({ model: model.name, images: [scorePadImage(model)] }),
  });
  if (!response.ok) return { score: "", verdict: { text: await errorMessage(response), unusual: false } };
  const answer = await response.json();
  return { score: scoreText(answer, answer.results[0]), verdict: verdict(answer.results[0]) };
}

async function scoreAll() {
  // One request per model, all at once; each row fills in as its answer comes (a CNF's solve takes longest).
  const body = $("scores").querySelector("tbody");
  body.replaceChildren();
  $("scores").hidden = false;
  const rows = state.models.map((model) => {
    const row = body.insertRow();
    row.dataset.model = model.name;
    row.insertCell().textContent = model.name;
    row.insertCell().textContent = "scoring…";
    row.insertCell();
    return row;
  });
  await Promise.all(state.models.map(async (model, index) => {
    const result = await scoreWith(model).catch((error) => ({ score: "", verdict: { text: error.message } }));
    rows[index].cells[1].textContent = result.score;
    rows[index].cells[2].textContent = result.verdict.text;
    rows[index].cells[2].className = result.verdict.unusual ? "unusual" : "";
  }));
}

function setUpScorePad() {
  setUpDrawing($("score-pad"), $("score-clear"), $("score-upload"), () => {});
  $("score").addEventListener("click", async () => {
    $("score").disabled = true;
    try {
      await scoreAll();
    } finally {
      $("score").disabled = false;
    }
  });
}

function setUp() {
  setUpPad();
  setUpScorePad();
  $("model").addEventListener("change", fillDefaults);
  document.querySelector(".controls").addEventListener("input", updateCurl);
  $("sample").addEventListener("click", () => run(sample));
  $("watch").addEventListener("click", () => run(watch));
  $("download-gif").addEventListener("click", () => run(downloadGif));
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("copy").addEventListener("click", () => navigator.clipboard.writeText($("curl").textContent)
    .catch(() => showError("the browser refused clipboard access; select the command instead")));
  loadModels().catch((error) => showError(`could not load the model list: ${error.message}`));
}

setUp();
