"""Images that clients of the OpenAI and AUTOMATIC1111 APIs send (PNG, JPEG or WebP, masks in their
own conventions), made into the PNGs the request type carries, and results re-encoded as they ask.

An upload is opened header first: its size is checked against the pixel limit before any pixel is
decoded. Errors are `RequestError`s naming the field. Decoding and encoding run on a thread (callers
use `asyncio.to_thread`): they take milliseconds per megapixel.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image, ImageOps

from ..ldm.request import RequestError

FORMATS = ("PNG", "JPEG", "WEBP")
DATA_URL = "data:"


def decode_base64(value: str, field: str) -> bytes:
    """Base64 text, with or without a `data:image/png;base64,` prefix."""
    if value.startswith(DATA_URL):
        value = value.partition(",")[2]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(field, "must be a base64 image") from None


def open_image(data: bytes, field: str, max_pixels: int) -> Image.Image:
    """The decoded image; refused unread when its header says it has more than `max_pixels` pixels."""
    try:
        with warnings.catch_warnings():  # Pillow's bomb warning: the bound below is the one that holds
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
    except Image.DecompressionBombError:
        raise RequestError(field, f"must have at most {max_pixels} pixels") from None
    except (OSError, ValueError, SyntaxError):
        raise RequestError(field, "must be a PNG, JPEG or WebP image") from None
    width, height = image.size
    if width * height > max_pixels:
        raise RequestError(field, f"must have at most {max_pixels} pixels, got {width}x{height}")
    try:
        image.load()
    except (OSError, ValueError, SyntaxError, EOFError):
        raise RequestError(field, "is not a readable image") from None
    return image


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def init_image_png(data: bytes, field: str, max_pixels: int) -> bytes:
    """An init image as an RGB PNG."""
    return png(open_image(data, field, max_pixels).convert("RGB"))


def alpha_mask_png(data: bytes, field: str, max_pixels: int) -> bytes:
    """OpenAI's mask (fully transparent pixels are repainted) as the request's mask (white is repainted)."""
    image = open_image(data, field, max_pixels)
    if not (image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info):
        raise RequestError(field, "must have an alpha channel: its fully transparent pixels are repainted")
    alpha = image.convert("RGBA").getchannel("A")
    return png(alpha.point(lambda a: 255 if a == 0 else 0))


def grey_mask_png(data: bytes, field: str, max_pixels: int, invert: bool = False) -> bytes:
    """AUTOMATIC1111's mask (white is repainted, or black with `invert`) as a greyscale PNG."""
    mask = open_image(data, field, max_pixels).convert("L")
    return png(ImageOps.invert(mask) if invert else mask)


def encode(png_bytes: bytes, output_format: str, quality: int) -> bytes:
    """A result in the format asked for: the stored PNG itself, or JPEG / WebP at `quality` (0-100)."""
    if output_format == "png":
        return png_bytes
    image = Image.open(io.BytesIO(png_bytes)).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format=output_format.upper(), quality=quality)
    return buffer.getvalue()
