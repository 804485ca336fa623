// The init image and its mask: an image dropped or picked, a canvas to paint the mask on over it, and
// both exported as PNGs of the request's size (the mask: white is repainted, black is kept).

const MIN_PAINT_SIDE = 512; // the mask canvas gets at least this many pixels on its longer side

export class MaskEditor {
  /** `onImage(width, height)` when an image is loaded, with its natural size. */
  constructor(elements, onImage) {
    this.el = elements; // {drop, file, editor, image, mask, brush, erase, clear, remove}
    this.onImage = onImage;
    this.picture = null; // an ImageBitmap
    this.painted = false;
    this.last = null; // the brush's last point while painting
    this.wire();
  }

  get hasImage() {
    return this.picture !== null;
  }

  get hasMask() {
    return this.painted;
  }

  wire() {
    const { drop, file, mask, clear, remove } = this.el;
    file.addEventListener("change", () => file.files[0] && this.load(file.files[0]));
    drop.addEventListener("dragover", (e) => {
      e.preventDefault();
      drop.classList.add("over");
    });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      drop.classList.remove("over");
      const picked = [...e.dataTransfer.files].find((f) => f.type.startsWith("image/"));
      if (picked) this.load(picked);
    });
    drop.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") file.click();
    });
    mask.addEventListener("pointerdown", (e) => this.paintStart(e));
    mask.addEventListener("pointermove", (e) => this.paintMove(e));
    for (const end of ["pointerup", "pointercancel"]) {
      mask.addEventListener(end, () => (this.last = null));
    }
    clear.addEventListener("click", () => this.clearMask());
    remove.addEventListener("click", () => this.unload());
  }

  /** Shows an image (a File or Blob) with an empty mask over it. */
  async load(blob) {
    let picture;
    try {
      picture = await createImageBitmap(blob);
    } catch {
      this.el.drop.dataset.error = "not an image this browser can read";
      return;
    }
    delete this.el.drop.dataset.error;
    this.picture = picture;
    const { image, mask, editor } = this.el;
    image.width = picture.width;
    image.height = picture.height;
    image.getContext("2d").drawImage(picture, 0, 0);
    const scale = Math.max(1, MIN_PAINT_SIDE / Math.max(picture.width, picture.height));
    mask.width = Math.round(picture.width * scale);
    mask.height = Math.round(picture.height * scale);
    this.clearMask();
    editor.hidden = false;
    this.onImage(picture.width, picture.height);
  }

  unload() {
    this.picture = null;
    this.clearMask();
    this.el.editor.hidden = true;
    this.el.file.value = "";
  }

  clearMask() {
    const { mask } = this.el;
    mask.getContext("2d").clearRect(0, 0, mask.width, mask.height);
    this.painted = false;
  }

  point(e) {
    const box = this.el.mask.getBoundingClientRect();
    const scale = this.el.mask.width / box.width;
    return { x: (e.clientX - box.left) * scale, y: (e.clientY - box.top) * scale, scale };
  }

  paintStart(e) {
    if (!this.picture) return;
    e.preventDefault();
    this.el.mask.setPointerCapture?.(e.pointerId);
    this.last = this.point(e);
    this.stroke(this.last, this.last);
  }

  paintMove(e) {
    if (!this.last) return;
    const next = this.point(e);
    this.stroke(this.last, next);
    this.last = next;
  }

  stroke(from, to) {
    const ctx = this.el.mask.getContext("2d");
    const erase = this.el.erase.checked;
    ctx.globalCompositeOperation = erase ? "destination-out" : "source-over";
    ctx.strokeStyle = "#fff"; // shown through mix-blend-mode: difference, visible on any image
    ctx.lineWidth = Number(this.el.brush.value) * to.scale;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(from.x, from.y);
    ctx.lineTo(to.x + 0.01, to.y); // a zero-length line draws nothing: a dot needs a nudge
    ctx.stroke();
    if (!erase) this.painted = true;
  }

  /** The image resized to width x height, as base64 PNG (the API's init_image). */
  imagePng(width, height) {
    const { canvas, ctx } = scratch(width, height);
    ctx.drawImage(this.picture, 0, 0, width, height);
    return base64Png(canvas);
  }

  /** The mask at width x height, as base64 PNG: white where painted, black elsewhere. */
  maskPng(width, height) {
    const { canvas, ctx } = scratch(width, height);
    ctx.drawImage(this.el.mask, 0, 0, width, height);
    ctx.globalCompositeOperation = "source-in"; // painted pixels turn white, the rest stays clear
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, width, height);
    ctx.globalCompositeOperation = "destination-over"; // then black behind them
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, width, height);
    return base64Png(canvas);
  }
}

function scratch(width, height) {
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  return { canvas, ctx: canvas.getContext("2d") };
}

async function base64Png(canvas) {
  const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
  const bytes = new Uint8Array(await blob.arrayBuffer());
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}
