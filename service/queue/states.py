"""A job's states, and a job as its hash reads. What a job draws (its spec) is the engine's
`GenerationRequest` (`service/ldm/request.py`), stored as JSON in the job's hash."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel


class JobStatus(StrEnum):
    """`queued -> running -> succeeded | failed | cancelled | expired`; a reclaimed or handed-back job
    goes back to queued. Failed, cancelled and expired can also be reached from queued."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.EXPIRED})


class JobState(BaseModel):
    """A job as its hash reads, for status endpoints and tests."""

    id: str
    model: str
    owner: str = ""
    status: JobStatus
    created: float = 0.0  # a partial hash (not written by this protocol) may lack these
    deadline: float = float("inf")
    started: float | None = None
    finished: float | None = None
    attempt: int = 0
    handed_back: int = 0
    step: int = 0
    steps: int = 0
    results: int = 0  # how many results were stored: exactly one for a succeeded job
    worker: str = ""
    error: str = ""
