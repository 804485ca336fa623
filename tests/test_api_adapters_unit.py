"""The OpenAI and AUTOMATIC1111 layers' pure parts: signed links, uploaded images and masks, A1111's
sampler and checkpoint names, the alias setting, HTTP Basic keys. No processes: milliseconds."""

from __future__ import annotations

import base64
import io
import json
import zlib

import pytest
from PIL import Image
from pydantic import ValidationError

from service.gateway import uploads
from service.gateway.a1111_schemas import SAMPLERS, a1111_sampler, match_checkpoint, sampler
from service.gateway.auth import ApiKeys, key_digest
from service.gateway.errors import Unauthenticated
from service.gateway.openai_schemas import ImageEditFields, ImageGenerationCreate
from service.gateway.signed_urls import UrlSigner
from service.ldm.request import SAMPLERS as OUR_SAMPLERS
from service.ldm.request import RequestError, image_size
from service.settings import OPENAI_IMAGE_MODELS, GatewaySettings

from .api_stack import encoded, half_transparent_mask, png_bytes


def test_signed_links_name_one_job_until_they_expire() -> None:
    signer = UrlSigner("secret", ttl_s=60)
    expires, signature = signer.sign("a" * 32, now=1000.0)
    assert expires == 1060 and signer.valid("a" * 32, expires, signature)
    assert not signer.valid("b" * 32, expires, signature)  # another job
    assert not signer.valid("a" * 32, expires + 1, signature)  # a longer life
    assert not UrlSigner("other", ttl_s=60).valid("a" * 32, expires, signature)  # another key
    assert not signer.expired(expires, now=1059.9) and signer.expired(expires, now=1060.0)
    random_key = UrlSigner("", ttl_s=60)  # a key of its own, logged as such
    assert not random_key.valid("a" * 32, expires, signature)


def test_openai_masks_repaint_the_transparent_pixels() -> None:
    mask = uploads.alpha_mask_png(half_transparent_mask((8, 4)), "mask", 10_000)
    image = Image.open(io.BytesIO(mask))
    assert image.mode == "L" and image.size == (8, 4)
    assert [image.getpixel((x, 0)) for x in range(8)] == [255] * 4 + [0] * 4  # white: repainted
    with pytest.raises(RequestError) as caught:  # no alpha: nothing says what to repaint
        uploads.alpha_mask_png(png_bytes((8, 4), (0, 0, 0)), "mask", 10_000)
    assert caught.value.field == "mask"


def test_a1111_masks_and_init_images() -> None:
    mask = Image.new("L", (4, 2), 0)
    mask.paste(255, (0, 0, 2, 2))
    inverted = Image.open(io.BytesIO(uploads.grey_mask_png(encoded(mask), "mask", 100, invert=True)))
    assert [inverted.getpixel((x, 0)) for x in range(4)] == [0, 0, 255, 255]
    jpeg = io.BytesIO()
    Image.new("RGB", (4, 2), (200, 30, 30)).save(jpeg, format="JPEG")
    init = uploads.init_image_png(jpeg.getvalue(), "init_images", 100)
    assert image_size(init, "init_images") == (4, 2)  # a PNG now, as the request type carries
    data_url = "data:image/png;base64," + base64.b64encode(b"\x89PNG").decode()
    assert uploads.decode_base64(data_url, "mask") == b"\x89PNG"
    with pytest.raises(RequestError):
        uploads.decode_base64("not base64!", "mask")


def test_uploads_over_the_pixel_limit_are_refused_from_their_header() -> None:
    big = png_bytes((300, 200), (0,), mode="L")
    with pytest.raises(RequestError) as caught:
        uploads.open_image(big, "image", max_pixels=300 * 200 - 1)
    assert caught.value.field == "image" and "300x200" in caught.value.message
    # Headers claiming more pixels than the data holds: refused before any decoding (a decode would fail).
    for side in (6000, 13000, 60000):  # under Pillow's own bounds, between them (its warning), over them
        lying = bytearray(big)
        lying[16:24] = side.to_bytes(4, "big") * 2  # IHDR width and height, then its CRC
        lying[29:33] = zlib.crc32(lying[12:29]).to_bytes(4, "big")
        with pytest.raises(RequestError, match="must have at most 1048576 pixels"):
            uploads.open_image(bytes(lying), "image", max_pixels=1 << 20)
        for as_mask in (uploads.alpha_mask_png, uploads.grey_mask_png):  # a bomb as the mask, likewise
            with pytest.raises(RequestError, match="must have at most 1048576 pixels") as caught:
                as_mask(bytes(lying), "mask", 1 << 20)
            assert caught.value.field == "mask"
    for junk in (b"", b"GIF89a....", b"\x89PNG\r\n\x1a\n"):
        with pytest.raises(RequestError):
            uploads.open_image(junk, "image", max_pixels=1 << 20)


def test_results_in_the_formats_asked_for() -> None:
    png = png_bytes((8, 8), (10, 20, 30))
    assert uploads.encode(png, "png", 100) is png
    for fmt in ("jpeg", "webp"):
        assert Image.open(io.BytesIO(uploads.encode(png, fmt, 50))).format == fmt.upper()


def test_a1111_sampler_and_scheduler_names() -> None:
    assert sampler("Euler a", None) == "euler_a" and sampler("euler a", "Automatic") == "euler_a"
    assert sampler("DPM++ 2M", "Karras") == "dpmpp_2m_karras" and sampler("DPM++ 2M", "normal") == "dpmpp_2m"
    assert sampler("DPM++ 2M Karras", None) == "dpmpp_2m_karras"  # the name before A1111 1.9
    assert sampler("k_euler", "uniform") == "euler" and sampler("ddim", None) == "ddim"
    assert sampler(None, None) is None and sampler("", "automatic") is None  # the model's default
    for name, scheduler, field in (
        ("Heun", None, "sampler_name"),
        ("Euler", "Karras", "scheduler"),
        ("Euler", "Exponential", "scheduler"),
        (None, "Karras", "scheduler"),
    ):
        with pytest.raises(RequestError) as caught:
            sampler(name, scheduler)
        assert caught.value.field == field
    for plain, karras in SAMPLERS.values():  # every target is one of the engine's samplers
        assert plain in OUR_SAMPLERS and karras in (None, *OUR_SAMPLERS)
    assert a1111_sampler("dpmpp_2m_karras") == ("DPM++ 2M", "Karras")
    assert a1111_sampler("euler_a") == ("Euler a", "Automatic")


def test_checkpoint_titles() -> None:
    names = ["sd15", "Shapes"]
    assert match_checkpoint("sd15", names) == "sd15" and match_checkpoint("shapes", names) == "Shapes"
    assert match_checkpoint("sd15 [6ce0161689]", names) == "sd15"
    assert match_checkpoint("sd15.safetensors", names) == "sd15"
    assert match_checkpoint("sdxl", names) is None


def test_model_aliases_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    models = {"shapes": "models/shapes", "sd15": "x.safetensors"}
    assert GatewaySettings(models=models).model_aliases == dict.fromkeys(OPENAI_IMAGE_MODELS, "")
    monkeypatch.setenv("LDM_MODEL_ALIASES", "dall-e-3=sd15, gpt-image-1")
    assert GatewaySettings(models=models).model_aliases == {"dall-e-3": "sd15", "gpt-image-1": ""}
    monkeypatch.setenv("LDM_MODEL_ALIASES", json.dumps({"dall-e-2": "shapes"}))
    assert GatewaySettings(models=models).model_aliases == {"dall-e-2": "shapes"}
    monkeypatch.setenv("LDM_MODEL_ALIASES", "dall-e-3=sdxl")
    with pytest.raises(ValidationError, match="model_aliases"):
        GatewaySettings(models=models)


def test_http_basic_carries_the_key_as_password() -> None:
    keys = ApiKeys(["one"])

    def basic(credentials: bytes) -> str:
        return "Basic " + base64.b64encode(credentials).decode()

    assert keys.owner(basic(b"anyone:one")) == key_digest("one").hex() == keys.owner("Bearer one")
    for header in (basic(b"one:"), basic(b"one"), "Basic !!!", "Basic "):
        with pytest.raises(Unauthenticated):
            keys.owner(header)
    assert ApiKeys([]).owner("Basic !!!") == ""  # authentication off: any header will do


def test_openai_bodies() -> None:
    body = ImageGenerationCreate.model_validate({"prompt": "x", "n": 2.0, "size": "auto"})
    assert body.n == 2
    for bad in ({"prompt": "x", "n": "2"}, {"prompt": "x", "size": "2x"}, {"prompt": "x", "frames": 1}):
        with pytest.raises(ValidationError):
            ImageGenerationCreate.model_validate(bad)
    form = ImageEditFields.model_validate({"prompt": "x", "n": "2", "stream": "true", "strength": "0.5"})
    assert (form.n, form.stream, form.strength) == (2, True, 0.5)  # multipart fields are text
