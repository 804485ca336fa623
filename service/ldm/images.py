"""Conversions between PIL images, tensors and PNG bytes."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from .request import RequestError

Tensor = torch.Tensor


def decode_image(data: bytes, field: str) -> Image.Image:
    """A request's PNG, decoded; RequestError naming the field when it does not decode."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise RequestError(field, f"not a readable PNG ({e})") from e
    return image


def to_tensor(image: Image.Image, width: int, height: int) -> Tensor:
    """RGB image -> (1, 3, H, W) in [-1, 1], resized to (width, height) when it differs."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()  # (1, 3, H, W)


def mask_to_tensor(mask: Image.Image, width: int, height: int) -> Tensor:
    """Mask image -> (1, 1, H, W) of 0/1, 1 where the image is repainted (white in the PNG)."""
    mask = mask.convert("L")
    if mask.size != (width, height):
        mask = mask.resize((width, height), Image.Resampling.NEAREST)
    array = (np.asarray(mask, dtype=np.float32) >= 127.5).astype(np.float32)  # binarised, (H, W)
    return torch.from_numpy(array)[None, None]


def to_images(x: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images."""
    array = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    array_np = array.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    return [Image.fromarray(a) for a in array_np]


def png_bytes(image: Image.Image, parameters: str | None = None) -> bytes:
    """PNG with the generation parameters in a `parameters` text chunk, as the web UIs write it."""
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()
