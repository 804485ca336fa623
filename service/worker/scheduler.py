"""Continuous batching policy: which waiting jobs join the running batch at a step boundary.

A pure object (no Redis, no torch), asked once per step with the current time:

- Jobs are compatible when they share a `group` (model and latent size): one UNet call serves
  members at different steps, with different samplers, guidance scales and prompts, but not
  different latent shapes or models.
- Earliest deadline first. When the earliest waiting job is not compatible with the running batch,
  nothing more joins: the batch drains and that job starts next (no starvation).
- At most `max_batch` members and `pixel_budget` latent pixels (a single job over the budget
  still runs, alone).
- Admission `step` (continuous batching): jobs join a running batch at any step boundary.
  Admission `batch` (the baseline of `bench/mixed.py`): jobs join only an empty batch, so the batch
  runs to its end before anything else starts, and nothing more is claimed meanwhile.
- An idle worker holds a lone job at most `max_wait_s` for batch-mates, unless the batch is full, or,
  with step admission, unless the job's source (its model's stream) is known to hold nothing more
  (`decide(drained=...)`, from the worker's last read): a job that comes later joins at the next step
  anyway, so waiting would only delay this one. With batch admission a late job would wait a whole
  batch, so there the wait stays.
- A job whose deadline passed before it started is expired, not run (one that an earlier attempt had
  started runs on: a rolling restart must not throw nearly finished work away).
- A suspect job (delivered before without finishing: its worker may have died of it) runs alone,
  so that a job that kills its worker takes no batch-mates with it; nothing else is taken while
  one is held.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable
from dataclasses import dataclass
from typing import Literal

Admission = Literal["step", "batch"]


@dataclass(frozen=True)
class Candidate:
    key: str
    group: Hashable  # compatibility: (model, latent height, latent width)
    pixels: int  # latent pixels, h/f * w/f
    deadline: float
    arrived: float  # when this worker got it
    solo: bool = False
    started_before: bool = False  # an earlier attempt started it: past its deadline it still runs
    source: Hashable = None  # where it came from (the worker: its model's stream), for `drained`


@dataclass(frozen=True)
class Decision:
    admit: list[Candidate]
    expire: list[Candidate]
    wait_s: float | None  # ask again within this long (waiting for batch-mates); None: nothing waits


class Scheduler:
    def __init__(
        self, max_batch: int, pixel_budget: int, max_wait_s: float, admission: Admission = "step"
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if admission not in ("step", "batch"):
            raise ValueError(f"admission must be 'step' or 'batch', got {admission!r}")
        self.admission = admission
        self.max_batch = max_batch
        self.pixel_budget = pixel_budget
        self.max_wait_s = max_wait_s
        self.waiting: dict[str, Candidate] = {}
        self.running: dict[str, Candidate] = {}

    def free_slots(self) -> int:
        """How many more jobs to claim now: the ones this worker could admit."""
        held = [*self.waiting.values(), *self.running.values()]
        if any(c.solo for c in held) or (self.admission == "batch" and self.running):
            return 0
        return max(0, self.max_batch - len(held))

    def group(self) -> Hashable | None:
        """The running batch's group, None when idle."""
        return next(iter(self.running.values())).group if self.running else None

    def offer(self, candidate: Candidate) -> None:
        if candidate.key in self.waiting or candidate.key in self.running:
            raise KeyError(f"job {candidate.key} is already held")
        self.waiting[candidate.key] = candidate

    def leave(self, key: str) -> None:
        """A job left (finished, failed, cancelled or superseded), running or waiting."""
        self.running.pop(key, None)
        self.waiting.pop(key, None)

    def take_waiting(self) -> list[Candidate]:
        """Everything not yet admitted (to hand back when the worker drains)."""
        taken = list(self.waiting.values())
        self.waiting.clear()
        return taken

    def decide(self, now: float, draining: bool = False, drained: Collection[Hashable] = ()) -> Decision:
        """Who joins now, who expires, and how long to wait for batch-mates; `drained`: the sources
        known to hold no other job right now."""
        expire = [c for c in self.waiting.values() if c.deadline <= now and not c.started_before]
        for c in expire:
            del self.waiting[c.key]
        if draining or not self.waiting:
            return Decision([], expire, None)
        order = sorted(self.waiting.values(), key=lambda c: (c.deadline, c.arrived))
        if any(c.solo for c in self.running.values()) or (self.admission == "batch" and self.running):
            return Decision([], expire, None)
        if not self.running:
            head = order[0]
            if head.solo:
                return self._admit([head], expire)
            mates = [c for c in order if c.group == head.group and not c.solo]
            waited = now - min(c.arrived for c in mates)
            alone = self.admission == "step" and head.source in drained  # no one else can join now
            if not self._full(mates) and waited < self.max_wait_s and not alone:
                return Decision([], expire, self.max_wait_s - waited)
        group = self.group() or order[0].group
        count = len(self.running)
        pixels = sum(c.pixels for c in self.running.values())
        admit: list[Candidate] = []
        for c in order:
            if c.group != group or c.solo or count >= self.max_batch:
                break
            if count and pixels + c.pixels > self.pixel_budget:
                break
            admit.append(c)
            count += 1
            pixels += c.pixels
        return self._admit(admit, expire)

    def _full(self, mates: list[Candidate]) -> bool:
        return len(mates) >= self.max_batch or sum(c.pixels for c in mates) >= self.pixel_budget

    def _admit(self, admit: list[Candidate], expire: list[Candidate]) -> Decision:
        for c in admit:
            self.running[c.key] = self.waiting.pop(c.key)
        return Decision(admit, expire, None)
