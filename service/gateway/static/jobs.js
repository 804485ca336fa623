// The jobs of this page's session, newest first: one card per request (a "run" of n jobs), each image
// followed through its events (queue position polled while it waits), its PNG shown when done.

import { ApiError } from "./api.js";

const SESSION_KEY = "ldm.runs"; // sessionStorage: the runs survive a reload of the page, not its tab
const KEEP_RUNS = 50;
const TERMINAL = new Set(["succeeded", "failed", "cancelled", "expired"]);
const QUEUE_POLL_MS = 1000;
const RETRIES = 5; // reconnections of a job's event stream before giving up on it

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

export class Runs {
  /** `onUseImage(blob)`: "use as init image" on a result; `onError(error)`: an ApiError while following. */
  constructor(list, empty, api, { onUseImage, onError }) {
    this.list = list;
    this.empty = empty;
    this.api = api;
    this.onUseImage = onUseImage;
    this.onError = onError;
  }

  /** The runs stored in this tab's session, followed again (their events replay from the start). */
  restore() {
    for (const run of this.stored().reverse()) this.show(run);
  }

  /** A run just accepted: {kind, model, prompt, width, height, steps, created, jobs: [{id, seed}]}. */
  add(run) {
    const runs = [run, ...this.stored()].slice(0, KEEP_RUNS);
    sessionStorage.setItem(SESSION_KEY, JSON.stringify(runs));
    this.show(run);
  }

  stored() {
    try {
      return JSON.parse(sessionStorage.getItem(SESSION_KEY) ?? "[]");
    } catch {
      return [];
    }
  }

  show(run) {
    const card = element("li", "run");
    card.dataset.runId = run.jobs[0].id;
    const head = element("div", "run-head");
    const text = element("div", "run-text");
    text.append(element("p", "run-prompt", run.prompt), element("p", "hint", describe(run)));
    const cancel = element("button", "cancel quiet", "Cancel");
    cancel.type = "button";
    head.append(text, cancel);
    const images = element("div", "images");
    card.append(head, images);
    this.list.prepend(card);
    this.empty.hidden = true;

    const views = run.jobs.map((job) => new JobView(this, job, run));
    const update = () => {
      cancel.hidden = views.every((view) => TERMINAL.has(view.status));
    };
    for (const view of views) {
      images.append(view.figure);
      view.onChange = update;
      view.follow();
    }
    cancel.addEventListener("click", async () => {
      cancel.disabled = true;
      for (const view of views.filter((v) => !TERMINAL.has(v.status))) {
        try {
          await this.api.cancel(view.job.id);
        } catch (error) {
          this.onError(error);
        }
      }
    });
    update();
  }
}

function describe(run) {
  const parts = [run.model, `${run.width}×${run.height}`, `${run.steps} steps`];
  if (run.kind === "img2img") parts.push(run.masked ? "inpainting" : "img2img");
  parts.push(new Date(run.created).toLocaleTimeString());
  return parts.join(" · ");
}

/** One image: its status line, progress bar, and the PNG with its seed and a download link. */
class JobView {
  constructor(runs, job, run) {
    this.runs = runs;
    this.api = runs.api;
    this.job = job;
    this.status = "queued";
    this.onChange = () => {};
    this.figure = element("figure", "job");
    this.figure.dataset.jobId = job.id;
    this.figure.dataset.seed = String(job.seed);
    this.frame = element("div", "frame");
    this.frame.style.aspectRatio = `${run.width} / ${run.height}`;
    this.image = element("img");
    this.image.alt = `${run.prompt} (seed ${job.seed})`;
    this.image.hidden = true;
    this.frame.append(this.image);
    this.bar = element("progress");
    this.bar.max = 1;
    this.bar.value = 0;
    this.line = element("span", "status", "queued");
    const seed = element("span", "seed", `seed ${job.seed}`);
    this.download = element("a", "download", "Download");
    this.download.download = `ldm-${job.seed}.png`;
    this.download.hidden = true;
    this.reuse = element("button", "reuse link", "Use as init image");
    this.reuse.type = "button";
    this.reuse.hidden = true;
    this.reuse.addEventListener("click", () => this.blob && runs.onUseImage(this.blob));
    const caption = element("figcaption");
    caption.append(this.line, seed, this.download, this.reuse);
    this.figure.append(this.frame, this.bar, caption);
    this.figure.dataset.status = this.status;
  }

  set(status, text) {
    this.status = status;
    this.figure.dataset.status = status;
    this.line.textContent = text;
    if (TERMINAL.has(status)) this.bar.hidden = true;
    this.onChange();
  }

  async follow() {
    let lastId = null;
    for (let attempt = 0; !TERMINAL.has(this.status); attempt++) {
      try {
        await this.api.events(this.job.id, (event) => {
          lastId = event.id ?? lastId;
          this.onEvent(event);
        }, { lastEventId: lastId });
        if (!TERMINAL.has(this.status)) await this.refresh(); // the stream ended early: ask the job
      } catch (error) {
        if (error instanceof ApiError && (error.status === 404 || error.status === 401)) {
          this.set("expired", error.status === 404 ? "gone (its records expired)" : error.message);
          if (error.status === 401) this.runs.onError(error);
          return;
        }
        if (attempt >= RETRIES) {
          this.set("failed", `lost track of the job: ${error.message}`);
          return;
        }
        await sleep(500 * 2 ** attempt);
      }
    }
  }

  onEvent({ type, data }) {
    if (type === "queued") {
      this.set("queued", "queued");
      this.pollQueue();
    } else if (type === "started") {
      this.started = data.time;
      this.set("running", "starting");
    } else if (type === "progress") {
      this.bar.max = data.total;
      this.bar.value = data.step;
      this.set("running", `step ${data.step} of ${data.total}`);
    } else if (type === "succeeded") {
      const took = this.started ? ` in ${(data.time - this.started).toFixed(1)} s` : "";
      this.set("succeeded", `done${took}`);
      this.showResult();
    } else if (type === "failed") {
      this.set("failed", `failed: ${data.error || "the worker gave no reason"}`);
    } else if (type === "cancelled") {
      this.set("cancelled", "cancelled");
    } else if (type === "expired") {
      this.set("expired", "expired: no worker took it in time");
    }
  }

  /** The job's status by GET, for a stream that ended without saying how the job did. */
  async refresh() {
    const job = await this.api.job(this.job.id);
    if (job.status === "succeeded") this.onEvent({ type: "succeeded", data: { time: job.finished } });
    else if (TERMINAL.has(job.status)) this.onEvent({ type: job.status, data: { error: job.error } });
  }

  /** While queued: the jobs ahead of this one, from GET /v1/jobs/{id}. */
  async pollQueue() {
    if (this.polling) return;
    this.polling = true;
    while (this.status === "queued") {
      try {
        const job = await this.api.job(this.job.id);
        if (this.status !== "queued" || job.status !== "queued") break;
        const ahead = job.queue_position;
        this.line.textContent =
          ahead === null ? "queued" : ahead === 0 ? "queued · next in line" : `queued · ${ahead} ahead`;
      } catch {
        break; // the events say what happened
      }
      await sleep(QUEUE_POLL_MS);
    }
    this.polling = false;
  }

  async showResult() {
    try {
      this.blob = await this.api.png(this.job.id);
    } catch (error) {
      this.line.textContent = `done, but its image is gone: ${error.message}`;
      return;
    }
    const url = URL.createObjectURL(this.blob);
    this.image.src = url;
    this.image.hidden = false;
    this.download.href = url;
    this.download.hidden = false;
    this.reuse.hidden = false;
    this.figure.dataset.shown = "true";
  }
}

function element(tag, className = "", text = "") {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text) node.textContent = text;
  return node;
}
