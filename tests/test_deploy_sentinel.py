"""The prod-ha overlay (prod-gpu with Redis Sentinel), checked offline like the others (tests/test_deploy.py
renders and validates it with them): a primary and a replica and three Sentinels, each on its own node,
disruption budgets that keep the primary's replica and a Sentinel quorum, the service pointed at the
Sentinels; and its redis.conf and sentinel.conf accepted by the real redis-server binary, which then
fails over as they say."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import redis

from service.settings import queue_settings

from .deploy_files import DEPLOY, named, one, render
from .redis_server import REDIS_SERVER, free_port, wait_until

OVERLAY = DEPLOY / "k8s" / "overlays" / "prod-ha"


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    return render("prod-ha")


def anti_affine(workload: dict[str, Any]) -> bool:
    """Two of its pods never share a node (required anti-affinity on the hostname, on its own labels)."""
    pod = workload["spec"]["template"]
    terms = pod["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    labels = pod["metadata"]["labels"]
    return any(
        t["topologyKey"] == "kubernetes.io/hostname"
        and all(labels.get(k) == v for k, v in t["labelSelector"]["matchLabels"].items())
        for t in terms
    )


def test_a_primary_a_replica_and_three_sentinels_on_their_own_nodes(objects: list[dict[str, Any]]) -> None:
    redis_set = one(objects, "StatefulSet", "ldm-redis")
    sentinels = one(objects, "StatefulSet", "ldm-sentinel")
    assert redis_set["spec"]["replicas"] == 2 and sentinels["spec"]["replicas"] == 3
    assert anti_affine(redis_set) and anti_affine(sentinels)
    budgets = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "PodDisruptionBudget"}
    assert budgets["ldm-redis"] == {**budgets["ldm-redis"], "maxUnavailable": 1}
    assert budgets["ldm-sentinel"]["minAvailable"] == 2, "a drain keeps a quorum"
    for name in ("ldm-redis-headless", "ldm-sentinel-headless"):  # peers resolve before they are ready
        assert one(objects, "Service", name)["spec"]["publishNotReadyAddresses"] is True
    script = named(objects, "ConfigMap", "ldm-redis-ha")["data"]
    for container, start in ((redis_set, "start-redis.sh"), (sentinels, "start-sentinel.sh")):
        (c,) = container["spec"]["template"]["spec"]["containers"]
        assert c["args"] == ["sh", f"/etc/ldm-redis/{start}"]
        assert subprocess.run(["sh", "-n"], input=script[start], text=True).returncode == 0, start


def test_the_service_finds_the_primary_through_the_sentinels(objects: list[dict[str, Any]]) -> None:
    config = named(objects, "ConfigMap", "ldm-config")["data"]
    settings = queue_settings(
        redis_sentinels=config["LDM_REDIS_SENTINELS"],
        redis_master=config["LDM_REDIS_MASTER"],
        redis_min_replicas=int(config["LDM_REDIS_MIN_REPLICAS"]),
    )
    assert settings.redis_min_replicas == 1, "an accepted job is on the replica before the answer"
    sentinels = one(objects, "StatefulSet", "ldm-sentinel")
    service = one(objects, "Service", sentinels["spec"]["serviceName"])
    port = service["spec"]["ports"][0]["port"]
    expected = [f"ldm-sentinel-{i}.{service['metadata']['name']}:{port}" for i in range(3)]
    assert settings.redis_sentinels == expected
    conf = named(objects, "ConfigMap", "ldm-redis-ha")["data"]["sentinel.conf"]
    assert f"sentinel monitor {settings.redis_master} $MASTER 6379 2" in conf, "the service's master name"


def start(args: list[str], folder: Path) -> subprocess.Popen[bytes]:
    with open(folder / "log", "ab") as log:
        return subprocess.Popen([REDIS_SERVER, *args], stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_the_shipped_configs_run_and_fail_over(tmp_path: Path) -> None:
    """redis.conf for a primary and a replica, sentinel.conf (as start-sentinel.sh fills it in, with
    loopback ports and shorter timings) for three Sentinels: the primary's SIGKILL promotes the replica."""
    if not Path(REDIS_SERVER).exists():
        pytest.skip("redis-server is not installed")
    ports = [free_port(), free_port()]
    processes = []
    clients: list[redis.Redis] = []
    try:
        for i, port in enumerate(ports):
            folder = tmp_path / f"redis{i}"
            folder.mkdir()
            conf = (OVERLAY / "redis.conf").read_text().replace("dir /data", f"dir {folder}")
            (folder / "redis.conf").write_text(conf.replace("port 6379", f"port {port}\nbind 127.0.0.1"))
            args = [str(folder / "redis.conf")]
            args += ["--replica-announce-ip", "127.0.0.1"] + (
                ["--replicaof", "127.0.0.1", str(ports[0])] if i else []
            )
            processes.append(start(args, folder))
        primary, replica = clients[:] = [redis.Redis(port=p, socket_timeout=2) for p in ports]
        assert wait_until(
            lambda: primary.config_get("appendfsync")["appendfsync"] == "always", 10, "appendfsync always"
        )
        wait_until(lambda: replica.info("replication")["master_link_status"] == "up", 20, "replication")
        template = (OVERLAY / "sentinel.conf").read_text()
        sentinel_ports = [free_port() for _ in range(3)]
        for i, port in enumerate(sentinel_ports):
            folder = tmp_path / f"sentinel{i}"
            folder.mkdir()
            conf = template.replace("$SELF", "127.0.0.1").replace("$MASTER 6379", f"127.0.0.1 {ports[0]}")
            conf = conf.replace("port 26379", f"port {port}\nbind 127.0.0.1").replace(
                "dir /sentinel", f"dir {folder}"
            )
            conf = conf.replace("down-after-milliseconds ldm 5000", "down-after-milliseconds ldm 500")
            conf = conf.replace("failover-timeout ldm 60000", "failover-timeout ldm 3000")
            (folder / "sentinel.conf").write_text(conf)
            processes.append(start([str(folder / "sentinel.conf"), "--sentinel"], folder))
        sentinel = redis.Redis(port=sentinel_ports[0], socket_timeout=2)
        clients.append(sentinel)
        wait_until(
            lambda: int(sentinel.sentinel_master("ldm")["num-other-sentinels"]) == 2,
            20,
            "the sentinels to find each other",
        )
        processes[0].kill()
        wait_until(lambda: replica.info("replication")["role"] == "master", 30, "a failover")
        wait_until(
            lambda: int(sentinel.sentinel_get_master_addr_by_name("ldm")[1]) == ports[1],
            10,
            "the sentinels to name the new primary",
        )
    finally:
        for client in clients:
            client.close()
        for process in processes:
            process.kill()
            process.wait(timeout=10)
