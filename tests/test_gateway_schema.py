"""Property-based tests of the HTTP API from its own OpenAPI document (schemathesis): generated
requests, valid and invalid, against a real gateway process and Redis, with no worker and with API keys
on (schemathesis also sends bad keys). Requests are asynchronous (`Prefer: respond-async`), so nothing
waits for a worker; no answer may be a 5xx, and every answer must conform to the document. A
schema-valid request may still be refused (422) for what JSON Schema cannot say: the pixel budget,
that an image is a PNG whose size suits the model; so positive data need not be accepted."""

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
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    folder = tmp_path_factory.mktemp("schema")
    server = RedisServer(folder / "redis")
    server.start()
    model = write_tiny_own_model(folder / "model")
    env = {"LDM_API_KEYS": KEY, "LDM_MAX_BACKLOG": "100000", "LDM_LOG_LEVEL": "WARNING"}
    gateway = GatewayProcess(server.url, {"tiny": model}, folder, env)
    try:
        yield gateway.start()
    finally:
        gateway.stop()
        server.kill()
        print(gateway.log()[-5000:])


OPERATIONS = [  # and whether they take input that can be made invalid
    ("POST /v1/txt2img", True),
    ("POST /v1/img2img", True),
    ("GET /v1/jobs/{job_id}", True),
    ("DELETE /v1/jobs/{job_id}", True),
    ("GET /v1/jobs/{job_id}/events", True),
    ("GET /v1/models", False),
    ("GET /v1/loras", False),
    ("GET /healthz", False),
    ("GET /readyz", False),
]
CASES = [
    (label, mode)
    for label, has_input in OPERATIONS
    for mode in GenerationMode
    if has_input or mode.is_positive
]
KEY = "schema-key"
MAX_EXAMPLES = 30  # per operation and mode


@pytest.fixture(scope="module")
def operations(gateway: GatewayProcess) -> dict[str, schemathesis.APIOperation]:
    # (schemathesis' own pytest plugin does not run under this pytest: the operations are driven here)
    schema = schemathesis.openapi.from_url(f"{gateway.url}/openapi.json")
    found = {result.ok().label: result.ok() for result in schema.get_all_operations()}
    assert sorted(found) == sorted(label for label, _ in OPERATIONS)  # a new route gets a place here
    return found


@pytest.mark.parametrize(("label", "mode"), CASES, ids=[f"{label} {mode}" for label, mode in CASES])
def test_the_api_conforms_to_its_schema(
    operations: dict[str, schemathesis.APIOperation], label: str, mode: GenerationMode
) -> None:
    @given(operations[label].as_strategy(mode))
    @settings(
        max_examples=MAX_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    def check(case: schemathesis.Case) -> None:
        if case.method == "POST":  # answer at once: a synchronous request would wait for a worker
            case.headers = {**(case.headers or {}), "Prefer": "respond-async"}
        case.call_and_validate(
            timeout=10, headers={"Authorization": f"Bearer {KEY}"}, excluded_checks=[positive_data_acceptance]
        )

    check()
