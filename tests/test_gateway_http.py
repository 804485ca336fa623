"""The HTTP API end to end: a real gateway process, a real worker on a tiny model, a real Redis; httpx as
the client (and `ldm client`). Limits, auth and refusals without a worker are in test_gateway_limits.py."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from service.paths import REPO_ROOT

from .gateway_env import GatewayProcess, tiny_stack
from .redis_server import free_port
from .workers import wait_for

pytestmark = pytest.mark.slow
MODEL = "tiny"  # 32x32 native, 4 euler steps by default, sizes multiple of 2


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    with tiny_stack(tmp_path_factory.mktemp("http"), MODEL) as (gateway, _):
        yield gateway


@pytest.fixture
def http(stack: GatewayProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        yield client


def png(data: str | bytes) -> Image.Image:
    raw = base64.b64decode(data) if isinstance(data, str) else data
    image = Image.open(io.BytesIO(raw))
    assert image.format == "PNG"
    return image


def events(http: httpx.Client, job_id: str, headers: dict[str, str] | None = None) -> list[tuple[str, dict]]:
    out: list[tuple[str, dict]] = []
    with http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        kind = ""
        for line in reply.iter_lines():
            if line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:"):
                out.append((kind, json.loads(line[5:])))
    return out


def test_txt2img_answers_n_images_with_consecutive_seeds(http: httpx.Client) -> None:
    reply = http.post("/v1/txt2img", json={"prompt": "a red circle", "seed": 40, "n": 2})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["model"] == MODEL and body["id"] == body["job_ids"][0] and len(set(body["job_ids"])) == 2
    assert [image["seed"] for image in body["images"]] == [40, 41]
    assert [png(image["png_base64"]).size for image in body["images"]] == [
        (32, 32)
    ] * 2  # the model's default
    timings = body["timings"]
    assert timings["total_ms"] >= timings["inference_ms"] > 0 and timings["queue_ms"] >= 0
    # The same seed draws the same image (to rounding), whatever shared its batch.
    again = http.post("/v1/txt2img", json={"prompt": "a red circle", "seed": 41}).json()
    a, b = (png(x["png_base64"]).convert("RGB") for x in (again["images"][0], body["images"][1]))
    assert max(abs(p - q) for p, q in zip(a.tobytes(), b.tobytes(), strict=True)) <= 2


def test_a_seed_is_chosen_and_returned(http: httpx.Client) -> None:
    body = http.post("/v1/txt2img", json={"prompt": "a blue square", "width": 16, "height": 24}).json()
    assert isinstance(body["images"][0]["seed"], int)
    assert png(body["images"][0]["png_base64"]).size == (16, 24)


def test_accept_png_answers_the_png_itself(http: httpx.Client) -> None:
    reply = http.post("/v1/txt2img", json={"prompt": "a circle", "seed": 7}, headers={"Accept": "image/png"})
    assert reply.status_code == 200 and reply.headers["content-type"] == "image/png"
    assert reply.headers["x-seed"] == "7" and len(reply.headers["x-job-id"]) == 32
    assert png(reply.content).size == (32, 32)


def test_async_job_status_events_and_result(http: httpx.Client) -> None:
    reply = http.post("/v1/txt2img", json={"prompt": "a green circle", "seed": 5, "steps": 6},
                      headers={"Prefer": "respond-async"})  # fmt: skip
    assert reply.status_code == 202, reply.text
    job_id = reply.json()["id"]
    assert reply.headers["location"] == f"/v1/jobs/{job_id}" and reply.json()["jobs"][0]["seed"] == 5
    got = events(http, job_id)  # follows the job to its end
    kinds = [kind for kind, _ in got]
    assert kinds[0] == "queued" and kinds[-1] == "succeeded"
    assert kinds.index("started") < kinds.index("progress")
    steps = [data["step"] for kind, data in got if kind == "progress"]
    assert steps == list(range(1, 7)) and all(data["total"] == 6 for kind, data in got if kind == "progress")
    status = http.get(f"/v1/jobs/{job_id}").json()
    assert status["status"] == "succeeded" and status["progress"] == {"step": 6, "total": 6}
    assert status["queue_position"] is None and status["result"]["seed"] == 5
    assert png(status["result"]["png_base64"]).size == (32, 32)
    image = http.get(f"/v1/jobs/{job_id}", headers={"Accept": "image/png"})
    assert image.headers["content-type"] == "image/png"
    assert image.content == base64.b64decode(status["result"]["png_base64"])
    # A late subscriber replays the stream from the start; Last-Event-ID resumes after an event.
    assert [kind for kind, _ in events(http, job_id)] == kinds
    last_progress = [kind for kind, _ in got].index("progress")
    with http.stream("GET", f"/v1/jobs/{job_id}/events") as reply:
        first_ids = [line[3:].strip() for line in reply.iter_lines() if line.startswith("id:")]
    resumed = events(http, job_id, {"Last-Event-ID": first_ids[last_progress]})
    assert [kind for kind, _ in resumed] == kinds[last_progress + 1 :]


def test_previews_are_announced_and_served(http: httpx.Client) -> None:
    body = {"prompt": "a green circle", "seed": 5, "steps": 6, "previews": 2}
    reply = http.post("/v1/txt2img", json=body, headers={"Prefer": "respond-async"})
    job_id = reply.json()["id"]
    previews = [data for kind, data in events(http, job_id) if kind == "preview"]
    assert [(p["index"], p["step"]) for p in previews] == [(0, 2), (1, 4)]  # evenly spaced
    for p in previews:
        image = http.get(p["location"])
        assert image.headers["content-type"] == "image/png" and png(image.content).size == (32, 32)
    assert http.get(f"/v1/jobs/{job_id}/previews/2").status_code == 404


def test_async_n_gives_one_job_per_image(http: httpx.Client) -> None:
    body = http.post("/v1/txt2img", json={"prompt": "a cat", "seed": 9, "n": 3},
                     headers={"Prefer": "respond-async"}).json()  # fmt: skip
    assert [job["seed"] for job in body["jobs"]] == [9, 10, 11]
    for job in body["jobs"]:
        assert events(http, job["id"])[-1][0] == "succeeded"
        assert http.get(job["location"]).json()["result"]["seed"] == job["seed"]


def test_cancel_a_running_job(http: httpx.Client) -> None:
    job_id = http.post("/v1/txt2img", json={"prompt": "a long job", "steps": 150},
                       headers={"Prefer": "respond-async"}).json()["id"]  # fmt: skip
    wait_for(lambda: http.get(f"/v1/jobs/{job_id}").json()["progress"]["step"] >= 2, 30, "the job to run")
    reply = http.delete(f"/v1/jobs/{job_id}")
    assert reply.status_code == 200 and reply.json()["status"] == "cancelled"
    assert events(http, job_id)[-1][0] == "cancelled"
    assert http.get(f"/v1/jobs/{job_id}", headers={"Accept": "image/png"}).status_code == 404
    # Cancelling again leaves it as it is.
    assert http.delete(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"


def test_img2img_and_inpainting(http: httpx.Client) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), (200, 30, 30)).save(buffer, format="PNG")
    init = base64.b64encode(buffer.getvalue()).decode()
    buffer = io.BytesIO()
    Image.new("L", (24, 16), 255).save(buffer, format="PNG")
    mask = base64.b64encode(buffer.getvalue()).decode()
    reply = http.post("/v1/img2img", json={"prompt": "a red circle", "init_image": init, "strength": 0.5})
    assert reply.status_code == 200, reply.text
    assert png(reply.json()["images"][0]["png_base64"]).size == (24, 16)  # the init image's size
    body = {"prompt": "a circle", "init_image": init, "mask": mask, "width": 32, "height": 32}
    reply = http.post("/v1/img2img", json=body)
    assert reply.status_code == 200, reply.text
    assert png(reply.json()["images"][0]["png_base64"]).size == (32, 32)


def test_models_health_metrics_and_docs(http: httpx.Client) -> None:
    (model,) = http.get("/v1/models").json()["models"]
    assert model["name"] == MODEL and model["default"] and model["source"] == "metadata"
    assert (model["width"], model["size_multiple"], model["default_steps"]) == (32, 2, 4)
    assert model["default_sampler"] == "euler" and model["live_workers"] == 1
    assert http.get("/healthz").json() == {"status": "ok"}
    assert http.get("/readyz").json() == {"status": "ready"}
    http.post("/v1/txt2img", json={"prompt": "x", "width": 3})
    metrics = http.get("/metrics").text
    assert 'ldm_http_requests_total{route="/v1/txt2img",status="200"}' in metrics
    assert 'ldm_jobs_rejected_total{reason="invalid"}' in metrics
    assert 'ldm_jobs_submitted_total{model="tiny"}' in metrics
    assert 'ldm_queue_depth{model="tiny"}' in metrics and 'ldm_workers_live{model="tiny"} 1.0' in metrics
    assert 'ldm_http_request_seconds_bucket{le="0.005",route="/healthz"}' in metrics
    assert http.get("/docs").status_code == 200
    paths = http.get("/openapi.json").json()["paths"]
    assert {
        "/v1/txt2img",
        "/v1/img2img",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/events",
        "/v1/models",
    } <= set(paths)


def ldm(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "service.cli.main", *args]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)


def test_client_writes_the_images(stack: GatewayProcess, tmp_path: Path) -> None:
    out = tmp_path / "out.png"
    done = ldm("client", "txt2img", "--url", stack.url, "--prompt", "a red circle", "--n", "2", "--seed", "3",
               "--steps", "5", "-o", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(tmp_path / "out-0.png"), str(tmp_path / "out-1.png")]
    assert png((tmp_path / "out-1.png").read_bytes()).size == (32, 32)
    assert "10/10" in done.stderr  # the progress bar: 2 jobs x 5 steps


def test_client_errors_are_one_line(stack: GatewayProcess, tmp_path: Path) -> None:
    out = str(tmp_path / "x.png")
    done = ldm("client", "txt2img", "--url", stack.url, "--prompt", "x", "--width", "33", "-o", out)
    assert done.returncode == 2 and done.stderr.startswith(
        "ldm client: error: 422 width: must be a multiple of 2"
    )
    assert len(done.stderr.strip().splitlines()) == 1
    done = ldm("client", "txt2img", "--url", f"http://127.0.0.1:{free_port()}", "--prompt", "x", "-o", out)
    assert (
        done.returncode == 2 and "cannot reach" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    )
    started = time.monotonic()
    done = ldm("client", "txt2img", "--url", stack.url, "--prompt", "x", "--model", "nope", "-o", out)
    assert done.returncode == 2 and "404" in done.stderr and time.monotonic() - started < 30
