"""The durable job store's contract: what a queued job is, and what every store must do.

A job moves IN_QUEUE -> IN_PROGRESS -> COMPLETED (fal knows only these three; a failed or
cancelled job is COMPLETED with an error result). Order: FIFO within a priority, every `normal`
job before any `low` one; `queue_position` is exact (jobs ahead of it). A dispatcher `claim`s the
first job it may run and holds a lease on it, renewed while the job runs; a job whose lease runs
out (its router died), or that its router gives back (its model replica died), is queued again
at the head of its priority with a new `gateway_request_id`, unless it asked not to be retried
or has run `max_attempts` times. Only the lease holder's result counts,
so a worker that lost its lease cannot overwrite the retry's.

A job submitted with a webhook URL gets a delivery when it completes, in the same atomic step
(so no completion goes unannounced, whatever crashes after). Deliveries are claimed with a lease
like jobs; a failed attempt is due again later; the job is not purged while its delivery is
pending.

Stores implement `JobStore`; the same tests run against each (tests/test_job_store.py).
"""

from __future__ import annotations

import enum
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Priority = Literal["normal", "low"]
WebhookState = Literal["pending", "delivered", "failed"]
PRIORITY_RANK: dict[str, int] = {"normal": 0, "low": 1}


class JobState(str, enum.Enum):
    IN_QUEUE = "IN_QUEUE"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"


class QueueFull(Exception):
    """Back-pressure: the queue (or the key's share of it) is full; the client should retry later."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class AdmissionLimits:
    max_queued: int | None = None  # jobs waiting, all keys together
    max_queued_per_key: int | None = None


@dataclass
class NewJob:
    """What a submit hands the store."""

    app: str  # owner/alias: status, result and cancel are addressed by it
    endpoint: str  # the endpoint id it was submitted to (owner/alias[/path])
    payload: bytes  # the request body, as submitted (JSON)
    key_id: str
    base_url: str = ""  # where the client reached us: output file URLs start with it
    priority: Priority = "normal"
    webhook_url: str | None = None
    no_retry: bool = False
    start_timeout_s: float | None = None  # past this without starting: 504 request_timeout
    runner_hint: str | None = None
    request_id: str = field(default_factory=lambda: str(uuid.uuid4()))


@dataclass
class JobRecord:
    request_id: str
    app: str
    endpoint: str
    payload: bytes
    key_id: str
    base_url: str
    priority: Priority
    webhook_url: str | None
    no_retry: bool
    start_deadline: float | None
    runner_hint: str | None
    state: JobState
    gateway_request_id: str
    attempts: int = 0
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    lease_owner: str | None = None
    lease_until: float | None = None
    cancel_requested: bool = False
    status_code: int | None = None
    result: bytes | None = None  # the response body (JSON)
    metrics: dict[str, Any] = field(default_factory=dict)
    logs: list[dict[str, Any]] = field(default_factory=list)
    webhook_state: WebhookState | None = None  # once completed with a webhook URL
    webhook_attempts: int = 0
    webhook_error: str | None = None  # why the last attempt failed


@dataclass(frozen=True)
class Outcome:
    """How a job ended: the HTTP status and body its result endpoint returns."""

    status_code: int
    body: bytes
    metrics: dict[str, Any] = field(default_factory=dict)


# What a cancelled job's result endpoint answers (fal's body and code).
CANCELLED = Outcome(499, b'{"detail": "Request cancelled", "error_type": "client_cancelled"}')

CancelResult = Literal["cancelled", "requested", "already_completed", "not_found"]


def now() -> float:
    return time.time()


def new_gateway_id() -> str:
    return str(uuid.uuid4())


class JobStore(Protocol):
    async def submit(self, job: NewJob, limits: AdmissionLimits = AdmissionLimits()) -> JobRecord:
        """Queue a job (raises `QueueFull` past the limits)."""

    async def get(self, request_id: str, app: str | None = None, bodies: bool = True, logs: bool = True) -> JobRecord | None:
        """The job, if it exists (and belongs to `app`, when given). Status polls ask without
        `bodies` (payload and result: megabytes with data URIs; left empty) and without `logs`
        unless the client wants them."""

    async def position(self, request_id: str) -> int | None:
        """Jobs ahead of a queued job; None once it left the queue."""

    async def claim(self, worker: str, lease_s: float, apps: set[str] | None = None, max_running_per_key: int | None = None) -> JobRecord | None:
        """The first queued job (of `apps`) whose key is under its running limit, now IN_PROGRESS
        and leased to `worker`; None when there is none."""

    async def renew(self, request_id: str, worker: str, lease_s: float) -> bool:
        """Extend the lease; False when `worker` no longer holds it."""

    async def append_log(self, request_id: str, entry: dict[str, Any]) -> None: ...

    async def finish(self, request_id: str, worker: str | None, outcome: Outcome) -> bool:
        """Complete the job (as its lease holder, or as anyone when `worker` is None: a queued
        job cancelled or timed out); False when it was no longer ours to finish."""

    async def cancel(self, request_id: str, app: str | None = None) -> CancelResult:
        """Queued: completed at once with the 499 result. Running: flagged (the worker stops
        between denoising steps). Completed: left as it was."""

    async def cancel_requested(self, request_id: str) -> bool:
        """Whether a running job's cancel was asked for (its worker polls this between steps)."""

    async def requeue_expired(self, max_attempts: int | None = None) -> tuple[list[str], list[JobRecord]]:
        """Jobs whose lease ran out: queued again at the head of their priority (new gateway id;
        their ids come first), or, with `no_retry` or after `max_attempts` runs, left IN_PROGRESS
        without a lease and returned second, so the caller completes them with an error."""

    async def release(self, request_id: str, worker: str) -> bool:
        """The lease holder gives a job back (its model replica died): queued again at the head
        of its priority with a new gateway id. False when `worker` no longer holds it."""

    async def expired_unstarted(self) -> list[JobRecord]:
        """Queued jobs past their start deadline."""

    async def purge(self, older_than_s: float) -> int:
        """Forget completed jobs finished more than `older_than_s` ago."""

    async def depth(self, app: str | None = None) -> int:
        """Queued jobs (of one app), for autoscaling."""

    async def running(self, key_id: str | None = None) -> int: ...

    async def claim_webhook(self, worker: str, lease_s: float) -> JobRecord | None:
        """The completed job whose pending webhook delivery is due first (its attempt counted),
        leased to `worker`: if that worker dies, the delivery is due again when the lease ends."""

    async def webhook_attempted(self, request_id: str, worker: str, delivered: bool, error: str | None, retry_at: float | None) -> bool:
        """Record an attempt: delivered, failed for good (`retry_at` None), or due again at
        `retry_at`. False when `worker` no longer held the delivery."""

    async def enter_sync_run(self, key_id: str, holder: str, limit: int, ttl_s: float) -> bool:
        """Count one synchronous call of `key_id` in for `holder` (a router replica), unless the
        key's running jobs plus the sync calls of every live holder reach `limit`. A holder lives
        `ttl_s` past its last enter or renewal: a dead router's calls stop counting."""
        ...

    async def leave_sync_run(self, key_id: str, holder: str) -> None: ...

    async def renew_sync_runs(self, holder: str, counts: dict[str, int], ttl_s: float) -> None:
        """The holder's sync calls in flight, all of them (they replace what the store had)."""
        ...

    async def take_token(self, bucket: str, capacity: float, refill_per_s: float) -> float:
        """A token bucket every user of the store shares (rate limits): 0 if a token was taken,
        else the seconds until one will be there. Full (`capacity`) when first used."""
        ...

    async def shared_value(self, name: str, make: bytes) -> bytes:
        """The value stored under `name`, storing `make` first if there is none: what every
        router sharing this store must agree on (the webhook signing key)."""

    async def close(self) -> None: ...
