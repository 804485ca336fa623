"""Readers for the deployment files, for tests/test_deploy.py: the Dockerfile, .dockerignore, kustomize
renders, the PromQL in the alerts and the dashboard, and the field lists of KEDA's and the Prometheus
operator's objects (their CRDs are not in kubernetes-validate), each citing the page it comes from."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.paths import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
OVERLAYS = ("dev-cpu", "prod-gpu", "prod-ha")  # prod-ha: prod-gpu with Redis Sentinel


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_yaml_docs(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


# -- kustomize --------------------------------------------------------------------------------------

KUBECTL = shutil.which("kubectl")


def kustomize_missing() -> str | None:
    """Why overlays cannot be rendered here, or None. `labels` and `patches` need kustomize 4.1+
    (kubectl 1.21+); Debian's `kubernetes-client` package is kubectl 1.20 with kustomize 2.0.3."""
    if KUBECTL is None:
        return "kubectl is not installed (the `python` machine image ships it; Debian's is too old)"
    reply = subprocess.run([KUBECTL, "version", "--client", "-o", "json"], capture_output=True, text=True)
    version = json.loads(reply.stdout or "{}").get("kustomizeVersion", "") if reply.returncode == 0 else ""
    numbers = re.match(r"v(\d+)\.(\d+)", version)
    if numbers is None or (int(numbers[1]), int(numbers[2])) < (4, 1):
        return f"kubectl's kustomize is {version or 'unknown'}: 4.1 or newer is needed"
    return None


def render(overlay: str) -> list[dict[str, Any]]:
    reason = kustomize_missing()
    if reason:
        pytest.skip(f"cannot render the overlays: {reason}")
    assert KUBECTL is not None
    reply = subprocess.run(
        [KUBECTL, "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)], capture_output=True, text=True
    )
    assert reply.returncode == 0, f"kubectl kustomize {overlay} failed:\n{reply.stderr}"
    return load_yaml_docs(reply.stdout)


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def named(objects: list[dict[str, Any]], kind: str, prefix: str) -> dict[str, Any]:
    """A generated object (ConfigMap, Secret) by the name before kustomize's hash suffix."""
    found = [
        o
        for o in objects
        if o["kind"] == kind and re.fullmatch(rf"{prefix}(-[a-z0-9]+)?", o["metadata"]["name"])
    ]
    assert len(found) == 1, f"expected one {kind} {prefix}(-hash), found {len(found)}"
    return found[0]


def pod_templates(objects: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, pod template) for every Deployment and StatefulSet."""
    for o in objects:
        if o["kind"] in ("Deployment", "StatefulSet"):
            yield o, o["spec"]["template"]


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A label selector (matchLabels and matchExpressions, or a plain map) against labels."""
    plain = {k: v for k, v in selector.items() if k not in ("matchLabels", "matchExpressions")}
    wanted = {**plain, **selector.get("matchLabels", {})}
    if any(labels.get(k) != v for k, v in wanted.items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if (
            (op == "In" and labels.get(key) not in values)
            or (op == "NotIn" and labels.get(key) in values)
            or (op == "Exists" and key not in labels)
            or (op == "DoesNotExist" and key in labels)
        ):
            return False
    return True


def container_env(container: dict[str, Any], config: dict[str, str]) -> dict[str, str]:
    """A container's environment: envFrom ConfigMaps (only `config` is known here), then env."""
    env = dict(config) if any("configMapRef" in e for e in container.get("envFrom", [])) else {}
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


# -- Dockerfile and .dockerignore ----------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str
    stage: int  # index of the FROM it belongs to


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped (Dockerfile reference rules)."""
    instructions: list[Instruction] = []
    stage = -1
    logical = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not logical and (not stripped or stripped.startswith("#")):
            continue
        if logical and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            logical += stripped[:-1] + " "
            continue
        logical += stripped
        keyword, _, args = logical.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, " ".join(args.split()), stage))
        logical = ""
    return instructions


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """moby/patternmatcher's syntax: `**` any number of folders, `*` and `?` within one name."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore's patterns leave `path` out of the build context: the last matching
    pattern wins, `!` re-includes, and a pattern that matches a folder matches what is inside it."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        regex = _dockerignore_regex((raw[1:] if negate else raw).strip("/"))
        if any(regex.fullmatch(candidate) for candidate in candidates):
            excluded = not negate
    return excluded


def dockerignore_patterns(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


# -- PromQL ----------------------------------------------------------------------------------------------

GRAFANA_MACROS = re.compile(r"\$__(rate_interval|interval|range)\b|\$\{__(rate_interval|interval|range)\}")
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool"}
KEYWORDS |= {"offset", "inf", "nan", "start", "end"}
IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)?\s*\{([^}]*)\}")
MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!=|!~|=)\s*"((?:[^"\\]|\\.)*)"')
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")


def promql_for_promtool(expr: str) -> str:
    """A Grafana query as plain PromQL: macros as a fixed range, template variables as match-all."""
    expr = GRAFANA_MACROS.sub("5m", expr)
    return re.sub(r"\$\{?[A-Za-z_]\w*\}?", ".*", expr)


@dataclass(frozen=True)
class Matcher:
    metric: str
    label: str
    op: str
    value: str


def promql_selectors(expr: str) -> tuple[set[str], list[Matcher]]:
    """The metric names a PromQL expression reads, and its label matchers on them."""
    expr = promql_for_promtool(expr)
    matchers: list[Matcher] = []
    for selector in SELECTOR.finditer(expr):
        for m in MATCHER.finditer(selector[2]):
            matchers.append(Matcher(selector[1] or "", m[1], m[2], m[3]))
    rest = SELECTOR.sub(lambda s: f" {s[1] or ''} ", expr)
    rest = re.sub(r'"(?:[^"\\]|\\.)*"', " ", rest)  # strings (label_replace arguments)
    rest = re.sub(r"\[[^\]]*\]", " ", rest)  # ranges and subqueries
    rest = GROUPING.sub(r" \1 ", rest)  # grouping labels are not metrics
    rest = re.sub(r"\b\d+(\.\d+)?([eE][+-]?\d+)?(ms|s|m|h|d|w|y)?\b", " ", rest)  # numbers, durations
    names = set()
    for token in IDENT.finditer(rest):
        following = rest[token.end() :].lstrip()
        call = following.startswith("(") or re.match(r"(by|without)\b", following) is not None
        if not call and token[0] not in KEYWORDS:  # `sum by (le) (...)` is a call too
            names.add(token[0])
    return names, matchers


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target, nested rows included."""
    queries = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                queries.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    return queries


def dashboard_variable_metrics(dashboard: dict[str, Any]) -> set[str]:
    """Metrics read by `label_values(metric, label)` template variables."""
    names = set()
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        for m in re.finditer(r"label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*,", text):
            names.add(m[1])
    return names


def rule_groups() -> list[dict[str, Any]]:
    """The PrometheusRule's groups, read from the base (no kustomize needed)."""
    docs = load_yaml_docs((DEPLOY / "k8s" / "base" / "monitoring.yaml").read_text())
    rules = [d for d in docs if d["kind"] == "PrometheusRule"]
    assert len(rules) == 1
    groups: list[dict[str, Any]] = rules[0]["spec"]["groups"]
    return groups


# -- custom resources: the fields their projects document ---------------------------------------------


def _object(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


ANY_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
METADATA = {"type": "object", "required": ["name"]}
HPA_BEHAVIOR = {"type": "object"}  # an autoscaling/v2 HPA `behavior`, checked by the HPA schema below

# KEDA ScaledObject, keda.sh/v1alpha1: https://keda.sh/docs/latest/reference/scaledobject-spec/
SCALED_OBJECT = _object(
    {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": METADATA,
        "spec": _object(
            {
                "scaleTargetRef": _object(
                    {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "name": {"type": "string"},
                        "envSourceContainerName": {"type": "string"},
                    },
                    ("name",),
                ),
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                "idleReplicaCount": {"type": "integer", "minimum": 0},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "fallback": _object(
                    {"failureThreshold": {"type": "integer"}, "replicas": {"type": "integer"}},
                    ("failureThreshold", "replicas"),
                ),
                "advanced": _object(
                    {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": _object(
                            {"name": {"type": "string"}, "behavior": HPA_BEHAVIOR}
                        ),
                        "scalingModifiers": {"type": "object"},
                    }
                ),
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": _object(
                        {
                            "type": {"type": "string"},
                            "metadata": ANY_MAP,
                            "name": {"type": "string"},
                            "useCachedMetrics": {"type": "boolean"},
                            "authenticationRef": _object(
                                {"name": {"type": "string"}, "kind": {"type": "string"}}, ("name",)
                            ),
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                        },
                        ("type", "metadata"),
                    ),
                },
            },
            ("scaleTargetRef", "triggers"),
        ),
    },
    ("apiVersion", "kind", "metadata", "spec"),
)

# The redis-streams scaler's trigger metadata: https://keda.sh/docs/latest/scalers/redis-streams/
# ("Parameter list"; the *FromEnv variants and TLS). All values are strings.
REDIS_STREAMS_METADATA = {
    "address",
    "host",
    "port",
    "usernameFromEnv",
    "passwordFromEnv",
    "stream",
    "consumerGroup",
    "pendingEntriesCount",
    "streamLength",
    "lagCount",
    "activationLagCount",
    "enableTLS",
    "unsafeSsl",
    "databaseIndex",
    "addressFromEnv",
    "hostFromEnv",
    "portFromEnv",
}

# Prometheus operator, monitoring.coreos.com/v1:
# https://prometheus-operator.dev/docs/api-reference/api/#monitoring.coreos.com/v1.ServiceMonitorSpec
# and #monitoring.coreos.com/v1.Endpoint (the fields this project may use; the API has a few more).
SERVICE_MONITOR = _object(
    {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": METADATA,
        "spec": _object(
            {
                "jobLabel": {"type": "string"},
                "targetLabels": {"type": "array", "items": {"type": "string"}},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "selector": {"type": "object"},
                "namespaceSelector": _object(
                    {"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}
                ),
                "sampleLimit": {"type": "integer"},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": _object(
                        {
                            "port": {"type": "string"},
                            "targetPort": {"type": ["string", "integer"]},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": r"^(\d+(ms|s|m|h))+$"},
                            "scrapeTimeout": {"type": "string", "pattern": r"^(\d+(ms|s|m|h))+$"},
                            "honorLabels": {"type": "boolean"},
                            "relabelings": {"type": "array"},
                            "metricRelabelings": {"type": "array"},
                        }
                    ),
                },
            },
            ("selector", "endpoints"),
        ),
    },
    ("apiVersion", "kind", "metadata", "spec"),
)

# https://prometheus-operator.dev/docs/api-reference/api/#monitoring.coreos.com/v1.PrometheusRuleSpec,
# #monitoring.coreos.com/v1.RuleGroup and #monitoring.coreos.com/v1.Rule.
DURATION = {"type": "string", "pattern": r"^(0|(\d+(ms|s|m|h|d|w|y))+)$"}
PROMETHEUS_RULE = _object(
    {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": METADATA,
        "spec": _object(
            {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": _object(
                        {
                            "name": {"type": "string", "minLength": 1},
                            "interval": DURATION,
                            "query_offset": DURATION,
                            "limit": {"type": "integer"},
                            "labels": ANY_MAP,
                            "partial_response_strategy": {"type": "string"},
                            "rules": {
                                "type": "array",
                                "items": _object(
                                    {
                                        "record": {"type": "string"},
                                        "alert": {"type": "string"},
                                        "expr": {"type": ["string", "integer"]},
                                        "for": DURATION,
                                        "keep_firing_for": DURATION,
                                        "labels": ANY_MAP,
                                        "annotations": ANY_MAP,
                                    },
                                    ("expr",),
                                ),
                            },
                        },
                        ("name",),
                    ),
                }
            }
        ),
    },
    ("apiVersion", "kind", "metadata", "spec"),
)

CUSTOM_SCHEMAS = {
    "ScaledObject": SCALED_OBJECT,
    "ServiceMonitor": SERVICE_MONITOR,
    "PrometheusRule": PROMETHEUS_RULE,
}
