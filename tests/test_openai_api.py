"""The OpenAI Images API layer, checked with OpenAI's own Python SDK (`openai`) against a real gateway,
worker (the demo model) and Redis: generate, links, edits, streaming, models, errors as the SDK's
exceptions."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI
from PIL import Image

from .api_stack import (
    KEY_A,
    KEY_B,
    STEPS,
    Stack,
    decoded,
    encoded,
    half_transparent_mask,
    png_bytes,
    service_stack,
)

pytestmark = pytest.mark.slow
PROMPT = "a large red circle on the left"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with service_stack(tmp_path_factory.mktemp("openai")) as stack:
        yield stack


@pytest.fixture
def client(stack: Stack) -> Iterator[OpenAI]:
    with OpenAI(base_url=f"{stack.url}/v1", api_key=KEY_A, max_retries=0, timeout=60) as client:
        yield client


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def native_png(stack: Stack, seed: int, model: str = "shapes") -> bytes:
    reply = httpx.post(
        f"{stack.url}/v1/txt2img",
        json={"prompt": PROMPT, "seed": seed, "steps": STEPS, "model": model},
        headers={"Authorization": f"Bearer {KEY_A}", "Accept": "image/png"},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    return reply.content


def test_generate_b64_gives_the_native_apis_png(stack: Stack, client: OpenAI) -> None:
    result = client.images.generate(
        prompt=PROMPT, model="gpt-image-1", response_format="b64_json", extra_body={"seed": 1, "steps": STEPS}
    )
    assert result.data is not None and len(result.data) == 1
    image = result.data[0]
    assert image.b64_json is not None and image.url is None and image.revised_prompt == PROMPT
    assert base64.b64decode(image.b64_json) == native_png(stack, seed=1)
    assert (result.size, result.output_format, result.background) == ("32x32", "png", "opaque")
    assert result.usage is not None and result.usage.total_tokens == 0


def test_n_images_and_formats(client: OpenAI) -> None:
    result = client.images.generate(
        prompt=PROMPT, n=2, size="24x16", output_format="jpeg", output_compression=80,
        quality="high", style="vivid", moderation="low", user="tester",
        extra_body={"seed": 7, "steps": STEPS, "negative_prompt": "blue", "guidance_scale": 3.0,
                    "sampler": "euler"},
    )  # fmt: skip
    assert result.data is not None and len(result.data) == 2
    images = [decoded(base64.b64decode(d.b64_json or "")) for d in result.data]
    assert [(i.format, i.size) for i in images] == [("JPEG", (24, 16))] * 2
    assert result.output_format == "jpeg" and result.size == "24x16"
    webp = client.images.generate(prompt=PROMPT, output_format="webp", extra_body={"steps": STEPS})
    assert webp.data is not None and decoded(base64.b64decode(webp.data[0].b64_json or "")).format == "WEBP"


def test_url_is_a_signed_expiring_link(stack: Stack, client: OpenAI) -> None:
    # dall-e-* names answer with links by default; this alias reaches the second model.
    result = client.images.generate(prompt=PROMPT, model="dall-e-3", extra_body={"seed": 2, "steps": STEPS})
    assert result.data is not None and result.data[0].url is not None and result.data[0].b64_json is None
    url = result.data[0].url
    assert url.startswith(f"{stack.url}/v1/images/files/") and ".png?" in url
    reply = httpx.get(url)  # no Authorization header
    assert reply.status_code == 200 and reply.headers["content-type"] == "image/png"
    assert reply.content == native_png(stack, seed=2, model="shapes2")
    job_id = url.rsplit("/", 1)[1].split(".")[0]
    job = httpx.get(f"{stack.url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {KEY_A}"}).json()
    assert job["model"] == "shapes2"
    # A link altered to name another job, or to live longer, is not a link.
    other = client.images.generate(prompt=PROMPT, response_format="url", extra_body={"steps": STEPS})
    assert other.data is not None and other.data[0].url is not None
    other_id = other.data[0].url.rsplit("/", 1)[1].split(".")[0]
    assert httpx.get(url.replace(job_id, other_id)).status_code == 404
    expires = int(url.split("expires=")[1].split("&")[0])
    assert httpx.get(url.replace(f"expires={expires}", f"expires={expires + 60}")).status_code == 404
    time.sleep(max(0.0, expires - time.time()) + 0.2)  # LDM_URL_TTL_S is 3 here
    gone = httpx.get(url)
    assert gone.status_code == 410 and gone.json()["error"]["type"] == "invalid_request_error"


def test_edit_with_one_file_a_list_and_a_mask(stack: Stack, client: OpenAI) -> None:
    init = png_bytes((24, 16), (200, 30, 30))
    one = client.images.edit(
        image=("red.png", init, "image/png"), prompt=PROMPT, extra_body={"seed": 3, "steps": STEPS}
    )
    assert one.data is not None and decoded(base64.b64decode(one.data[0].b64_json or "")).size == (24, 16)
    listed = client.images.edit(
        image=[("red.png", init, "image/png"), ("blue.png", png_bytes((8, 8), (0, 0, 255)), "image/png")],
        prompt=PROMPT, n=2, size="32x32", extra_body={"seed": 3, "steps": STEPS, "strength": 0.5},
    )  # fmt: skip
    assert listed.data is not None and len(listed.data) == 2 and listed.size == "32x32"
    # With a mask, the fully transparent (left) half is repainted: the native API's inpainting with a
    # mask whose left half is white draws the same image. (The demo model's autoencoder normalises over
    # the whole image, so the kept half is not kept pixel for pixel: the masks are compared instead.)
    masked = client.images.edit(
        image=("red.png", init, "image/png"), mask=("mask.png", half_transparent_mask((24, 16)), "image/png"),
        prompt="a blue square", extra_body={"seed": 4, "steps": STEPS, "strength": 1.0},
    )  # fmt: skip
    assert masked.data is not None
    white_left = Image.new("L", (24, 16), 0)
    white_left.paste(255, (0, 0, 12, 16))
    body = {"prompt": "a blue square", "seed": 4, "steps": STEPS, "strength": 1.0}
    body |= {"init_image": b64(init), "mask": b64(encoded(white_left))}
    headers = {"Authorization": f"Bearer {KEY_A}", "Accept": "image/png"}
    native = httpx.post(f"{stack.url}/v1/img2img", json=body, headers=headers, timeout=60)
    assert native.status_code == 200, native.text
    assert base64.b64decode(masked.data[0].b64_json or "") == native.content


def test_field_errors_are_bad_requests_naming_the_param(client: OpenAI) -> None:
    cases = [
        ({"size": "33x32"}, "size"),  # not a multiple of the model's factor (4)
        ({"size": "huge"}, "size"),
        ({"n": 99}, "n"),
        ({"background": "transparent"}, "background"),
        ({"output_format": "gif"}, "output_format"),
        ({"extra_body": {"steps": 0}}, "steps"),
        ({"extra_body": {"sampler": "heun"}}, "sampler"),
        ({"extra_body": {"frames": 3}}, "frames"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.images.generate(prompt=PROMPT, **kwargs)  # type: ignore[arg-type]
        assert caught.value.status_code == 400 and caught.value.param == param, (kwargs, caught.value.body)
        assert caught.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(image=("x.png", b"not an image", "image/png"), prompt=PROMPT)
    assert caught.value.param == "image"
    with pytest.raises(openai.BadRequestError) as caught:  # a mask must say what is transparent
        opaque = ("a.png", png_bytes((8, 8), (0, 0, 0)), "image/png")
        client.images.edit(image=opaque, mask=opaque, prompt=PROMPT)
    assert caught.value.param == "mask"
    with pytest.raises(openai.NotFoundError):
        client.images.generate(prompt=PROMPT, model="no-such-model")


def test_oversized_upload_is_refused_before_decoding(client: OpenAI) -> None:
    # 2048 x 2048 is over LDM_MAX_PIXELS (1048576): refused from its header.
    big = png_bytes((2048, 2048), (0,), mode="L")
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(image=("big.png", big, "image/png"), prompt=PROMPT)
    assert caught.value.param == "image" and "pixels" in caught.value.message


def test_a_wrong_key_is_an_authentication_error(stack: Stack) -> None:
    with OpenAI(base_url=f"{stack.url}/v1", api_key="wrong", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            client.images.generate(prompt=PROMPT)
        assert caught.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client.models.list()


def test_streaming_sends_the_typed_events_in_order(client: OpenAI) -> None:
    stream = client.images.generate(
        prompt=PROMPT, stream=True, partial_images=2, n=2, extra_body={"seed": 9, "steps": STEPS}
    )
    events = list(stream)
    # The workers' previews (decoded x0 estimates at evenly spaced steps), 2 per image, then each image.
    types = [e.type for e in events]
    assert types == ["image_generation.partial_image"] * 4 + ["image_generation.completed"] * 2, types
    partials = [e for e in events if e.type == "image_generation.partial_image"]
    assert sorted(e.partial_image_index for e in partials) == [0, 0, 1, 1]
    assert decoded(base64.b64decode(partials[0].b64_json)).size == (32, 32)
    completed = events[-1]
    assert completed.size == "32x32" and completed.output_format == "png"
    assert decoded(base64.b64decode(completed.b64_json)).size == (32, 32)
    assert base64.b64decode(partials[-1].b64_json) != base64.b64decode(completed.b64_json)
    edit = client.images.edit(
        image=("red.png", png_bytes((16, 16), (200, 30, 30)), "image/png"), prompt=PROMPT, stream=True,
        partial_images=1, extra_body={"steps": STEPS},
    )  # fmt: skip
    assert [e.type for e in edit] == ["image_edit.partial_image", "image_edit.completed"]


def test_models_list_and_retrieve(client: OpenAI) -> None:
    ids = [model.id for model in client.models.list()]
    assert ids[:3] == ["shapes", "shapes2", "idle"]
    assert ids[3:] == ["dall-e-3", "gpt-image-1"]  # LDM_MODEL_ALIASES (it replaces the default list)
    model = client.models.retrieve("dall-e-3")
    assert model.id == "dall-e-3" and model.object == "model" and model.owned_by == "ldm-service"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-5")


def test_async_client(stack: Stack) -> None:
    async def generate() -> list[bytes]:
        async with AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=KEY_B, max_retries=0) as client:
            generate = client.images.generate
            calls = [generate(prompt=PROMPT, extra_body={"seed": s, "steps": STEPS}) for s in (1, 2)]
            results = await asyncio.gather(*calls)
        return [base64.b64decode(r.data[0].b64_json or "") for r in results if r.data]

    first, _ = asyncio.run(generate())
    assert first == native_png(stack, seed=1)


def test_timeouts_do_not_retry_and_full_queues_say_when(stack: Stack) -> None:
    gateway = stack.gateway_with({"LDM_REQUEST_TIMEOUT_S": "0.5", "LDM_MAX_BACKLOG": "1"})
    try:
        with OpenAI(base_url=f"{gateway.url}/v1", api_key=KEY_A, max_retries=2) as client:
            started = time.monotonic()
            with pytest.raises(openai.InternalServerError) as caught:  # no worker serves `idle`
                client.images.generate(prompt=PROMPT, model="idle")
            assert caught.value.status_code == 504 and time.monotonic() - started < 5  # not retried
            assert caught.value.response.headers["x-should-retry"] == "false"
            assert "/v1/jobs/" in caught.value.message
            with pytest.raises(openai.RateLimitError) as limited:  # the backlog (1) is full
                client.with_options(max_retries=0).images.generate(prompt=PROMPT, model="idle")
            assert limited.value.response.headers["retry-after"] == "5"
            assert limited.value.code == "rate_limit_exceeded"
    finally:
        gateway.stop()
