"""How the service reaches Redis: one primary by URL, or the primary that Redis Sentinel names (so
that a failover moves every client to the promoted replica), and which Redis errors mean "not now".

Writes a client was told about (an accepted job, a cancel, a stored result) can wait for replicas
(`LDM_REDIS_MIN_REPLICAS`, Redis `WAIT`), so that an answered job survives the loss of the primary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

if TYPE_CHECKING:
    from ..settings import QueueSettings

# Redis answers that say "not now" rather than "wrong": down, loading, out of memory (maxmemory),
# refusing writes (a replica after a failover, a failed snapshot: MISCONF), no primary.
UNAVAILABLE_ERRORS: tuple[type[Exception], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.MasterDownError,
    redis.exceptions.TryAgainError,
)
_UNAVAILABLE_PREFIXES = (
    *("OOM", "MISCONF", "READONLY", "LOADING"),
    *("MASTERDOWN", "NOREPLICAS", "TRYAGAIN", "BUSY"),
    "WAIT cannot be used with replica",  # a primary demoted under the connection: follow the failover
)
_ON_REPLICA = "WAIT cannot be used with replica"


POOL_WAIT_S = 5.0  # how long a gateway request waits for a free Redis connection
COMMAND_CONNECTIONS = 64  # the gateway's pool for commands (its blocking reads have their own)


def unavailable(e: BaseException) -> bool:
    """Whether a Redis error means "try again later" (also as a script's error, which keeps its code)."""
    if isinstance(e, UNAVAILABLE_ERRORS):
        return True
    return isinstance(e, redis.ResponseError) and str(e).startswith(_UNAVAILABLE_PREFIXES)


def on_replica(e: BaseException) -> bool:
    """WAIT refused: the connection is to a replica (a primary demoted under it, Sentinel's failover),
    where a script that only read (an idempotent replay) succeeded; its pool must reconnect."""
    return isinstance(e, redis.ResponseError) and str(e).startswith(_ON_REPLICA)


class NotReplicated(redis.exceptions.ConnectionError):
    """A write did not reach the replicas it must before the answer (it may be lost on failover)."""


def _options(socket_timeout_s: float) -> dict[str, Any]:
    # A command on a dropped connection is retried with backoff (callers still see ConnectionError
    # while Redis stays down); idle connections are checked, so none stays dead after a restart.
    return {
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": 2.0,
        "socket_keepalive": True,
        "retry": Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=3),
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
        "health_check_interval": 10,
    }


def _sentinel_hosts(sentinels: Sequence[str]) -> list[tuple[str, int]]:
    hosts = []
    for item in sentinels:
        host, _, port = item.rpartition(":")
        hosts.append((host or "127.0.0.1", int(port)))
    return hosts


def connect(
    url: str, socket_timeout_s: float = 10.0, *, sentinels: Sequence[str] = (), master: str = ""
) -> redis.Redis:
    """A client of the primary: `url`'s, or the one the sentinels name for `master`."""
    if sentinels:
        sentinel = redis.sentinel.Sentinel(_sentinel_hosts(sentinels), socket_timeout=2.0)
        return sentinel.master_for(master, redis_class=redis.Redis, **_options(socket_timeout_s))
    return redis.Redis.from_url(url, **_options(socket_timeout_s))


def client_for(settings: QueueSettings, socket_timeout_s: float = 10.0) -> redis.Redis:
    return connect(
        settings.redis_url, socket_timeout_s, sentinels=settings.redis_sentinels, master=settings.redis_master
    )


def async_client_for(
    settings: QueueSettings, socket_timeout_s: float = 30.0, *, max_connections: int | None = None
) -> redis.asyncio.Redis:
    """An asyncio client whose pool holds at most `max_connections` (default: the setting
    `redis_max_connections`); with one URL a command past it waits up to `POOL_WAIT_S` for a connection
    to come back before it fails (redis-py's default pool, 100, answered "Too many connections" at
    once). The gateway keeps two: a small pool for commands, so that a burst reuses a few connections
    instead of opening one per request, and a large one for the blocking reads each waiting request
    holds (their socket timeout outlasts them)."""
    options = _options(socket_timeout_s)
    options["retry"] = redis.asyncio.retry.Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=3)
    options["max_connections"] = max_connections or settings.redis_max_connections
    if settings.redis_sentinels:
        hosts = _sentinel_hosts(settings.redis_sentinels)
        sentinel = redis.asyncio.sentinel.Sentinel(hosts, socket_timeout=2.0)
        return sentinel.master_for(settings.redis_master, redis_class=redis.asyncio.Redis, **options)
    pool = redis.asyncio.BlockingConnectionPool.from_url(settings.redis_url, timeout=POOL_WAIT_S, **options)
    return redis.asyncio.Redis.from_pool(pool)  # closing the client closes its pool
