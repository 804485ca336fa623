"""The worker's side of the protocol: read and reclaim stream entries, claim them (attempt number,
dead-lettering), start, publish progress, store the result, hand back, keep deliveries fresh.

Every call that changes a job is fenced on the attempt number handed out by `claim` (see
`scripts.py`): whatever a superseded worker does afterwards is refused and reported as `stale`.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.client import Pipeline

from . import keys
from .inputs import decode_inputs
from .scripts import SCRIPTS
from .states import JobStatus
from .store import text

log = logging.getLogger(__name__)

STALE = "stale"
Call = tuple[str, Sequence[str], Sequence[Any]]  # (script name, keys, args) of one EVALSHA
HANDED_BACK_IDLE_MS = 10**9  # back-dated this far, a handed-back delivery is reclaimable at once


@dataclass(frozen=True)
class Entry:
    """A stream entry delivered to this worker."""

    model: str
    entry: str
    job_id: str
    spec: str = ""  # the job's spec when small enough to ride in the entry (INLINE_SPEC_BYTES)


@dataclass(frozen=True)
class Lease:
    """A job this worker holds: the attempt number is its fencing token."""

    model: str
    entry: str
    job_id: str
    attempt: int
    deliveries: int  # deliveries that did not end in a hand-back, this one included
    spec_json: str
    created: float
    deadline: float
    started: bool = False  # an earlier attempt had started it: its queueing deadline no longer applies
    # The input images its request's jobs share (`inputs.py`), by field; empty for a spec that holds its own.
    inputs: dict[str, bytes] = field(default_factory=dict, hash=False, compare=False, repr=False)

    def keys(self) -> list[str]:
        return [keys.jobs(self.model), keys.job(self.job_id), keys.events(self.job_id)]


@dataclass(frozen=True)
class Claimed:
    """What claiming an entry gave: a lease, or why there is nothing to run."""

    entry: Entry
    outcome: str  # claimed | missing | terminal | dead
    lease: Lease | None = None
    detail: str = ""


class WorkerQueue:
    def __init__(
        self,
        client: redis.Redis,
        worker: str,
        models: Sequence[str],
        *,
        max_deliveries: int = 3,
        result_ttl_s: int = 3600,
        min_replicas: int = 0,
        replica_wait_ms: int = 1000,
    ) -> None:
        self.redis = client
        self.worker = worker
        self.models = list(models)
        self.max_deliveries = max_deliveries
        self.result_ttl_s = result_ttl_s
        self.min_replicas = min_replicas
        self.replica_wait_ms = replica_wait_ms
        self._cursors: dict[str, str] = {}
        self._scripts = {name: client.register_script(src) for name, src in SCRIPTS.items()}

    def ensure_groups(self) -> None:
        """Creates each model's stream and consumer group if missing (from id 0: nothing is skipped)."""
        for model in self.models:
            try:
                self.redis.xgroup_create(keys.jobs(model), keys.GROUP, id="0", mkstream=True)
            except redis.ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    # -- getting entries --------------------------------------------------------------------------

    def read(self, models: Sequence[str], count: int, block_ms: int | None) -> list[Entry]:
        """New entries, at most `count` per stream; block_ms None does not wait."""
        if count <= 0 or not models:
            return []
        try:
            streams = self._streams(models)
            reply: Any = self.redis.xreadgroup(keys.GROUP, self.worker, streams, count=count, block=block_ms)
        except redis.ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            log.warning("consumer group missing (Redis lost its data?): creating it again")
            self.ensure_groups()
            return []
        return self._entries(models, reply)

    @staticmethod
    def _streams(models: Sequence[str]) -> Any:
        return {keys.jobs(m): ">" for m in models}

    @staticmethod
    def _entries(models: Sequence[str], reply: Any) -> list[Entry]:
        by_stream = {keys.jobs(m): m for m in models}
        return [
            Entry(by_stream[text(stream)], text(entry_id), *(text(fields.get(f)) for f in (b"job", b"spec")))
            for stream, entries in reply or []
            for entry_id, fields in entries
        ]

    def reclaim(self, model: str, min_idle_ms: int, count: int) -> list[Entry]:
        """Takes over deliveries idle for `min_idle_ms` (their worker died or handed them back)."""
        if count <= 0:
            return []
        cursor = self._cursors.get(model, "0-0")
        reply: Any = self.redis.xautoclaim(
            keys.jobs(model), keys.GROUP, self.worker, min_idle_ms, cursor, count=count
        )
        next_cursor, claimed = reply[0], reply[1]
        self._cursors[model] = text(next_cursor)
        return [Entry(model, text(entry_id), text(fields.get(b"job"))) for entry_id, fields in claimed]

    # -- state changes ----------------------------------------------------------------------------

    def claim(self, entries: Sequence[Entry]) -> list[Claimed]:
        """Takes the next attempt of each entry's job, or dead-letters a job delivered too often."""
        calls = self._claim_calls(entries)
        return self._claimed(entries, self._pipelined(calls))

    def claim_later(self, entries: Sequence[Entry]) -> Callable[[], list[Claimed]]:
        """`claim`, sent now; returns what reads the answers, so that the caller prepares the jobs while
        the claims are on their way (a write Redis fsyncs before it answers). The connection is held
        until the answers are read; a script Redis lost (NOSCRIPT) is loaded and claimed again then."""
        calls = self._claim_calls(entries)
        pool = self.redis.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command(
                conn.pack_commands(
                    [("EVALSHA", self._scripts[s].sha, len(k), *k, *args) for s, k, args in calls]
                )
            )
        except BaseException:
            pool.release(conn)
            raise

        def answers() -> list[Claimed]:
            replies: list[Any] = []
            try:
                for _ in calls:
                    try:
                        replies.append(conn.read_response())
                    except redis.ResponseError as e:  # an error reply: the connection reads on
                        replies.append(e)
            finally:
                pool.release(conn)
            missing = [i for i, r in enumerate(replies) if isinstance(r, redis.exceptions.NoScriptError)]
            if missing:
                for i, reply in zip(missing, self._pipelined([calls[i] for i in missing]), strict=True):
                    replies[i] = reply
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
            return self._claimed(entries, replies)

        return answers

    def _claim_calls(self, entries: Sequence[Entry]) -> list[Call]:
        now = time.time()
        token = uuid.uuid4().hex  # one per call: a retried pipeline claims nothing twice
        heartbeats = keys.worker("")
        return [
            (
                "claim",
                [keys.jobs(e.model), keys.job(e.job_id), keys.events(e.job_id), keys.dead(e.model)],
                [
                    *(keys.GROUP, e.entry, self.worker, self.max_deliveries, now, self.result_ttl_s),
                    *(e.job_id, e.model, token, heartbeats),
                ],
            )
            for e in entries
        ]

    @staticmethod
    def _claimed(entries: Sequence[Entry], replies: list[Any]) -> list[Claimed]:
        out = []
        for e, reply in zip(entries, replies, strict=True):
            outcome = text(reply[0])
            if outcome != "claimed":
                out.append(Claimed(e, outcome, detail=text(reply[1]) if len(reply) > 1 else ""))
                continue
            attempt, deliveries, spec, created, deadline, started = (text(v) for v in reply[1:7])
            lease = Lease(
                e.model,
                e.entry,
                e.job_id,
                int(attempt),
                int(deliveries),
                spec,
                float(created),
                float(deadline),
                started=bool(started),
                inputs=decode_inputs(reply[7:]),
            )
            out.append(Claimed(e, outcome, lease))
        return out

    def start(self, leases: Sequence[Lease]) -> list[str]:
        """Marks jobs running; `running`, `stale` or the terminal status they already have."""
        now = time.time()
        return self._each(
            "start", leases, lambda lease: [keys.GROUP, lease.entry, lease.attempt, now, self.result_ttl_s]
        )

    def progress_and_read(
        self,
        items: Iterable[tuple[Lease, int, int]],
        models: Sequence[str],
        count: int,
        block_ms: int | None = None,
    ) -> tuple[dict[str, str], list[Entry]]:
        """Publishes (lease, step, steps) for each item, returning each job's status (`stale` when
        superseded: a job no longer `running` leaves the batch), and reads up to `count` new entries, in
        one round trip: a busy worker looks for jobs to join its batch while it steps. With `block_ms`
        the read waits that long for an entry (the progress is published at once all the same)."""
        items = list(items)
        calls = [self._progress_call(lease, step, steps) for lease, step, steps in items]
        reading = bool(models) and count > 0
        streams = self._streams(models)
        read = (
            (lambda pipe: pipe.xreadgroup(keys.GROUP, self.worker, streams, count=count, block=block_ms))
            if reading
            else None
        )
        replies = self._pipelined(calls, read)
        read_reply = replies.pop() if reading else None
        statuses = {lease.job_id: text(r) for (lease, _, _), r in zip(items, replies, strict=True)}
        if isinstance(read_reply, redis.ResponseError) and "NOGROUP" in str(read_reply):
            log.warning("consumer group missing (Redis lost its data?): creating it again")
            self.ensure_groups()
            return statuses, []
        if isinstance(read_reply, Exception):
            raise read_reply
        return statuses, self._entries(models, read_reply)

    def complete(
        self,
        lease: Lease,
        status: JobStatus,
        *,
        png: bytes = b"",
        error: str = "",
        progress: tuple[int, int] | None = None,
    ) -> str:
        """Stores the outcome (and the PNG) once, acknowledges the delivery; `ok`, `stale`, or the
        terminal status the job already had (for example cancelled). `progress` (step, steps) is
        published first, by the same script: a finished job's last progress event."""
        args = [keys.GROUP, lease.entry, lease.attempt, status.value, error, time.time(), self.result_ttl_s]
        finish = ("finish", [*lease.keys(), keys.result(lease.job_id)], [*args, png, *(progress or ())])
        if not self.min_replicas:
            return text(self._pipelined([finish])[0])

        # WAIT in the same pipeline: it counts the writes of its own connection.
        def then(pipe: Pipeline) -> object:
            return pipe.wait(self.min_replicas, self.replica_wait_ms)

        reply, acked = self._pipelined([finish], then)
        reply = text(reply)
        if isinstance(acked, Exception):
            raise acked
        if reply == "ok" and int(acked) < self.min_replicas:  # a failover now could lose it: run again
            wanted = self.min_replicas
            log.warning("job %s: result confirmed by %d of %d replicas", lease.job_id, acked, wanted)
        return reply

    def _progress_call(self, lease: Lease, step: int, steps: int) -> Call:
        args = [keys.GROUP, lease.entry, lease.attempt, step, steps, time.time(), self.result_ttl_s]
        return "progress", lease.keys(), args

    def preview(self, lease: Lease, index: int, step: int, png: bytes) -> str:
        """Stores preview `index` of a running job (taken at `step`) and announces it in its events."""
        script_keys = [*lease.keys(), keys.preview(lease.job_id, index)]
        args: list[Any] = [
            keys.GROUP,
            lease.entry,
            lease.attempt,
            index,
            step,
            time.time(),
            self.result_ttl_s,
        ]
        args.append(png)
        return text(self._scripts["preview"](keys=script_keys, args=args))

    def hand_back(self, leases: Sequence[Lease]) -> list[str]:
        """Returns jobs to the queue without counting a failed delivery; any worker takes them at once."""
        now = time.time()
        return self._each(
            "hand_back",
            leases,
            lambda lease: [
                keys.GROUP,
                self.worker,
                lease.entry,
                lease.attempt,
                now,
                self.result_ttl_s,
                HANDED_BACK_IDLE_MS,
            ],
        )

    def refresh(self, leases: Sequence[Lease]) -> set[Lease]:
        """Resets the idle time of the deliveries still ours; returns the leases that are not."""
        if not leases:
            return set()
        script_keys: list[str] = []
        args: list[Any] = [keys.GROUP, self.worker]
        for lease in leases:
            script_keys += [keys.jobs(lease.model), keys.job(lease.job_id)]
            args += [lease.entry, lease.attempt]
        stale = {text(e) for e in self._scripts["refresh"](keys=script_keys, args=args)}
        return {lease for lease in leases if lease.entry in stale}

    def heartbeat(self, info: dict[str, Any], ttl_s: float) -> None:
        self.redis.set(keys.worker(self.worker), json.dumps(info), px=max(1, int(ttl_s * 1000)))

    def sign_off(self) -> None:
        self.redis.delete(keys.worker(self.worker))

    def _each(self, script: str, leases: Sequence[Lease], args: Any) -> list[str]:
        if not leases:
            return []
        return [text(r) for r in self._pipelined([(script, lease.keys(), args(lease)) for lease in leases])]

    def _pipelined(
        self, calls: Sequence[Call], then: Callable[[Pipeline], object] | None = None
    ) -> list[Any]:
        """Runs each (script, keys, args), then whatever `then` adds, in one round trip.

        EVALSHA is sent directly: redis-py's pipelined Script objects ask SCRIPT EXISTS first, a
        second round trip on every call. A NOSCRIPT reply (Redis restarted with an empty script
        cache) loads the script and runs the calls that got it again, then what `then` adds again
        (a WAIT must follow the writes). Script errors are raised; the replies of what `then` added
        are returned as they came, errors included.
        """
        pipe = self.redis.pipeline(transaction=False)
        for script, call_keys, args in calls:
            pipe.evalsha(self._scripts[script].sha, len(call_keys), *call_keys, *args)
        if then is not None:
            then(pipe)
        replies: list[Any] = pipe.execute(raise_on_error=False)
        missing = [
            i for i, r in enumerate(replies[: len(calls)]) if isinstance(r, redis.exceptions.NoScriptError)
        ]
        if missing:
            for script in {calls[i][0] for i in missing}:
                self._scripts[script].sha = self.redis.script_load(SCRIPTS[script])
            pipe = self.redis.pipeline(transaction=False)
            for i in missing:
                script, call_keys, args = calls[i]
                pipe.evalsha(self._scripts[script].sha, len(call_keys), *call_keys, *args)
            if then is not None:  # again: what it adds (WAIT) may be about the calls' writes
                then(pipe)
            again: list[Any] = pipe.execute(raise_on_error=False)
            for i, reply in zip(missing, again, strict=False):
                replies[i] = reply
            if then is not None:
                replies[len(calls) :] = again[len(missing) :]
        for reply in replies[: len(calls)]:
            if isinstance(reply, Exception):
                raise reply
        return replies
