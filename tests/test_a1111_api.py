"""The AUTOMATIC1111 API layer, checked with the `webuiapi` client library against a real gateway, worker
(the demo model) and Redis: txt2img and img2img (the same pixels as the native API with the mapped
fields), model listing and switching per API key, progress, interrupt and skip of the caller's own
jobs, HTTP Basic auth, field errors in A1111's shape."""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image
from webuiapi import WebUIApi

from .api_stack import KEY_A, KEY_B, STEPS, Stack, decoded, png_bytes, service_stack
from .workers import wait_for

pytestmark = pytest.mark.slow
PROMPT = "a small blue square at the top"
SIZE = {"width": 32, "height": 32}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with service_stack(tmp_path_factory.mktemp("a1111")) as stack:
        yield stack


def webui(stack: Stack, key: str = KEY_A) -> WebUIApi:
    return WebUIApi(baseurl=f"{stack.url}/sdapi/v1", username="user", password=key, steps=STEPS)


def native(stack: Stack, body: dict[str, Any], path: str = "/v1/txt2img") -> Image.Image:
    headers = {"Authorization": f"Bearer {KEY_A}", "Accept": "image/png"}
    reply = httpx.post(f"{stack.url}{path}", json=body, headers=headers, timeout=60)
    assert reply.status_code == 200, reply.text
    return decoded(reply.content)


def sdapi(stack: Stack, method: str, path: str, key: str = KEY_A, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, f"{stack.url}/sdapi/v1/{path}", auth=("user", key), timeout=60, **kwargs)


def test_txt2img_batches_with_consecutive_seeds(stack: Stack) -> None:
    result = webui(stack).txt2img(prompt=PROMPT, seed=5, batch_size=2, cfg_scale=4.0, **SIZE)
    assert result.info["all_seeds"] == [5, 6] and result.info["seed"] == 5
    assert [image.size for image in result.images] == [(32, 32)] * 2
    first = result.info["infotexts"][0]
    assert first.startswith(
        f"{PROMPT}\nSteps: {STEPS}, Sampler: Euler a, Schedule type: Automatic, CFG scale: 4.0"
    )
    assert "Seed: 5, Size: 32x32, Model: shapes" in first
    # webuiapi's defaults (Euler a, eta 1.0) mapped onto the request type: the native API's pixels.
    body = {
        "prompt": PROMPT,
        "seed": 6,
        "steps": STEPS,
        "sampler": "euler_a",
        "guidance_scale": 4.0,
        "eta": 1.0,
    }
    assert result.images[1].tobytes() == native(stack, body).tobytes()
    iterations = webui(stack).txt2img(prompt=PROMPT, seed=10, n_iter=2, **SIZE)
    assert iterations.info["all_seeds"] == [10, 11] and len(iterations.images) == 2
    assert iterations.parameters["n_iter"] == 2 and iterations.parameters["prompt"] == PROMPT


def test_sampler_and_scheduler_names(stack: Stack) -> None:
    result = webui(stack).txt2img(
        prompt=PROMPT, seed=3, sampler_name="DPM++ 2M", scheduler="Karras", eta=0.0, **SIZE
    )
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in result.info["infotexts"][0]
    body = {"prompt": PROMPT, "seed": 3, "steps": STEPS, "sampler": "dpmpp_2m_karras", "guidance_scale": 7.0}
    assert result.images[0].tobytes() == native(stack, body).tobytes()
    ddim = webui(stack).txt2img(prompt=PROMPT, seed=3, sampler_name="DDIM", eta=0.0, **SIZE)
    assert ddim.info["sampler_name"] == "DDIM"


def test_img2img_with_a_mask(stack: Stack) -> None:
    init = Image.new("RGB", (24, 16), (200, 30, 30))
    mask = Image.new("L", (24, 16), 0)
    mask.paste(255, (0, 0, 12, 16))  # white: repainted
    result = webui(stack).img2img(
        images=[init], mask_image=mask, prompt=PROMPT, seed=4, denoising_strength=0.9, cfg_scale=4.0,
        eta=0.0, width=24, height=16,
    )  # fmt: skip
    assert [image.size for image in result.images] == [(24, 16)]
    assert "Denoising strength: 0.9" in result.info["infotexts"][0]
    assert result.parameters["init_images"] is None  # as A1111: not echoed unless include_init_images
    body = {"prompt": PROMPT, "seed": 4, "steps": STEPS, "sampler": "euler_a", "guidance_scale": 4.0,
            "strength": 0.9, "init_image": b64png(init), "mask": b64png(mask)}  # fmt: skip
    assert result.images[0].tobytes() == native(stack, body, "/v1/img2img").tobytes()
    # The mask's black repainted instead: the inverted mask, as the native API draws it.
    inverted = webui(stack).img2img(
        images=[init], mask_image=mask, inpainting_mask_invert=1, prompt=PROMPT, seed=4,
        denoising_strength=0.9, cfg_scale=4.0, width=24, height=16,
    )  # fmt: skip
    body["mask"] = b64png(Image.eval(mask, lambda v: 255 - v))
    assert inverted.images[0].tobytes() == native(stack, body, "/v1/img2img").tobytes()


def b64png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_models_are_listed_and_switched_per_key(stack: Stack) -> None:
    a, b = webui(stack, KEY_A), webui(stack, KEY_B)
    assert a.util_get_model_names() == ["idle", "shapes", "shapes2"]
    models = {m["title"]: m for m in a.get_sd_models()}
    assert set(models["shapes"]) >= {"title", "model_name", "hash", "filename"}
    assert a.util_get_current_model() == "shapes"  # the default model
    a.util_set_model("shapes2")  # webuiapi lower-cases the name and posts the closest title
    assert a.util_get_current_model() == "shapes2" and b.util_get_current_model() == "shapes"
    result = a.txt2img(prompt=PROMPT, seed=1, **SIZE)
    assert result.info["sd_model_name"] == "shapes2" and "Model: shapes2" in result.info["infotexts"][0]
    override = a.txt2img(prompt=PROMPT, seed=1, override_settings={"sd_model_checkpoint": "shapes"}, **SIZE)
    assert override.info["sd_model_name"] == "shapes"
    assert b.txt2img(prompt=PROMPT, seed=1, **SIZE).info["sd_model_name"] == "shapes"
    unknown = sdapi(stack, "POST", "options", json={"sd_model_checkpoint": "sd15.safetensors [abc]"})
    assert unknown.status_code == 422 and unknown.json()["detail"][0]["loc"] == [
        "body",
        "sd_model_checkpoint",
    ]
    a.util_set_model("shapes")
    assert a.util_get_current_model() == "shapes"


def test_lists_and_json_everywhere(stack: Stack) -> None:
    api = webui(stack)
    assert {"Euler a", "Euler", "DDIM", "DPM++ 2M"} == set(api.util_get_sampler_names())
    assert {"automatic", "karras"} <= set(api.util_get_scheduler_names())
    assert [u["name"] for u in api.get_upscalers()] == ["None"]
    assert api.get_sd_vae() == [] and api.get_latent_upscale_modes() == []
    assert api.get_scripts() == {"txt2img": [], "img2img": []}
    assert api.get_options()["sd_model_checkpoint"] == "shapes"
    for path in ("options", "interrupt", "skip"):
        reply = sdapi(stack, "POST", path, json={})
        assert reply.status_code == 200 and reply.json() == {}, path


def test_progress_interrupt_and_skip_touch_only_the_callers_jobs(stack: Stack) -> None:
    a, b = webui(stack, KEY_A), webui(stack, KEY_B)
    assert a.get_progress()["progress"] == 0 and a.get_progress()["state"]["job_count"] == 0
    # A's job on a model no worker serves stays queued: skip leaves it, interrupt cancels it.
    queued = httpx.post(
        f"{stack.url}/v1/txt2img", json={"prompt": PROMPT, "model": "idle"},
        headers={"Authorization": f"Bearer {KEY_A}", "Prefer": "respond-async"},
    ).json()["id"]  # fmt: skip
    results: dict[str, Any] = {}

    def generate(name: str, api: WebUIApi, steps: int) -> None:
        results[name] = api.txt2img(prompt=PROMPT, steps=steps, **SIZE)

    running = threading.Thread(target=generate, args=("a", a, 150))
    running.start()

    def a_is_running() -> bool:
        state = a.get_progress()
        return state["state"]["sampling_step"] >= 2

    wait_for(a_is_running, 60, "A's job to run", every_s=0.1)
    progress = a.get_progress()
    assert progress["state"]["job_count"] == 2 and 0 < progress["progress"] < 1
    assert progress["state"]["sampling_steps"] == 150 and progress["eta_relative"] > 0
    assert b.get_progress()["state"]["job_count"] == 0  # B sees none of A's jobs
    other = threading.Thread(target=generate, args=("b", b, 40))
    other.start()
    wait_for(lambda: b.get_progress()["state"]["job_count"] == 1, 30, "B's job")
    assert a.skip() == {}
    running.join(60)
    assert results["a"].images == [] and results["a"].info["all_seeds"] == []  # cancelled, as A1111: 200
    job = httpx.get(f"{stack.url}/v1/jobs/{queued}", headers={"Authorization": f"Bearer {KEY_A}"}).json()
    assert job["status"] == "queued"  # skip: running jobs only
    assert a.interrupt() == {}
    job = httpx.get(f"{stack.url}/v1/jobs/{queued}", headers={"Authorization": f"Bearer {KEY_A}"}).json()
    assert job["status"] == "cancelled"
    other.join(60)
    assert len(results["b"].images) == 1  # B's job went on
    assert a.get_progress()["state"]["job_count"] == 0 == b.get_progress()["state"]["job_count"]


def test_basic_auth_with_the_key_as_password(stack: Stack) -> None:
    with pytest.raises(RuntimeError) as caught:  # webuiapi raises (status, text) on an error
        webui(stack, "wrong").txt2img(prompt=PROMPT, **SIZE)
    status, text = caught.value.args
    assert status == 401 and "invalid API key" in text
    anonymous = httpx.get(f"{stack.url}/sdapi/v1/options")
    assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"] == "Basic"
    assert set(anonymous.json()) == {"error", "detail", "body", "errors"}
    bearer = httpx.get(f"{stack.url}/sdapi/v1/options", headers={"Authorization": f"Bearer {KEY_B}"})
    assert bearer.status_code == 200


def test_field_errors_name_the_a1111_field_and_enqueue_nothing(stack: Stack) -> None:
    cases = [
        ({"cfg_scale": -1}, "cfg_scale"),
        ({"steps": 0}, "steps"),
        ({"width": 33}, "width"),  # not a multiple of the model's factor (4)
        ({"sampler_name": "Heun"}, "sampler_name"),
        ({"sampler_name": "Euler", "scheduler": "Karras"}, "scheduler"),
        ({"scheduler": "Exponential"}, "scheduler"),
        ({"batch_size": 3, "n_iter": 2}, "batch_size"),  # 6 images: more than LDM_MAX_N
        ({"n_iter": 0}, "n_iter"),
        ({"seed": -5}, "seed"),
        ({"enable_hr": True}, "enable_hr"),
        ({"prompt": ""}, "prompt"),
        ({"steps": "many"}, "steps"),
        ({"override_settings": {"sd_model_checkpoint": 3}}, "override_settings.sd_model_checkpoint"),
    ]
    for fields, name in cases:
        reply = sdapi(stack, "POST", "txt2img", json={"prompt": PROMPT, **fields})
        assert reply.status_code == 422, (fields, reply.text)
        assert reply.json()["detail"][0]["loc"][-1] == name.split(".")[-1], (fields, reply.json())
    init = png_bytes((8, 8), (1, 2, 3))
    for fields, name in [
        ({"init_images": ["not base64!"]}, "init_images"),
        ({"init_images": [base64.b64encode(b"GIF89a").decode()]}, "init_images"),
        ({"init_images": [base64.b64encode(init).decode()], "mask": "%%%"}, "mask"),
        ({"init_images": []}, "init_images"),
    ]:
        reply = sdapi(stack, "POST", "img2img", json={"prompt": PROMPT, **fields})
        assert reply.status_code == 422 and reply.json()["detail"][0]["loc"] == ["body", name], reply.text
    unknown = sdapi(
        stack, "POST", "txt2img", json={"prompt": PROMPT, "override_settings": {"sd_model_checkpoint": "x"}}
    )
    assert unknown.status_code == 404 and unknown.json()["error"] == "NotFound"
    assert sdapi(stack, "GET", "progress").json()["state"]["job_count"] == 0


def test_timeouts_and_full_queues(stack: Stack) -> None:
    gateway = stack.gateway_with({"LDM_REQUEST_TIMEOUT_S": "0.5", "LDM_MAX_BACKLOG": "1"})
    try:
        url = f"{gateway.url}/sdapi/v1/txt2img"
        body = {"prompt": PROMPT, "override_settings": {"sd_model_checkpoint": "idle"}}
        late = httpx.post(url, json=body, auth=("u", KEY_A), timeout=30)
        assert late.status_code == 504 and late.json()["error"] == "WaitTimeout"
        full = httpx.post(url, json=body, auth=("u", KEY_A), timeout=30)
        assert full.status_code == 429 and full.headers["retry-after"] == "5"
        # Those jobs are A's: interrupt takes them back.
        assert httpx.post(f"{gateway.url}/sdapi/v1/interrupt", auth=("u", KEY_A)).json() == {}
    finally:
        gateway.stop()
