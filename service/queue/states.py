"""A job's states, and a job as its hash reads. What a job draws (its spec) is the engine's
`GenerationRequest` (`service/ldm/request.py`), stored as JSON in the job's hash."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


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


WebhookEvent = Literal["started", "succeeded", "failed", "cancelled", "expired"]
TERMINAL_EVENTS: list[WebhookEvent] = ["succeeded", "failed", "cancelled", "expired"]


class Webhook(BaseModel):
    """Where to POST a job's events, and which (default: how it ended). Checked by the gateway before
    enqueue (allowed hosts, no private addresses); stored in the job's hash."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(min_length=8, max_length=2048, examples=["https://example.com/hooks/ldm"])
    events: list[WebhookEvent] = Field(default_factory=lambda: list(TERMINAL_EVENTS), min_length=1)

    def events_field(self) -> str:
        return "," + ",".join(self.events) + ","


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
    webhook: str = ""  # the Webhook (JSON) the job reports to, if any
    webhook_attempts: int = 0
    webhook_status: str = ""  # the last attempt's HTTP status, or why it failed
    webhook_delivered: int = 0  # events delivered

    @classmethod
    def from_hash(cls, fields: dict[str, str]) -> JobState:
        """The job hash's fields (as text), the spec and stream entry left aside."""
        kept = {k: v for k, v in fields.items() if k not in ("spec", "entry") and v != ""}
        return cls.model_validate(kept)
