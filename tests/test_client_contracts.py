"""Contract tests: the request sequences that Open WebUI, SillyTavern and LibreChat send, replayed with
their exact methods, paths, headers and bodies (read from their sources; only configured values such
as sizes and keys are ours), against a real gateway, worker (the demo model) and Redis.

- Open WebUI: `backend/open_webui/routers/images.py` (engines `openai` and `automatic1111`).
- SillyTavern: `src/endpoints/stable-diffusion.js` (its server's calls to A1111) and
  `public/scripts/extensions/stable-diffusion/index.js` (the txt2img body, with the default settings).
- LibreChat: `api/app/clients/tools/structured/OpenAIImageTools.js` (gpt-image-1 generate and edit).
"""

from __future__ import annotations

import base64
import io
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from .api_stack import KEY_A, KEY_B, Stack, decoded, png_bytes, service_stack
from .workers import wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with service_stack(tmp_path_factory.mktemp("contracts")) as stack:
        yield stack


def basic(auth: str) -> str:
    """SillyTavern's `getBasicAuthHeader` and Open WebUI's `get_automatic1111_api_auth`."""
    return f"Basic {base64.b64encode(auth.encode()).decode()}"


def image_data(data: str) -> bytes:
    """Open WebUI's `get_image_data` for base64 (with or without a data: prefix)."""
    return base64.b64decode(data.split(",", 1)[1] if "," in data else data)


# -- Open WebUI ---------------------------------------------------------------------------------------


def test_open_webui_openai_engine(stack: Stack) -> None:
    base = f"{stack.url}/v1"  # IMAGES_OPENAI_API_BASE_URL
    headers = {"Authorization": f"Bearer {KEY_A}", "Content-Type": "application/json"}
    with httpx.Client(timeout=60) as http:
        # image_generations(): gpt-image models get no response_format (IMAGE_URL_RESPONSE_MODELS_REGEX).
        for model, size in (("gpt-image-1", "32x32"), ("gpt-image-1", "auto"), ("dall-e-3", "32x32")):
            data: dict[str, Any] = {"model": model, "prompt": "a red circle", "n": 1, "size": size}
            if not model.startswith("gpt-image"):
                data["response_format"] = "b64_json"
            reply = http.post(f"{base}/images/generations", json=data, headers=headers)
            assert reply.status_code == 200, reply.text
            for image in reply.json()["data"]:
                if image.get("url"):  # fetched with the same headers, minus Content-Type
                    png = http.get(image["url"], headers={"Authorization": headers["Authorization"]}).content
                else:
                    png = image_data(image["b64_json"])
                assert decoded(png).size == (32, 32)
        # image_edits(): multipart, one image as `image`, several as `image[]`, n and size as text.
        form = {"model": "gpt-image-1", "prompt": "make it blue", "n": "1", "size": "32x32"}
        one = [("image", (f"{uuid.uuid4()}.png", io.BytesIO(png_bytes((32, 32), (9, 9, 9))), "image/png"))]
        many = [("image[]", (f"{uuid.uuid4()}.png", io.BytesIO(png_bytes((16, 16), (c, 0, 0))), "image/png"))
                for c in (10, 200)]  # fmt: skip
        for files in (one, many):
            reply = http.post(
                f"{base}/images/edits", data=form, files=files, headers={"Authorization": f"Bearer {KEY_A}"}
            )
            assert reply.status_code == 200, reply.text
            assert decoded(image_data(reply.json()["data"][0]["b64_json"])).size == (32, 32)


def test_open_webui_automatic1111_engine(stack: Stack) -> None:
    base = stack.url  # AUTOMATIC1111_BASE_URL
    auth = {"authorization": basic(f"admin:{KEY_B}")}  # AUTOMATIC1111_API_AUTH "admin:key"
    with httpx.Client(timeout=60) as http:
        assert http.get(f"{base}/sdapi/v1/options", headers=auth).status_code == 200  # verify_url
        models = http.get(f"{base}/sdapi/v1/sd-models", headers=auth).json()  # get_models
        listed = [{"id": m["title"], "name": m["model_name"]} for m in models]
        assert {"id": "shapes2", "name": "shapes2"} in listed
        # set_image_model(): read the options, post them all back with the new checkpoint.
        options = http.get(f"{base}/sdapi/v1/options", headers=auth).json()
        assert options["sd_model_checkpoint"] == "shapes"
        options["sd_model_checkpoint"] = "shapes2"
        http.post(f"{base}/sdapi/v1/options", json=options, headers=auth).raise_for_status()
        # image_generations(): the model from the options, then txt2img.
        model = http.get(f"{base}/sdapi/v1/options", headers=auth).json()["sd_model_checkpoint"]
        assert model == "shapes2"
        data = {"prompt": "a green square", "batch_size": 2, "width": 32, "height": 32, "steps": 4,
                "negative_prompt": "blurry"}  # fmt: skip
        res = http.post(f"{base}/sdapi/v1/txt2img", json=data, headers=auth).json()
        assert len(res["images"]) == 2 and "shapes2" in res["info"]
        assert all(decoded(image_data(image)).size == (32, 32) for image in res["images"])


# -- SillyTavern --------------------------------------------------------------------------------------


def test_sillytavern_session(stack: Stack) -> None:
    url = stack.url  # auto_url
    auth = {"Authorization": basic(f"user:{KEY_A}")}  # auto_auth "user:key"
    with httpx.Client(timeout=60) as http:
        assert http.get(f"{url}/sdapi/v1/options", headers=auth).status_code == 200  # /ping
        upscalers = [x["name"] for x in http.get(f"{url}/sdapi/v1/upscalers", headers=auth).json()]
        latent = [x["name"] for x in http.get(f"{url}/sdapi/v1/latent-upscale-modes", headers=auth).json()]
        assert upscalers[:1] == ["None"] and latent == []  # /upscalers
        vaes = [http.get(f"{url}/sdapi/v1/{p}", headers=auth) for p in ("sd-vae", "sd-modules")]  # /vaes
        assert vaes[0].json() == [] and vaes[1].status_code == 404  # the Forge one is allowed to fail
        samplers = [x["name"] for x in http.get(f"{url}/sdapi/v1/samplers", headers=auth).json()]
        schedulers = [x["name"] for x in http.get(f"{url}/sdapi/v1/schedulers", headers=auth).json()]
        models = [
            {"value": x["title"], "text": x["title"]}
            for x in http.get(f"{url}/sdapi/v1/sd-models", headers=auth).json()
        ]
        assert "DDIM" in samplers and "normal" in schedulers and models[0]["value"] == "shapes"
        assert http.get(f"{url}/sdapi/v1/options", headers=auth).json()["sd_model_checkpoint"] == "shapes"
        # /set-model: post the checkpoint, then poll progress until idle (10 tries, 2 s apart there).
        reply = http.post(f"{url}/sdapi/v1/options", json={"sd_model_checkpoint": "shapes"},
                          headers={"Content-Type": "application/json", **auth})  # fmt: skip
        assert reply.status_code == 200
        for _ in range(10):
            state = http.get(f"{url}/sdapi/v1/progress", headers=auth).json()
            if state["progress"] == 0.0 and state["state"]["job_count"] == 0:
                break
            time.sleep(0.2)
        else:
            pytest.fail("progress never went idle")
        # /generate: the options (Forge check), then txt2img with the extension's body, defaults.
        options = http.get(f"{url}/sdapi/v1/options", headers=auth).json()
        assert "forge_preset" not in options
        reply = http.post(f"{url}/sdapi/v1/txt2img", json=sillytavern_body(url, 20),
                          headers={"Content-Type": "application/json", **auth})  # fmt: skip
        assert reply.status_code == 200, reply.text
        assert decoded(base64.b64decode(reply.json()["images"][0])).size == (64, 64)


def sillytavern_body(url: str, steps: int) -> dict[str, Any]:
    """generateAutoImage() with the default settings (seed -1 is left out: `undefined`)."""
    return {
        "url": url, "auth": f"user:{KEY_A}",
        "prompt": "a blue triangle", "negative_prompt": "lowres, bad anatomy",
        "sampler_name": "DDIM", "scheduler": "normal", "steps": steps, "cfg_scale": 7,
        "width": 64, "height": 64, "restore_faces": False, "enable_hr": False, "hr_upscaler": "Latent",
        "hr_scale": 2.0, "denoising_strength": 0.7, "hr_second_pass_steps": 0,
        "override_settings": {"CLIP_stop_at_last_layers": 1}, "override_settings_restore_afterwards": True,
        "clip_skip": 1, "save_images": True, "send_images": True, "do_not_save_grid": False,
        "do_not_save_samples": False,
    }  # fmt: skip


def test_sillytavern_interrupts_on_disconnect(stack: Stack) -> None:
    url = stack.url
    auth = {"Authorization": basic(f"user:{KEY_B}")}
    outcome: dict[str, BaseException] = {}

    def generate() -> None:  # the browser goes away: SillyTavern aborts its fetch
        try:
            httpx.post(f"{url}/sdapi/v1/txt2img", json=sillytavern_body(url, 150), headers=auth, timeout=1.5)
        except httpx.HTTPError as e:
            outcome["error"] = e

    thread = threading.Thread(target=generate)
    thread.start()
    thread.join(30)
    assert isinstance(outcome.get("error"), httpx.ReadTimeout)
    progress = httpx.get(f"{url}/sdapi/v1/progress", headers=auth).json()
    assert progress["state"]["job_count"] == 1  # still drawing for nobody
    assert httpx.post(f"{url}/sdapi/v1/interrupt", headers=auth).json() == {}  # on 'close'

    def idle() -> bool:
        state = httpx.get(f"{url}/sdapi/v1/progress", headers=auth).json()
        return state["progress"] == 0.0 and state["state"]["job_count"] == 0

    wait_for(idle, 10, "the interrupted job to end", every_s=0.2)


# -- LibreChat ----------------------------------------------------------------------------------------


def test_librechat_gpt_image_1(stack: Stack) -> None:
    base = f"{stack.url}/v1/"  # IMAGE_GEN_OAI_BASEURL
    headers = {"Authorization": f"Bearer {KEY_A}"}
    with httpx.Client(timeout=60) as http:
        # image_gen_oai: openai.images.generate with the tool's defaults.
        for output_format, compression in (("png", None), ("webp", 100), ("jpeg", 100)):
            body: dict[str, Any] = {"model": "gpt-image-1", "prompt": "a gray square", "n": 1,
                                    "background": "auto", "output_format": output_format, "quality": "auto",
                                    "size": "auto"}  # fmt: skip
            if compression is not None:
                body["output_compression"] = compression
            reply = http.post(f"{base}images/generations", json=body, headers=headers)
            assert reply.status_code == 200, reply.text
            image = decoded(base64.b64decode(reply.json()["data"][0]["b64_json"]))
            assert image.format == output_format.upper() and image.size == (32, 32)
        # image_edit_oai: axios multipart, every referenced image as `image[]`.
        form = {"model": "gpt-image-1", "prompt": "make it red", "quality": "auto", "size": "auto"}
        files = [("image[]", (name, png_bytes((30, 18), (c, c, c)), "image/png"))
                 for name, c in (("a.png", 40), ("b.png", 90))]  # fmt: skip
        reply = http.post(f"{base}images/edits", data=form, files=files, headers=headers)
        assert reply.status_code == 200, reply.text
        # `auto`: the image's size, rounded down to the model's multiple (4).
        assert decoded(base64.b64decode(reply.json()["data"][0]["b64_json"])).size == (28, 16)
