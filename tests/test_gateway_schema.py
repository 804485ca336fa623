"""Property-based tests of the HTTP API from its own OpenAPI document (schemathesis): generated
requests, valid and invalid, against a real gateway process and Redis, with no worker and with API keys
on (schemathesis also sends bad keys). Requests are asynchronous (`Prefer: respond-async`), so nothing
waits for a worker; no answer may be a 5xx, and every answer must conform to the document. A
schema-valid request may still be refused (422) for what JSON Schema cannot say: the pixel budget,
that an image is a PNG whose size suits the model; so positive data need not be accepted.

The OpenAI and AUTOMATIC1111 layers have no asynchronous mode: their operations go to a second
gateway whose backlog bound is 0, so a request that passes every check is refused (429) just before
it would be enqueued, and nothing waits."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from .gateway_env import GatewayProcess, write_tiny_own_model
from .redis_server import RedisServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gateways(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, GatewayProcess]]:
    """The native API's gateway, and the adapters' (a backlog bound of 0)."""
    folder = tmp_path_factory.mktemp("schema")
    server = RedisServer(folder / "redis")
    server.start()
    model = write_tiny_own_model(folder / "model")
    env = {"LDM_API_KEYS": KEY, "LDM_MAX_BACKLOG": "100000", "LDM_LOG_LEVEL": "WARNING"}
    native = GatewayProcess(server.url, {"tiny": model}, folder, env)
    adapters = GatewayProcess(server.url, {"tiny": model}, folder, {**env, "LDM_MAX_BACKLOG": "0"})
    try:
        yield native.start(), adapters.start()
    finally:
        native.stop()
        adapters.stop()
        server.kill()
        print(native.log()[-5000:], adapters.log()[-5000:])


OPERATIONS = [  # and whether they take input that can be made invalid
    ("POST /v1/txt2img", True),
    ("POST /v1/img2img", True),
    ("POST /v1/upscale", True),
    ("GET /v1/jobs/{job_id}", True),
    ("DELETE /v1/jobs/{job_id}", True),
    ("GET /v1/jobs/{job_id}/events", True),
    ("GET /v1/jobs/{job_id}/previews/{index}", True),
    ("GET /v1/models", False),
    ("GET /v1/loras", False),
    ("GET /healthz", False),
    ("GET /readyz", False),
]
ADAPTER_OPERATIONS = [  # the OpenAI and AUTOMATIC1111 layers
    ("POST /v1/images/generations", True),
    ("POST /v1/images/edits", True),
    ("GET /v1/images/files/{name}", True),
    ("GET /v1/models/{model_id}", True),
    ("POST /sdapi/v1/txt2img", True),
    ("POST /sdapi/v1/img2img", True),
    ("GET /sdapi/v1/options", False),
    ("POST /sdapi/v1/options", True),
    ("GET /sdapi/v1/sd-models", False),
    ("GET /sdapi/v1/samplers", False),
    ("GET /sdapi/v1/schedulers", False),
    ("GET /sdapi/v1/upscalers", False),
    ("GET /sdapi/v1/latent-upscale-modes", False),
    ("GET /sdapi/v1/sd-vae", False),
    ("GET /sdapi/v1/scripts", False),
    ("GET /sdapi/v1/progress", False),
    ("POST /sdapi/v1/interrupt", False),
    ("POST /sdapi/v1/skip", False),
]
ADAPTERS = {label for label, _ in ADAPTER_OPERATIONS}
CASES = [
    (label, mode)
    for label, has_input in OPERATIONS + ADAPTER_OPERATIONS
    for mode in GenerationMode
    if has_input or mode.is_positive
]
KEY = "schema-key"
# Examples per operation and mode: the adapters' operations have fewer (20 of them, to keep the run short).
MAX_EXAMPLES = 30
MAX_ADAPTER_EXAMPLES = 12


@pytest.fixture(scope="module")
def operations(gateways: tuple[GatewayProcess, GatewayProcess]) -> dict[str, schemathesis.APIOperation]:
    # (schemathesis' own pytest plugin does not run under this pytest: the operations are driven here)
    schema = schemathesis.openapi.from_url(f"{gateways[0].url}/openapi.json")
    found = {result.ok().label: result.ok() for result in schema.get_all_operations()}
    expected = [label for label, _ in OPERATIONS + ADAPTER_OPERATIONS]
    assert sorted(found) == sorted(expected)  # a new route gets a place here
    return found


@pytest.mark.parametrize(("label", "mode"), CASES, ids=[f"{label} {mode}" for label, mode in CASES])
def test_the_api_conforms_to_its_schema(
    operations: dict[str, schemathesis.APIOperation],
    gateways: tuple[GatewayProcess, GatewayProcess],
    label: str,
    mode: GenerationMode,
) -> None:
    adapter = label in ADAPTERS
    base_url = (gateways[1] if adapter else gateways[0]).url

    @given(operations[label].as_strategy(mode))
    @settings(
        max_examples=MAX_ADAPTER_EXAMPLES if adapter else MAX_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case: schemathesis.Case) -> None:
        if case.method == "POST" and not adapter:  # answer at once: do not wait for a worker
            case.headers = {**(case.headers or {}), "Prefer": "respond-async"}
        case.call_and_validate(
            base_url=base_url,
            timeout=10,
            headers={"Authorization": f"Bearer {KEY}"},
            excluded_checks=[positive_data_acceptance],
        )

    check()
