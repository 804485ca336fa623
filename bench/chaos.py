"""Faults at scale: N jobs through real processes while workers and Redis are killed under them.

    .venv/bin/python -m bench.chaos               # 1000 jobs, 6 a second, 3 workers, a fault every ~6 s
    .venv/bin/python -m bench.chaos --sentinel           # primary + replica + 3 Sentinels; primary kills
    .venv/bin/python -m bench.chaos --jobs 40 --workers 2 --faults worker-kill,redis-kill

Black-box: redis-server as shipped (append-only file, `appendfsync always`), `ldm gateway`, several
`ldm worker`s with the demo model (its native 32x32, 2 to 4 steps), and clients that submit the jobs
(synchronous and `Prefer: respond-async`, n = 1..4, some img2img, a few poison jobs) over HTTP with
an Idempotency-Key, retrying as a careful client does. Meanwhile a fault thread, one fault at a time:

- `worker-kill`: SIGKILL a worker, start it again (same name) after a moment;
- `worker-stop`: SIGSTOP a worker past the reclaim window (its jobs go to others), then SIGCONT
  (whatever it then finishes must be refused: fencing);
- `redis-kill`: SIGKILL Redis and start it again from its files, same port;
- `primary-kill` (`--sentinel`): SIGKILL the primary right after an acknowledged enqueue, wait for
  Sentinel's failover, start the old primary again (it rejoins as a replica).

Then, with every process back, it waits for every accepted job to end and prints: accepted,
succeeded, failed (by reason; poison apart), lost (named in an answer, then 404 or never terminal),
duplicated (two results stored, `succeeded` twice in its events, or its image twice in answers),
answers that hid accepted jobs, and for each fault when the service was whole again. The event
streams are read from Redis at the end (the ones `GET /v1/jobs/{id}/events` serves; SSE stops at the
first terminal event, so a second one is only visible there). Exit status 1 when a job was lost or
duplicated.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from bench.chaos_clients import Clients, Plan, Record, plans
from bench.chaos_cluster import Cluster, Fault
from bench.machine import cpu_description, load_average
from service.queue import keys
from service.queue.store import text
from tests.workers import wait_for

KINDS = ("worker-kill", "worker-stop", "redis-kill")
SENTINEL_KINDS = ("worker-kill", "worker-stop", "primary-kill")
TERMINAL = ("succeeded", "failed", "cancelled", "expired")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=1000, help="jobs (images) in all (default: %(default)s)")
    p.add_argument("--workers", type=int, default=3, help="worker processes (default: %(default)s)")
    p.add_argument(
        "--clients", type=int, default=12, help="requests in flight at once (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=1, help="seeds the plan and the faults (default: %(default)s)")
    p.add_argument(
        "--duration", type=float, default=1800, help="cap on the submitting, s (default: %(default)s)"
    )
    p.add_argument(
        "--rate",
        type=float,
        default=6.0,
        help="most jobs submitted a second, so that the faults fall among them (default: %(default)s; "
        "0: as fast as the clients go)",
    )
    p.add_argument(
        "--settle", type=float, default=180, help="cap on the wait for the last jobs, s (%(default)s)"
    )
    p.add_argument("--fault-every", type=float, default=6.0, help="mean seconds between faults (%(default)s)")
    p.add_argument(
        "--faults",
        default="",
        help="these faults in this order (comma-separated kinds), then no more; default: random kinds "
        "(each once first) until the jobs are in",
    )
    p.add_argument("--poison", type=int, default=None, help="poison jobs (default: jobs / 250)")
    p.add_argument(
        "--reclaim-ms", type=int, default=2000, help="the workers' LDM_RECLAIM_IDLE_MS (%(default)s)"
    )
    p.add_argument("--sentinel", action="store_true", help="primary, replica and 3 Sentinels; kill primaries")
    p.add_argument("--folder", type=Path, default=None, help="logs and Redis files (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return p.parse_args(argv)


class FaultThread(threading.Thread):
    """One fault at a time, at random intervals, until stopped (or the given list is done)."""

    def __init__(self, cluster: Cluster, args: argparse.Namespace, accepted: threading.Event) -> None:
        super().__init__(name="faults", daemon=True)
        self.cluster = cluster
        self.rng = random.Random(args.seed * 7919)
        self.every_s = args.fault_every
        self.reclaim_s = args.reclaim_ms / 1000
        kinds = SENTINEL_KINDS if args.sentinel else KINDS
        self.fixed = [k.strip() for k in args.faults.split(",") if k.strip()]
        self.kinds = kinds
        self.first = self.rng.sample(kinds, len(kinds))
        self.accepted = accepted
        self.faults: list[Fault] = []
        self.errors: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(self.rng.uniform(0.5, 1.5) * self.every_s):
            if self.fixed:
                kind = self.fixed[len(self.faults)] if len(self.faults) < len(self.fixed) else ""
            else:
                kind = self.first.pop() if self.first else self.rng.choice(self.kinds)
            if not kind:
                return
            try:
                self.faults.append(self.inject(kind))
            except Exception as e:  # a fault the harness could not finish: report it, stop faulting
                self.errors.append(f"{kind}: {e!r}")
                return

    def inject(self, kind: str) -> Fault:
        worker = self.rng.randrange(len(self.cluster.workers))
        if kind.startswith("worker-"):  # one that holds jobs, when one does within a second or two
            for _ in range(20):
                if busy := self.cluster.busy_workers():
                    worker = self.rng.choice(busy)
                    break
                time.sleep(0.1)
        if kind == "worker-kill":
            return self.cluster.kill_worker(worker, down_s=self.rng.uniform(0.2, 2.0))
        if kind == "worker-stop":
            return self.cluster.stop_worker(worker, stopped_s=self.reclaim_s + self.rng.uniform(1.5, 3.0))
        if kind == "redis-kill":
            return self.cluster.kill_redis(down_s=self.rng.uniform(0.5, 3.0))
        if kind == "primary-kill":
            self.accepted.clear()
            self.accepted.wait(10)  # right after an acknowledged enqueue: only WAIT kept it
            return self.cluster.kill_primary()
        raise ValueError(f"unknown fault {kind!r}; one of {', '.join(KINDS + SENTINEL_KINDS[-1:])}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    folder = args.folder or Path(tempfile.mkdtemp(prefix="ldm-chaos-"))
    rng = random.Random(args.seed)
    poison = args.jobs // 250 if args.poison is None else args.poison
    requests = plans(args.jobs, rng, poison)
    print(cpu_description())
    print(f"{load_average()} at the start; logs and Redis files in {folder}")
    cluster = Cluster(folder, args.workers, sentinel=args.sentinel, reclaim_ms=args.reclaim_ms)
    record = Record()
    accepted = threading.Event()
    faults = FaultThread(cluster, args, accepted)
    started = time.time()
    try:
        cluster.start()
        print(f"{len(requests)} requests, {args.jobs} jobs ({poison} poison), {args.workers} workers, "
              f"{args.clients} clients, {'Sentinel' if args.sentinel else 'one Redis'}; up in "
              f"{time.time() - started:.1f} s")  # fmt: skip
        started = time.time()
        faults.start()
        clients = Clients(cluster.url, record, args.seed, accepted)
        asyncio.run(clients.run(requests, args.clients, time.monotonic() + args.duration, args.rate))
        submitted = time.time() - started
        if faults.fixed:  # the faults asked for all happen, the last ones maybe after the submitting
            faults.join(timeout=args.fault_every * 1.5 * len(faults.fixed) + 300)
        faults.halt.set()
        faults.join()
        wait_for(cluster.all_up, 120, "every process to be back")
        states = asyncio.run(settle(cluster.url, set(record.accepted) | record.maybe, args.settle))
        figures = audit(cluster, record, states, faults.faults, requests)
        figures |= {"submit_s": round(submitted, 1), "total_s": round(time.time() - started, 1)}
        figures["fault_errors"] = faults.errors
    finally:
        faults.halt.set()
        cluster.stop()
    report(figures, args)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 1 if figures["lost"] or figures["duplicated"] else 0


async def settle(url: str, job_ids: set[str], timeout_s: float) -> dict[str, dict[str, Any]]:
    """Each job's last state by `GET /v1/jobs/{id}` (None: 404), waiting up to `timeout_s` for the
    ones not ended yet."""
    states: dict[str, dict[str, Any]] = {}
    pending = set(job_ids)
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        limit = asyncio.Semaphore(8)

        async def look(job_id: str) -> None:
            async with limit:
                try:
                    reply = await http.get(f"/v1/jobs/{job_id}", headers={"Accept": "application/json"})
                except httpx.HTTPError:
                    return
            if reply.status_code == 404:
                states[job_id] = {"status": "404"}
            elif reply.status_code == 200:
                body = reply.json()
                body.pop("result", None)
                states[job_id] = body
            if states.get(job_id, {}).get("status") in (*TERMINAL, "404"):
                pending.discard(job_id)

        while pending and time.monotonic() < deadline:
            await asyncio.gather(*(look(j) for j in list(pending)))
            if pending:
                await asyncio.sleep(1.0)
    return states


def audit(
    cluster: Cluster,
    record: Record,
    states: dict[str, dict[str, Any]],
    faults: list[Fault],
    requests: list[Plan],
) -> dict[str, Any]:
    events, results = read_events(cluster, list(states))
    accepted = set(record.accepted)
    lost, failed, dupes = [], Counter[str](), []
    succeeded = poison_failed = 0
    for job_id in sorted(accepted | {j for j in record.maybe if states.get(j, {}).get("status") != "404"}):
        status = states.get(job_id, {}).get("status", "never read")
        if status not in TERMINAL:
            lost.append(f"{job_id}: {status} ({record.accepted.get(job_id, 'a 503 from submit')})")
            continue
        if status == "succeeded":
            succeeded += 1
        elif job_id in record.poison:
            poison_failed += 1
        else:
            failed[f"{status}: {states[job_id].get('error', '')[:120]}"] += 1
        kinds = [e["type"] for e in events.get(job_id, [])]
        if kinds.count("succeeded") > 1 or results.get(job_id, 0) > 1 or record.images[job_id] > 1:
            dupes.append(f"{job_id}: events {kinds.count('succeeded')}, results {results.get(job_id)}")
        if sum(kinds.count(t) for t in TERMINAL) > 1:
            dupes.append(f"{job_id}: terminal events {[k for k in kinds if k in TERMINAL]}")
    contradicted = [
        j
        for j, seen in record.terminal.items()
        if j in states and seen in TERMINAL and states[j]["status"] != seen
    ]
    return {
        "requests": len(requests),
        "sent": record.requests_sent,
        "answers": dict(sorted(record.answers.items())),
        "accepted": len(accepted),
        "maybe_enqueued": len(record.maybe - accepted),
        "succeeded": succeeded,
        "failed_poison": poison_failed,
        "poison": len(record.poison),
        "failed": sum(failed.values()),
        "failed_reasons": dict(failed),
        "lost": len(lost),
        "lost_jobs": lost[:20],
        "duplicated": len(dupes),
        "duplicated_jobs": dupes[:20],
        "contradicted": contradicted[:20],
        "hidden": record.hidden,
        "dropped": record.dropped,
        "gave_up": record.gave_up[:20],
        "redelivered": sum(1 for j in events if _attempts(events[j]) > 1),
        "faults": recoveries(faults, record, states, events),
    }


def read_events(
    cluster: Cluster, job_ids: list[str]
) -> tuple[dict[str, list[dict[str, str]]], dict[str, int]]:
    """Each job's event stream and its stored-results count, straight from Redis."""
    client = cluster.client()
    events: dict[str, list[dict[str, str]]] = {}
    results: dict[str, int] = {}
    for i in range(0, len(job_ids), 200):
        chunk = job_ids[i : i + 200]
        with client.pipeline(transaction=False) as pipe:
            for job_id in chunk:
                pipe.xrange(keys.events(job_id))
                pipe.hget(keys.job(job_id), "results")
            replies: list[Any] = pipe.execute()
        for job_id, entries, count in zip(chunk, replies[::2], replies[1::2], strict=True):
            events[job_id] = [{text(k): text(v) for k, v in fields.items()} for _, fields in entries]
            results[job_id] = int(text(count) or 0) if count is not None else 0
    client.close()
    return events, results


def _attempts(events: list[dict[str, str]]) -> int:
    return sum(1 for e in events if e["type"] == "running")


def recoveries(
    faults: list[Fault],
    record: Record,
    states: dict[str, dict[str, Any]],
    events: dict[str, list[dict[str, str]]],
) -> list[dict[str, Any]]:
    """For each fault: how long the process was gone, the first accepted request and the first job
    finished after it was back, and the jobs run again (a `running` event of a later attempt) before
    the next fault, the last one how long after the fault."""
    finished = sorted(float(s["finished"]) for s in states.values() if s.get("finished"))
    reruns = sorted(
        float(e["time"])
        for job in events.values()
        for e in job
        if e["type"] == "running" and int(e.get("attempt", "1") or 1) > 1
    )
    out = []
    for i, fault in enumerate(faults):
        upto = faults[i + 1].start if i + 1 < len(faults) else float("inf")
        accept = next((t for t in sorted(record.accepts) if t >= fault.end), None)
        done = next((t for t in finished if t >= fault.end), None)
        again = [t for t in reruns if fault.start <= t < upto]
        out.append(
            {
                "kind": fault.kind,
                "target": fault.target,
                "detail": fault.detail,
                "at_s": round(fault.start - (faults[0].start if faults else 0), 1),
                "back_s": round(fault.end - fault.start, 2),
                "accepting_after_back_s": None if accept is None else round(accept - fault.end, 2),
                "finishing_after_back_s": None if done is None else round(done - fault.end, 2),
                "rerun": len(again),
                "last_rerun_s": round(max(again) - fault.start, 2) if again else None,
                **{k: round(v, 2) for k, v in fault.notes.items()},
            }
        )
    return out


def report(f: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"answers: {', '.join(f'{k}: {v}' for k, v in f['answers'].items())} ({f['sent']} sends "
          f"of {f['requests']} requests)")  # fmt: skip
    print(f"faults ({len(f['faults'])}):")
    for x in f["faults"]:
        extra = f", failed over in {x['failed over']} s" if "failed over" in x else ""
        head = f"  +{x['at_s']:6.1f} s {x['kind']:12s} {x['target']:12s} {x['detail']:10s}"
        print(
            f"{head} back in {x['back_s']} s{extra}; accepting {x['accepting_after_back_s']} s and "
            f"finishing {x['finishing_after_back_s']} s after; {x['rerun']} jobs run again, the last "
            f"{x['last_rerun_s']} s after the fault"
        )
    for error in f["fault_errors"]:
        print(f"  fault not finished: {error}")
    print(f"submitting took {f['submit_s']} s, {f['total_s']} s in all")
    print(f"accepted     {f['accepted']} jobs ({f['maybe_enqueued']} more named by a 503 from submit)")
    print(f"succeeded    {f['succeeded']}")
    print(f"failed       {f['failed']} not poison, {f['failed_poison']} poison of {f['poison']}")
    for reason, count in f["failed_reasons"].items():
        print(f"             {count} x {reason}")
    print(f"lost         {f['lost']}  {' '.join(f['lost_jobs'][:5])}")
    print(f"duplicated   {f['duplicated']}  {' '.join(f['duplicated_jobs'][:5])}")
    print(f"run again    {f['redelivered']} jobs (a later attempt after a worker was lost)")
    print(
        f"hidden       {len(f['hidden'])} answers without the ids of jobs they had accepted", f["hidden"][:3]
    )
    print(
        f"dropped      {len(f['dropped'])} sends whose answer never came, found by a retry", f["dropped"][:3]
    )
    if f["contradicted"] or f["gave_up"]:
        print(f"contradicted {f['contradicted']}; gave up {f['gave_up']}")


if __name__ == "__main__":
    raise SystemExit(main())
