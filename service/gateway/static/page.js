// The page: the form (fields and defaults from GET /v1/models), the API key, errors next to their
// fields, and the submission of txt2img / img2img jobs, which jobs.js then follows.

import { Api, ApiError } from "./api.js";
import { Runs } from "./jobs.js";
import { MaskEditor } from "./mask.js";

const $ = (id) => document.getElementById(id);
const api = new Api();
const form = $("generate");
let models = [];
let strengthTouched = false; // the strength is sent once the slider has moved; else the model's default

const runs = new Runs($("runs"), $("no-jobs"), api, {
  onUseImage: (blob) => {
    $("image-panel").open = true;
    editor.load(blob);
  },
  onError: (error) => showApiError(error),
});
const editor = new MaskEditor(
  {
    drop: $("drop"),
    file: $("init-file"),
    editor: $("editor"),
    image: $("init-canvas"),
    mask: $("mask-canvas"),
    brush: $("brush"),
    erase: $("erase"),
    clear: $("clear-mask"),
    remove: $("remove-image"),
  },
  fitSizeTo,
);

// --- models and their defaults -------------------------------------------------------------------

async function loadModels() {
  try {
    // The page draws and redraws images; upscalers (task "upscale") are served at /v1/upscale.
    models = (await api.models()).models.filter((m) => m.task !== "upscale");
  } catch (error) {
    showApiError(error);
    return;
  }
  $("key-form").hidden = !api.key;
  $("key-message").textContent = "";
  const select = $("model");
  const chosen = select.value;
  select.replaceChildren(...models.map((m) => new Option(m.name, m.name, m.default, m.default)));
  if (models.some((m) => m.name === chosen)) select.value = chosen;
  applyModel();
  $("generate-button").disabled = false;
}

function currentModel() {
  return models.find((m) => m.name === $("model").value);
}

/** The model's native size, size multiple, steps, guidance and samplers, into the form. */
function applyModel() {
  const model = currentModel();
  if (!model) return;
  for (const id of ["width", "height"]) {
    $(id).step = model.size_multiple;
    $(id).min = model.size_multiple;
  }
  $("width").value = model.width;
  $("height").value = model.height;
  $("steps").value = model.default_steps;
  $("guidance_scale").value = model.default_guidance_scale;
  $("sampler").replaceChildren(...model.samplers.map((s) => new Option(s, s)));
  $("sampler").value = model.default_sampler;
  const workers = model.live_workers;
  $("model-hint").textContent =
    `${model.family}, native ${model.width}×${model.height}, sizes in multiples of ${model.size_multiple}` +
    (model.inpainting ? "; an inpainting model: give an image and paint a mask" : "") +
    (workers ? ` · ${workers} worker${workers > 1 ? "s" : ""} live` : " · no worker live yet: jobs wait");
  if (editor.hasImage) fitSizeTo(editor.picture.width, editor.picture.height);
}

/** An init image sets the size: its aspect ratio, about the model's native area, in its multiples. */
function fitSizeTo(width, height) {
  const model = currentModel();
  if (!model) return;
  const scale = Math.sqrt((model.width * model.height) / (width * height));
  const round = (v) => Math.max(model.size_multiple, Math.round(v / model.size_multiple) * model.size_multiple);
  $("width").value = round(width * scale);
  $("height").value = round(height * scale);
}

// --- the request ---------------------------------------------------------------------------------

function numberField(id) {
  const text = $(id).value.trim();
  return text === "" ? undefined : Number(text);
}

async function requestBody() {
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value,
    model: $("model").value || undefined,
    width: numberField("width"),
    height: numberField("height"),
    steps: numberField("steps"),
    sampler: $("sampler").value || undefined,
    guidance_scale: numberField("guidance_scale"),
    n: numberField("n") ?? 1,
    seed: $("random-seed").checked ? undefined : numberField("seed"),
  };
  if (!editor.hasImage) return { kind: "txt2img", body };
  const width = body.width ?? editor.picture.width;
  const height = body.height ?? editor.picture.height;
  body.init_image = await editor.imagePng(width, height);
  if (editor.hasMask) body.mask = await editor.maskPng(width, height);
  if (strengthTouched) body.strength = Number($("strength").value);
  return { kind: "img2img", body };
}

async function generate(event) {
  event.preventDefault();
  clearErrors();
  const button = $("generate-button");
  button.disabled = true;
  try {
    const { kind, body } = await requestBody();
    const accepted = await api.submit(kind, body);
    const model = models.find((m) => m.name === accepted.model);
    runs.add({
      kind,
      masked: body.mask !== undefined,
      model: accepted.model,
      prompt: body.prompt,
      width: body.width ?? model?.width,
      height: body.height ?? model?.height,
      steps: body.steps ?? model?.default_steps,
      created: Date.now(),
      jobs: accepted.jobs.map((job) => ({ id: job.id, seed: job.seed })),
    });
  } catch (error) {
    showApiError(error);
  } finally {
    button.disabled = false;
  }
}

// --- errors and the API key ----------------------------------------------------------------------

function clearErrors() {
  for (const node of document.querySelectorAll("[data-error-for]")) node.textContent = "";
  for (const node of document.querySelectorAll(".invalid")) node.classList.remove("invalid");
  clearInterval(countdown);
  $("notice").hidden = true;
}

function showApiError(error) {
  if (!(error instanceof ApiError)) {
    $("form-error").textContent = `The service could not be reached: ${error.message}`;
    return;
  }
  if (error.status === 401) {
    $("key-form").hidden = false;
    $("key-message").textContent = `${error.message}. Enter an API key to use this service.`;
    $("api-key").focus();
  } else if (error.status === 422) {
    for (const { field, message } of error.fields) {
      const slot = document.querySelector(`[data-error-for="${CSS.escape(field)}"]`) ?? $("form-error");
      slot.textContent += (slot.textContent ? " " : "") + message;
      $(field)?.classList.add("invalid");
    }
  } else if (error.status === 429) {
    busy(error.message, error.retryAfter ?? 1);
  } else {
    $("form-error").textContent = error.message;
  }
}

let countdown = null;

/** A 429: the service's reason, and a countdown from its Retry-After. */
function busy(message, seconds) {
  clearInterval(countdown);
  let left = seconds;
  const show = () => {
    $("notice").textContent =
      `The service is busy: ${message.replace(/[.;]?\s*retry later\.?$/i, "")}. ` +
      (left > 0 ? `Try again in ${left} s.` : "You can try again now.");
  };
  show();
  $("notice").hidden = false;
  countdown = setInterval(() => {
    left -= 1;
    show();
    if (left <= 0) clearInterval(countdown);
  }, 1000);
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  api.key = $("api-key").value.trim();
  $("key-message").textContent = "";
  loadModels();
});

// --- wiring --------------------------------------------------------------------------------------

form.addEventListener("submit", generate);
$("model").addEventListener("change", applyModel);
$("seed").addEventListener("input", () => {
  $("random-seed").checked = $("seed").value === "";
});
$("random-seed").addEventListener("change", () => {
  if ($("random-seed").checked) $("seed").value = "";
});
$("strength").addEventListener("input", () => {
  strengthTouched = true;
  $("strength-value").textContent = $("strength").value;
});

$("api-key").value = api.key;
$("generate-button").disabled = true; // until the models are known
runs.restore();
loadModels();
